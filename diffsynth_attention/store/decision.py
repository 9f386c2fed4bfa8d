"""Decisions and the per-candidate results behind them (the cache file stores these).

Both are frozen values: a change (a fault demoting a backend, a re-timing) builds a new
:class:`Decision` with :func:`dataclasses.replace` and ``put``\\ s it, so a plan, ``explain`` or the
neighbour index holding the old one never sees a half-edited object.

**Execution modes.** A candidate that was timed on a GPU carries two costs from the same
interleaved rounds: ``device_ms`` (GPU time per call, back to back, with the host ahead of the
GPU) and ``host_ms`` (the host time to issue one call). Each mode prices a candidate from them
(:func:`mode_cost`): ``eager`` the back-to-back time the rounds measured (``time_ms``, roughly the
larger of the two), ``compiled`` host plus device (the in-graph call is issued, then run),
``cudagraph`` device only (a replay issues nothing). Where the split is unknown (a CPU, or an entry
of schema version 2) every mode costs ``time_ms``. ``Decision.modes`` holds the backend each
non-eager mode picked where it differs from ``backend`` (the eager choice).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Mapping, Optional

from ..states import TIMED, CandidateStatus

# A candidate's status: how it ended in tuning (the members of CandidateStatus, by their old names).
CHOSEN, ACCEPTED, SLOWER, SKIPPED, REJECTED, UNSUPPORTED = (
    CandidateStatus.CHOSEN, CandidateStatus.ACCEPTED, CandidateStatus.SLOWER, CandidateStatus.SKIPPED,
    CandidateStatus.REJECTED, CandidateStatus.UNSUPPORTED)

# Decision.evidence: the numeric gate ran on random tensors of the call's shapes (a trace's
# tuning), not on a caller's data. The first real eager call of the key re-gates it on its slice.
SYNTHETIC = "synthetic"

# The execution modes a decision serves (Decision.backend_for).
EAGER, COMPILED, CUDAGRAPH = "eager", "compiled", "cudagraph"
MODES = (EAGER, COMPILED, CUDAGRAPH)
# PyTorch SDPA's own choice: what a caller gets without this library, and what a winner must beat.
DEFAULT_BACKEND = "torch"


def key_id(fields: dict) -> str:
    """The id of a key: sha256 of its canonical JSON, 24 hex digits (here, not in :mod:`.key`,
    so the store can check ids without importing torch)."""
    blob = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


class FrozenDict(dict):
    """A dict that refuses changes (a frozen value's mapping field); JSON, copy and pickle see a dict."""

    def _refuse(self, *args, **kwargs):
        raise TypeError("decisions are frozen: build a new one with dataclasses.replace / Decision.replace")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = __ior__ = _refuse

    def __reduce__(self):
        return (FrozenDict, (dict(self),))


def _frozen_map(d) -> Mapping:
    return d if isinstance(d, FrozenDict) else FrozenDict(d or {})


@dataclass(frozen=True)
class Candidate:
    """One backend's result for one key (a small value object, as in Triton's autotuner)."""

    status: CandidateStatus  # equals its text, as read from a file
    time_ms: Optional[float] = None  # median of the timed calls (back to back: the eager cost); None if never timed
    error: Optional[float] = None  # relative L1 error against the fp32 reference
    reason: Optional[str] = None  # why it was rejected, unsupported or dropped; None otherwise
    first_call_ms: Optional[float] = None  # the untimed first call: compilation plus one run
    reps: int = 0
    predicted_ms: Optional[float] = None  # its cost model's time per call, where it has one
    host_ms: Optional[float] = None  # host time to issue one call (GPU only; None where unknown)
    device_ms: Optional[float] = None  # device time per call with the host ahead (GPU only; None where unknown)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        for optional in ("predicted_ms", "host_ms", "device_ms"):
            if out[optional] is None:
                del out[optional]
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "Candidate":
        get = data.get
        return cls(CandidateStatus(get("status")), get("time_ms"), get("error"), get("reason"), get("first_call_ms"), get("reps") or 0,
                   get("predicted_ms"), get("host_ms"), get("device_ms"))

    def cost(self, mode: str = EAGER) -> Optional[float]:
        return mode_cost(self.time_ms, self.host_ms, self.device_ms, mode)


def mode_cost(time_ms: Optional[float], host_ms: Optional[float], device_ms: Optional[float], mode: str) -> Optional[float]:
    """A candidate's cost per call in ``mode`` (module docstring); ``time_ms`` where the split is unknown."""
    if mode == EAGER or host_ms is None or device_ms is None:
        return time_ms
    if mode == COMPILED:
        return host_ms + device_ms
    if mode == CUDAGRAPH:
        return device_ms
    raise ValueError(f"mode {mode!r} is not one of {', '.join(MODES)}")


@dataclass(frozen=True)
class Decision:
    key_id: str
    key: dict
    backend: str  # the eager choice (and every mode's, unless ``modes`` names another)
    candidates: Mapping = field(default_factory=dict)  # name -> Candidate
    tolerance: float = 0.005
    created: str = ""
    tuning_seconds: float = 0.0
    compile_seconds: float = 0.0
    modes: Mapping = field(default_factory=dict)  # "compiled"/"cudagraph" -> backend, where not ``backend``
    provisional: bool = False  # too noisy to confirm: served, re-timed at a quiet opportunity or by `cache verify`
    confirmation: Optional[str] = None  # what the re-time against the default found (text)
    evidence: Optional[str] = None  # SYNTHETIC: gated at trace time on random inputs (re-gated on the first real call)
    quality: Optional[dict] = None  # low-precision tiers only: tier, bound, gate evidence, fallback (dispatch/lowprec.py)

    def __post_init__(self):
        object.__setattr__(self, "candidates", _frozen_map(self.candidates))
        object.__setattr__(self, "modes", _frozen_map({m: b for m, b in dict(self.modes or {}).items() if b != self.backend}))

    def replace(self, **changes) -> "Decision":
        return dataclasses.replace(self, **changes)

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
        if self.modes:
            out["modes"] = dict(self.modes)
        if self.provisional:
            out["provisional"] = True
        if self.confirmation is not None:
            out["confirmation"] = self.confirmation
        if self.evidence is not None:
            out["evidence"] = self.evidence
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
            modes=data.get("modes") or {},
            provisional=bool(data.get("provisional", False)),
            confirmation=data.get("confirmation"),
            evidence=data.get("evidence"),
            quality=data.get("quality"),
        )

    # -- the one trust rule ------------------------------------------------------------------
    def trusted_under(self, tolerance: float) -> bool:
        """True if this decision may serve a process whose error tolerance is ``tolerance``: its
        chosen backend passed the numeric gate with an error within it. A decision tuned under a
        looser tolerance whose choice fails this one is not trusted (the key is gated again)."""
        chosen = self.candidates.get(self.backend)
        if chosen is None or chosen.error is None:
            return False
        error = chosen.error
        return isinstance(error, (int, float)) and error == error and error <= tolerance

    def all_rejected(self) -> bool:
        """True if no candidate passed the numeric gate: such a decision is never kept."""
        return not any(c.status in TIMED for c in self.candidates.values())

    def usable(self, tolerance: float, usable_names=None) -> bool:
        """The one "may this stored decision serve?" predicate: some candidate passed the gate,
        the chosen one within ``tolerance``, and (given ``usable_names``) its backend can run here."""
        return (not self.all_rejected() and self.trusted_under(tolerance)
                and (usable_names is None or self.backend in usable_names))

    def backend_for(self, mode: str = EAGER) -> str:
        """The backend this decision serves in ``mode`` (``eager``, ``compiled``, ``cudagraph``)."""
        return self.modes.get(mode, self.backend)

    def runner_up(self, mode: str = EAGER) -> Optional[str]:
        chosen = self.backend_for(mode)
        timed = [(c.cost(mode), n) for n, c in self.candidates.items()
                 if n != chosen and c.status in (ACCEPTED, SLOWER) and c.cost(mode) is not None]
        return min(timed)[1] if timed else None


