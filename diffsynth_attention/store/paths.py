"""Where the store lives: the only place that resolves the cache folder (and, under it,
FlashAttention-4's compile folder). Imports no torch."""

from __future__ import annotations

from pathlib import Path

FOLDER = "v2"  # the entry files of schema version 2: <cache>/v2/<key id>.json
LOCKS = "locks"  # per-key tuning locks: <cache>/v2/locks/<key id>.lock
LEGACY_FILE = "decisions.json"  # schema version 1: one file of every decision, in <cache>
MIGRATED_SUFFIX = ".v1-migrated"
FA4_COMPILE = "fa4-compile"


def cache_dir() -> Path:
    """The cache folder: ``DIFFSYNTH_ATTENTION_CACHE_DIR`` (a ``ValueError`` naming it if it cannot
    be used as a path), else ``platformdirs.user_cache_dir("diffsynth_attention")``."""
    from .. import config

    override = config.cache_dir_override()
    if override:
        return Path(override)
    import platformdirs

    return Path(platformdirs.user_cache_dir("diffsynth_attention"))


def fa4_compile_dir() -> Path:
    """Where this library keeps FlashAttention-4's compilations: ``<cache folder>/fa4-compile``."""
    return cache_dir() / FA4_COMPILE
