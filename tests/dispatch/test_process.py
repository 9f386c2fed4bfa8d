"""Fork and threads (issue 33, item 5): every lock of the package is unlocked in a forked child
(diffsynth_attention/process.py, one at-fork handler); the counters lose no update when many
threads count at once; ``explain``'s source is the plan's own, whatever other threads tune."""
import ast
import sys
import threading
from pathlib import Path

import pytest

import diffsynth_attention
from diffsynth_attention.dispatch.counters import Counters

from support.helpers import qkv
from support.subprocesses import prespawn, python_c, results

PACKAGE = Path(diffsynth_attention.__file__).parent

# A fresh interpreter: every lock the package owns exists (module locks, a dispatcher's, its
# store's, a key's, an LSE selector's, a backend's load lock); a thread of the parent holds them
# all at the fork, the forking thread holds an RLock of its own. The child must take each lock,
# still own its RLock, and serve a call that tunes (the dispatcher, key and store locks).
FORK = r"""
import os, sys, tempfile, threading, torch
from diffsynth_attention import process
from diffsynth_attention.backends import REGISTRY, loading
from diffsynth_attention.dispatch import Dispatcher, lowprec, tokens
from diffsynth_attention.integrations import diffusers, lse, patching
from diffsynth_attention import flex
from diffsynth_attention.store.cache import DecisionCache

d = Dispatcher(DecisionCache(tempfile.mkdtemp()))
named = {"Dispatcher._lock": d._lock, "lowprec._fallback_lock": lowprec._fallback_lock,
         "patching._state_lock": patching._state_lock, "lse._selector_lock": lse._selector_lock,
         "LseSelector._lock": lse.LseSelector(d)._lock, "diffusers._lock": diffusers._lock, "flex._lock": flex._lock,
         "loading._lock": loading._lock, "tokens._LOCK": tokens._LOCK, "cache._mutex": d.store._mutex,
         "cache._save_lock": d.store._save_lock, "KeyLocks._mutex": d.store._locks._mutex,
         "a key's lock": d.store._locks.get("k" * 24), "a backend's load lock": REGISTRY["xformers"]._load_lock}
owned = list(process._locks)  # every live lock made by the process module
missing = [n for n, lock in named.items() if not any(lock is o for o in owned)]
assert not missing, f"not made by diffsynth_attention.process: {missing}"
names = {id(lock): n for n, lock in named.items()}
held, release = threading.Event(), threading.Event()

def hold():
    for lock in owned:
        lock.acquire()
    held.set()
    release.wait()
    for lock in reversed(owned):
        lock.release()

t = threading.Thread(target=hold)
t.start()
assert held.wait(60)
mine = process.new_rlock()
mine.acquire()
pid = os.fork()
if pid == 0:
    code = 0
    try:
        stuck = [names.get(id(lock), repr(lock)) for lock in owned if not lock.acquire(timeout=1)]
        if stuck:
            print("STUCK", len(stuck), "of", len(owned), sorted(n for n in stuck if n in named), flush=True)
            os._exit(1)
        for lock in owned:
            lock.release()
        if not mine._is_owned():
            print("the forking thread lost its RLock", flush=True)
            code = 1
        mine.release()
        q = torch.randn(1, 2, 8, 8)
        out = d.forward(q, q, q)
        print("CHILD", d.stats()["tunings"], d.explain(q, q, q).source, tuple(out.shape), flush=True)
    except BaseException as exc:
        print("CHILD FAILED", repr(exc), flush=True)
        code = 1
    os._exit(code)
release.set()
t.join()
_, status = os.waitpid(pid, 0)
print("EXIT", os.waitstatus_to_exitcode(status))
"""


def test_a_forked_child_can_take_every_lock_the_package_owns(children):
    r = children["fork"].get()
    assert r.returncode == 0, r.stderr
    assert "STUCK" not in r.stdout and "FAILED" not in r.stdout, r.stdout
    assert "CHILD 1 cache (1, 2, 8, 8)" in r.stdout and "EXIT 0" in r.stdout, r.stdout + r.stderr


def test_every_lock_of_the_package_is_made_by_the_process_module():
    """A lock made with ``threading.Lock()`` elsewhere would stay held in a forked child."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "process.py" and path.parent == PACKAGE:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr in ("Lock", "RLock", "Condition", "Semaphore", "BoundedSemaphore"):
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert found == []


@pytest.fixture
def switching():
    """Threads switch as often as they can: a count that is not atomic loses updates."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(previous)


def test_counters_lose_no_update_across_threads(switching):
    counters = Counters()
    threads, per = 8, 5000
    barrier = threading.Barrier(threads + 1)

    def work(i):
        barrier.wait()
        for n in range(per):
            counters.hit()
            if n % 500 == 0:
                counters.tuned(0.5)
                counters.snapshot()  # reads take values of the hit count too: never counted as hits

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    barrier.wait()
    while any(w.is_alive() for w in workers):
        snap = counters.snapshot()
        assert snap["tuning_seconds"] == snap["tunings"] * 0.5  # one moment: the two agree
    for w in workers:
        w.join()
    assert counters.snapshot() == {"hits": threads * per, "tunings": threads * per // 500,
                                   "tuning_seconds": threads * per // 500 * 0.5}
    assert counters["hits"] == threads * per
    counters.reset()
    counters.hit()
    assert counters.snapshot() == {"hits": 1, "tunings": 0, "tuning_seconds": 0.0}


def test_hits_counted_on_the_hot_path_from_many_threads(disp, switching):
    q, k, v = qkv(b=1, hq=2, sq=8, d=8)
    disp.forward(q, k, v)  # tunes
    disp.reset()
    threads, per = 4, 300
    workers = [threading.Thread(target=lambda: [disp.forward(q, k, v) for _ in range(per)]) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert disp.stats()["hits"] == threads * per


def test_explain_source_is_the_plans_while_another_thread_tunes(disp, monkeypatch):
    """Thread A explains a known problem while thread B tunes a new one (B counts its tuning while
    A's explain runs): A's source is "cache", B's "tuned". A source derived from the tuning count
    would call A's "tuned" too."""
    known = qkv(b=1, hq=2, sq=8, d=8)
    new = qkv(b=1, hq=2, sq=16, d=8)
    assert disp.explain(*known).source == "tuned"
    assert disp.explain(*known).source == "cache"
    b_counted = threading.Event()
    real_tuned, real_plan_for = disp.counters.tuned, disp.plan_for

    def tuned(seconds):
        real_tuned(seconds)
        b_counted.set()

    def plan_for(req, impl_raw, grad):
        plan = real_plan_for(req, impl_raw, grad)
        if threading.current_thread().name == "A":
            assert b_counted.wait(60)  # A's explain is still running when B's tuning is counted
        return plan

    monkeypatch.setattr(disp.counters, "tuned", tuned)
    monkeypatch.setattr(disp, "plan_for", plan_for)
    got = {}
    a = threading.Thread(target=lambda: got.__setitem__("A", disp.explain(*known).source), name="A")
    a.start()
    got["B"] = disp.explain(*new).source
    a.join(60)
    assert got == {"A": "cache", "B": "tuned"}
    assert disp.stats()["tunings"] == 2


prespawn(__name__, lambda item: ["fork"] if item.name == "test_a_forked_child_can_take_every_lock_the_package_owns" else [],
         {"fork": python_c(FORK, timeout=240)})


@pytest.fixture
def children():
    return results(__name__)
