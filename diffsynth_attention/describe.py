"""One description of a problem, from a key's problem dict (``Problem.fields``):
``Problem.describe``, ``explain``, the logs and the command line's tables all use it. No torch
here: ``cache show`` describes decisions without importing it."""

from __future__ import annotations

from .states import MaskKind

CANONICAL_LAYOUT = "b n s d, b n s d, b n s d -> b n s d"


def describe_problem(p: dict, layout: bool = False) -> str:
    """E.g. ``b=2 n=8/2 s=4096x77 d=64 float16 causal grad``; with ``layout``, a layout other
    than ``b n s d`` is appended in brackets."""
    head_dim_v = p.get("head_dim_v", p["head_dim"])
    parts = [
        f"b={p['batch']}",
        f"n={p['heads_q']}" + (f"/{p['heads_kv']}" if p["heads_kv"] != p["heads_q"] else ""),
        f"s={p['seq_q']}" + (f"x{p['seq_kv']}" if p["seq_kv"] != p["seq_q"] else ""),
        f"d={p['head_dim']}" + (f"/{head_dim_v}" if head_dim_v != p["head_dim"] else ""),
        p["dtype"],
    ]
    if p.get("causal"):
        parts.append("causal")
    if p.get("window") is not None:
        parts.append(f"window={p['window']}")
    if p.get("mask", MaskKind.NONE) != MaskKind.NONE:
        shape = p.get("mask_shape")
        parts.append(f"{p['mask']} mask" + (f" {list(shape)}" if shape is not None else ""))
    if p.get("requires_grad"):
        parts.append("grad")
    if layout and p.get("layout", CANONICAL_LAYOUT) != CANONICAL_LAYOUT:
        parts.append(f"[{p['layout']}]")
    return " ".join(parts)
