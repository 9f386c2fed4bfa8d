"""Decisions and the per-candidate results behind them (the cache file stores these)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Optional

from ..states import CandidateStatus

# A candidate's status: how it ended in tuning (the members of CandidateStatus, by their old names).
CHOSEN, ACCEPTED, SLOWER, SKIPPED, REJECTED, UNSUPPORTED = (
    CandidateStatus.CHOSEN, CandidateStatus.ACCEPTED, CandidateStatus.SLOWER, CandidateStatus.SKIPPED,
    CandidateStatus.REJECTED, CandidateStatus.UNSUPPORTED)


def key_id(fields: dict) -> str:
    """The id of a key: sha256 of its canonical JSON, 24 hex digits (here, not in :mod:`.key`,
    so the store can check ids without importing torch)."""
    blob = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


@dataclass
class Candidate:
    """One backend's result for one key (a small value object, as in Triton's autotuner)."""

    status: str  # a CandidateStatus (its text, as read from a file)
    time_ms: Optional[float] = None  # median of the timed calls; None if never timed
    error: Optional[float] = None  # relative L1 error against the fp32 reference
    reason: Optional[str] = None  # why it was rejected, unsupported or dropped; None otherwise
    first_call_ms: Optional[float] = None  # the untimed first call: compilation plus one run
    reps: int = 0
    predicted_ms: Optional[float] = None  # its cost model's time per call, where it has one

    def to_dict(self) -> dict:
        out = asdict(self)
        if out["predicted_ms"] is None:
            del out["predicted_ms"]
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "Candidate":
        get = data.get
        return cls(get("status"), get("time_ms"), get("error"), get("reason"), get("first_call_ms"), get("reps") or 0,
                   get("predicted_ms"))


@dataclass
class Decision:
    key_id: str
    key: dict
    backend: str
    candidates: dict = field(default_factory=dict)  # name -> Candidate
    tolerance: float = 0.005
    created: str = ""
    tuning_seconds: float = 0.0
    compile_seconds: float = 0.0
    quality: Optional[dict] = None  # low-precision tiers only: tier, bound, gate evidence, fallback (dispatch/lowprec.py)

    def to_dict(self) -> dict:
        out = {
            "key": self.key,
            "backend": self.backend,
            "candidates": {n: c.to_dict() for n, c in self.candidates.items()},
            "tolerance": self.tolerance,
            "created": self.created,
            "tuning_seconds": self.tuning_seconds,
            "compile_seconds": self.compile_seconds,
        }
        if self.quality is not None:  # absent in the exact tier: its entries are as before tiers existed
            out["quality"] = self.quality
        return out

    @classmethod
    def from_dict(cls, key_id: str, data: dict) -> "Decision":
        return cls(
            key_id=key_id,
            key=data["key"],
            backend=data["backend"],
            candidates={n: Candidate.from_dict(c) for n, c in data["candidates"].items()},
            tolerance=data["tolerance"],
            created=data["created"],
            tuning_seconds=data["tuning_seconds"],
            compile_seconds=data.get("compile_seconds", 0.0),
            quality=data.get("quality"),
        )

    def trusted_under(self, tolerance: float) -> bool:
        """True if this decision may serve a process whose error tolerance is ``tolerance``: its
        chosen backend passed the numeric gate with an error within it. A decision tuned under a
        looser tolerance whose choice fails this one is not trusted (the key is gated again)."""
        chosen = self.candidates.get(self.backend)
        if chosen is None or chosen.error is None:
            return False
        error = chosen.error
        return isinstance(error, (int, float)) and error == error and error <= tolerance

    def runner_up(self) -> Optional[str]:
        timed = [(c.time_ms, n) for n, c in self.candidates.items() if n != self.backend and c.status in (ACCEPTED, SLOWER) and c.time_ms is not None]
        return min(timed)[1] if timed else None


def decision_filter(backend: Optional[str] = None, gpu: Optional[str] = None):
    """``match(decision)`` for decisions that chose ``backend`` and were tuned on a device whose
    name contains ``gpu`` (case-insensitive); None when neither is given (every decision)."""
    if backend is None and gpu is None:
        return None

    def match(decision) -> bool:
        if backend is not None and decision.backend != backend:
            return False
        if gpu is not None and gpu.lower() not in decision.key.get("device", {}).get("name", "").lower():
            return False
        return True
    return match
