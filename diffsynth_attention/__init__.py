"""diffsynth-attention: an autotuning attention dispatcher with an on-disk decision cache.

``attention_forward`` is a drop-in for DiffSynth-Studio's ``diffsynth.core.attention.attention_forward``.
On the first call for a problem it times every backend that can serve it, rejects those whose
error against an fp32 reference is above tolerance, and keeps the fastest, in a per-user cache
that every later call and process reads.

The public names are loaded on first use (PEP 562), so ``import diffsynth_attention`` and the
command line's cache commands do not import torch; ``from diffsynth_attention import X`` and
``diffsynth_attention.X`` work as usual.

Importing the package has no side effect but one: once torch is imported, a background thread
starts loading the kernel packages that this machine's cached decisions name (the preload,
``DIFFSYNTH_ATTENTION_PRELOAD=0`` turns it off). It creates no folder or file, registers no exit
handler, reads no environment variable strictly (a bad value raises at the first call, naming
it) and makes no dispatcher; those come with the first use. With
``DIFFUSERS_ATTN_BACKEND=diffsynth_auto`` (a request to do exactly this) it also installs the
hook that registers the diffusers backend when diffusers loads (:mod:`.integrations.diffusers`).
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
    "record": ".api",
    "stats": ".api",
    "use_backend": ".api",
    "quality": ".api",
    "current_quality": ".api",
    "step_schedule": ".schedule",
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
    "record",
    "stats",
    "sync_decisions",
    "use_backend",
    "quality",
    "current_quality",
    "step_schedule",
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
    _start_preload()
    return value


_preload_started = False


class _Named:
    """What the preload needs of a decision: its backend and key (no Decision is built)."""

    __slots__ = ("backend", "key")

    def __init__(self, backend, key) -> None:
        self.backend, self.key = backend, key


def _start_preload() -> None:
    """Start loading, on background threads, the kernel packages that the cache's decisions on
    this machine name; once, unless DIFFSYNTH_ATTENTION_PRELOAD is off. Only once torch is
    imported (by the caller, or by a public name being loaded): the command line's cache commands
    and a bare ``import diffsynth_attention`` before torch never pay for torch on another thread.

    Every module of this package that the work needs is imported here, on the caller's thread:
    a background thread that imports a module while the caller imports the same package can make
    Python's import locks report a deadlock (``_DeadlockError``) in either thread. The thread only
    reads the cache, writing nothing (:meth:`.store.bulk.WholeCache.peek`: no migration, journal
    replay or sweep), and starts the loads (:mod:`.backends.loading`). It reads the default
    dispatcher's store (:func:`.dispatch.default_store`) without making the dispatcher."""
    global _preload_started
    import sys

    if _preload_started or "torch" not in sys.modules:
        return
    from . import config

    try:
        if not config.preload():
            return
    except ValueError:  # a bad value: the first call names it (config.validate_all)
        return
    _preload_started = True
    import logging
    import threading

    try:
        from .backends import REGISTRY
        from .backends.loading import preload
        from .dispatch import default_store
        from .store.codec import fast_check, schema_validator, unworded

        if fast_check() is None:  # the entry check, compiled here rather than on the thread; where it
            schema_validator()  # cannot be, jsonschema validates, imported here. Otherwise the thread
        store = default_store()  # never imports jsonschema (an error found there goes unworded)
    except Exception:  # never breaks the import: the first call loads what it needs
        logging.getLogger(__name__).debug("preloading kernel packages failed", exc_info=True)
        return

    def run() -> None:
        try:
            with unworded():  # a read that writes nothing (no migration, no journal replay, no sweep)
                preload(store.peek(lambda kid, entry: _Named(entry["backend"], entry["key"])), REGISTRY)
        except Exception:
            logging.getLogger(__name__).debug("preloading kernel packages failed", exc_info=True)

    threading.Thread(target=run, name="diffsynth-attention-preload", daemon=True).start()


_start_preload()


def __dir__():
    return sorted(set(globals()) | set(__all__))
