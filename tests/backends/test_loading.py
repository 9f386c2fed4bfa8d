"""Kernel packages load in the background: the first result never waits for a kernel package's import.

A fake FlashAttention-3 whose import blocks until the test opens a gate stands for a package
that takes seconds to load: calls made meanwhile are served by the decision's fastest usable
candidate, the package loads on a background thread, and calls switch to it once it is ready.
"""
import builtins
import copy
import json
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

from diffsynth_attention import callsite, config
from diffsynth_attention.backends import REGISTRY, flash_attention, loading
from diffsynth_attention.backends.flash_attention import FlashAttention3
from diffsynth_attention.dispatch import Dispatcher
from diffsynth_attention.request import Request
from diffsynth_attention.store.cache import DecisionCache

from support.helpers import full_reference, qkv, rel
from support.store_helpers import decided_for

# An import that blocks until builtins._da_gate is set; counts imports and calls in builtins.
SLOW_FA3 = '''
import builtins, torch
builtins._da_gate.wait(60)
builtins._da_fa3_imports = getattr(builtins, "_da_fa3_imports", 0) + 1
if getattr(builtins, "_da_fa3_broken", False):
    raise ImportError("flash_attn_3_cuda.so: undefined symbol: _ZN3c104cuda9SetDeviceEi")
def flash_attn_func(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1), **kw):
    builtins._da_fa3_calls = getattr(builtins, "_da_fa3_calls", 0) + 1
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                           is_causal=causal, scale=softmax_scale)
    return out.transpose(1, 2)
'''


def cpu_fa3():
    cls = FlashAttention3
    return type(cls.__name__, (cls,), {"devices": frozenset({"cpu", "cuda"}), "dtypes": cls.dtypes | {torch.float32}})()


def install_slow_fa3(site, monkeypatch):
    path = site / "flash_attn_interface" / "__init__.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(SLOW_FA3)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, "flash_attn_interface", raising=False)


@pytest.fixture
def slow_fa3(tmp_path, monkeypatch):
    """The fake package installed and a decision for it in a cache (made by a 'previous process'
    with the gate open); returns (cache folder, q, k, v, decision). The gate is closed again and
    the package unimported: the next dispatcher is a fresh process's."""
    for name in ("_da_fa3_imports", "_da_fa3_calls", "_da_fa3_broken"):
        monkeypatch.setattr(builtins, name, 0, raising=False)
    monkeypatch.setattr(builtins, "_da_gate", threading.Event(), raising=False)
    builtins._da_gate.set()
    install_slow_fa3(tmp_path / "site", monkeypatch)
    monkeypatch.setattr(flash_attention, "package_version", lambda d: "3.0.0b1" if d == "flash_attn_3" else None)
    monkeypatch.setitem(REGISTRY, "flash_attention_3", cpu_fa3())
    folder = tmp_path / "seeded"
    q, k, v = qkv(d=16)
    previous = Dispatcher(DecisionCache(folder))
    info = previous.explain(q, k, v)
    decision = previous.store.get(info.key_id)
    fa3 = decision.candidates["flash_attention_3"]
    assert fa3.status in ("chosen", "accepted", "slower") and fa3.error < 1e-5
    decision = decided_for(decision, "flash_attention_3",  # the decision names FlashAttention-3
                           time_ms=min(c.time_ms for c in decision.candidates.values() if c.time_ms) / 2)
    previous.store.put(decision)
    previous.store.flush()
    # a new process: the package not imported, a fresh backend object, the gate closed
    monkeypatch.delitem(sys.modules, "flash_attn_interface")
    monkeypatch.setattr(builtins, "_da_gate", threading.Event())
    monkeypatch.setattr(builtins, "_da_fa3_calls", 0)
    monkeypatch.setattr(builtins, "_da_fa3_imports", 0)
    monkeypatch.setitem(REGISTRY, "flash_attention_3", cpu_fa3())
    yield folder, q, k, v, decision
    builtins._da_gate.set()  # never leave a loading thread blocked
    loading.wait(REGISTRY["flash_attention_3"], 30)


def fastest_ready(decision):
    order = sorted((c.time_ms, n) for n, c in decision.candidates.items()
                   if n != "flash_attention_3" and c.time_ms is not None and c.status in ("accepted", "slower"))
    return order[0][1] if order else "torch"


