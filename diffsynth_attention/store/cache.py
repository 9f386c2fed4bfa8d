"""The on-disk decision cache: one JSON file per user, safe under concurrency and crashes.

- Location: ``platformdirs.user_cache_dir("diffsynth_attention")``, or
  ``DIFFSYNTH_ATTENTION_CACHE_DIR``. The folder is created 0700, files are written 0600.
- Loaded lazily, once per process; a hit is a dict lookup in memory (no file I/O). A miss
  re-reads the file, so a decision another process saved since is found before tuning.
- Saves read, merge and write under a ``filelock`` whose lock file sits beside the data file;
  the new content goes to a temporary file in the same folder, is fsynced, and replaces the
  old one with ``os.replace``: a process killed at any moment leaves the old or the new file.
- Bad files are normal: unparsable, truncated, of another schema version, with wrong field
  types or unknown backends -> one warning, the file is set aside (renamed ``*.bad-...``) and
  treated as empty; the next save writes a valid file.
- Untrusted places (owned by another user, writable by group or others, a symbolic link),
  read-only or full disks, and a lock that times out -> one warning, decisions stay in memory.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import stat
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

import filelock
import platformdirs

from .. import config
from .decision import Decision

logger = logging.getLogger("diffsynth_attention")

SCHEMA_VERSION = 1
FILE_NAME = "decisions.json"
_SCHEMA_FILE = Path(__file__).resolve().parent.parent / "data" / "decisions.schema.json"


class CacheFileError(ValueError):
    """A cache file that cannot be used, with the path and the reason."""

    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def cache_dir() -> Path:
    """The cache folder: DIFFSYNTH_ATTENTION_CACHE_DIR, else the per-user cache folder."""
    override = config.cache_dir_override()
    return Path(override).expanduser() if override else Path(platformdirs.user_cache_dir("diffsynth_attention"))


_validators: dict = {}
_valid_entries: set = set()  # canonical texts of entries already validated (saves re-validating)


def _schema_validator(part: str = "document"):
    """The schema's validator for the whole document, or for one entry (``part="entry"``)."""
    if part not in _validators:
        import jsonschema

        schema = json.loads(_SCHEMA_FILE.read_text())
        if part == "entry":
            schema = {"$schema": schema["$schema"], "$defs": schema["$defs"], "$ref": "#/$defs/entry"}
        _validators[part] = jsonschema.Draft202012Validator(schema)
    return _validators[part]


def _first_error(validator, instance, prefix: str = ""):
    errors = sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path))
    if not errors:
        return None
    err = errors[0]
    where = "/".join([prefix] * bool(prefix) + [str(p) for p in err.absolute_path]) or "(top)"
    return f"does not match the schema at {where}: {err.message}"


def parse_document(text: str, path="<data>") -> dict:
    """Parse and validate a cache document; return {key_id: Decision}. Raise CacheFileError."""
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise CacheFileError(path, f"not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise CacheFileError(path, "not a JSON object")
    version = doc.get("schema_version")
    if version != SCHEMA_VERSION:
        raise CacheFileError(path, f"schema_version {version!r}, this library reads {SCHEMA_VERSION}")
    entries = doc.get("entries")
    problem = _first_error(_schema_validator(), {**doc, "entries": {}} if isinstance(entries, dict) else doc)
    if problem is None:
        for key_id, entry in entries.items():
            canonical = key_id + json.dumps(entry, sort_keys=True)
            if canonical in _valid_entries:
                continue
            problem = _first_error(_schema_validator("entry"), entry, f"entries/{key_id}")
            if problem is not None:
                break
            _valid_entries.add(canonical)
    if problem is not None:
        raise CacheFileError(path, problem)
    return {key_id: Decision.from_dict(key_id, entry) for key_id, entry in doc["entries"].items()}


def render_document(entries: dict) -> str:
    doc = {"schema_version": SCHEMA_VERSION, "entries": {k: d.to_dict() for k, d in sorted(entries.items())}}
    return json.dumps(doc, indent=1, sort_keys=True) + "\n"


def _untrusted_reason(path: Path, is_dir: bool) -> Optional[str]:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode):
        return f"{path} is a symbolic link"
    if is_dir and not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a directory"
    getuid = getattr(os, "getuid", None)
    if getuid is not None and st.st_uid != getuid():
        return f"{path} is owned by uid {st.st_uid}, not by this user (uid {getuid()})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def _make_lock(path: str, timeout: float) -> filelock.FileLock:
    """A lock whose file is never deleted on release: deleting it lets a process that opened
    the old file and a process that creates a new one both "hold" the lock (filelock 4 deletes
    by default; 3.x never did)."""
    try:
        return filelock.FileLock(path, timeout=timeout, mode=0o600, preserve_lock_file=True)
    except TypeError:  # filelock < 4
        return filelock.FileLock(path, timeout=timeout, mode=0o600)


