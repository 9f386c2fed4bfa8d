"""The per-key tuning lease: one tuner per key, in this process and across processes.

- In the process: a ``threading.Lock`` per key.
- Across processes: an ``flock`` on ``v2/locks/<key id>.lock`` whose holder touches the file
  every HEARTBEAT_S (its mtime is the heartbeat); a waiter that sees no touch for STALE_S (a
  stopped or hung tuner) stops waiting and tunes itself. A holder removes its lock file on
  release, so lock files do not pile up; a waiter that finds the file replaced opens it again.
- After ``fork`` (:mod:`diffsynth_attention.process`), a child finds the per-key thread locks
  unlocked and closes its copies of the parent's held lock files: it never waits on a lock that
  only a thread of its parent could release, and never keeps its parent's lock alive.

Every wait ends: :class:`Lease` says how (``held`` or why not); a lease that is not held means
"tune without the lock" (at worst a key is tuned twice, never lost or hung).
"""

from __future__ import annotations

import contextlib
import enum
import os
import threading
import time
import weakref
from typing import Callable, Optional

from .. import process
from . import fs

HEARTBEAT_S = 0.5  # a lock holder touches its lock file this often
STALE_S = 5.0  # a held lock whose file was not touched for this long belongs to a stopped or hung tuner
POLL_S = (0.005, 0.1)  # first and longest wait between attempts to take a held lock


class LeaseResult(str, enum.Enum):
    HELD = "held"
    WAITED_OUT = "waited out"  # DIFFSYNTH_ATTENTION_TUNE_WAIT passed while another tuner held it
    STALE = "stale holder"  # the holder shows no heartbeat: stopped or hung
    UNAVAILABLE = "unavailable"  # no lock file could be taken (memory-only, untrusted or unusable folder)


class Lease:
    """The outcome of taking a key's lease; true when held."""

    def __init__(self, result: LeaseResult, reason: Optional[str] = None):
        self.result, self.reason = result, reason

    def __bool__(self) -> bool:
        return self.result is LeaseResult.HELD

    def __repr__(self) -> str:
        return f"Lease({self.result.value}{'' if self.reason is None else ': ' + self.reason})"


_held: "weakref.WeakSet" = weakref.WeakSet()  # every file lock held by this process


@process.after_fork
def _after_fork_in_child() -> None:
    for held in list(_held):
        held.forked()


class KeyLocks:
    """The in-process half: a lock per key (unlocked in a forked child: :mod:`diffsynth_attention.process`)."""

    def __init__(self):
        self._mutex = process.new_lock()
        self._locks: dict = {}

    def get(self, key_id: str) -> threading.Lock:
        with self._mutex:
            lock = self._locks.get(key_id)
            if lock is None:
                lock = self._locks[key_id] = process.new_lock()
            return lock


class HeldLock:
    """A held cross-process lock: an flock on a file whose mtime is the holder's heartbeat."""

    def __init__(self, fd: int, ldfd: int, name: str):
        self.fd, self.ldfd, self.name = fd, ldfd, name
        self._pid = os.getpid()
        _held.add(self)
        self._stop = threading.Event()
        self._beat()
        self._thread = threading.Thread(target=self._run, name=f"diffsynth-attention-heartbeat-{name}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        with contextlib.suppress(OSError, NotImplementedError, TypeError):
            os.utime(self.fd)

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self._beat()

    def forked(self) -> None:
        """In a forked child: this lock is the parent's. Close the child's copies (no unlink, no release)."""
        if self._pid != os.getpid() and self.fd is not None:
            for fd in (self.fd, self.ldfd):
                with contextlib.suppress(OSError):
                    os.close(fd)
            self.fd = self.ldfd = None

    def release(self) -> None:
        if self._pid != os.getpid():  # the parent's lock, seen in a forked child: not ours to release
            self.forked()
            return
        _held.discard(self)
        self._stop.set()
        self._thread.join()
        try:
            if fs.same_file(self.name, self.ldfd, self.fd):  # still ours (only holders unlink): remove it
                with contextlib.suppress(OSError):
                    os.unlink(self.name, dir_fd=self.ldfd)
        finally:
            os.close(self.fd)  # releases the flock
            os.close(self.ldfd)


def take_file_lock(open_locks: Callable[[], Optional[int]], name: str, deadline: float, warn) -> "HeldLock | Lease":
    """Take the flock on ``name`` in the folder ``open_locks()`` returns (a descriptor, or None:
    no folder). A HeldLock, or a Lease saying why not. ``warn(tag, message, *args)`` warns once."""
    if fs.fcntl is None:  # pragma: no cover - not POSIX
        return Lease(LeaseResult.UNAVAILABLE, "no flock on this platform")
    while True:
        ldfd = open_locks()
        if ldfd is None:
            return Lease(LeaseResult.UNAVAILABLE, "no lock folder")
        try:
            fd = os.open(name, fs.LOCK_FLAGS, 0o600, dir_fd=ldfd)
            why = fs.unsafe(os.fstat(fd), want_dir=False)
            if why:
                os.close(fd)
                raise fs.Refused(why, False)
        except (OSError, fs.Refused) as exc:
            os.close(ldfd)
            why = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
            warn("tune-lock", "diffsynth_attention: cannot take the tuning lock %s (%s); tuning without it", name, why)
            return Lease(LeaseResult.UNAVAILABLE, why)
        result = _wait_for(fd, ldfd, name, deadline, warn)
        if result is not None:
            return result


def _wait_for(fd: int, ldfd: int, name: str, deadline: float, warn):
    """Take the flock on ``fd``: a HeldLock, a Lease (gave up; fd closed), or None (the file was replaced: retry)."""
    pause = POLL_S[0]
    seen, since = None, time.monotonic()
    while True:
        try:
            fs.fcntl.flock(fd, fs.fcntl.LOCK_EX | fs.fcntl.LOCK_NB)
        except BlockingIOError:
            now = time.monotonic()
            with contextlib.suppress(OSError):
                beat = os.fstat(fd).st_mtime_ns
                if beat != seen:
                    seen, since = beat, now
            give_up = None
            if now - since > STALE_S:
                warn("tune-stale", "diffsynth_attention: the process tuning the same problem shows no sign "
                     "of life for %.0fs (stopped or hung); tuning here", STALE_S)
                give_up = Lease(LeaseResult.STALE)
            elif now >= deadline:
                warn("tune-wait", "diffsynth_attention: waited for another process tuning the same problem until "
                     "DIFFSYNTH_ATTENTION_TUNE_WAIT passed; tuning here")
                give_up = Lease(LeaseResult.WAITED_OUT)
            if give_up is not None:
                os.close(fd)
                os.close(ldfd)
                return give_up
            time.sleep(min(pause, max(deadline - now, 0.0)))
            pause = min(pause * 2, POLL_S[1])
            continue
        except OSError as exc:
            os.close(fd)
            os.close(ldfd)
            warn("tune-lock", "diffsynth_attention: cannot take the tuning lock %s (%s); tuning without it", name, exc.strerror or exc)
            return Lease(LeaseResult.UNAVAILABLE, str(exc.strerror or exc))
        if not fs.same_file(name, ldfd, fd):  # the previous holder removed it on release: open the new one
            os.close(fd)
            os.close(ldfd)
            return None
        return HeldLock(fd, ldfd, name)
