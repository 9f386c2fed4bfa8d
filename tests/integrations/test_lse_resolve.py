"""The LSE path (ring attention) decides through the dispatcher's one rule (issue 30, item 6):
the tolerance per dtype, the dispatcher's policy, and under torch.compile a key gated and timed
while Dynamo traces, as an ordinary key is."""
import torch

import diffsynth_attention as da
from diffsynth_attention.dispatch import Dispatcher, default_dispatcher
from diffsynth_attention.integrations import lse as L
from diffsynth_attention.store.cache import DecisionCache
from diffsynth_attention.store.decision import Candidate, Decision
from diffsynth_attention.tuning.policy import TuningPolicy

from support.compile_helpers import Recorder, fresh_dynamo  # noqa: F401  (an autouse fixture)


def bsnd(s=40, n=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, s, n, d, generator=g) for _ in range(3))


def reference(q, k, v):
    qt, kt, vt = (t.transpose(1, 2).double() for t in (q, k, v))
    s = qt @ kt.transpose(-1, -2) * q.shape[-1] ** -0.5
    return (s.softmax(-1) @ vt).transpose(1, 2), torch.logsumexp(s, -1).transpose(1, 2)


def test_a_stored_lse_decision_serves_only_within_its_dtypes_tolerance():
    """An fp32 LSE decision whose backend's error (1e-3) passes bf16's 5e-3 but not fp32's 1e-4 is
    not trusted: the key is gated again (before: the read had no tolerance, 5e-3 for every dtype)."""
    q, k, v = bsnd()
    key = L.selector().key_for(q, k, v, None, False)[0]
    loose = Decision(key.id, key.fields, "torch_flash", {"torch_flash": Candidate("chosen", 1.0, 1e-3, reps=3)},
                     tolerance=5e-3, created="2026-01-01T00:00:00+00:00")
    default_dispatcher().store.put(loose)
    out, _ = L.attention_with_lse(q, k, v)
    assert da.stats()["tunings"] == 1
    decision = default_dispatcher().store.get(key.id)
    assert decision.candidates["torch_flash"].error < 1e-4
    torch.testing.assert_close(out.double(), reference(q, k, v)[0], atol=1e-5, rtol=1e-5)


def test_the_dispatchers_policy_gates_the_lse_key(tmp_path):
    """A dispatcher's policy (here a tolerance no kernel meets) applies to its LSE keys too:
    before, they were tuned with the default policy."""
    disp = Dispatcher(DecisionCache(tmp_path / "c"), policy=TuningPolicy(tolerances={"float32": 1e-12}))
    q, k, v = bsnd()
    assert L.LseSelector(disp).choose(q, k, v, None, False) == L.MATH
    assert disp.counters["tunings"] == 1


def test_an_undecided_lse_key_under_compile_is_gated_and_timed_while_dynamo_traces():
    """Before: the first backend in preference order, untimed and ungated (no tuning at all)."""
    q, k, v = bsnd()
    rec = Recorder()
    fn = torch.compile(lambda q, k, v: L.attention_with_lse(q, k, v), fullgraph=True, backend=rec)
    with torch.no_grad():
        out, lse = fn(q, k, v)
        fn(q, k, v)
    assert da.stats()["tunings"] == 1 and rec.compiles == 1 and rec.runs == 2
    key = L.selector().key_for(q, k, v, None, False)[0]
    chosen = default_dispatcher().store.get(key.id).candidates["torch_flash"]
    assert chosen.status == "chosen" and chosen.error is not None and chosen.time_ms is not None
    ref, ref_lse = reference(q, k, v)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)


def test_use_backend_around_a_compiled_lse_call_is_guarded_per_scope():
    q, k, v = bsnd()
    rec = Recorder()
    fn = torch.compile(lambda q, k, v: L.attention_with_lse(q, k, v), fullgraph=True, backend=rec)
    with torch.no_grad():
        fn(q, k, v)
        with da.use_backend("torch_math"):  # cannot return the LSE: warned, and chosen as auto
            fn(q, k, v)
        fn(q, k, v)
    assert rec.compiles == 2 and rec.runs == 3


def test_a_quality_scope_around_a_compiled_lse_call_traces_nothing_again(monkeypatch):
    """The LSE path ignores the quality tier, so its trace reads only the use_backend scope: a
    quality(...) block around the compiled call reuses the graph."""
    from diffsynth_attention import trace_state

    monkeypatch.setattr(trace_state.TRACE, "used", True)  # a scope was set in this process: both are readable
    q, k, v = bsnd()
    rec = Recorder()
    fn = torch.compile(lambda q, k, v: L.attention_with_lse(q, k, v), fullgraph=True, backend=rec)
    with torch.no_grad():
        fn(q, k, v)
        with da.quality("fast"):
            fn(q, k, v)
    assert rec.compiles == 1 and rec.runs == 2
