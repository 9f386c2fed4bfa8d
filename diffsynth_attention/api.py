"""The public functions, each delegating to the process's default :class:`Dispatcher`."""

from __future__ import annotations

from . import config
from .backends import available_backends
from .dispatch import default_dispatcher
from .overrides import current_implementation, use_backend

config.validate_all()  # a bad environment variable stops the program here, before its first call

_dispatcher = default_dispatcher()

attention_forward = _dispatcher.forward
attention_forward.__module__ = __name__
attention_forward.__qualname__ = "attention_forward"


def explain(q, k, v, q_pattern="b n s d", k_pattern="b n s d", v_pattern="b n s d", out_pattern="b n s d",
            dims=None, attn_mask=None, scale=None, is_causal=False, compatibility_mode=False, window_size=None):
    """The decision ``attention_forward`` takes for this call (backend, source, key and key id,
    the decision with every candidate's time/error/reason); tunes if the key is new, as the call would."""
    return _dispatcher.explain(q, k, v, q_pattern, k_pattern, v_pattern, out_pattern, dims, attn_mask, scale, is_causal,
                               compatibility_mode, window_size)


def stats() -> dict:
    """This process's counters: ``hits`` (calls served by a known decision), ``tunings``, ``tuning_seconds``."""
    return _dispatcher.stats()


def clear_cache(backend=None, gpu=None) -> int:
    """Remove decisions from the cache (all, or those choosing ``backend`` / tuned on ``gpu``).
    Returns how many were removed."""
    return _dispatcher.clear_cache(backend, gpu)


__all__ = ["attention_forward", "available_backends", "clear_cache", "current_implementation", "explain", "stats",
           "use_backend"]
