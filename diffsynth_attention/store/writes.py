"""Writing decisions, for :class:`~.cache.DecisionCache`: ``save``, ``flush``, and the retries.

- ``save`` writes every pending decision, one file each (:func:`.fs.write_new`: a temporary
  file, fsync, rename); many at once go in one batch (:func:`.fs.write_batch`: every temporary
  file written, one ``os.sync``, then the renames), so tens of thousands take seconds, not one
  fsync each.
- A write that fails (read-only, full, EFBIG, a temporary file removed) keeps the decisions in
  memory (one warning) and is tried again on a timer (a daemon ``threading.Timer`` holding the
  cache weakly) while any are pending: after ``RETRY_S[0]``, doubling to ``RETRY_S[1]``; the
  back-off resets once a write succeeds. A call's own ``save`` between two tries does not write
  (no call waits on a failing disk). So a fault that clears leaves nothing pending for more than
  about ``RETRY_S[1]`` plus the time the writes take, and a SIGKILL after that loses nothing.
- Every cache flushes at exit (``atexit``, registered when a first decision is stored, not at
  import; caches are held weakly): ``flush`` says how many decisions are lost if some still
  cannot be written.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref

from .. import process
from . import fs, group_index
from .codec import CacheFileError, render_entry
from .neighbours import cell_of

logger = logging.getLogger("diffsynth_attention")

RETRY_S = (0.25, 2.0)  # after a failed write: first and longest wait before the timer tries again
BATCH = 32  # more pending decisions than this: written as one batch with one sync

_live: "weakref.WeakSet" = weakref.WeakSet()  # every cache, flushed at exit


def _flush_all() -> None:
    for cache in list(_live):
        try:
            if cache._pending:
                cache.flush()
        except Exception:  # never breaks the interpreter's exit
            logger.debug("flushing a decision cache at exit failed", exc_info=True)


_exit_registered = False


def _flush_at_exit() -> None:
    """Register the exit flush, once: when the process first stores a decision (importing registers nothing)."""
    global _exit_registered
    if not _exit_registered:
        _exit_registered = True
        atexit.register(_flush_all)


def _retry(ref) -> None:
    cache = ref()
    if cache is None:
        return
    with cache._mutex:
        cache._timer = None
    try:
        cache.save(force=True)  # a failure schedules the next try (_write_failed)
    except Exception:
        logger.debug("retrying the cache's pending writes failed", exc_info=True)


class Writes:
    """Mixed into DecisionCache (which sets ``_mutex``, ``_pending``, ``_blocked``, ... )."""

    def _writes_init(self) -> None:
        self._save_lock = process.new_lock()
        self._timer = None
        _live.add(self)

    def _prerender(self, decision) -> None:
        """Render a decision's entry when it is stored (a tuning took seconds; this takes a fraction
        of a millisecond), so that writing, and every retry after a fault, is file I/O alone."""
        _flush_at_exit()  # a decision is pending from here on
        try:
            data = render_entry(decision).encode()
        except Exception:  # an invalid decision: save says so
            return
        with self._mutex:
            self._rendered[decision.key_id] = (decision, data)

    def _reset_writes(self) -> None:
        self._rendered = {}  # key id -> (decision, its entry's bytes), while pending
        self._write_error = None  # why the last write failed (reads go on; writes are retried)
        self._retry_at = 0.0
        self._backoff = RETRY_S[0]

    def _schedule_retry(self, delay: float) -> None:
        """Try the pending writes again in ``delay`` seconds, on a timer (one at a time)."""
        with self._mutex:
            if self._timer is not None or not self._persistent:
                return
            timer = self._timer = threading.Timer(max(delay, 0.05), _retry, args=(weakref.ref(self),))
            timer.daemon = True
            timer.name = "diffsynth-attention-cache-retry"
        timer.start()

    def _write_failed(self, reason: str) -> None:
        """A write failed: keep the pending decisions, go on reading, try writing again later."""
        with self._mutex:
            first = self._write_error is None
            self._write_error = reason
            self._backoff = RETRY_S[0] if first else min(self._backoff * 2, RETRY_S[1])
            self._retry_at = time.monotonic() + self._backoff
            pending, delay = len(self._pending), self._backoff
        if first:
            logger.warning("diffsynth_attention cache: %s; decisions stay in memory for now (%d not on disk); reads go on, "
                           "and writing is tried again (every %gs at most)", reason, pending, RETRY_S[1])
        self._schedule_retry(delay)

    def _write_worked(self, written: int) -> None:
        with self._mutex:
            was, self._write_error, self._backoff = self._write_error, None, RETRY_S[0]
        if was is not None:
            logger.warning("diffsynth_attention cache: writing to %s works again (it failed: %s); %d decision(s) written",
                           self.path, was, written)

    def save(self, force: bool = False) -> bool:
        """Write pending decisions, one file each. False if some stay in memory (said once, with the
        count). After a failed write, a call's save writes only once the back-off has passed
        (``force``: now); the timer tries meanwhile. A save under way elsewhere is not waited for
        (the timer comes back for what it did not write), except by ``force``."""
        self._ensure_loaded()
        if not self._pending:
            return True
        if not self._persistent:
            return False
        if self._write_error is not None and not force and time.monotonic() < self._retry_at:
            return False
        if not self._save_lock.acquire(blocking=force):
            self._schedule_retry(RETRY_S[0])
            return False
        try:
            return self._save_pending()
        finally:
            self._save_lock.release()

    def _save_pending(self) -> bool:
        with self._mutex:
            pending = dict(self._pending)
        if not pending:
            return True
        todo, written, failure = [], [], None
        with self._folder(create=True) as vfd:
            if vfd is None:
                return False
            group_index.start_if_empty(vfd)
            for kid, d in pending.items():
                if kid in self._blocked:
                    self._warn_once(("blocked", kid), "diffsynth_attention cache: the entry %s.json %s; it is not "
                                    "overwritten, and its decision stays in memory", self.path / kid, self._blocked[kid])
                    continue
                try:  # never overwrite something that is not one of our readable entry files
                    why = fs.unsafe(os.stat(f"{kid}.json", dir_fd=vfd, follow_symlinks=False), want_dir=False)
                    if why:
                        self._blocked[kid] = why
                        continue
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    failure = exc
                    break
                rendered = self._rendered.get(kid)
                try:
                    todo.append((kid, d, rendered[1] if rendered is not None and rendered[0] is d else render_entry(d).encode()))
                except CacheFileError as exc:
                    with self._mutex:
                        if self._pending.get(kid) is d:
                            del self._pending[kid]
                    self._warn_once(("invalid", kid), "diffsynth_attention cache: the decision for %s is not saved: %s",
                                    kid, exc.reason)
            if failure is None and len(todo) > BATCH:
                names, failure = fs.write_batch(vfd, [(f"{kid}.json", data) for kid, _, data in todo])
                done = set(names)
                written = [(kid, d) for kid, d, _ in todo if f"{kid}.json" in done]
            elif failure is None:
                for kid, d, data in todo:
                    try:
                        fs.write_new(vfd, f"{kid}.json", data)
                    except OSError as exc:
                        failure = exc
                        break
                    written.append((kid, d))
            if written:
                fs.fsync_dir(vfd)
                group_index.add(vfd, [(cell_of(d), kid) for kid, d in written])  # the neighbour index
        with self._mutex:
            for kid, d in written:
                self._indexed.add(kid)
                if self._pending.get(kid) is d:
                    del self._pending[kid]
                    self._rendered.pop(kid, None)
        if failure is not None:
            self._write_failed(f"cannot write {self.path} ({failure.strerror or failure})")
            return False
        self._write_worked(len(written))
        return not any(k in self._pending for k in pending)

    def flush(self) -> bool:
        """Write what is still pending (run at exit); if some cannot be written, say how many are lost."""
        if not self._pending:
            return True
        if self._persistent:
            self.save(force=True)
        left = len(self._pending)
        if left:
            logger.warning("diffsynth_attention cache: %d decision(s) could not be written to %s and are lost "
                           "when this process exits", left, self.path)
        return not left
