"""The kernel-package adapters (CPU) against fakes with the real signatures."""
import sys

import pytest
import torch
from einops import rearrange

import diffsynth_attention as da
from diffsynth_attention.backends import REGISTRY, DeviceInfo, flash_attention, sage
from diffsynth_attention.backends.flash_attention import FlashAttention2, FlashAttention3, FlashAttention4
from diffsynth_attention.backends.sage import SageAttention
from diffsynth_attention.backends.xformers import XFormers
from diffsynth_attention.problem import prepare

from support import fake_kernels as fk
from support.helpers import broken_package, full_reference, qkv, rel

H100 = DeviceInfo("cuda", "NVIDIA H100", (9, 0), 132)
B200 = DeviceInfo("cuda", "NVIDIA B200", (10, 0), 148)
A100 = DeviceInfo("cuda", "NVIDIA A100", (8, 0), 108)
T4 = DeviceInfo("cuda", "Tesla T4", (7, 5), 40)


def on_cpu(cls):
    """The adapter, allowed to run on CPU float32 tensors (the fakes compute with torch)."""
    return type(cls.__name__, (cls,), {"devices": frozenset({"cpu", "cuda"}), "dtypes": cls.dtypes | {torch.float32}})()


def install(monkeypatch, cls, name, modules):
    """Put fake ``modules`` ({import name: module}) in sys.modules; register ``cls`` on CPU as ``name``."""
    for module_name, module in modules.items():
        monkeypatch.setitem(sys.modules, module_name, module)
    backend = on_cpu(cls)
    monkeypatch.setitem(REGISTRY, name, backend)
    return backend


def problem(q, k, v, **kw):
    call = prepare(q, k, v, "b n s d", "b n s d", "b n s d", "b n s d", None, kw.get("attn_mask"), None,
                   kw.get("is_causal", False), kw.get("window_size"), False)
    return call.problem


@pytest.fixture(autouse=True)
def clean_calls():
    fk.Recorder.calls.clear()


@pytest.fixture
def fa2(monkeypatch):
    monkeypatch.setattr(flash_attention, "package_version", lambda dist: "2.6.3" if dist == "flash-attn" else None)
    return install(monkeypatch, FlashAttention2, "flash_attention_2", {"flash_attn": fk.make_fa2()})


def test_fa2_gets_the_callers_bsnd_tensors_without_a_copy(fa2):
    q, k, v = qkv(hq=4, hk=2, d=16)
    qs, ks, vs = (rearrange(t, "b n s d -> b s n d").contiguous() for t in (q, k, v))
    with da.use_backend("flash_attention_2"):
        out = da.attention_forward(qs, ks, vs, "b s n d", "b s n d", "b s n d", "b s n d")
    name, qa, ka, va, kw = fk.Recorder.calls[-1]
    assert name == "fa2" and qa.data_ptr() == qs.data_ptr() and ka.data_ptr() == ks.data_ptr()
    assert qa.shape == qs.shape and kw["window_size"] == (-1, -1)
    assert rel(rearrange(out, "b s n d -> b n s d"), full_reference(q, k, v)) < 1e-5


def test_fa2_window_and_causal_match_pytorch_semantics_where_declared(fa2):
    q, k, v = qkv(sq=24, d=16)
    with da.use_backend("flash_attention_2"):
        out = da.attention_forward(q, k, v, window_size=3)
        assert fk.Recorder.calls[-1][4]["window_size"] == (3, 3)
        assert rel(out, full_reference(q, k, v, window=3)) < 1e-5
        out = da.attention_forward(q, k, v, is_causal=True)
        assert rel(out, full_reference(q, k, v, causal=True)) < 1e-5
    reasons = fa2.not_supported_reasons(problem(*qkv(sq=8, skv=12), is_causal=True), H100)
    assert any("top-left" in r for r in reasons)  # bottom-right alignment would differ: declared unsupported
    reasons = fa2.not_supported_reasons(problem(*qkv(), attn_mask=torch.ones(32, 32, dtype=torch.bool)), H100)
    assert any("attn_mask" in r for r in reasons)
    assert fa2.not_supported_reasons(problem(*qkv(hq=8, hk=2)), H100) == []
    assert any("too old" in r for r in fa2.not_supported_reasons(problem(*qkv()), T4))
    assert any("dtype float64 not supported" in r for r in fa2.not_supported_reasons(problem(*qkv(dtype=torch.float64)), H100))


