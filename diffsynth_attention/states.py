"""The library's named states, as string enums (torch-free): a candidate's status, a plan's
source, an attention mask's kind and a kernel package's load state.

Each member equals, hashes, prints, formats and reprs as its text, so the on-disk format and
every message are the same as with bare strings. The statuses and mask kinds are the decision
schema's enums (``data/decisions.schema.json``; a test keeps them equal).
"""

from enum import Enum


class _State(str, Enum):
    __str__ = str.__str__
    __format__ = str.__format__
    __repr__ = str.__repr__


class CandidateStatus(_State):
    """How a candidate ended in tuning (``Candidate.status``)."""

    CHOSEN = "chosen"
    ACCEPTED = "accepted"  # passed the gate, was timed, lost
    SLOWER = "slower"  # passed the gate; its warm probe (and second look) more than 1.5x the best: not in the rounds
    SKIPPED = "skipped"  # not run: its cost model predicts it cannot fit in memory or cannot win
    REJECTED = "rejected"  # error above tolerance, NaN/Inf, an exception, or modified its inputs
    UNSUPPORTED = "unsupported"  # unavailable here, or its declared capabilities exclude the problem


# The statuses of candidates that passed the numeric gate and were timed.
TIMED = (CandidateStatus.ACCEPTED, CandidateStatus.SLOWER, CandidateStatus.CHOSEN)


class PlanSource(_State):
    """Where a plan's backend came from (``Plan.source``, ``Explanation.source``)."""

    OVERRIDE = "override"  # use_backend() or DIFFSYNTH_ATTENTION_IMPLEMENTATION
    CACHE = "cache"  # a stored decision
    TUNED = "tuned"  # tuned by this call
    NEIGHBOUR = "neighbour"  # a decision of the same bucket (new_shapes=nearest, or while tuning)
    FALLBACK = "fallback"  # torch (or the best timed candidate) where nothing else may serve
    LOADING = "loading"  # torch while the decision's kernel package imports in the background
    EMPTY = "empty"  # a call with a size 0: PyTorch's SDPA, no key, no tuning, no decision


class LoadState(_State):
    """A kernel package's load state (``backends/loading.py``: ``state``, ``start_loading``, a load listener's argument)."""

    READY = "ready"  # imported and usable (always, for PyTorch's own kernels)
    LOADING = "loading"  # a background import, or its kernels' first launches, under way
    FAILED = "failed"  # installed but unusable here, or not installed
    UNLOADED = "unloaded"  # not imported yet
    DEFERRED = "deferred"  # not imported, and no background load may start now (loading.defer())


class MaskKind(_State):
    """An attention mask's kind (``Problem.mask``, part of the key)."""

    NONE = "none"
    BOOL = "bool"
    ADDITIVE = "additive"
    ADDITIVE_FLOAT32 = "additive_float32"  # a float32 additive mask with 16-bit inputs
