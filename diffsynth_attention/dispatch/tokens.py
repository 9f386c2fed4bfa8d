"""Which dispatcher a compiled graph means: graphs name a dispatcher by an integer token (a
custom operator's argument), and the operators look the token up here at run time. A module of
its own, importing nothing of the package, so the operators (:mod:`.compiled`) need not import
the dispatcher that imports them back through its hot path.

Tokens come from a counter, never from ``id()``: a collected dispatcher's token is never handed
to a new one (a graph compiled against one store cannot read another's decisions). The default
dispatcher has token 0 (:data:`DEFAULT`, kept for it) in every process, whenever it is made, so
a graph that names it is the same graph in every process (inductor's caches can hit across
processes)."""

from __future__ import annotations

import itertools
import weakref
from typing import Optional

from .. import process

_DISPATCHERS: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()
DEFAULT = 0  # the default dispatcher's token
_NEXT = itertools.count(DEFAULT + 1)
_LOCK = process.new_lock()


class DispatcherGoneError(RuntimeError):
    """A compiled graph names a dispatcher that no longer exists."""


def new_token(dispatcher, token: Optional[int] = None) -> int:
    """A token never used before in this process, registered for ``dispatcher`` (held weakly);
    ``token=DEFAULT`` for the default dispatcher (once)."""
    with _LOCK:
        if token is None:
            token = next(_NEXT)
        elif token != DEFAULT or DEFAULT in _DISPATCHERS:
            raise ValueError(f"token {token} is not the default dispatcher's, or that one exists")
        _DISPATCHERS[token] = dispatcher
    return token


def lookup_dispatcher(token: int):
    """The dispatcher a compiled graph names by ``token``."""
    d = _DISPATCHERS.get(token)
    if d is None:
        raise DispatcherGoneError(
            f"this compiled graph was traced against dispatcher #{token}, which has been garbage-collected; "
            "keep the Dispatcher alive while its compiled graphs run, or call torch.compiler.reset() and compile again")
    return d
