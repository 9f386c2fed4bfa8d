"""Input synthesis: random q, k, v (and a mask) for a problem of a shape file, in a caller's
layout and memory order, needing gradients where the problem does."""

from __future__ import annotations

from typing import Optional

import torch

from ..callsite import convert
from .shapes import DTYPE_NAMES, layout_patterns


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype for an accepted spelling (see :data:`.shapes.DTYPE_NAMES`)."""
    return getattr(torch, DTYPE_NAMES[name])


def _laid_out(t: torch.Tensor, pattern: str, order: Optional[str], dims: dict) -> torch.Tensor:
    """``t`` (``b n s d``) as ``pattern``; where ``order`` (e.g. ``bsnd``) names another memory
    order than the pattern's, a view of memory in that order."""
    if pattern == "b n s d" and order in (None, "bnsd"):
        return t
    if order is not None and "(" not in pattern and order != pattern.replace(" ", ""):
        stored = convert(t, "b n s d", " ".join(order)).contiguous()
        return convert(stored, " ".join(order), pattern)
    return convert(t, "b n s d", pattern, {a: n for a, n in dims.items() if a in pattern}).contiguous()


def _mask(shape: dict, kind: str, dt: torch.dtype, device, g) -> torch.Tensor:
    """A mask of ``kind`` and the problem's ``mask_shape`` (default (batch, 1, seq_q, seq_kv)):
    boolean with every query attending to key 0 (no empty row), or an additive bias."""
    dims = tuple(shape.get("mask_shape") or (shape["batch"], 1, shape["seq_q"], shape["seq_kv"]))
    if kind == "bool":
        mask = torch.rand(dims, device=device, generator=g) > 0.25
        mask[..., 0] = True
        return mask
    bias_dtype = torch.float32 if kind == "additive_float32" else dt
    return (torch.randn(dims, device=device, generator=g) * 0.5).to(bias_dtype)


def make_inputs(shape: dict, device, dtype=None, layout: str = "b n s d", generator: Optional[torch.Generator] = None):
    """Random q, k, v for a problem, laid out as the problem's own ``layout`` (a recording's) or
    else ``layout``; returns (q, k, v, kwargs for the call: patterns, mask, causal, window)."""
    dt = dtype or torch_dtype(shape["dtype"])
    b, hq, hk, sq, skv, d = (shape[f] for f in ("batch", "heads_q", "heads_kv", "seq_q", "seq_kv", "head_dim"))
    dv = shape.get("head_dim_v", d)
    g = generator
    q = torch.randn(b, hq, sq, d, device=device, dtype=dt, generator=g)
    k = torch.randn(b, hk, skv, d, device=device, dtype=dt, generator=g)
    v = torch.randn(b, hk, skv, dv, device=device, dtype=dt, generator=g)
    kwargs = {"is_causal": bool(shape.get("causal", False))}
    if shape.get("window") is not None:
        kwargs["window_size"] = int(shape["window"])
    if shape.get("mask", "none") != "none":
        kwargs["attn_mask"] = _mask(shape, shape["mask"], dt, device, g)
    *patterns, dims = layout_patterns(shape.get("layout", layout))
    memory = dict(part.split("=") for part in shape["memory"].split()) if shape.get("memory") else {}
    if patterns != ["b n s d"] * 4 or memory:
        q, k, v = (_laid_out(t, p, memory.get(name), {**dims, "d": t.shape[-1]})
                   for t, p, name in zip((q, k, v), patterns, "qkv"))
        kwargs.update(q_pattern=patterns[0], k_pattern=patterns[1], v_pattern=patterns[2], out_pattern=patterns[3])
        if any("(" in p for p in patterns):  # the lengths DiffSynth-Studio's callers give (the layout is in the key):
            kwargs["dims"] = dims or ({"n": hq} if hq == hk else {"d": d})  # the heads; with GQA only d fits q, k and v
    if shape.get("requires_grad"):
        q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    return q, k, v, kwargs
