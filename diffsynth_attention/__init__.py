"""diffsynth-attention: an autotuning attention dispatcher with an on-disk decision cache.

``attention_forward`` is a drop-in for DiffSynth-Studio's ``diffsynth.core.attention.attention_forward``.
On the first call for a problem it times every backend that can serve it, rejects those whose
error against an fp32 reference is above tolerance, and keeps the fastest, in a per-user cache
that every later call and process reads.
"""

__version__ = "0.1.0"

from .backends import available_backends
from .cache import DecisionCache, cache_dir
from .dispatch import (
    BackendNotSupportedError,
    Explanation,
    attention_forward,
    current_implementation,
    explain,
    stats,
    use_backend,
)


def clear_cache(backend=None, gpu=None) -> int:
    """Remove decisions from the cache (all, or those choosing ``backend`` / tuned on ``gpu``),
    taking the cache's lock. Returns how many were removed."""
    from .dispatch import store

    def match(decision):
        if backend is not None and decision.backend != backend:
            return False
        if gpu is not None and gpu.lower() not in decision.key.get("device", {}).get("name", "").lower():
            return False
        return True

    return store.clear(None if backend is None and gpu is None else match)


from .distributed import sync_decisions  # noqa: E402
from .patching import patch_diffsynth, patch_sdpa  # noqa: E402

__all__ = [
    "__version__",
    "attention_forward",
    "available_backends",
    "cache_dir",
    "clear_cache",
    "current_implementation",
    "explain",
    "patch_diffsynth",
    "patch_sdpa",
    "stats",
    "sync_decisions",
    "use_backend",
    "BackendNotSupportedError",
    "DecisionCache",
    "Explanation",
]
