"""Environment variables: one reader per variable, each with a clear error for a bad value.

Every reader looks at ``os.environ`` when it is called, so changing a variable between calls
takes effect (the dispatcher reads ``DIFFSYNTH_ATTENTION_IMPLEMENTATION`` on every call).
"""

from __future__ import annotations

import os

IMPLEMENTATION = "DIFFSYNTH_ATTENTION_IMPLEMENTATION"
STRICT = "DIFFSYNTH_ATTENTION_STRICT"
TOLERANCE = "DIFFSYNTH_ATTENTION_TOLERANCE"
TUNING = "DIFFSYNTH_ATTENTION_TUNING"
TUNING_BUDGET = "DIFFSYNTH_ATTENTION_TUNING_BUDGET"
CACHE_DIR = "DIFFSYNTH_ATTENTION_CACHE_DIR"
LOCK_TIMEOUT = "DIFFSYNTH_ATTENTION_LOCK_TIMEOUT"
TUNE_WAIT = "DIFFSYNTH_ATTENTION_TUNE_WAIT"

DEFAULT_TOLERANCE = 0.005
DEFAULT_TUNING_BUDGET = 1.5
DEFAULT_LOCK_TIMEOUT = 10.0
DEFAULT_TUNE_WAIT = 300.0

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _flag(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{name}={raw!r} is not a boolean; use one of 1/0, true/false, yes/no, on/off")


def _positive_float(name: str, default: float, allow_zero: bool = False) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None
    if value != value or value in (float("inf"),) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name}={raw!r} must be a finite number {'>=' if allow_zero else '>'} 0")
    return value


def strict() -> bool:
    return _flag(STRICT, False)


def tuning_enabled() -> bool:
    return _flag(TUNING, True)


def tolerance() -> float:
    return _positive_float(TOLERANCE, DEFAULT_TOLERANCE)


def tuning_budget() -> float:
    """The floor of the timing budget per key, in seconds (the budget is max(this, 15x winner))."""
    return _positive_float(TUNING_BUDGET, DEFAULT_TUNING_BUDGET)


def lock_timeout() -> float:
    """How long a save waits for the cache file's lock before keeping decisions in memory."""
    return _positive_float(LOCK_TIMEOUT, DEFAULT_LOCK_TIMEOUT, allow_zero=True)


def tune_wait() -> float:
    """How long a process waits for another process that is tuning the same key."""
    return _positive_float(TUNE_WAIT, DEFAULT_TUNE_WAIT, allow_zero=True)


def cache_dir_override() -> str | None:
    raw = os.environ.get(CACHE_DIR)
    return raw if raw else None


NEW_SHAPES = "DIFFSYNTH_ATTENTION_NEW_SHAPES"


def new_shapes() -> str:
    """``tune`` (default): a new problem is tuned. ``nearest``: a problem that differs from a known
    decision only in sequence lengths within the same bucket (about four per octave) is served by
    that decision at once."""
    raw = os.environ.get(NEW_SHAPES)
    value = (raw or "tune").strip().lower() or "tune"
    if value not in ("tune", "nearest"):
        raise ValueError(f"{NEW_SHAPES}={raw!r} must be 'tune' or 'nearest'")
    return value
