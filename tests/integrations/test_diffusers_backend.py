"""The ``diffsynth_auto`` diffusers attention backend (CPU)."""
import types

import pytest
import torch

pytest.importorskip("diffusers.models.attention_dispatch")

import diffsynth_attention as da  # noqa: E402
from diffsynth_attention.integrations import diffusers as dd  # noqa: E402

dd.register()

from diffusers.models.attention_dispatch import (  # noqa: E402
    AttentionBackendName, _AttentionBackendRegistry, attention_backend, dispatch_attention_fn)

from support.diffusers_models import tiny_flux, tiny_unet, tiny_wan  # noqa: E402
from support.subprocesses import by_name, prespawn, python_c, results  # noqa: E402

@pytest.fixture(autouse=True)
def native_afterwards():
    yield
    _AttentionBackendRegistry.set_active_backend(AttentionBackendName.NATIVE)
    torch._dynamo.reset()


def bsnd(b=2, s=24, n=4, d=16, seed=0, kv_heads=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, s, n, d, generator=g)
    k = torch.randn(b, s + 3, kv_heads or n, d, generator=g)
    v = torch.randn(b, s + 3, kv_heads or n, d, generator=g)
    return q, k, v


def native(q, k, v, **kw):
    return dispatch_attention_fn(q, k, v, backend=AttentionBackendName.NATIVE, **kw)


def ours(q, k, v, **kw):
    return dispatch_attention_fn(q, k, v, backend=AttentionBackendName(dd.BACKEND_NAME), **kw)


def test_registered_with_context_parallel_and_constraints():
    member = AttentionBackendName(dd.BACKEND_NAME)
    assert member.value == "diffsynth_auto" and AttentionBackendName.DIFFSYNTH_AUTO is member
    assert member in _AttentionBackendRegistry.list_backends()
    assert _AttentionBackendRegistry._is_context_parallel_available(member)
    assert dd._check_args in _AttentionBackendRegistry._constraints[member]
    assert dd.register() == "diffsynth_auto"  # idempotent
    assert list(AttentionBackendName).count(member) == 1


@pytest.mark.parametrize("kw", [
    {},
    {"is_causal": True},
    {"scale": 0.3},
    {"attn_mask": "bool2d"},
    {"attn_mask": "additive4d"},
])
def test_arguments_map_exactly(kw):
    q, k, v = bsnd()
    kw = dict(kw)
    if kw.get("attn_mask") == "bool2d":  # (batch, s_kv): a key-padding mask, as native reads it
        mask = torch.ones(2, k.shape[1], dtype=torch.bool)
        mask[0, -5:] = False
        kw["attn_mask"] = mask
    elif kw.get("attn_mask") == "additive4d":
        kw["attn_mask"] = torch.randn(2, 1, q.shape[1], k.shape[1])
    tunings = da.stats()["tunings"] + da.stats()["hits"]
    torch.testing.assert_close(ours(q, k, v, **kw), native(q, k, v, **kw), atol=2e-5, rtol=1e-4)
    assert da.stats()["tunings"] + da.stats()["hits"] > tunings  # served by the dispatcher


def test_gqa_needs_enable_gqa_and_dropout_is_refused():
    q, k, v = bsnd(kv_heads=2)
    torch.testing.assert_close(ours(q, k, v, enable_gqa=True), native(q, k, v, enable_gqa=True), atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="enable_gqa"):
        ours(q, k, v)
    with pytest.raises(ValueError, match="dropout_p"):
        ours(*bsnd(), dropout_p=0.1)


@pytest.mark.parametrize("kw", [{}, {"attn_mask": "bool2d"}, {"is_causal": True}, {"enable_gqa": True}])
def test_meta_tensors_get_natives_meta_output(kw):
    """native runs meta tensors (PyTorch's SDPA: a meta output of the right shape, as shape inference
    on a model built on the meta device needs); the backend raised attention_forward's 'q is a meta tensor'."""
    q, k, v = (t.to("meta") for t in bsnd(kv_heads=2 if kw.get("enable_gqa") else None))
    kw = {**kw, "attn_mask": torch.ones(2, k.shape[1], dtype=torch.bool, device="meta")} if "attn_mask" in kw else kw
    want = native(q, k, v, **kw)
    before = da.stats()
    got = ours(q, k, v, **kw)
    assert got.is_meta and got.shape == want.shape and got.dtype == want.dtype and got.stride() == want.stride()
    assert da.stats() == before


