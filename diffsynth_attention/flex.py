"""DiffSynth-Studio's ``use_flex=True`` / ``score_mod``: PyTorch's flex attention.

DiffSynth-Studio 2.1.12 (``diffsynth/core/attention/attention.py``) sends a call with
``use_flex=True`` or a ``score_mod`` to ``torch.nn.attention.flex_attention.flex_attention``
(compiled), with ``attn_mask`` passed as its ``block_mask`` and the ``score_mod`` as given; its
Wan-Animate DiT uses it with a ``BlockMask`` and a ``score_mod``. :func:`flex_attention_forward`
does the same, and also handles what DiffSynth's drops or cannot take:

- ``attn_mask`` may be a ``BlockMask`` (as DiffSynth) or a boolean/additive tensor
  broadcastable to (b, n, s_q, s_kv), applied in the score (DiffSynth's would fail on a tensor);
- ``is_causal`` (top-left aligned, as PyTorch) and ``window_size`` (|i - j| <= w) are applied
  in the score as well (DiffSynth ignores both under flex);
- grouped-query attention (fewer key/value heads) uses flex's ``enable_gqa``.

Flex attention is compiled on first use (as DiffSynth does; eager flex materializes the whole
score matrix). Where compilation is impossible (no C++ compiler on a CPU machine) it falls back
to eager flex once, with a warning. Tests switch compilation off with :func:`set_compile`.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

from .callsite import convert, is_compiling, tracing
from .problem import check_layout

from . import process

logger = logging.getLogger("diffsynth_attention")

_state = {"compile": True, "compiled": None, "failed": False}
_lock = process.new_lock()


def set_compile(enabled: bool) -> None:
    """Compile flex attention on first use (default True); False runs it eagerly."""
    _state["compile"] = bool(enabled)


def _flex():
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention


def _run(q, k, v, block_mask, scale, score_mod, enable_gqa):
    flex = _flex()
    kwargs = {"block_mask": block_mask, "scale": scale, "score_mod": score_mod}
    if enable_gqa:
        kwargs["enable_gqa"] = True
    # is_compiling() (process-wide on torch 2.13) left as it was: while another thread compiles, an
    # eager call here runs flex uncompiled (slower, the same result) rather than start a compile of its own
    if is_compiling() or not _state["compile"] or _state["failed"]:
        return flex(q, k, v, **kwargs)
    with _lock:
        if _state["compiled"] is None:
            _state["compiled"] = torch.compile(flex)
    try:
        return _state["compiled"](q, k, v, **kwargs)
    except Exception as exc:  # no compiler here, or an inductor failure: eager flex still answers
        try:
            out = flex(q, k, v, **kwargs)
        except Exception:
            raise exc from None
        _state["failed"] = True
        logger.warning("flex attention could not be compiled (%s: %s); running it eagerly from now on",
                       type(exc).__name__, str(exc).strip().splitlines()[0] if str(exc).strip() else "")
        return out


def _compose(score_mod: Optional[Callable], mask: Optional[torch.Tensor], is_causal: bool, window: Optional[int],
             shape: tuple):
    """One score_mod applying the caller's, then a tensor mask (broadcast to ``shape``, the
    problem's (b, n, s_q, s_kv)), the causal rule and the window."""
    if mask is None and not is_causal and window is None:
        return score_mod
    if mask is not None:
        try:  # a view with the problem's shape, read with the four index tensors: an int index
            mask = mask.expand(shape)  # beside them makes torch 2.5's flex trace call .item() and fail
        except RuntimeError:
            raise ValueError(f"attn_mask of shape {tuple(mask.shape)} is not broadcastable to (b, n, s_q, s_kv) = "
                             f"{tuple(shape)}") from None
    neg_inf = float("-inf")

    def composed(score, b, h, q_idx, kv_idx):
        if score_mod is not None:
            score = score_mod(score, b, h, q_idx, kv_idx)
        if mask is not None:
            m = mask[b, h, q_idx, kv_idx]
            score = torch.where(m, score, neg_inf) if m.dtype == torch.bool else score + m
        if is_causal:
            score = torch.where(q_idx >= kv_idx, score, neg_inf)
        if window is not None:
            score = torch.where((q_idx - kv_idx).abs() <= window, score, neg_inf)
        return score
    return composed


def flex_attention_forward(q, k, v, q_pattern="b n s d", k_pattern="b n s d", v_pattern="b n s d",
                           out_pattern="b n s d", dims=None, attn_mask=None, scale=None, is_causal=False,
                           window_size=None, score_mod=None):
    """DiffSynth-Studio's ``attention_forward(..., use_flex=True, score_mod=...)``: flex attention
    over the caller's einops layouts. ``attn_mask`` is a flex ``BlockMask`` or a boolean
    (True attends) / additive tensor mask; ``score_mod(score, b, h, q_idx, kv_idx)`` as flex takes it."""
    if score_mod is not None and not callable(score_mod):
        raise TypeError(f"score_mod must be a callable score_mod(score, b, h, q_idx, kv_idx), got {type(score_mod).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if window_size is not None and (isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 0):
        raise ValueError(f"window_size={window_size!r} must be a non-negative int")
    if window_size is not None and is_causal:
        raise ValueError("window_size cannot be combined with is_causal=True")
    canon = "b n s d"
    # a trace fails on a bad pattern too, in the converter (einops is not traced here); per thread
    # (tracing(), not the process-wide is_compiling()): an eager call is validated while another thread compiles
    if tracing():
        dims = {} if dims is None else dict(dims)
        qc, kc, vc = (convert(t, p, canon, dims) for t, p in ((q, q_pattern), (k, k_pattern), (v, v_pattern)))
    else:
        qc, kc, vc = check_layout((q, k, v), q_pattern, k_pattern, v_pattern, out_pattern, dims)
        dims = {} if dims is None else dict(dims)
    block_mask, tensor_mask = None, None
    if isinstance(attn_mask, torch.Tensor):
        if attn_mask.dtype != torch.bool and attn_mask.dtype != qc.dtype:
            raise TypeError(f"attn_mask must be bool or of the query's dtype ({qc.dtype}); got {attn_mask.dtype}")
        tensor_mask = attn_mask
    elif attn_mask is not None:
        block_mask = attn_mask  # a flex BlockMask, as DiffSynth passes it
    mod = _compose(score_mod, tensor_mask, bool(is_causal), window_size, (*qc.shape[:3], kc.shape[2]))
    enable_gqa = qc.shape[1] != kc.shape[1]
    out = _run(qc, kc, vc, block_mask, scale, mod, enable_gqa)
    return convert(out, canon, out_pattern, dims)
