"""Dispatching a call: plans and runners (:mod:`.dispatcher`, :mod:`.runners`) and the traced
path under ``torch.compile`` (:mod:`.compiled`, imported when a trace first reaches it)."""

from __future__ import annotations

from typing import Optional

from .. import process
from ..store.cache import DecisionCache
from . import tokens
from .dispatcher import BackendNotSupportedError, Dispatcher, Explanation, Plan

# Made on first use, not when this package is imported (issue 33: importing creates nothing). The
# public entry points make it before anything can be traced (``api`` when its names are first
# loaded, ``patch_sdpa``/``patch_diffsynth``, the diffusers backend when it registers), so a
# compiled call reads a module global. Building it reads no file. It has trace token 0 in every
# process, whenever it is made (dispatch/tokens.py).
_default: Optional[Dispatcher] = None
_default_store: Optional[DecisionCache] = None
_lock = process.new_rlock()


def default_store() -> DecisionCache:
    """The decision cache behind the default dispatcher (made on first use; reads no file). The
    package's background preload reads it without making the dispatcher."""
    global _default_store
    if _default_store is None:
        with _lock:
            if _default_store is None:
                _default_store = DecisionCache()
    return _default_store


def _make_default() -> Dispatcher:
    global _default
    with _lock:
        if _default is None:
            _default = Dispatcher(default_store(), token=tokens.DEFAULT)
    return _default


def default_dispatcher() -> Dispatcher:
    """The process's default dispatcher, behind the public functions (made on first use)."""
    d = _default
    return d if d is not None else _make_default()


__all__ = ["BackendNotSupportedError", "Dispatcher", "Explanation", "Plan", "default_dispatcher", "default_store"]