def test_fa2_before_2_3_has_no_window(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", fk.make_fa2("2.2.0"))
    monkeypatch.setattr(flash_attention, "package_version", lambda dist: "2.2.0" if dist == "flash-attn" else None)
    backend = on_cpu(FlashAttention2)
    assert backend.unavailable_reason() is None
    reasons = backend.not_supported_reasons(problem(*qkv(), window_size=2), H100)
    assert any("2.3" in r for r in reasons)


def test_fa2_undefined_symbol_after_torch_upgrade_is_a_reason(monkeypatch, tmp_path):
    broken_package(tmp_path, monkeypatch, "flash_attn", "raise ImportError('flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda9SetDeviceEi')")
    monkeypatch.setattr(flash_attention, "package_version", lambda dist: "2.7.4")
    reason = FlashAttention2().unavailable_reason()
    assert reason.startswith("installed but unusable") and "undefined symbol" in reason


def test_fa2_is_not_mistaken_for_fa4s_namespace(monkeypatch):
    pkg, cute = fk.make_fa4()
    monkeypatch.setitem(sys.modules, "flash_attn", pkg)
    monkeypatch.setattr(flash_attention, "package_version", lambda dist: "4.0.0b36" if dist == "flash-attn-4" else None)
    reason = FlashAttention2().unavailable_reason()
    assert "flash-attn is not installed" in reason and "flash-attn-4" in reason


@pytest.mark.parametrize("returns_tuple", [True, False])
def test_fa3_tuple_or_tensor(monkeypatch, returns_tuple):
    backend = install(monkeypatch, FlashAttention3, "flash_attention_3", {"flash_attn_interface": fk.make_fa3(returns_tuple)})
    q, k, v = qkv(d=16)
    with da.use_backend("flash_attention_3"):
        out = da.attention_forward(q, k, v, scale=0.3)
    assert fk.Recorder.calls[-1][4]["softmax_scale"] == 0.3
    assert rel(out, full_reference(q, k, v, scale=0.3)) < 1e-5
    assert any("9.x" in r for r in backend.not_supported_reasons(problem(*qkv(d=16)), A100))
    assert backend.not_supported_reasons(problem(*qkv(d=16)), H100) == []


def test_fa4_returns_tuple_and_head_dim_rules_follow_the_architecture(monkeypatch):
    pkg, cute = fk.make_fa4()
    backend = install(monkeypatch, FlashAttention4, "flash_attention_4", {"flash_attn": pkg, "flash_attn.cute": cute})
    q, k, v = qkv(d=16)
    with da.use_backend("flash_attention_4"):
        out = da.attention_forward(q, k, v, window_size=2)
    assert fk.Recorder.calls[-1][4]["window_size"] == (2, 2)
    assert rel(out, full_reference(q, k, v, window=2)) < 1e-5
    with da.use_backend("flash_attention_4"):
        da.attention_forward(q, k, v)
    assert fk.Recorder.calls[-1][4]["window_size"] == (None, None)
    p192 = problem(*qkv(d=192, sq=4))
    assert backend.not_supported_reasons(p192, H100) == []
    assert any("compute capability 10.x" in r for r in backend.not_supported_reasons(p192, B200))
    assert any("multiple of 8" in r for r in backend.not_supported_reasons(problem(*qkv(d=20, sq=4)), H100))


def test_sage_1x_never_modifies_the_callers_key_and_declares_its_limits(monkeypatch):
    monkeypatch.setattr(sage, "package_version", lambda dist: "1.0.6")
    backend = install(monkeypatch, SageAttention, "sage_attention", {"sageattention": fk.make_sage(smooth_in_place=True)})
    q, k, v = qkv(d=64)
    k = k + 2.0
    before = k.clone()
    with da.use_backend("sage_attention"):
        out = da.attention_forward(q, k, v)
    assert torch.equal(k, before)
    assert rel(out, full_reference(q, k, v)) < 1e-5  # smoothing k does not change softmax(qk)
    assert any("head dim 80" in r for r in backend.not_supported_reasons(problem(*qkv(d=80, sq=4)), H100))
    assert any("attn_mask" in r for r in backend.not_supported_reasons(problem(*qkv(d=64, sq=4), attn_mask=torch.ones(4, 4, dtype=torch.bool)), H100))
    assert any("backward" in r for r in backend.not_supported_reasons(
        prepare(*[t.requires_grad_(True) for t in qkv(d=64, sq=4)], "b n s d", "b n s d", "b n s d", "b n s d", None, None, None, False, None, True).problem, H100))
    assert backend.exact is False


def test_sage_2x_limits(monkeypatch):
    monkeypatch.setitem(sys.modules, "sageattention", fk.make_sage(smooth_in_place=False))
    monkeypatch.setattr(sage, "package_version", lambda dist: "2.2.0")
    backend = on_cpu(SageAttention)
    assert backend.unavailable_reason() is None
    assert backend.not_supported_reasons(problem(*qkv(d=80, sq=4, dtype=torch.bfloat16)), H100) == []
    assert any("dtype float32" in r for r in backend.not_supported_reasons(problem(*qkv(d=64, sq=4)), H100))
    assert any("head dim 256" in r for r in backend.not_supported_reasons(problem(*qkv(d=256, sq=4, dtype=torch.bfloat16)), H100))
    assert any("compute capability" in r for r in backend.not_supported_reasons(problem(*qkv(d=64, sq=4, dtype=torch.bfloat16)), B200))


def test_xformers_bias_padding_causal_and_masks(monkeypatch):
    pkg, ops = fk.make_xformers()
    backend = install(monkeypatch, XFormers, "xformers", {"xformers": pkg, "xformers.ops": ops})
    q, k, v = qkv(sq=20, skv=13, d=16)
    mask = torch.rand(20, 13, generator=torch.Generator().manual_seed(3)) > 0.4
    with da.use_backend("xformers"):
        out = da.attention_forward(q, k, v, attn_mask=mask)
        assert rel(out, full_reference(q, k, v, mask=mask)) < 1e-5
        bias = fk.Recorder.calls[-1][4]["attn_bias"]
        assert bias.shape == (2, 4, 20, 13) and bias.stride(-2) == 16
        add = torch.randn(1, 4, 20, 13)
        out = da.attention_forward(q, k, v, attn_mask=add)
        assert rel(out, full_reference(q, k, v, mask=add)) < 1e-5
        out = da.attention_forward(q, k, v, is_causal=True)
        assert isinstance(fk.Recorder.calls[-1][4]["attn_bias"], fk.LowerTriangularMask)
        assert rel(out, full_reference(q, k, v, causal=True)) < 1e-5  # top-left, like PyTorch
    reasons = backend.not_supported_reasons(problem(q, k, v, is_causal=True, attn_mask=mask), H100)
    assert any("together" in r for r in reasons)


def test_xformers_without_its_cpp_operators_is_unavailable(monkeypatch):
    pkg, ops = fk.make_xformers(cpp_ok=False)
    monkeypatch.setitem(sys.modules, "xformers", pkg)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    reason = XFormers().unavailable_reason()
    assert "C++ operators did not load" in reason and "2.10.0+cu128" in reason


def test_auto_tunes_over_the_fake_kernels_too(fa2, monkeypatch):
    q, k, v = qkv(d=16)
    info = da.explain(q, k, v)
    assert info.candidates["flash_attention_2"]["status"] in ("chosen", "accepted", "slower")
    assert info.candidates["flash_attention_2"]["error"] < 1e-5
    assert "flash-attn" in info.key["versions"]


# -- FlashAttention-3 builds declare what they were built with ----------------------
def test_fa3_declares_what_its_build_supports(monkeypatch):
    backend = install(monkeypatch, FlashAttention3, "flash_attention_3",
                      {"flash_attn_interface": fk.make_fa3(), "flash_attn_config": fk.make_fa3_config()})
    assert backend.unavailable_reason() is None and backend.backward is False
    bf16 = dict(dtype=torch.bfloat16)
    assert backend.not_supported_reasons(problem(*qkv(d=128, **bf16)), H100) == []
    assert backend.not_supported_reasons(problem(*qkv(d=16, dtype=torch.float16)), H100) == []
    for d in (72, 96):  # both run on the head-dim-96 kernel, which tokenspeed-fa3 leaves out
        assert any("HDIM96" in r for r in backend.not_supported_reasons(problem(*qkv(d=d, **bf16)), H100)), d
    assert any("9.x" in r for r in backend.not_supported_reasons(problem(*qkv(d=64, **bf16)), A100))
    q, k, v = qkv(d=64, **bf16)
    call = prepare(q, k, v, "b n s d", "b n s d", "b n s d", "b n s d", None, None, None, False, None, True)
    assert any("no backward" in r for r in backend.not_supported_reasons(call.problem, H100))
    assert "forward only" in backend.build_summary() and "96" not in backend.build_summary()

    full = FlashAttention3()
    full.declare_build({**fk.TOKENSPEED_FA3_FLAGS, "FLASHATTENTION_DISABLE_BACKWARD": False,
                        "FLASHATTENTION_DISABLE_HDIM96": False, "FLASHATTENTION_DISABLE_SM8x": False,
                        "FLASHATTENTION_DISABLE_FP16": True})
    assert full.backward and full.head_dim_kernels == (64, 96, 128, 192, 256) and full.capabilities == {8, 9}
    assert any("dtype float16" in r for r in full.not_supported_reasons(problem(*qkv(d=64, dtype=torch.float16)), H100))


def test_a_key_that_needs_gradients_never_chooses_a_forward_only_fa3(monkeypatch):
    install(monkeypatch, FlashAttention3, "flash_attention_3",
            {"flash_attn_interface": fk.make_fa3(), "flash_attn_config": fk.make_fa3_config()})
    q, k, v = qkv(d=16)
    info = da.explain(q.requires_grad_(), k, v)
    assert info.key["problem"]["requires_grad"] is True and info.backend != "flash_attention_3"
    cand = info.candidates["flash_attention_3"]
    assert cand["status"] == "unsupported" and "no backward" in cand["reason"]
    with torch.no_grad():
        info = da.explain(q, k, v)  # the same problem without gradients may use it
    assert info.candidates["flash_attention_3"]["status"] != "unsupported"


def test_kernel_extras_name_installable_distributions():
    """Each backend's extra exists and installs its package; pre-releases are pinned exactly
    (pip takes a pre-release only when pinned), and flash-attn-3 goes through tokenspeed-fa3."""
    import re
    import tomllib
    from pathlib import Path

    extras = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["flash-attn-4"] == ["flash-attn-4==4.0.0b36"]
    assert extras["flash-attn-3"][0].startswith("tokenspeed-fa3")
    for backend in REGISTRY.values():
        if backend.extra is not None:
            names = [re.split(r"[<>=!~ \[]", r)[0] for r in extras[backend.extra]]
            assert backend.package in names, backend.name


def test_plans_call_a_flash_package_in_its_own_layout_without_going_through_b_n_s_d(fa2, monkeypatch):
    """A b s n d caller's plan hands the kernel the caller's own tensors and returns the kernel's
    output as it is; DiffSynth's b s (n d) gets views; a subclass that replaces forward keeps it."""
    from diffsynth_attention.dispatch.runners import make_runner

    assert fa2.unavailable_reason() is None  # loads the fake package
    q, k, v = qkv(hq=4, d=16)
    qs, ks, vs = (rearrange(t, "b n s d -> b s n d").contiguous() for t in (q, k, v))
    bsnd = ("b s n d",) * 4
    call = prepare(qs, ks, vs, *bsnd, None, None, None, False, None, False)
    run = make_runner(fa2, call, False)
    out = run(qs, ks, vs, None, None)
    name, qa, ka, va, _ = fk.Recorder.calls[-1]
    assert qa is qs and ka is ks and va is vs  # no view, no frame in between
    assert rel(rearrange(out, "b s n d -> b n s d"), full_reference(q, k, v)) < 1e-5
    packed = tuple(t.reshape(t.shape[0], t.shape[1], -1) for t in (qs, ks, vs))
    pk = ("b s (n d)",) * 4
    call = prepare(*packed, *pk, {"n": 4}, None, None, False, None, False)
    out = make_runner(fa2, call, False)(*packed, None, None)
    name, qa, ka, va, _ = fk.Recorder.calls[-1]
    assert qa.data_ptr() == packed[0].data_ptr() and qa.shape == qs.shape
    assert out.shape == packed[0].shape and rel(rearrange(out, "b s (n d) -> b n s d", n=4), full_reference(q, k, v)) < 1e-5

    calls = []

    class Own(type(fa2)):
        def forward(self, *args):
            calls.append(args)
            return super().forward(*args)
    assert fa2.binds_native
    monkeypatch.setattr(fa2, "__class__", Own)  # the loaded instance, with forward replaced
    assert not fa2.binds_native
    call = prepare(qs, ks, vs, *bsnd, None, None, None, False, None, False)
    make_runner(fa2, call, False)(qs, ks, vs, None, None)
    assert len(calls) == 1
