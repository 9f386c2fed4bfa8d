"""The on-disk cache (one file per decision) under concurrency, crashes, bad
files, unusable places and full disks."""
import dataclasses
import errno
import json
import logging
import os
import random
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import jsonschema
import pytest
import torch

import diffsynth_attention as da
from diffsynth_attention.dispatch import default_dispatcher
from diffsynth_attention.store import cache as cache_mod
from diffsynth_attention.store import codec
from diffsynth_attention.store import fs as fs_mod
from diffsynth_attention.store import lock as lock_mod
from diffsynth_attention.store.cache import CacheFileError, DecisionCache, parse_document, render_document
from diffsynth_attention.store.key import key_id

from support.helpers import qkv
from support.store_helpers import PREAMBLE, make_decision

store = default_dispatcher().store
ROOT = Path(__file__).resolve().parents[2]

TUNE_SCRIPT = r"""
import json, sys, torch
import diffsynth_attention as da
for s in json.loads(sys.argv[1]):
    q = torch.randn(1, 1, s, 8)
    da.attention_forward(q, q, q)
print(json.dumps(da.stats()))
"""


def run_py(code, env, *args, timeout=300):
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=timeout)


def _entries(cache):
    return sorted((cache / "v2").glob("*.json"))


def _only_entry(cache):
    (path,) = _entries(cache)
    return path


def _warnings(caplog, text):
    return [r for r in caplog.records if r.levelno >= logging.WARNING and text in r.getMessage()]


@pytest.fixture
def store_env(subprocess_env):
    return dict(subprocess_env, DA_ROOT=str(ROOT))


def test_location_modes_and_no_leftovers(isolated):
    q, k, v = qkv()
    info = da.explain(q, k, v)
    assert da.cache_dir() == isolated
    assert stat.S_IMODE(os.stat(isolated).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(isolated / "v2").st_mode) == 0o700
    entry = _only_entry(isolated)
    assert entry.name == f"{info.key_id}.json"
    assert stat.S_IMODE(os.stat(entry).st_mode) == 0o600
    names = os.listdir(isolated / "v2")
    assert not [n for n in names if n.startswith(".tmp")]
    assert not os.listdir(isolated / "v2" / "locks")  # the tuning lock file is removed on release


def test_default_location_is_platformdirs(monkeypatch):
    import platformdirs

    monkeypatch.delenv("DIFFSYNTH_ATTENTION_CACHE_DIR")
    assert str(da.cache_dir()) == platformdirs.user_cache_dir("diffsynth_attention")


def test_entry_file_matches_schema_and_keeps_every_field(isolated):
    q, k, v = qkv()
    da.explain(q, k, v)
    doc = json.loads(_only_entry(isolated).read_text())
    jsonschema.Draft202012Validator(json.loads(codec.SCHEMA_FILE.read_text())).validate(doc)
    assert doc["schema_version"] == 3 and doc["id"] == key_id(doc["entry"]["key"])
    entry = doc["entry"]
    assert set(entry) >= {"key", "backend", "candidates", "tolerance", "created", "tuning_seconds"}
    assert entry["candidates"]["torch"]["error"] is not None
    assert entry["candidates"]["torch_cudnn"]["reason"]


def test_second_process_reuses_decisions_without_tuning(subprocess_env):
    first = run_py(TUNE_SCRIPT, subprocess_env, "[17, 23]")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout.splitlines()[-1])["tunings"] == 2
    second = run_py(TUNE_SCRIPT, subprocess_env, "[17, 23]")
    assert second.returncode == 0, second.stderr
    stats = json.loads(second.stdout.splitlines()[-1])
    assert stats["tunings"] == 0 and stats["hits"] == 2


