"""diffsynth-attention: an autotuning attention dispatcher with an on-disk decision cache.

``attention_forward`` is a drop-in for DiffSynth-Studio's ``diffsynth.core.attention.attention_forward``.
On the first call for a problem it times every backend that can serve it, rejects those whose
error against an fp32 reference is above tolerance, and keeps the fastest, in a per-user cache
that every later call and process reads.
"""

from ._version import __version__
from .api import attention_forward, available_backends, clear_cache, current_implementation, explain, stats, use_backend
from .dispatch import BackendNotSupportedError, Dispatcher, Explanation
from .integrations.distributed import sync_decisions
from .integrations.patching import patch_diffsynth, patch_sdpa
from .store import DecisionCache, cache_dir

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
    "Dispatcher",
    "Explanation",
]
