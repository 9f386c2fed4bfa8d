"""The compiled path at its edges (CPU): regressions for what an adversarial review found (each test
failed before its fix). Every compile uses fullgraph=True."""
import contextlib

import pytest
import torch

import diffsynth_attention as da
from diffsynth_attention.dispatch import default_dispatcher

from support.compile_helpers import Recorder, fresh_dynamo, require, requires_bake  # noqa: F401  (an autouse fixture)
from support.helpers import qkv, rel

PACKED = ("b s (n d)",) * 4


def test_training_compile_tunes_the_gradient_key_once_and_keeps_the_decision():
    """A gradient-needing key first met in a trace is tuned on random tensors that require grad:
    before the fix they did not, every candidate's backward raised, the all-rejected decision was
    never stored, and the key was tuned again at every trace (3 times in one compile) and again
    at run time."""
    requires_bake()
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 192)

    def fn(x):
        q, k, v = lin(x).chunk(3, dim=-1)
        return da.attention_forward(q, k, v, *PACKED, dims={"n": 4})

    rec = Recorder()
    f = torch.compile(fn, fullgraph=True, backend=rec, dynamic=False)
    x = torch.randn(2, 16, 64, requires_grad=True)
    out = f(x)
    out.sum().backward()
    assert da.stats()["tunings"] == 1, da.stats()
    q, k, v = (t.detach().requires_grad_(True) for t in lin(x).chunk(3, dim=-1))
    explained = da.explain(q, k, v, *PACKED, dims={"n": 4})
    assert explained.source == "cache", explained  # the trace's decision is on file
    assert explained.decision.candidates[explained.backend].status == "chosen"
    assert da.stats()["tunings"] == 1
    ref = torch.nn.functional.scaled_dot_product_attention(
        *(t.unflatten(-1, (4, 16)).transpose(1, 2) for t in lin(x).chunk(3, dim=-1))).transpose(1, 2).flatten(2)
    assert rel(out, ref) < 1e-5


@pytest.mark.parametrize("dynamic", [False, True])
def test_use_backend_inside_a_compiled_function(dynamic):
    """``with use_backend(...)`` inside the compiled function: before the fix Dynamo could not
    trace its ContextVar.set (Unsupported under fullgraph), and the decomposition, which runs
    after Dynamo, could not see a scope opened inside the traced code."""
    require("contextmanager")
    q, k, v = qkv()
    def fn(q, k, v):
        with da.use_backend("torch_math"):
            inside = da.attention_forward(q, k, v)
        return inside, da.attention_forward(q, k, v)

    rec = Recorder()
    f = torch.compile(fn, fullgraph=True, backend=rec, dynamic=dynamic)
    with torch.no_grad():
        outs = [f(q, k, v) for _ in range(2)]
    assert rec.runs == 2
    if dynamic:  # the run-time operator: the scoped call planned on torch_math at its call, the other on auto
        plans = list(default_dispatcher().plans.values())
        assert any(p.backend == "torch_math" and p.source == "override" for p in plans), plans
        assert any(p.source != "override" for p in plans), plans
    else:  # baked: the graph carries torch_math's decision for the scoped call only
        code = str(rec.forward_graphs[-1].code) if rec.forward_graphs else ""
        assert "bmm" in code, code  # torch_math decomposes into matmuls
    assert da.current_implementation() == "auto"  # nothing leaked out of the block
    from diffsynth_attention import overrides, trace_state

    assert trace_state.traced_scopes()[0] is None and overrides.scope_get() is None
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    for inside, outside in outs:
        assert rel(inside, ref) < 1e-5 and rel(outside, ref) < 1e-5



def test_use_backend_as_a_decorator_of_a_compiled_function():
    """``@use_backend(...)`` on the function compiled (fullgraph): its block is traced as a ``with``
    block opened inside it, so the graph carries torch_math's decision, and nothing leaks out."""
    require("contextmanager")
    q, k, v = qkv()

    @da.use_backend("torch_math")
    def fn(q, k, v):
        return da.attention_forward(q, k, v)

    rec = Recorder()
    f = torch.compile(fn, fullgraph=True, backend=rec)
    with torch.no_grad():
        outs = [f(q, k, v) for _ in range(2)]
    assert rec.runs == 2
    code = str(rec.forward_graphs[-1].code) if rec.forward_graphs else ""
    assert "bmm" in code, code  # torch_math decomposes into matmuls
    from diffsynth_attention import overrides, trace_state

    assert da.current_implementation() == "auto" and overrides.scope_get() is None and trace_state.traced_scopes()[0] is None
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert all(rel(out, ref) < 1e-5 for out in outs)

