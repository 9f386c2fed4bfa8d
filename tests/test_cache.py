"""Issue 4: the on-disk cache under concurrency, crashes, bad files, read-only disks."""
import errno
import json
import os
import random
import signal
import stat
import subprocess
import sys
import time

import filelock
import pytest
import torch

import diffsynth_attention as da
from diffsynth_attention.store import cache as cache_mod
from diffsynth_attention.store.cache import parse_document
from diffsynth_attention.dispatch import default_dispatcher

store = default_dispatcher().store

from helpers import qkv

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


def _file(cache_dir):
    return cache_dir / "decisions.json"


def test_location_and_modes(isolated):
    q, k, v = qkv()
    da.explain(q, k, v)
    assert da.cache_dir() == isolated
    assert stat.S_IMODE(os.stat(isolated).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(_file(isolated)).st_mode) == 0o600
    assert not os.path.exists(str(_file(isolated)) + ".tmp")
    assert (isolated / "decisions.json.lock").exists()  # the lock sits beside the data file


def test_default_location_is_platformdirs(monkeypatch):
    import platformdirs

    monkeypatch.delenv("DIFFSYNTH_ATTENTION_CACHE_DIR")
    assert str(da.cache_dir()) == platformdirs.user_cache_dir("diffsynth_attention")


def test_file_matches_schema_and_keeps_every_field(isolated):
    q, k, v = qkv()
    da.explain(q, k, v)
    doc = json.loads(_file(isolated).read_text())
    assert doc["schema_version"] == 1
    (entry,) = doc["entries"].values()
    assert set(entry) >= {"key", "backend", "candidates", "tolerance", "created", "tuning_seconds"}
    assert entry["candidates"]["torch"]["error"] is not None
    assert entry["candidates"]["torch_cudnn"]["reason"]
    parse_document(_file(isolated).read_text())  # valid against the schema


def test_second_process_reuses_decisions_without_tuning(subprocess_env):
    first = run_py(TUNE_SCRIPT, subprocess_env, "[17, 23]")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout.splitlines()[-1])["tunings"] == 2
    second = run_py(TUNE_SCRIPT, subprocess_env, "[17, 23]")
    assert second.returncode == 0, second.stderr
    stats = json.loads(second.stdout.splitlines()[-1])
    assert stats["tunings"] == 0 and stats["hits"] == 2


def test_a_hit_does_no_file_io(isolated, monkeypatch):
    q, k, v = qkv()
    da.attention_forward(q, k, v)
    opened = []
    real_open = open

    def spy(*a, **kw):
        opened.append(a[0])
        return real_open(*a, **kw)

    monkeypatch.setattr("builtins.open", spy)
    monkeypatch.setattr(os, "open", lambda *a, **kw: opened.append(a[0]))
    for _ in range(5):
        da.attention_forward(q, k, v)
    assert opened == []


