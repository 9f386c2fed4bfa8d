"""The sentinel under CUDA graphs (a CUDA GPU; the FP8 kernel is the CPU tests' emulation, run on
the GPU): a check falling due while a graph is captured would synchronise the device, which a
capture refuses; it waits for the next call outside the capture."""
import pytest
import torch

import diffsynth_attention as da
from diffsynth_attention import tiers
from diffsynth_attention.dispatch import default_dispatcher
from diffsynth_attention.tools import fuzz

from support.lowprec import NAME, install_fp8

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_a_cuda_graph_captures_a_watched_low_precision_plan(isolated, monkeypatch):
    import dataclasses

    monkeypatch.setenv("DIFFSYNTH_ATTENTION_SENTINEL_EVERY", "1")
    install_fp8(monkeypatch, devices=("cpu", "cuda"))
    c = fuzz.make_case("rotary", seq=256, heads=2, **fuzz.SUITE["rotary"])
    q, k, v = (t.cuda() for t in (c.q, c.k, c.v))
    with da.quality("fast"):
        e = da.explain(q, k, v)
    assert e.candidates[NAME]["status"] in ("chosen", "accepted", "slower"), e.candidates[NAME]
    d = default_dispatcher()
    cands = {n: dataclasses.replace(x, status="accepted") if x.status == "chosen" else x for n, x in e.decision.candidates.items()}
    cands[NAME] = dataclasses.replace(cands[NAME], status="chosen")
    d.store.put(dataclasses.replace(e.decision, backend=NAME, candidates=cands))
    with da.quality("fast"), torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # warm-up: planned, checked
                da.attention_forward(q, k, v)
        torch.cuda.current_stream().wait_stream(side)
        state = d.sentinels[e.key_id]
        checks = state.checks
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # a check falls due here (every call): it waits
            out = da.attention_forward(q, k, v)
        graph.replay()
        torch.cuda.synchronize()
        assert state.checks == checks and not state.fell_back
        da.attention_forward(q, k, v)  # outside the capture: checked
    assert state.checks == checks + 1
    assert fuzz.errors(out.float().cpu(), fuzz.reference(c.q, c.k, c.v))["rel_l1"] < tiers.BOUNDS["fast"].rel_l1
