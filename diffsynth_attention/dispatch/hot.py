"""The hot path: ``attention_forward`` of one dispatcher (a closure over its plan table)."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .. import overrides, tiers
from ..callsite import is_compiling as _is_compiling
from ..request import FLOAT32, FLOAT_MAX, Request, cublas_tf32

_grad_enabled = torch.is_grad_enabled
_compiler = getattr(torch, "compiler", None)
# Dynamo folds is_dynamo_compiling() to True while it traces; outside Dynamo (torch.export's
# non-strict mode, make_fx) torch.compiler's module flag says so. One trivial call and one
# attribute read, where is_compiling() costs two Python frames on every eager call.
_dynamo_compiling = getattr(_compiler, "is_dynamo_compiling", None)


def make_forward(d) -> Callable:
    """The hot path of dispatcher ``d``, as a function of DiffSynth-Studio's signature.

    A closure over the dispatcher's plan table: the signature tuple is
    :meth:`Request.signature`'s, inlined (a test proves that they agree on every argument).
    """
    plans_get = d.plans.get
    hit = d.counters.hit  # thread-safe (dispatch/counters.py)
    slow = d.call
    failed = d.failed
    env_get, impl_key, scope_get = overrides._env_get, overrides._IMPL_KEY, overrides.scope_get
    tier_scope_get, tier_env_get, tier_key = tiers.scope_get, tiers._env_get, tiers._KEY
    fast_compiling = _dynamo_compiling is not None and hasattr(_compiler, "_is_compiling_flag")

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
        if (_dynamo_compiling() or _compiler._is_compiling_flag) if fast_compiling else _is_compiling():
            from .baked import traced_attention

            return traced_attention(d, q, k, v, q_pattern, k_pattern, v_pattern, out_pattern, dims, attn_mask, scale,
                                    is_causal, compatibility_mode, window_size)
        impl_raw = env_get(impl_key)
        try:
            # callsite.needs_grad, inlined (a frame per call): the signature test checks they agree
            grad = _grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad
                                        or attn_mask is not None and attn_mask.requires_grad)
            qd = q.dtype
            plan = plans_get((
                scope_get(), impl_raw, compatibility_mode, type(compatibility_mode), q.shape, k.shape, v.shape,
                q.stride(), k.stride(), v.stride(), qd, k.dtype, v.dtype, qd is FLOAT32 and cublas_tf32(),
                q.device, k.device, v.device,
                q_pattern, k_pattern, v_pattern, out_pattern,
                None if dims is None else tuple((a, n, type(n)) for a, n in dims.items()),
                None if attn_mask is None else (attn_mask.shape, attn_mask.dtype, attn_mask.device, attn_mask.layout),
                is_causal, type(is_causal), window_size, type(window_size),
                type(scale), scale is None or -FLOAT_MAX <= scale <= FLOAT_MAX, grad,
                tier_scope_get(), tier_env_get(tier_key),
            ))
        except Exception:  # not tensors, unhashable dims, an incomparable scale...: validation explains
            grad, plan = False, None
        if plan is None:
            return slow(Request(q, k, v, q_pattern, k_pattern, v_pattern, out_pattern, dims, attn_mask, scale, is_causal,
                                compatibility_mode, window_size), impl_raw, grad)
        if plan.counts_hit:
            hit()
        try:
            return plan.run(q, k, v, attn_mask, scale)
        except Exception as exc:
            return failed(plan, exc, Request(q, k, v, q_pattern, k_pattern, v_pattern, out_pattern, dims, attn_mask, scale,
                                          is_causal, compatibility_mode, window_size), impl_raw, grad)

    return attention_forward
