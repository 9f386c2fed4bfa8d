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
        self.replay_journals()
        self._summarize_bad(self._scan(only_new=False), "ignored")
        return dict(self._entries)

    def peek(self, fn: Callable) -> list:
        """``[fn(key id, entry) ...]`` over the valid entries on disk (``entry``: the validated JSON
        object), as a reader that changes nothing, on disk or in this cache: no folder created, no
        leftover swept, no migration started, no journal replayed, no decision remembered. What the
        preload at import reads (``import diffsynth_attention`` writes nothing)."""
        out: list = []
        with self._folder(create=False) as vfd, _no_gc():
            if vfd is not None:
                with contextlib.suppress(OSError):
                    for kid in fs.entry_ids(vfd):
                        entry = self._raw(vfd, kid, [])
                        if entry is not None:
                            out.append(fn(kid, entry))
        return out

    def _raw(self, vfd: int, kid: str, bad: list, compact: bool = False):
        """The validated ``entry`` object of ``kid``'s file (no Decision built), or None: missing,
        or bad (``(kid, reason)`` added to ``bad``; a file that is not ours to read is blocked, as
        by ``_read_entry``). ``compact``: (entry, its compact text or None) instead
        (:func:`.codec.parse_entry_text`). Changes no file."""
        try:
            data, _ = fs.read_secure(vfd, f"{kid}.json", MAX_ENTRY_BYTES)
        except FileNotFoundError:
            self._blocked.pop(kid, None)
            return None
        except fs.Refused as exc:
            if not exc.corrupt:
                self._blocked[kid] = exc.reason
            bad.append((kid, exc.reason))
            return None
        self._blocked.pop(kid, None)
        try:
            entry, text = codec.parse_entry_text(data, kid, f"{kid}.json", compact=compact)
            return (entry, text) if compact else entry
        except CacheFileError as exc:
            bad.append((kid, exc.reason))
        except Exception as exc:  # a validator bug: a bad entry like any other
            bad.append((kid, f"{type(exc).__name__}: {str(exc)[:200]}"))
        return None

    def map_entries(self, fn: Callable) -> list:
        """``[fn(key id, entry) ...]`` over every decision, as :meth:`entries` finds them (memory
        first, then every valid entry on disk not in memory), where ``entry`` is the decision's
        validated JSON object (``Decision.to_dict``'s form). No Decision is built for an entry on
        disk, and none is kept: ``cache show`` of 60,000 entries. Changes no file; bad entries are
        counted in one warning."""
        self._ensure_loaded()
        self._migrated()
        self.replay_journals()
        with self._mutex:
            memory = dict(self._entries)
        out = [fn(kid, d.to_dict()) for kid, d in memory.items()]
        bad: list = []
        with self._folder(create=False) as vfd, _no_gc():
            if vfd is not None:
                with contextlib.suppress(OSError):
                    for kid in fs.entry_ids(vfd):
                        if kid in memory:
                            continue
                        entry = self._raw(vfd, kid, bad)
                        if entry is not None:
                            out.append(fn(kid, entry))
        self._summarize_bad(bad, "ignored")
        return out

    def export_document(self) -> tuple:
        """(text, count): an export document of every decision (``cache export``; see :meth:`export_to`)."""
        parts: list = []
        count = self.export_to(parts.append)
        return "".join(parts), count

    def export_to(self, write: Callable) -> int:
        """Write an export document of every decision, piece by piece, with ``write(text)``;
        returns how many. Entries on disk go through unchanged (validated, never turned into
        Decisions and back) one at a time, so 60,000 never sit in memory at once; bad ones are
        counted in one warning; a decision still waiting in memory is taken from memory. The text
        is :func:`.codec.render_document`'s."""
        self._ensure_loaded()
        self._migrated()
        self.replay_journals()
        with self._mutex:
            memory, pending = dict(self._entries), set(self._pending)
        bad: list = []
        invalid: list = []
        count = 0
        with self._folder(create=False) as vfd, _no_gc():
            ids = set()
            if vfd is not None:
                with contextlib.suppress(OSError):
                    ids.update(fs.entry_ids(vfd))
            write(codec.DOCUMENT_HEAD)
            for kid in sorted(ids | memory.keys()):
                found = self._raw(vfd, kid, bad, compact=True) if kid in ids and kid not in pending else None
                entry, text = found if found is not None else (None, None)
                if entry is None and kid in memory:  # waiting in memory, or its file is gone or bad
                    entry = codec.exportable(kid, memory[kid], invalid)
                if entry is not None:
                    write(codec.document_member(kid, entry, count == 0, text))
                    count += 1
            write(codec.DOCUMENT_TAIL)
        codec.warn_left_out(invalid)
        self._summarize_bad(bad, "left out")
        return count

    def count(self, predicate: Optional[Callable] = None) -> int:
        """How many decisions there are, bad entries included (names only: reads no entry); with
        ``predicate``, how many valid ones it matches (as :meth:`clear` would remove)."""
        self._ensure_loaded()
        self._migrated()
        self.replay_journals()
        if predicate is not None:
            return len(self._matching(predicate, [], remove=False))
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

    def _matching(self, predicate: Callable, bad: list, remove: bool) -> set:
        """The key ids that ``predicate`` matches, in memory and on disk (``remove``: dropped from
        memory and their files unlinked). An entry on disk is tested on its validated JSON object
        where the predicate has ``on_entry`` (:func:`.decision.decision_filter`; no Decision is
        built), and only if its id starts with the predicate's ``key_prefix``."""
        on_entry = getattr(predicate, "on_entry", None)
        prefix = getattr(predicate, "key_prefix", "") or ""
        found = set()
        with self._mutex:
            for k, d in list(self._entries.items()):
                if predicate(d):
                    found.add(k)
                    if remove:
                        del self._entries[k]
                        self._pending.pop(k, None)
                        self._rendered.pop(k, None)
                        self._journaled.pop(k, None)
        with self._folder(create=False) as vfd, _no_gc():
            if vfd is None:
                return found
            try:
                ids = fs.entry_ids(vfd)
            except OSError as exc:
                if remove:
                    self._write_failed(f"cannot list {self.path} ({exc.strerror or exc})")
                return found
            unlinked = False
            for kid in ids:
                if not kid.startswith(prefix) or (kid in found and not remove):
                    continue
                if on_entry is not None:
                    entry = self._raw(vfd, kid, bad)
                    if entry is None or not on_entry(kid, entry):
                        continue
                else:
                    d = self._read_entry(vfd, kid, repair=False, bad=bad)
                    if d is None or not predicate(d):
                        continue
                if not remove:
                    found.add(kid)
                    continue
                try:
                    os.unlink(f"{kid}.json", dir_fd=vfd)
                except (FileNotFoundError, IsADirectoryError):  # gone, or not an entry of ours
                    continue
                except OSError as exc:  # a read-only disk, say: the caller is told (not "cleared 0")
                    self._write_failed(f"cannot remove {self.path / (kid + '.json')} ({exc.strerror or exc})")
                    continue
                found.add(kid)
                unlinked = True
            if unlinked:
                fs.fsync_dir(vfd)
            if remove:
                self._release_done(vfd)  # a journal of ours holding only cleared decisions
        return found

    def clear(self, predicate: Optional[Callable] = None) -> int:
        """Remove decisions (all, or those for which ``predicate(decision)`` is true) from memory and
        disk. With a predicate, entries that cannot be read are left alone (counted in one warning)."""
        self._ensure_loaded()
        self._migrated()
        self.replay_journals()
        bad: list = []
        if predicate is not None:
            removed = self._matching(predicate, bad, remove=True)
            with self._mutex:
                self._groups.clear()
                self._indexed.clear()
                self._ungrouped = []
            self._summarize_bad(bad, "left alone")
            self._changed()
            return len(removed)
        removed = set()
        with self._mutex:
            removed.update(self._entries)
            self._entries.clear()
            self._pending.clear()
            self._rendered.clear()
            self._journaled.clear()
            self._groups.clear()
            self._indexed.clear()
            self._ungrouped = []
        with self._folder(create=False) as vfd:
            if vfd is not None:
                try:
                    ids = fs.entry_ids(vfd)
                except OSError as exc:
                    self._write_failed(f"cannot list {self.path} ({exc.strerror or exc})")
                    ids = []
                for kid in ids:
                    try:
                        os.unlink(f"{kid}.json", dir_fd=vfd)
                        removed.add(kid)
                    except (FileNotFoundError, IsADirectoryError):  # gone, or not an entry of ours
                        continue
                    except OSError as exc:  # a read-only disk, say: the caller is told (not "cleared 0")
                        self._write_failed(f"cannot remove {self.path / (kid + '.json')} ({exc.strerror or exc})")
                fs.fsync_dir(vfd)
                group_index.drop(vfd)
                self._release_done(vfd)
        self._changed()
        return len(removed)
