"""Tuning under the per-key lease, for :class:`~.cache.DecisionCache`: ``tuning_lock`` and
``get_or_tune`` (get -> lease -> read again -> tune -> put), so no caller hand-codes it, and its
typed result (:class:`TuneResult`, :class:`Outcome`)."""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import time
from typing import Callable, Optional

from .. import config
from . import fs, lock
from .codec import ID
from .decision import Decision
from .paths import LOCKS


class Outcome(str, enum.Enum):
    """Where the decision of :meth:`Leases.get_or_tune` came from."""

    FOUND = "found"  # known before the lease was taken
    REREAD = "re-read"  # read again under the lease: another thread or process decided it meanwhile
    TUNED = "tuned"  # ``tune()`` ran and its decision was stored
    NOT_STORED = "not stored"  # ``tune()`` ran; it returned None, or a decision no candidate passed: not stored


@dataclasses.dataclass(frozen=True)
class TuneResult:
    """What :meth:`Leases.get_or_tune` returns. Unpacks as ``(decision, tuned)``."""

    decision: Optional[Decision]
    outcome: Outcome
    lease: Optional[lock.Lease] = None  # how taking the lease went; None when the first read found it

    @property
    def tuned(self) -> bool:
        return self.outcome in (Outcome.TUNED, Outcome.NOT_STORED)

    def __iter__(self):
        return iter((self.decision, self.tuned))


class Leases:
    """Mixed into DecisionCache."""

    # -- tuning: one tuner per key, the others wait, then read ----------------------------
    @contextlib.contextmanager
    def tuning_lock(self, key_id: str):
        """Hold the lease of ``key_id`` while tuning it. Yields a :class:`.lock.Lease`, true if held;
        not held if waiting timed out, the holder is stopped or hung, or no lock file could be
        taken (then tune without it)."""
        self._ensure_loaded()
        wait = config.tune_wait()
        deadline = time.monotonic() + wait
        tlock = self._locks.get(key_id)
        if not tlock.acquire(timeout=wait):
            self._warn_once("tune-wait", "diffsynth_attention: waited %ss for another thread tuning the same problem; tuning here", wait)
            yield lock.Lease(lock.LeaseResult.WAITED_OUT, "another thread of this process")
            return
        try:
            if not self._persistent or not ID.match(key_id):
                yield lock.Lease(lock.LeaseResult.HELD)
                return
            held = lock.take_file_lock(self._open_locks, f"{key_id}.lock", deadline, self._warn_once)
            try:
                yield lock.Lease(lock.LeaseResult.HELD) if isinstance(held, lock.HeldLock) else held
            finally:
                if isinstance(held, lock.HeldLock):
                    held.release()
        finally:
            tlock.release()

    def _open_locks(self) -> Optional[int]:
        with self._folder(create=True) as vfd:
            if vfd is None:
                return None
            try:
                return fs.open_subdir(vfd, LOCKS, create=True)
            except (OSError, fs.Refused) as exc:
                self._warn_once("tune-locks", "diffsynth_attention: cannot use the tuning locks in %s (%s); tuning without a lock",
                                self.lock_path, getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc)
                return None

    def get_or_tune(self, key_id: str, tune: Callable[[], Optional[Decision]], tolerance: Optional[float] = None, *,
                    accept: Optional[Callable[[Decision], bool]] = None, read_first: bool = True) -> TuneResult:
        """The known decision of ``key_id``, else ``tune()``'s, under the key's lease: get -> lease
        -> read again -> tune -> put, the one place this sequence is written.

        A found decision serves if it is trusted under ``tolerance`` (default: the one in force,
        as in :meth:`get`), some candidate of it passed the gate, and ``accept(decision)`` (e.g.
        its backend is usable here); else the key is tuned again and its decision replaced.
        ``read_first=False``: the caller has just read the key, so the read before the lease is
        skipped. A lease that is not held (waited out, a stale holder, no lock file) means tune
        without it. ``tune()``'s decision is stored (memory, then its file; listeners told)
        unless it is None or no candidate passed the gate (used by the caller for that call
        only). An exception from ``tune()`` propagates, the lease released and nothing stored."""
        def usable(found: Optional[Decision]) -> bool:
            return found is not None and not found.all_rejected() and (accept is None or accept(found))

        if read_first:
            found = self.get(key_id, tolerance)
            if usable(found):
                return TuneResult(found, Outcome.FOUND)
        with self.tuning_lock(key_id) as lease:
            found = self.refresh(key_id, tolerance)
            if usable(found):
                return TuneResult(found, Outcome.REREAD, lease)
            decision = tune()
            if decision is None or decision.all_rejected():
                return TuneResult(decision, Outcome.NOT_STORED, lease)
            self.put(decision)
            return TuneResult(decision, Outcome.TUNED, lease)
