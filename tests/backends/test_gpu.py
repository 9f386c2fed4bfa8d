"""GPU checks: every backend that runs here against the fp32 reference, CUDA graphs, gradients.

Skipped without a CUDA GPU (CI has none). Run on the GPU machine (../shared/gpu/README.md):
``pytest tests/backends/test_gpu.py -v``; the results are committed under benchmarks/results/.
"""

from __future__ import annotations

import pytest
import torch

import diffsynth_attention as da
from diffsynth_attention.backends import REGISTRY, device_info
from diffsynth_attention.problem import prepare
from diffsynth_attention.tiers import BOUNDS
from diffsynth_attention.tuning.reference import reference_slice, relative_l1

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PROBLEMS = {
    "self_d64": dict(b=2, hq=4, hk=4, sq=256, skv=256, d=64, causal=False),
    "self_d128": dict(b=1, hq=8, hk=8, sq=1024, skv=1024, d=128, causal=False),
    "cross_77": dict(b=2, hq=4, hk=4, sq=512, skv=77, d=64, causal=False),
    "causal_square": dict(b=1, hq=4, hk=4, sq=512, skv=512, d=128, causal=True),
    "causal_rect": dict(b=1, hq=4, hk=4, sq=128, skv=384, d=64, causal=True),
    "gqa": dict(b=1, hq=8, hk=2, sq=256, skv=256, d=128, causal=False),
    "d40_fp16": dict(b=2, hq=4, hk=4, sq=256, skv=256, d=40, causal=False, dtype=torch.float16),
}
# The 8-bit kernel is not held to the exact kernels' tolerance: the tuner's gate decides where
# it may be used. Here it must stay finite, and the known failure (0.29 with 77 keys on Hopper)
# is recorded as an expected failure rather than hidden.
TOL = {"sage_attention": 0.05}


def _tolerance(name: str) -> float:
    """The exact kernels' 5e-3; a low-precision kernel (FP8) is held to the bound of the most
    permissive quality tier, the one that may admit it (tiers.BOUNDS; the exact tier never times it)."""
    if name in TOL:
        return TOL[name]
    if REGISTRY[name].low_precision:
        return max(b.rel_l1 for b in BOUNDS.values())
    return 0.005


def _inputs(spec, layout="b n s d"):
    dt = spec.get("dtype", torch.bfloat16)
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(spec["b"], spec["hq"], spec["sq"], spec["d"], device="cuda", dtype=dt, generator=g)
    k = torch.randn(spec["b"], spec["hk"], spec["skv"], spec["d"], device="cuda", dtype=dt, generator=g)
    v = torch.randn(spec["b"], spec["hk"], spec["skv"], spec["d"], device="cuda", dtype=dt, generator=g)
    return q, k, v


@pytest.mark.parametrize("problem", list(PROBLEMS))
@pytest.mark.parametrize("name", list(REGISTRY))
def test_backend_matches_fp32_reference(name, problem):
    backend = REGISTRY[name]
    why = backend.unavailable_reason()
    if why:
        pytest.skip(f"{name} unavailable: {why}")
    spec = PROBLEMS[problem]
    q, k, v = _inputs(spec)
    call = prepare(q, k, v, "b n s d", "b n s d", "b n s d", "b n s d", None, None, None, spec["causal"], None, False)
    qc, kc, vc = call.canonical
    reasons = backend.not_supported_reasons(call.problem, device_info(q.device))
    if reasons:
        pytest.skip(f"{name} does not serve {problem}: {'; '.join(reasons)}")
    before = [t.clone() for t in (q, k, v)]
    with torch.no_grad():
        out = backend.forward(qc, kc, vc, None, None, spec["causal"], None, False)
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(before, (q, k, v))), f"{name} modified its inputs"
    assert out.shape == (spec["b"], spec["hq"], spec["sq"], spec["d"])
    heads = [0, spec["hq"] - 1]
    ref = reference_slice(qc, kc, vc, None, None, spec["causal"], None, heads)
    err = relative_l1(out[0, heads], ref)
    assert err != float("inf"), f"{name} on {problem}: NaN or Inf in the output"
    if name == "sage_attention" and err > TOL[name]:
        pytest.xfail(f"sage_attention on {problem}: error {err:.3g} (the numeric gate rejects it)")
    assert err <= _tolerance(name), f"{name} on {problem}: error {err:.3g}"


