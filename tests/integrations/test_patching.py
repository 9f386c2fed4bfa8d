"""Patching (CPU): ``patch_sdpa`` scoped and global and under a diffusers model, ``patch_diffsynth``,
and the same results as DiffSynth-Studio's own attention module."""
import sys
import types

import pytest
import torch

import diffsynth_attention as da

from support.diffsynth import load_diffsynth_attention
from support.helpers import qkv, rel


def test_patch_sdpa_scoped_and_global():
    from diffsynth_attention.integrations import patching

    q, k, v = qkv()
    before = da.stats()["tunings"]
    with da.patch_sdpa():
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        routed = da.stats()
        torch.manual_seed(0)
        dropped = torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
        assert da.stats() == routed  # dropout is PyTorch's own: not routed, not counted
        torch.manual_seed(0)
        assert torch.equal(dropped, patching._ORIGINAL_SDPA(q, k, v, dropout_p=0.5))
    assert da.stats()["tunings"] == before + 1  # routed through the dispatcher
    assert torch.nn.functional.scaled_dot_product_attention is patching._ORIGINAL_SDPA  # the block restored it
    ref = torch.ops.aten.scaled_dot_product_attention(q, k, v)
    assert rel(out, ref) < 1e-5
    handle = da.patch_sdpa()
    try:
        torch.nn.functional.scaled_dot_product_attention(q, k, v)
        assert da.stats()["hits"] >= 1
    finally:
        handle.undo()
    assert torch.nn.functional.scaled_dot_product_attention is patching._ORIGINAL_SDPA and not handle.active
    hits = da.stats()["hits"]
    torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert da.stats()["hits"] == hits  # undone: not routed any more


def test_diffusers_transformer_same_output_with_patch_sdpa():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True, rope_max_seq_len=64,
    ).eval()
    x = torch.randn(1, 4, 2, 8, 8)
    t = torch.tensor([10])
    text = torch.randn(1, 7, 32)
    with torch.no_grad():
        plain = model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
        before = da.stats()["tunings"]
        with da.patch_sdpa():
            patched = model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
    assert da.stats()["tunings"] > before  # its attention went through the dispatcher
    assert rel(patched, plain) < 1e-5


PATTERNS = [("b n s d", "b n s d", None), ("b s n d", "b s n d", None), ("b s (n d)", "b s (n d)", {"n": 4}), ("b s (n d)", "b n s d", {"n": 4})]


@pytest.mark.parametrize("in_p,out_p,dims", PATTERNS)
def test_same_results_as_diffsynth_attention_module(in_p, out_p, dims):
    ds = load_diffsynth_attention()
    from einops import rearrange

    q, k, v = qkv(sq=24, skv=24)
    qs, ks, vs = (rearrange(t, f"b n s d -> {in_p}").contiguous() for t in (q, k, v))
    for kwargs in ({}, {"is_causal": True}, {"scale": 0.2}, {"window_size": 3}):
        theirs = ds.torch_sdpa(qs, ks, vs, in_p, in_p, in_p, out_p, dims, **{k_: v_ for k_, v_ in kwargs.items() if k_ != "window_size"}) \
            if "window_size" not in kwargs else ds.torch_sdpa_sliding_window(qs, ks, vs, kwargs["window_size"], in_p, in_p, in_p, out_p, dims)
        ours = da.attention_forward(qs, ks, vs, in_p, in_p, in_p, out_p, dims, **kwargs)
        assert rel(ours, theirs) < 1e-5, kwargs


def test_patch_diffsynth_routes_and_undoes():
    ds = load_diffsynth_attention()
    original = ds.attention_forward
    handle = da.patch_diffsynth(wan=False)
    try:
        assert sys.modules["diffsynth.core.attention"].attention_forward is not original
        q, k, v = qkv()
        before = da.stats()["tunings"]
        out = sys.modules["diffsynth.core.attention"].attention_forward(q, k, v)
        assert da.stats()["tunings"] == before + 1
        assert rel(out, ds.torch_sdpa(q, k, v)) < 1e-5
    finally:
        handle.undo()
    assert sys.modules["diffsynth.core.attention"].attention_forward is original


def test_undo_restores_the_modules_imported_after_the_patch(monkeypatch):
    """DiffSynth-Studio imports a model's module when a pipeline loads it: one imported after
    patch_diffsynth() took the routed attention_forward (`from ..core.attention import
    attention_forward`), and undo() restored only the modules it had swapped, so that one went on
    routing through this library."""
    ds = load_diffsynth_attention()
    original = ds.attention_forward
    handle = da.patch_diffsynth(wan=False)
    late = types.ModuleType("diffsynth.models.late_dit")
    late.attention_forward = sys.modules["diffsynth.core.attention"].attention_forward
    monkeypatch.setitem(sys.modules, "diffsynth.models.late_dit", late)
    assert late.attention_forward is not original
    handle.undo()
    assert late.attention_forward is original and sys.modules["diffsynth.core.attention"].attention_forward is original


