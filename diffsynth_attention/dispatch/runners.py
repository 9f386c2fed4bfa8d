"""Runners: a backend bound, at plan time, to everything a signature fixes.

A runner is ``run(q, k, v, mask, scale) -> out`` in the caller's layout. Causality, the
window, whether gradients are needed, the mask's rank and the layout conversions are all fixed
by the signature, so they are decided once here and the hit path pays only for the backend's
own call (and the conversions the caller's layout needs).
"""

from __future__ import annotations

from typing import Callable

from ..problem import Call, mask_4d


def make_runner(backend, call: Call, need_grad: bool) -> Callable:
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
