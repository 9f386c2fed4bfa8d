"""What a plan is and what ``explain`` says about one: :class:`Plan` (a backend bound to a call
signature, with where its choice came from), :class:`Explanation`, and the error a forced backend
raises in strict mode."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Optional

from ..backends import REGISTRY
from ..states import PlanSource
from ..store.decision import UNSUPPORTED, Decision
from .lowprec import explain_quality
from .runners import make_runner


class BackendNotSupportedError(ValueError):
    """A forced backend cannot serve a call (strict mode); lists every reason."""


@dataclass
class Explanation:
    """Why a call goes where it goes (``diffsynth_attention.explain``)."""

    backend: str
    source: PlanSource  # override, cache, tuned, neighbour, loading or fallback (each equals its text)
    key: dict
    candidates: dict = field(default_factory=dict)  # name -> {"time_ms", "error", "reason", "status"}
    problem: str = ""
    key_id: str = ""
    decision: Optional[Decision] = None  # the decision behind a "cache"/"tuned" source
    dropped: dict = field(default_factory=dict)  # backend -> why this process stopped using it
    neighbour_of: Optional[str] = None  # source "neighbour": the key id whose decision serves this call
    reason: Optional[str] = None  # why ``backend`` serves the call when it is not the decided one (e.g. "loading")
    quality: Optional[dict] = None  # a low-precision tier: tier, bound, gate evidence, fallback, sentinel (lowprec.py)

    def as_dict(self) -> dict:
        return {"backend": self.backend, "source": self.source, "key": self.key, "key_id": self.key_id,
                "candidates": self.candidates, "problem": self.problem, "dropped": dict(self.dropped),
                "decision": None if self.decision is None else self.decision.to_dict(),
                "neighbour_of": self.neighbour_of, "reason": self.reason, "quality": self.quality}

    def __getitem__(self, item):
        return self.as_dict()[item]

    def __str__(self) -> str:
        """The table ``diffsynth-attention explain`` prints (80 columns): ``print(da.explain(...))``."""
        from ..explain_text import explanation_text

        return explanation_text(self)

    def __repr__(self) -> str:
        return (f"Explanation(backend={self.backend!r}, source={self.source!r}, problem={self.problem!r}, "
                f"key_id={self.key_id!r})")


class PlanTable(dict):
    """signature -> :class:`Plan`, and the hit path's guarded entries (``fast``: dispatch/hot.py).

    ``fast`` maps a call's non-tensor state (patterns, flags, modes, scopes and ``k``'s size) to a
    few ``(guard, dims, plan)`` entries whose tensor guard (dispatch/guards.py) stands in for the
    signature's tensor properties. Every removal or replacement of a plan empties ``fast``, under
    ``lock`` (the dispatcher's), and an entry is added under it only while its plan is still in the
    table: a guarded entry never serves a plan the table no longer holds."""

    MAX_STATES = 64  # distinct states with entries
    MAX_PER_STATE = 4  # entries per state (layouts, dtypes, q lengths, shapes that share k's size)

    def __init__(self, lock):
        super().__init__()
        self.lock = lock
        self.fast: dict = {}  # never rebound (the hot path holds its .get)

    def __setitem__(self, sig, plan) -> None:
        with self.lock:
            if sig in self:
                self.fast.clear()
            super().__setitem__(sig, plan)

    def __delitem__(self, sig) -> None:
        with self.lock:
            super().__delitem__(sig)
            self.fast.clear()

    def pop(self, sig, *default):
        with self.lock:
            self.fast.clear()
            return super().pop(sig, *default)

    def popitem(self):
        with self.lock:
            self.fast.clear()
            return super().popitem()

    def clear(self) -> None:
        with self.lock:
            self.fast.clear()
            super().clear()

    def update(self, *args, **kwargs) -> None:
        with self.lock:
            self.fast.clear()
            super().update(*args, **kwargs)

    def setdefault(self, sig, plan=None):
        with self.lock:
            return super().setdefault(sig, plan)

    def add_fast(self, state: tuple, sig, plan, guard, dims) -> None:
        """Serve later calls of ``state`` whose tensors pass ``guard`` (and whose ``dims`` equal
        these, values of type int) by ``plan``, if the table still maps ``sig`` to it."""
        with self.lock:
            if super().get(sig) is not plan:
                return
            entries = self.fast.get(state, ())
            if len(entries) >= self.MAX_PER_STATE or (not entries and len(self.fast) >= self.MAX_STATES):
                return
            self.fast[state] = entries + ((guard, None if dims is None else dict(dims), plan),)


class Plan:
    __slots__ = ("run", "backend", "source", "key", "decision", "counts_hit", "reasons", "requested", "call", "grad")

    def __init__(self, run, backend, source, key, call, grad, decision=None, counts_hit=False, reasons=None, requested=None):
        self.run = run
        self.backend = backend
        self.source = source
        self.key = key
        self.call = call
        self.grad = grad
        self.decision = decision
        self.counts_hit = counts_hit
        self.reasons = reasons or []
        self.requested = requested

    @property
    def problem(self):
        return self.call.problem


class EmptyKey(NamedTuple):
    """What an empty call's plan holds where other plans hold their key: no key is made for it
    (``make_key`` reads the device and the candidates, and no decision is ever looked up or
    stored for a problem with a size 0); ``explain`` shows the problem's fields."""

    id: str
    fields: dict


def empty_plan(call, grad: bool) -> Plan:
    """The plan of a call with a size 0 (batch, heads, a sequence or a head dim): PyTorch's SDPA on
    it, through the ``torch`` backend's runner (the caller's layout, mask, scale, causality, GQA,
    window), whatever backend is requested or decided: SDPA defines what such a call returns
    (an empty output, zeros where there is no key, v's mean where the head dim is 0), and kernel
    packages refuse empty tensors. A call where q or k has no head never reaches SDPA's kernels,
    some of which die of it (backends/headless.py). Nothing is tuned, keyed or stored: a timing of an empty call
    tells nothing, and its decision would only fill the cache."""
    key = EmptyKey(PlanSource.EMPTY.value, {"problem": call.problem.fields()})
    return Plan(make_runner(REGISTRY["torch"], call, grad), "torch", PlanSource.EMPTY, key, call, grad)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def candidate_rows(decision: Decision) -> dict:
    """``explain``'s view of a decision's candidates: name -> {time_ms, error, reason, status, host_ms, device_ms}."""
    return {n: {"time_ms": c.time_ms, "error": c.error, "reason": c.reason, "status": c.status,
                "host_ms": c.host_ms, "device_ms": c.device_ms} for n, c in decision.candidates.items()}


def explanation(d, plan: Plan) -> Explanation:
    """The :class:`Explanation` of ``plan`` in dispatcher ``d``. Its source is the plan's own: a
    plan is ``tuned`` only when the call that built it tuned (the plan table keeps it as
    ``cache``), whatever other threads tune meanwhile."""
    source = plan.source
    dropped = dict(d.dropped.get(plan.key.id, {}))
    if plan.decision is not None:
        cands = candidate_rows(plan.decision)
        for name, why in dropped.items():
            if name in cands:
                cands[name] = {**cands[name], "reason": f"dropped in this process: {why}"}
    elif plan.source == PlanSource.FALLBACK and plan.requested:
        cands = {plan.requested: {"time_ms": None, "error": None, "reason": "; ".join(plan.reasons), "status": UNSUPPORTED}}
    else:
        cands = {}
    neighbour_of = plan.decision.key_id if source == PlanSource.NEIGHBOUR and plan.decision is not None else None
    return Explanation(plan.backend, source, plan.key.fields, cands, plan.problem.describe(), plan.key.id,
                       plan.decision, dropped, neighbour_of, plan.reasons[0] if plan.reasons else None,
                       explain_quality(d, plan))
