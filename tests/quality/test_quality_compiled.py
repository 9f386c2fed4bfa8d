"""A low-precision tier under torch.compile: no decision is taken at trace time (fake tensors,
only random data to tune on); the graph records the run-time operator, whose first real call
gates on the caller's own activations; a quality scope around the compiled call is guarded."""
import torch

import diffsynth_attention as da
from diffsynth_attention.tools import fuzz

from support.compile_helpers import Recorder, fresh_dynamo, requires_bake  # noqa: F401  (an autouse fixture)
from support.lowprec import NAME, Calls, install_fp8


class Attn(torch.nn.Module):
    def forward(self, q, k, v):
        return da.attention_forward(q, k, v)


def test_compiled_call_in_a_tier_gates_on_the_real_call(isolated, monkeypatch):
    requires_bake()
    install_fp8(monkeypatch)
    bad = fuzz.make_case("o", seq=136, heads=2, **fuzz.SUITE["outliers_20x_k_mean"])
    rec = Recorder()
    model = torch.compile(Attn(), fullgraph=True, backend=rec)
    with torch.no_grad(), da.quality("fast"):
        out = model(bad.q, bad.k, bad.v)
        assert any("diffsynth_attention.dispatch" in t for t in rec.targets())  # the run-time operator
        e = da.explain(bad.q, bad.k, bad.v)
    # gated on the caller's outlier activations (random data of this shape would have passed)
    assert e.candidates[NAME]["status"] == "rejected" and e.quality["gate"][NAME]["rel_l1"] > 0.07
    assert Calls.log and fuzz.errors(out, fuzz.reference(bad.q, bad.k, bad.v))["rel_l1"] < 5e-3
    with torch.no_grad():  # leaving the scope recompiles: the exact tier bakes its backend
        model(bad.q, bad.k, bad.v)
    assert rec.compiles == 2
    assert not any("diffsynth_attention.dispatch" in t for t in rec.targets())


def test_the_variable_at_trace_time_records_the_run_time_operator(isolated, monkeypatch):
    install_fp8(monkeypatch)
    monkeypatch.setenv("DIFFSYNTH_ATTENTION_QUALITY", "fast")
    bad = fuzz.make_case("o", seq=144, heads=2, **fuzz.SUITE["outliers_50x"])
    rec = Recorder()
    model = torch.compile(Attn(), fullgraph=True, backend=rec)
    with torch.no_grad():
        model(bad.q, bad.k, bad.v)
        assert any("diffsynth_attention.dispatch" in t for t in rec.targets())
        e = da.explain(bad.q, bad.k, bad.v)
    assert e.key["quality"] == "fast" and e.candidates[NAME]["status"] == "rejected"
