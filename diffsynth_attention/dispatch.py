"""The public entry points: ``attention_forward``, ``explain``, ``use_backend``, ``stats``.

A call is looked up by its *signature* (shapes, dtypes, devices, patterns, mask kind, flags and
the requested implementation) in a table of *plans*. A plan is built once per signature: that
is where the call is validated, the backend chosen (override, cached decision, or tuning) and
the layout conversions compiled. A hit therefore costs a tuple, a dict lookup and the
backend's own call: no validation, no key, no file I/O.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from . import backends as _backends
from . import config
from .backends import REGISTRY, candidates, device_info, normalize
from .cache import DecisionCache
from .decision import REJECTED, Decision
from .key import Key, make_key
from .problem import CANONICAL, Call, mask_4d, prepare
from .tuner import TuneInputs, tune

logger = logging.getLogger("diffsynth_attention")

_scope: contextvars.ContextVar = contextvars.ContextVar("diffsynth_attention_backend", default=None)
_IMPL_VAR = config.IMPLEMENTATION
# os.environ.get costs ~2 us (it encodes the name and decodes the value); its backing dict
# (kept in step by os.environ's setters) is a plain lookup. The raw value (bytes on POSIX)
# is decoded only when a plan is built.
_env_data = getattr(os.environ, "_data", None)
if isinstance(_env_data, dict) and hasattr(os.environ, "encodekey"):
    _IMPL_KEY = os.environ.encodekey(_IMPL_VAR)
    _env_get = _env_data.get
    _decode = os.environ.decodevalue
else:  # pragma: no cover - other Python implementations
    _IMPL_KEY = _IMPL_VAR
    _env_get = os.environ.get
    _decode = str
_grad_enabled = torch.is_grad_enabled
_is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None) or (lambda: False)

store = DecisionCache()
_plans: dict = {}
_plans_lock = threading.RLock()
_stats = {"hits": 0, "tunings": 0, "tuning_seconds": 0.0}
_warned: set = set()


class BackendNotSupportedError(ValueError):
    """A forced backend cannot serve a call (strict mode); lists every reason."""


@dataclass
class Explanation:
    """Why a call goes where it goes (``diffsynth_attention.explain``)."""

    backend: str
    source: str  # "override", "cache", "tuned" or "fallback"
    key: dict
    candidates: dict = field(default_factory=dict)  # name -> {"time_ms", "error", "reason", "status"}
    problem: str = ""

    def as_dict(self) -> dict:
        return {"backend": self.backend, "source": self.source, "key": self.key, "candidates": self.candidates, "problem": self.problem}

    def __getitem__(self, item):
        return self.as_dict()[item]


class Plan:
    __slots__ = ("run", "backend", "source", "key", "decision", "counts_hit", "provisional", "reasons", "requested", "problem", "call")

    def __init__(self, run, backend, source, key, decision=None, counts_hit=False, provisional=False, reasons=None, requested=None, problem=None, call=None):
        self.run = run
        self.backend = backend
        self.source = source
        self.key = key
        self.decision = decision
        self.counts_hit = counts_hit
        self.provisional = provisional
        self.reasons = reasons or []
        self.requested = requested
        self.problem = problem
        self.call = call


def _invalidate_plans() -> None:
    with _plans_lock:
        _plans.clear()


store.listeners.append(_invalidate_plans)
atexit.register(store.flush)  # decisions kept in memory after a lock timeout still reach the disk


def _make_runner(backend, call: Call, need_grad: bool) -> Callable:
    """``run(q, k, v, mask, scale, causal, window)`` in the caller's layout, conversions included."""
    fwd = backend.forward
    layout = call.layout
    if layout.identity:
        def run(q, k, v, mask, scale, causal, window):
            if mask is not None and mask.dim() != 4:
                mask = mask_4d(mask)
            return fwd(q, k, v, mask, scale, causal, window, need_grad)
        return run
    to_q, to_k, to_v = layout.to_canonical
    back = layout.from_canonical

    def run(q, k, v, mask, scale, causal, window):
        if mask is not None and mask.dim() != 4:
            mask = mask_4d(mask)
        return back(fwd(to_q(q), to_k(k), to_v(v), mask, scale, causal, window, need_grad))
    return run


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _warn_once(tag, message, *args) -> None:
    if tag not in _warned:
        _warned.add(tag)
        logger.warning(message, *args)


