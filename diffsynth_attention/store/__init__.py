"""Decisions and where they live: the problem key (:mod:`.key`), the decision value objects
(:mod:`.decision`) and the on-disk cache (:mod:`.cache`)."""

from .cache import DecisionCache, cache_dir
from .decision import Candidate, Decision
from .key import Key, key_id, make_key

__all__ = ["Candidate", "Decision", "DecisionCache", "Key", "cache_dir", "key_id", "make_key"]
