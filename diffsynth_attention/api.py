"""The public functions, each delegating to the process's default :class:`Dispatcher`."""

from __future__ import annotations

from typing import Dict, Optional

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


def clear_cache(backend: Optional[str] = None, gpu: Optional[str] = None) -> int:
    """Remove decisions from the cache (all, or those choosing ``backend`` / tuned on ``gpu``).
    Returns how many were removed."""
    return _dispatcher.clear_cache(backend, gpu)


__all__ = ["attention_forward", "available_backends", "clear_cache", "current_implementation", "current_quality", "explain",
           "quality", "stats", "use_backend"]
