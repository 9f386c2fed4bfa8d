"""A dispatcher's counters (``stats()``): safe when many threads call at once.

- ``hits``: calls served by a known decision. The hot path counts one with :attr:`Counters.hit`,
  an ``itertools.count``'s ``__next__``: one C call, atomic under the GIL, no lock and no
  Python frame on the hot path. A read takes one value from that count too, and subtracts the
  values that the reads took.
- ``tunings`` and ``tuning_seconds``: updated together, under a lock (a tuning is rare).

A snapshot is taken under the lock: ``tunings`` and ``tuning_seconds`` always agree.
"""

from __future__ import annotations

import itertools

from .. import process


class Counters:
    """``hits``, ``tunings``, ``tuning_seconds`` of one dispatcher; ``counters["hits"]`` reads one."""

    NAMES = ("hits", "tunings", "tuning_seconds")

    def __init__(self):
        self._lock = process.new_lock()
        self._hits = itertools.count()
        self.hit = self._hits.__next__  # the hot path's call: counts one hit
        self._taken = 0  # values of _hits taken by reads, not hits
        self._hits_base = 0  # hits before the last reset
        self._tunings = 0
        self._seconds = 0.0

    def _hits_now(self) -> int:  # under self._lock
        total = next(self._hits) - self._taken
        self._taken += 1
        return total

    def tuned(self, seconds: float) -> None:
        """Count one tuning that took ``seconds``."""
        with self._lock:
            self._tunings += 1
            self._seconds += seconds

    def snapshot(self) -> dict:
        """{"hits", "tunings", "tuning_seconds"} at one moment."""
        with self._lock:
            return {"hits": self._hits_now() - self._hits_base, "tunings": self._tunings,
                    "tuning_seconds": self._seconds}

    def reset(self) -> None:
        with self._lock:
            self._hits_base = self._hits_now()
            self._tunings = 0
            self._seconds = 0.0

    def __getitem__(self, name: str):
        if name not in self.NAMES:
            raise KeyError(name)
        return self.snapshot()[name]

    def __repr__(self) -> str:
        return f"Counters({self.snapshot()})"
