"""The public functions, each delegating to the process's default :class:`Dispatcher`."""

from __future__ import annotations

from typing import Dict, Optional

import torch

from . import config
from .backends import available_backends
from .dispatch import Explanation, default_dispatcher
from .overrides import current_implementation, use_backend

config.validate_all()  # a bad environment variable stops the program here, before its first call

_dispatcher = default_dispatcher()

attention_forward = _dispatcher.forward
attention_forward.__module__ = __name__
attention_forward.__qualname__ = "attention_forward"


def explain(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pattern: str = "b n s d",
    k_pattern: str = "b n s d",
    v_pattern: str = "b n s d",
    out_pattern: str = "b n s d",
    dims: Optional[Dict[str, int]] = None,
    attn_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    is_causal: bool = False,
    compatibility_mode: bool = False,
    window_size: Optional[int] = None,
) -> Explanation:
    """The decision ``attention_forward`` takes for this call (backend, source, key and key id,
    the decision with every candidate's time/error/reason); tunes if the key is new, as the call
    would. ``print()`` it for the table ``diffsynth-attention explain`` prints."""
    return _dispatcher.explain(q, k, v, q_pattern, k_pattern, v_pattern, out_pattern, dims, attn_mask, scale, is_causal,
                               compatibility_mode, window_size)


def stats() -> Dict[str, float]:
    """This process's counters: ``hits`` (calls served by a known decision), ``tunings``, ``tuning_seconds``."""
    return _dispatcher.stats()


def clear_cache(backend: Optional[str] = None, gpu: Optional[str] = None) -> int:
    """Remove decisions from the cache (all, or those choosing ``backend`` / tuned on ``gpu``).
    Returns how many were removed."""
    return _dispatcher.clear_cache(backend, gpu)


__all__ = ["attention_forward", "available_backends", "clear_cache", "current_implementation", "explain", "stats",
           "use_backend"]
