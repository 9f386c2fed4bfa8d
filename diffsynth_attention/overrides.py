"""What the caller asks for: ``use_backend`` scopes and ``DIFFSYNTH_ATTENTION_IMPLEMENTATION``.

The scope is a contextvar (per thread and per async task, nestable). The environment variable
is read on every call through ``os.environ``'s backing dict: ``os.environ.get`` costs ~2 us
(it encodes the name and decodes the value), a plain dict lookup ~30 ns. The raw value (bytes
on POSIX) is decoded only when a plan is built, and is part of the call's signature, so a
change of the variable between calls takes effect at once.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import ContextManager, Iterator

from . import config, trace_state
from .backends import normalize
from .callsite import dynamo_tracing as _dynamo_tracing
from .environ import raw_reader
from .scopes import Block

IMPLEMENTATION = config.IMPLEMENTATION

scope: contextvars.ContextVar = trace_state.backend_scope
scope_get = scope.get
TRACE = trace_state.TRACE  # shared with tiers: one object a trace reads (trace_state.py)


def set_scope(value):
    """Set the calling context's ``use_backend`` scope (a token for ``scope.reset``). Every set
    goes through here, so :data:`TRACE`'s ``used`` is on before any context can hold a value."""
    TRACE.used = True
    return scope.set(value)


_IMPL_KEY, _env_get, _decode = raw_reader(IMPLEMENTATION)


def implementation_raw():
    """The variable's raw value (bytes on POSIX), or None: cheap enough for every call."""
    return _env_get(_IMPL_KEY)


def decode_implementation(raw) -> str:
    """The requested backend for a raw environment value: ``auto`` when unset or empty."""
    if raw is None:
        return "auto"
    text = _decode(raw)
    if text.strip() == "":
        return "auto"
    return normalize(text, IMPLEMENTATION)


def requested(impl_raw, compatibility_mode) -> tuple:
    """(backend name or 'auto', what asked for it: None, 'compatibility_mode', 'use_backend' or the variable)."""
    if compatibility_mode:
        return "torch", "compatibility_mode"
    scoped = scope_get()
    if scoped is not None:
        return scoped, "use_backend"
    value = decode_implementation(impl_raw)
    return value, (None if value == "auto" and (impl_raw is None or _decode(impl_raw).strip() in ("", "auto")) else IMPLEMENTATION)


def requested_implementation() -> str:
    """What is requested now: the scope's backend, else the environment's, else ``auto``."""
    scoped = scope_get()
    if scoped is not None:
        return scoped
    return decode_implementation(implementation_raw())


def current_implementation() -> str:
    """The backend that serves calls now: ``auto`` (each problem's tuned decision), or the
    backend requested by ``use_backend`` / ``DIFFSYNTH_ATTENTION_IMPLEMENTATION``, or ``torch``
    where the requested one cannot run on this machine (its package is missing or broken, no
    GPU) and calls fall back to it. In strict mode such calls raise instead, and the requested
    name is returned. A backend that runs here but cannot serve one particular call (a mask, a
    head dim) falls back for that call only: ``explain(...)`` reports it per call."""
    value = requested_implementation()
    if value == "auto" or value == "torch" or config.strict():
        return value
    from .backends import REGISTRY, loading

    return value if loading.reasons([REGISTRY[value]])[value] is None else "torch"


@contextlib.contextmanager
def _scope(value: str) -> Iterator[str]:
    """A ``use_backend`` block's body: ``value`` the calling context's scope until it ends."""
    if _dynamo_tracing():  # inside a function being compiled: Dynamo traces no ContextVar; the graph
        # takes the scope as an argument (dispatch/baked.py). ``used`` first: the trace of this block
        # sets a scope while it bakes (compiled.Scope), and Dynamo guards the flag's value after the
        # trace, so a trace that read it as False would get a guard on True and skip the quality scope
        TRACE.used = True
        outer, TRACE.inner = TRACE.inner, value
        try:
            yield value
        finally:
            TRACE.inner = outer
        return
    token = set_scope(value)
    try:
        yield value
    finally:
        scope.reset(token)


def use_backend(name: str) -> ContextManager[str]:
    """Force a backend (or ``"auto"``) within a scope: per thread and per async task, nestable,
    restored on exit even after an exception. The scope wins over the environment variable.
    ``with use_backend(name):``, ``async with``, or ``@use_backend(name)`` on a function or an
    ``async def`` (a decorated coroutine runs under the scope while it runs, in its own task:
    scopes.py); a block is entered once. Inside a function being compiled, the generator-based
    block itself, as Dynamo has traced it (tests/dispatch/test_compile_verify.py); a decorated
    function that is compiled opens that same block around its body."""
    value = normalize(name, "use_backend(name)")
    if _dynamo_tracing():
        return _scope(value)
    return Block(functools.partial(_scope, value), f"use_backend({value!r})")
