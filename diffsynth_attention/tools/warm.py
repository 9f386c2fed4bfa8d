"""Warming the cache ahead of time: problem lists (presets, shape files) and the warm loop.

A problem is a dict with the fields of ``data/diffsynth_shapes.json`` (a copy of the shape
suite of attention problems that DiffSynth-Studio pipelines issue): name, batch, heads_q,
heads_kv, seq_q, seq_kv, head_dim, causal, dtype (and optionally model, window).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
from einops import rearrange

logger = logging.getLogger("diffsynth_attention")

SHAPES_FILE = Path(__file__).resolve().parent.parent / "data" / "diffsynth_shapes.json"
REQUIRED = ("name", "batch", "heads_q", "heads_kv", "seq_q", "seq_kv", "head_dim")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64,
          "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "half": torch.float16}
CPU_MAX_SEQ = 512
CPU_MAX_HEADS = 8


class ShapeFileError(ValueError):
    pass


def parse_shapes(doc, source: str) -> list:
    """Validate a shapes document ({"shapes": [...]} or a list); return the problem dicts."""
    shapes = doc.get("shapes") if isinstance(doc, dict) else doc
    if not isinstance(shapes, list) or not shapes:
        raise ShapeFileError(f"{source}: expected a non-empty list of problems under 'shapes'")
    out = []
    for i, s in enumerate(shapes):
        where = f"{source}: problem {i}" + (f" ({s.get('name')!r})" if isinstance(s, dict) and s.get("name") else "")
        if not isinstance(s, dict):
            raise ShapeFileError(f"{where}: not an object")
        missing = [f for f in REQUIRED if f not in s]
        if missing:
            raise ShapeFileError(f"{where}: missing {', '.join(missing)}")
        for f in REQUIRED[1:]:
            if isinstance(s[f], bool) or not isinstance(s[f], int) or s[f] <= 0:
                raise ShapeFileError(f"{where}: {f}={s[f]!r} must be a positive int")
        if s["heads_q"] % s["heads_kv"]:
            raise ShapeFileError(f"{where}: heads_q ({s['heads_q']}) must be a multiple of heads_kv ({s['heads_kv']})")
        dtype = s.get("dtype", "bfloat16")
        if dtype not in DTYPES:
            raise ShapeFileError(f"{where}: dtype {dtype!r} is not one of {', '.join(sorted(DTYPES))}")
        out.append({**s, "dtype": dtype, "causal": bool(s.get("causal", False))})
    return out


def load_shapes_file(path) -> list:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ShapeFileError(f"cannot read shapes file {path}: {exc.strerror or exc}") from None
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise ShapeFileError(f"{path}: not valid JSON ({exc})") from None
    return parse_shapes(doc, str(path))


def builtin_shapes() -> list:
    return load_shapes_file(SHAPES_FILE)


def preset_names() -> list:
    return ["all", "cpu"] + [s["name"] for s in builtin_shapes()]


def scale_for_cpu(shape: dict) -> dict:
    """A shape cut down to CPU size: batch 1, at most 8 heads and 512 tokens per side."""
    heads_q = min(shape["heads_q"], CPU_MAX_HEADS)
    groups = shape["heads_q"] // shape["heads_kv"]
    heads_kv = max(1, heads_q // groups) if heads_q % groups == 0 else heads_q
    return {**shape, "name": shape["name"] + "@cpu", "batch": 1, "heads_q": heads_q, "heads_kv": heads_kv,
            "seq_q": min(shape["seq_q"], CPU_MAX_SEQ), "seq_kv": min(shape["seq_kv"], CPU_MAX_SEQ)}


def select_presets(names: Iterable[str]) -> list:
    shapes = builtin_shapes()
    by_name = {s["name"]: s for s in shapes}
    out = []
    for name in names:
        for part in [p.strip() for p in name.split(",") if p.strip()]:
            if part == "all":
                out += shapes
            elif part == "cpu":
                out += [scale_for_cpu(s) for s in shapes]
            elif part in by_name:
                out.append(by_name[part])
            else:
                raise ShapeFileError(f"unknown preset {part!r}; presets: {', '.join(preset_names())}")
    return out


def make_inputs(shape: dict, device, dtype=None, layout: str = "b n s d", generator: Optional[torch.Generator] = None):
    """Random q, k, v for a problem, laid out as ``layout``; returns (q, k, v, kwargs)."""
    dt = dtype or DTYPES[shape["dtype"]]
    b, hq, hk, sq, skv, d = (shape[f] for f in ("batch", "heads_q", "heads_kv", "seq_q", "seq_kv", "head_dim"))
    g = generator
    q = torch.randn(b, hq, sq, d, device=device, dtype=dt, generator=g)
    k = torch.randn(b, hk, skv, d, device=device, dtype=dt, generator=g)
    v = torch.randn(b, hk, skv, d, device=device, dtype=dt, generator=g)
    kwargs = {"is_causal": bool(shape.get("causal", False))}
    if shape.get("window") is not None:
        kwargs["window_size"] = int(shape["window"])
    if layout != "b n s d":
        packed = "(" in layout
        q = rearrange(q, f"b n s d -> {layout}").contiguous()
        k = rearrange(k, f"b n s d -> {layout}").contiguous()
        v = rearrange(v, f"b n s d -> {layout}").contiguous()
        kwargs.update(q_pattern=layout, k_pattern=layout, v_pattern=layout, out_pattern=layout)
        if packed:
            kwargs["dims"] = {"d": d}
    return q, k, v, kwargs


def resolve_device(device: Optional[str]) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: torch.cuda.is_available() is False on this machine")
    return dev


def warm(shapes: list, device: torch.device, dtype=None, layout: str = "b n s d", on_done: Optional[Callable] = None) -> list:
    """Tune every problem on ``device``; return [(shape, Explanation)]. Decisions go to the cache."""
    from ..api import explain

    results = []
    g = torch.Generator(device=device).manual_seed(0)
    for shape in shapes:
        q, k, v, kwargs = make_inputs(shape, device, dtype, layout, g)
        with torch.no_grad():
            info = explain(q, k, v, **kwargs)
        del q, k, v
        results.append((shape, info))
        if on_done is not None:
            on_done(shape, info)
    return results


def distributed_context() -> Optional[tuple]:
    """(rank, world_size, local_rank) under torchrun (WORLD_SIZE > 1), else None."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return None
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def warm_distributed(shapes: list, device_arg: Optional[str], dtype=None, layout: str = "b n s d", on_done=None) -> list:
    """``warm`` under torchrun: split problems across ranks, tune each on the rank's own GPU,
    save, then ``sync_decisions`` so every rank (and cache) holds rank 0's decisions."""
    import torch.distributed as dist

    from ..integrations.distributed import sync_decisions

    rank, world, local_rank = distributed_context()
    if device_arg is None and torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    else:
        device = resolve_device(device_arg)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    created = False
    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")
        created = True
    try:
        results = warm(shapes[rank::world], device, dtype, layout, on_done)
        sync_decisions()
        if rank == 0:  # every problem is now a cache hit: collect the whole table
            results = warm(shapes, device, dtype, layout)
        return results
    finally:
        if created:
            dist.destroy_process_group()
