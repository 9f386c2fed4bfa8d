"""Version 1 -> 2: a ``decisions.json`` of every decision becomes one entry file per decision.

Runs in a background thread (or in the foreground for ``diffsynth-attention cache migrate``):
an attention call never waits for it more than LAZY_WAIT_S. Meanwhile a miss is served lazily
from the old file once it is parsed. Entries that pass validation are written without ever
overwriting a version-2 entry; the old file is then renamed ``decisions.json.v1-migrated`` so
it is never migrated twice. If writing fails, nothing is renamed and the next process tries again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from typing import Optional

from . import codec, fs, group_index
from .paths import LEGACY_FILE, MIGRATED_SUFFIX

logger = logging.getLogger("diffsynth_attention")

LAZY_WAIT_S = 1.0  # the longest a miss waits for the old file to be parsed


class Migration:
    """One migration of ``directory``'s version-1 file into the folder ``open_entries()`` opens."""

    def __init__(self, directory, open_entries, warn):
        self.directory, self._open_entries, self._warn = directory, open_entries, warn
        self.parsed = threading.Event()
        self.done = threading.Event()
        self._legacy: Optional[codec.Legacy] = None
        self._waited = False  # a lookup already waited LAZY_WAIT_S in vain
        self._thread: Optional[threading.Thread] = None
        self.moved = self.skipped = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="diffsynth-attention-v1-migration", daemon=True)
        self._thread.start()

    def join(self, timeout: Optional[float] = None) -> bool:
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        return self.done.is_set()

    def lookup(self, kid: str, wait: Optional[float] = None):
        """The old file's decision for ``kid`` (validated), waiting for the old file to be indexed
        at most ``wait`` (default LAZY_WAIT_S, once per process: after one wait ran out, a miss
        does not wait again)."""
        if self.done.is_set():
            return None
        if not self.parsed.wait(LAZY_WAIT_S if wait is None and not self._waited else wait or 0.0):
            self._waited = True
        legacy = self._legacy
        if legacy is None or kid not in legacy.members:
            return None
        try:
            return legacy.entry(kid)
        except codec.CacheFileError:
            return None

    def run(self) -> None:
        try:
            self._run()
        except Exception as exc:  # never breaks a pipeline: the next process tries again
            self._warn("v1", "diffsynth_attention cache: migrating %s failed (%s); it stays in place",
                       self.directory / LEGACY_FILE, f"{type(exc).__name__}: {exc}")
        finally:
            self.parsed.set()
            self.done.set()
            self._legacy = None

    def _run(self) -> None:
        where = self.directory / LEGACY_FILE
        try:
            bfd = fs.open_dir(self.directory)
        except (OSError, fs.Refused):
            return
        try:
            try:
                data, _ = fs.read_secure(bfd, LEGACY_FILE, codec.MAX_LEGACY_BYTES)
            except FileNotFoundError:
                return
            except fs.Refused as exc:
                self._warn("v1", "diffsynth_attention cache: the version-1 file %s %s; not migrated", where, exc.reason)
                return
            try:
                self._legacy = codec.Legacy(data, where)
            except codec.CacheFileError as exc:
                aside = f"{LEGACY_FILE}.bad-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
                with contextlib.suppress(OSError):
                    os.rename(LEGACY_FILE, aside, src_dir_fd=bfd, dst_dir_fd=bfd)
                self._warn("v1", "diffsynth_attention cache: a bad version-1 file (%s) was not migrated; kept it as %s",
                           exc.reason, aside)
                return
            del data
            self.parsed.set()
            vfd = self._open_entries()
            if vfd is None:
                return
            try:
                for kid in list(self._legacy.members):
                    try:
                        decision = self._legacy.entry(kid)
                        if fs.write_new(vfd, f"{kid}.json", codec.render_entry(decision).encode(), replace=False, durable=False):
                            self.moved += 1
                    except codec.CacheFileError:
                        self.skipped += 1
                    except OSError as exc:  # try again next time: nothing is renamed
                        self._warn("v1", "diffsynth_attention cache: migrating %s failed (%s); it stays in place",
                                   where, exc.strerror or exc)
                        return
                if self.moved:
                    group_index.incomplete(vfd)  # entries without markers: the next lookup indexes them
                    os.sync()  # once for every migrated entry, before the old file is renamed
                fs.fsync_dir(vfd)
            finally:
                os.close(vfd)
            with contextlib.suppress(FileNotFoundError):
                os.rename(LEGACY_FILE, LEGACY_FILE + MIGRATED_SUFFIX, src_dir_fd=bfd, dst_dir_fd=bfd)
            with contextlib.suppress(OSError):
                os.unlink(LEGACY_FILE + ".lock", dir_fd=bfd)
            logger.info("diffsynth_attention cache: migrated %d decision(s) from %s", self.moved, where)
            if self.skipped:
                self._warn("v1-skipped", "diffsynth_attention cache: %d entr(y/ies) of %s failed validation and were not "
                           "migrated (the file is kept as %s)", self.skipped, where, LEGACY_FILE + MIGRATED_SUFFIX)
        finally:
            os.close(bfd)


def legacy_present(directory) -> bool:
    return os.path.lexists(os.path.join(directory, LEGACY_FILE))
