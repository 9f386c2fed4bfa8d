"""Dispatching a call: plans and runners (:mod:`.dispatcher`, :mod:`.runners`) and the traced
path under ``torch.compile`` (:mod:`.compiled`, imported when a trace first reaches it)."""

from __future__ import annotations

import atexit

from .dispatcher import BackendNotSupportedError, Dispatcher, Explanation, Plan

# Made when this package is imported, not on first use: ``default_dispatcher()`` is traced by
# Dynamo when the first thing a process does is a compiled call (patch_sdpa + torch.compile), and
# a lazy construction would put a lock on the traced path. Building it reads no file. Made first,
# it has trace token 0 in every process (dispatch/tokens.py).
_default = Dispatcher()
atexit.register(_default.store.flush)  # decisions kept in memory after a lock timeout still reach the disk


def default_dispatcher() -> Dispatcher:
    """The process's default dispatcher, behind the public functions."""
    return _default


__all__ = ["BackendNotSupportedError", "Dispatcher", "Explanation", "Plan", "default_dispatcher"]
