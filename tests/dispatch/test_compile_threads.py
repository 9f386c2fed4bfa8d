"""What a trace reads while Dynamo traces (issue 30): the scope of the thread that compiles, never a
process-wide mirror of another thread's ``use_backend`` (item 3); the mode the compile runs in."""
import threading

import torch

import diffsynth_attention as da

from support.compile_helpers import Recorder, fresh_dynamo, requires_bake  # noqa: F401  (an autouse fixture)
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
    requires_bake()
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
    requires_bake()
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


def test_the_bake_picks_the_decisions_backend_for_the_compiles_own_mode():
    """A decision whose compiled and CUDA-graph picks differ from its eager one: the default
    compile bakes the compiled pick, ``mode="reduce-overhead"`` the CUDA-graph pick (read from
    Dynamo's backend while Dynamo traces: inductor applies the mode's options only later)."""
    requires_bake()
    import torch._inductor.config as inductor_config

    from diffsynth_attention.dispatch import default_dispatcher
    from diffsynth_attention.store.decision import Candidate

    q, k, v = qkv()
    with torch.no_grad():
        explained = da.explain(q, k, v)
    exact = {n: Candidate("chosen" if n == "torch" else "accepted", 1.0, 1e-7, reps=3)
             for n in ("torch", "torch_math", "torch_flash")}
    default_dispatcher().store.put(explained.decision.replace(
        backend="torch", candidates=exact, modes={"compiled": "torch_math", "cudagraph": "torch_flash"}))
    rec = Recorder()
    with torch.no_grad():
        torch.compile(attn, fullgraph=True, backend=rec)(q, k, v)
    assert any("bmm" in t for t in rec.targets()) and FLASH_CPU not in rec.targets(), rec.targets()
    torch._dynamo.reset()
    with torch.no_grad(), inductor_config.patch(pattern_matcher=False, fx_graph_cache=False):
        fn = torch.compile(attn, fullgraph=True, mode="reduce-overhead")
        fn(q, k, v)
        with torch.profiler.profile() as prof:
            fn(q, k, v)
    names = {e.name for e in prof.events()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in names and "aten::bmm" not in names, names


def test_scopes_opened_eagerly_while_another_thread_compiles_are_this_threads():
    """torch 2.13's ``torch.compiler.is_compiling()`` is a process-wide flag, True in every thread
    while any one compiles. Before: ``use_backend`` opened then in another thread took the
    traced-block path (TRACE.inner, process-wide: a scope leaked into the compiling thread's trace,
    and none for its own eager calls), ``patch_sdpa()`` returned an inactive handle, and ``with
    patch_sdpa():`` left the wrapper in front of SDPA, and every eager ``attention_forward`` took
    the trace's path (a bake per call, no plan-table hit). They now ask whether Dynamo traces the code."""
    from diffsynth_attention.integrations import patching
    from diffsynth_attention.trace_state import TRACE

    q, k, v = qkv(b=1, hq=2, sq=16, d=8)
    da.attention_forward(q, k, v)  # planned (tuned) before the other thread compiles
    compiling, release = threading.Event(), threading.Event()

    def backend(gm, _inputs):  # holds the other thread's compile session open
        compiling.set()
        release.wait(60)
        return gm.forward

    t = threading.Thread(target=lambda: torch.compile(lambda x: x + 1, backend=backend)(torch.ones(2)))
    t.start()
    try:
        assert compiling.wait(60)
        with da.use_backend("torch_math"):
            seen, inner = da.current_implementation(), TRACE.inner
        handle = da.patch_sdpa()
        active = handle.active
        handle.undo()
        with da.patch_sdpa():
            pass
        restored = torch.nn.functional.scaled_dot_product_attention is patching._ORIGINAL_SDPA
        hits = da.stats()["hits"]
        da.attention_forward(q, k, v)
        hits = da.stats()["hits"] - hits
    finally:
        release.set()
        t.join(60)
    assert (seen, inner, active, restored, hits) == ("torch_math", None, True, True, 1)


def test_an_eager_call_tunes_a_new_problem_while_another_thread_compiles():
    """While another thread's compile session is held open (torch 2.13's process-wide
    ``is_compiling()`` True), an eager ``attention_forward`` of a problem with no decision tunes at
    once: ``callsite.in_graph`` asks about this thread only. Before: it was served by ``torch``
    untuned (source "fallback"), planned again later."""
    q, k, v = qkv(b=1, hq=3, sq=24, d=16)
    compiling, release = threading.Event(), threading.Event()

    def backend(gm, _inputs):  # holds the other thread's compile session open
        compiling.set()
        release.wait(60)
        return gm.forward

    t = threading.Thread(target=lambda: torch.compile(lambda x: x * 2, backend=backend)(torch.ones(2)))
    t.start()
    try:
        # torch 2.13 holds is_compiling() True here, for every thread (the case this test is for);
        # torch 2.5 holds it in the compiling thread only: the eager call must tune all the same
        assert compiling.wait(60)
        tunings = da.stats()["tunings"]
        with torch.no_grad():
            da.attention_forward(q, k, v)
            tuned, source = da.stats()["tunings"] - tunings, da.explain(q, k, v).source
    finally:
        release.set()
        t.join(60)
    assert (tuned, source) == (1, "cache")
