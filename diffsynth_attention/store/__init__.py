"""Decisions and where they live: the problem key (:mod:`.key`), the decision value objects
(:mod:`.decision`) and the on-disk cache (:mod:`.cache`).

Names are loaded on first use: :mod:`.key` imports torch, and the command line reads the
cache (:mod:`.cache`, :mod:`.decision`) without it.
"""

_PUBLIC = {
    "Candidate": ".decision",
    "Decision": ".decision",
    "DecisionCache": ".cache",
    "cache_dir": ".cache",
    "Key": ".key",
    "key_id": ".key",
    "make_key": ".key",
}

__all__ = ["Candidate", "Decision", "DecisionCache", "Key", "cache_dir", "key_id", "make_key"]


def __getattr__(name: str):
    module_name = _PUBLIC.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module_name, __name__), name)
    globals()[name] = value
    return value
