"""Environment variables: one strict reader per variable, and :func:`validate_all`.

Every reader looks at ``os.environ`` when it is called, so changing a variable between calls
takes effect (the dispatcher reads ``DIFFSYNTH_ATTENTION_IMPLEMENTATION`` on every call). A bad
value is a ``ValueError`` that names the variable, the value and what is allowed.
:func:`validate_all` checks every variable at once; a dispatcher calls it when it plans a call
(the first call), ``patch_sdpa``/``patch_diffsynth`` when they patch, and the command line before
any work, so a bad value stops a pipeline at its first call instead of partway through. Importing
the package reads no variable strictly: it never raises for a bad value.

An empty value means the default for every variable. This module imports nothing heavy (no
torch): the command line reads it on its fast paths.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional

from .backend_names import check_backend

IMPLEMENTATION = "DIFFSYNTH_ATTENTION_IMPLEMENTATION"
STRICT = "DIFFSYNTH_ATTENTION_STRICT"
TOLERANCE = "DIFFSYNTH_ATTENTION_TOLERANCE"
TUNING = "DIFFSYNTH_ATTENTION_TUNING"
TUNING_BUDGET = "DIFFSYNTH_ATTENTION_TUNING_BUDGET"
CACHE_DIR = "DIFFSYNTH_ATTENTION_CACHE_DIR"
TUNE_WAIT = "DIFFSYNTH_ATTENTION_TUNE_WAIT"
LOAD_WAIT = "DIFFSYNTH_ATTENTION_LOAD_WAIT"

DEFAULT_TOLERANCE = 0.005
# What an unset DIFFSYNTH_ATTENTION_TOLERANCE means: the tuning policy's tolerance per dtype.
TOLERANCE_DEFAULT_TEXT = "unset: a tolerance per dtype, see docs/tuning.md"
DEFAULT_TUNING_BUDGET = 1.5
DEFAULT_TUNE_WAIT = 300.0
DEFAULT_LOAD_WAIT = 10.0  # above flash_attn.cute's import (6.7-8 s on an H100), under the 15 s a hung import may cost

# (low, high, low allowed): the sane range of each numeric variable.
TOLERANCE_RANGE = (1e-6, 1.0, True)  # below ~1e-6 even an exact fp32 kernel fails the gate
TUNING_BUDGET_RANGE = (0.0, 3600.0, False)  # seconds per key
TUNE_WAIT_RANGE = (0.0, 86400.0, True)
LOAD_WAIT_RANGE = (0.0, 600.0, True)

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _raw(name: str) -> Optional[str]:
    """The variable's value, or None when unset or empty (an empty value means the default)."""
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return None
    return raw


