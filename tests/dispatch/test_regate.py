"""Trace-time decisions say what they were gated on (issue 30, item 4): a key tuned while a graph is
traced records ``evidence="synthetic"``; its first real eager call gates it again on its own slice."""
import torch

import diffsynth_attention as da
from diffsynth_attention.backends import REGISTRY
from diffsynth_attention.dispatch import default_dispatcher
from diffsynth_attention.store.decision import Candidate

from support.compile_helpers import Recorder, fresh_dynamo, requires_bake  # noqa: F401  (an autouse fixture)
from support.helpers import qkv


def attn(q, k, v):
    return da.attention_forward(q, k, v)


def stored(q, k, v):
    store = default_dispatcher().store
    (decision,) = store.entries().values()
    return decision


def test_a_trace_time_decision_records_synthetic_evidence_and_the_first_real_call_confirms_it():
    requires_bake()
    q, k, v = qkv()
    with torch.no_grad():
        torch.compile(attn, fullgraph=True, backend=Recorder())(q, k, v)
    decision = stored(q, k, v)
    assert decision.evidence == "synthetic" and da.stats()["tunings"] == 1
    assert da.explain(q, k, v).decision.evidence is None  # re-gated on this call's data (explain plans as a call)
    assert stored(q, k, v).evidence is None and stored(q, k, v).backend == decision.backend
    assert da.stats()["tunings"] == 1  # one reference slice and the call: no tuning


def quantized_bind(p, need_grad, scale_is_none=False):
    """A toy 8-bit kernel: K quantized with one scale for the tensor. Fine on randn, wrong where K
    has an outlier (every other key rounds to 0)."""
    def run(q, k, v, mask, scale):
        step = k.abs().amax() / 127
        return torch.nn.functional.scaled_dot_product_attention(q, torch.round(k / step) * step, v, attn_mask=mask,
                                                                scale=scale, is_causal=p.causal)
    return run


def test_a_synthetic_decision_that_fails_on_real_data_is_replaced_and_its_graph_traced_again(monkeypatch):
    requires_bake()
    monkeypatch.setenv("DIFFSYNTH_ATTENTION_TOLERANCE", "0.02")
    q, k, v = qkv()
    k[0, 0, 0, 0] = 1000.0  # an outlier-heavy K
    with torch.no_grad():
        tuned = da.explain(q, k, v).decision  # the key and its candidates, then as a trace would have stored it:
    names = ("torch", "torch_math", "torch_flash")
    synthetic = tuned.replace(backend="torch_math", modes={}, evidence="synthetic", candidates={
        n: Candidate("chosen" if n == "torch_math" else "accepted", 1.0, 1e-3, reps=3) for n in names})
    default_dispatcher().store.put(synthetic)
    monkeypatch.setattr(REGISTRY["torch_math"], "bind", quantized_bind)
    rec = Recorder()
    fn = torch.compile(attn, fullgraph=True, backend=rec)
    with torch.no_grad():
        fn(q, k, v)  # bakes torch_math (a trace does not re-gate: its tensors are not real)
        assert rec.compiles == 1
        tunings = da.stats()["tunings"]
        out = da.attention_forward(q, k, v)  # the first real call: torch_math fails its gate here
        replaced = stored(q, k, v)
        assert replaced.backend != "torch_math" and replaced.evidence is None, replaced
        assert replaced.candidates["torch_math"].status == "rejected"
        assert da.stats()["tunings"] == tunings + 1
        fn(q, k, v)  # the graph that baked torch_math is traced again
    assert rec.compiles == 2
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert float((out - ref).abs().max()) < 1e-4
