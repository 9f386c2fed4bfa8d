"""Whole-cache operations of :class:`~.cache.DecisionCache` (``show``, ``clear``, ``export``,
``migrate``, the neighbour index): one pass over the folder's listing, tens of thousands of
entries in seconds. A read of the whole cache changes no file: entries that cannot be used are
counted in one warning (a call of such a key sets its file aside; ``clear`` removes them)."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
from typing import Callable, Optional

from ..tolerance import for_key
from . import codec, fs, group_index, migrate
from .codec import MAX_ENTRY_BYTES, CacheFileError
from .neighbours import cell, cell_of



def _trusted(decision, tolerance) -> bool:
    tol = for_key(decision.key) if tolerance is None else tolerance
    return tol is not None and decision.trusted_under(tol)


logger = logging.getLogger("diffsynth_attention")


@contextlib.contextmanager
def _no_gc():
    """No cyclic garbage collection while tens of thousands of entries are read (they form no
    cycles; a full collection per few hundred new objects made whole-cache reads 1.3x slower)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


class WholeCache:
    """Mixed into DecisionCache: operations over every entry."""

    def migrate(self) -> tuple:
        """Finish migrating a version-1 file now (``cache migrate``): (moved, skipped), or None if there was none."""
        self._ensure_loaded()
        m = self._migration
        if m is None:
            if not migrate.legacy_present(self.directory):
                return None
            m = self._migration = migrate.Migration(self.directory, self._open_for_migration, self._warn_once)
            m.run()
        m.join()
        return m.moved, m.skipped

    def _migrated(self) -> None:
        """Whole-cache reads see every decision: they wait for a migration under way (never a call)."""
        if self._migration is not None:
            self._migration.join()

    def _summarize_bad(self, bad: list, doing: str) -> None:
        if bad:
            kid, reason = bad[0]
            logger.warning("diffsynth_attention cache: %s %d entr%s in %s that cannot be used (first: %s.json %s); "
                           "nothing was changed (a call of such a key tunes it again; `diffsynth-attention cache clear` "
                           "removes them)", doing, len(bad), "y" if len(bad) == 1 else "ies", self.path, kid, reason)

    def _scan(self, only_new: bool) -> list:
        """Read every entry file not yet in memory (``only_new``: not yet seen by the index) into
        memory and the neighbour index, without changing a file. Returns the bad ones."""
        bad: list = []
        if not self._persistent:
            return bad
        with self._folder(create=False) as vfd, _no_gc():
            if vfd is None:
                return bad
            try:
                ids = fs.entry_ids(vfd)
            except OSError:
                return bad
            for kid in ids:
                if kid in self._indexed if only_new else kid in self._entries:
                    continue
                found = self._read_entry(vfd, kid, repair=False, bad=bad)
                self._indexed.add(kid)
                if found is not None:
                    self._remember(found)
        return bad

    def entries(self) -> dict:
        """Every decision: those in memory and every valid entry on disk. Changes no file; bad
        entries are counted in one warning."""
        self._ensure_loaded()
        self._migrated()
        self._summarize_bad(self._scan(only_new=False), "ignored")
        return dict(self._entries)

    def export_document(self) -> tuple:
        """(text, count): an export document of every decision (``cache export``). Entries on disk
        go through unchanged (validated, never turned into Decisions and back); bad ones are
        counted in one warning; a decision still waiting in memory is taken from memory."""
        self._ensure_loaded()
        self._migrated()
        raw, bad = {}, []
        with self._folder(create=False) as vfd, _no_gc():
            if vfd is not None:
                with contextlib.suppress(OSError):
                    for kid in fs.entry_ids(vfd):
                        if kid in self._pending:
                            continue
                        try:
                            data, _ = fs.read_secure(vfd, f"{kid}.json", MAX_ENTRY_BYTES)
                            raw[kid] = codec.parse_entry_raw(data, kid, f"{kid}.json")
                        except FileNotFoundError:
                            continue
                        except (fs.Refused, CacheFileError) as exc:
                            bad.append((kid, exc.reason))
        self._summarize_bad(bad, "left out")
        memory = {k: d for k, d in self._entries.items() if k not in raw}
        return codec.render_document(memory, raw), len(raw) + len(memory)

    def count(self) -> int:
        """How many decisions there are, bad entries included (names only: reads no entry)."""
        self._ensure_loaded()
        self._migrated()
        ids = set(self._entries)
        with self._folder(create=False) as vfd:
            if vfd is not None:
                with contextlib.suppress(OSError):
                    ids.update(fs.entry_ids(vfd))
        return len(ids)

    def neighbours(self, group: str, tolerance: Optional[float] = None, fields: Optional[dict] = None) -> list:
        """The decisions of neighbour group ``group`` (:func:`.neighbours.neighbour_group`) that
        pass ``tolerance`` (default: each one's own key's, :func:`diffsynth_attention.tolerance.for_key`): those in memory, and the entries the persisted index
        (:mod:`.group_index`) lists for the cell of ``fields`` (the new key's: a neighbour is always
        in it), each read once. Where the folder has no complete index (entries of an older
        version), one full read builds it first; without ``fields``, or where the index cannot be
        written, every entry not seen yet is read, as before the index."""
        self._ensure_loaded()
        where = None if fields is None else cell(fields)
        if self._persistent and (where is None or not self._from_index(where)):
            self._scan(only_new=True)
            self._group_new()
            if where is not None:  # no complete index: built from this full read, once per folder
                with self._folder(create=False) as vfd:
                    if vfd is not None:
                        with self._mutex:
                            known = [(cell_of(d), kid) for ds in self._groups.values() for kid, d in ds.items()
                                     if kid in self._indexed]
                        group_index.add(vfd, known, complete=True)
        self._group_new()
        return [d for d in self._groups.get(group, {}).values() if _trusted(d, tolerance)]

    def _from_index(self, group: str) -> bool:
        """Read the entries the index lists for cell ``group`` (not read yet); False without a complete index."""
        with self._folder(create=False) as vfd:
            if vfd is None:
                return True  # no folder: nothing on disk
            kids = group_index.members(vfd, group)
            if kids is None:
                return False
            bad: list = []
            for kid in kids:
                if kid in self._indexed:
                    continue
                found = self._read_entry(vfd, kid, repair=False, bad=bad)
                self._indexed.add(kid)
                if found is not None:
                    self._remember(found)
                elif not os.path.lexists(self.path / f"{kid}.json"):
                    group_index.remove(vfd, group, kid)  # its entry was cleared
        return True

    def clear(self, predicate: Optional[Callable] = None) -> int:
        """Remove decisions (all, or those for which ``predicate(decision)`` is true) from memory and
        disk. With a predicate, entries that cannot be read are left alone (counted in one warning)."""
        self._ensure_loaded()
        self._migrated()
        removed = set()
        with self._mutex:
            for k, d in list(self._entries.items()):
                if predicate is None or predicate(d):
                    removed.add(k)
                    del self._entries[k]
                    self._pending.pop(k, None)
                    self._rendered.pop(k, None)
            self._groups.clear()
            self._indexed.clear()
            self._ungrouped = []
        bad: list = []
        with self._folder(create=False) as vfd:
            if vfd is not None:
                try:
                    ids = fs.entry_ids(vfd)
                except OSError as exc:
                    self._write_failed(f"cannot list {self.path} ({exc.strerror or exc})")
                    ids = []
                for kid in ids:
                    if predicate is not None:
                        d = self._read_entry(vfd, kid, repair=False, bad=bad)
                        if d is None or not predicate(d):
                            continue
                    try:
                        os.unlink(f"{kid}.json", dir_fd=vfd)
                        removed.add(kid)
                    except OSError:
                        continue
                fs.fsync_dir(vfd)
                if predicate is None:
                    group_index.drop(vfd)
        self._summarize_bad(bad, "left alone")
        self._changed()
        return len(removed)

