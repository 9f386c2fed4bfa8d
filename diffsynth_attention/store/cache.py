"""The on-disk decision cache: one small JSON file per decision, safe under concurrency and crashes.

- Location: ``platformdirs.user_cache_dir("diffsynth_attention")``, or
  ``DIFFSYNTH_ATTENTION_CACHE_DIR``; decisions live in ``<cache>/v2/<key id>.json``
  (``cache_schema/`` documents the format). Folders are created 0700, files written 0600.
- Reads are per key and lazy: a hit is a dict lookup in memory (no file I/O); a miss opens the
  one file of that key, so a decision another process saved since is found before tuning.
- A write goes to a temporary file in the same folder, is fsynced and renamed over the entry
  with ``os.replace``: a process killed at any moment leaves the old or the new entry. There is
  no lock on the write path; writers of one key write the same kind of content, the last wins.
- Every file is opened relative to a verified folder descriptor, with ``O_NOFOLLOW |
  O_NONBLOCK``, and must be (checked with ``fstat`` on the opened descriptor, at every open) a
  regular file of at most 64 KiB, owned by this user, readable by it, writable by no one else.
- A bad entry (not UTF-8, not JSON, NaN, another schema version, failing the schema, an id that
  is not the hash of its key, over the size cap) is a miss for that key alone: one warning, the
  file is set aside as ``<key id>.json.bad-*`` (the last 5 are kept) and the next tuning writes
  a valid one. An entry that cannot be read (permissions, a FIFO, a directory, a symbolic link,
  another owner) is a miss too, and is never overwritten.
- An untrusted or unusable folder, or a disk that refuses a write -> one warning (with the count
  of decisions kept), decisions stay in memory; ``flush`` (run at exit) says how many are lost.
- Tuning a key is serialized per key: by a lock per key in the process and, across processes,
  by an ``flock`` on ``v2/locks/<key id>.lock`` whose holder touches the file every 0.5 s; a
  waiter that sees no touch for 5 s (a stopped or hung tuner) stops waiting and tunes itself.
  A holder removes its lock file on release, so lock files do not pile up.
- A v1 ``decisions.json`` is migrated once (entries that pass validation, never overwriting a
  v2 entry) and kept as ``decisions.json.v1-migrated``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import re
import secrets
import stat
import threading
import time
import weakref
from pathlib import Path
from typing import Callable, Iterable, Optional

import platformdirs

from .. import config
from .decision import ACCEPTED, CHOSEN, SLOWER, Decision, key_id as _hash_key

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

logger = logging.getLogger("diffsynth_attention")

SCHEMA_VERSION = 2
FOLDER = "v2"
LOCKS = "locks"
LEGACY_FILE = "decisions.json"  # schema version 1: one file of every decision
MIGRATED_SUFFIX = ".v1-migrated"
MAX_ENTRY_BYTES = 64 * 1024  # an entry file over this is rejected unread
MAX_DOCUMENT_BYTES = 64 * 1024 * 1024  # an export/import document
MAX_LEGACY_BYTES = 512 * 1024 * 1024  # a v1 file being migrated
BAD_KEPT = 5  # set-aside copies kept per folder
LEFTOVER_AGE_S = 3600.0  # orphan temporary files and abandoned lock files older than this are removed
HEARTBEAT_S = 0.5  # a tuning-lock holder touches its lock file this often
STALE_S = 5.0  # a held lock whose file was not touched for this long belongs to a stopped or hung tuner
_POLL_S = (0.005, 0.1)  # first and longest wait between attempts to take a held tuning lock
RETRY_S = (1.0, 60.0)  # after a failed write: first and longest wait before writing is tried again
_SCHEMA_FILE = Path(__file__).resolve().parent.parent / "data" / "decisions.schema.json"
_ID = re.compile(r"^[0-9a-f]{24}$")
_ENTRY_NAME = re.compile(r"^([0-9a-f]{24})\.json$")
_O = lambda name: getattr(os, name, 0)  # noqa: E731 - flags missing on some platforms are 0
_READ_FLAGS = os.O_RDONLY | _O("O_NOFOLLOW") | _O("O_NONBLOCK") | _O("O_CLOEXEC") | _O("O_NOCTTY")
_DIR_FLAGS = os.O_RDONLY | _O("O_DIRECTORY") | _O("O_NOFOLLOW") | _O("O_CLOEXEC")
_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O("O_NOFOLLOW") | _O("O_CLOEXEC")
_LOCK_FLAGS = os.O_RDWR | os.O_CREAT | _O("O_NOFOLLOW") | _O("O_NONBLOCK") | _O("O_CLOEXEC") | _O("O_NOCTTY")


class CacheFileError(ValueError):
    """A cache file (or document) that cannot be used, with the path and the reason."""

    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


class _Refused(Exception):
    """A file that exists but was not read. ``corrupt``: set it aside; else leave it alone."""

    def __init__(self, reason: str, corrupt: bool, st=None):
        super().__init__(reason)
        self.reason, self.corrupt, self.st = reason, corrupt, st


def cache_dir() -> Path:
    """The cache folder: DIFFSYNTH_ATTENTION_CACHE_DIR, else the per-user cache folder."""
    override = config.cache_dir_override()
    return Path(override).expanduser() if override else Path(platformdirs.user_cache_dir("diffsynth_attention"))


# -- validation ----------------------------------------------------------------------------
_validators: dict = {}
_valid_entries: dict = {}  # canonical text of an entry already validated -> True (bounded)
_VALID_MEMO_MAX = 4096


def _schema_validator(part: str = "entry"):
    """The schema's validator for one entry (``$defs/entry``)."""
    if part not in _validators:
        import jsonschema

        schema = json.loads(_SCHEMA_FILE.read_text())
        _validators[part] = jsonschema.Draft202012Validator(
            {"$schema": schema["$schema"], "$defs": schema["$defs"], "$ref": f"#/$defs/{part}"})
    return _validators[part]