@pytest.mark.parametrize("layout", ["b s n d", "b s (n d)"])
def test_layouts_reach_every_backend(layout, monkeypatch, tmp_path):
    monkeypatch.setenv("DIFFSYNTH_ATTENTION_CACHE_DIR", str(tmp_path))
    spec = PROBLEMS["self_d128"]
    q, k, v = _inputs(spec)
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
    from einops import rearrange

    qs, ks, vs = (rearrange(t, f"b n s d -> {layout}").contiguous() for t in (q, k, v))
    dims = {"n": spec["hq"]}
    for name, backend in REGISTRY.items():
        if backend.unavailable_reason() or name in ("sage_attention",):
            continue
        with da.use_backend(name), torch.no_grad():
            out = da.attention_forward(qs, ks, vs, layout, layout, layout, "b n s d", dims=dims)
        err = relative_l1(out[0], ref[0])
        assert err < _tolerance(name), (name, layout, err)


def test_cuda_graph_capture_never_tunes_and_replays_the_decision(monkeypatch, tmp_path):
    monkeypatch.setenv("DIFFSYNTH_ATTENTION_CACHE_DIR", str(tmp_path))
    spec = PROBLEMS["self_d128"]
    q, k, v = _inputs(spec)
    with torch.no_grad():
        decision = da.explain(q, k, v).decision  # tuned before capture
        decided = decision.backend_for("cudagraph")  # a capture runs the decision's CUDA-graph pick
        with da.use_backend(decided):
            eager = da.attention_forward(q, k, v)
        tunings = da.stats()["tunings"]
        new_q = torch.randn(1, 8, 640, 128, device="cuda", dtype=torch.bfloat16)  # a key never seen
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            da.attention_forward(q, k, v)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = da.attention_forward(q, k, v)
            out_new = da.attention_forward(new_q, new_q, new_q)
        assert da.stats()["tunings"] == tunings, "tuning happened during capture"
        graph.replay()
        torch.cuda.synchronize()
    assert torch.equal(out, eager), f"replay differs from the eager {decided} result"
    ref = torch.nn.functional.scaled_dot_product_attention(new_q.float(), new_q.float(), new_q.float())
    assert relative_l1(out_new, ref) < 0.005


