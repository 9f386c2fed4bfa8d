"""The calling context's scopes as a ``torch.compile`` trace reads them: one object for both.

Dynamo traces no contextvar, and guards what a traced function reads on every call of the
compiled code (~30 ns a guard node on the 2-core CPU). So both scopes, the ``use_backend`` one
(:mod:`.overrides`) and the quality one (:mod:`.tiers`), are read through one object, :data:`TRACE`,
whose guards a trace shares:

- ``scope`` and ``scoped`` are properties whose getters are the contextvars' own (C) ``get``, so
  Dynamo reads them, and evaluates their guards, in the calling thread and task (no process-wide
  mirror). Either is this object itself where no scope is set (the getter's default argument).
- ``inner``: a ``use_backend`` opened inside a function being compiled: set only while Dynamo
  traces that block, as a side effect of the trace.
- ``used``: whether any scope of either kind was ever set in this process (never unset). Until
  then no context can hold one, so a trace reads only this flag, a C++ guard, where a property's
  guard is a Python call (~0.3 us). The first scope set fails that guard once, and the retrace
  reads the properties.

No torch here.
"""

from __future__ import annotations

import contextvars
from typing import Optional

backend_scope: contextvars.ContextVar = contextvars.ContextVar("diffsynth_attention_backend", default=None)
quality_scope: contextvars.ContextVar = contextvars.ContextVar("diffsynth_attention_quality", default=None)


class TraceState:
    """See the module's text."""

    scope = property(backend_scope.get)
    scoped = property(quality_scope.get)

    def __init__(self) -> None:
        self.inner = None
        self.used = False


TRACE = TraceState()


def traced_scopes(with_quality: bool = True) -> tuple:
    """(``use_backend`` backend or None, quality tier or None) as a trace reads them (through
    :data:`TRACE`, so Dynamo guards on what it read). ``with_quality=False``: the backend alone
    (the tier None, unread and unguarded), for a trace the tier does not change (integrations/lse.py)."""
    trace = TRACE
    backend = trace.inner
    quality: Optional[str] = None
    if trace.used:
        if backend is None:
            value = trace.scope
            backend = None if value is trace else value
        if with_quality:
            value = trace.scoped
            quality = None if value is trace else value
    return backend, quality