def test_calls_while_the_package_loads_are_served_then_switch_to_it_with_the_same_results(slow_fa3):
    folder, q, k, v, decision = slow_fa3
    fa3 = REGISTRY["flash_attention_3"]
    disp = Dispatcher(DecisionCache(folder))
    q0, k0, v0 = q.clone(), k.clone(), v.clone()
    during = [disp.forward(q, k, v) for _ in range(3)]
    assert loading.state(fa3) == loading.LOADING and builtins._da_fa3_calls == 0
    info = disp.explain(q, k, v)
    assert info.source == "loading" and info.backend == fastest_ready(decision)
    assert info.decision.backend == "flash_attention_3"
    assert "flash_attention_3" in info.reason and "loading" in info.reason and info.backend in info.reason
    assert info.as_dict()["reason"] == info.reason
    assert disp.stats()["hits"] == 3 and disp.stats()["tunings"] == 0  # served by the decision: no tuning
    builtins._da_gate.set()
    assert loading.wait(fa3, 30) == loading.READY
    after = [disp.forward(q, k, v) for _ in range(2)]
    assert builtins._da_fa3_calls == 2 and builtins._da_fa3_imports == 1
    info = disp.explain(q, k, v)
    assert (info.source, info.backend, info.reason) == ("cache", "flash_attention_3", None)
    expected = full_reference(q, k, v)
    for out in during + after:
        assert rel(out, expected) < 1e-5
    assert rel(during[-1], after[0]) < 1e-5
    assert torch.equal(q, q0) and torch.equal(k, k0) and torch.equal(v, v0)


def test_a_provisional_plan_switches_even_when_the_load_ends_before_it_is_stored(slow_fa3):
    """The plan itself notices the end of the load (no listener needed): the next call re-plans."""
    folder, q, k, v, _ = slow_fa3
    fa3 = REGISTRY["flash_attention_3"]
    disp = Dispatcher(DecisionCache(folder))
    disp._backend_loaded = lambda name, state: None  # as if the listener had fired too early
    loading._listeners.clear()
    disp.forward(q, k, v)
    builtins._da_gate.set()
    assert loading.wait(fa3, 30) == loading.READY
    disp.forward(q, k, v)  # still the provisional plan: it drops itself
    disp.forward(q, k, v)
    assert builtins._da_fa3_calls == 1 and disp.explain(q, k, v).backend == "flash_attention_3"


def test_a_package_that_fails_to_load_in_the_background_is_dropped_with_its_reason(slow_fa3):
    folder, q, k, v, decision = slow_fa3
    builtins._da_fa3_broken = True
    fa3 = REGISTRY["flash_attention_3"]
    disp = Dispatcher(DecisionCache(folder))
    first = disp.forward(q, k, v)
    builtins._da_gate.set()
    assert loading.wait(fa3, 30) == loading.FAILED
    second = disp.forward(q, k, v)
    info = disp.explain(q, k, v)
    assert info.backend == fastest_ready(decision) and info.source == "fallback"
    assert "undefined symbol" in info.dropped["flash_attention_3"]
    assert rel(first, second) < 1e-5 and rel(second, full_reference(q, k, v)) < 1e-5


def test_a_trace_waits_for_the_package_and_never_bakes_the_stand_in(slow_fa3):
    """Under torch.compile (``trace_plan``) the decided backend is loaded, waited for, and baked;
    an eager call's stand-in plan for the same call is not reused."""
    folder, q, k, v, _ = slow_fa3
    fa3 = REGISTRY["flash_attention_3"]
    disp = Dispatcher(DecisionCache(folder))
    disp.forward(q, k, v)  # eager: a stand-in while the package loads
    assert disp.explain(q, k, v).source == "loading"
    opener = threading.Timer(0.2, builtins._da_gate.set)
    opener.start()
    plan = disp.trace_plan(Request(q, k, v, "b n s d", "b n s d", "b n s d", "b n s d", None, None, None, False, False,
                                   None), False)
    opener.join()
    assert (plan.backend, plan.source) == ("flash_attention_3", "cache") and fa3.is_loaded()
    assert loading.wait(fa3, 30) == loading.READY  # (the loading thread may still be ending: first launches)


def test_calls_planned_while_this_thread_builds_a_graph_wait_too(slow_fa3):
    """Any plan taken while this thread builds a graph (callsite.building_graph: the trace-time
    bakes) waits for the package, as a trace does."""
    folder, q, k, v, _ = slow_fa3
    builtins._da_gate.set()
    disp = Dispatcher(DecisionCache(folder))
    with callsite.building_graph():
        plan = disp.plan_for(Request(q, k, v, "b n s d", "b n s d", "b n s d", "b n s d", None, None, None, False, False,
                                     None), None, False)
    assert (plan.backend, plan.source) == ("flash_attention_3", "cache") and REGISTRY["flash_attention_3"].is_loaded()