def _requested(impl_raw, compatibility_mode) -> tuple:
    if compatibility_mode:
        return "torch", "compatibility_mode"
    scoped = _scope.get()
    if scoped is not None:
        return scoped, "use_backend"
    if impl_raw is None:
        return "auto", None
    return normalize(_decode(impl_raw), _IMPL_VAR), _IMPL_VAR


def _build_plan(impl_raw, args: tuple, grad: bool) -> Plan:
    (q, k, v, q_pattern, k_pattern, v_pattern, out_pattern, dims, attn_mask, scale, is_causal, compatibility_mode, window_size) = args
    call, qc, kc, vc = prepare(q, k, v, q_pattern, k_pattern, v_pattern, out_pattern, dims, attn_mask, scale, is_causal, window_size, grad)
    requested, source_name = _requested(impl_raw, compatibility_mode)
    problem = call.problem
    dev = device_info(q.device)
    usable, unsupported = candidates(problem, dev)
    key = make_key(problem, dev, usable)
    torch_backend = REGISTRY["torch"]

    if requested != "auto":
        backend = REGISTRY[requested]
        why = backend.unavailable_reason()
        reasons = [why] if why else backend.not_supported_reasons(problem, dev)
        if not reasons:
            return Plan(_make_runner(backend, call, grad), requested, "override", key, problem=problem, call=call)
        if config.strict():
            raise BackendNotSupportedError(
                f"{source_name} asks for {requested!r}, which cannot serve {problem.describe()}: " + "; ".join(reasons)
            )
        for reason in reasons:  # an unavailable package's reason already names what to install
            _warn_once(("fallback", requested, reason), "%s=%r cannot serve this call: %s; using torch instead",
                       source_name, requested, reason)
        return Plan(_make_runner(torch_backend, call, grad), "torch", "fallback", key, reasons=reasons,
                    requested=requested, problem=problem, call=call)

    usable_names = {b.name for b in usable}
    decision = store.get(key.id)
    if decision is not None and decision.backend in usable_names:
        return Plan(_make_runner(REGISTRY[decision.backend], call, grad), decision.backend, "cache", key, decision, counts_hit=True, problem=problem, call=call)
    if not config.tuning_enabled() or _capturing(q.device) or _is_compiling():
        return Plan(_make_runner(torch_backend, call, grad), "torch", "fallback", key, provisional=True, problem=problem, call=call)

    with store.tuning_lock(key.id):
        decision = store.refresh(key.id)
        source = "cache"
        if decision is None or decision.backend not in usable_names:
            inputs = TuneInputs(
                q=q, k=k, v=v, mask=attn_mask, mask4=mask_4d(attn_mask), canonical=(qc, kc, vc), scale=call.scale,
                causal=problem.causal, window=problem.window, out_pattern=out_pattern,
                heads_q=problem.heads_q, head_dim_v=problem.head_dim_v, requires_grad=grad,
            )

            def make(backend):
                run = _make_runner(backend, call, grad)
                return lambda q_, k_, v_, m_: run(q_, k_, v_, m_, call.scale, problem.causal, problem.window)

            decision = tune(inputs, usable, unsupported, key, make)
            _stats["tunings"] += 1
            _stats["tuning_seconds"] += decision.tuning_seconds
            logger.info("tuned %s: %s (%.3fs)", problem.describe(), decision.backend, decision.tuning_seconds)
            store.put(decision)
            source = "tuned"
    return Plan(_make_runner(REGISTRY[decision.backend], call, grad), decision.backend, source, key, decision,
                counts_hit=source == "cache", problem=problem, call=call)


