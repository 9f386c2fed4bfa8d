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
import threading
from typing import Optional

import torch

from .. import config, overrides
from ..backends import REGISTRY, device_info
from ..problem import prepare
from ..store.decision import key_id
from ..store.key import Key, make_key

logger = logging.getLogger("diffsynth_attention")

LSE_LAYOUT_SUFFIX = " + lse"
MATH = "math"  # the float32 computation here, when no backend returning the LSE can serve a call
_BLOCK_BYTES = 256 << 20  # the float32 score block of the math paths

_is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None) or (lambda: False)


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
    """Chooses, per problem, the backend that serves calls needing the LSE (tuned once per key,
    in the dispatcher's decision store) and remembers it per signature."""

    def __init__(self, dispatcher=None):
        from ..dispatch import default_dispatcher

        self.dispatcher = dispatcher or default_dispatcher()
        self.store = self.dispatcher.store
        self.plans: dict = {}  # signature -> (backend name, key id)
        self._lock = threading.Lock()
        self.store.listeners.append(self._invalidate)

    def _invalidate(self, kid: Optional[str] = None) -> None:
        with self._lock:
            if kid is None:
                self.plans.clear()
            else:
                for sig in [s for s, (_, k) in self.plans.items() if k == kid]:
                    self.plans.pop(sig, None)

    def key_for(self, q, k, v, scale, causal):
        """(key, usable LSE backends, {name: reasons} of the others) for a ``b s n d`` call."""
        call, *_ = prepare(q, k, v, "b s n d", "b s n d", "b s n d", "b s n d", None, None, scale, causal, None, False)
        problem = dataclasses.replace(call.problem, layout=call.problem.layout + LSE_LAYOUT_SUFFIX)
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

    def choose(self, q, k, v, scale, causal) -> str:
        sig = (q.shape, k.shape, v.shape, q.dtype, q.device, type(scale), causal, overrides.implementation_raw(),
               overrides.scope_get())
        hit = self.plans.get(sig)
        if hit is not None:
            return hit[0]
        key, usable, unsupported, call, problem, dev = self.key_for(q, k, v, scale, causal)
        name = self._decide(q, k, v, scale, causal, key, usable, unsupported, call, problem, dev)
        with self._lock:
            self.plans[sig] = (name, key.id)
        return name

    def _decide(self, q, k, v, scale, causal, key, usable, unsupported, call, problem, dev) -> str:
        names = {b.name for b in usable if b.unavailable_reason() is None} if not _is_compiling() else \
            {b.name for b in usable}
        requested, source = overrides.requested(overrides.implementation_raw(), False)
        if requested != "auto":
            if requested in names:
                return requested
            self.dispatcher.warn_once(("lse", requested), "%s=%r cannot return the log-sum-exp for %s; choosing among %s",
                                      source, requested, problem.describe(), sorted(names) or [MATH])
        decision = self.store.get(key.id)
        if decision is not None and decision.backend in names:
            return decision.backend
        if not names:
            return MATH
        if not config.tuning_enabled() or _is_compiling() or (q.is_cuda and torch.cuda.is_current_stream_capturing()):
            return next(iter(b.name for b in usable if b.name in names))  # preference order, untimed
        from ..tuning.tuner import TuneInputs, tune

        def run_tuner():
            qc, kc, vc = (x.transpose(1, 2) for x in (q, k, v))
            inputs = TuneInputs(q=q, k=k, v=v, mask=None, mask4=None, canonical=(qc, kc, vc), scale=call.scale,
                                causal=causal, window=None, out_pattern="b s n d", heads_q=problem.heads_q,
                                head_dim_v=problem.head_dim_v, requires_grad=False,
                                to_canonical=call.layout.to_canonical)

            def make(backend):
                run = _bsnd_runner(backend.name, call.scale, causal)
                return lambda q_, k_, v_, mask, scale_: run(q_, k_, v_)[0]

            decision = tune(inputs, [b for b in usable if b.name in names], unsupported, key, make, problem, dev)
            self.dispatcher.counters["tunings"] += 1
            self.dispatcher.counters["tuning_seconds"] += decision.tuning_seconds
            return decision

        got = self.store.get_or_tune(key.id, run_tuner, accept=lambda d: d.backend in names, read_first=False)
        decision = got.decision
        if got.tuned and decision.backend not in names:  # every candidate rejected (not stored): exact, here
            logger.warning("no backend returning the log-sum-exp passed the gate for %s; using float32 math",
                           problem.describe())
            return MATH
        if got.tuned:
            logger.info("tuned %s (needs LSE): %s", problem.describe(), decision.backend)
        return decision.backend


_selector: Optional[LseSelector] = None
_selector_lock = threading.Lock()


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
    name = selector().choose(q, k, v, scale, bool(is_causal))
    run = _bsnd_runner(name, scale, bool(is_causal))
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _LseAttention.apply(q, k, v, run, scale, bool(is_causal))
    return run(q, k, v)
