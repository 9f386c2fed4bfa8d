"""Input synthesis: random q, k, v for a problem of the shape suite, in a caller's layout."""

from __future__ import annotations

from typing import Optional

import torch

from ..callsite import convert
from .shapes import DTYPE_NAMES


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype for an accepted spelling (see :data:`.shapes.DTYPE_NAMES`)."""
    return getattr(torch, DTYPE_NAMES[name])


def make_inputs(shape: dict, device, dtype=None, layout: str = "b n s d", generator: Optional[torch.Generator] = None):
    """Random q, k, v for a problem, laid out as ``layout``; returns (q, k, v, kwargs for the call)."""
    dt = dtype or torch_dtype(shape["dtype"])
    b, hq, hk, sq, skv, d = (shape[f] for f in ("batch", "heads_q", "heads_kv", "seq_q", "seq_kv", "head_dim"))
    g = generator
    q = torch.randn(b, hq, sq, d, device=device, dtype=dt, generator=g)
    k = torch.randn(b, hk, skv, d, device=device, dtype=dt, generator=g)
    v = torch.randn(b, hk, skv, d, device=device, dtype=dt, generator=g)
    kwargs = {"is_causal": bool(shape.get("causal", False))}
    if shape.get("window") is not None:
        kwargs["window_size"] = int(shape["window"])
    if layout != "b n s d":
        q, k, v = (convert(t, "b n s d", layout).contiguous() for t in (q, k, v))
        kwargs.update(q_pattern=layout, k_pattern=layout, v_pattern=layout, out_pattern=layout)
        if "(" in layout:
            kwargs["dims"] = {"d": d}
    return q, k, v, kwargs