@pytest.mark.parametrize("dynamic,known", [(False, False), (False, True), (True, False)])
def test_learned_additive_mask_gets_its_gradient_under_compile(dynamic, known):
    """A mask that requires grad (a learned additive bias) gets its gradient as in eager. Before
    the fix a masked call compiled to the run-time operator, whose autograd differentiates
    q, k and v only: the bias's gradient was silently None."""
    q, k, v = (t.requires_grad_(True) for t in qkv(b=1, hq=2, sq=16))
    bias = torch.randn(1, 2, 16, 16, requires_grad=True)
    if known:  # a decision on file: the graph bakes it
        da.attention_forward(q, k, v, attn_mask=bias)
    f = torch.compile(lambda q, k, v, m: da.attention_forward(q, k, v, attn_mask=m), fullgraph=True, backend=Recorder(),
                      dynamic=dynamic)
    out = f(q, k, v, bias)
    grads = torch.autograd.grad(out.sum(), (q, k, v, bias), allow_unused=True)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    ref_grads = torch.autograd.grad(ref.sum(), (q, k, v, bias))
    assert rel(out, ref) < 1e-5
    for g, r in zip(grads, ref_grads):
        assert g is not None and rel(g, r) < 1e-4


@pytest.mark.parametrize("dynamic", [False, True])
def test_patch_diffsynth_callers_compile_fullgraph_and_match(dynamic):
    """DiffSynth-Studio's attention_forward callers (its module loaded as test_integration does
    where the package's own import fails), patched, then compiled."""
    from support.diffsynth import load_diffsynth_attention

    module = load_diffsynth_attention()
    original = module.attention_forward
    handle = da.patch_diffsynth(wan=False)
    try:
        assert module.attention_forward is not original
        pattern = dict(q_pattern="b s (n d)", k_pattern="b s (n d)", v_pattern="b s (n d)", out_pattern="b s (n d)",
                       dims={"n": 4})
        rec = Recorder()
        f = torch.compile(lambda x: module.attention_forward(x, x, x, **pattern), fullgraph=True, backend=rec,
                          dynamic=dynamic)
        with torch.no_grad():
            for s in (16, 16, 24):
                x = torch.randn(2, s, 64)
                assert rel(f(x), original(x, x, x, **pattern)) < 1e-5
        assert rec.runs == 3 and da.stats()["tunings"] >= 1
    finally:
        handle.undo()


@pytest.mark.parametrize("dynamic", [False, None, True])
def test_clear_cache_after_compiling_keeps_results_right(dynamic):
    rec = Recorder()
    f = torch.compile(lambda q, k, v: da.attention_forward(q, k, v), fullgraph=True, backend=rec, dynamic=dynamic)
    shapes = [qkv(sq=32), qkv(sq=48, seed=1)]
    with torch.no_grad():
        for q, k, v in shapes:
            f(q, k, v)
        assert da.clear_cache() >= 1
        for q, k, v in shapes + [qkv(sq=56, seed=2)] + shapes:
            assert rel(f(q, k, v), torch.nn.functional.scaled_dot_product_attention(q, k, v)) < 1e-5
    assert rec.runs == 7