def test_a_hit_does_no_file_io_and_a_miss_opens_one_file(isolated, monkeypatch):
    q, k, v = qkv()
    da.attention_forward(q, k, v)
    opened = []
    real_open, real_os_open = open, os.open

    def spy(*a, **kw):
        opened.append(a[0])
        return real_open(*a, **kw)

    def os_spy(*a, **kw):
        opened.append(a[0])
        return real_os_open(*a, **kw)

    monkeypatch.setattr("builtins.open", spy)
    monkeypatch.setattr(os, "open", os_spy)
    for _ in range(5):
        da.attention_forward(q, k, v)
    assert opened == []
    kid = make_decision(5).key_id
    assert store.get(kid) is None
    assert [n for n in opened if isinstance(n, str) and n.endswith(".json")] == [f"{kid}.json"]


CONTENDER = PREAMBLE + r"""
import json, random, time
p = int(sys.argv[1])
keys = [100000 + 100 * p + j for j in range(25)] + list(range(10))  # 25 own, 10 shared by every process
random.Random(p).shuffle(keys)
c = DecisionCache()
tuned = []
for i in keys:
    d = make_decision(i)

    def tune(i=i, d=d):          # the fake "tuning": cheap, no attention
        tuned.append(i)
        time.sleep(0.002)
        return d
    c.get_or_tune(d.key_id, tune)
ok = c.flush()
print(json.dumps({"tuned": tuned, "flushed": ok, "persistent": c.persistent}))
"""


