"""Dispatching a call: plans and runners (:mod:`.dispatcher`, :mod:`.runners`) and the traced
path under ``torch.compile`` (:mod:`.compiled`)."""

from __future__ import annotations

import atexit
import threading

from .dispatcher import BackendNotSupportedError, Dispatcher, Explanation, Plan

_default = None
_default_lock = threading.Lock()


def default_dispatcher() -> Dispatcher:
    """The process's default dispatcher, behind the public functions (made on first use)."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                d = Dispatcher()
                atexit.register(d.store.flush)  # decisions kept in memory after a lock timeout still reach the disk
                _default = d
    return _default


__all__ = ["BackendNotSupportedError", "Dispatcher", "Explanation", "Plan", "default_dispatcher"]