def test_preload_starts_the_decided_packages_and_ignores_others(slow_fa3, monkeypatch):
    folder, q, k, v, decision = slow_fa3
    fa3 = REGISTRY["flash_attention_3"]
    monkeypatch.setattr(loading, "_preloaded", None)
    other = copy.deepcopy(decision)
    other.key["versions"]["tokenspeed-fa3"] = "9.9"
    assert loading.decided_packages([other], REGISTRY) == []  # decided with another version
    assert loading.preload([decision], REGISTRY) == ["flash_attention_3"]
    assert loading.state(fa3) == loading.LOADING
    assert loading.preload([decision], REGISTRY) == ["flash_attention_3"]  # once per process
    builtins._da_gate.set()
    assert loading.wait(fa3, 30) == loading.READY


def test_the_preload_variable_is_validated(monkeypatch):
    monkeypatch.setenv(config.PRELOAD, "maybe")
    with pytest.raises(ValueError, match=config.PRELOAD):
        config.validate_all()
    monkeypatch.setenv(config.PRELOAD, "0")
    assert config.preload() is False


# -- fresh processes -------------------------------------------------------------------------------
PRELOAD_CHILD = textwrap.dedent('''
    import builtins, json, sys, threading
    builtins._da_gate = threading.Event(); builtins._da_gate.set()
    sys.path.insert(0, SITE)
    import diffsynth_attention  # torch is not imported yet: nothing starts
    started_at_import = [t.name for t in threading.enumerate() if t.name.startswith("diffsynth-attention")]
    from diffsynth_attention.backends import REGISTRY, flash_attention, loading
    from diffsynth_attention.backends.flash_attention import FlashAttention3
    import torch
    cls = FlashAttention3
    REGISTRY["flash_attention_3"] = type(cls.__name__, (cls,), {"devices": frozenset({"cpu", "cuda"}),
                                                                "dtypes": cls.dtypes | {torch.float32}})()
    flash_attention.package_version = lambda d: "3.0.0b1" if d == "flash_attn_3" else None
    diffsynth_attention.attention_forward  # the public functions: the preload starts (torch is imported)
    for t in threading.enumerate():
        if t.name == "diffsynth-attention-preload":
            t.join(60)
    state = loading.wait(REGISTRY["flash_attention_3"], 60)
    worded = "jsonschema" in sys.modules  # the preload read a bad entry too: not worded on its thread
    print(json.dumps({"at_import": started_at_import, "state": state, "imported": "flash_attn_interface" in sys.modules,
                      "jsonschema": worded}))
''')


