"""What a plan is and what ``explain`` says about one: :class:`Plan` (a backend bound to a call
signature, with where its choice came from), :class:`Explanation`, and the error a forced backend
raises in strict mode."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..states import PlanSource
from ..store.decision import UNSUPPORTED, Decision
from .lowprec import explain_quality


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
