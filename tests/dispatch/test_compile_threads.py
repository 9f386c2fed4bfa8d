"""Compiling in several threads (issue 30, item 3): a trace reads the scope of the thread that
compiles, never a process-wide mirror of another thread's ``use_backend``."""
import threading

import torch

import diffsynth_attention as da

from support.compile_helpers import Recorder, fresh_dynamo  # noqa: F401  (an autouse fixture)
from support.helpers import qkv

FLASH_CPU = "aten._scaled_dot_product_flash_attention_for_cpu.default"


def held(name: str, ready: threading.Event, release: threading.Event):
    """A thread that opens ``use_backend(name)`` and holds it until ``release``."""
    def run():
        with da.use_backend(name):
            ready.set()
            release.wait(120)
    t = threading.Thread(target=run)
    t.start()
    return t


def compiled_in(fn, model, *args):
    """Compile and call ``model`` in a thread of its own (under ``fn``'s scope); its graph's operators."""
    out = {}

    def run():
        with fn():
            rec = Recorder()
            with torch.no_grad():
                torch.compile(model, fullgraph=True, backend=rec)(*args)
            out["targets"] = rec.targets()
            out["implementation"] = da.current_implementation()
    t = threading.Thread(target=run)
    t.start()
    t.join(300)
    return out


def attn(q, k, v):
    return da.attention_forward(q, k, v)


def test_a_compile_bakes_its_own_threads_choice_while_another_thread_holds_a_scope(monkeypatch):
    """Thread B sits in ``use_backend("torch_math")`` while thread A compiles under the variable's
    ``torch_flash``: A's graph holds torch_flash (before: torch_math, from source override)."""
    monkeypatch.setenv("DIFFSYNTH_ATTENTION_IMPLEMENTATION", "torch_flash")
    q, k, v = qkv()
    ready, release = threading.Event(), threading.Event()
    b = held("torch_math", ready, release)
    try:
        assert ready.wait(60)
        import contextlib

        got = compiled_in(contextlib.nullcontext, attn, q, k, v)
    finally:
        release.set()
        b.join(60)
    assert got["implementation"] == "torch_flash"
    assert FLASH_CPU in got["targets"], got


def test_two_threads_compiling_under_different_scopes_each_bake_their_own():
    """Both threads hold their scope (entered in turn) while both compile one function each, and a
    function compiled in one thread is called in the other: each call runs its own thread's scope."""
    q, k, v = qkv()
    got = {}
    entered = {"torch_math": threading.Event(), "torch_flash": threading.Event()}
    both = threading.Barrier(2)
    shared_rec = Recorder()
    shared = torch.compile(attn, fullgraph=True, backend=shared_rec)

    def run(name, other):
        with da.use_backend(name):
            entered[name].set()
            assert entered[other].wait(60)  # the other thread's scope is open too
            rec = Recorder()
            with torch.no_grad():
                torch.compile(attn, fullgraph=True, backend=rec)(q, k, v)
                both.wait(60)
                shared(q, k, v)  # the same compiled function, from both threads
            got[name] = rec.targets()

    threads = [threading.Thread(target=run, args=("torch_math", "torch_flash")),
               threading.Thread(target=run, args=("torch_flash", "torch_math"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert FLASH_CPU in got["torch_flash"], got
    assert FLASH_CPU not in got["torch_math"] and any("bmm" in t for t in got["torch_math"]), got
    assert shared_rec.compiles == 2  # one version per scope, guarded per thread
    kinds = {FLASH_CPU in [str(n.target) for n in g.graph.nodes] for g in shared_rec.forward_graphs}
    assert kinds == {True, False}, kinds
