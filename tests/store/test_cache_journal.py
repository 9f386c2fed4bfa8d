"""Many pending decisions go into one journal file first (issue 31, item 3: 50,000 decisions are on
disk within about a second of a fault clearing): from then on none is pending, a SIGKILL before
their entry files are written loses none (the next process writes them out), a later decision
is never overwritten by an older journal, a live process's journal is never replayed by another,
and a cleared decision does not come back from a journal. Asserts on state, never on speed."""
import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from diffsynth_attention.store import fs as fs_mod
from diffsynth_attention.store import writes as writes_mod
from diffsynth_attention.store.cache import DecisionCache, render_entry

from support.store_helpers import PREAMBLE, make_decision

ROOT = Path(__file__).resolve().parents[2]
N = 40  # more than JOURNAL_MIN (set to 4 here) and than a batch: the journal, then one batch of entries


def _on_disk(folder):
    return {p.stem for p in (folder / "v2").glob("*.json")}


def _journals(folder):
    return sorted(p.name for p in (folder / "v2").glob("journal-*") if ".bad-" not in p.name)


class EntryFault:
    """Entry files cannot be written (the journal, one file, can): the window after a journal is
    durable and before its entries are written, held open."""

    def __init__(self, monkeypatch):
        self.on = True
        real = fs_mod.write_batch

        def batch(dfd, items):
            if self.on:
                return [], OSError(errno.EIO, os.strerror(errno.EIO))
            return real(dfd, items)
        monkeypatch.setattr(fs_mod, "write_batch", batch)


@pytest.fixture
def small_journal(monkeypatch):
    monkeypatch.setattr(writes_mod, "JOURNAL_MIN", 4)
    monkeypatch.setattr(writes_mod, "RETRY_S", (3600.0, 3600.0))  # no timer try inside a test: tries are explicit


def test_many_pending_decisions_are_journaled_at_once_and_then_written_out(isolated, monkeypatch, small_journal):
    fault = EntryFault(monkeypatch)
    c = DecisionCache(isolated)
    decisions = [make_decision(i) for i in range(N)]
    c.put_many(decisions)
    assert not c._pending and len(c._journaled) == N  # durable in the journal: nothing pending
    assert _on_disk(isolated) == set() and len(_journals(isolated)) == 1
    assert {d.key_id for d in decisions} <= set(c.entries())  # this process serves them from memory
    fault.on = False
    assert c.save(force=True)
    assert _on_disk(isolated) == {d.key_id for d in decisions} and _journals(isolated) == [] and not c._journaled


def test_a_live_process_journal_is_not_replayed_by_another_cache(isolated, monkeypatch, small_journal):
    fault = EntryFault(monkeypatch)
    writer = DecisionCache(isolated)
    writer.put_many([make_decision(i) for i in range(N)])
    fault.on = False
    reader = DecisionCache(isolated)  # another cache (as another process would): the journal is locked
    assert reader.entries() == {} and len(_journals(isolated)) == 1 and _on_disk(isolated) == set()
    assert writer.save(force=True) and len(reader.entries()) == N


KILLED = PREAMBLE + r"""
import errno, signal
from diffsynth_attention.store import fs, writes
writes.JOURNAL_MIN = 4
writes.RETRY_S = (3600.0, 3600.0)
fs.write_batch = lambda dfd, items: ([], OSError(errno.EIO, "Input/output error"))  # entry files never get written
c = DecisionCache(sys.argv[1])
c.put_many([make_decision(i) for i in range(int(sys.argv[2]))])
assert not c._pending and c._journaled, (len(c._pending), len(c._journaled))
os.kill(os.getpid(), signal.SIGKILL)
"""


def _killed_writer(folder, env, n=N):
    r = subprocess.run([sys.executable, "-c", KILLED, str(folder), str(n)], env=dict(env, DA_ROOT=str(ROOT)),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert _on_disk(folder) == set() and len(_journals(folder)) == 1


def test_sigkill_after_the_journal_loses_nothing_the_next_process_writes_it_out(isolated, subprocess_env, caplog):
    _killed_writer(isolated, subprocess_env)
    assert set(DecisionCache(isolated).entries()) == {make_decision(i).key_id for i in range(N)}
    assert _on_disk(isolated) == {make_decision(i).key_id for i in range(N)} and _journals(isolated) == []
    assert "from the journal" in caplog.text


def test_the_next_process_timer_writes_out_a_journal_without_a_whole_cache_read(isolated, subprocess_env):
    _killed_writer(isolated, subprocess_env)
    c = DecisionCache(isolated)
    c._ensure_loaded()  # (what a call's first lookup does) finds the journal and schedules the replay
    want = {make_decision(i).key_id for i in range(N)}
    end = time.monotonic() + 60  # the retry timer replays it: no save, no whole-cache read (a state, polled)
    while (_on_disk(isolated) != want or _journals(isolated)) and time.monotonic() < end:
        time.sleep(0.05)
    assert _on_disk(isolated) == want and _journals(isolated) == []
    assert c.get(make_decision(1).key_id) is not None


def test_a_journal_never_overwrites_a_later_decision(isolated, subprocess_env):
    _killed_writer(isolated, subprocess_env)
    newer = make_decision(3, backend="torch_math")  # decided after the killed process's journal
    (isolated / "v2" / f"{newer.key_id}.json").write_text(render_entry(newer))  # written as another process would
    entries = DecisionCache(isolated).entries()
    assert len(entries) == N and entries[newer.key_id].backend == "torch_math"


def test_a_bad_journal_is_set_aside_and_the_cache_goes_on(isolated, subprocess_env, caplog):
    _killed_writer(isolated, subprocess_env)
    (name,) = _journals(isolated)
    path = isolated / "v2" / name
    path.write_bytes(b"not a journal\n" + path.read_bytes())
    c = DecisionCache(isolated)
    assert c.entries() == {} and "cannot be replayed" in caplog.text
    assert _journals(isolated) == [] and [p for p in (isolated / "v2").iterdir() if ".bad-" in p.name]
    c.put(make_decision(1))
    assert c.get(make_decision(1).key_id) is not None


def test_cleared_decisions_do_not_come_back_from_a_journal(isolated, monkeypatch, small_journal, subprocess_env):
    fault = EntryFault(monkeypatch)
    c = DecisionCache(isolated)
    c.put_many([make_decision(i) for i in range(N)])
    assert c._journaled and len(_journals(isolated)) == 1
    assert c.clear() == N
    fault.on = False
    c.save(force=True)
    assert _on_disk(isolated) == set() and _journals(isolated) == [] and DecisionCache(isolated).entries() == {}
