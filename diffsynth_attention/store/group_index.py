"""The persisted neighbour index: ``<cache>/v2/groups/<cell>/<key id>``, one empty marker file per
entry, where a cell is a neighbour group and the buckets of the two sequence lengths
(:func:`.neighbours.cell`: every neighbour of a key is in its cell), so that
``DIFFSYNTH_ATTENTION_NEW_SHAPES=nearest`` reads a new length's few neighbours instead of every
entry of the cache (60,000 entries: a listing of one small folder, not 60,000 files parsed).

- Every write of an entry adds its marker (:func:`add`; creating an empty file never races with
  another writer). A marker whose entry is gone (cleared) is skipped and removed at lookup.
- ``groups/.complete`` says that every entry of the folder has its marker: written when the
  index starts with the folder (no entry yet), or after one full read built it (a cache written
  by an older version, or a version-1 migration, which removes it). Without it a lookup builds
  the index once (:meth:`~.bulk.WholeCache.neighbours`).
- The index is derived data: a marker that cannot be written removes ``.complete`` (the next
  lookup rebuilds), and no reader trusts a marker for more than "read this entry".
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import Iterable, Optional

from . import fs

GROUPS = "groups"
COMPLETE = ".complete"
_NAME = re.compile(r"^[0-9a-f]{24}$")
_CELL = re.compile(r"^[0-9a-f]{24}-\d{1,4}-\d{1,4}$")


def _groups_dir(vfd: int, create: bool) -> Optional[int]:
    try:
        return fs.open_subdir(vfd, GROUPS, create)
    except (OSError, fs.Refused):
        return None


def _touch(dfd: int, name: str) -> None:
    try:
        os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
                         | getattr(os, "O_CLOEXEC", 0), 0o600, dir_fd=dfd))
    except FileExistsError:
        pass


def start_if_empty(vfd: int) -> None:
    """Before the first write into a folder with no index: if it holds no entry yet, start the
    index as complete (every later entry is added as it is written)."""
    try:
        os.stat(GROUPS, dir_fd=vfd, follow_symlinks=False)
        return
    except FileNotFoundError:
        pass
    except OSError:
        return
    with contextlib.suppress(OSError):
        with os.scandir(vfd) as it:
            if any(fs.ENTRY_NAME.match(e.name) for e in it):
                return  # entries without markers: a lookup builds the index
        gfd = _groups_dir(vfd, create=True)
        if gfd is not None:
            try:
                _touch(gfd, COMPLETE)
            finally:
                os.close(gfd)


def add(vfd: int, members: Iterable, complete: bool = False) -> None:
    """Add ``(group, key id)`` markers (``complete``: then mark the index complete). A failure
    leaves the index incomplete (rebuilt at the next lookup), never an error."""
    gfd = _groups_dir(vfd, create=True)
    if gfd is None:
        return
    try:
        made: dict = {}
        try:
            for group, kid in members:
                if group is None or not _CELL.match(group) or not _NAME.match(kid):
                    continue
                sub = made.get(group)
                if sub is None:
                    sub = made[group] = fs.open_subdir(gfd, group, True)
                _touch(sub, kid)
            if complete:
                _touch(gfd, COMPLETE)
        except (OSError, fs.Refused):
            with contextlib.suppress(OSError):
                os.unlink(COMPLETE, dir_fd=gfd)
        finally:
            for sub in made.values():
                os.close(sub)
    finally:
        os.close(gfd)


def members(vfd: int, group: str) -> Optional[list]:
    """The key ids the index lists for ``group``; None if the index is not complete (or unusable)."""
    gfd = _groups_dir(vfd, create=False)
    if gfd is None:
        return None
    try:
        try:
            os.stat(COMPLETE, dir_fd=gfd, follow_symlinks=False)
        except OSError:
            return None
        try:
            sub = fs.open_subdir(gfd, group, False)
        except FileNotFoundError:
            return []
        except (OSError, fs.Refused):
            return None
        try:
            return [n for n in os.listdir(sub) if _NAME.match(n)]
        finally:
            os.close(sub)
    finally:
        os.close(gfd)


def remove(vfd: int, group: str, kid: str) -> None:
    """Remove a marker whose entry is gone."""
    gfd = _groups_dir(vfd, create=False)
    if gfd is None:
        return
    try:
        with contextlib.suppress(OSError, fs.Refused):
            sub = fs.open_subdir(gfd, group, False)
            try:
                os.unlink(kid, dir_fd=sub)
            finally:
                os.close(sub)
    finally:
        os.close(gfd)


def incomplete(vfd: int) -> None:
    """Entries were added without markers (a version-1 migration): the next lookup rebuilds."""
    gfd = _groups_dir(vfd, create=False)
    if gfd is not None:
        with contextlib.suppress(OSError):
            os.unlink(COMPLETE, dir_fd=gfd)
        os.close(gfd)


def drop(vfd: int) -> None:
    """Remove the whole index (``cache clear`` of every entry): it starts again, complete."""
    gfd = _groups_dir(vfd, create=False)
    if gfd is None:
        return
    try:
        for name in os.listdir(gfd):
            if name == COMPLETE:  # the next write starts it again if the folder is empty by then
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=gfd)
                continue
            with contextlib.suppress(OSError, fs.Refused):
                sub = fs.open_subdir(gfd, name, False)
                try:
                    for marker in os.listdir(sub):
                        with contextlib.suppress(OSError):
                            os.unlink(marker, dir_fd=sub)
                finally:
                    os.close(sub)
                os.rmdir(name, dir_fd=gfd)
    finally:
        os.close(gfd)