def test_sixteen_concurrent_tuners_lose_nothing(subprocess_env, isolated):
    procs, expected = [], set()
    for i in range(16):
        seqs = list(range(2 + i * 20, 2 + i * 20 + 25))  # 5 keys shared with the next process
        expected.update(seqs)
        procs.append(subprocess.Popen([sys.executable, "-c", TUNE_SCRIPT, json.dumps(seqs)], env={**subprocess_env, "DIFFSYNTH_ATTENTION_TUNING_BUDGET": "0.002"},
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    entries = parse_document(_file(isolated).read_text())
    seqs = {d.key["problem"]["seq_q"] for d in entries.values()}
    assert seqs == expected and len(entries) == len(expected)


WRITER = r"""
import sys
from diffsynth_attention.store.cache import DecisionCache
from diffsynth_attention.store.decision import Candidate, Decision
c = DecisionCache()
i = int(sys.argv[1])
while True:
    d = Decision(key_id=f"{i:024x}", key={"problem": {"batch": 1, "heads_q": 1, "heads_kv": 1, "seq_q": i + 1, "seq_kv": 1,
        "head_dim": 8, "head_dim_v": 8, "dtype": "float32", "layout": "x", "mask": "none", "mask_shape": None, "causal": False,
        "window": None, "requires_grad": False}, "device": {"type": "cpu", "name": "cpu"}, "versions": {"torch": "t", "diffsynth_attention": "0"}},
        backend="torch", candidates={"torch": Candidate("chosen", 1.0, 0.0)}, created="2026-01-01T00:00:00+00:00")
    c.put(d)
    print(i, flush=True)
    i += 1
"""


def test_killed_writers_never_leave_a_torn_file(subprocess_env, isolated):
    rng = random.Random(0)
    saved = -1
    for _ in range(6):
        p = subprocess.Popen([sys.executable, "-c", WRITER, str(saved + 1)], env=subprocess_env, stdout=subprocess.PIPE, text=True)
        first = p.stdout.readline()  # started and saved at least once
        assert first, "writer did not start"
        time.sleep(rng.uniform(0.05, 0.4))
        p.send_signal(signal.SIGKILL)
        rest = p.stdout.read()
        p.wait()
        lines = [int(x) for x in (first + rest).split()]
        saved = max(lines)
        entries = parse_document(_file(isolated).read_text())  # always parses
        have = {int(k, 16) for k in entries}
        assert set(range(saved + 1)) <= have, "a decision saved before the kill was lost"


BAD = {
    "unparsable": "{not json",
    "truncated": None,  # filled from a real file
    "wrong_version": json.dumps({"schema_version": 99, "entries": {}}),
    "wrong_type": json.dumps({"schema_version": 1, "entries": {"0" * 24: {"key": 3}}}),
    "unknown_backend": None,
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_files_warn_once_are_set_aside_and_replaced(case, isolated, caplog):
    q, k, v = qkv()
    da.explain(q, k, v)
    good = _file(isolated).read_text()
    if case == "truncated":
        text = good[: len(good) // 2]
    elif case == "unknown_backend":
        doc = json.loads(good)
        next(iter(doc["entries"].values()))["backend"] = "flash_attention_9"
        text = json.dumps(doc)
    else:
        text = BAD[case]
    _file(isolated).write_text(text)
    store.forget_memory()
    info = da.explain(q, k, v)
    q2, k2, v2 = qkv(sq=40)
    da.explain(q2, k2, v2)
    assert info.source == "tuned"  # a miss, not a crash
    bad = [r for r in caplog.records if "bad cache file" in r.message]
    assert len(bad) == 1
    aside = list(isolated.glob("decisions.json.bad-*"))
    assert len(aside) == 1 and aside[0].read_text() == text
    assert len(parse_document(_file(isolated).read_text())) == 2  # a valid file again


def test_entries_for_other_versions_are_not_matched(isolated, monkeypatch):
    q, k, v = qkv()
    da.explain(q, k, v)
    from diffsynth_attention.store import key as key_mod

    monkeypatch.setattr(key_mod, "_runtime_versions", lambda: (("diffsynth_attention", "0.1.0"), ("torch", "9.9.9")))
    store.forget_memory()
    assert da.explain(q, k, v).source == "tuned"
    assert len(parse_document(_file(isolated).read_text())) == 2  # the old decision is kept, unused


@pytest.mark.parametrize("why", ["group_writable", "symlink", "other_owner"])
def test_untrusted_places_keep_decisions_in_memory(why, isolated, tmp_path, monkeypatch, caplog):
    if why == "group_writable":
        isolated.mkdir(mode=0o700)
        os.chmod(isolated, 0o770)
    elif why == "symlink":
        real = tmp_path / "real"
        real.mkdir(mode=0o700)
        os.symlink(real, isolated)
    else:
        if os.getuid() != 0:
            pytest.skip("chown to another user needs root")
        isolated.mkdir(mode=0o700)
        os.chown(isolated, 12345, 12345)
    q, k, v = qkv()
    da.explain(q, k, v)
    da.attention_forward(q, k, v)
    assert da.stats()["tunings"] == 1  # remembered in memory
    assert not store.persistent
    assert sum("not trusted" in r.message for r in caplog.records) == 1
    target = tmp_path / "real" if why == "symlink" else isolated
    assert not (target / "decisions.json").exists()


@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOSPC, errno.EACCES])
def test_read_only_or_full_disk_keeps_decisions_in_memory(code, isolated, monkeypatch, caplog):
    def refuse(*a, **kw):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(cache_mod.tempfile, "mkstemp", refuse)
    q, k, v = qkv()
    out = da.attention_forward(q, k, v)
    assert out.shape == q.shape
    for s in (20, 24):
        qq = torch.randn(1, 2, s, 8)
        da.attention_forward(qq, qq, qq)
    assert da.stats()["tunings"] == 3
    assert sum("cannot write" in r.message for r in caplog.records) == 1
    da.attention_forward(q, k, v)
    assert da.stats()["hits"] == 1


def test_read_only_directory_for_real(isolated, caplog):
    if os.getuid() == 0:
        pytest.skip("root ignores directory permissions; see test_read_only_or_full_disk_keeps_decisions_in_memory")
    isolated.mkdir(mode=0o500)
    q, k, v = qkv()
    da.attention_forward(q, k, v)
    assert any("cannot" in r.message for r in caplog.records)


def test_lock_timeout_keeps_decision_in_memory_then_saves_later(isolated, monkeypatch, caplog):
    monkeypatch.setenv("DIFFSYNTH_ATTENTION_LOCK_TIMEOUT", "0.1")
    q, k, v = qkv()
    da.explain(q, k, v)  # creates the folder
    holder = filelock.FileLock(str(isolated / "decisions.json.lock"))
    q2, k2, v2 = qkv(sq=40)
    with holder:
        import threading

        result = {}
        t = threading.Thread(target=lambda: result.update(info=da.explain(q2, k2, v2)))
        t.start()
        t.join(30)
    assert result["info"].source == "tuned"
    assert any("timed out" in r.message for r in caplog.records)
    assert len(parse_document(_file(isolated).read_text())) == 1
    assert store.flush(timeout=5)  # what runs at exit: writes the pending decision
    assert os.environ["DIFFSYNTH_ATTENTION_LOCK_TIMEOUT"] == "0.1"  # and leaves the environment alone
    assert len(parse_document(_file(isolated).read_text())) == 2


def test_clear_cache_takes_the_lock_and_removes(isolated):
    for s in (16, 20):
        q, k, v = qkv(sq=s)
        da.explain(q, k, v)
    assert da.clear_cache(backend="flash_attention_4") == 0
    assert da.clear_cache() == 2
    assert parse_document(_file(isolated).read_text()) == {}
    q, k, v = qkv(sq=16)
    assert da.explain(q, k, v).source == "tuned"


def test_package_schema_is_the_documented_schema():
    root = os.path.dirname(os.path.dirname(__file__))
    with open(os.path.join(root, "cache_schema", "decisions.schema.json")) as a, open(cache_mod._SCHEMA_FILE) as b:
        assert a.read() == b.read()
