"""The dispatcher under torch.compile (CPU): the decision is baked into the graph at trace time.

Every compile here uses fullgraph=True, so a graph break fails the test. A CompileCounter
backend records the graphs, so the tests can check which operator each graph calls."""
import pytest
import torch

import diffsynth_attention as da
from diffsynth_attention.integrations import patching

from support.compile_helpers import Recorder, fresh_dynamo, requires_bake  # noqa: F401  (an autouse fixture)
from support.helpers import full_reference, qkv, rel


BSND = ("b s n d",) * 4


def bsnd(b=2, hq=4, s=32, d=16, seed=0):
    q, k, v = qkv(b=b, hq=hq, sq=s, d=d, seed=seed)
    return tuple(t.transpose(1, 2).contiguous() for t in (q, k, v)), (q, k, v)


def no_copy_of_ours(names, q, k, v) -> bool:
    """No copy in the graph but the chosen backend's own: torch_math's decomposition clones
    (inside PyTorch's math kernel); the fused kernels' graphs hold none."""
    if da.explain(q, k, v, *BSND).backend == "torch_math":
        return True
    return not any("contiguous" in t or "clone" in t or "copy" in t for t in names)


class Attn(torch.nn.Module):
    def forward(self, q, k, v):
        return da.attention_forward(q, k, v, *BSND)


