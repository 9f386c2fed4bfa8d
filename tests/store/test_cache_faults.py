"""The store under faults: a failed write, a fork during tuning, a stricter tolerance,
a cache folder that cannot be expanded."""
import errno
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

import diffsynth_attention as da
from diffsynth_attention.tuning.policy import DEFAULT_POLICY
from diffsynth_attention import config
from diffsynth_attention.dispatch import default_dispatcher
from diffsynth_attention.store import cache as cache_mod
from diffsynth_attention.store import fs as fs_mod
from diffsynth_attention.store import writes as writes_mod
from diffsynth_attention.store.cache import DecisionCache

from support.helpers import qkv
from support.store_helpers import PREAMBLE, make_decision, with_chosen

ROOT = Path(__file__).resolve().parents[2]


def _warnings(caplog, text):
    return [r for r in caplog.records if r.levelno >= logging.WARNING and text in r.getMessage()]


def _on_disk(folder):
    return {p.stem for p in (folder / "v2").glob("*.json")}


def _failing_writes(monkeypatch, how):
    """Make every entry write of this process fail as ``how`` says, for real where possible."""
    real = fs_mod.open_temp
    if how == "temp removed":  # a cleanup job removes the temporary file mid-write: os.replace fails
        def opener(name, dfd):
            fd = real(name, dfd)
            os.unlink(name, dir_fd=dfd)
            return fd
    else:
        code = {"read-only": errno.EROFS, "full": errno.ENOSPC, "EFBIG": errno.EFBIG}[how]

        def opener(name, dfd):
            raise OSError(code, os.strerror(code))
    monkeypatch.setattr(fs_mod, "open_temp", opener)


@pytest.mark.parametrize("how", ["read-only", "full", "EFBIG", "temp removed"])
def test_reads_go_on_after_a_failed_write_and_writing_is_retried(how, isolated, monkeypatch, caplog):
    monkeypatch.setattr(writes_mod, "RETRY_S", (0.0, 0.0))  # retry at the next write
    c = DecisionCache(isolated)
    other = DecisionCache(isolated)  # another process sharing the folder
    saved = make_decision(0)
    other.put(saved)
    with monkeypatch.context() as m:
        _failing_writes(m, how)
        c.put(make_decision(1))
        assert not c.persistent
        assert c.get(saved.key_id) is not None  # a valid decision on disk is still read, not retuned
        c.put(make_decision(2))  # tried again, fails again: no second warning
        assert not c.persistent
    failed = _warnings(caplog, "cannot write")
    assert len(failed) == 1 and "reads go on" in failed[0].getMessage()
    c.put(make_decision(3))  # the disk works again: everything pending is written
    assert c.persistent
    assert _on_disk(isolated) == {make_decision(i).key_id for i in range(4)}
    assert len(_warnings(caplog, "works again")) == 1
    assert not [n for n in os.listdir(isolated / "v2") if n.startswith(".tmp")]


def test_after_a_failed_write_the_next_try_waits_for_the_backoff_and_flush_tries_now(isolated, monkeypatch, caplog):
    monkeypatch.setattr(writes_mod, "RETRY_S", (3600.0, 3600.0))
    c = DecisionCache(isolated)
    with monkeypatch.context() as m:
        _failing_writes(m, "full")
        c.put(make_decision(1))
    tries = []
    real = fs_mod.open_temp
    monkeypatch.setattr(fs_mod, "open_temp", lambda name, dfd: tries.append(name) or real(name, dfd))
    c.put(make_decision(2))
    assert not tries and not _on_disk(isolated)  # within the backoff: no write tried
    assert c.flush()  # at exit: tried at once, and it works
    assert _on_disk(isolated) == {make_decision(1).key_id, make_decision(2).key_id}


def test_a_tuning_on_a_disk_that_failed_once_reuses_decisions_on_disk(isolated, monkeypatch):
    q, k, v = qkv(sq=16)
    key = da.explain(q, k, v).key_id  # tuned and written
    default_dispatcher().store.forget_memory()
    default_dispatcher().reset()
    with monkeypatch.context() as m:
        _failing_writes(m, "read-only")
        q2, k2, v2 = qkv(sq=20)
        assert da.explain(q2, k2, v2).source == "tuned"  # its write fails
        assert da.explain(q, k, v).source == "cache" and da.explain(q, k, v).key_id == key  # read, not retuned


FORK = PREAMBLE + r"""
import logging, threading
logging.basicConfig(level=logging.WARNING)
os.environ["DIFFSYNTH_ATTENTION_TUNE_WAIT"] = "30"
c = DecisionCache(sys.argv[1])
kid = make_decision(1).key_id
taken, go = threading.Event(), threading.Event()

def tuner():
    with c.tuning_lock(kid) as held:
        assert held
        taken.set()
        go.wait()

t = threading.Thread(target=tuner)
t.start()
taken.wait()
pid = os.fork()
if pid == 0:  # the child: its call of the same key must not wait on the parent's thread lock
    with c.tuning_lock(kid) as held:
        os._exit(0 if held else 3)
go.set()
t.join()
_, status = os.waitpid(pid, 0)
print("child", os.waitstatus_to_exitcode(status))
"""


