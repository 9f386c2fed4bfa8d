"""Attention that also returns its log-sum-exp, for ring attention (diffusers' context parallelism).

Ring attention runs the local queries against each rank's keys in turn and merges the partial
outputs with their log-sum-exps (in float32, as diffusers does). So a call that needs the LSE is a
problem of its own: its key is the ordinary key with the layout ``"... + lse"``, and only the
backends that can return the LSE (those with a ``forward_lse`` method: FlashAttention-2/3/4 and
the ATen flash, cuDNN and memory-efficient kernels) are candidates. It is tuned, cached and
shared like any other key. No backend able to serve it: an exact float32 computation here.

:func:`attention_with_lse` takes and returns diffusers' ``b s n d`` layout; the LSE is
``(b, s, n)`` float32. Its backward (:func:`lse_backward`) is exact for any backend: it rebuilds
the probabilities from q, k and the LSE, in float32, a block of queries at a time. That is what
ring attention's backward needs, since it replays each key chunk against the *merged* output
and LSE.

The hit path is a dict lookup: no file I/O, no import, no collective.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Optional

import torch

from .. import config, overrides, process, trace_state
from ..backends import REGISTRY, TORCH_FAMILY, device_info
from ..callsite import building_graph, in_graph, keep_rng, needs_grad, tracing, transforming
from ..problem import prepare
from ..states import PlanSource
from ..store.decision import key_id
from ..store.key import Key, make_key
from ..tuning.trial import random_like

logger = logging.getLogger("diffsynth_attention")

LSE_LAYOUT_SUFFIX = " + lse"
MATH = "math"  # the float32 computation here, when no backend returning the LSE can serve a call
_BLOCK_BYTES = 256 << 20  # the float32 score block of the math paths


def lse_backends() -> list:
    """The registered backends that can return the log-sum-exp (they define ``forward_lse``)."""
    return [b for b in REGISTRY.values() if callable(getattr(b, "forward_lse", None))]


def _acc(dtype: torch.dtype) -> torch.dtype:
    """The math paths' accumulation type: float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _block(q: torch.Tensor, s_kv: int) -> int:
    b, n, s_q = q.shape[0], q.shape[1], q.shape[2]
    return max(1, min(s_q, _BLOCK_BYTES // max(1, 4 * b * n * s_kv)))


def _expand_kv(q, k, v):
    if k.shape[1] != q.shape[1]:
        groups = q.shape[1] // k.shape[1]
        return k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return k, v


def _scores(qb, k32, scale, causal, start):
    s = torch.matmul(qb, k32.transpose(-1, -2)) * scale
    if causal:  # PyTorch's top-left alignment: query i attends keys j <= i
        i = torch.arange(start, start + qb.shape[2], device=qb.device).unsqueeze(1)
        j = torch.arange(k32.shape[2], device=qb.device).unsqueeze(0)
        s = s.masked_fill(j > i, float("-inf"))
    return s


def math_lse(q, k, v, scale, causal):
    """Exact float32 attention and LSE on ``b n s d`` tensors: ``(out in q's dtype, lse (b, n, s_q))``."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k, v = _expand_kv(q, k, v)
    acc = _acc(q.dtype)
    k32, v32 = k.to(acc), v.to(acc)
    outs, lses = [], []
    step = _block(q, k.shape[2])
    for start in range(0, q.shape[2], step):
        s = _scores(q[:, :, start:start + step].to(acc), k32, scale, causal, start)
        lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - lse.unsqueeze(-1)).nan_to_num(0.0)
        outs.append(torch.matmul(p, v32))
        lses.append(lse)
    return torch.cat(outs, dim=2).to(q.dtype), torch.cat(lses, dim=2).float()


def lse_backward(grad_out, q, k, v, out, lse, scale, causal, grad_lse=None):
    """Gradients of q, k, v (``b s n d``, their dtypes) for attention whose output ``out`` and
    log-sum-exp ``lse`` (``b s n``) are given: exact, float32, a block of queries at a time.
    With ring attention, ``out`` and ``lse`` are the merged ones and k, v one rank's chunk."""
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    groups = qt.shape[1] // kt.shape[1]
    kx, vx = _expand_kv(qt, kt, vt)
    acc = _acc(q.dtype)
    k32, v32 = kx.to(acc), vx.to(acc)
    do = grad_out.transpose(1, 2).to(acc)
    lse_t = lse.transpose(1, 2).to(acc)
    delta = (do * out.transpose(1, 2).to(acc)).sum(-1)  # rowsum(dO * O): b n s_q
    if grad_lse is not None:
        delta = delta - grad_lse.transpose(1, 2).to(acc)
    dq = torch.empty_like(qt, dtype=acc)
    dk = torch.zeros_like(k32)
    dv = torch.zeros_like(v32)
    step = _block(qt, kt.shape[2])
    for start in range(0, qt.shape[2], step):
        sl = slice(start, start + step)
        qb = qt[:, :, sl].to(acc)
        p = torch.exp(_scores(qb, k32, scale, causal, start) - lse_t[:, :, sl].unsqueeze(-1)).nan_to_num(0.0)
        dob = do[:, :, sl]
        dv += torch.matmul(p.transpose(-1, -2), dob)
        ds = p * (torch.matmul(dob, v32.transpose(-1, -2)) - delta[:, :, sl].unsqueeze(-1))
        dq[:, :, sl] = torch.matmul(ds, k32) * scale
        dk += torch.matmul(ds.transpose(-1, -2), qb) * scale
    if groups > 1:
        b, n, s, d = dk.shape
        dk = dk.view(b, n // groups, groups, s, d).sum(2)
        dv = dv.view(b, n // groups, groups, s, dv.shape[-1]).sum(2)
    return (dq.transpose(1, 2).to(q.dtype), dk.transpose(1, 2).to(k.dtype), dv.transpose(1, 2).to(v.dtype))


class _LseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, run, scale, causal):
        out, lse = run(q, k, v)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.causal = scale, causal
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = lse_backward(grad_out, q, k, v, out, lse, ctx.scale, ctx.causal, grad_lse)
        return dq, dk, dv, None, None, None


def _bsnd_runner(name: str, scale, causal):
    """``run(q, k, v) -> (out b s n d, lse b s n float32)`` on ``b s n d`` tensors."""
    if name == MATH:
        def run(q, k, v):
            out, lse = math_lse(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale, causal)
            return out.transpose(1, 2), lse.transpose(1, 2)
        return run
    forward_lse = REGISTRY[name].forward_lse

    def run(q, k, v):
        out, lse = forward_lse(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale, causal)
        return out.transpose(1, 2), lse.transpose(1, 2)
    return run


class LseSelector:
    """Chooses, per problem, the backend that serves calls needing the LSE and remembers it per
    signature. The choice is the dispatcher's own (:meth:`Dispatcher.resolve`: its overrides,
    its tolerance per dtype, its cached, demoted and neighbour decisions), on the LSE key and its
    candidates; an undecided key is tuned by the dispatcher (:meth:`Dispatcher.tune_key`: its
    policy, the key's lease, the gate), timed as the call runs (the LSE kernel). Under
    ``torch.compile`` the choice is made while Dynamo traces, by the same rule, and an undecided
    key is tuned there on random tensors of the call's shapes, as an ordinary key is."""

    def __init__(self, dispatcher=None):
        from ..dispatch import default_dispatcher

        self.dispatcher = dispatcher or default_dispatcher()
        self.store = self.dispatcher.store
        self.plans: dict = {}  # signature -> (backend name, key id)
        self._lock = process.new_lock()
        self.store.listeners.append(self._invalidate)

    def _invalidate(self, kid: Optional[str] = None) -> None:
        with self._lock:
            if kid is None:
                self.plans.clear()
            else:
                for sig in [s for s, (_, k) in self.plans.items() if k == kid]:
                    self.plans.pop(sig, None)

    def key_for(self, q, k, v, scale, causal):
        """(key, usable LSE backends, {name: reasons} of the others, the call (its problem the LSE
        one), its problem, the device) for a ``b s n d`` call."""
        call = prepare(q, k, v, "b s n d", "b s n d", "b s n d", "b s n d", None, None, scale, causal, None, False)
        if call.problem.empty:  # no log-sum-exp to tune for: refused here, as before, rather than in the tuner
            raise ValueError(f"q, k and v must not be empty for the log-sum-exp path; got b s n d shapes q {tuple(q.shape)}, "
                             f"k {tuple(k.shape)}, v {tuple(v.shape)}")
        problem = dataclasses.replace(call.problem, layout=call.problem.layout + LSE_LAYOUT_SUFFIX)
        call = dataclasses.replace(call, problem=problem)
        dev = device_info(q.device)
        usable, unsupported = [], {}
        for backend in REGISTRY.values():
            if backend not in lse_backends():
                unsupported[backend.name] = ["cannot return the log-sum-exp"]
                continue
            why = backend.declared_reason()
            reasons = [why] if why else backend.not_supported_reasons(problem, dev)
            if reasons:
                unsupported[backend.name] = reasons
            else:
                usable.append(backend)
        base = make_key(problem, dev, usable)
        return Key(base.fields, key_id(base.fields)), usable, unsupported, call, problem, dev

    def choose(self, q, k, v, scale, causal, tune_on=None) -> str:
        """The backend for a call (``MATH``: none can serve it). ``tune_on``: where q, k, v are not
        real (a trace), a function that gives real ones of their shapes to tune on."""
        sig = (q.shape, k.shape, v.shape, q.dtype, q.device, type(scale), causal, overrides.implementation_raw(),
               overrides.scope_get())
        hit = self.plans.get(sig)
        if hit is not None:
            return hit[0]
        name, kid = self._decide(q, k, v, scale, causal, tune_on)
        with self._lock:
            self.plans[sig] = (name, kid)
        return name

    def _decide(self, q, k, v, scale, causal, tune_on) -> tuple:
        d = self.dispatcher
        key, usable, unsupported, call, problem, dev = self.key_for(q, k, v, scale, causal)
        names = {b.name for b in usable}
        requested, source = overrides.requested(overrides.implementation_raw(), False)
        if requested != "auto" and requested not in names:
            d.warn_once(("lse", requested), "%s=%r cannot return the log-sum-exp for %s; choosing among %s",
                        source, requested, problem.describe(), sorted(names) or [MATH])
            requested, source = "auto", None
        plain = call.bare()
        plan = d.resolve(plain, False, key, names, dev, requested, source, provisional=False)
        if plan is not None and plan.backend not in names:  # forced, but it cannot run here (warned): as auto
            plan = d.resolve(plain, False, key, names, dev, "auto", None, provisional=False)
        if plan is not None and plan.backend in names:
            return plan.backend, key.id
        if not names:
            return MATH, key.id
        tracing = tune_on is not None
        if not config.tuning_enabled() or (not tracing and (in_graph(q.device.type) or transforming())):
            own = [b.name for b in usable if b.name in TORCH_FAMILY]  # PyTorch's own kernels, as `torch` is elsewhere
            return (own[0] if own else MATH), key.id
        from torch.utils._python_dispatch import _disable_current_modes

        with _disable_current_modes(), keep_rng(q.device):  # a trace: tune outside its fake modes, on random stand-ins
            if tracing:
                call = call.on(*tune_on())

            def make(backend):  # timed as the call runs: the kernel that returns the LSE
                run = _bsnd_runner(backend.name, call.scale, causal)
                return lambda q_, k_, v_, mask, scale_: run(q_, k_, v_)[0]

            tuned = d.tune_key(call, key, usable, unsupported, names, dev, make=make)
        if tuned.source == PlanSource.FALLBACK or tuned.backend not in names:  # every candidate rejected: exact, here
            logger.warning("no backend returning the log-sum-exp passed the gate for %s; using float32 math",
                           problem.describe())
            return MATH, key.id
        return tuned.backend, key.id


def _meta(t) -> tuple:
    """A tensor's sizes, strides, dtype and device as constants for :func:`_traced_choice` (a size
    Dynamo made symbolic is specialized: the LSE path has no run-time operator)."""
    return tuple(int(s) for s in t.shape), tuple(int(s) for s in t.stride()), t.dtype, t.device


@torch.compiler.assume_constant_result
def _traced_choice(q, k, v, scale, causal, backend) -> str:
    """The backend a traced call bakes, chosen while Dynamo traces, in the compiling thread and
    under the scope the trace runs under (``backend``), by :meth:`LseSelector.choose`."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()

    def fake(meta):
        shape, stride, dtype, device = meta
        with mode:
            return torch.empty_strided(shape, stride, dtype=dtype, device=device)

    qf, kf, vf = fake(q), fake(k), fake(v)
    token = overrides.set_scope(backend) if backend is not None and backend != overrides.scope_get() else None
    try:
        with building_graph():
            return selector().choose(qf, kf, vf, scale, causal, tune_on=lambda: tuple(random_like(t) for t in (qf, kf, vf)))
    finally:
        if token is not None:
            overrides.scope.reset(token)


_selector: Optional[LseSelector] = None
_selector_lock = process.new_lock()


def selector() -> LseSelector:
    global _selector
    if _selector is None:
        with _selector_lock:
            if _selector is None:
                _selector = LseSelector()
    return _selector


def attention_with_lse(q, k, v, scale=None, is_causal=False):
    """``(out, lse)`` for ``b s n d`` q, k, v: the output in q's dtype and layout, the LSE as
    ``(b, s, n)`` float32, on the fastest backend that returns it (tuned per problem).
    Differentiable (the backward is exact, in float32, from the LSE)."""
    for name, t in (("query", q), ("key", k), ("value", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-d tensor in b s n d layout, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    # decided while Dynamo (or torch.export) traces, guarded on the calling context's use_backend; not
    # is_compiling(), process-wide on torch 2.13: another thread's eager call chose on fakes then
    if tracing():
        name = _traced_choice(_meta(q), _meta(k), _meta(v), None if scale is None else float(scale), bool(is_causal),
                              trace_state.traced_scopes(with_quality=False)[0])
    else:
        name = selector().choose(q, k, v, scale, bool(is_causal))
    run = _bsnd_runner(name, scale, bool(is_causal))
    if needs_grad(q, k, v):
        return _LseAttention.apply(q, k, v, run, scale, bool(is_causal))
    return run(q, k, v)