def _flag(name: str, default: bool) -> bool:
    raw = _raw(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{name}={raw!r} is not a boolean; allowed: 1/0, true/false, yes/no, on/off (empty: the default, "
                     f"{'on' if default else 'off'})")


def _number(name: str, default: float, bounds: tuple, default_text: Optional[str] = None) -> float:
    raw = _raw(name)
    if raw is None:
        return default
    low, high, low_ok = bounds
    allowed = f"a number {'>=' if low_ok else '>'} {low:g} and <= {high:g} (default {default_text or f'{default:g}'})"
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number; allowed: {allowed}") from None
    if not math.isfinite(value) or value < low or (value == low and not low_ok) or value > high:
        raise ValueError(f"{name}={raw!r} is out of range; allowed: {allowed}")
    return value


def strict() -> bool:
    return _flag(STRICT, False)


def tuning_enabled() -> bool:
    return _flag(TUNING, True)


def tolerance() -> float:
    return _number(TOLERANCE, DEFAULT_TOLERANCE, TOLERANCE_RANGE, TOLERANCE_DEFAULT_TEXT)


def tuning_budget() -> float:
    """The floor of the timing budget per key, in seconds (the budget is max(this, 15x winner))."""
    return _number(TUNING_BUDGET, DEFAULT_TUNING_BUDGET, TUNING_BUDGET_RANGE)


def tune_wait() -> float:
    """How long a process waits for another process that is tuning the same key."""
    return _number(TUNE_WAIT, DEFAULT_TUNE_WAIT, TUNE_WAIT_RANGE)


def load_wait() -> float:
    """How long, counted from the start of a kernel package's import, anything synchronous
    (tuning a new key, a trace) waits for it: after that the backend is left out, with the
    reason, in this process until the import ends."""
    return _number(LOAD_WAIT, DEFAULT_LOAD_WAIT, LOAD_WAIT_RANGE)


_absolute: dict = {}  # raw relative value -> the absolute path it meant when first read


def cache_dir_override() -> Optional[str]:
    """DIFFSYNTH_ATTENTION_CACHE_DIR as an absolute path, or None. A relative value is taken
    relative to the working directory when this process first reads it, and stays there."""
    raw = _raw(CACHE_DIR)
    if raw is None:
        return None
    if "\x00" in raw:
        raise ValueError(f"{CACHE_DIR}={raw!r} is not a path (it has a NUL byte)")
    try:
        path = Path(raw).expanduser()
    except (RuntimeError, KeyError):  # "~user" of no such user, or no home folder to expand "~" to
        raise ValueError(f"{CACHE_DIR}={raw!r}: cannot expand its '~' (no such user or no home folder); "
                         f"give an absolute path") from None
    if path.is_absolute():
        return str(path)
    if raw not in _absolute:
        _absolute[raw] = str(Path.cwd() / path)
    return _absolute[raw]


RECORD = "DIFFSYNTH_ATTENTION_RECORD"


def record_path() -> Optional[str]:
    """DIFFSYNTH_ATTENTION_RECORD as an absolute path, or None: the file this process records the
    problems it plans to, at its exit (:mod:`diffsynth_attention.recording`)."""
    raw = _raw(RECORD)
    if raw is None:
        return None
    if "\x00" in raw:
        raise ValueError(f"{RECORD}={raw!r} is not a path (it has a NUL byte)")
    try:
        path = Path(raw).expanduser()
    except (RuntimeError, KeyError):
        raise ValueError(f"{RECORD}={raw!r}: cannot expand its '~'; give an absolute path") from None
    if not path.is_absolute():
        if raw not in _absolute:
            _absolute[raw] = str(Path.cwd() / path)
        path = Path(_absolute[raw])
    if str(path) not in _record_folders:  # once per path: a pipeline learns at its first call, not at its exit
        if not path.parent.is_dir():
            raise ValueError(f"{RECORD}={raw!r}: its folder {str(path.parent)!r} is missing; allowed: a file in an "
                             "existing folder (the recording is written there at the process's exit)")
        _record_folders.add(str(path))
    return str(path)


_record_folders: set = set()  # recording paths whose folder was there when first read


def implementation() -> str:
    """DIFFSYNTH_ATTENTION_IMPLEMENTATION: ``auto`` (also when unset or empty) or a backend name."""
    raw = _raw(IMPLEMENTATION)
    if raw is None:
        return "auto"
    return check_backend(raw, IMPLEMENTATION, auto="allowed: auto (or empty)")


NEW_SHAPES = "DIFFSYNTH_ATTENTION_NEW_SHAPES"


def new_shapes() -> str:
    """``tune`` (default): a new problem is tuned. ``nearest``: a problem that differs from a known
    decision only in sequence lengths within the same bucket (about four per octave) is served by
    that decision at once."""
    raw = _raw(NEW_SHAPES)
    value = (raw or "tune").strip().lower() or "tune"
    if value not in ("tune", "nearest"):
        raise ValueError(f"{NEW_SHAPES}={raw!r} is not allowed; allowed: tune (default, also when empty), nearest")
    return value


PRELOAD = "DIFFSYNTH_ATTENTION_PRELOAD"


def preload() -> bool:
    """Whether the kernel packages that this machine's cached decisions name start loading on a
    background thread when the package is imported (default on; ``0`` turns it off: the first
    call that needs one starts its load then)."""
    return _flag(PRELOAD, True)


RETIME = "DIFFSYNTH_ATTENTION_RETIME"


def retime() -> bool:
    """Whether a provisional decision (too noisy to confirm when it was tuned) is re-timed by the
    first eager call of a process that finds the host quiet (default on; off: only `cache verify
    --fix` re-times them)."""
    return _flag(RETIME, True)


QUALITY = "DIFFSYNTH_ATTENTION_QUALITY"


def quality() -> str:
    """DIFFSYNTH_ATTENTION_QUALITY: ``exact`` (default, also when empty), ``balanced`` or ``fast``
    (:mod:`diffsynth_attention.tiers`)."""
    from .tiers import from_environment

    return from_environment()


SENTINEL_EVERY = "DIFFSYNTH_ATTENTION_SENTINEL_EVERY"
DEFAULT_SENTINEL_EVERY = 200
SENTINEL_EVERY_RANGE = (0.0, 1e9, True)


def sentinel_every() -> int:
    """Every how many calls a low-precision decision re-checks one slice against the fp32
    reference (default 200; 0: never)."""
    value = _number(SENTINEL_EVERY, DEFAULT_SENTINEL_EVERY, SENTINEL_EVERY_RANGE)
    if value != int(value):
        raise ValueError(f"{SENTINEL_EVERY}={_raw(SENTINEL_EVERY)!r} is not a whole number of calls; allowed: an "
                         f"integer >= 0 (default {DEFAULT_SENTINEL_EVERY}; 0: never)")
    return int(value)


THIN_CALLS = "DIFFSYNTH_ATTENTION_THIN_CALLS"


def thin_calls() -> bool:
    """Whether FlashAttention-3 and -4 calls go straight to the kernel the package compiled
    (its operator, its compiled-kernel cache) instead of through its Python interface, for the
    package versions this was checked against (default on; off: always the interface)."""
    return _flag(THIN_CALLS, True)


READERS = {
    IMPLEMENTATION: implementation,
    STRICT: strict,
    TOLERANCE: tolerance,
    TUNING: tuning_enabled,
    TUNING_BUDGET: tuning_budget,
    CACHE_DIR: cache_dir_override,
    TUNE_WAIT: tune_wait,
    LOAD_WAIT: load_wait,
    NEW_SHAPES: new_shapes,
    PRELOAD: preload,
    RETIME: retime,
    QUALITY: quality,
    SENTINEL_EVERY: sentinel_every,
    RECORD: record_path,
    THIN_CALLS: thin_calls,
}


def validate_all() -> dict:
    """Read every variable; return {variable: value in force}. Raises the first bad value's
    ``ValueError`` (variable, value, what is allowed). Cheap: a few dict lookups."""
    return {name: reader() for name, reader in READERS.items()}


def describe() -> list:
    """[(variable, value in force, 'set' or 'default')] for ``diffsynth-attention backends``."""
    values = validate_all()
    return [(name, values[name], "set" if _raw(name) is not None else "default") for name in READERS]
