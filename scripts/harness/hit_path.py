"""The hit path's parts timed alone (scripts/bench_hit_path.py): what reaches into the package."""
from __future__ import annotations

import torch

from diffsynth_attention import overrides, tiers
from diffsynth_attention.dispatch import default_dispatcher
from diffsynth_attention.dispatch.hot import _dynamo_compiling, _is_compiling
from diffsynth_attention.request import Request


def hit_path_parts(q, k, v, device, calls: int, blocks: int, host_us, direct_torch) -> dict:
    """Host us per call of each part of a hit on the default dispatcher's ``torch`` plan for
    ``q, k, v`` (``b n s d``, no mask): ``host_us(fns, device, calls, blocks)`` times them."""
    import diffsynth_attention as da

    f = da.attention_forward
    disp = default_dispatcher()
    for _ in range(3):  # planned, then a signature hit that adds the guarded entry
        f(q, k, v)
    req = Request(q, k, v)
    sig = req.signature(overrides.scope_get(), overrides.implementation_raw(), False, tiers.scope_get(), tiers.raw())
    plans = getattr(disp, "plans", None)
    plan = plans.get(sig) if plans is not None else None

    def empty(q, k, v, q_pattern="b n s d", k_pattern="b n s d", v_pattern="b n s d", out_pattern="b n s d", dims=None,
              attn_mask=None, scale=None, is_causal=False, compatibility_mode=False, window_size=None, use_flex=False,
              score_mod=None):
        return q

    cm = torch.compiler
    parts = {
        "python call, 15 parameters": lambda: empty(q, k, v),
        "is_compiling()": _is_compiling,
        "is_dynamo_compiling() or flag": (lambda: _dynamo_compiling() or cm._is_compiling_flag) if _dynamo_compiling else _is_compiling,
        "signature tuple": lambda: req.signature(None, None, False, None, None),
    }
    if plan is not None:
        get = plans.get
        parts["signature + plan lookup"] = lambda: get(req.signature(overrides.scope_get(), overrides.implementation_raw(), False,
                                                                     tiers.scope_get(), tiers.raw()))
        fast = getattr(plans, "fast", None)
        if fast:
            from diffsynth_attention.request import cublas_tf32

            fget, grad_on = fast.get, torch.is_grad_enabled

            def guarded():  # the hit path's guarded entry: the state tuple, its lookup and the tensor guard
                state = ("b n s d", "b n s d", "b n s d", "b n s d", False, grad_on(), overrides.scope_get(),
                         overrides.implementation_raw(), tiers.scope_get(), tiers.raw(), cublas_tf32(), k.numel())
                for guard, _, p in fget(state, ()):
                    if guard(q, k, v):
                        return p
            if guarded() is not plan:  # the state above is hot.py's: it must find the entry the hit path finds
                raise RuntimeError("hit_path_parts' state tuple no longer matches dispatch/hot.py's")
            parts["guarded entry: state + lookup + tensor guard"] = guarded
        parts["plan.run (the decided backend's runner)"] = lambda: plan.run(q, k, v, None, None)
        parts["direct torch"] = direct_torch
    return host_us(parts, device, calls, blocks)
