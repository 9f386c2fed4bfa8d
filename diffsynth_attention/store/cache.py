"""The on-disk decision cache: the in-memory map over one small JSON file per decision.

- Location (:mod:`.paths`): ``platformdirs.user_cache_dir("diffsynth_attention")``, or
  ``DIFFSYNTH_ATTENTION_CACHE_DIR``; decisions live in ``<cache>/v2/<key id>.json``
  (``cache_schema/`` documents the format, :mod:`.codec` reads and writes it). Folders are
  created 0700 by the first write (reading creates nothing), files written 0600, every file opened securely (:mod:`.fs`).
- Reads are per key and lazy: a hit is a dict lookup in memory (no file I/O); a miss opens the
  one file of that key, so a decision another process saved since is found before tuning. A
  decision whose chosen backend's error does not pass the tolerance in force is a miss.
- A write goes to a temporary file, is fsynced and renamed over the entry: a process killed at
  any moment leaves the old or the new entry. No lock on the write path; the last writer wins.
- A bad entry is a miss for that key alone: at a call, one warning and the file is set aside as
  ``<key id>.json.bad-*`` (the last 5 kept); a whole-cache read (``entries``, ``show``,
  ``export``) changes nothing and says once how many were ignored. An unreadable entry (FIFO,
  directory, link, another owner) is a miss too, and is never overwritten.
- An untrusted folder -> memory only for good (one warning). A write that fails (read-only,
  full, EFBIG, a temporary file removed) -> one warning; reads go on, decisions wait in memory
  and writing is tried again on a timer (0.25 s doubling to 1 s, reset by a write that works;
  at exit at once: every cache flushes); one warning when it works again. Many pending decisions
  go into one journal file first (:mod:`.journal`), replayed by the next process if this one is
  killed before their entry files are written. ``flush`` says how many are lost (:mod:`.writes`).
- Tuning is serialized per key by a lease (:mod:`.lock`); :meth:`DecisionCache.get_or_tune`.
- A v1 ``decisions.json`` is migrated in the background (:mod:`.migrate`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import weakref
from pathlib import Path
from typing import Iterable, Optional

from .. import config, process
from ..tolerance import for_key
from . import codec, fs, journal, lock, migrate
from .codec import (  # noqa: F401 - the store's public names, kept importable from here
    MAX_DOCUMENT_BYTES, MAX_ENTRY_BYTES, MAX_LEGACY_BYTES, SCHEMA_VERSION, CacheFileError, all_rejected, parse_document,
    parse_entry, render_document, render_entry)
from .bulk import WholeCache
from .decision import Decision
from .leases import Leases
from .writes import Writes
from .fs import BAD_KEPT, LEFTOVER_AGE_S  # noqa: F401
from .neighbours import group_of
from .paths import FOLDER, LEGACY_FILE, LOCKS, MIGRATED_SUFFIX, cache_dir  # noqa: F401

logger = logging.getLogger("diffsynth_attention")

_ID = codec.ID


_caches: "weakref.WeakSet" = weakref.WeakSet()
_handovers: list = []  # caches of a former folder still holding decisions they could not write: kept alive for their retries


@process.after_fork
def _after_fork_in_child() -> None:  # the parent's timer thread is not in the child: the next failure schedules one
    for cache in list(_caches):
        cache._timer = None
        for fd in cache._journals.values():  # the parent's journals: it writes them out (their lock stays its own)
            with contextlib.suppress(OSError):
                os.close(fd)
        cache._journals, cache._journaled = {}, {}


def untrusted_fix(exc: "fs.Refused", directory: Path) -> str:
    """What to do about an untrusted cache folder: ``chmod 700`` it where only its mode is wrong,
    else (or as well) name another folder."""
    other = f"or set {config.CACHE_DIR} to a folder of your own"
    if not exc.mode_only:
        return f"fix: set {config.CACHE_DIR} to a folder of your own, mode 700"
    path = directory if exc.reason.startswith(str(directory)) else directory / FOLDER
    return f"fix: chmod 700 {path}, {other}"


class DecisionCache(WholeCache, Leases, Writes):
    """Decisions in memory, backed by one file per decision. Thread-safe; one per process by default."""

    def __init__(self, directory: Optional[os.PathLike] = None):
        self._directory = Path(directory) if directory is not None else None
        self._mutex = process.new_rlock()
        self._locks = lock.KeyLocks()
        _caches.add(self)
        self._writes_init()
        self.listeners: list = []  # called with a key id (None: any key) when decisions change
        self._reset_state()

    def _reset_state(self) -> None:
        self._entries: dict = {}
        self._pending: dict = {}  # decisions not on disk (a write failed, memory-only, or their file is blocked)
        self._blocked: dict = {}  # key id -> why: an entry file that exists but cannot be read (never overwritten)
        self._groups: dict = {}  # neighbour group -> {key id: decision}: the neighbour index
        self._indexed: set = set()  # key ids the neighbour index has seen on disk
        self._ungrouped: list = []  # decisions remembered but not yet in the neighbour index
        self._loaded = False
        self._loaded_from: Optional[Path] = None
        self._persistent = True  # False: the folder is not to be trusted, memory only for good
        self._reset_writes()
        self._migration: Optional[migrate.Migration] = None
        self._warned: set = set()

    # -- places --------------------------------------------------------------------------
    @property
    def directory(self) -> Path:
        return self._directory if self._directory is not None else cache_dir()

    @property
    def path(self) -> Path:
        """The folder of entry files (``<cache>/v2``)."""
        return self.directory / FOLDER

    @property
    def lock_path(self) -> Path:
        """The folder of per-key tuning locks."""
        return self.path / LOCKS

    @property
    def persistent(self) -> bool:
        """False while decisions are kept in memory only: an untrusted place (for good), or while
        writing fails (unusable, read-only or full disk; retried with a backoff)."""
        self._ensure_loaded()
        return self._persistent and self._write_error is None

    def writable(self) -> bool:
        """Whether decisions can be written now: creates the cache folder if missing (``warm``'s
        preflight: it is about to write). Loading and reading never create it."""
        self._ensure_loaded()
        with self._folder(create=True) as vfd:
            ok = vfd is not None
        return ok and self.persistent

    def _warn_once(self, tag, message: str, *args) -> None:
        with self._mutex:
            if tag in self._warned:
                return
            self._warned.add(tag)
        logger.warning(message, *args)

    def _memory_only(self, tag: str, reason: str) -> None:
        self._persistent = False
        self._warn_once(tag, "diffsynth_attention cache: %s; decisions stay in memory for this process (%d not on disk now)",
                        reason, len(self._pending))

    @contextlib.contextmanager
    def _folder(self, create: bool):
        """The verified ``v2`` folder as a descriptor (checked at every use: a folder swapped for
        an untrusted one is never used); None if memory-only, unusable or (``create=False``) missing."""
        if not self._persistent:
            yield None
            return
        directory = self.directory
        bfd = vfd = None
        try:
            try:
                if create:
                    with contextlib.suppress(FileExistsError):
                        if not os.path.lexists(directory):
                            directory.mkdir(parents=True, mode=0o700)
                bfd = fs.open_dir(directory)
                vfd = fs.open_subdir(bfd, FOLDER, create)
            except FileNotFoundError:
                if create:
                    raise
                vfd = None
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink(directory):
                    raise fs.Refused(f"{directory} is a symbolic link", False) from None
                raise
        except fs.Refused as exc:
            if exc.access:  # its owner's own mode bits (a chmod u-w that may be undone): tried again, as EACCES
                if create:
                    self._write_failed(f"cannot use {directory}: {exc.reason} ({untrusted_fix(exc, directory)})")
            else:
                self._memory_only("untrusted", f"not trusted: {exc.reason} ({untrusted_fix(exc, directory)})")
            vfd = None
        except OSError as exc:
            if create:  # a write: tried again later; a folder that cannot be opened for a read is a miss
                self._write_failed(f"cannot use {directory} ({exc.strerror or exc})")
            vfd = None
        finally:
            if bfd is not None:
                os.close(bfd)
        try:
            yield vfd
        finally:
            if vfd is not None:
                os.close(vfd)

    # -- loading -------------------------------------------------------------------------
    def _ensure_loaded(self) -> None:
        if self._loaded:
            if self._loaded_from == self.directory:
                return
            self._hand_over_pending()  # DIFFSYNTH_ATTENTION_CACHE_DIR changed: another cache
            self.forget_memory()
        with self._mutex:
            if self._loaded:
                return
            self._loaded_from = self.directory
            with self._folder(create=False) as vfd:  # reading creates nothing: the first write makes the folder
                if vfd is not None and journal.names(fs.sweep(vfd, LOCKS)):
                    self._replay_due = True  # a process ended before writing out its journal: the timer does
            if self._persistent and migrate.legacy_present(self.directory):
                self._migration = migrate.Migration(self.directory, self._open_for_migration, self._warn_once)
                self._migration.start()
            self._loaded = True
            if self._replay_due:
                self._schedule_retry(0)

    def _open_for_migration(self) -> Optional[int]:
        with self._folder(create=True) as vfd:
            return None if vfd is None else os.dup(vfd)

    # -- one entry -------------------------------------------------------------------------
    def _read_entry(self, vfd: int, kid: str, repair: bool = True, bad: Optional[list] = None) -> Optional[Decision]:
        """The decision in ``kid``'s file, or None: missing, bad or unreadable. ``repair``: set a bad
        file aside and warn (a call); else add ``(kid, reason)`` to ``bad`` and change nothing."""
        name = f"{kid}.json"
        try:
            data, st = fs.read_secure(vfd, name, MAX_ENTRY_BYTES)
        except FileNotFoundError:
            self._blocked.pop(kid, None)
            return None
        except fs.Refused as exc:
            if exc.corrupt and repair:
                self._set_aside(vfd, name, kid, exc.reason, exc.st)
            elif exc.corrupt:
                bad.append((kid, exc.reason))
            else:
                self._blocked[kid] = exc.reason
                if repair:
                    self._warn_once(("unreadable", kid), "diffsynth_attention cache: the entry %s %s; it is a miss, "
                                    "and is never overwritten", self.path / name, exc.reason)
                else:
                    bad.append((kid, exc.reason))
            return None
        self._blocked.pop(kid, None)
        try:
            return codec.parse_entry(data, kid, name)  # (the folder is named where it is reported)
        except CacheFileError as exc:
            reason = exc.reason
        except Exception as exc:  # a validator bug must not break a call: a miss like any bad entry
            reason = f"{type(exc).__name__}: {str(exc)[:200]}"
        if repair:
            self._set_aside(vfd, name, kid, reason, st)
        else:
            bad.append((kid, reason))
        return None

    def _set_aside(self, vfd: int, name: str, kid: str, reason: str, st) -> None:
        try:
            aside = fs.set_aside(vfd, name, st)
        except OSError as err:
            self._warn_once(("bad", kid), "diffsynth_attention cache: ignored a bad cache entry %s (%s); could not set it aside (%s)",
                            self.path / name, reason, err.strerror or err)
            return
        if aside is None:
            return
        self._warn_once(("bad", kid), "diffsynth_attention cache: ignored a bad cache entry (%s: %s); kept it as %s",
                        name, reason, self.path / aside)
        fs.trim_bad(vfd)

    # -- reading -------------------------------------------------------------------------
    def get(self, key_id: str, tolerance: Optional[float] = None) -> Optional[Decision]:
        """The decision for ``key_id``: from memory, else (a miss) from its one file (or, during a
        migration, the old file). A decision whose chosen backend's error does not pass
        ``tolerance`` (default: :func:`diffsynth_attention.tolerance.for_key` of its own key, the
        rule the tuner gated it by) is a miss."""
        self._ensure_loaded()
        decision = self._entries.get(key_id)
        if decision is None and self._persistent:
            decision = self._reread(key_id)
        return self._trusted(decision, tolerance)

    def refresh(self, key_id: str, tolerance: Optional[float] = None) -> Optional[Decision]:
        """Read ``key_id``'s file again (after a miss) and return its decision if now known (and
        trusted under ``tolerance``, as in :meth:`get`)."""
        self._ensure_loaded()
        return self._trusted(self._reread(key_id), tolerance)

    def _reread(self, key_id: str) -> Optional[Decision]:
        if self._persistent and isinstance(key_id, str) and _ID.match(key_id):
            with self._folder(create=False) as vfd:
                found = self._read_entry(vfd, key_id) if vfd is not None else None
            if found is None and self._migration is not None:
                found = self._migration.lookup(key_id)
            if found is not None:
                self._remember(found)
        return self._entries.get(key_id)

    def _remember(self, decision: Decision) -> None:
        with self._mutex:
            self._indexed.add(decision.key_id)
            if decision.key_id not in self._pending:
                self._entries[decision.key_id] = decision
            self._ungrouped.append(decision)  # grouped when a neighbour is first looked for

    def _group_new(self) -> None:
        """Put the decisions remembered since into the neighbour index (a hash of each key, once)."""
        with self._mutex:
            todo, self._ungrouped = self._ungrouped, []
            for decision in todo:
                group = group_of(decision)
                if group is not None:
                    self._groups.setdefault(group, {})[decision.key_id] = decision

    def _trusted(self, decision: Optional[Decision], tolerance: Optional[float]) -> Optional[Decision]:
        if decision is None:
            return None
        tol = for_key(decision.key) if tolerance is None else tolerance  # the one rule, from the decision's own key
        if tol is not None and decision.trusted_under(tol):
            return decision
        chosen = decision.candidates.get(decision.backend)
        logger.info("diffsynth_attention cache: the decision for %s (%s, error %s, tuned with tolerance %g) does not pass "
                    "the tolerance in force (%g): a miss, the key is gated again", decision.key_id, decision.backend,
                    None if chosen is None else chosen.error, decision.tolerance, tol)
        return None

    # -- writing -------------------------------------------------------------------------
    def put(self, decision: Decision, save: bool = True) -> None:
        self._ensure_loaded()
        with self._mutex:
            self._pending[decision.key_id] = decision
            self._entries[decision.key_id] = decision
            self._remember(decision)
        self._prerender(decision)
        self._changed([decision.key_id])
        if save:
            self.save()

    def put_many(self, decisions: Iterable[Decision], replace: bool = True) -> int:
        """Merge many decisions (import, sync); with ``replace=False`` known keys are kept."""
        self._ensure_loaded()
        changed = []
        for d in decisions:
            if not replace and self.get(d.key_id, tolerance=float("inf")) is not None:
                continue
            with self._mutex:
                self._pending[d.key_id] = d
                self._entries[d.key_id] = d
                self._remember(d)
            self._prerender(d)
            changed.append(d.key_id)
        self._changed(changed)
        self.save()
        return len(changed)

    def _hand_over_pending(self) -> None:
        """Decisions not yet written to the folder this cache read before
        ``DIFFSYNTH_ATTENTION_CACHE_DIR`` changed: handed to a cache of that folder, which writes
        them there now (its retry timer and exit flush if the disk fails), not dropped."""
        with self._mutex:
            old = self._loaded_from
            if old is None or not self._persistent or not self._pending:
                return
            pending = list(self._pending.values())
            self._pending.clear()
        other = type(self)(old)
        other.put_many(pending)  # saves them
        if not other.save(force=True):  # a save the put's found under way, or a failing disk
            _handovers.append(other)

    def forget_memory(self) -> None:
        """Drop the in-memory copy; files are read again on next use (tests, cache-dir change).
        Decisions not yet on disk are written first, waiting for a save under way elsewhere (whose
        lock a call's own save does not wait for), where the folder is still the one they belong
        to; any that stay unwritten (a failing disk, another folder now) are named in a warning."""
        if self._loaded and self._pending and self._persistent and self._loaded_from == self.directory:
            self.save(force=True)
        with self._mutex:
            lost = len(self._pending) if self._persistent else 0  # a memory-only cache keeps nothing by design
            self._reset_state()
        if lost:
            logger.warning("%d decision(s) not written to the cache were dropped from memory", lost)
        self._changed()

    def _changed(self, key_ids=None) -> None:
        for fn in list(self.listeners):
            if key_ids is None:
                fn(None)
            else:
                for key_id in key_ids:
                    fn(key_id)
