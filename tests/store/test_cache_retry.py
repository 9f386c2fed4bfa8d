"""Writes that get done (issue 31, item 3): pending decisions are retried on a timer while any are
pending, not only when another is saved; the back-off is capped and resets once a write works;
every DecisionCache flushes at exit; once a fault clears, nothing stays pending, so a SIGKILL
then loses nothing. Asserts on state (polled with a generous deadline), never on speed."""
import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from diffsynth_attention.store import fs as fs_mod
from diffsynth_attention.store import writes as writes_mod
from diffsynth_attention.store.cache import DecisionCache

from support.store_helpers import PREAMBLE, make_decision

ROOT = Path(__file__).resolve().parents[2]


class Fault:
    """A disk that fails every entry write (EROFS) while ``on``."""

    def __init__(self, monkeypatch):
        self.on = False
        real = fs_mod.open_temp

        def opener(name, dfd):
            if self.on:
                raise OSError(errno.EROFS, os.strerror(errno.EROFS))
            return real(name, dfd)
        monkeypatch.setattr(fs_mod, "open_temp", opener)


def _on_disk(folder):
    return {p.stem for p in (folder / "v2").glob("*.json")}


def _journals(folder):
    return sorted(p.name for p in (folder / "v2").glob("journal-*"))


def _poll(predicate, deadline_s: float = 60.0) -> bool:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_pending_decisions_reach_the_disk_after_a_flapping_fault_clears_with_no_further_save(isolated, monkeypatch):
    fault = Fault(monkeypatch)
    c = DecisionCache(isolated)
    decisions = [make_decision(i) for i in range(120)]  # more than a batch: the batched path too
    for i, d in enumerate(decisions):
        fault.on = (i // 7) % 2 == 0  # the disk flips between failing and writable
        c.put(d)
    fault.on = True
    c.put(make_decision(500))  # the last write fails: some are pending
    assert c._pending
    fault.on = False  # the fault clears for good; nothing is saved after this
    assert _poll(lambda: not c._pending), f"{len(c._pending)} still pending"
    assert _on_disk(isolated) >= {d.key_id for d in decisions} | {make_decision(500).key_id}
    assert c.persistent


def test_the_back_off_is_capped_and_resets_once_a_write_works(isolated, monkeypatch):
    monkeypatch.setattr(writes_mod, "RETRY_S", (0.2, 0.8))
    fault = Fault(monkeypatch)
    fault.on = True
    c = DecisionCache(isolated)
    c.put(make_decision(1))
    for _ in range(6):  # forced tries: each failure doubles the wait, up to the cap
        c.save(force=True)
    assert c._backoff == 0.8
    fault.on = False
    assert _poll(lambda: not c._pending)  # the timer wrote it
    assert c._backoff == 0.2 and c._write_error is None


EXIT = PREAMBLE + r"""
import errno
from diffsynth_attention.store import fs, writes
writes.RETRY_S = (3600.0, 3600.0)  # no timer try before the exit: the flush at exit writes them
real = fs.open_temp
def failing(name, dfd):
    raise OSError(errno.ENOSPC, "No space left on device")
fs.open_temp = failing
c = DecisionCache(sys.argv[1])  # built by the user, not the default dispatcher's
for i in range(5):
    c.put(make_decision(i))
assert len(c._pending) == 5
fs.open_temp = real  # the disk has room again; the process exits without calling flush
"""


def test_a_user_built_cache_flushes_at_exit(isolated, subprocess_env):
    env = dict(subprocess_env, DA_ROOT=str(ROOT))
    r = subprocess.run([sys.executable, "-c", EXIT, str(isolated)], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert _on_disk(isolated) == {make_decision(i).key_id for i in range(5)}


FLAKY = PREAMBLE + r"""
import errno
from diffsynth_attention.store import fs
real = fs.open_temp
broken = [True]  # the disk refuses new files while this holds
def flaky(name, dfd):
    if broken[0]:
        raise OSError(errno.EROFS, "Read-only file system")
    return real(name, dfd)
fs.open_temp = flaky
"""

KILL = FLAKY + r"""
import signal, time
c = DecisionCache(sys.argv[1])
for i in range(300):
    broken[0] = (i // 20) % 2 == 0
    c.put(make_decision(i))
broken[0] = True
c.put(make_decision(300))
assert c._pending
broken[0] = False  # the fault clears for good
end = time.monotonic() + 60
while c._pending and time.monotonic() < end:
    time.sleep(0.05)
if c._pending:
    print("pending", len(c._pending), flush=True)
    os._exit(3)
os.kill(os.getpid(), signal.SIGKILL)  # no flush at exit
"""


def test_sigkill_after_the_fault_clears_loses_nothing(isolated, subprocess_env):
    env = dict(subprocess_env, DA_ROOT=str(ROOT))
    r = subprocess.run([sys.executable, "-c", KILL, str(isolated)], env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == -signal.SIGKILL, (r.stdout, r.stderr[-2000:])
    want = {make_decision(i).key_id for i in range(301)}
    assert set(DecisionCache(isolated).entries()) == want  # a fresh process: a journal left behind is written out
    assert _on_disk(isolated) == want and not _journals(isolated)


FORKED = FLAKY + r"""
from diffsynth_attention.store import writes
writes.RETRY_S = (3600.0, 3600.0)  # the child's put falls within the back-off of the parent's failed write
c = DecisionCache(sys.argv[1])
c.put(make_decision(0))
assert c._pending and c._timer is not None
pid = os.fork()
if pid == 0:  # the parent's timer thread is not in the child
    broken[0] = False
    c.put(make_decision(1))  # within the back-off: not written now, so a timer of the child's must come back for it
    if c._timer is None:
        os._exit(3)
    c._timer.cancel()
    c._timer.function(*c._timer.args)  # what the timer does when it fires (3600 s here), run now
    os._exit(0 if not c._pending else 4)
_, status = os.waitpid(pid, 0)
print("child", os.waitstatus_to_exitcode(status))
os._exit(0)
"""


def test_a_decision_stored_in_a_forked_child_during_the_back_off_is_retried(isolated, subprocess_env):
    env = dict(subprocess_env, DA_ROOT=str(ROOT))
    r = subprocess.run([sys.executable, "-c", FORKED, str(isolated)], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "child 0", (r.stdout, r.stderr[-2000:])
    assert make_decision(1).key_id in _on_disk(isolated)


def test_a_cache_dropped_with_pending_decisions_still_writes_them(isolated, monkeypatch):
    """A user's own DecisionCache that goes out of scope while the disk refuses its writes: its
    pending decisions are not dropped with it (silently, before any exit flush); its retries go on
    until they are written."""
    import gc

    fault = Fault(monkeypatch)
    fault.on = True
    c = DecisionCache(isolated)
    decisions = [make_decision(i) for i in range(3)]
    for d in decisions:
        c.put(d)
    assert c._pending
    del c
    gc.collect()
    fault.on = False  # the fault clears; nothing else is saved
    want = {d.key_id for d in decisions}
    assert _poll(lambda: _on_disk(isolated) >= want), f"lost: {want - _on_disk(isolated)}"


def test_a_cache_folder_whose_owner_bits_flap_is_written_once_they_are_back(isolated):
    """``chmod u-w`` on the folder, then back: an access fault like EACCES (tried again), not an
    untrusted folder (memory only for good: its decisions would be lost at exit)."""
    c = DecisionCache(isolated)
    c.put(make_decision(0))
    v2 = isolated / "v2"
    os.chmod(v2, 0o500)
    try:
        c.put(make_decision(1))
        assert c._pending and not c.persistent
    finally:
        os.chmod(v2, 0o700)  # the fault clears; nothing else is saved
    assert _poll(lambda: not c._pending), f"{len(c._pending)} still pending"
    assert _on_disk(isolated) == {make_decision(i).key_id for i in range(2)} and c.persistent
