"""The on-disk cache under concurrency and crashes: many processes, killed writers, a stopped
or dead tuner, threads in memory-only mode."""
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

import diffsynth_attention as da
from diffsynth_attention.dispatch import default_dispatcher
from diffsynth_attention.store import cache as cache_mod
from diffsynth_attention.store import lock as lock_mod
from diffsynth_attention.store.cache import DecisionCache

from support.store_helpers import PREAMBLE, make_decision
from support.cache_files import entries as _entries, warnings_with as _warnings



store = default_dispatcher().store


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