def _signature(impl_raw, args: tuple, grad: bool) -> tuple:
    (q, k, v, q_pattern, k_pattern, v_pattern, out_pattern, dims, attn_mask, scale, is_causal, compatibility_mode, window_size) = args
    return (
        _scope.get(), impl_raw, compatibility_mode, q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype,
        q.device, k.device, v.device, q_pattern, k_pattern, v_pattern, out_pattern,
        None if dims is None else tuple(dims.items()),
        None if attn_mask is None else (attn_mask.shape, attn_mask.dtype, attn_mask.device),
        is_causal, window_size, type(scale), grad,
    )


def _plan(impl_raw, args: tuple, grad: bool) -> Plan:
    try:
        sig = _signature(impl_raw, args, grad)
        plan = _plans.get(sig)
    except (AttributeError, TypeError):  # not tensors, unhashable dims...: validation explains
        sig, plan = None, None
    if plan is not None and not plan.provisional:
        return plan
    plan = _build_plan(impl_raw, args, grad)
    if sig is not None:
        stored = plan
        if plan.source == "tuned":  # later calls are served by a known decision: hits
            stored = Plan(plan.run, plan.backend, "cache", plan.key, plan.decision, counts_hit=True, problem=plan.problem, call=plan.call)
        with _plans_lock:
            _plans[sig] = stored
    return plan


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
) -> torch.Tensor:
    """Attention with DiffSynth-Studio's signature and semantics, on the best backend.

    ``q``, ``k``, ``v`` are laid out as their einops patterns say (packed axes such as
    ``"b s (n d)"`` need ``dims``); the output is laid out as ``out_pattern``. ``attn_mask`` is
    boolean (True attends) or additive, broadcastable to (b, n, s_q, s_kv); ``is_causal`` uses
    PyTorch's top-left alignment; ``window_size=w`` lets a query attend to keys with
    |i - j| <= w; ``compatibility_mode=True`` forces ``torch``. The backend comes from
    ``use_backend``, else ``DIFFSYNTH_ATTENTION_IMPLEMENTATION``, else (``auto``) the tuned
    decision for this problem on this GPU.
    """
    if _is_compiling():
        from .compile import compiled_attention

        return compiled_attention(q, k, v, q_pattern, k_pattern, v_pattern, out_pattern, dims, attn_mask, scale, is_causal, compatibility_mode, window_size)
    impl_raw = _env_get(_IMPL_KEY)
    try:  # the hot path: one signature tuple (_signature's, inlined: keep the two in step) and one lookup
        grad = _grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        plan = _plans.get((
            _scope.get(), impl_raw, compatibility_mode, q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype,
            q.device, k.device, v.device, q_pattern, k_pattern, v_pattern, out_pattern,
            None if dims is None else tuple(dims.items()),
            None if attn_mask is None else (attn_mask.shape, attn_mask.dtype, attn_mask.device),
            is_causal, window_size, type(scale), grad,
        ))
    except (AttributeError, TypeError):  # not tensors, unhashable dims...: validation explains
        grad, plan = False, None
    if plan is None or plan.provisional:
        args = (q, k, v, q_pattern, k_pattern, v_pattern, out_pattern, dims, attn_mask, scale, is_causal, compatibility_mode, window_size)
        plan = _plan(impl_raw, args, grad)
    if plan.counts_hit:
        _stats["hits"] += 1
    elif plan.source == "fallback" and plan.requested is not None and config.strict():
        _build_plan(impl_raw, (q, k, v, q_pattern, k_pattern, v_pattern, out_pattern, dims, attn_mask, scale, is_causal,
                               compatibility_mode, window_size), grad)  # raises BackendNotSupportedError with the reasons
    try:
        return plan.run(q, k, v, attn_mask, scale, is_causal, window_size)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as exc:
        args = (q, k, v, q_pattern, k_pattern, v_pattern, out_pattern, dims, attn_mask, scale, is_causal, compatibility_mode, window_size)
        return _after_failure(plan, exc, impl_raw, args, grad)


