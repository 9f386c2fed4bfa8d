"""Many pending decisions made durable at once: one journal file, ``<cache>/v2/journal-<pid>-<hex>``.

Writing 50,000 entry files takes seconds (a file, a rename and a marker each); a journal of the
same entries is one file and one fsync (a fraction of a second). So when many decisions are
pending (:data:`.writes.JOURNAL_MIN`), :meth:`~.writes.Writes.save` first writes them all into a
journal, and they are no longer at risk: then it writes their entry files (as always) and
removes the journal.

- Format: a header line, then per entry ``<key id> <length>\\n`` and the entry file's bytes.
- The writer holds an exclusive ``flock`` on its journal from before the rename until it is
  done with it; a journal whose lock is free belongs to a process that is gone (killed while it
  wrote the entry files). The next process to use the folder replays it (:func:`replay`): each
  entry is validated, and written where its entry file is missing or older than the journal
  (a later write, by anyone, wins), then the journal is removed.
- A journal is written through :func:`.fs.open_temp` and renamed into place after its fsync: a
  process killed while writing one leaves a temporary file (swept after an hour), never half a
  journal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from typing import Callable, Optional

from . import codec, fs

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no journal (entries are written one by one)
    fcntl = None

logger = logging.getLogger("diffsynth_attention")

PREFIX = "journal-"
MAGIC = b"diffsynth-attention journal 1\n"
MAX_JOURNAL_BYTES = 8 * 1024 * 1024 * 1024  # a journal over this is not read


def available() -> bool:
    return fcntl is not None


def write(vfd: int, items: list) -> tuple:
    """Write ``items`` (``(key id, entry bytes)``) as one durable journal in folder ``vfd``; return
    (its name, its descriptor, locked: keep it open while its entries are written). OSError."""
    tmp = f".tmp-{PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
    fd = fs.open_temp(tmp, vfd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # before it has its name: never seen unlocked while this process lives
        parts = [MAGIC]
        for kid, data in items:
            parts += [f"{kid} {len(data)}\n".encode(), data]
        view = memoryview(b"".join(parts))
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
        name = tmp[len(".tmp-"):]
        os.rename(tmp, name, src_dir_fd=vfd, dst_dir_fd=vfd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=vfd)
        raise
    fs.fsync_dir(vfd)
    return name, fd


def release(vfd: int, name: str, fd: int, done: bool) -> None:
    """Let go of one of this process's journals (``done``: every entry it holds is written: remove it)."""
    if done:
        with contextlib.suppress(OSError):
            os.unlink(name, dir_fd=vfd)
    with contextlib.suppress(OSError):
        os.close(fd)


def names(listing) -> list:
    """The journals in a folder's listing (not those set aside)."""
    return [n for n in listing if n.startswith(PREFIX) and ".bad-" not in n]


def parse(data: bytes) -> list:
    """The ``(key id, entry bytes)`` of a journal's bytes; ValueError if it is not one."""
    if not data.startswith(MAGIC):
        raise ValueError("no journal header")
    out, i = [], len(MAGIC)
    while i < len(data):
        end = data.index(b"\n", i)
        kid, length = data[i:end].decode("ascii").split(" ")
        n = int(length)
        if not codec.ID.match(kid) or n < 0 or end + 1 + n > len(data):
            raise ValueError(f"a bad record at byte {i}")
        out.append((kid, data[end + 1:end + 1 + n]))
        i = end + 1 + n
    return out


def replay(vfd: int, name: str, write_entries: Callable) -> Optional[int]:
    """Replay a journal whose writer is gone: ``write_entries([(key id, Decision, bytes)])`` for
    each valid entry whose file is missing or older than the journal, then remove the journal if
    that returned True. None if its writer still holds it (or it is gone); else how many entries
    it wrote. Never raises: a journal that cannot be read is set aside (``<name>.bad-*``), with a warning."""
    try:
        fd = os.open(name, fs.READ_FLAGS, dir_fd=vfd)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return None  # its writer lives: it writes the entries itself
        st = os.fstat(fd)
        if not fs.same_file(name, vfd, fd) or fs.unsafe(st, want_dir=False):
            return None  # removed meanwhile by its writer, or not ours to trust
        if st.st_size > MAX_JOURNAL_BYTES:
            raise ValueError(f"{st.st_size} bytes")
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 24)
            if not chunk:
                break
            chunks.append(chunk)
        items = parse(b"".join(chunks))
        todo = []
        for kid, data in items:
            try:
                decision = codec.parse_entry(data, kid, f"{name}: {kid}")
            except Exception as exc:  # a bad record: skipped, the others are replayed
                logger.warning("diffsynth_attention cache: the journal %s holds a bad entry for %s (%s); skipped",
                               name, kid, getattr(exc, "reason", exc))
                continue
            try:
                here = os.stat(f"{kid}.json", dir_fd=vfd, follow_symlinks=False)
                if fs.unsafe(here, want_dir=False) or here.st_mtime_ns >= st.st_mtime_ns:
                    continue  # written after the journal (a later decision), or not ours to overwrite
            except FileNotFoundError:
                pass
            todo.append((kid, decision, data))
        if write_entries(todo):
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=vfd)
        return len(todo)
    except (ValueError, UnicodeDecodeError, OSError) as exc:
        aside = None
        with contextlib.suppress(OSError):
            aside = fs.set_aside(vfd, name, None)
        logger.warning("diffsynth_attention cache: the journal %s cannot be replayed (%s); kept it as %s",
                       name, exc, aside)
        return None
    finally:
        os.close(fd)