def test_32_processes_with_cpu_burners_lose_nothing_and_tune_shared_keys_once(store_env, isolated):
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        procs = [subprocess.Popen([sys.executable, "-c", CONTENDER, str(p)], env=store_env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for p in range(32)]
        results = []
        for p in procs:
            out, err = p.communicate(timeout=600)
            assert p.returncode == 0, err[-3000:]
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for b in burners:
            b.kill()
            b.wait()
    assert all(r["flushed"] and r["persistent"] for r in results)
    tuned = [i for r in results for i in r["tuned"]]
    for shared in range(10):
        assert tuned.count(shared) <= 1, f"shared key {shared} tuned {tuned.count(shared)} times"
    expected = {make_decision(i).key_id for i in list(range(10)) + [100000 + 100 * p + j for p in range(32) for j in range(25)]}
    assert len(expected) == 810
    on_disk = DecisionCache(isolated).entries()
    assert set(on_disk) == expected
    assert {p.stem for p in _entries(isolated)} == expected
    assert not os.listdir(isolated / "v2" / "locks")


WRITER = PREAMBLE + r"""
c = DecisionCache()
i = int(sys.argv[1])
while True:
    c.put(make_decision(i))
    print(i, flush=True)
    i += 1
"""


def test_killed_writers_never_leave_a_torn_entry(store_env, isolated):
    rng = random.Random(0)
    saved = -1
    for _ in range(5):
        p = subprocess.Popen([sys.executable, "-c", WRITER, str(saved + 1)], env=store_env, stdout=subprocess.PIPE, text=True)
        first = p.stdout.readline()
        assert first, "writer did not start"
        time.sleep(rng.uniform(0.05, 0.3))
        p.send_signal(signal.SIGKILL)
        rest = p.stdout.read()
        p.wait()
        saved = max(int(x) for x in (first + rest).split())
        fresh = DecisionCache(isolated)
        have = fresh.entries()
        assert {make_decision(i).key_id for i in range(saved + 1)} <= set(have), "a decision saved before the kill was lost"
        for path in _entries(isolated):  # every file is whole and valid
            cache_mod.parse_entry(path.read_bytes(), path.stem, path)


KILLED_MID_WRITE = PREAMBLE + r"""
import signal
c = DecisionCache(sys.argv[1])
c.put(make_decision(0))
real_write, calls = os.write, []
def dying_write(fd, data):  # the n-th write writes a part of its data, then the process is killed
    calls.append(fd)
    if len(calls) < int(sys.argv[2]):
        return real_write(fd, data)
    real_write(fd, bytes(data[: len(data) // 3]))
    os.kill(os.getpid(), signal.SIGKILL)
os.write = dying_write
c.put(make_decision(0, backend="torch_math"))
"""


@pytest.mark.parametrize("nth", [1, 2, 3])
def test_a_writer_killed_mid_write_leaves_the_old_or_the_new_entry(store_env, isolated, nth):
    r = subprocess.run([sys.executable, "-c", KILLED_MID_WRITE, str(isolated), str(nth)], env=store_env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode in (0, -signal.SIGKILL), r.stderr[-2000:]
    kid = make_decision(0).key_id
    backend = cache_mod.parse_entry((isolated / "v2" / f"{kid}.json").read_bytes(), kid).backend
    assert backend == ("torch" if r.returncode else "torch_math")


def _bad_text(case, good: str, kid: str):
    doc = json.loads(good)
    if case == "unparsable":
        return b"{not json"
    if case == "truncated":
        return good[: len(good) // 2].encode()
    if case == "non_utf8":
        return good.encode().replace(b'"torch"', b'"t\xff\xferch"', 1)
    if case == "nan":  # NaN where the schema's "minimum" would let it through
        return re.sub(r'"error": [0-9.e+-]+', '"error": NaN', good, count=1).encode()
    if case == "wrong_version":
        doc["schema_version"] = 1
    elif case == "wrong_type":
        doc["entry"]["key"] = 3
    elif case == "unknown_backend":
        doc["entry"]["backend"] = "flash_attention_9"
    elif case == "id_not_hash":
        doc["entry"]["key"]["problem"]["seq_q"] += 1  # the file name is no longer the hash of its key
    elif case == "too_big":
        doc["entry"]["candidates"]["torch"]["reason"] = "x" * (cache_mod.MAX_ENTRY_BYTES + 1)
    return json.dumps(doc).encode()


BAD = ["unparsable", "truncated", "non_utf8", "nan", "wrong_version", "wrong_type", "unknown_backend", "id_not_hash", "too_big"]


@pytest.mark.parametrize("case", BAD)
def test_a_bad_entry_is_a_miss_for_that_key_alone(case, isolated, caplog):
    q, k, v = qkv()
    info = da.explain(q, k, v)
    other = make_decision(9)
    store.put(other)
    path = isolated / "v2" / f"{info.key_id}.json"
    bad = _bad_text(case, path.read_text(), info.key_id)
    path.write_bytes(bad)
    store.forget_memory()
    default_dispatcher().reset()
    assert store.get(other.key_id).backend == "torch"  # the good entry is still read
    again = da.explain(q, k, v)
    assert again.source == "tuned"  # a miss, not a crash
    assert len(_warnings(caplog, "bad cache entry")) == 1
    aside = list((isolated / "v2").glob(f"{info.key_id}.json.bad-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == bad
    fresh = DecisionCache(isolated)
    assert set(fresh.entries()) == {info.key_id, other.key_id}  # a valid entry again


UNREADABLE = ["fifo", "directory", "mode_0200", "symlink", "other_owner"]


@pytest.mark.parametrize("case", UNREADABLE)
def test_an_unreadable_entry_is_a_miss_and_never_overwritten(case, isolated, tmp_path, caplog):
    q, k, v = qkv()
    info = da.explain(q, k, v)
    path = isolated / "v2" / f"{info.key_id}.json"
    text = path.read_text()
    path.unlink()
    if case == "fifo":
        os.mkfifo(path, 0o600)
    elif case == "directory":
        path.mkdir(mode=0o700)
    elif case == "mode_0200":
        path.write_text(text)
        os.chmod(path, 0o200)
    elif case == "symlink":
        target = tmp_path / "elsewhere.json"
        target.write_text(text)
        os.symlink(target, path)
    else:
        if os.getuid() != 0:
            pytest.skip("chown to another user needs root")
        path.write_text(text)
        os.chown(path, 12345, 12345)
    before = os.lstat(path)
    store.forget_memory()
    default_dispatcher().reset()
    done = {}
    t = threading.Thread(target=lambda: done.update(info=da.explain(q, k, v)), daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), "the call hung"
    assert done["info"].source == "tuned"
    da.attention_forward(q, k, v)
    assert da.stats()["tunings"] == 1 and da.stats()["hits"] == 1  # kept in memory
    after = os.lstat(path)
    assert (after.st_ino, stat.S_IFMT(after.st_mode), after.st_mtime_ns) == (before.st_ino, stat.S_IFMT(before.st_mode), before.st_mtime_ns)
    assert len(_warnings(caplog, "never overwritten")) == 1
    if case == "symlink":
        assert (tmp_path / "elsewhere.json").read_text() == text


def test_a_directory_or_symlink_in_place_of_locks_still_tunes(isolated, tmp_path, caplog):
    q, k, v = qkv()
    kid = da.explain(q, k, v).key_id
    (isolated / "v2" / f"{kid}.json").unlink()
    (isolated / "v2" / "locks" / f"{kid}.lock").mkdir()  # a directory in place of the lock file
    store.forget_memory()
    default_dispatcher().reset()
    assert da.explain(q, k, v).source == "tuned"
    assert len(_warnings(caplog, "tuning lock")) == 1
    assert (isolated / "v2" / f"{kid}.json").exists()
    # a symbolic link in place of locks/: not followed
    os.rmdir(isolated / "v2" / "locks" / f"{kid}.lock")
    os.rmdir(isolated / "v2" / "locks")
    target = tmp_path / "attacker-locks"
    target.mkdir()
    os.symlink(target, isolated / "v2" / "locks")
    q2, k2, v2 = qkv(sq=40)
    assert da.explain(q2, k2, v2).source == "tuned"
    assert os.listdir(target) == []
    assert len(_warnings(caplog, "tuning lock")) == 2


@pytest.mark.parametrize("why", ["group_writable", "symlink", "other_owner", "under_a_file", "v2_symlink", "v2_group_writable"])
def test_untrusted_or_unusable_places_keep_decisions_in_memory(why, isolated, tmp_path, monkeypatch, caplog):
    target = isolated
    if why == "group_writable":
        isolated.mkdir(mode=0o700)
        os.chmod(isolated, 0o770)
    elif why == "symlink":
        target = tmp_path / "real"
        target.mkdir(mode=0o700)
        os.symlink(target, isolated)
    elif why == "other_owner":
        if os.getuid() != 0:
            pytest.skip("chown to another user needs root")
        isolated.mkdir(mode=0o700)
        os.chown(isolated, 12345, 12345)
    elif why == "under_a_file":
        (tmp_path / "afile").write_text("x")
        target = tmp_path / "afile" / "sub"
        monkeypatch.setenv("DIFFSYNTH_ATTENTION_CACHE_DIR", str(target))
    elif why == "v2_symlink":
        isolated.mkdir(mode=0o700)
        (tmp_path / "real-v2").mkdir(mode=0o700)
        os.symlink(tmp_path / "real-v2", isolated / "v2")
    else:
        (isolated / "v2").mkdir(mode=0o700, parents=True)
        os.chmod(isolated / "v2", 0o775)
    q, k, v = qkv()
    da.explain(q, k, v)
    da.attention_forward(q, k, v)
    assert da.stats()["tunings"] == 1  # remembered in memory
    assert not store.persistent
    assert len(_warnings(caplog, "decisions stay in memory")) == 1
    assert not list(tmp_path.rglob("*.json"))
    store.flush()
    assert len(_warnings(caplog, "1 decision(s) could not be written")) == 1  # never dropped silently


def test_untraversable_parent_keeps_decisions_in_memory(store_env, tmp_path, monkeypatch, caplog):
    parent = tmp_path / "locked"
    parent.mkdir()
    os.chmod(parent, 0)
    if os.getuid() == 0:  # root traverses anything: the kernel's answer to anyone else, simulated
        real = {name: getattr(os, name) for name in ("open", "mkdir", "stat", "lstat")}

        def deny(name):
            def fn(path, *a, **kw):
                if str(path).startswith(str(parent) + os.sep):
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
                return real[name](path, *a, **kw)
            return fn

        for name in real:
            monkeypatch.setattr(os, name, deny(name))
        c = DecisionCache(parent / "cache")
        d = make_decision(1)
        c.put(d)
        assert c.get(d.key_id) is d and not c.persistent
        assert len(_warnings(caplog, "decisions stay in memory")) == 1
        return
    code = PREAMBLE + r"""
import logging; logging.basicConfig(level=logging.WARNING)
c = DecisionCache(sys.argv[1])
d = make_decision(1)
c.put(d)
assert c.get(d.key_id) is d and not c.persistent
print("ok")
"""
    try:
        r = subprocess.run([sys.executable, "-c", code, str(parent / "cache")], env=store_env, capture_output=True, text=True, timeout=120)
    finally:
        os.chmod(parent, 0o700)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
    assert "decisions stay in memory" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOSPC, errno.EACCES, errno.EFBIG])
def test_a_disk_that_refuses_writes_keeps_decisions_in_memory_and_says_how_many(code, isolated, monkeypatch, caplog):
    def refuse(*a, **kw):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fs_mod, "open_temp", refuse)
    q, k, v = qkv()
    out = da.attention_forward(q, k, v)
    assert out.shape == q.shape
    for s in (20, 24):
        qq = torch.randn(1, 2, s, 8)
        da.attention_forward(qq, qq, qq)
    assert da.stats()["tunings"] == 3
    refused = _warnings(caplog, "cannot write")
    assert len(refused) == 1 and "1 not on disk" in refused[0].getMessage()
    da.attention_forward(q, k, v)
    assert da.stats()["hits"] == 1
    assert not store.flush()
    assert len(_warnings(caplog, "3 decision(s) could not be written")) == 1
    assert not _entries(isolated)


def test_efbig_for_real(store_env, isolated):
    code = PREAMBLE + r"""
import logging, resource
logging.basicConfig(level=logging.WARNING)
c = DecisionCache(sys.argv[1])
assert c.persistent
resource.setrlimit(resource.RLIMIT_FSIZE, (200, 200))   # an entry is bigger than this
ds = [make_decision(i) for i in range(3)]
for d in ds:
    c.put(d)
assert all(c.get(d.key_id) is d for d in ds) and not c.persistent
assert not c.flush()
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code, str(isolated)], env=store_env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
    assert r.stderr.count("cannot write") == 1 and "File too large" in r.stderr
    assert "3 decision(s) could not be written" in r.stderr
    assert not _entries(isolated) and not [n for n in os.listdir(isolated / "v2") if n.startswith(".tmp")]


def test_folder_swapped_after_load_is_not_obeyed(isolated, tmp_path, caplog):
    q, k, v = qkv()
    da.explain(q, k, v)
    q2, k2, v2 = qkv(sq=40)
    planted_kid = da.explain(q2, k2, v2).key_id
    planted = (isolated / "v2" / f"{planted_kid}.json").read_text().replace('"backend": "torch"', '"backend": "torch_math"')
    default_dispatcher().reset()
    store._entries.pop(planted_kid)
    os.rename(isolated, tmp_path / "moved")
    swapped = isolated / "v2"
    swapped.mkdir(parents=True, mode=0o700)
    (swapped / f"{planted_kid}.json").write_text(planted)
    os.chmod(isolated, 0o777)  # attacker-writable
    info = da.explain(q2, k2, v2)
    assert info.source == "tuned" and not store.persistent
    assert len(_warnings(caplog, "not trusted")) == 1
    assert not (swapped / "locks").exists()
    assert (swapped / f"{planted_kid}.json").read_text() == planted


def test_a_stopped_or_dead_tuner_is_detected_within_seconds(store_env, isolated, monkeypatch, caplog):
    monkeypatch.setattr(lock_mod, "STALE_S", 1.0)
    monkeypatch.setenv("DIFFSYNTH_ATTENTION_TUNE_WAIT", "40")  # a broken detector fails in 40 s, not 300
    kid = make_decision(7).key_id
    holder = PREAMBLE + r"""
import signal
c = DecisionCache(sys.argv[1])
with c.tuning_lock(sys.argv[2]) as held:
    print(bool(held), flush=True)
    if sys.argv[3] == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    else:
        os._exit(0)  # dies holding the lock
"""
    mine = DecisionCache(isolated)
    for how in ("stop", "die"):
        p = subprocess.Popen([sys.executable, "-c", holder, str(isolated), kid, how], env=store_env, stdout=subprocess.PIPE, text=True)
        try:
            assert p.stdout.readline().strip() == "True"
            if how == "die":
                p.wait(30)
            t0 = time.monotonic()
            with mine.tuning_lock(kid) as held:
                waited = time.monotonic() - t0
            assert waited < 30  # TUNE_WAIT is 300 s: the stale heartbeat, or the dead holder, ended the wait
            assert bool(held) is (how == "die")
        finally:
            p.kill()
            p.wait()
    assert len(_warnings(caplog, "no sign of life")) == 1


def test_memory_only_mode_tunes_each_key_once_across_threads(isolated, tmp_path):
    isolated.mkdir(mode=0o700)
    os.chmod(isolated, 0o777)  # untrusted: memory only
    c = DecisionCache(isolated)
    assert not c.persistent
    tuned, lock = [], threading.Lock()

    def worker(seed):
        order = list(range(20))
        random.Random(seed).shuffle(order)
        for i in order:
            d = make_decision(i)

            def tune(i=i, d=d):
                with lock:
                    tuned.append(i)
                time.sleep(0.001)
                return d
            c.get_or_tune(d.key_id, tune)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(tuned) == list(range(20))


def test_memory_only_dispatcher_threads_agree(isolated):
    isolated.mkdir(mode=0o700)
    os.chmod(isolated, 0o777)
    shapes = [16, 20, 24]
    backends = {}

    def worker():
        for s in shapes:
            q = torch.randn(1, 2, s, 8)
            backends.setdefault(s, set()).add(da.explain(q, q, q).backend)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert da.stats()["tunings"] == len(shapes)
    assert all(len(b) == 1 for b in backends.values())


def _v1_document(entries: dict) -> str:
    doc = json.loads(render_document(entries))
    doc["schema_version"] = 1
    return json.dumps(doc)


def test_v1_file_is_migrated_once_without_loss(isolated, caplog):
    decisions = {d.key_id: d for d in (make_decision(i) for i in range(30))}
    doc = json.loads(_v1_document(decisions))
    doc["entries"]["f" * 24] = {"backend": "nope"}  # one invalid entry: skipped, kept in the old file
    newer = make_decision(0, backend="torch_math")
    isolated.mkdir(mode=0o700)
    (isolated / "decisions.json").write_text(json.dumps(doc))
    (isolated / "decisions.json.lock").write_text("")
    (isolated / "v2").mkdir(mode=0o700)
    (isolated / "v2" / f"{newer.key_id}.json").write_text(cache_mod.render_entry(newer))  # v2 wins over v1
    c = DecisionCache(isolated)
    have = c.entries()
    assert set(have) == set(decisions)
    assert have[newer.key_id].backend == "torch_math"
    assert not (isolated / "decisions.json").exists() and not (isolated / "decisions.json.lock").exists()
    assert (isolated / "decisions.json.v1-migrated").exists()
    assert len(_warnings(caplog, "failed validation and were not migrated")) == 1
    (isolated / "v2" / f"{make_decision(1).key_id}.json").unlink()
    assert make_decision(1).key_id not in DecisionCache(isolated).entries()  # once: never migrated again


def test_leftovers_are_removed_and_bounded(isolated, caplog):
    c = DecisionCache(isolated)
    assert c.persistent
    v2 = isolated / "v2"
    v2.mkdir(parents=True, mode=0o700)  # (loading creates no folder: the first write does)
    old, new = v2 / ".tmp-old", v2 / ".tmp-new"
    for p in (old, new):
        p.write_text("x")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    (v2 / "locks").mkdir(exist_ok=True)
    abandoned = v2 / "locks" / ("a" * 24 + ".lock")
    abandoned.write_text("")
    os.utime(abandoned, (time.time() - 7200, time.time() - 7200))
    for i in range(8):  # 8 bad entries: the last 5 copies are kept
        (v2 / f"{make_decision(i).key_id}.json").write_text("{bad")
    c = DecisionCache(isolated)
    assert c.persistent  # loading sweeps
    assert not old.exists() and new.exists() and not abandoned.exists()
    for i in range(8):
        assert c.get(make_decision(i).key_id) is None
    assert len(list(v2.glob("*.bad-*"))) == cache_mod.BAD_KEPT
    assert len(_warnings(caplog, "bad cache entry")) == 8


def test_clear_cache_removes_from_memory_and_disk(isolated):
    for s in (16, 20):
        q, k, v = qkv(sq=s)
        da.explain(q, k, v)
    assert da.clear_cache(backend="flash_attention_4") == 0
    assert len(_entries(isolated)) == 2
    assert da.clear_cache() == 2
    assert not _entries(isolated) and DecisionCache(isolated).entries() == {}
    q, k, v = qkv(sq=16)
    assert da.explain(q, k, v).source == "tuned"


def test_documents_refuse_bad_ids_nan_and_oversize():
    d = make_decision(3)
    good = json.loads(render_document({d.key_id: d}))
    assert set(parse_document(json.dumps(good))) == {d.key_id}
    for bad_id in ("../../etc/passwd", make_decision(4).key_id, "A" * 24):
        doc = {"schema_version": 2, "entries": {bad_id: good["entries"][d.key_id]}}
        with pytest.raises(CacheFileError):
            parse_document(json.dumps(doc))
    with pytest.raises(CacheFileError, match="JSON"):
        parse_document(json.dumps(good).replace('"tolerance": 0.005', '"tolerance": NaN'))
    with pytest.raises(CacheFileError, match="cap"):
        parse_document(" " * (cache_mod.MAX_DOCUMENT_BYTES + 1))
    nan = make_decision(5)
    nan = nan.replace(candidates={**nan.candidates, "torch": dataclasses.replace(nan.candidates["torch"], error=float("nan"))})
    # written as null, never as NaN
    assert "NaN" not in cache_mod.render_entry(nan)


def test_one_schema_and_its_documentation_agree():
    assert not (ROOT / "cache_schema" / "decisions.schema.json").exists()  # one copy: the package's
    schema = json.loads(codec.SCHEMA_FILE.read_text())["$defs"]
    doc = (ROOT / "cache_schema" / "README.md").read_text()
    documented = set(re.findall(r"`entry\.([a-z_]+)", doc))
    assert documented | {"compile_seconds"} == set(schema["entry"]["properties"]) and "`compile_seconds`" in doc
    statuses = re.search(r"`status` \(([a-z, ]+)\)", doc).group(1).split(", ")
    assert statuses == schema["candidate"]["properties"]["status"]["enum"]
    for field in schema["candidate"]["properties"]:
        assert f"`{field}`" in doc, field
    for field in schema["key"]["properties"]["problem"]["required"]:
        assert field in doc, field


def test_cache_import_refuses_oversize_and_forged_entries(subprocess_env, tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "diffsynth_attention", *args], env=subprocess_env, capture_output=True,
                              text=True, timeout=300, stdin=subprocess.DEVNULL)

    big = tmp_path / "big.json"
    with open(big, "wb") as fh:
        fh.truncate(cache_mod.MAX_DOCUMENT_BYTES + 1)
    d = make_decision(2)
    doc = json.loads(render_document({d.key_id: d}))
    forged = tmp_path / "forged.json"
    forged.write_text(json.dumps({"schema_version": 2, "entries": {"../../etc/passwd": doc["entries"][d.key_id]}}))
    for path, why in ((big, "cap"), (forged, "not a key id")):
        r = cli("cache", "import", str(path))
        assert r.returncode == 1 and r.stderr.startswith("error: refused") and why in r.stderr, r.stderr