def test_a_fork_while_a_thread_tunes_never_leaves_the_child_waiting(isolated, subprocess_env):
    env = dict(subprocess_env, DA_ROOT=str(ROOT))
    r = subprocess.run([sys.executable, "-c", FORK, str(isolated)], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "child 0", (r.stdout, r.stderr[-2000:])
    assert "waited" not in r.stderr and "no sign of life" not in r.stderr, r.stderr[-2000:]


def _loose(i: int, error: float, tolerance: float):
    return with_chosen(make_decision(i), error=error, tolerance=tolerance)


def test_a_decision_is_used_only_where_its_error_passes_the_tolerance_in_force(isolated, monkeypatch):
    c = DecisionCache(isolated)
    d = _loose(1, 0.5, 1.0)  # tuned with DIFFSYNTH_ATTENTION_TOLERANCE=1
    c.put(d)
    assert d.trusted_under(1.0) and not d.trusted_under(1e-6)
    assert c.get(d.key_id) is None and c.refresh(d.key_id) is None  # default tolerance 0.005: a miss
    assert DecisionCache(isolated).get(d.key_id) is None
    monkeypatch.setenv(config.TOLERANCE, "1")
    assert c.get(d.key_id).key_id == d.key_id
    assert DecisionCache(isolated).get(d.key_id).backend == d.backend
    nan = _loose(2, float("nan"), 1.0)
    assert not nan.trusted_under(1.0)


def test_a_looser_decision_on_disk_is_gated_again_by_the_dispatcher(isolated, monkeypatch):
    q, k, v = qkv(sq=16)
    first = da.explain(q, k, v)
    store = default_dispatcher().store
    d = with_chosen(store.get(first.key_id), error=0.5, tolerance=1.0)  # as if an 8-bit backend won under tolerance 1
    store.put(d)
    for tolerance, source in (("1", "cache"), ("", "tuned")):
        monkeypatch.setenv(config.TOLERANCE, tolerance)
        store.forget_memory()
        default_dispatcher().reset()
        assert da.explain(q, k, v).source == source
    again = DecisionCache(isolated).get(first.key_id)
    in_force = DEFAULT_POLICY.tolerance("float32")  # the gate's tolerance for this fp32 problem
    assert again.tolerance == in_force and again.trusted_under(in_force)


def test_a_cache_dir_that_cannot_be_expanded_names_the_variable(monkeypatch, subprocess_env):
    monkeypatch.setenv(config.CACHE_DIR, "~nosuchuser-da/x")
    with pytest.raises(ValueError, match=config.CACHE_DIR):
        config.cache_dir_override()
    env = dict(subprocess_env, DIFFSYNTH_ATTENTION_CACHE_DIR="~nosuchuser-da/x")
    r = subprocess.run([sys.executable, "-m", "diffsynth_attention", "cache", "path"], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and config.CACHE_DIR in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_why_the_lease_is_not_filelocks_soft_lease(isolated, tmp_path, caplog):
    """filelock's SoftFileLease (heartbeat, stale-holder takeover) opens its marker by path: a
    lock folder replaced by a symbolic link is followed, which the store never does (its lock is
    taken relative to a folder descriptor verified at every use). If filelock stops following,
    this test fails: then store/lock.py can be built on it."""
    filelock = pytest.importorskip("filelock")
    lease_cls = getattr(filelock, "SoftFileLease", None)
    if lease_cls is None:
        pytest.skip("this filelock has no SoftFileLease")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    c = DecisionCache(isolated)
    assert c.persistent
    (isolated / "v2").mkdir(parents=True, mode=0o700)  # (loading creates no folder: the first write does)
    kid = make_decision(3).key_id
    os.symlink(elsewhere, isolated / "v2" / "locks")
    with c.tuning_lock(kid) as held:
        assert held.result.value == "unavailable"  # the cross-process lock is refused, with a warning; tuning goes on
        assert os.listdir(elsewhere) == []
    assert _warnings(caplog, "tuning locks")
    theirs = lease_cls(str(isolated / "v2" / "locks" / f"{kid}.lock"), lease_duration=5.0, heartbeat_interval=0.5)
    theirs.acquire(timeout=5)
    try:
        assert os.listdir(elsewhere) == [f"{kid}.lock"]  # followed the link
    finally:
        theirs.release()


def test_forget_memory_writes_what_a_save_under_way_left_pending(isolated):
    """A call's save does not wait for a save under way elsewhere (the timer's): its decision stays
    pending. Dropping the memory then (a test's stand-in for a new process, or a cache-folder
    change) must write it first, not lose it."""
    import threading

    store = DecisionCache(isolated)
    first = make_decision(1)
    store.put(first)
    changed = with_chosen(first, error=0.25)
    held, release = threading.Event(), threading.Event()

    def other_save():
        with store._save_lock:
            held.set()
            release.wait(10)

    t = threading.Thread(target=other_save)
    t.start()
    held.wait(10)
    store.put(changed)  # its save finds the lock taken: pending
    assert changed.key_id in store._pending
    threading.Timer(0.2, release.set).start()
    store.forget_memory()
    t.join(10)
    fresh = DecisionCache(isolated).get(first.key_id, tolerance=float("inf"))
    assert fresh.candidates[fresh.backend].error == 0.25


def test_decisions_pending_when_the_cache_folder_changes_are_written_to_their_own_folder(tmp_path, monkeypatch):
    """DIFFSYNTH_ATTENTION_CACHE_DIR changed while a decision waited for its write (a save under way
    elsewhere): the decision goes to the folder it was made under, not lost, not to the new one."""
    import threading

    a, b = tmp_path / "a", tmp_path / "b"
    monkeypatch.setenv(config.CACHE_DIR, str(a))
    store = DecisionCache()
    store.put(make_decision(0))
    pending = make_decision(1)
    with store._save_lock:  # a save under way elsewhere: put's own save does not wait for it
        t = threading.Thread(target=store.put, args=(pending,))
        t.start()
        t.join(10)
    assert pending.key_id in store._pending
    monkeypatch.setenv(config.CACHE_DIR, str(b))
    assert store.get(pending.key_id, tolerance=float("inf")) is None  # the new folder has none
    assert DecisionCache(a).get(pending.key_id, tolerance=float("inf")) is not None
    assert DecisionCache(b).get(pending.key_id, tolerance=float("inf")) is None