def _refuse_constant(name):
    raise ValueError(f"{name} is not JSON")


def _loads(text, where, allow_nan: bool = False):
    try:
        return json.loads(text, parse_constant=(lambda _: None) if allow_nan else _refuse_constant)
    except (ValueError, RecursionError) as exc:
        raise CacheFileError(where, f"not valid JSON ({str(exc)[:200]})") from None


def _decode(data, where) -> str:
    if isinstance(data, str):
        return data
    try:
        return bytes(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CacheFileError(where, f"not UTF-8 ({exc.reason} at byte {exc.start})") from None


def _check_entry(kid, entry, where) -> Decision:
    """A validated entry as a Decision: the id is a key id and the hash of the entry's key."""
    if not isinstance(kid, str) or not _ID.match(kid):
        raise CacheFileError(where, f"{str(kid)[:40]!r} is not a key id (24 hex digits)")
    try:
        canonical = kid + json.dumps(entry, sort_keys=True, allow_nan=False)
    except (ValueError, TypeError, RecursionError) as exc:
        raise CacheFileError(where, f"entry {kid} is not JSON data ({exc})") from None
    if canonical not in _valid_entries:
        try:
            errors = sorted(_schema_validator().iter_errors(entry), key=lambda e: [str(p) for p in e.absolute_path])
        except RecursionError:
            raise CacheFileError(where, f"entry {kid} is nested too deeply") from None
        if errors:
            err = errors[0]
            at = "/".join([kid] + [str(p) for p in err.absolute_path])
            raise CacheFileError(where, f"does not match the schema at {at}: {err.message[:300]}")
        if _hash_key(entry["key"]) != kid:
            raise CacheFileError(where, f"entry {kid} is not the hash of its key ({_hash_key(entry['key'])})")
        if len(_valid_entries) >= _VALID_MEMO_MAX:
            _valid_entries.clear()
        _valid_entries[canonical] = True
    return Decision.from_dict(kid, entry)


def _finite(value):
    """``value`` with every NaN or infinity replaced by None (JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def all_rejected(decision: Decision) -> bool:
    """True if no candidate of ``decision`` passed the numeric gate: such a decision is never kept."""
    return not any(c.status in (CHOSEN, ACCEPTED, SLOWER) for c in decision.candidates.values())


def render_entry(decision: Decision) -> str:
    """The text of one entry file. Raise CacheFileError if the decision does not validate."""
    entry = _finite(decision.to_dict())
    _check_entry(decision.key_id, entry, f"decision {decision.key_id}")
    return json.dumps({"schema_version": SCHEMA_VERSION, "id": decision.key_id, "entry": entry},
                      indent=1, sort_keys=True, allow_nan=False) + "\n"


def parse_entry(data, kid: str, where="<entry>") -> Decision:
    """Parse and validate one entry file's bytes for key ``kid``. Raise CacheFileError."""
    doc = _loads(_decode(data, where), where)
    if not isinstance(doc, dict):
        raise CacheFileError(where, "not a JSON object")
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise CacheFileError(where, f"schema_version {str(doc.get('schema_version'))[:20]!r}, this library reads {SCHEMA_VERSION}")
    if set(doc) != {"schema_version", "id", "entry"}:
        raise CacheFileError(where, f"fields {sorted(map(str, doc))[:5]}, expected schema_version, id, entry")
    if doc["id"] != kid:
        raise CacheFileError(where, f"id {str(doc['id'])[:40]!r} does not match the file name {kid}")
    return _check_entry(kid, doc["entry"], where)


def parse_document(text, path="<data>") -> dict:
    """Parse and validate an export document (version 2, or a version-1 ``decisions.json``);
    return {key_id: Decision}. Raise CacheFileError on the first problem."""
    if len(text) > MAX_DOCUMENT_BYTES:
        raise CacheFileError(path, f"{len(text)} bytes, over the {MAX_DOCUMENT_BYTES}-byte cap")
    doc = _loads(_decode(text, path), path)
    if not isinstance(doc, dict):
        raise CacheFileError(path, "not a JSON object")
    version = doc.get("schema_version")
    if version not in (1, SCHEMA_VERSION) or isinstance(version, bool):
        raise CacheFileError(path, f"schema_version {str(version)[:20]!r}, this library reads 1 and {SCHEMA_VERSION}")
    if set(doc) != {"schema_version", "entries"} or not isinstance(doc["entries"], dict):
        raise CacheFileError(path, "expected exactly schema_version and an object of entries")
    return {kid: _check_entry(kid, entry, path) for kid, entry in doc["entries"].items()}


def render_document(entries: dict) -> str:
    """An export document of ``entries`` ({key_id: Decision}); decisions that do not validate are left out."""
    out = {}
    for kid, d in sorted(entries.items()):
        entry = _finite(d.to_dict())
        try:
            _check_entry(kid, entry, "export")
        except CacheFileError as exc:
            logger.warning("diffsynth_attention cache: left %s out of the export (%s)", kid, exc.reason)
            continue
        out[kid] = entry
    return json.dumps({"schema_version": SCHEMA_VERSION, "entries": out}, indent=1, sort_keys=True, allow_nan=False) + "\n"


# -- files -----------------------------------------------------------------------------------
def _uid():
    getuid = getattr(os, "getuid", None)
    return None if getuid is None else getuid()


def _unsafe(st, want_dir: bool) -> Optional[str]:
    """Why a file or folder (its ``fstat``) is not to be trusted, or None."""
    kind = stat.S_IFMT(st.st_mode)
    if want_dir and kind != stat.S_IFDIR:
        return "is not a directory"
    if not want_dir and kind != stat.S_IFREG:
        names = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO", stat.S_IFLNK: "a symbolic link",
                 stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device"}
        return f"is {names.get(kind, 'not a regular file')}, not a regular file"
    uid = _uid()
    if uid is not None and st.st_uid != uid:
        return f"is owned by uid {st.st_uid}, not by this user (uid {uid})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    need = stat.S_IRWXU if want_dir else stat.S_IRUSR
    if st.st_mode & need != need:
        return f"lacks owner permissions (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def _read_secure(dfd: int, name: str, cap: int):
    """(bytes, stat) of ``name`` in folder ``dfd``. FileNotFoundError if missing; _Refused if it
    is not a safe regular file, is over ``cap`` bytes (unread) or cannot be read."""
    try:
        fd = os.open(name, _READ_FLAGS, dir_fd=dfd)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _Refused("is a symbolic link", False) from None
        raise _Refused(f"cannot be opened ({exc.strerror or exc})", False) from None
    try:
        st = os.fstat(fd)
        why = _unsafe(st, want_dir=False)
        if why:
            raise _Refused(why, False, st)
        if st.st_size > cap:
            raise _Refused(f"is {st.st_size} bytes, over the {cap}-byte cap", True, st)
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, min(1 << 20, cap + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > cap:
                raise _Refused(f"grew over the {cap}-byte cap", True, st)
        return b"".join(chunks), st
    except OSError as exc:
        raise _Refused(f"cannot be read ({exc.strerror or exc})", False) from None
    finally:
        os.close(fd)


def _open_temp(name: str, dfd: int) -> int:
    return os.open(name, _TEMP_FLAGS, 0o600, dir_fd=dfd)


def _write_new(dfd: int, name: str, data: bytes, replace: bool = True, durable: bool = True) -> bool:
    """Write ``data`` as ``name`` in folder ``dfd``: temporary file, fsync (unless ``durable=False``:
    the caller syncs), then ``os.replace`` (or, with ``replace=False``, a link that never
    overwrites: False if ``name`` exists)."""
    tmp = f".tmp-{name}-{os.getpid()}-{secrets.token_hex(4)}"
    fd = _open_temp(tmp, dfd)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        if replace:
            os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
            return True
        try:
            os.link(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
            return True
        except FileExistsError:
            return False
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dfd)


def _fsync_dir(dfd: int) -> None:
    with contextlib.suppress(OSError):
        os.fsync(dfd)


def _open_subdir(dfd: int, name: str, create: bool) -> int:
    """A verified folder ``name`` inside ``dfd`` (created 0700 if asked). OSError or _Refused."""
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=dfd)
    except FileNotFoundError:
        if not create:
            raise
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o700, dir_fd=dfd)
        fd = os.open(name, _DIR_FLAGS, dir_fd=dfd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise _Refused(f"{name} is a symbolic link or not a directory", False) from None
        raise
    why = _unsafe(os.fstat(fd), want_dir=True)
    if why:
        os.close(fd)
        raise _Refused(f"{name} {why}", False)
    return fd


_caches: "weakref.WeakSet" = weakref.WeakSet()  # every DecisionCache of this process (the fork handler resets them)
_held: "weakref.WeakSet" = weakref.WeakSet()  # every tuning lock held by this process


def _after_fork_in_child() -> None:
    """In a forked child: the parent's threads are gone, so their per-key thread locks (and the
    mutex, had a thread held it) would never be released here. Start afresh; close the child's
    copies of the parent's held lock files, so that the parent's release frees them."""
    for held in list(_held):
        held.forked()
    for cache in list(_caches):
        cache._mutex = threading.RLock()
        cache._key_locks = {}


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _HeldLock:
    """A held per-key tuning lock: an flock on a file whose mtime is the holder's heartbeat."""

    def __init__(self, fd: int, ldfd: int, name: str):
        self.fd, self.ldfd, self.name = fd, ldfd, name
        self._pid = os.getpid()
        _held.add(self)
        self._stop = threading.Event()
        self._beat()
        self._thread = threading.Thread(target=self._run, name=f"diffsynth-attention-heartbeat-{name}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        with contextlib.suppress(OSError, NotImplementedError):
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
            with contextlib.suppress(OSError):  # still ours (only holders unlink): remove it; waiters reopen
                here = os.stat(self.name, dir_fd=self.ldfd, follow_symlinks=False)
                mine = os.fstat(self.fd)
                if (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino):
                    os.unlink(self.name, dir_fd=self.ldfd)
        finally:
            os.close(self.fd)  # releases the flock
            os.close(self.ldfd)


class DecisionCache:
    """Decisions in memory, backed by one file per decision. Thread-safe; one per process by default."""

    def __init__(self, directory: Optional[os.PathLike] = None):
        self._directory = Path(directory) if directory is not None else None
        self._entries: dict = {}
        self._pending: dict = {}  # decisions not on disk (a write failed, memory-only, or their file is blocked)
        self._blocked: dict = {}  # key id -> why: an entry file that exists but cannot be read (never overwritten)
        self._loaded = False
        self._loaded_from: Optional[Path] = None
        self._persistent = True  # False: the folder is not to be trusted, memory only for good
        self._write_error: Optional[str] = None  # why the last write failed (reads go on; writes are retried)
        self._retry_at = 0.0  # time.monotonic() before which a failed write is not tried again
        self._backoff = RETRY_S[0]
        self._warned: set = set()
        self._mutex = threading.RLock()
        self._key_locks: dict = {}  # key id -> threading.Lock: one tuner per key in this process
        self.listeners: list = []  # called with a key id (None: any key) when decisions change
        _caches.add(self)

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

    def _write_failed(self, reason: str) -> None:
        """A write failed: keep the pending decisions, go on reading, try writing again later."""
        with self._mutex:
            first = self._write_error is None
            self._write_error = reason
            if first:
                self._backoff = RETRY_S[0]
            else:
                self._backoff = min(self._backoff * 2, RETRY_S[1])
            self._retry_at = time.monotonic() + self._backoff
            pending = len(self._pending)
        if first:
            logger.warning("diffsynth_attention cache: %s; decisions stay in memory for now (%d not on disk); reads go on, "
                           "and writing is tried again (every %gs at most)", reason, pending, RETRY_S[1])

    def _write_worked(self, written: int) -> None:
        with self._mutex:
            was, self._write_error, self._backoff = self._write_error, None, RETRY_S[0]
        if was is not None:
            logger.warning("diffsynth_attention cache: writing to %s works again (it failed: %s); %d decision(s) written",
                           self.path, was, written)

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
        an untrusted one is never used); None if memory-only or (``create=False``) missing."""
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
                bfd = os.open(directory, _DIR_FLAGS)
                why = _unsafe(os.fstat(bfd), want_dir=True)
                if why:
                    raise _Refused(f"{directory} {why}", False)
                vfd = _open_subdir(bfd, FOLDER, create)
            except FileNotFoundError:
                if create:
                    raise
                vfd = None
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink(directory):
                    raise _Refused(f"{directory} is a symbolic link", False) from None
                raise
        except _Refused as exc:
            self._memory_only("untrusted", f"not trusted: {exc.reason}")
            vfd = None
        except OSError as exc:
            if create:  # a write: retried later; a read of a folder that cannot be opened is a miss
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
            self.forget_memory()  # DIFFSYNTH_ATTENTION_CACHE_DIR changed: another cache
        with self._mutex:
            if self._loaded:
                return
            self._loaded_from = self.directory
            with self._folder(create=True) as vfd:
                if vfd is not None:
                    self._migrate(vfd)
                    self._sweep(vfd)
            self._loaded = True

    def _migrate(self, vfd: int) -> None:
        """Move a v1 ``decisions.json`` into v2 entries once; keep it as ``*.v1-migrated``."""
        directory = self.directory
        try:
            bfd = os.open(directory, _DIR_FLAGS)
        except OSError:
            return
        try:
            try:
                data, st = _read_secure(bfd, LEGACY_FILE, MAX_LEGACY_BYTES)
            except FileNotFoundError:
                return
            except _Refused as exc:
                self._warn_once("v1", "diffsynth_attention cache: the version-1 file %s %s; not migrated", directory / LEGACY_FILE, exc.reason)
                return
            where = directory / LEGACY_FILE
            try:
                doc = _loads(_decode(data, where), where, allow_nan=True)
                if not isinstance(doc, dict) or doc.get("schema_version") != 1 or not isinstance(doc.get("entries"), dict):
                    raise CacheFileError(where, "not a version-1 cache file")
            except CacheFileError as exc:
                aside = f"{LEGACY_FILE}.bad-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
                with contextlib.suppress(OSError):
                    os.rename(LEGACY_FILE, aside, src_dir_fd=bfd, dst_dir_fd=bfd)
                self._warn_once("v1", "diffsynth_attention cache: a bad version-1 file (%s) was not migrated; kept it as %s", exc.reason, aside)
                return
            moved = skipped = 0
            for kid, entry in doc["entries"].items():
                try:
                    decision = _check_entry(kid, _finite(entry), where)
                    if _write_new(vfd, f"{kid}.json", render_entry(decision).encode(), replace=False, durable=False):
                        moved += 1
                except CacheFileError:
                    skipped += 1
                except OSError as exc:  # try again next time: nothing is renamed
                    self._warn_once("v1", "diffsynth_attention cache: migrating %s failed (%s); it stays in place", where, exc.strerror or exc)
                    return
            if moved:
                os.sync()  # once for every migrated entry, before the old file is renamed
            _fsync_dir(vfd)
            with contextlib.suppress(FileNotFoundError):
                os.rename(LEGACY_FILE, LEGACY_FILE + MIGRATED_SUFFIX, src_dir_fd=bfd, dst_dir_fd=bfd)
            for old in (LEGACY_FILE + ".lock",):
                with contextlib.suppress(OSError):
                    os.unlink(old, dir_fd=bfd)
            logger.info("diffsynth_attention cache: migrated %d decision(s) from %s", moved, where)
            if skipped:
                self._warn_once("v1-skipped", "diffsynth_attention cache: %d entr(y/ies) of %s failed validation and were not "
                                "migrated (the file is kept as %s)", skipped, where, LEGACY_FILE + MIGRATED_SUFFIX)
        finally:
            os.close(bfd)

    def _sweep(self, vfd: int) -> None:
        """Remove leftovers: temporary files and abandoned lock files older than an hour; trim set-aside copies."""
        now = time.time()
        with contextlib.suppress(OSError):
            for name in os.listdir(vfd):
                if name.startswith(".tmp-"):
                    with contextlib.suppress(OSError):
                        st = os.stat(name, dir_fd=vfd, follow_symlinks=False)
                        if stat.S_ISREG(st.st_mode) and now - st.st_mtime > LEFTOVER_AGE_S:
                            os.unlink(name, dir_fd=vfd)
        self._trim_bad(vfd)
        if fcntl is None:
            return
        try:
            ldfd = _open_subdir(vfd, LOCKS, create=False)
        except (OSError, _Refused):
            return
        try:
            for name in os.listdir(ldfd):
                with contextlib.suppress(OSError):
                    st = os.stat(name, dir_fd=ldfd, follow_symlinks=False)
                    if not stat.S_ISREG(st.st_mode) or now - st.st_mtime <= LEFTOVER_AGE_S:
                        continue
                    fd = os.open(name, _LOCK_FLAGS, 0o600, dir_fd=ldfd)
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        here, mine = os.stat(name, dir_fd=ldfd, follow_symlinks=False), os.fstat(fd)
                        if (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino):
                            os.unlink(name, dir_fd=ldfd)
                    finally:
                        os.close(fd)
        finally:
            os.close(ldfd)

    def _trim_bad(self, dfd: int) -> None:
        with contextlib.suppress(OSError):
            bad = []
            for name in os.listdir(dfd):
                if ".bad-" in name:
                    with contextlib.suppress(OSError):
                        bad.append((os.stat(name, dir_fd=dfd, follow_symlinks=False).st_mtime_ns, name))
            for _, name in sorted(bad)[:-BAD_KEPT] if len(bad) > BAD_KEPT else ():
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=dfd)

    # -- one entry -------------------------------------------------------------------------
    def _read_entry(self, vfd: int, kid: str) -> Optional[Decision]:
        """The decision in ``kid``'s file, or None: missing, bad (set aside) or unreadable (blocked)."""
        name = f"{kid}.json"
        try:
            data, st = _read_secure(vfd, name, MAX_ENTRY_BYTES)
        except FileNotFoundError:
            self._blocked.pop(kid, None)
            return None
        except _Refused as exc:
            if exc.corrupt:
                self._set_aside(vfd, name, kid, exc.reason, exc.st)
            else:
                self._blocked[kid] = exc.reason
                self._warn_once(("unreadable", kid), "diffsynth_attention cache: the entry %s %s; it is a miss, "
                                "and is never overwritten", self.path / name, exc.reason)
            return None
        self._blocked.pop(kid, None)
        try:
            return parse_entry(data, kid, self.path / name)
        except CacheFileError as exc:
            reason = exc.reason
        except Exception as exc:  # a validator bug must not break a call: a miss like any bad entry
            reason = f"{type(exc).__name__}: {str(exc)[:200]}"
        self._set_aside(vfd, name, kid, reason, st)
        return None

    def _set_aside(self, vfd: int, name: str, kid: str, reason: str, st) -> None:
        aside = f"{name}.bad-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{secrets.token_hex(2)}"
        try:
            os.rename(name, aside, src_dir_fd=vfd, dst_dir_fd=vfd)
        except FileNotFoundError:
            return
        except OSError as err:
            self._warn_once(("bad", kid), "diffsynth_attention cache: ignored a bad cache entry %s (%s); could not set it aside (%s)",
                            self.path / name, reason, err.strerror or err)
            return
        with contextlib.suppress(OSError):
            moved = os.stat(aside, dir_fd=vfd, follow_symlinks=False)
            if st is not None and (moved.st_dev, moved.st_ino) != (st.st_dev, st.st_ino):
                # another process replaced the bad entry meanwhile: put its entry back (never over a newer one)
                os.link(aside, name, src_dir_fd=vfd, dst_dir_fd=vfd)
                os.unlink(aside, dir_fd=vfd)
                return
        self._warn_once(("bad", kid), "diffsynth_attention cache: ignored a bad cache entry (%s: %s); kept it as %s",
                        name, reason, self.path / aside)
        self._trim_bad(vfd)

    # -- reading -------------------------------------------------------------------------
    def get(self, key_id: str, tolerance: Optional[float] = None) -> Optional[Decision]:
        """The decision for ``key_id``: from memory, else (a miss) from its one file. A decision
        whose chosen backend's error does not pass ``tolerance`` (default: the tolerance in force,
        ``DIFFSYNTH_ATTENTION_TOLERANCE``) is a miss: the key is gated again."""
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
            if found is not None:
                with self._mutex:
                    if key_id not in self._pending:
                        self._entries[key_id] = found
        return self._entries.get(key_id)

    def _trusted(self, decision: Optional[Decision], tolerance: Optional[float]) -> Optional[Decision]:
        if decision is None:
            return None
        tol = config.tolerance() if tolerance is None else tolerance
        if decision.trusted_under(tol):
            return decision
        chosen = decision.candidates.get(decision.backend)
        logger.info("diffsynth_attention cache: the decision for %s (%s, error %s, tuned with tolerance %g) does not pass "
                    "the tolerance in force (%g): a miss, the key is gated again", decision.key_id, decision.backend,
                    None if chosen is None else chosen.error, decision.tolerance, tol)
        return None

    def entries(self) -> dict:
        """Every decision: those in memory and every valid entry on disk."""
        self._ensure_loaded()
        if self._persistent:
            with self._folder(create=False) as vfd:
                if vfd is not None:
                    try:
                        names = os.listdir(vfd)
                    except OSError:
                        names = []
                    for name in names:
                        m = _ENTRY_NAME.match(name)
                        if m and m.group(1) not in self._entries:
                            found = self._read_entry(vfd, m.group(1))
                            if found is not None:
                                with self._mutex:
                                    self._entries.setdefault(m.group(1), found)
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
        for d in decisions:
            if not replace and self.get(d.key_id) is not None:
                continue
            with self._mutex:
                self._entries[d.key_id] = d
                self._pending[d.key_id] = d
            changed.append(d.key_id)
        self._changed(changed)
        self.save()
        return len(changed)

    def save(self, timeout: Optional[float] = None, force: bool = False) -> bool:
        """Write pending decisions, one file each. False if some stay in memory (said once, with the count).
        After a failed write, writing is tried again only after a backoff (``force``: now).
        ``timeout`` is accepted for compatibility: writes take no lock."""
        self._ensure_loaded()
        with self._mutex:
            pending = dict(self._pending)
        if not pending:
            return True
        if not self._persistent:
            return False
        if self._write_error is not None and not force and time.monotonic() < self._retry_at:
            return False
        written, failure = [], None
        with self._folder(create=True) as vfd:
            if vfd is None:
                return False
            for kid, d in pending.items():
                if kid in self._blocked:
                    self._warn_once(("blocked", kid), "diffsynth_attention cache: the entry %s.json %s; it is not "
                                    "overwritten, and its decision stays in memory", self.path / kid, self._blocked[kid])
                    continue
                try:
                    try:  # never overwrite something that is not one of our readable entry files
                        here = os.stat(f"{kid}.json", dir_fd=vfd, follow_symlinks=False)
                        why = _unsafe(here, want_dir=False)
                        if why:
                            self._blocked[kid] = why
                            continue
                    except FileNotFoundError:
                        pass
                    data = render_entry(d).encode()
                    _write_new(vfd, f"{kid}.json", data)
                    written.append((kid, d))
                except CacheFileError as exc:
                    with self._mutex:
                        if self._pending.get(kid) is d:
                            del self._pending[kid]
                    self._warn_once(("invalid", kid), "diffsynth_attention cache: the decision for %s is not saved: %s",
                                    kid, exc.reason)
                except OSError as exc:
                    failure = exc
                    break
            if written:
                _fsync_dir(vfd)
        with self._mutex:
            for kid, d in written:
                if self._pending.get(kid) is d:
                    del self._pending[kid]
        if failure is not None:
            self._write_failed(f"cannot write {self.path} ({failure.strerror or failure})")
            return False
        if vfd is None:
            return False
        self._write_worked(len(written))
        return not any(k in self._pending for k in pending)

    def flush(self, timeout: float = 60.0) -> bool:
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

    def clear(self, predicate: Optional[Callable] = None) -> int:
        """Remove decisions (all, or those for which ``predicate(decision)`` is true) from memory and disk."""
        self._ensure_loaded()
        removed = set()
        with self._mutex:
            for k, d in list(self._entries.items()):
                if predicate is None or predicate(d):
                    removed.add(k)
                    del self._entries[k]
                    self._pending.pop(k, None)
        if self._persistent:
            with self._folder(create=False) as vfd:
                if vfd is not None:
                    try:
                        names = os.listdir(vfd)
                    except OSError as exc:
                        self._write_failed(f"cannot list {self.path} ({exc.strerror or exc})")
                        names = []
                    for name in names:
                        m = _ENTRY_NAME.match(name)
                        if not m:
                            continue
                        if predicate is not None:
                            d = self._read_entry(vfd, m.group(1))
                            if d is None or not predicate(d):
                                continue
                        try:
                            os.unlink(name, dir_fd=vfd)
                            removed.add(m.group(1))
                        except OSError:
                            continue
                    _fsync_dir(vfd)
        self._changed()
        return len(removed)

    def forget_memory(self) -> None:
        """Drop the in-memory copy; files are read again on next use (tests, cache-dir change)."""
        with self._mutex:
            self._entries.clear()
            self._pending.clear()
            self._blocked.clear()
            self._loaded = False
            self._persistent = True
            self._write_error, self._retry_at, self._backoff = None, 0.0, RETRY_S[0]
            self._warned.clear()
        self._changed()

    def _changed(self, key_ids=None) -> None:
        for fn in list(self.listeners):
            if key_ids is None:
                fn(None)
            else:
                for key_id in key_ids:
                    fn(key_id)

    # -- per-key tuning lock (one tuner per key; the others wait, then read) --------------
    def _thread_lock(self, key_id: str) -> threading.Lock:
        with self._mutex:
            lock = self._key_locks.get(key_id)
            if lock is None:
                lock = self._key_locks[key_id] = threading.Lock()
            return lock

    @contextlib.contextmanager
    def tuning_lock(self, key_id: str):
        """Hold the lock of ``key_id`` while tuning it. Yields True if held; False if waiting timed
        out, the holder is stopped or hung, or no lock file could be taken (then tune without it)."""
        self._ensure_loaded()
        wait = config.tune_wait()
        deadline = time.monotonic() + wait
        tlock = self._thread_lock(key_id)
        if not tlock.acquire(timeout=wait):
            self._warn_once("tune-wait", "diffsynth_attention: waited %ss for another thread tuning the same problem; tuning here", wait)
            yield False
            return
        try:
            if not self._persistent:
                yield True
                return
            held = self._take_file_lock(key_id, deadline, wait)
            try:
                yield held is not None
            finally:
                if held is not None:
                    held.release()
        finally:
            tlock.release()

    def _take_file_lock(self, key_id: str, deadline: float, wait: float) -> Optional[_HeldLock]:
        if fcntl is None or not _ID.match(key_id):  # pragma: no cover - not POSIX
            return None
        name = f"{key_id}.lock"
        while True:
            with self._folder(create=True) as vfd:
                if vfd is None:
                    return None
                try:
                    ldfd = _open_subdir(vfd, LOCKS, create=True)
                except (OSError, _Refused) as exc:
                    self._warn_once("tune-locks", "diffsynth_attention: cannot use the tuning locks in %s (%s); tuning without a lock",
                                    self.lock_path, getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc)
                    return None
            try:
                fd = os.open(name, _LOCK_FLAGS, 0o600, dir_fd=ldfd)
                why = _unsafe(os.fstat(fd), want_dir=False)
                if why:
                    os.close(fd)
                    raise _Refused(why, False)
            except (OSError, _Refused) as exc:
                os.close(ldfd)
                self._warn_once("tune-lock", "diffsynth_attention: cannot take the tuning lock %s (%s); tuning without it",
                                self.lock_path / name, getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc)
                return None
            result = self._wait_for(fd, ldfd, name, deadline, wait)
            if result == "retry":
                continue
            return result

    def _wait_for(self, fd: int, ldfd: int, name: str, deadline: float, wait: float):
        """Take the flock on ``fd``: a _HeldLock, None (gave up; fd closed), or "retry" (the file was replaced)."""
        pause = _POLL_S[0]
        seen, since = None, time.monotonic()
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                now = time.monotonic()
                with contextlib.suppress(OSError):
                    beat = os.fstat(fd).st_mtime_ns
                    if beat != seen:
                        seen, since = beat, now
                if now - since > STALE_S:
                    os.close(fd)
                    os.close(ldfd)
                    self._warn_once("tune-stale", "diffsynth_attention: the process tuning the same problem shows no sign "
                                    "of life for %.0fs (stopped or hung); tuning here", STALE_S)
                    return None
                if now >= deadline:
                    os.close(fd)
                    os.close(ldfd)
                    self._warn_once("tune-wait", "diffsynth_attention: waited %ss for another process tuning the same problem; tuning here", wait)
                    return None
                time.sleep(min(pause, max(deadline - now, 0.0)))
                pause = min(pause * 2, _POLL_S[1])
                continue
            except OSError as exc:
                os.close(fd)
                os.close(ldfd)
                self._warn_once("tune-lock", "diffsynth_attention: cannot take the tuning lock %s (%s); tuning without it",
                                self.lock_path / name, exc.strerror or exc)
                return None
            try:  # the previous holder removes the file on release: make sure ours is still the one in place
                here, mine = os.stat(name, dir_fd=ldfd, follow_symlinks=False), os.fstat(fd)
                current = (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino)
            except OSError:
                current = False
            if not current:
                os.close(fd)
                os.close(ldfd)
                return "retry"
            return _HeldLock(fd, ldfd, name)