def _after_failure(plan: Plan, exc: Exception, impl_raw, args: tuple, grad: bool):
    """A backend raised at run time. In ``auto`` it is dropped for this key, with the reason;
    a forced backend falls back to torch with a warning (or raises under strict mode)."""
    if plan.backend == "torch":
        raise exc
    reason = f"failed at run time: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    if plan.source == "override":
        if config.strict():
            raise exc
        _warn_once(("runtime", plan.backend, reason), "%s %s; using torch instead", plan.backend, reason)
    else:
        decision = plan.decision
        if decision is not None:
            cand = decision.candidates.get(plan.backend)
            if cand is not None:
                cand.status, cand.reason = REJECTED, reason
            order = sorted(
                (c.time_ms, n) for n, c in decision.candidates.items()
                if c.status in ("accepted", "slower") and c.time_ms is not None and n != plan.backend
            )
            decision.backend = order[0][1] if order else "torch"
            if decision.backend in decision.candidates:
                decision.candidates[decision.backend].status = "chosen"
            logger.warning("backend %s %s; using %s for %s from now on", plan.backend, reason, decision.backend, plan.problem.describe())
            store.put(decision)
    q, k, v = args[0], args[1], args[2]
    scale, is_causal, window = args[9], args[10], args[12]
    new_backend = REGISTRY[plan.decision.backend] if plan.decision is not None and plan.source != "override" else REGISTRY["torch"]
    new_plan = Plan(_make_runner(new_backend, plan.call, grad), new_backend.name, "fallback", plan.key, plan.decision, problem=plan.problem, call=plan.call)
    if plan.source == "override":
        with _plans_lock:
            for sig, p in list(_plans.items()):
                if p is plan:
                    _plans[sig] = new_plan
    return new_plan.run(q, k, v, args[8], scale, is_causal, window)


def explain(
    q, k, v, q_pattern="b n s d", k_pattern="b n s d", v_pattern="b n s d", out_pattern="b n s d",
    dims=None, attn_mask=None, scale=None, is_causal=False, compatibility_mode=False, window_size=None,
) -> Explanation:
    """The decision ``attention_forward`` takes for this call; tunes if the key is new, as the call would."""
    impl_raw = _env_get(_IMPL_KEY)
    args = (q, k, v, q_pattern, k_pattern, v_pattern, out_pattern, dims, attn_mask, scale, is_causal, compatibility_mode, window_size)
    grad = torch.is_grad_enabled() and all(isinstance(t, torch.Tensor) for t in (q, k, v)) and (q.requires_grad or k.requires_grad or v.requires_grad)
    before = _stats["tunings"]
    plan = _plan(impl_raw, args, grad)
    source = plan.source
    if source == "tuned" and _stats["tunings"] == before:
        source = "cache"  # tuned earlier in this process: now a known decision
    if plan.decision is not None:
        cands = {n: {"time_ms": c.time_ms, "error": c.error, "reason": c.reason, "status": c.status} for n, c in plan.decision.candidates.items()}
    elif plan.source == "fallback" and plan.requested:
        cands = {plan.requested: {"time_ms": None, "error": None, "reason": "; ".join(plan.reasons), "status": "unsupported"}}
    else:
        cands = {}
    return Explanation(plan.backend, source, plan.key.fields, cands, plan.problem.describe())


@contextlib.contextmanager
def use_backend(name: str):
    """Force a backend (or ``"auto"``) within a scope: per thread and per async task, nestable,
    restored on exit even after an exception. The scope wins over the environment variable."""
    value = normalize(name, "use_backend(name)")
    token = _scope.set(value)
    try:
        yield value
    finally:
        _scope.reset(token)


def stats() -> dict:
    """This process's counters: ``hits`` (calls served by a known decision), ``tunings``, ``tuning_seconds``."""
    return dict(_stats)


def reset_stats() -> None:
    _stats.update(hits=0, tunings=0, tuning_seconds=0.0)


def current_implementation() -> str:
    """What is requested now: the scope's backend, else the environment's, else ``auto``."""
    scoped = _scope.get()
    if scoped is not None:
        return scoped
    raw = _env_get(_IMPL_KEY)
    return "auto" if raw is None else normalize(_decode(raw), _IMPL_VAR)
