"""Reading an environment variable on every call, cheaply (no imports: overrides and
tiers use it)."""

from __future__ import annotations

import os


def raw_reader(name: str) -> tuple:
    """(key, get, decode) to read variable ``name`` on every call: ``get(key)`` is a plain dict
    lookup in ``os.environ``'s backing dict (``os.environ.get`` encodes the name and decodes the
    value, ~2 us), returning the raw value (bytes on POSIX) or None; ``decode`` makes it text."""
    data = getattr(os.environ, "_data", None)
    if isinstance(data, dict) and hasattr(os.environ, "encodekey"):
        return os.environ.encodekey(name), data.get, os.environ.decodevalue
    return name, os.environ.get, str  # pragma: no cover - other Python implementations
