"""Runners: a backend bound, at plan time, to everything a signature fixes.

A runner is ``run(q, k, v, mask, scale) -> out`` in the caller's layout. Causality, the
window, whether gradients are needed, the mask's rank and the layout conversions are all fixed
by the signature, so they are decided once here and the hit path pays only for the backend's
own call (and the conversions the caller's layout needs).
"""

from __future__ import annotations

from typing import Callable

import torch

from ..callsite import _identity, converter
from ..problem import _AXES, ADDITIVE_FLOAT32, CANONICAL, Call, mask_4d, readable_mask


def make_runner(backend, call: Call, need_grad: bool) -> Callable:
    run = _runner(backend, call, need_grad)
    if call.problem.mask == ADDITIVE_FLOAT32 and call.problem.dtype == torch.float64:  # decided at plan time: ...
        def run_upcast(q, k, v, mask, scale, _run=run):  # ... the mask readable_mask upcasts, for every backend
            return _run(q, k, v, readable_mask(mask, torch.float64), scale)
        return run_upcast
    return run


def _runner(backend, call: Call, need_grad: bool) -> Callable:
    direct = _native_runner(backend, call)
    if direct is not None:
        return direct
    native = backend.bind(call.problem, need_grad, call.scale is None)  # canonical b n s d in and out
    layout = call.layout
    reshape_mask = call.mask_ndim not in (0, 4)
    if layout.identity and not reshape_mask:
        return native
    if layout.identity:
        def run(q, k, v, mask, scale):
            return native(q, k, v, mask_4d(mask), scale)
        return run
    to_q, to_k, to_v = layout.to_canonical
    back = layout.from_canonical
    if not reshape_mask:
        def run(q, k, v, mask, scale):
            return back(native(to_q(q), to_k(k), to_v(v), mask, scale))
        return run

    def run(q, k, v, mask, scale):
        return back(native(to_q(q), to_k(k), to_v(v), mask_4d(mask), scale))
    return run


def _native_runner(backend, call: Call):
    """For a kernel package that works in its own layout (``output_layout``, ``b s n d`` for
    FlashAttention) and declares ``binds_native``: the caller's tensors converted straight to that
    layout and the output straight to the caller's, with ``forward_native``. Through ``b n s d``
    (the generic runner) that is three more views each way and two more frames: ~17-20 us over the
    kernel's own call on an H100's host, against ~2 us for SDPA. For a ``b s n d`` caller nothing is
    converted; for DiffSynth-Studio's ``b s (n d)``, one ``unflatten`` a tensor and one ``flatten``.
    None for masked calls and other backends (the generic runner)."""
    native = getattr(backend, "output_layout", CANONICAL)
    forward_native = getattr(backend, "forward_native", None)
    if not getattr(backend, "binds_native", False) or forward_native is None or native == CANONICAL or call.mask_ndim:
        return None
    layout, p = call.layout, call.problem
    dims = tuple(pair for pair in layout.dims if pair[0] in _AXES)  # as the layout's own converters (problem.py)
    to_q, to_k, to_v = (converter(pattern, native, dims) for pattern in (layout.q_pattern, layout.k_pattern, layout.v_pattern))
    back = converter(native, layout.out_pattern, dims)
    causal, window = p.causal, p.window
    if to_q is to_k is to_v is back is _identity:
        def run_same(q, k, v, mask, scale):
            return forward_native(q, k, v, scale, causal, window)
        return run_same

    def run(q, k, v, mask, scale):
        return back(forward_native(to_q(q), to_k(k), to_v(v), scale, causal, window))
    return run