class SDPAModule(torch.nn.Module):
    def forward(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def test_new_key_is_tuned_at_trace_time_and_baked_in_the_first_graph():
    requires_bake()
    (q, k, v), canon = bsnd()
    rec = Recorder()
    model = torch.compile(Attn(), fullgraph=True, backend=rec)
    with torch.no_grad():
        outs = [model(q, k, v) for _ in range(3)]
    assert da.stats()["tunings"] == 1  # tuned once, while the graph was traced
    assert rec.compiles == 1 and rec.runs == 3  # no recompile once the decision exists
    assert not any("diffsynth_attention" in t for t in rec.targets())  # the backend itself, no dispatcher
    assert no_copy_of_ours(rec.targets(), q, k, v)
    ref = full_reference(*canon).transpose(1, 2)
    for out in outs:
        assert rel(out, ref) < 1e-5


def test_eager_calls_that_fill_the_hot_path_table_recompile_no_graph():
    """The hot path's table of guarded entries grows with each eager problem. torch 2.5's Dynamo
    guards every closure cell of attention_forward that it inlines, read or not: with the table
    itself a cell, each new entry failed the compiled graph's guard on its length and recompiled it
    (up to the recompile limit, then eager). Only its bound methods are cells now."""
    (q, k, v), _ = bsnd()
    rec = Recorder()
    model = torch.compile(Attn(), fullgraph=True, backend=rec)
    with torch.no_grad():
        model(q, k, v)
        for s in (8, 12, 20):
            (a, b, c), _ = bsnd(s=s)
            da.attention_forward(a, b, c, *BSND)
            da.attention_forward(a, b, c, *BSND)  # a signature hit: adds the guarded entry
            model(q, k, v)
    assert rec.compiles == 1 and rec.runs == 4


def test_known_key_is_baked_at_first_trace_with_no_layout_round_trip():
    requires_bake()
    (q, k, v), canon = bsnd()
    with torch.no_grad():
        da.attention_forward(q, k, v, *BSND)  # decision known before compiling
        hits = da.stats()["hits"]
        rec = Recorder()
        model = torch.compile(Attn(), fullgraph=True, backend=rec)
        out = model(q, k, v)
        out = model(q, k, v)
    assert rec.compiles == 1
    names = rec.targets()
    assert not any("diffsynth_attention" in t for t in names)
    assert no_copy_of_ours(names, q, k, v)  # no defensive copy
    assert da.stats()["hits"] == hits  # the eager dispatcher never ran
    assert da.stats()["tunings"] == 1
    assert rel(out, full_reference(*canon).transpose(1, 2)) < 1e-5


def test_a_new_decision_for_another_key_recompiles_no_graph():
    """No process-wide epoch: graphs hold their backend, whatever the store learns later."""
    (q, k, v), _ = bsnd()
    rec = Recorder()
    model = torch.compile(Attn(), fullgraph=True, backend=rec)
    with torch.no_grad():
        model(q, k, v)
        (q2, k2, v2), _ = bsnd(s=48)
        da.attention_forward(q2, k2, v2, *BSND)  # another key tuned eagerly
        model(q, k, v)
    assert da.stats()["tunings"] == 2
    assert rec.compiles == 1 and rec.runs == 2


FLASH_CPU = "aten._scaled_dot_product_flash_attention_for_cpu.default"


def math_graph(names) -> bool:
    """torch_math decomposes under AOTAutograd: matmuls and a softmax, no fused kernel."""
    return any("bmm" in t for t in names) and not any("scaled_dot_product" in t for t in names)


def test_use_backend_selects_another_compiled_version():
    requires_bake()
    (q, k, v), canon = bsnd()
    rec = Recorder()
    model = torch.compile(Attn(), fullgraph=True, backend=rec)
    with torch.no_grad():
        with da.use_backend("torch_math"):
            out = model(q, k, v)
            assert math_graph(rec.targets())
        assert rel(out, full_reference(*canon).transpose(1, 2)) < 1e-5
        with da.use_backend("torch_flash"):
            model(q, k, v)  # another scope: traced again
        assert rec.compiles == 2
        assert FLASH_CPU in rec.targets()
        with da.use_backend("torch_math"):
            model(q, k, v)
        assert rec.compiles == 2 and rec.runs == 3  # re-entering reuses the torch_math version


@pytest.mark.parametrize("scope", ["use_backend", "quality"])
def test_first_scope_ever_set_retraces_a_graph_traced_before_it(scope, monkeypatch):
    """Until a process sets a scope, a trace reads only the scope modules' ``used`` flags (a C++
    guard, not the contextvar property's Python one). The first scope set must fail that guard:
    the call under it is traced again and runs what the scope asks for; outside it the first
    graph serves again."""
    if scope == "use_backend":
        requires_bake()
    from diffsynth_attention import overrides, tiers

    monkeypatch.setattr(overrides.TRACE, "used", False)
    monkeypatch.setattr(tiers.TRACE, "used", False)
    (q, k, v), _ = bsnd()
    rec = Recorder()
    model = torch.compile(Attn(), fullgraph=True, backend=rec)
    with torch.no_grad():
        model(q, k, v)
        assert rec.compiles == 1 and not math_graph(rec.targets())
        with (da.use_backend("torch_math") if scope == "use_backend" else da.quality("balanced")):
            model(q, k, v)
        assert rec.compiles == 2
        if scope == "use_backend":
            assert math_graph(rec.targets())
        model(q, k, v)
        assert rec.runs == 3


def test_implementation_variable_is_read_at_trace_time(monkeypatch):
    requires_bake()
    (q, k, v), _ = bsnd()
    monkeypatch.setenv("DIFFSYNTH_ATTENTION_IMPLEMENTATION", "torch_flash")
    rec = Recorder()
    with torch.no_grad():
        torch.compile(Attn(), fullgraph=True, backend=rec)(q, k, v)
    assert FLASH_CPU in rec.targets()


@pytest.mark.parametrize("mode", ["global", "scoped"])
def test_patch_sdpa_under_fullgraph_routes_to_the_tuned_backend(mode, monkeypatch):
    requires_bake()
    q, k, v = qkv()
    rec = Recorder()
    model = torch.compile(SDPAModule(), fullgraph=True, backend=rec)
    with torch.no_grad():
        with da.use_backend("torch_flash"):  # a visible choice: the flash kernel
            if mode == "global":
                handle = da.patch_sdpa()
                try:
                    out = model(q, k, v)
                finally:
                    handle.undo()
            else:
                with da.patch_sdpa():
                    out = model(q, k, v)
            assert FLASH_CPU in rec.targets()
            plain = model(q, k, v)  # routing off again: a guard recompiles to PyTorch's own SDPA
            assert rec.compiles == 2 and "diffsynth" not in str(rec.forward_graphs[-1].code)
    assert torch.nn.functional.scaled_dot_product_attention is patching._ORIGINAL_SDPA
    ref = full_reference(q, k, v)
    assert rel(out, ref) < 1e-5 and rel(plain, ref) < 1e-5


def test_symbolic_sizes_call_the_runtime_operator_without_copies():
    rec = Recorder()
    model = torch.compile(Attn(), fullgraph=True, backend=rec, dynamic=True)
    with torch.no_grad():
        for s in (24, 40, 56):  # (not 16: duck sizing would tie s to d)
            (q, k, v), canon = bsnd(s=s)
            out = model(q, k, v)
            assert rel(out, full_reference(*canon).transpose(1, 2)) < 1e-5
            assert out.is_contiguous()  # b s n d in memory, as declared
    assert rec.compiles == 1 and rec.runs == 3
    names = rec.targets()
    assert "diffsynth_attention.dispatch.default" in names
    assert not any("contiguous" in t or "clone" in t or "copy" in t for t in names)


@pytest.mark.parametrize("pattern", ["b s n d", "b n s d"])
def test_runtime_operator_returns_the_declared_layout(pattern):
    from diffsynth_attention.dispatch import compiled, default_dispatcher

    (q, k, v), canon = bsnd()
    if pattern == "b n s d":
        q, k, v = canon
    args = (q, k, v, None, None, compiled.pack_call(pattern, pattern, pattern, pattern, None, False, None, False, None),
            default_dispatcher().trace_token)
    out = compiled.dispatch_op(*args)
    fake = compiled._dispatch_fake(*args)
    assert out.shape == fake.shape and out.stride() == fake.stride()
    ref = full_reference(*canon)
    assert rel(out if pattern == "b n s d" else out.transpose(1, 2), ref) < 1e-5


def test_runtime_operator_keys_a_masked_call_without_gradient(caplog):
    """The run-time operator differentiates q, k and v only. Called under grad mode with a mask that
    requires grad (and q, k, v that do not), it keys the call as gradient-free, as eager keys it:
    not a gradient key that every candidate then fails below autograd and falls back from."""
    from diffsynth_attention.dispatch import compiled, default_dispatcher

    (q, k, v), canon = bsnd()
    mask = torch.zeros(1, 1, 32, 32, requires_grad=True)
    call = compiled.pack_call("b s n d", "b s n d", "b s n d", "b s n d", None, False, None, False, None)
    with caplog.at_level("WARNING", logger="diffsynth_attention"):
        out = compiled.dispatch_op(q, k, v, mask, None, call, default_dispatcher().trace_token)
    assert not out.requires_grad and rel(out.transpose(1, 2), full_reference(*canon)) < 1e-5
    assert not [r for r in caplog.records if r.levelname == "WARNING"], [r.getMessage() for r in caplog.records]


def test_bad_input_raises_at_trace_time_naming_the_argument():
    (q, k, v), _ = bsnd()
    model = torch.compile(lambda q, k, v: da.attention_forward(q, k, v, "b s n d", "b s n d", "b s n d", "b s n d",
                                                               window_size=-3), fullgraph=True, backend="eager")
    with pytest.raises(Exception, match="window_size"):
        model(q, k, v)


def test_compiled_gradients_use_the_backends_own_backward():
    requires_bake()
    (q, k, v), canon = bsnd()
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    eager = da.attention_forward(q, k, v, *BSND)
    g_eager = torch.autograd.grad(eager.sum(), (q, k, v))
    rec = Recorder()
    model = torch.compile(Attn(), fullgraph=True, backend=rec)
    out = model(q, k, v)
    g_comp = torch.autograd.grad(out.sum(), (q, k, v))
    assert not any("diffsynth_attention" in t for t in rec.targets())  # ATen ops, with their own derivatives
    for a, b in zip(g_comp, g_eager):
        assert rel(a, b) < 1e-5


def test_inductor_compiles_the_baked_graph():
    (q, k, v), canon = bsnd()
    with torch.no_grad():
        da.attention_forward(q, k, v, *BSND)
        out = torch.compile(Attn(), fullgraph=True)(q, k, v)
    assert rel(out, full_reference(*canon).transpose(1, 2)) < 1e-5


@pytest.fixture
def fake_fa4(monkeypatch):
    """FlashAttention-4 as a fake package on the CPU (fp32), registered as the backend."""
    import sys

    from support import fake_kernels as fk
    from diffsynth_attention.backends import REGISTRY
    from diffsynth_attention.backends.flash_attention import FlashAttention4

    pkg, cute = fk.make_fa4()
    monkeypatch.setitem(sys.modules, "flash_attn", pkg)
    monkeypatch.setitem(sys.modules, "flash_attn.cute", cute)
    monkeypatch.setitem(sys.modules, "flash_attn.cute.interface", cute.interface)
    fa4 = type("FA4", (FlashAttention4,), {"devices": frozenset({"cpu"}), "dtypes": frozenset({torch.float32})})()
    monkeypatch.setitem(REGISTRY, "flash_attention_4", fa4)
    fk.Recorder.calls.clear()
    return fk.Recorder.calls


def test_kernel_package_is_one_thin_operator_on_the_callers_bsnd_tensors(fake_fa4):
    """A FlashAttention decision compiles to diffsynth_attention::kernel, which hands FA the
    caller's own b s n d tensors (no copy)."""
    requires_bake()
    (q, k, v), canon = bsnd()
    rec = Recorder()
    model = torch.compile(Attn(), fullgraph=True, backend=rec)
    with da.use_backend("flash_attention_4"), torch.no_grad():
        out = model(q, k, v)
    assert "diffsynth_attention.kernel.default" in rec.targets()
    name, qa, ka, va, _ = fake_fa4[-1]
    assert name == "fa4" and qa.data_ptr() == q.data_ptr() and qa.stride() == q.stride()
    assert rel(out, full_reference(*canon).transpose(1, 2)) < 1e-5


@pytest.mark.parametrize("compiled", [False, True])
def test_training_through_a_kernel_package_saves_out_and_lse_and_never_reruns_the_forward(compiled, fake_fa4):
    """fwd+bwd through FlashAttention-4 (the kernel operator, called as a compiled graph calls it,
    or inside a compiled graph): one forward call that returns the log-sum-exp, one call of the
    package's backward with that log-sum-exp (the fake checks it), gradients as SDPA's."""
    if compiled:
        requires_bake()
    from diffsynth_attention.dispatch import compiled as ops

    (q, k, v), canon = bsnd()
    qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
    if compiled:
        rec = Recorder()
        model = torch.compile(Attn(), fullgraph=True, backend=rec)
        with da.use_backend("flash_attention_4"):
            model(qg, kg, vg)  # compile (its trace runs no kernel)
            fake_fa4.clear()
            grads = torch.autograd.grad(model(qg, kg, vg).sum(), (qg, kg, vg))
        assert "diffsynth_attention.kernel_lse.default" in rec.targets()
    else:
        out = ops.kernel_op("flash_attention_4", qg, kg, vg, None, None, False, None)
        grads = torch.autograd.grad(out.sum(), (qg, kg, vg))
    assert [c[0] for c in fake_fa4] == ["fa4", "fa4_bwd"]
    ref = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref_out = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in ref)).transpose(1, 2)
    for g, r in zip(grads, torch.autograd.grad(ref_out.sum(), ref)):
        assert rel(g, r) < 1e-4


