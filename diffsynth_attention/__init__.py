"""diffsynth-attention: an autotuning attention dispatcher with an on-disk decision cache.

``attention_forward`` is a drop-in for DiffSynth-Studio's ``diffsynth.core.attention.attention_forward``.
On the first call for a problem it times every backend that can serve it, rejects those whose
error against an fp32 reference is above tolerance, and keeps the fastest, in a per-user cache
that every later call and process reads.

The public names are loaded on first use (PEP 562), so ``import diffsynth_attention`` and the
command line's cache commands do not import torch; ``from diffsynth_attention import X`` and
``diffsynth_attention.X`` work as usual.
"""

import os as _os

from ._version import __version__

if _os.environ.get("DIFFUSERS_ATTN_BACKEND") == "diffsynth_auto":  # diffusers reads it at import: register first
    from .integrations.diffusers import register_from_environment as _register_diffusers

    _register_diffusers()

# public name -> the module that defines it
_PUBLIC = {
    "attention_forward": ".api",
    "available_backends": ".api",
    "clear_cache": ".api",
    "current_implementation": ".api",
    "explain": ".api",
    "stats": ".api",
    "use_backend": ".api",
    "BackendNotSupportedError": ".dispatch",
    "Dispatcher": ".dispatch",
    "Explanation": ".dispatch",
    "sync_decisions": ".integrations.distributed",
    "patch_diffsynth": ".integrations.patching",
    "patch_sdpa": ".integrations.patching",
    "DecisionCache": ".store.cache",
    "cache_dir": ".store.cache",
}

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


def __getattr__(name: str):
    module_name = _PUBLIC.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module_name, __name__), name)
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
