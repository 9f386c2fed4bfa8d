"""The public functions, each delegating to the process's default :class:`Dispatcher`."""

from __future__ import annotations

import os
from typing import ContextManager, Dict, Optional, Union

from .backends import available_backends
from .dispatch import default_dispatcher
from .overrides import current_implementation, use_backend
from .tiers import current as current_quality
from .tiers import quality

# No environment check here: importing never raises for a bad value; the first call (or patch)
# does, naming the variable, the value and what is allowed (Dispatcher.build_plan, config.validate_all).
_dispatcher = default_dispatcher()  # made when a public function is first loaded (dispatch/__init__.py)

attention_forward = _dispatcher.forward
attention_forward.__module__ = __name__
attention_forward.__qualname__ = "attention_forward"


explain = _dispatcher.explain  # typed on Dispatcher.explain: (q, k, v, patterns..., as attention_forward) -> Explanation


def stats() -> Dict[str, float]:
    """This process's counters: ``hits`` (calls served by a known decision), ``tunings``, ``tuning_seconds``."""
    return _dispatcher.stats()


def record(path: Union[str, "os.PathLike[str]"]) -> ContextManager[set]:
    """``with da.record("problems.json"):`` around a pipeline records the problems it calls (in any
    thread) and writes them to the file when the scope ends, merged with a recording already there;
    ``diffsynth-attention warm --shapes problems.json`` tunes them elsewhere. Entering the scope
    drops this process's plans, so that problems planned before it are recorded too (planned again
    from the decisions in memory). ``DIFFSYNTH_ATTENTION_RECORD=path`` records a whole process."""
    from .recording import scope

    return scope(path, _dispatcher.invalidate)


def clear_cache(backend: Optional[str] = None, gpu: Optional[str] = None) -> int:
    """Remove decisions from the cache (all, or those choosing ``backend`` / tuned on ``gpu``).
    Returns how many were removed."""
    return _dispatcher.clear_cache(backend, gpu)


__all__ = ["attention_forward", "available_backends", "clear_cache", "current_implementation", "current_quality", "explain",
           "quality", "record", "stats", "use_backend"]
