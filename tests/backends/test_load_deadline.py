"""A kernel package whose import never returns hangs nothing (issue 31, item 2).

Tuning a new problem starts its candidates' imports in the background and waits for them at most
``DIFFSYNTH_ATTENTION_LOAD_WAIT`` seconds, before it takes the key's lease: the call returns, the
backend is recorded as not loaded (its candidate's reason), and another process waiting on the
same key gets the decision instead of waiting on a lease whose holder is stuck in an import.
Fresh processes with a generous outer timeout: no timing asserts."""
import json
import subprocess
import sys
import textwrap
import threading

import pytest

from diffsynth_attention import config
from diffsynth_attention.backends import REGISTRY, flash_attention, loading

from support.subprocesses import ROOT

HUNG_FA3 = "import threading\nthreading.Event().wait()  # an import that never returns\n"

CHILD = textwrap.dedent('''
    import json, os, sys, time
    sys.path.insert(0, SITE)
    sys.path.insert(0, TESTS)
    import torch
    import diffsynth_attention as da
    from diffsynth_attention.backends import REGISTRY, flash_attention, loading
    from diffsynth_attention.backends.flash_attention import FlashAttention3
    from support.helpers import qkv
    cls = FlashAttention3
    REGISTRY["flash_attention_3"] = type(cls.__name__, (cls,), {"devices": frozenset({"cpu", "cuda"}),
                                                                "dtypes": cls.dtypes | {torch.float32}})()
    flash_attention.package_version = lambda d: "3.0.0b1" if d == "flash_attn_3" else None
    q, k, v = qkv(d=16)
    out = da.attention_forward(q, k, v)  # a new problem: tuned
    info = da.explain(q, k, v)
    fa3 = info.decision.candidates["flash_attention_3"]
    print(json.dumps({"state": loading.state(REGISTRY["flash_attention_3"]), "source": info.source,
                      "backend": info.backend, "fa3": [fa3.status, fa3.reason], "finite": bool(out.isfinite().all())}))
    sys.stdout.flush()
    os._exit(0)  # the loading thread is stuck in its import for good
''')


@pytest.fixture
def hung_site(tmp_path):
    site = tmp_path / "site"
    (site / "flash_attn_interface").mkdir(parents=True)
    (site / "flash_attn_interface" / "__init__.py").write_text(HUNG_FA3)
    return site


def _start(site, env, load_wait: str) -> subprocess.Popen:
    code = f"SITE = {str(site)!r}\nTESTS = {str(ROOT / 'tests')!r}\n" + CHILD
    env = dict(env, DIFFSYNTH_ATTENTION_LOAD_WAIT=load_wait, DIFFSYNTH_ATTENTION_TUNE_WAIT="600",
               DIFFSYNTH_ATTENTION_PRELOAD="1")
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen) -> dict:
    try:
        out, err = proc.communicate(timeout=240)  # generous: the hang this guards against is forever
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"the call did not return (a hung import held it): {err[-2000:]}")
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def test_a_hung_import_leaves_its_backend_out_and_the_call_returns(hung_site, subprocess_env):
    got = _result(_start(hung_site, subprocess_env, "1"))
    assert got["state"] == loading.LOADING  # recorded as not loaded: its import still runs
    status, reason = got["fa3"]
    assert status == "unsupported" and "not loaded" in reason and config.LOAD_WAIT in reason
    assert got["backend"] != "flash_attention_3" and got["finite"] and got["source"] == "cache"  # (explain, after the call)


def test_another_process_on_the_same_key_is_not_held_by_the_hang(hung_site, subprocess_env):
    """Two processes tune the same new key at once, each with the import hung: neither waits on the
    other's lease for good (the lease is never held during the wait for the import)."""
    first = _start(hung_site, subprocess_env, "1")
    second = _start(hung_site, subprocess_env, "3")  # takes the lease later: it finds the first's decision or tunes
    try:
        results = [_result(first), _result(second)]
    finally:
        for proc in (first, second):  # a child held by a hang is never left behind
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert {r["source"] for r in results} == {"cache"}
    for r in results:
        assert r["fa3"][0] == "unsupported" and "not loaded" in r["fa3"][1] and r["finite"]


def test_a_synchronous_use_waits_for_a_background_import_only_until_its_deadline(gated_fa3):
    """In-process: ``unavailable_reason`` (what tuning's gate, a trace and a demotion ask) returns the
    reason instead of blocking on the load lock of a background import past its deadline; once
    that import ends, the backend is loaded as usual."""
    fa3, gate = gated_fa3
    try:
        assert loading.start_loading(fa3) == loading.LOADING
        late = loading.settle([fa3])
        assert set(late) == {"flash_attention_3"} and "not loaded" in late["flash_attention_3"]
        why = fa3.unavailable_reason()  # returns (bounded by the deadline, already past)
        assert why is not None and "not loaded" in why and not fa3.is_loaded()
    finally:
        gate.set()
    assert loading.wait(fa3, 30) == loading.READY and fa3.unavailable_reason() is None


