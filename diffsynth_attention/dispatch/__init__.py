"""Dispatching a call: plans and runners (:mod:`.dispatcher`, :mod:`.runners`) and the traced
path under ``torch.compile`` (:mod:`.compiled`, imported when a trace first reaches it)."""

from __future__ import annotations

import atexit

from . import tokens as _tokens
from .dispatcher import BackendNotSupportedError, Dispatcher, Explanation, Plan

# Made when this package is imported, not on first use: ``default_dispatcher()`` is traced by
# Dynamo when the first thing a process does is a compiled call (patch_sdpa + torch.compile), and
# a lazy construction would put a lock on the traced path. Building it reads no file.
_default = Dispatcher()
_tokens.set_default(_default)  # what a compiled graph falls back to (tokens.lookup_dispatcher)
atexit.register(_default.store.flush)  # decisions kept in memory after a lock timeout still reach the disk


def default_dispatcher() -> Dispatcher:
    """The process's default dispatcher, behind the public functions."""
    return _default


__all__ = ["BackendNotSupportedError", "Dispatcher", "Explanation", "Plan", "default_dispatcher"]