def test_runtime_operator_backward_matches_sdpa():
    """The run-time operator (symbolic sizes) differentiates the dispatcher's backend."""
    rec = Recorder()
    model = torch.compile(Attn(), fullgraph=True, backend=rec, dynamic=True)
    for s in (24, 40):
        (q, k, v), canon = bsnd(s=s)
        qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
        grads = torch.autograd.grad(model(qg, kg, vg).sum(), (qg, kg, vg))
        ref = [t.clone().requires_grad_(True) for t in (q, k, v)]
        ref_out = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in ref)).transpose(1, 2)
        for g, r in zip(grads, torch.autograd.grad(ref_out.sum(), ref)):
            assert rel(g, r) < 1e-4
    assert "diffsynth_attention.dispatch.default" in rec.targets()
    assert rec.compiles == 1


def test_non_finite_scale_raises_at_trace_time():
    (q, k, v), _ = bsnd()
    model = torch.compile(lambda q, k, v: da.attention_forward(q, k, v, *BSND, scale=float("nan")), fullgraph=True,
                          backend="eager")
    with pytest.raises(Exception, match="scale"):
        model(q, k, v)


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(64, 64)

    def forward(self, x):
        h = self.proj(x)
        return da.attention_forward(h, h, h, "b s (n d)", "b s (n d)", "b s (n d)", "b s (n d)", dims={"n": 4})