@pytest.fixture
def gated_fa3(tmp_path, monkeypatch, isolated):
    """A FlashAttention-3 whose import waits (up to 20 s) on a gate the test opens at its end."""
    import builtins

    import torch

    gate = threading.Event()
    site = tmp_path / "site"
    (site / "flash_attn_interface").mkdir(parents=True)
    (site / "flash_attn_interface" / "__init__.py").write_text(
        "import builtins\nbuiltins._da_hung_gate.wait(20)\ndef flash_attn_func(*a, **k):\n    raise RuntimeError\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, "flash_attn_interface", raising=False)
    monkeypatch.setattr(builtins, "_da_hung_gate", gate, raising=False)
    monkeypatch.setattr(flash_attention, "package_version", lambda d: "3.0.0b1" if d == "flash_attn_3" else None)
    fa3 = type("FlashAttention3", (flash_attention.FlashAttention3,),
               {"devices": frozenset({"cpu", "cuda"}), "dtypes": flash_attention.FlashAttention3.dtypes | {torch.float32}})()
    monkeypatch.setitem(REGISTRY, "flash_attention_3", fa3)
    monkeypatch.setenv(config.LOAD_WAIT, "0.2")
    yield fa3, gate
    gate.set()
    loading.wait(fa3, 30)


def test_tuning_while_background_loads_are_deferred_still_bounds_the_import(gated_fa3):
    """The command line's ``explain`` defers background loads (a cached decision is reported without
    importing its package); on a miss it tunes, and the tuning imports the candidates anyway. That
    import is still started in the background and bounded by the deadline, before the key's lease:
    a hung import never hangs ``explain`` holding the lease."""
    import diffsynth_attention as da
    from support.helpers import qkv

    fa3, gate = gated_fa3
    q, k, v = qkv(d=16)
    previous = loading.defer()
    try:
        info = da.explain(q, k, v)  # a new problem: tuned
        late = gate.is_set() is False and not fa3.is_loaded()
    finally:
        loading.defer(previous)
        gate.set()
    c = info.candidates["flash_attention_3"]
    assert late and c["status"] == "unsupported" and "not loaded" in c["reason"], c
    # decided without it, and timed beside its import: provisional, re-timed by a later quiet process
    assert info.decision.provisional and "flash_attention_3 loaded on a background thread" in info.decision.confirmation
    assert loading.wait(fa3, 30) == loading.READY and loading.busy() == ()


def test_synchronous_questions_about_a_backend_wait_for_a_hung_import_only_until_its_deadline(gated_fa3):
    """``available_backends()``, ``current_implementation()`` and a forced backend answer, with the
    reason, instead of importing the package on the caller's thread for as long as it takes."""
    import diffsynth_attention as da
    from support.helpers import full_reference, qkv, rel

    fa3, gate = gated_fa3
    why = da.available_backends()["flash_attention_3"]
    assert not gate.is_set() and why is not None and "not loaded" in why and config.LOAD_WAIT in why
    q, k, v = qkv(d=16)
    with da.use_backend("flash_attention_3"):
        assert da.current_implementation() == "torch"
        out = da.attention_forward(q, k, v)  # served by torch, with the reason in a warning
    assert rel(out, full_reference(q, k, v)) < 1e-5 and not gate.is_set() and not fa3.is_loaded()



def test_a_trace_waits_for_a_late_import_only_until_its_deadline_and_bakes_no_stand_in(gated_fa3, tmp_path):
    """A trace (and a capture) waits for a decided package's import, but only until its deadline:
    past it, the graph dispatches at run time (a stand-in serves meanwhile) instead of hanging the
    compile, and nothing is dropped: once the import ends, the decided backend serves."""
    import torch

    from diffsynth_attention.dispatch import Dispatcher
    from diffsynth_attention.request import Request
    from diffsynth_attention.store.cache import DecisionCache
    from support.compile_helpers import Recorder
    from support.helpers import full_reference, qkv, rel
    from support.store_helpers import decided_for

    fa3, gate = gated_fa3
    q, k, v = qkv(d=16)
    disp = Dispatcher(DecisionCache(tmp_path / "cache"))
    tuned = disp.explain(q, k, v).decision  # tuned with FlashAttention-3 left out: its import waits on the gate
    disp.store.put(decided_for(tuned, "flash_attention_3", time_ms=1e-4, error=0.0, reason=None))
    disp.store.flush()
    disp.reset()
    plan = disp.trace_plan(Request(q, k, v, "b n s d", "b n s d", "b n s d", "b n s d", None, None, None, False, False,
                                   None), False)
    assert not gate.is_set() and plan.source == "loading" and plan.backend != "flash_attention_3", plan
    rec = Recorder()
    out = torch.compile(lambda a, b, c: disp.forward(a, b, c), backend=rec, fullgraph=True)(q, k, v)
    assert rel(out, full_reference(q, k, v)) < 1e-5 and not gate.is_set()
    assert "diffsynth_attention.dispatch.default" in rec.targets(0)  # the run-time operator, no stand-in baked
    assert not disp.dropped.get(tuned.key_id)  # late is not broken: nothing dropped for the key
    gate.set()
    assert loading.wait(fa3, 30) == loading.READY
    assert disp.explain(q, k, v).backend == "flash_attention_3"


def test_a_provisional_re_time_waits_for_the_imports_of_its_candidates_instead_of_timing_beside_them(gated_fa3, tmp_path,
                                                                                                      monkeypatch):
    """The re-time of a decision made provisional by a load waited until no package loaded, then, as
    a tuning, started its candidates' imports itself and timed beside them: an import past its
    deadline made it provisional again, in every process (a re-time each, forever). The re-time now
    starts those imports in the background and waits for their end (served as it is meanwhile): a
    hung import holds no call and costs no re-time; once it ends, the calls plan again and re-time."""
    import diffsynth_attention as da
    from support.helpers import qkv
    from support.virtual import VirtualClock, only, virtual_policy

    fa3, gate = gated_fa3
    clock = VirtualClock()
    only(monkeypatch, clock, torch={"cost": 1.0}, torch_math={"cost": 0.5})
    monkeypatch.setitem(REGISTRY, "flash_attention_3", fa3)
    policy = virtual_policy(clock).replace(quiet=lambda: True)
    q, k, v = qkv(d=16)
    folder = tmp_path / "cache"
    with monkeypatch.context() as m:  # an earlier process, where the import ran past its deadline (no import here)
        m.setattr(loading, "settle_candidates", lambda usable, unsupported, what: (
            [b for b in usable if b.name != "flash_attention_3"], {**unsupported, "flash_attention_3": ["not loaded"]}))
        first = da.Dispatcher(da.DecisionCache(folder), policy=policy).explain(q, k, v).decision
    store = da.DecisionCache(folder)
    store.put(first.replace(provisional=True, confirmation="provisional: timed while flash_attention_3 loaded"))
    store.flush()
    assert not fa3.is_loaded() and loading.busy() == ()

    monkeypatch.setenv("DIFFSYNTH_ATTENTION_RETIME", "on")
    disp = da.Dispatcher(da.DecisionCache(folder), policy=policy)
    info = disp.explain(q, k, v)
    assert info.source == "cache" and disp.stats()["tunings"] == 0 and info.decision.provisional
    assert loading.state(fa3) == loading.LOADING and not gate.is_set()  # its import started, in the background
    gate.set()
    assert loading.wait(fa3, 30) == loading.READY
    info = disp.explain(q, k, v)  # the load's end planned the call again: re-timed now, with FlashAttention-3 gated
    assert info.source == "tuned" and disp.stats()["tunings"] == 1, info.source
    assert not info.decision.provisional, info.decision.confirmation
    assert info.decision.candidates["flash_attention_3"].status == "rejected"  # (this fake raises when called)


def test_warm_waits_for_the_candidates_imports_before_it_re_times_a_provisional_decision(gated_fa3, monkeypatch):
    """`warm` re-times a provisional decision on a quiet host, but it started its candidates' imports
    just before and then asked at once: a package loading, the re-time waited and warm answered from
    the cache. It now waits for those imports (each until its deadline), as the tuning of a new key does."""
    import torch

    from diffsynth_attention.dispatch import default_dispatcher
    from diffsynth_attention.tools import warm as warm_module
    from diffsynth_attention.tuning.policy import TuningPolicy

    fa3, gate = gated_fa3
    shape = {"batch": 1, "heads_q": 2, "heads_kv": 2, "seq_q": 32, "seq_kv": 32, "head_dim": 16, "dtype": "float32",
             "causal": False, "window": None}
    with monkeypatch.context() as m:  # an earlier process, where the import ran past its deadline (no import here)
        m.setattr(warm_module, "_start_loads", lambda *a: None)
        m.setattr(loading, "settle_candidates", lambda usable, unsupported, what: (
            [b for b in usable if b.name != "flash_attention_3"], {**unsupported, "flash_attention_3": ["not loaded"]}))
        [(_, first)] = warm_module.warm([shape], torch.device("cpu"))
    d = default_dispatcher()
    d.store.put(first.decision.replace(provisional=True))
    d.reset()
    assert not fa3.is_loaded() and loading.busy() == ()
    monkeypatch.setenv("DIFFSYNTH_ATTENTION_RETIME", "on")
    monkeypatch.setenv(config.LOAD_WAIT, "60")
    monkeypatch.setattr(d, "policy", TuningPolicy(quiet=lambda: True))
    real_settle = loading.settle

    def settle(backends):  # the import ends once something waits for it
        gate.set()
        return real_settle(backends)
    monkeypatch.setattr(loading, "settle", settle)
    [(_, quiet)] = warm_module.warm([shape], torch.device("cpu"))
    assert quiet.source == "tuned" and d.stats()["tunings"] == 1, quiet.source
    assert quiet.decision.candidates["flash_attention_3"].status == "rejected"  # gated this time (this fake raises)
