"""Writing decisions, for :class:`~.cache.DecisionCache`: ``save``, ``flush``, and the retries.

- ``save`` writes every pending decision, one file each (:func:`.fs.write_new`: a temporary
  file, fsync, rename); many at once go in one batch (:func:`.fs.write_batch`: every temporary
  file written, one ``os.sync``, then the renames), so tens of thousands take seconds, not one
  fsync each. More than ``JOURNAL_MIN`` go first into one journal file (:mod:`.journal`: one
  write and one fsync, a fraction of a second for 50,000): from then on they are on disk, not
  pending, and a process killed before their entry files are written loses none (the next
  process replays the journal). Then their entry files are written, as always.
- A write that fails (read-only, full, EFBIG, a temporary file removed) keeps the decisions in
  memory (one warning) and is tried again on a timer (a daemon ``threading.Timer``, which keeps
  the cache alive: a cache dropped by its owner still writes what it holds) while any are pending: after ``RETRY_S[0]``, doubling to ``RETRY_S[1]``; the
  back-off resets once a write succeeds. A try on a failing disk costs one failed open (the
  journal's, or the first entry's), so the cap is short. A call's own ``save`` between two tries
  does not write (no call waits on a failing disk). So a fault that clears leaves nothing pending
  for more than about ``RETRY_S[1]`` plus one journal write (50,000 decisions: about 1.5 s), and
  a SIGKILL after that loses nothing.
- Every cache flushes at exit (``atexit``, registered when a first decision is stored, not at
  import; caches are held weakly): ``flush`` says how many decisions are lost if some still
  cannot be written (a journaled decision is not lost: the next process writes it out).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from typing import Optional

from .. import process
from . import fs, group_index, journal
from .codec import CacheFileError, render_entry
from .neighbours import cell_of

logger = logging.getLogger("diffsynth_attention")

RETRY_S = (0.25, 1.0)  # after a failed write: first and longest wait before the timer tries again
BATCH = 32  # more pending decisions than this: written as one batch with one sync
JOURNAL_MIN = 256  # more pending decisions than this: made durable in one journal first (:mod:`.journal`)

_live: "weakref.WeakSet" = weakref.WeakSet()  # every cache, flushed at exit


def _flush_all() -> None:
    for cache in list(_live):
        try:
            if cache._pending or cache._journaled:
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


def _retry(cache) -> None:
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
        # in a journal of this process's (durable), entry file not written yet: key id -> (decision, bytes, journal)
        self._journaled: dict = {}
        self._journals: dict = {}  # this process's journals: name -> locked descriptor
        self._replay_due = False  # a journal of a process that is gone may be in the folder
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
            # the timer holds the cache: one that its owner drops with decisions still pending lives on
            # until they are written (or the exit flush says they are lost), never dropped silently
            timer = self._timer = threading.Timer(max(delay, 0.05), _retry, args=(self,))
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
        if not self._pending and not self._journaled and not self._journals and not self._replay_due:
            return True
        if not self._persistent:
            return False
        if self._write_error is not None and not force and time.monotonic() < self._retry_at:
            self._schedule_retry(self._retry_at - time.monotonic())  # a forked child has no timer of its parent's
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
            pending = first = dict(self._pending)
            journaled = len(self._journaled)
        failure = None
        with self._folder(create=True) as vfd:
            if vfd is None:
                return False
            group_index.start_if_empty(vfd)
            if len(pending) > JOURNAL_MIN and journal.available():
                failure = self._journal(vfd, pending)
            if failure is None and (self._journaled or self._journals):
                failure = self._expand(vfd)
            if failure is None and self._replay_due:
                self._replay(vfd)
            with self._mutex:
                pending = dict(self._pending)
            written = []
            if failure is None and pending:
                written, failure = self._write_entries(vfd, self._entries_to_write(vfd, pending))
        if failure is not None:
            self._write_failed(f"cannot write {self.path} ({failure.strerror or failure})")
            return False
        self._write_worked(sum(k not in self._pending for k in first) + journaled)
        return not any(k in self._pending for k in pending)

    def _entries_to_write(self, vfd: int, pending: dict, data_of=None) -> list:
        """``(key id, decision, bytes)`` of the ``pending`` decisions whose entry file may be written
        (never over something that is not one of our readable entry files: that one stays in memory);
        ``data_of(key id, decision)``: their bytes (default: as rendered when stored)."""
        data_of = data_of or self._data
        todo = []
        for kid, d in pending.items():
            if kid in self._blocked:
                self._warn_once(("blocked", kid), "diffsynth_attention cache: the entry %s.json %s; it is not "
                                "overwritten, and its decision stays in memory", self.path / kid, self._blocked[kid])
                continue
            try:
                why = fs.unsafe(os.stat(f"{kid}.json", dir_fd=vfd, follow_symlinks=False), want_dir=False)
                if why:
                    self._blocked[kid] = why
                    continue
            except OSError:  # missing (or the write below says why)
                pass
            data = data_of(kid, d)
            if data is not None:
                todo.append((kid, d, data))
        return todo

    def _data(self, kid: str, d) -> Optional[bytes]:
        """The entry bytes of pending decision ``d`` (rendered when stored), or None if it does not
        validate (then it is dropped, with a warning: it can never be written)."""
        rendered = self._rendered.get(kid)
        if rendered is not None and rendered[0] is d:
            return rendered[1]
        try:
            return render_entry(d).encode()
        except CacheFileError as exc:
            with self._mutex:
                if self._pending.get(kid) is d:
                    del self._pending[kid]
            self._warn_once(("invalid", kid), "diffsynth_attention cache: the decision for %s is not saved: %s",
                            kid, exc.reason)
            return None

    def _write_entries(self, vfd: int, todo: list) -> tuple:
        """Write entry files (one batch with one sync if many) and their index markers; (written, failure)."""
        written, failure = [], None
        if len(todo) > BATCH:
            names, failure = fs.write_batch(vfd, [(f"{kid}.json", data) for kid, _, data in todo])
            done = set(names)
            written = [(kid, d) for kid, d, _ in todo if f"{kid}.json" in done]
        else:
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
                if kid in self._journaled and self._journaled[kid][0] is d:
                    del self._journaled[kid]
        return written, failure

    def _journal(self, vfd: int, pending: dict) -> Optional[OSError]:
        """Write the ``pending`` decisions into one journal: from then on they are on disk (not
        pending); their entry files are written next (:meth:`_expand`). The OSError if it failed."""
        items = [(kid, d, data) for kid, d in pending.items() if kid not in self._blocked
                 for data in [self._data(kid, d)] if data is not None]
        if not items:
            return None
        try:
            name, fd = journal.write(vfd, [(kid, data) for kid, _, data in items])
        except OSError as exc:
            return exc
        with self._mutex:
            self._journals[name] = fd
            for kid, d, data in items:
                if self._pending.get(kid) is d:  # (a newer one stored meanwhile stays pending)
                    del self._pending[kid]
                    self._rendered.pop(kid, None)
                    self._journaled[kid] = (d, data, name)
        return None

    def _expand(self, vfd: int) -> Optional[OSError]:
        """Write the entry files of the journaled decisions; remove each journal of ours once all
        its entries are written. The OSError if a write failed (the rest is tried again later)."""
        with self._mutex:
            for kid in [k for k in self._journaled if k in self._pending]:  # a newer decision: written instead
                del self._journaled[kid]
            entries = {kid: d for kid, (d, _, _) in self._journaled.items()}
        todo = self._entries_to_write(vfd, entries, lambda kid, d: self._journaled.get(kid, (d, None))[1]) if entries else []
        with self._mutex:  # a blocked file is never overwritten: its decision waits in memory, as pending
            for kid in [k for k in self._journaled if k in self._blocked]:
                self._pending.setdefault(kid, self._journaled.pop(kid)[0])
        _, failure = self._write_entries(vfd, todo)
        self._release_done(vfd)
        return failure

    def _release_done(self, vfd: int) -> None:
        """Remove each journal of ours none of whose decisions is still waiting for its entry file."""
        with self._mutex:
            busy = {name for _, _, name in self._journaled.values()}
            done = [(name, fd) for name, fd in self._journals.items() if name not in busy]
            for name, _ in done:
                del self._journals[name]
        for name, fd in done:
            journal.release(vfd, name, fd, done=True)

    def _replay(self, vfd: int) -> None:
        """Replay the journals of processes that are gone (found when the folder was loaded)."""
        self._replay_due = False
        try:
            found = journal.names(os.listdir(vfd))
        except OSError:
            return
        for name in found:
            if name in self._journals:
                continue

            def write(todo):
                written, failure = self._write_entries(vfd, todo)
                for kid, d in written:
                    self._remember(d)
                return failure is None
            replayed = journal.replay(vfd, name, write)
            if replayed:
                logger.info("diffsynth_attention cache: wrote %d decision(s) from the journal %s of a process that ended "
                            "before writing them", replayed, name)

    def replay_journals(self) -> None:
        """Before a whole-cache read or clear: the journals of processes that are gone are written out."""
        if self._replay_due and self._persistent:
            self.save(force=True)

    def flush(self) -> bool:
        """Write what is still pending (run at exit); if some cannot be written, say how many are lost
        (a journaled decision is not lost: the next process writes it)."""
        if not self._pending and not self._journaled:
            return True
        if self._persistent:
            self.save(force=True)
        left = len(self._pending)
        if left:
            logger.warning("diffsynth_attention cache: %d decision(s) could not be written to %s and are lost "
                           "when this process exits", left, self.path)
        return not left
