"""The benchmark harness's script-facing helpers (``scripts/harness/bench.py``, not installed), on the CPU."""
import pytest
import torch

import diffsynth_attention as da
from support.harness import bench

SHAPE = {"name": "tiny", "batch": 1, "heads_q": 2, "heads_kv": 2, "seq_q": 16, "seq_kv": 16, "head_dim": 32,
         "dtype": "float32", "causal": True}


def test_every_name_the_harness_offers_resolves():
    missing = [n for n in bench.__all__ if getattr(bench, n, None) is None]
    assert not missing
    with pytest.raises(AttributeError):
        bench.not_a_name


def test_shapes_narrowed_by_only_and_unknown_names_refused():
    every = bench.shapes(["cpu"])
    first = every[0]["name"]
    assert [s["name"] for s in bench.shapes(["cpu"], only=first)] == [first]
    with pytest.raises(ValueError, match="unknown problem name"):
        bench.shapes(["cpu"], only="no-such-problem")


@pytest.mark.parametrize("layout", ["b n s d", "b s n d"])
def test_backend_call_computes_what_attention_forward_does(layout):
    q, k, v, kw = bench.inputs(SHAPE, "cpu", layout, torch.Generator().manual_seed(0))
    with torch.no_grad(), da.use_backend("torch"):
        want = da.attention_forward(q, k, v, **kw)
        got = bench.backend_call("torch", q, k, v, **kw)()
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5)
    assert bench.diffsynth_fixed(q, k, v, **kw) in bench.REGISTRY


def test_servable_on_the_cpu_keeps_torch_and_says_why_for_the_rest():
    q, k, v, kw = bench.inputs(SHAPE, "cpu")
    methods, why = bench.servable(q, k, v, **kw)
    assert "torch" in methods and not set(methods) & set(why)
    assert set(methods) | set(why) == set(bench.REGISTRY)


def test_fresh_dispatcher_starts_from_an_empty_cache():
    disp = bench.fresh_dispatcher(bench.DEFAULT_POLICY)
    assert disp.store.entries() == {}


@pytest.mark.parametrize("layout,scale", [("b s n d", None), ("b n s d", 0.5)])
def test_servable_gates_against_the_call_it_was_given(layout, scale):
    # the reference must be computed on the call's own layout and scale (not b n s d, default scale)
    q, k, v, kw = bench.inputs(SHAPE, "cpu", layout, torch.Generator().manual_seed(0))
    if scale is not None:
        kw["scale"] = scale
    methods, why = bench.servable(q, k, v, **kw)
    assert "torch" in methods, why.get("torch")
