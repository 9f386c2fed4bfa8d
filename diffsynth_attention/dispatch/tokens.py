"""Which dispatcher a compiled graph means: graphs name a dispatcher by an integer token (a
custom operator's argument), and the operators look the token up here at run time. A module of
its own, importing nothing of the package, so the operators (:mod:`.compiled`) need not import
the dispatcher that imports them back through its hot path."""

from __future__ import annotations

import weakref

_DISPATCHERS: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()
_DEFAULT: list = []  # [the process's default dispatcher], put there by diffsynth_attention.dispatch


def register(token: int, dispatcher) -> None:
    _DISPATCHERS[token] = dispatcher


def set_default(dispatcher) -> None:
    _DEFAULT[:] = [dispatcher]


def lookup_dispatcher(token: int):
    """The dispatcher a compiled graph names by ``token`` (the default one if it is gone)."""
    d = _DISPATCHERS.get(token)
    return d if d is not None else _DEFAULT[0]
