"""Tuning under the per-key lease, for :class:`~.cache.DecisionCache`: ``tuning_lock`` and
``get_or_tune`` (get -> lease -> read again -> tune -> put), so no caller hand-codes it."""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Optional

from .. import config
from . import fs, lock
from .codec import ID, all_rejected
from .decision import Decision
from .paths import LOCKS


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

    def get_or_tune(self, key_id: str, tune: Callable[[], Optional[Decision]], tolerance: Optional[float] = None):
        """(decision, tuned): the known decision of ``key_id``, else ``tune()``'s, under the key's
        lease (get -> lease -> read again -> tune -> put). A decision ``tune`` returns is stored
        unless it is None or no candidate passed the gate."""
        found = self.get(key_id, tolerance)
        if found is not None:
            return found, False
        with self.tuning_lock(key_id):
            found = self.refresh(key_id, tolerance)
            if found is not None:
                return found, False
            decision = tune()
            if decision is not None and not all_rejected(decision):
                self.put(decision)
            return decision, True