def check_filters(backend, gpu, source: str) -> None:
    """The filters of ``source`` (e.g. ``clear_cache``): ``backend`` a backend's name and ``gpu``
    text, or None; a TypeError or ValueError naming the argument otherwise."""
    from ..backend_names import check_backend

    for name, value, what in (("backend", backend, "a backend name string"), ("gpu", gpu, "a str (part of a device name)")):
        if value is not None and not isinstance(value, str):
            raise TypeError(f"{source}({name}) must be {what}, got {type(value).__name__}")
    if gpu is not None and not gpu.strip():  # in every device name: it would select every decision
        raise ValueError(f"{source}(gpu)={gpu!r} is blank, which every device name contains; give text the names "
                         "contain, e.g. 'H100', or leave gpu out for every device's decisions")
    if backend is not None:
        check_backend(backend, f"{source}(backend)")


def decision_filter(backend: Optional[str] = None, gpu: Optional[str] = None, key: Optional[str] = None):
    """``match(decision)`` for decisions that chose ``backend``, were tuned on a device whose
    name contains ``gpu`` (case-insensitive) and whose key id starts with ``key``; None when none
    is given (every decision). ``match.on_entry(key_id, entry)`` is the same test on an entry's
    JSON object (``Decision.to_dict``'s form: whole-cache commands build no Decision), and
    ``match.key_prefix`` the ``key`` (entries of other ids need not be read)."""
    if backend is None and gpu is None and key is None:
        return None
    needle = None if gpu is None else gpu.lower()

    def on_entry(kid: str, entry: Mapping) -> bool:
        if backend is not None and entry.get("backend") != backend:
            return False
        if needle is not None and needle not in entry.get("key", {}).get("device", {}).get("name", "").lower():
            return False
        if key is not None and not kid.startswith(key):
            return False
        return True

    def match(decision) -> bool:
        return on_entry(decision.key_id, {"backend": decision.backend, "key": decision.key})
    match.on_entry = on_entry
    match.key_prefix = key or ""
    return match
