"""Which dispatcher a compiled graph means: graphs name a dispatcher by an integer token (a
custom operator's argument), and the operators look the token up here at run time. A module of
its own, importing nothing of the package, so the operators (:mod:`.compiled`) need not import
the dispatcher that imports them back through its hot path.

Tokens come from a counter, never from ``id()``: a collected dispatcher's token is never handed
to a new one (a graph compiled against one store cannot read another's decisions), and the
default dispatcher, made first when the package is imported, has token 0 in every process, so a
graph that names it is the same graph in every process (inductor's caches can hit across
processes)."""

from __future__ import annotations

import itertools
import weakref

from .. import process

_DISPATCHERS: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()
_NEXT = itertools.count()
_LOCK = process.new_lock()


class DispatcherGoneError(RuntimeError):
    """A compiled graph names a dispatcher that no longer exists."""


def new_token(dispatcher) -> int:
    """A token never used before in this process, registered for ``dispatcher`` (held weakly)."""
    with _LOCK:
        token = next(_NEXT)
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