def test_torch_compile_fullgraph_matches_eager():
    model = Block()
    x = torch.randn(2, 16, 64)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    out = compiled(x)
    assert torch.allclose(out, eager, atol=1e-5)


def test_compiled_gradients_match_eager():
    model = Block()
    x = torch.randn(2, 16, 64, requires_grad=True)
    eager = model(x)
    (g_eager,) = torch.autograd.grad(eager.sum(), x)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    (g_comp,) = torch.autograd.grad(compiled(x).sum(), x)
    assert rel(g_comp, g_eager) < 1e-4


def test_training_a_b_n_s_d_caller_through_a_kernel_package_under_inductor(fake_fa4):
    """The kernel's native b s n d view of a b n s d caller's tensors is not contiguous; the kernel
    backward returns contiguous gradients, while its fake promised q's strides (empty_like), so
    inductor's stride assertion failed the backward (AssertionError: expected ... stride 32==8)."""
    requires_bake()
    q, k, v = (t.requires_grad_(True) for t in qkv(b=2, hq=4, sq=16, d=8))
    with torch._inductor.config.patch(force_disable_caches=True), da.use_backend("flash_attention_4"):
        out = torch.compile(lambda q, k, v: da.attention_forward(q, k, v), fullgraph=True)(q, k, v)
        go = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
        grads = torch.autograd.grad(out, (q, k, v), go)
    assert [c[0] for c in fake_fa4] == ["fa4", "fa4_bwd"]
    ref_in = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref = torch.nn.functional.scaled_dot_product_attention(*ref_in)
    for g, r in zip(grads, torch.autograd.grad(ref, ref_in, go.double())):
        assert rel(g, r) < 1e-5