_DISK_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}


class DecisionCache:
    """Decisions in memory, backed by one JSON file. Thread-safe; one per process by default."""

    def flush(self, timeout: float = 60.0) -> bool:
        """Save decisions still pending (after a lock timeout), waiting up to ``timeout``; run at exit."""
        if not self._pending or not self._persistent:
            return not self._pending
        return self.save(timeout=max(timeout, config.lock_timeout()))

    def __init__(self, directory: Optional[os.PathLike] = None):
        self._directory = Path(directory) if directory is not None else None
        self._entries: dict = {}
        self._pending: dict = {}  # decisions not yet on disk (lock timeout, read-only disk)
        self._loaded = False
        self._loaded_from: Optional[Path] = None
        self._read_memo: tuple = (None, {})  # ((inode, mtime_ns, size), entries) of the last parse
        self._persistent = True
        self._warned: set = set()
        self._mutex = threading.RLock()
        self.listeners: list = []  # called with a key id (None: any key) when decisions change

    # -- places --------------------------------------------------------------------------
    @property
    def directory(self) -> Path:
        return self._directory if self._directory is not None else cache_dir()

    @property
    def path(self) -> Path:
        return self.directory / FILE_NAME

    @property
    def lock_path(self) -> Path:
        return self.directory / (FILE_NAME + ".lock")

    @property
    def persistent(self) -> bool:
        """False once the cache fell back to memory only (untrusted place, read-only disk)."""
        self._ensure_loaded()
        return self._persistent

    def _warn_once(self, tag: str, message: str, *args) -> None:
        if tag not in self._warned:
            self._warned.add(tag)
            logger.warning(message, *args)

    def _memory_only(self, tag: str, reason: str) -> None:
        self._persistent = False
        self._warn_once(tag, "diffsynth_attention cache: %s; decisions stay in memory for this process", reason)

    # -- loading -------------------------------------------------------------------------
    def _prepare_directory(self) -> bool:
        directory = self.directory
        reason = _untrusted_reason(directory, True)
        if reason:
            self._memory_only("untrusted", f"not trusted: {reason}")
            return False
        if not directory.exists():
            try:
                directory.mkdir(parents=True, mode=0o700, exist_ok=True)
                os.chmod(directory, 0o700)
            except OSError as exc:
                self._memory_only("disk", f"cannot create {directory} ({exc.strerror or exc})")
                return False
        reason = _untrusted_reason(self.path, False)
        if reason:
            self._memory_only("untrusted", f"not trusted: {reason}")
            return False
        return True

    def _ensure_loaded(self) -> None:
        if self._loaded:
            if self._loaded_from == self.directory:
                return
            self.forget_memory()  # DIFFSYNTH_ATTENTION_CACHE_DIR changed: another cache
        with self._mutex:
            if self._loaded:
                return
            self._loaded_from = self.directory
            if self._prepare_directory():
                self._entries.update(self._read_file(set_aside=True))
            self._loaded = True

    def _read_file(self, set_aside: bool, locked: bool = False) -> dict:
        """The file's decisions; {} for a missing file. A bad file is set aside if asked
        (``locked``: the caller already holds the file lock)."""
        path = self.path
        try:
            st = os.stat(path)
            memo = (st.st_ino, st.st_mtime_ns, st.st_size)
            # Outside the lock (a miss's refresh), a file unchanged since our last parse or write
            # is not parsed again. Under the lock (a save's merge) it is always read: inode numbers
            # are reused and mtime is coarse, and a stale merge would drop another writer's entries.
            if not locked and memo == self._read_memo[0]:
                return dict(self._read_memo[1])
            text = path.read_text()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            self._warn_once("read", "diffsynth_attention cache: cannot read %s (%s); treating it as empty", path, exc)
            return {}
        try:
            parsed = parse_document(text, path)
        except CacheFileError as exc:
            if set_aside:
                self._set_aside(exc, locked)
            return {}
        self._read_memo = (memo, dict(parsed))
        return parsed

    def _set_aside(self, exc: CacheFileError, locked: bool) -> None:
        aside = Path(f"{exc.path}.bad-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
        try:
            with contextlib.nullcontext() if locked else self._file_lock():
                # Only set aside what is still bad: another process may have replaced it.
                try:
                    parse_document(self.path.read_text(), self.path)
                    return
                except (CacheFileError, FileNotFoundError):
                    pass
                if self.path.exists():
                    os.replace(self.path, aside)
            self._warn_once("bad", "diffsynth_attention cache: ignored a bad cache file (%s); kept it as %s", exc.reason, aside)
        except (OSError, filelock.Timeout) as err:
            self._warn_once("bad", "diffsynth_attention cache: ignored a bad cache file (%s); could not set it aside (%s)", exc, err)

    @contextlib.contextmanager
    def _file_lock(self, timeout: Optional[float] = None):
        lock = _make_lock(str(self.lock_path), config.lock_timeout() if timeout is None else timeout)
        with lock:
            yield

    # -- reading -------------------------------------------------------------------------
    def get(self, key_id: str) -> Optional[Decision]:
        """The decision for ``key_id`` from memory (the file is read once, lazily)."""
        self._ensure_loaded()
        return self._entries.get(key_id)

    def refresh(self, key_id: str) -> Optional[Decision]:
        """Re-read the file (after a miss) and return the decision for ``key_id`` if now known."""
        self._ensure_loaded()
        if self._persistent:
            found = self._read_file(set_aside=True)
            with self._mutex:
                for k, d in found.items():
                    if k not in self._pending:
                        self._entries[k] = d
        return self._entries.get(key_id)

    def entries(self) -> dict:
        self._ensure_loaded()
        return dict(self._entries)

    # -- writing -------------------------------------------------------------------------
    def put(self, decision: Decision, save: bool = True) -> None:
        self._ensure_loaded()
        with self._mutex:
            self._entries[decision.key_id] = decision
            self._pending[decision.key_id] = decision
        self._changed([decision.key_id])
        if save:
            self.save()

    def put_many(self, decisions: Iterable[Decision], replace: bool = True) -> int:
        """Merge many decisions (import, sync); with ``replace=False`` known keys are kept."""
        self._ensure_loaded()
        changed = []
        with self._mutex:
            for d in decisions:
                if not replace and d.key_id in self._entries:
                    continue
                self._entries[d.key_id] = d
                self._pending[d.key_id] = d
                changed.append(d.key_id)
        count = len(changed)
        self._changed(changed)
        self.save()
        return count

    def save(self, timeout: Optional[float] = None) -> bool:
        """Write pending decisions to disk (merged with the file). False if they stay in memory."""
        self._ensure_loaded()
        if not self._persistent or not self._pending:
            return not self._pending
        with self._mutex:
            pending = dict(self._pending)
        timeout = config.lock_timeout() if timeout is None else timeout
        try:
            with self._file_lock(timeout):
                on_disk = self._read_file(set_aside=True, locked=True)
                merged = dict(on_disk)
                merged.update(pending)
                self._write(merged)
        except filelock.Timeout:
            self._warn_once("lock", "diffsynth_attention cache: timed out after %ss waiting for %s; "
                            "decisions stay in memory until a later save", timeout, self.lock_path)
            return False
        except OSError as exc:
            if exc.errno in _DISK_ERRNOS or isinstance(exc, PermissionError):
                self._memory_only("disk", f"cannot write {self.directory} ({exc.strerror or exc})")
                return False
            raise
        with self._mutex:
            for k, d in pending.items():
                if self._pending.get(k) is d:
                    del self._pending[k]
            for k, d in merged.items():
                self._entries.setdefault(k, d)
        return True

    def _write(self, entries: dict) -> None:
        directory = self.directory
        fd, tmp = tempfile.mkstemp(prefix=FILE_NAME + ".", suffix=".tmp", dir=directory)
        try:
            os.fchmod(fd, 0o600) if hasattr(os, "fchmod") else None
            with os.fdopen(fd, "w") as fh:
                fh.write(render_document(entries))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
            st = os.stat(self.path)
            self._read_memo = ((st.st_ino, st.st_mtime_ns, st.st_size), dict(entries))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        with contextlib.suppress(OSError, AttributeError):
            dfd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

    def clear(self, predicate: Optional[Callable] = None) -> int:
        """Remove decisions (all, or those for which ``predicate(decision)`` is true), under the lock."""
        self._ensure_loaded()
        removed = set()
        with self._mutex:
            for k, d in list(self._entries.items()):
                if predicate is None or predicate(d):
                    removed.add(k)
                    del self._entries[k]
                    self._pending.pop(k, None)
        if self._persistent:
            try:
                with self._file_lock():
                    on_disk = self._read_file(set_aside=True, locked=True)
                    kept = {}
                    for k, d in on_disk.items():
                        if predicate is None or predicate(d):
                            removed.add(k)
                        else:
                            kept[k] = d
                    if on_disk or predicate is None:
                        self._write(kept)
            except filelock.Timeout:
                self._changed()
                raise TimeoutError(f"timed out waiting for the cache lock {self.lock_path}") from None
            except OSError as exc:
                self._memory_only("disk", f"cannot write {self.directory} ({exc.strerror or exc})")
        self._changed()
        return len(removed)

    def forget_memory(self) -> None:
        """Drop the in-memory copy; the file is read again on next use (tests, cache-dir change)."""
        with self._mutex:
            self._entries.clear()
            self._pending.clear()
            self._loaded = False
            self._persistent = True
            self._warned.clear()
            self._read_memo = (None, {})
        self._changed()

    def _changed(self, key_ids=None) -> None:
        for fn in list(self.listeners):
            if key_ids is None:
                fn(None)
            else:
                for key_id in key_ids:
                    fn(key_id)

    # -- per-key tuning lock (one process tunes a key; the others wait, then read) --------
    @contextlib.contextmanager
    def tuning_lock(self, key_id: str):
        """Hold a per-key lock while tuning; yields True if held, False if waiting timed out
        or the cache is memory-only (then tune without it)."""
        self._ensure_loaded()
        if not self._persistent:
            yield False
            return
        lock_dir = self.directory / "locks"
        try:
            lock_dir.mkdir(mode=0o700, exist_ok=True)
            lock = _make_lock(str(lock_dir / f"{key_id}.lock"), config.tune_wait())
            lock.acquire()
        except filelock.Timeout:
            self._warn_once("tune-wait", "diffsynth_attention: waited %ss for another process tuning the same problem; tuning here", config.tune_wait())
            yield False
            return
        except OSError as exc:
            self._warn_once("tune-lock", "diffsynth_attention: cannot take the tuning lock in %s (%s)", lock_dir, exc)
            yield False
            return
        try:
            yield True
        finally:
            lock.release()
