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


@pytest.mark.parametrize("layout", ["b n s d", "b s n d"])
def test_diffsynth_call_calls_the_package_as_diffsynth_studio_does(layout, monkeypatch):
    """The "DiffSynth fixed" column's call: q, k and v rearranged into the package's layout
    (b s n d for FlashAttention), the package's own function with DiffSynth-Studio's keywords, the
    first element of a tuple, and the output rearranged back; SDPA for ``torch``."""
    q, k, v, kw = bench.inputs(SHAPE, "cpu", layout, torch.Generator().manual_seed(0))
    with torch.no_grad(), da.use_backend("torch"):
        want = da.attention_forward(q, k, v, **kw)
        assert torch.allclose(bench.diffsynth_call("torch", q, k, v, **kw)(), want, atol=1e-5)
    seen = {}

    def flash_attn_func(a, b, c, softmax_scale=None, causal=False, window_size=(-1, -1)):
        seen.update(shape=tuple(a.shape), contiguous=a.is_contiguous(), scale=softmax_scale, causal=causal, window=window_size)
        out = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (a, b, c)), is_causal=causal)
        return out.transpose(1, 2), None

    backend = bench.REGISTRY["flash_attention_3"]
    monkeypatch.setattr(backend, "_func", flash_attn_func, raising=False)
    monkeypatch.setattr(type(backend), "unavailable_reason", lambda self: None)
    with torch.no_grad():
        got = bench.diffsynth_call("flash_attention_3", q, k, v, **kw)()
    assert seen == {"shape": (1, 16, 2, 32), "contiguous": layout == "b s n d", "scale": None, "causal": True,
                    "window": (-1, -1)}
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5)
    assert bench.diffsynth_call("no_such_backend", q, k, v, **kw) is None


@pytest.mark.parametrize("name", ["sage_attention", "xformers"])
def test_diffsynth_call_routes_masked_and_causal_calls_to_sdpa_as_diffsynth_studio_does(name, monkeypatch):
    """DiffSynth-Studio calls SageAttention and xFormers without a causal flag or a mask: it sends
    such calls to its torch route. The package's function must not be timed (or trusted) there."""
    backend = bench.REGISTRY[name]
    called = []
    monkeypatch.setattr(backend, "_func", lambda *a, **kw: called.append(kw), raising=False)
    monkeypatch.setattr(type(backend), "unavailable_reason", lambda self: None)
    q, k, v, kw = bench.inputs(SHAPE, "cpu", "b n s d", torch.Generator().manual_seed(0))  # causal
    with torch.no_grad(), da.use_backend("torch"):
        want = da.attention_forward(q, k, v, **kw)
        got = bench.diffsynth_call(name, q, k, v, **kw)()
        mask = torch.rand(1, 1, 16, 16) > 0.3
        masked = bench.diffsynth_call(name, q, k, v, attn_mask=mask)()
        want_masked = da.attention_forward(q, k, v, attn_mask=mask)
    assert not called
    assert torch.allclose(got, want, atol=1e-5) and torch.allclose(masked, want_masked, atol=1e-5)
