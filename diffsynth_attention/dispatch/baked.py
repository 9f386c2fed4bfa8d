"""What Dynamo traces for ``attention_forward``: the decision taken while Dynamo traces, written
into the graph as the operator's arguments.

Dynamo records one operator, ``diffsynth_attention::attention`` (:mod:`.compiled`). Where the
sizes are concrete, :func:`bake` runs while Dynamo traces (``torch.compiler.assume_constant_result``:
Dynamo calls it with the call's sizes, strides, dtypes and devices, and writes its result into
the graph as a constant). It resolves the call with the same rule as an eager call
(:meth:`Dispatcher.trace_plan`) and returns the decision's identity, a string
``backend|source|key id|decision digest|tolerance``: the operator's ``decision`` argument. The
operator decomposes into that backend, and nothing else, so:

- the graph Dynamo hands to AOTAutograd and inductor names the decision: their FX/AOT caches key
  on it. A decision changed by any route (the variable, ``use_backend``, ``clear_cache`` and a
  new tuning, the tolerance) followed by ``torch.compiler.reset()`` traces a different graph, so a
  recompile runs the new decision, with the caches on;
- nothing per process is in the graph (the dispatcher is named by its token, 0 for the default
  one in every process: :mod:`.tokens`), so a second process compiling against the same
  decisions hits both caches.

The innermost ``use_backend`` is guarded per thread and per task: ``overrides.TRACE.scope`` is a
property that reads the calling context's scope, and Dynamo evaluates the guard in the thread
that calls the compiled code. A scope opened inside the compiled function exists only in the
trace (``overrides.TRACE.inner``); the graph carries it as the ``backend`` argument.
"""

from __future__ import annotations

import hashlib
import json
from typing import Optional

import torch

from .. import overrides, tiers
from ..request import Request
from .compiled import attention_op
from .tokens import lookup_dispatcher

try:  # a size Dynamo made symbolic: has_static_value is False for it (isinstance sees an int)
    from torch.fx.experimental.symbolic_shapes import has_static_value as _static_value
except ImportError:  # pragma: no cover - older torch
    def _static_value(s) -> bool:
        return type(s) is int


def _static(*tensors) -> bool:
    for t in tensors:
        if t is None:
            continue
        for s in t.shape:
            if not _static_value(s):
                return False
        for s in t.stride():
            if not _static_value(s):
                return False
    return True


def _meta(t) -> Optional[tuple]:
    """What :func:`bake` needs of a tensor, as constants Dynamo can hand it."""
    if t is None:
        return None
    return tuple(t.shape), tuple(t.stride()), t.dtype, t.device, t.requires_grad


def _stand_in(meta, mode):
    """A fake tensor of ``meta``'s shape, strides, dtype, device and ``requires_grad``."""
    if meta is None:
        return None
    shape, stride, dtype, device, requires_grad = meta
    with mode:
        t = torch.empty_strided(shape, stride, dtype=dtype, device=device)
    return t.requires_grad_(True) if requires_grad else t


def identity(plan, tolerance: float) -> str:
    """The decision a plan serves, as the graph carries it: its backend, where the choice came
    from, the key, a digest of the decision (any new tuning changes it) and the tolerance."""
    digest = ""
    if plan.decision is not None:
        blob = json.dumps(plan.decision.to_dict(), sort_keys=True, default=str)
        digest = plan.decision.key_id + ":" + hashlib.sha256(blob.encode()).hexdigest()[:16]
    return f"{plan.backend}|{plan.source}|{plan.key.id}|{digest}|{tolerance!r}"


def backend_of(decision: str) -> str:
    """The backend named by a decision's identity."""
    return decision.split("|", 1)[0]


@torch.compiler.assume_constant_result
def bake(token: int, q, k, v, mask, q_pattern: str, k_pattern: str, v_pattern: str, out_pattern: str, dims: Optional[str],
         scale: Optional[float], is_causal: bool, window_size: Optional[int], compatibility_mode: bool, grad_enabled: bool,
         backend: Optional[str], quality: Optional[str] = None) -> Optional[str]:
    """The identity of the decision a call with these sizes gets (:func:`identity`), taken while
    Dynamo traces, in the thread that compiles; None where the graph dispatches at run time (a
    masked call whose key has no decision yet: its mask values matter for tuning; a low-precision
    quality tier, gated on the first real call's own data). ``quality``: the calling context's
    quality scope, an argument so that Dynamo guards on it (the trace reads the tier itself)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .compiled import Scope, dims_dict

    d = lookup_dispatcher(token)
    mode = FakeTensorMode()
    qf, kf, vf, mf = (_stand_in(m, mode) for m in (q, k, v, mask))
    req = Request(qf, kf, vf, q_pattern, k_pattern, v_pattern, out_pattern, dims_dict(dims), mf, scale, is_causal,
                  compatibility_mode, window_size)
    grad = grad_enabled and (q[4] or k[4] or v[4])
    with Scope(backend):
        plan = d.trace_plan(req, grad)
    if plan is None:
        return None
    return identity(plan, d.tolerance(plan.problem))


def traced_attention(d, q, k, v, q_pattern, k_pattern, v_pattern, out_pattern, dims, attn_mask, scale, is_causal,
                     compatibility_mode, window_size):
    """What Dynamo traces for ``attention_forward``: one operator call, its decision baked in
    where the sizes are concrete."""
    # int(n): a head count Dynamo made symbolic (an int argument under dynamic=True) is specialized;
    # anything else is written as it is, so validation rejects what eager rejects
    dims_text = None if dims is None else ",".join(
        f"{a}={n if isinstance(n, (bool, float, str)) else int(n)}" for a, n in dims.items())
    scale = None if scale is None else float(scale)
    is_causal, compatibility_mode = bool(is_causal), bool(compatibility_mode)
    token = d.trace_token
    backend = overrides.trace_scope()
    quality = tiers.TRACE.scoped  # read here so Dynamo guards on the calling context's quality scope
    decision = None
    if _static(q, k, v, attn_mask):
        decision = bake(token, _meta(q), _meta(k), _meta(v), _meta(attn_mask), q_pattern, k_pattern, v_pattern, out_pattern,
                        dims_text, scale, is_causal, window_size, compatibility_mode, torch.is_grad_enabled(), backend,
                        quality)
    return attention_op(q, k, v, q_pattern, k_pattern, v_pattern, out_pattern, dims_text, attn_mask, scale, is_causal,
                        window_size, compatibility_mode, token, backend, decision)