def test_head_count_passed_as_an_int_argument_under_dynamic_true():
    """``dims={"n": heads}`` with ``heads`` an argument of the compiled function: dynamic=True
    makes it a SymInt. Before the fix, formatting it into the operator's dims text failed the
    trace (Unsupported: BUILD_STRING type error)."""
    def fn(x, heads):
        return da.attention_forward(x, x, x, *PACKED, dims={"n": heads})

    rec = Recorder()
    f = torch.compile(fn, fullgraph=True, backend=rec, dynamic=True)
    with torch.no_grad():
        for s, heads in ((16, 4), (24, 4), (24, 8)):
            x = torch.randn(2, s, 64)
            ref = torch.nn.functional.scaled_dot_product_attention(
                *(x.unflatten(-1, (heads, 64 // heads)).transpose(1, 2),) * 3).transpose(1, 2).flatten(2)
            assert rel(f(x, heads), ref) < 1e-5
    assert rec.runs == 3


@pytest.mark.parametrize("backend", ["torch", "torch_flash", "auto"])
@pytest.mark.parametrize("causal", [False, True])
def test_a_baked_float32_mask_with_a_float64_query_is_added_as_its_values(backend, causal):
    """The compiled twin of test_float32_mask_with_float64_query_is_added_as_its_values: a graph
    that bakes a decision ran the backend on the float32 mask as it came (eager's runners upcast
    it), and PyTorch's CPU flash kernel misread it (relative error ~1)."""
    requires_bake()
    q, k, v = qkv(b=1, hq=2, sq=16, d=8, dtype=torch.float64)
    mask = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    bias = mask.double()
    if causal:
        bias = bias.masked_fill(torch.ones(16, 16, dtype=torch.bool).triu(1), float("-inf"))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    rec = Recorder()
    with da.use_backend(backend), torch.no_grad():
        da.attention_forward(q, k, v, attn_mask=mask, is_causal=causal)  # a decision on file: the graph bakes it
        f = torch.compile(lambda q, k, v, m: da.attention_forward(q, k, v, attn_mask=m, is_causal=causal),
                          fullgraph=True, backend=rec)
        out = f(q, k, v, mask)
    assert rec.forward_graphs and "diffsynth_attention" not in str(rec.forward_graphs[-1].code)  # baked
    assert out.dtype == torch.float64 and rel(out, expected) < 1e-6


@pytest.mark.parametrize("how", ["use_backend", "variable"])
def test_a_forced_backend_that_cannot_differentiate_a_learned_mask_falls_back_as_eager_does(how, monkeypatch):
    """torch_flash gives no gradient for a mask: eager serves a learned mask's call on torch (with a
    warning). The trace planned the call as gradient-free (q, k and v need none), baked torch_flash,
    and its decomposition failed the compile (the flash kernel refuses a mask that requires grad)."""
    q, k, v = qkv(b=1, hq=2, sq=16)
    bias = torch.randn(1, 2, 16, 16, requires_grad=True)
    if how == "variable":
        monkeypatch.setenv("DIFFSYNTH_ATTENTION_IMPLEMENTATION", "torch_flash")
    scope = da.use_backend("torch_flash") if how == "use_backend" else contextlib.nullcontext()
    with scope:
        f = torch.compile(lambda q, k, v, m: da.attention_forward(q, k, v, attn_mask=m), fullgraph=True, backend=Recorder())
        out = f(q, k, v, bias)
    (grad,) = torch.autograd.grad(out.sum(), (bias,))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    (ref_grad,) = torch.autograd.grad(ref.sum(), (bias,))
    assert rel(out, ref) < 1e-5 and rel(grad, ref_grad) < 1e-4


@pytest.mark.parametrize("dynamic,masked", [(True, False), (False, True)])
def test_training_through_the_run_time_operator_under_inductor_matches_float64(dynamic, masked):
    """Symbolic sizes or a mask with no decision yet compile to the run-time operator. Its backward's
    fake promises gradients laid out like q, k and v (empty_like); the real one returned autograd's
    own strides (b s n d memory for a b n s d query), and inductor's stride assertion failed the
    backward (AssertionError: expected ... stride 8==128)."""
    q, k, v = (t.requires_grad_(True) for t in qkv(b=2, hq=4, sq=16, d=8))
    mask = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1)) if masked else None
    f = torch.compile(lambda q, k, v: da.attention_forward(q, k, v, attn_mask=mask), fullgraph=True, dynamic=dynamic)
    out = f(q, k, v)
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    grads = torch.autograd.grad(out, (q, k, v), go)
    ref_in = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref = torch.nn.functional.scaled_dot_product_attention(*ref_in, attn_mask=None if mask is None else mask.double())
    assert rel(out, ref) < 1e-5
    for g, r in zip(grads, torch.autograd.grad(ref, ref_in, go.double())):
        assert rel(g, r) < 1e-5


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_a_module_calling_attention_forward_exports_non_strict(masked, strict):
    """torch.export's non-strict trace (torch 2.13's default) runs the forward as Python under its
    own fake and proxy modes: the bake's stand-ins and a tuning's calls were recorded into the
    graph, and export failed ("fake mode ... doesn't match mode"). They run outside those modes."""
    class M(torch.nn.Module):
        def forward(self, q, k, v, mask):
            return da.attention_forward(q, k, v, attn_mask=mask)

    q, k, v = qkv(b=1, hq=2, sq=16, d=8)
    mask = torch.randn(16, 16) if masked else None
    ep = torch.export.export(M(), (q, k, v, mask), strict=strict)
    with torch.no_grad():
        assert rel(ep.module()(q, k, v, mask), torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)) < 1e-5


@pytest.mark.parametrize("strict", [False, True])
def test_an_export_with_a_dynamic_sequence_serves_every_length_of_its_range(strict):
    """Before: with symbolic lengths the trace baked its bucket's backend behind guards on the
    bucket (15 <= s <= 17 here), which torch.export refuses for ``Dim("s", max=1024)``
    ("Constraints violated"), where plain SDPA exports. An export keeps the run-time operator."""
    class M(torch.nn.Module):
        def forward(self, q, k, v):
            return da.attention_forward(q, k, v)

    s = torch.export.Dim("s", min=2, max=1024)
    ep = torch.export.export(M(), qkv(b=1, hq=2, sq=16, d=8), strict=strict, dynamic_shapes=({2: s},) * 3)
    for n in (16, 40):
        q, k, v = qkv(b=1, hq=2, sq=n, d=8, seed=n)
        with torch.no_grad():
            assert rel(ep.module()(q, k, v), torch.nn.functional.scaled_dot_product_attention(q, k, v)) < 1e-5