def test_declared_constraints_run_when_diffusers_checks_are_on(monkeypatch):
    monkeypatch.setattr(_AttentionBackendRegistry, "_checks_enabled", True)  # DIFFUSERS_ATTN_CHECKS=1
    q, k, v = bsnd()
    torch.testing.assert_close(ours(q, k, v), native(q, k, v), atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="same device|same dtype"):  # diffusers' own _check_device
        ours(q, k.double(), v)
    with pytest.raises(ValueError, match="enable_gqa"):  # ours, before any kernel runs
        ours(q, k[:, :, :2], v[:, :, :2])


def test_inputs_are_not_transposed_or_modified():
    q, k, v = bsnd()
    before = [t.clone() for t in (q, k, v)]
    out = ours(q, k, v)
    assert out.shape == q.shape  # b s n d in, b s n d out
    for t, b in zip((q, k, v), before):
        assert torch.equal(t, b)


def test_return_lse_matches_logsumexp_and_gradients():
    q, k, v = (t.requires_grad_(True) for t in bsnd())
    out, lse = ours(q, k, v, attention_kwargs={"return_lse": True})  # how diffusers passes it
    scores = torch.einsum("bqnd,bknd->bnqk", q, k) * q.shape[-1] ** -0.5
    ref_lse = torch.logsumexp(scores, -1).transpose(1, 2)
    ref = torch.einsum("bnqk,bknd->bqnd", scores.softmax(-1), v)
    assert lse.shape == (2, 24, 4) and lse.dtype == torch.float32
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    g, gl = torch.randn_like(out), torch.randn_like(lse)
    grads = torch.autograd.grad((out * g).sum() + (lse * gl).sum(), (q, k, v))
    refs = torch.autograd.grad((ref * g).sum() + (ref_lse * gl).sum(), (q, k, v))
    for a, b in zip(grads, refs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_context_manager_and_set_attention_backend():
    q, k, v = bsnd()
    before = da.stats()["tunings"] + da.stats()["hits"]
    with attention_backend(dd.BACKEND_NAME):
        a = dispatch_attention_fn(q, k, v)
    assert da.stats()["tunings"] + da.stats()["hits"] > before
    model, inputs = tiny_wan(layers=1)
    model.set_attention_backend("diffsynth_auto")
    assert all(getattr(m.processor, "_attention_backend", None) == "diffsynth_auto"
               for m in model.modules() if hasattr(m, "processor"))
    torch.testing.assert_close(a, native(q, k, v), atol=2e-5, rtol=1e-4)


MODELS = {"wan": tiny_wan, "flux": tiny_flux, "unet": tiny_unet}


def _run(model, inputs, backend, compiled=False, sdpa=False):
    with torch.no_grad():
        model.set_attention_backend(backend)
        fn = torch.compile(model, fullgraph=True) if compiled else model
        if sdpa:  # UNet-era processors call F.scaled_dot_product_attention directly: patch_sdpa routes them
            with da.patch_sdpa():
                return fn(**inputs)[0]
        return fn(**inputs)[0]


def count_math_calls(monkeypatch) -> list:
    """Every call the dispatcher makes to torch_math's bound runner is recorded."""
    from diffsynth_attention.backends import REGISTRY

    backend, calls = REGISTRY["torch_math"], []
    bind = backend.bind

    def counting_bind(*args, **kwargs):
        run = bind(*args, **kwargs)

        def counted(*a):
            calls.append(a[0].shape)
            return run(*a)
        return counted
    monkeypatch.setattr(backend, "bind", counting_bind)
    return calls


@pytest.mark.parametrize("name", list(MODELS))
def test_tiny_models_match_native_eager(name, monkeypatch):
    model, inputs = MODELS[name]()
    ref = _run(model, inputs, "native")
    calls = count_math_calls(monkeypatch)
    with da.use_backend("torch_math"):  # a different kernel than native's: proves the route
        out = _run(model, inputs, "diffsynth_auto", sdpa=name == "unet")
    assert calls  # every attention call went through the dispatcher
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", list(MODELS))
def test_tiny_models_match_native_compiled_fullgraph(name):
    from support.compile_helpers import Recorder, require

    require("added_enum_member")

    model, inputs = MODELS[name]()
    ref = _run(model, inputs, "native")
    recorder = Recorder()  # AOTAutograd's forward graphs: the dispatcher's operator decomposed into what it runs
    with torch.no_grad(), da.use_backend("torch_math"):
        model.set_attention_backend("diffsynth_auto")
        fn = torch.compile(model, fullgraph=True, backend=recorder)
        if name == "unet":
            with da.patch_sdpa():
                out = fn(**inputs)[0]
        else:
            out = fn(**inputs)[0]
    calls = [t for i in range(len(recorder.forward_graphs)) for t in recorder.targets(i)]
    # torch_math, the dispatcher's choice here, decomposes into matmuls: no SDPA left (native's graph has one)
    assert any("bmm" in c for c in calls) and not any("scaled_dot_product" in c for c in calls)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_registry_missing_names_the_version(monkeypatch):
    fake = types.ModuleType("diffusers.models.attention_dispatch")
    with pytest.raises(dd.DiffusersNotSupportedError, match=r"diffusers \S+ has no attention backend registry"):
        dd._register_into(fake)
    monkeypatch.setattr(dd, "_diffusers_version", lambda: "0.30.3")
    with pytest.raises(dd.DiffusersNotSupportedError, match="diffusers 0.30.3"):
        dd._register_into(fake)


ENV_WORKER = r"""
import sys, torch
import diffsynth_attention as da            # DIFFUSERS_ATTN_BACKEND=diffsynth_auto: registers before diffusers loads
assert "diffusers.models.attention_dispatch" not in sys.modules
from diffusers.models.attention_dispatch import _AttentionBackendRegistry, dispatch_attention_fn
name, _ = _AttentionBackendRegistry.get_active_backend()
q = torch.randn(1, 16, 2, 8)
out = dispatch_attention_fn(q, q, q)
print(name.value, da.stats()["tunings"] + da.stats()["hits"], tuple(out.shape))
"""


def test_environment_variable_set_before_diffusers_is_imported(children):
    res = children["test_environment_variable_set_before_diffusers_is_imported"].get()
    assert res.returncode == 0, res.stderr[-2000:]
    name, served, shape = res.stdout.split(maxsplit=2)
    assert name == "diffsynth_auto" and int(served) >= 1 and shape.strip() == "(1, 16, 2, 8)"


AFTER_WORKER = r"""
import sys, torch
from diffusers.models.attention_dispatch import AttentionBackendName, attention_backend, dispatch_attention_fn
from diffsynth_attention.integrations.diffusers import register
assert "diffsynth_auto" not in {m.value for m in AttentionBackendName}
register(activate=True)                      # diffusers already imported: registered and active at once
from diffusers.models.attention_dispatch import _AttentionBackendRegistry
import diffsynth_attention as da
out = dispatch_attention_fn(torch.randn(1, 16, 2, 8), torch.randn(1, 16, 2, 8), torch.randn(1, 16, 2, 8))
print(_AttentionBackendRegistry.get_active_backend()[0].value, da.stats()["tunings"] + da.stats()["hits"])
"""


def test_register_after_diffusers_is_imported(children):
    res = children["test_register_after_diffusers_is_imported"].get()
    assert res.returncode == 0, res.stderr[-2000:]
    name, served = res.stdout.split()
    assert name == "diffsynth_auto" and int(served) == 1


# Fresh processes with a cache folder each, started in the background when collection ends.
prespawn(__name__, by_name, {
    "test_environment_variable_set_before_diffusers_is_imported": python_c(ENV_WORKER, DIFFUSERS_ATTN_BACKEND="diffsynth_auto"),
    "test_register_after_diffusers_is_imported": python_c(AFTER_WORKER),
})


@pytest.fixture(scope="module")
def children():
    return results(__name__)
