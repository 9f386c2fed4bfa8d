"""Secure file access for the store: verified folder descriptors, capped reads that never follow
a link or block on a FIFO, atomic writes, and sweeping of leftovers. No JSON, no decisions.

Every file is opened relative to a verified folder descriptor, with ``O_NOFOLLOW | O_NONBLOCK``,
and must be (checked with ``fstat`` on the opened descriptor) a regular file of at most the
caller's cap, owned by this user, readable by it and writable by no one else.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import stat
import time
from typing import Optional

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

BAD_KEPT = 5  # set-aside copies kept per folder
LEFTOVER_AGE_S = 3600.0  # orphan temporary files and abandoned lock files older than this are removed
ENTRY_NAME = re.compile(r"^([0-9a-f]{24})\.json$")
_O = lambda name: getattr(os, name, 0)  # noqa: E731 - flags missing on some platforms are 0
READ_FLAGS = os.O_RDONLY | _O("O_NOFOLLOW") | _O("O_NONBLOCK") | _O("O_CLOEXEC") | _O("O_NOCTTY")
DIR_FLAGS = os.O_RDONLY | _O("O_DIRECTORY") | _O("O_NOFOLLOW") | _O("O_CLOEXEC")
TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O("O_NOFOLLOW") | _O("O_CLOEXEC")
LOCK_FLAGS = os.O_RDWR | os.O_CREAT | _O("O_NOFOLLOW") | _O("O_NONBLOCK") | _O("O_CLOEXEC") | _O("O_NOCTTY")


class Refused(Exception):
    """A file that exists but was not read. ``corrupt``: set it aside; else leave it alone."""

    def __init__(self, reason: str, corrupt: bool, st=None, mode_only: bool = False, access: bool = False):
        super().__init__(reason)
        self.reason, self.corrupt, self.st = reason, corrupt, st
        self.mode_only = mode_only  # a folder that only its permission bits make untrusted (chmod 700 fixes it)
        # a folder that its owner's own permission bits keep from being used (mode 500, say): not a
        # trust problem, a fault that may clear (the store tries again, as after EACCES)
        self.access = access


def _uid():
    getuid = getattr(os, "getuid", None)
    return None if getuid is None else getuid()


def unsafe(st, want_dir: bool) -> Optional[str]:
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


def read_secure(dfd: int, name: str, cap: int):
    """(bytes, stat) of ``name`` in folder ``dfd``. FileNotFoundError if missing; Refused if it
    is not a safe regular file, is over ``cap`` bytes (unread) or cannot be read."""
    try:
        fd = os.open(name, READ_FLAGS, dir_fd=dfd)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise Refused("is a symbolic link", False) from None
        raise Refused(f"cannot be opened ({exc.strerror or exc})", False) from None
    try:
        st = os.fstat(fd)
        why = unsafe(st, want_dir=False)
        if why:
            raise Refused(why, False, st)
        if st.st_size > cap:
            raise Refused(f"is {st.st_size} bytes, over the {cap}-byte cap", True, st)
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, min(1 << 20, cap + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > cap:
                raise Refused(f"grew over the {cap}-byte cap", True, st)
        return b"".join(chunks), st
    except OSError as exc:
        raise Refused(f"cannot be read ({exc.strerror or exc})", False) from None
    finally:
        os.close(fd)


def open_temp(name: str, dfd: int) -> int:
    return os.open(name, TEMP_FLAGS, 0o600, dir_fd=dfd)


def write_new(dfd: int, name: str, data: bytes, replace: bool = True, durable: bool = True) -> bool:
    """Write ``data`` as ``name`` in folder ``dfd``: temporary file, fsync (unless ``durable=False``:
    the caller syncs), then ``os.replace`` (or, with ``replace=False``, a link that never
    overwrites: False if ``name`` exists)."""
    tmp = f".tmp-{name}-{os.getpid()}-{secrets.token_hex(4)}"
    fd = open_temp(tmp, dfd)
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


def write_batch(dfd: int, items: list) -> tuple:
    """Write many ``(name, data)`` as :func:`write_new` does, with one ``os.sync`` for them all:
    every temporary file is written, then synced at once, then renamed over its entry (a
    process killed, or a power cut, at any moment leaves each entry old or new). Returns (the
    names written, the OSError that stopped the batch or None): the temporary files written
    before a failure are still synced and renamed."""
    temps, failure = [], None
    try:
        for name, data in items:
            tmp = f".tmp-{name}-{os.getpid()}-{secrets.token_hex(4)}"
            try:
                fd = open_temp(tmp, dfd)
            except OSError as exc:
                failure = exc
                break
            temps.append((tmp, name))
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            except OSError as exc:
                failure = exc
                temps.pop()
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dfd)
                break
            finally:
                os.close(fd)
        if temps:
            os.sync()  # every temporary file's data reaches the disk before any rename
        written = []
        for tmp, name in temps:
            try:
                os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
            except OSError as exc:
                failure = failure or exc
                continue
            written.append(name)
        return written, failure
    finally:
        for tmp, _ in temps:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)


def fsync_dir(dfd: int) -> None:
    with contextlib.suppress(OSError):
        os.fsync(dfd)


def _verified_dir(fd: int, name) -> int:
    """``fd`` if it is a folder safe to use (see :func:`unsafe`), else closed and Refused
    (``mode_only`` where its permission bits alone are wrong)."""
    st = os.fstat(fd)
    why = unsafe(st, want_dir=True)
    if why:
        os.close(fd)
        mode_only = why.startswith(("is writable by group", "lacks owner permissions"))
        raise Refused(f"{name} {why}", False, st, mode_only, access=why.startswith("lacks owner permissions"))
    return fd


def open_dir(path) -> int:
    """A verified folder (by path) as a descriptor. OSError or Refused."""
    return _verified_dir(os.open(path, DIR_FLAGS), path)


def open_subdir(dfd: int, name: str, create: bool) -> int:
    """A verified folder ``name`` inside ``dfd`` (created 0700 if asked). OSError or Refused."""
    try:
        fd = os.open(name, DIR_FLAGS, dir_fd=dfd)
    except FileNotFoundError:
        if not create:
            raise
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o700, dir_fd=dfd)
        fd = os.open(name, DIR_FLAGS, dir_fd=dfd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise Refused(f"{name} is a symbolic link or not a directory", False) from None
        raise
    return _verified_dir(fd, name)


def same_file(name: str, dfd: int, fd: int) -> bool:
    """True if ``name`` in ``dfd`` is still the file open as ``fd``."""
    try:
        here, mine = os.stat(name, dir_fd=dfd, follow_symlinks=False), os.fstat(fd)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino)


def set_aside(dfd: int, name: str, st) -> Optional[str]:
    """Rename a bad entry to ``<name>.bad-*``; the new name, or None if it is gone or was replaced
    meanwhile by another process (then its new entry is put back, never over a newer one).
    OSError if it cannot be renamed."""
    aside = f"{name}.bad-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{secrets.token_hex(2)}"
    try:
        os.rename(name, aside, src_dir_fd=dfd, dst_dir_fd=dfd)
    except FileNotFoundError:
        return None
    with contextlib.suppress(OSError):
        moved = os.stat(aside, dir_fd=dfd, follow_symlinks=False)
        if st is not None and (moved.st_dev, moved.st_ino) != (st.st_dev, st.st_ino):
            os.link(aside, name, src_dir_fd=dfd, dst_dir_fd=dfd)
            os.unlink(aside, dir_fd=dfd)
            return None
    return aside


def trim_bad(dfd: int, names=None) -> None:
    """Keep the last BAD_KEPT set-aside copies in folder ``dfd`` (``names``: its listing, if known)."""
    with contextlib.suppress(OSError):
        bad = []
        for name in os.listdir(dfd) if names is None else names:
            if ".bad-" in name:
                with contextlib.suppress(OSError):
                    bad.append((os.stat(name, dir_fd=dfd, follow_symlinks=False).st_mtime_ns, name))
        for _, name in sorted(bad)[:-BAD_KEPT] if len(bad) > BAD_KEPT else ():
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=dfd)


def sweep(vfd: int, locks: str) -> list:
    """Remove leftovers: temporary files and abandoned lock files older than LEFTOVER_AGE_S; trim set-aside
    copies. Returns the folder's listing (empty if it cannot be listed)."""
    now = time.time()
    try:
        names = os.listdir(vfd)
    except OSError:
        return []
    for name in names:
        if name.startswith(".tmp-"):
            with contextlib.suppress(OSError):
                st = os.stat(name, dir_fd=vfd, follow_symlinks=False)
                if stat.S_ISREG(st.st_mode) and now - st.st_mtime > LEFTOVER_AGE_S:
                    os.unlink(name, dir_fd=vfd)
    trim_bad(vfd, names)
    if fcntl is None:
        return names
    try:
        ldfd = open_subdir(vfd, locks, create=False)
    except (OSError, Refused):
        return names
    try:
        for name in os.listdir(ldfd):
            with contextlib.suppress(OSError):
                st = os.stat(name, dir_fd=ldfd, follow_symlinks=False)
                if not stat.S_ISREG(st.st_mode) or now - st.st_mtime <= LEFTOVER_AGE_S:
                    continue
                fd = os.open(name, LOCK_FLAGS, 0o600, dir_fd=ldfd)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    if same_file(name, ldfd, fd):
                        os.unlink(name, dir_fd=ldfd)
                finally:
                    os.close(fd)
    finally:
        os.close(ldfd)
    return names


def entry_ids(vfd: int) -> list:
    """The key ids of the entry files in folder ``vfd`` (names only: nothing is opened). OSError."""
    out = []
    for name in os.listdir(vfd):
        m = ENTRY_NAME.match(name)
        if m:
            out.append(m.group(1))
    return out