@pytest.mark.parametrize("name", ["torch", "torch_cudnn", "torch_flash", "torch_efficient", "flash_attention_4", "xformers"])
def test_gradients_match_fp32(name):
    backend = REGISTRY[name]
    if backend.unavailable_reason():
        pytest.skip(f"{name} unavailable: {backend.unavailable_reason()}")
    spec = PROBLEMS["self_d128"]
    q, k, v = (t.requires_grad_(True) for t in _inputs(spec))
    call = prepare(q, k, v, "b n s d", "b n s d", "b n s d", "b n s d", None, None, None, False, None, True)
    reasons = backend.not_supported_reasons(call.problem, device_info(q.device))
    if reasons:
        pytest.skip("; ".join(reasons))
    g = torch.randn(spec["b"], spec["hq"], spec["sq"], spec["d"], device="cuda", dtype=torch.bfloat16)
    with da.use_backend(name):
        out = da.attention_forward(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), g)
    qf, kf, vf = (t.detach().float().requires_grad_(True) for t in (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(qf, kf, vf)
    ref_grads = torch.autograd.grad(ref, (qf, kf, vf), g.float())
    for got, want, which in zip(grads, ref_grads, "qkv"):
        err = relative_l1(got, want)
        assert err < 0.02, f"{name} d{which}: {err:.3g}"


def test_sage_never_modifies_the_callers_key():
    backend = REGISTRY["sage_attention"]
    if backend.unavailable_reason():
        pytest.skip(backend.unavailable_reason())
    q, k, v = _inputs(PROBLEMS["self_d128"])
    k = k + 3.0  # a key with a large mean: smooth_k would change it
    before = k.clone()
    with da.use_backend("sage_attention"), torch.no_grad():
        da.attention_forward(q, k, v)
    torch.cuda.synchronize()
    assert torch.equal(k, before)


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
@pytest.mark.parametrize("name", ["torch", "torch_cudnn", "torch_flash", "torch_efficient", "flash_attention_4",
                                  "flash_attention_3", "xformers"])
def test_compiled_backend_matches_fp32_forward_and_backward(name, mode, monkeypatch, tmp_path):
    """On the GPU: each backend baked into a compiled graph (b s n d caller), forward
    against fp32, and gradients where the backend declares backward."""
    monkeypatch.setenv("DIFFSYNTH_ATTENTION_CACHE_DIR", str(tmp_path))
    backend = REGISTRY[name]
    if backend.unavailable_reason():
        pytest.skip(f"{name} unavailable: {backend.unavailable_reason()}")
    spec = PROBLEMS["self_d128"]
    q, k, v = (t.transpose(1, 2).contiguous() for t in _inputs(spec))
    pat = ("b s n d",) * 4
    call = prepare(q, k, v, *pat, None, None, None, False, None, False)
    qc, kc, vc = call.canonical
    reasons = backend.not_supported_reasons(call.problem, device_info(q.device))
    if reasons:
        pytest.skip("; ".join(reasons))
    torch._dynamo.reset()

    def fn(a, b, c):
        return da.attention_forward(a, b, c, *pat)

    compiled = torch.compile(fn, fullgraph=True, mode=None if mode == "default" else mode)
    with da.use_backend(name), torch.no_grad():
        for _ in range(3):
            out = compiled(q, k, v).clone()
    ref = reference_slice(qc, kc, vc, None, None, False, None, [0, spec["hq"] - 1])
    assert relative_l1(out.transpose(1, 2)[0, [0, spec["hq"] - 1]], ref) <= 0.005
    if mode != "default":
        return
    call_g = prepare(q, k, v, *pat, None, None, None, False, None, True)
    if backend.not_supported_reasons(call_g.problem, device_info(q.device)):
        return
    qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    g = torch.randn_like(q)
    with da.use_backend(name):
        grads = torch.autograd.grad(compiled(qg, kg, vg), (qg, kg, vg), g)
    qf, kf, vf = (t.detach().float().transpose(1, 2).requires_grad_(True) for t in (q, k, v))
    ref_out = torch.nn.functional.scaled_dot_product_attention(qf, kf, vf).transpose(1, 2)
    for got, want, which in zip(grads, torch.autograd.grad(ref_out, (qf, kf, vf), g.float()), "qkv"):
        assert relative_l1(got, want.transpose(1, 2)) < 0.02, f"{name} compiled d{which}"


@pytest.mark.parametrize("pattern", ["b s n d", "b n s d"])
def test_default_compile_bakes_every_length_by_bucket_without_copies(pattern, monkeypatch, tmp_path):
    """On the GPU: the default torch.compile bakes its first shape's decision (tuned at trace
    time); once a second length makes the sizes symbolic, each new length bucket is traced once
    and baked behind a guard on that bucket (dispatch/baked.py). No graph keeps the run-time
    operator where decisions exist, none copies, and compiles stay within one per bucket."""
    from diffsynth_attention.store.neighbours import seq_bucket
    from support.compile_helpers import Recorder

    monkeypatch.setenv("DIFFSYNTH_ATTENTION_CACHE_DIR", str(tmp_path))
    torch._dynamo.reset()
    rec = Recorder()
    pat = (pattern,) * 4
    f = torch.compile(lambda q, k, v: da.attention_forward(q, k, v, *pat), fullgraph=True, backend=rec)
    lengths = (1000, 1560, 2200, 3120)
    for s in lengths:
        g = torch.Generator(device="cuda").manual_seed(s)
        q, k, v = (torch.randn(1, s, 12, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
        if pattern == "b n s d":
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # b n s d views of b s n d memory, as models make them
        with torch.no_grad():
            out = f(q, k, v)
        bnsd = (lambda t: t) if pattern == "b n s d" else (lambda t: t.transpose(1, 2))
        ref = torch.nn.functional.scaled_dot_product_attention(*(bnsd(t).float() for t in (q, k, v)))
        assert relative_l1(bnsd(out).float(), ref) < 0.01
    assert rec.runs == len(lengths) and 2 <= rec.compiles <= 1 + len({seq_bucket(s) for s in lengths[1:]})
    for i in range(rec.compiles):
        names = rec.targets(i)
        assert "diffsynth_attention.dispatch.default" not in names, (i, names)  # every length was decided
        assert not any("clone" in t or "copy" in t or "contiguous" in t for t in names), (i, names)
