"""Quality tiers: how far from the fp32 reference a call may be served (docs/quality.md).

- ``exact`` (the default): today's behaviour. Low-precision backends (8-bit and FP8 kernels,
  ``Backend.low_precision``) are never gated, timed or chosen, and the key is the same as before
  tiers existed.
- ``balanced`` and ``fast``: low-precision candidates are admitted where, on the caller's own
  q, k and v, their error against the fp32 reference is within the tier's :class:`Bound` (a
  relative L1 error and a cosine-similarity floor, the two metrics of the SageAttention papers).
  The exact candidates keep the exact tolerance of their dtype. The tier is part of the key.

The tier comes from a :func:`quality` scope (per thread and per async task, nestable), else
``DIFFSYNTH_ATTENTION_QUALITY``. Like ``DIFFSYNTH_ATTENTION_IMPLEMENTATION`` the variable's raw
value is read on every call (a dict lookup) and is part of the call's signature. No torch here.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from dataclasses import dataclass
from typing import Iterator, Optional

from . import trace_state
from .environ import raw_reader
from .scopes import Block

QUALITY = "DIFFSYNTH_ATTENTION_QUALITY"
EXACT, BALANCED, FAST = "exact", "balanced", "fast"
TIERS = (EXACT, BALANCED, FAST)


@dataclass(frozen=True)
class Bound:
    """The error a low-precision candidate may show on the gate's slice of the caller's data:
    relative L1 (sum |out - ref| / sum |ref|) at most ``rel_l1`` and cosine similarity of the
    flattened outputs at least ``cosine``. Measured in docs/quality.md."""

    rel_l1: float
    cosine: float

    def violation(self, rel_l1: float, cosine: float) -> Optional[str]:
        """None within the bound, else what exceeds it."""
        if not (rel_l1 <= self.rel_l1):  # NaN fails
            return f"relative L1 {rel_l1:.3g} above the bound {self.rel_l1:g}"
        if not (cosine >= self.cosine):
            return f"cosine similarity {cosine:.6f} below the floor {self.cosine:g}"
        return None

    def as_dict(self) -> dict:
        return {"rel_l1": self.rel_l1, "cosine": self.cosine}


# From the fuzz suite on CPU (docs/quality.md; the emulations of tools/fuzz.py reproduce the GPU
# figures of issue 32: FP8 5.4e-2 on random data, 0.15-0.2 with outlier channels). ``balanced``
# admits 8-bit QK with 16-bit PV (SageAttention's scheme: 1.3e-2 to 2.4e-2, cosine >= 0.9997 on
# benign, rotary and mildly peaked activations) and rejects FP8 P/V everywhere; ``fast`` also
# admits FP8 q, k, v and P where the activations are benign (5.3e-2 to 5.5e-2, cosine 0.9985) and
# rejects it on peaked softmaxes, mean-offset keys and outlier channels (8.1e-2 to 0.23).
BOUNDS = {
    BALANCED: Bound(rel_l1=0.03, cosine=0.999),
    FAST: Bound(rel_l1=0.07, cosine=0.997),
}

scope: contextvars.ContextVar = trace_state.quality_scope
scope_get = scope.get
TRACE = trace_state.TRACE  # shared with overrides: one object a trace reads (trace_state.py)


def enter(tier: str):
    """Make ``tier`` the current scope's (a token for :func:`leave`)."""
    TRACE.used = True
    return scope.set(tier)


def leave(token) -> None:
    scope.reset(token)


_KEY, _env_get, _decode = raw_reader(QUALITY)


def raw() -> object:
    """The variable's raw value (bytes on POSIX), or None: cheap enough for every call."""
    return _env_get(_KEY)


def check_tier(value, source: str) -> str:
    """A tier name (case and blanks ignored), else a ValueError/TypeError naming ``source``."""
    if not isinstance(value, str):
        raise TypeError(f"{source} must be a quality tier name string, got {type(value).__name__}")
    tier = value.strip().lower()
    if tier not in TIERS:
        raise ValueError(f"{source}={value!r} is not a quality tier; allowed: {', '.join(TIERS)} (default exact)")
    return tier


def decode(raw_value) -> str:
    """The tier of a raw environment value: ``exact`` when unset or empty."""
    if raw_value is None:
        return EXACT
    text = _decode(raw_value) if isinstance(raw_value, bytes) else raw_value
    return EXACT if text.strip() == "" else check_tier(text, QUALITY)


def from_environment() -> str:
    """DIFFSYNTH_ATTENTION_QUALITY: ``exact`` (also when unset or empty), ``balanced`` or ``fast``."""
    return decode(raw())


def tier_of(scoped, raw_value) -> str:
    """The tier in force for a call: its scope's, else the environment's (the signature's two parts)."""
    return scoped if scoped is not None else decode(raw_value)


def current() -> str:
    """The tier in force here and now: the innermost :func:`quality` scope, else the variable."""
    return tier_of(scope_get(), raw())


def bound(tier: str) -> Optional[Bound]:
    """The tier's bound for low-precision candidates; None for ``exact`` (none is admitted)."""
    return BOUNDS.get(tier)


@contextlib.contextmanager
def _at(tier: str) -> Iterator[str]:
    """The current scope's tier ``tier`` until the block ends (a :func:`quality` block's body)."""
    token = enter(tier)
    try:
        yield tier
    finally:
        leave(token)


def quality(tier: str) -> Block:
    """Serve the calls inside the block at ``tier`` (``exact``, ``balanced`` or ``fast``): per
    thread and per async task, nestable, restored on exit even after an exception; it wins over
    ``DIFFSYNTH_ATTENTION_QUALITY``. ``with quality("fast"):``, ``async with``, or ``@quality("fast")``
    on a function or an ``async def`` (a decorated coroutine runs at the tier when awaited). Open
    it around a ``torch.compile``d call, not inside one. Entered once (scopes.py)."""
    tier = check_tier(tier, "quality(tier)")
    return Block(functools.partial(_at, tier), f"quality({tier!r})")


__all__ = ["BOUNDS", "Bound", "EXACT", "BALANCED", "FAST", "QUALITY", "TIERS", "bound", "current", "quality"]
