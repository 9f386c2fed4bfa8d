"""torch.compile support: the dispatch as one opaque ``torch.library`` custom operator.

Under ``torch.compile`` the Python dispatcher (environment, contextvars, dict lookups) would
break the graph. Instead, ``attention_forward`` rearranges to ``b n s d`` with einops (which
Dynamo traces) and calls ``diffsynth_attention::attention``: a custom operator with a fake
implementation for tracing. When the compiled graph runs, the operator calls the eager
dispatcher, so compiled code still reaches the tuned backend (tuning never happens while
tracing, nor while a CUDA graph is being captured). Its backward recomputes attention with
PyTorch's SDPA and differentiates that.
"""

from __future__ import annotations

from typing import Optional

import torch
from einops import rearrange

from ..problem import CANONICAL

_AXES = ("b", "n", "s", "d")


@torch.library.custom_op("diffsynth_attention::attention", mutates_args=())
def attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: Optional[torch.Tensor],
    scale: Optional[float],
    is_causal: bool,
    window_size: Optional[int],
    compatibility_mode: bool,
) -> torch.Tensor:
    from . import default_dispatcher

    with torch.no_grad():
        out = default_dispatcher().forward(q, k, v, attn_mask=attn_mask, scale=scale, is_causal=is_causal,
                                compatibility_mode=compatibility_mode, window_size=window_size)
    return out.contiguous()


@attention_op.register_fake
def _(q, k, v, attn_mask, scale, is_causal, window_size, compatibility_mode):
    return q.new_empty((q.shape[0], q.shape[1], q.shape[2], v.shape[3]))


def _setup_context(ctx, inputs, output):
    q, k, v, attn_mask, scale, is_causal, window_size, compatibility_mode = inputs
    ctx.save_for_backward(q, k, v, attn_mask)
    ctx.has_mask = attn_mask is not None
    ctx.scale, ctx.is_causal, ctx.window_size = scale, is_causal, window_size


def _backward(ctx, grad_out):
    from ..backends import REGISTRY

    q, k, v, mask = ctx.saved_tensors
    mask = mask if ctx.has_mask else None
    with torch.enable_grad():
        qd, kd, vd = (t.detach().requires_grad_(True) for t in (q, k, v))
        m = mask if mask is None or mask.dim() == 4 else mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
        out = REGISTRY["torch"].forward(qd, kd, vd, m, ctx.scale, ctx.is_causal, ctx.window_size, True)
        gq, gk, gv = torch.autograd.grad(out, (qd, kd, vd), grad_out)
    return gq, gk, gv, None, None, None, None, None


attention_op.register_autograd(_backward, setup_context=_setup_context)


def _dims_for(pattern: str, dims: Optional[dict]) -> dict:
    if not dims:
        return {}
    names = pattern.replace("(", " ").replace(")", " ").split()
    return {a: n for a, n in dims.items() if a in names and a in _AXES}


def traced_attention(dispatcher, q, k, v, q_pattern, k_pattern, v_pattern, out_pattern, dims, attn_mask, scale, is_causal, compatibility_mode, window_size):
    """The traced path of ``attention_forward``: einops in, the custom operator, einops out."""
    if q_pattern != CANONICAL:
        q = rearrange(q, f"{q_pattern} -> {CANONICAL}", **_dims_for(q_pattern, dims))
    if k_pattern != CANONICAL:
        k = rearrange(k, f"{k_pattern} -> {CANONICAL}", **_dims_for(k_pattern, dims))
    if v_pattern != CANONICAL:
        v = rearrange(v, f"{v_pattern} -> {CANONICAL}", **_dims_for(v_pattern, dims))
    out = attention_op(q, k, v, attn_mask, None if scale is None else float(scale), bool(is_causal), window_size, bool(compatibility_mode))
    if out_pattern != CANONICAL:
        out = rearrange(out, f"{CANONICAL} -> {out_pattern}", **_dims_for(out_pattern, dims))
    return out