def test_patch_diffsynth_routes_the_wan_dit_helper_everywhere(monkeypatch):
    load_diffsynth_attention()
    calls = []

    def flash_attention(q, k, v, num_heads, compatibility_mode=False):  # the Wan DiT helper's signature
        calls.append(num_heads)
        raise AssertionError("the original helper should not be called once patched")

    wan = types.ModuleType("diffsynth.models.wan_video_dit")
    wan.flash_attention = flash_attention
    user = types.ModuleType("diffsynth.models.wan_video_mot")
    user.flash_attention = flash_attention  # `from .wan_video_dit import flash_attention`
    monkeypatch.setitem(sys.modules, "diffsynth.models.wan_video_dit", wan)
    monkeypatch.setitem(sys.modules, "diffsynth.models.wan_video_mot", user)
    handle = da.patch_diffsynth()
    try:
        assert wan.flash_attention is not flash_attention and user.flash_attention is wan.flash_attention
        q, k, v = qkv(hq=4, d=16)
        from einops import rearrange

        packed = [rearrange(t, "b n s d -> b s (n d)") for t in (q, k, v)]
        out = user.flash_attention(*packed, num_heads=4)
        ref = rearrange(torch.nn.functional.scaled_dot_product_attention(q, k, v), "b n s d -> b s (n d)")
        assert out.shape == ref.shape and rel(out, ref) < 1e-5
        assert calls == []
    finally:
        handle.undo()
    assert wan.flash_attention is flash_attention and user.flash_attention is flash_attention


def _fail_diffsynth_import(monkeypatch, error, requires, version="0.15.2"):
    """DiffSynth's import fails with ``error`` raised from torchvision; torchvision's metadata
    pins ``requires``."""
    import importlib
    import importlib.metadata

    real_import, real_version, real_requires = importlib.import_module, importlib.metadata.version, importlib.metadata.requires

    def import_module(name, *a, **kw):
        if name.startswith("diffsynth"):
            raise error
        return real_import(name, *a, **kw)

    monkeypatch.setattr(importlib, "import_module", import_module)
    monkeypatch.setattr(importlib.metadata, "version", lambda d: version if d == "torchvision" else real_version(d))
    monkeypatch.setattr(importlib.metadata, "requires", lambda d: requires if d == "torchvision" else real_requires(d))


@pytest.mark.parametrize("requires, says", [
    (["torch==2.0.1", "numpy"], "torchvision 0.15.2 was built for torch 2.0.1, but torch"),
    (["torch", "numpy"], "torchvision 0.15.2 does not match torch"),
])
def test_patch_diffsynth_with_a_torchvision_of_another_torch_says_the_builds_do_not_match(monkeypatch, requires, says):
    _fail_diffsynth_import(monkeypatch, RuntimeError("operator torchvision::nms does not exist"), requires)
    with pytest.raises(ImportError) as info:
        da.patch_diffsynth()
    assert says in str(info.value) and "the builds do not match" in str(info.value)


def test_a_torchvision_of_this_torch_is_not_called_a_mismatch(monkeypatch):
    _fail_diffsynth_import(monkeypatch, RuntimeError("torchvision: something else broke"),
                           [f"torch=={torch.__version__.split('+')[0]}"])
    with pytest.raises(ImportError) as info:
        da.patch_diffsynth()
    assert "do not match" not in str(info.value) and "something else broke" in str(info.value)


def _sdpa_variants():
    """Calls plain SDPA takes whose arguments ``attention_forward`` refuses or reads otherwise:
    batch and value heads broadcast, a bool or non-finite scale, an empty sequence."""
    q, k, v = qkv(b=2, hq=4, sq=16, d=8)
    return {
        "kv-batch-1": ((q, k[:1], v[:1]), {}),
        "v-batch-1": ((q, k, v[:1]), {}),
        "q-batch-1": ((q[:1], k, v), {}),
        "v-heads-1": ((q, k, v[:, :1]), {}),
        "scale-true": ((q, k, v), {"scale": True}),
        "scale-nan": ((q, k, v), {"scale": float("nan")}),
        "scale-inf": ((q, k, v), {"scale": float("inf")}),
        "empty-q": ((q[:, :, :0], k, v), {}),
    }


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled-fullgraph"])
@pytest.mark.parametrize("case", list(_sdpa_variants()))
def test_patch_sdpa_accepts_what_plain_sdpa_accepts_with_its_meaning(case, compiled):
    """Before: the patch routed every 4-d call, so SDPA's batch broadcast (k and v of batch 1),
    value heads broadcast, ``scale=True`` (1.0), a NaN/infinite scale and an empty query raised
    ``attention_forward``'s errors (eager; ``InternalTorchDynamoError``/``Unsupported`` compiled)
    where plain SDPA, eager and compiled, returns a result. They now go to PyTorch's own SDPA."""
    from diffsynth_attention.integrations import patching

    args, kwargs = _sdpa_variants()[case]
    want = patching._ORIGINAL_SDPA(*args, **kwargs)
    torch._dynamo.reset()
    def fn(*a):
        return torch.nn.functional.scaled_dot_product_attention(*a, **kwargs)

    with da.patch_sdpa():
        got = (torch.compile(fn, fullgraph=True, backend="aot_eager") if compiled else fn)(*args)
    torch._dynamo.reset()
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-6, equal_nan=True)