@pytest.mark.parametrize("preload", ["1", "0"])
def test_import_preloads_the_decided_package_unless_turned_off(slow_fa3, subprocess_env, preload):
    folder, *_ = slow_fa3
    bad = {"schema_version": 3, "id": "ab" * 12, "entry": {"backend": 5}}  # the entry refused by the schema check
    (folder / "v2" / ("ab" * 12 + ".json")).write_text(json.dumps(bad))
    env = dict(subprocess_env, DIFFSYNTH_ATTENTION_CACHE_DIR=str(folder), DIFFSYNTH_ATTENTION_PRELOAD=preload)
    site = str(folder.parent / "site")
    proc = subprocess.run([sys.executable, "-c", f"SITE = {site!r}\n" + PRELOAD_CHILD], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["at_import"] == []
    # jsonschema (130 ms of import on a 2-core CPU) is imported neither by the caller's import nor by the
    # preload thread that reads the bad entry: the compiled check refuses it unworded there
    if preload == "1":
        assert result == {"at_import": [], "state": "ready", "imported": True, "jsonschema": False}
    else:
        assert result == {"at_import": [], "state": "unloaded", "imported": False, "jsonschema": False}


def test_import_and_an_eager_call_leave_torch_dynamo_out(subprocess_env):
    """The compile support is imported when a trace first reaches it, never by
    ``import diffsynth_attention`` or an eager call."""
    code = textwrap.dedent('''
        import sys
        import diffsynth_attention
        assert "torch" not in sys.modules, "import diffsynth_attention imported torch"
        import torch
        names = ("torch._dynamo", "torch._inductor", "sympy", "triton")
        by_torch = {m for m in names if m in sys.modules}  # torch 2.5's own import brings torch._inductor
        q = torch.randn(1, 2, 16, 8)
        out = diffsynth_attention.attention_forward(q, q, q)
        diffsynth_attention.explain(q, q, q)
        heavy = sorted(m for m in names if m in sys.modules and m not in by_torch)
        print(",".join(heavy) or "none")
    ''')
    proc = subprocess.run([sys.executable, "-c", code], env=subprocess_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "none"


# -- the command line: a cached decision is reported without importing its package ----------------
def test_cli_explain_and_warm_report_a_cached_decision_without_importing_its_package(slow_fa3, monkeypatch, capsys, tmp_path):
    from diffsynth_attention.tools.cli import main

    folder, *_ = slow_fa3
    monkeypatch.setenv("DIFFSYNTH_ATTENTION_CACHE_DIR", str(folder))
    monkeypatch.setattr(loading, "_deferred", False)
    assert main(["explain", "--batch", "2", "--heads", "4", "--seq-q", "32", "--head-dim", "16", "--dtype", "float32",
                 "--device", "cpu"]) == 0  # the decision was made on CPU tensors (a GPU machine too)
    out = " ".join(capsys.readouterr().out.split())
    assert "flash_attention_3 (cache)" in out and "until flash_attention_3 has loaded" in out
    fa3 = REGISTRY["flash_attention_3"]
    assert "flash_attn_interface" not in sys.modules and loading.state(fa3) == loading.UNLOADED
    assert loading._deferred is False  # only for the command: a process that goes on loads as usual
    shapes = tmp_path / "shapes.json"
    shapes.write_text(json.dumps([{"name": "p", "batch": 2, "heads_q": 4, "heads_kv": 4, "seq_q": 32, "seq_kv": 32,
                                   "head_dim": 16, "dtype": "float32"}]))
    assert main(["warm", "--shapes", str(shapes), "--device", "cpu", "--full-size", "--no-progress", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["backend"], r["source"]) for r in rows] == [("flash_attention_3", "cache")]
    assert "flash_attn_interface" not in sys.modules and loading.state(fa3) == loading.UNLOADED


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_a_fork_while_a_package_loads_leaves_the_child_a_usable_dispatcher(slow_fa3):
    import os

    folder, q, k, v, _ = slow_fa3
    fa3 = REGISTRY["flash_attention_3"]
    disp = Dispatcher(DecisionCache(folder))
    disp.forward(q, k, v)
    assert loading.state(fa3) == loading.LOADING
    pid = os.fork()
    if pid == 0:  # the child: the loading thread does not exist here
        code = 1
        try:
            import faulthandler

            faulthandler.dump_traceback_later(60, exit=True)  # a hang fails the test instead of the suite
            # planning only: torch's CPU kernels themselves are not fork-safe (OpenMP)
            why = fa3.unavailable_reason()  # would wait forever on the parent's load lock
            disp.invalidate()
            info = disp.explain(q, k, v)
            ok = (loading.state(fa3) == loading.FAILED and "forked" in why and info.backend != "flash_attention_3"
                  and "forked" in info.dropped["flash_attention_3"])
            code = 0 if ok else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    builtins._da_gate.set()
    assert loading.wait(fa3, 30) == loading.READY  # the parent's load goes on


def test_a_decided_package_whose_import_ends_just_after_the_deadline_is_not_dropped(slow_fa3, monkeypatch):
    """A trace asks for the decided package's import until its deadline: the answer was 'not loaded,
    still running', and where the import ended before the state was read the backend was dropped for
    the key in the whole process with that reason, its calls demoted though it had loaded."""
    folder, q, k, v, _ = slow_fa3
    fa3 = REGISTRY["flash_attention_3"]
    builtins._da_gate.set()
    loading.start_loading(fa3)
    assert loading.wait(fa3, 30) == loading.READY
    late = loading.late_reason(fa3)  # what the question answered a moment before the import ended
    monkeypatch.setattr(loading, "reasons", lambda backends: {b.name: late for b in backends})
    disp = Dispatcher(DecisionCache(folder))
    with callsite.building_graph():
        plan = disp.trace_plan(Request(q, k, v, "b n s d", "b n s d", "b n s d", "b n s d", None, None, None, False, False,
                                       None), False)
    assert plan.backend == "flash_attention_3" and not disp.dropped, (plan.backend, disp.dropped)
