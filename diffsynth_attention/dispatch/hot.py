"""The hot path: ``attention_forward`` of one dispatcher (a closure over its plan table)."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .. import overrides, tiers
from ..callsite import any_autocast as _any_autocast
from ..callsite import autocast_inputs as _autocast_inputs
from ..callsite import is_compiling as _is_compiling
from ..request import FLOAT32, Request, cublas_tf32, finite_scale
from .guards import tensor_guard

_grad_enabled = torch.is_grad_enabled
_compiler = getattr(torch, "compiler", None)
# Dynamo folds is_dynamo_compiling() to True while it traces; outside Dynamo (torch.export's
# non-strict mode) torch.compiler's exporting flag says so. One trivial call and one attribute
# read, where is_compiling() costs two Python frames on every eager call. Not the compiling flag:
# on torch 2.13 it is held for a whole compile session, process-wide, so while any thread compiled
# every other thread's eager calls took the trace's path (a bake per call, no plan-table hit).
_dynamo_compiling = getattr(_compiler, "is_dynamo_compiling", None)


def _never() -> bool:
    """Where torch lacks is_dynamo_compiling: the hot path's is_compiling() then says it all."""
    return False


def make_forward(d) -> Callable:
    """The hot path of dispatcher ``d``, as a function of DiffSynth-Studio's signature.

    A closure over the dispatcher's plan table: the signature tuple is
    :meth:`Request.signature`'s, inlined (a test proves that they agree on every argument).

    The common call (no mask, no scale, no window, not compatibility mode, a bool ``is_causal``) is first looked up by
    its non-tensor state and ``k``'s size in the table's guarded entries (``PlanTable.fast``): a
    tensor guard (dispatch/guards.py) checks q, k and v in one C call where the signature reads
    eleven of their attributes. A call no entry serves takes the signature, and a signature hit
    of such a call adds an entry for the next one.
    """
    plans = d.plans
    plans_get = plans.get
    fast = getattr(plans, "fast", None)  # a plain dict (a test's recording table) has no guarded entries
    fast_get = fast.get if fast is not None else None
    # the dict itself is no cell of the closure: torch 2.5's Dynamo guards a dict cell's length when it
    # inlines attention_forward, so each entry the run-time operator added recompiled the graph
    fast_len = fast.__len__ if fast is not None else None
    add_fast = getattr(plans, "add_fast", None)
    hit = d.counters.hit  # thread-safe (dispatch/counters.py)
    slow = d.call
    failed = d.failed
    env_get, impl_key, scope_get = overrides._env_get, overrides._IMPL_KEY, overrides.scope_get
    tier_scope_get, tier_env_get, tier_key = tiers.scope_get, tiers._env_get, tiers._KEY
    flag_exporting = hasattr(_compiler, "_is_exporting_flag")
    dynamo_compiling = _dynamo_compiling or _never

    def attention_forward(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        q_pattern: str = "b n s d",
        k_pattern: str = "b n s d",
        v_pattern: str = "b n s d",
        out_pattern: str = "b n s d",
        dims: Optional[dict] = None,
        attn_mask: Optional[torch.Tensor] = None,
        scale: Optional[float] = None,
        is_causal: bool = False,
        compatibility_mode: bool = False,
        window_size: Optional[int] = None,
        use_flex: bool = False,
        score_mod: Optional[Callable] = None,
    ) -> torch.Tensor:
        """Attention with DiffSynth-Studio's signature and semantics, on the best backend.

        ``q``, ``k``, ``v`` are laid out as their einops patterns say (packed axes such as
        ``"b s (n d)"`` need ``dims``); the output is laid out as ``out_pattern``. ``attn_mask`` is
        boolean (True attends) or additive, broadcastable to (b, n, s_q, s_kv); ``is_causal`` uses
        PyTorch's top-left alignment; ``window_size=w`` lets a query attend to keys with
        |i - j| <= w; ``compatibility_mode=True`` forces ``torch``. The backend comes from
        ``use_backend``, else ``DIFFSYNTH_ATTENTION_IMPLEMENTATION``, else (``auto``) the tuned
        decision for this problem on this GPU. ``use_flex=True`` or a ``score_mod`` goes to
        PyTorch's flex attention, as DiffSynth-Studio does (:mod:`diffsynth_attention.flex`).
        """
        if use_flex or score_mod is not None:
            from ..flex import flex_attention_forward

            return flex_attention_forward(q, k, v, q_pattern, k_pattern, v_pattern, out_pattern, dims, attn_mask, scale,
                                          is_causal, window_size, score_mod)
        if _any_autocast():  # a torch.autocast region: its dtype, as autocast gives SDPA (callsite.autocast_inputs)
            cast = _autocast_inputs(q, k, v, attn_mask)
            if cast is not None:
                with torch.autocast(cast[0], enabled=False):
                    return attention_forward(cast[1], cast[2], cast[3], q_pattern, k_pattern, v_pattern, out_pattern,
                                             dims, cast[4], scale, is_causal, compatibility_mode, window_size)
        # Dynamo reads only the first call (folded to True), so it guards nothing of the rest
        if dynamo_compiling() or (_compiler._is_exporting_flag if flag_exporting else _is_compiling()):
            from .baked import traced_attention

            return traced_attention(d, q, k, v, q_pattern, k_pattern, v_pattern, out_pattern, dims, attn_mask, scale,
                                    is_causal, compatibility_mode, window_size)
        # every scope and variable read once: the guarded entry's state and the signature it is
        # added under hold the same values, even where another thread changes one in between
        impl_raw, scope, tier_scope = env_get(impl_key), scope_get(), tier_scope_get()
        tier_raw, tf32 = tier_env_get(tier_key), cublas_tf32()
        state = plan = None
        # (a bool is_causal only: 1 and 0 would share a state, and the signature tells them apart)
        if attn_mask is None and scale is None and window_size is None and compatibility_mode is False \
                and (is_causal is False or is_causal is True) and fast_get is not None:
            try:
                # k.numel() parts the entries by size (one C call and an int's hash, where k.shape
                # builds a torch.Size and hashes it: ~0.1 us); the guard tells same-size shapes apart
                state = (q_pattern, k_pattern, v_pattern, out_pattern, is_causal, _grad_enabled(),
                         scope, impl_raw, tier_scope, tier_raw, tf32, k.numel())
                for guard, snap, entry in fast_get(state, ()):
                    if dims == snap and guard(q, k, v) and (dims is None or _int_values(dims)):
                        plan = entry
                        break
            except Exception:  # not tensors, unhashable patterns...: the signature path (and validation) explains
                state = None
            if plan is not None:
                if plan.counts_hit:
                    hit()
                try:
                    return plan.run(q, k, v, None, None)
                except Exception as exc:
                    grad = _grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
                    return failed(plan, exc, Request(q, k, v, q_pattern, k_pattern, v_pattern, out_pattern, dims, None, None,
                                                     is_causal, False, None), impl_raw, grad)
        try:
            # callsite.needs_grad, inlined (a frame per call): the signature test checks they agree
            grad = _grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad
                                        or attn_mask is not None and attn_mask.requires_grad)
            qd = q.dtype
            plan = plans_get(sig := (
                scope, impl_raw, compatibility_mode, type(compatibility_mode), q.shape, k.shape, v.shape,
                q.stride(), k.stride(), v.stride(), qd, k.dtype, v.dtype, qd is FLOAT32 and tf32,
                q.device, k.device, v.device,
                q_pattern, k_pattern, v_pattern, out_pattern,
                None if dims is None else tuple((a, n, type(n)) for a, n in dims.items()),
                None if attn_mask is None else (attn_mask.shape, attn_mask.dtype, attn_mask.device, attn_mask.layout),
                is_causal, type(is_causal), window_size, type(window_size),
                type(scale), scale is None or finite_scale(scale), grad,
                tier_scope, tier_raw,
            ))
        except Exception:  # not tensors, unhashable dims, an incomparable scale...: validation explains
            grad, plan = False, None
        if plan is None:
            return slow(Request(q, k, v, q_pattern, k_pattern, v_pattern, out_pattern, dims, attn_mask, scale, is_causal,
                                compatibility_mode, window_size), impl_raw, grad)
        if state is not None and fast_len() < plans.MAX_STATES and len(fast_get(state, ())) < plans.MAX_PER_STATE:
            guard = tensor_guard(q, k, v)
            if guard is not None and (dims is None or _int_values(dims)):
                add_fast(state, sig, plan, guard, dims)
        if plan.counts_hit:
            hit()
        try:
            return plan.run(q, k, v, attn_mask, scale)
        except Exception as exc:
            return failed(plan, exc, Request(q, k, v, q_pattern, k_pattern, v_pattern, out_pattern, dims, attn_mask, scale,
                                          is_causal, compatibility_mode, window_size), impl_raw, grad)

    return attention_forward


def _int_values(dims: dict) -> bool:
    """Whether every value of ``dims`` is an int (``2.0 == 2``, and validation refuses 2.0)."""
    for n in dims.values():
        if type(n) is not int:
            return False
    return True
