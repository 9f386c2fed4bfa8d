"""This process's locks across ``fork``: every lock the package owns, and the one at-fork handler.

``fork`` copies only the thread that calls it. A lock that another thread of the parent held at
that moment is copied as held, and no thread of the child will ever release it: the child's
first call that takes it would hang. So every lock of the package is made here
(:func:`new_lock`, :func:`new_rlock`; held weakly), and one handler
(:func:`os.register_at_fork`, ``after_in_child``) re-initialises each of them in a forked child,
unlocked. An ``RLock`` held by the thread that forked is left as it is: that thread goes on in
the child and releases it.

State other than locks that a fork leaves wrong (a background import that has no thread in the
child, the parent's file locks, a retry timer) is fixed by the functions registered with
:func:`after_fork`, called after the locks, in the order they were registered. A function that
raises never stops the others (it is logged at debug level).

Imports nothing of the package and not torch: every module that owns a lock can import it.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from typing import Callable

logger = logging.getLogger("diffsynth_attention")

_locks: "weakref.WeakSet" = weakref.WeakSet()  # every lock made here and still alive
_after: list = []  # functions called in a forked child, after the locks are reset


def new_lock() -> threading.Lock:
    """A ``threading.Lock`` that a forked child finds unlocked."""
    lock = threading.Lock()
    _locks.add(lock)
    return lock


def new_rlock() -> threading.RLock:
    """A ``threading.RLock`` that a forked child finds unlocked (unless the forking thread held it)."""
    lock = threading.RLock()
    _locks.add(lock)
    return lock


def after_fork(fn: Callable[[], None]) -> Callable[[], None]:
    """Call ``fn()`` in every forked child, after the locks are reset (a decorator; returns ``fn``)."""
    _after.append(fn)
    return fn


def _reinit(lock) -> None:
    is_owned = getattr(lock, "_is_owned", None)
    if is_owned is not None and is_owned():  # an RLock held by the thread that forked: it releases it
        return
    lock._at_fork_reinit()  # what the standard library's own locks do after fork (threading, logging)


def _after_fork_in_child() -> None:
    for lock in list(_locks):
        try:
            _reinit(lock)
        except Exception:  # pragma: no cover - a Python without _at_fork_reinit
            logger.debug("resetting a lock after fork failed", exc_info=True)
    for fn in list(_after):
        try:
            fn()
        except Exception:
            logger.debug("an after-fork step (%s) failed", getattr(fn, "__qualname__", fn), exc_info=True)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
