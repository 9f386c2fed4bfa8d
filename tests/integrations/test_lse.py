"""Calls that need the log-sum-exp (ring attention): their own key, only the
backends with ``forward_lse`` as candidates, the float32 fallback, each backend's LSE."""
import logging

import pytest
import torch

import diffsynth_attention as da
from diffsynth_attention.backends import REGISTRY
from diffsynth_attention.backends.flash_attention import FlashAttention2, FlashAttention4
from diffsynth_attention.dispatch import default_dispatcher
from diffsynth_attention.integrations import lse as L


def bsnd(s=33, n=4, d=16, kv_heads=None, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, s, n, d, generator=g).to(device, dtype)
    k = torch.randn(2, s + 5, kv_heads or n, d, generator=g).to(device, dtype)
    v = torch.randn(2, s + 5, kv_heads or n, d, generator=g).to(device, dtype)
    return q, k, v


def reference(q, k, v, causal=False):
    qt, kt, vt = (t.transpose(1, 2).double() for t in (q, k, v))
    kt = kt.repeat_interleave(qt.shape[1] // kt.shape[1], 1)
    vt = vt.repeat_interleave(qt.shape[1] // vt.shape[1], 1)
    s = qt @ kt.transpose(-1, -2) * q.shape[-1] ** -0.5
    if causal:
        s = s.masked_fill(torch.ones_like(s, dtype=torch.bool).triu(1), float("-inf"))
    return (s.softmax(-1) @ vt).transpose(1, 2), torch.logsumexp(s, -1).transpose(1, 2)


def test_only_backends_returning_the_lse_are_candidates_and_the_key_says_so():
    q, k, v = bsnd()
    out, lse = L.attention_with_lse(q, k, v)
    ref, ref_lse = reference(q, k, v)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)
    store = default_dispatcher().store
    (decision,) = store.entries().values()
    assert decision.key["problem"]["layout"].endswith(" + lse")
    assert decision.backend == "torch_flash"  # the only CPU backend returning the LSE
    for name in ("torch", "torch_math"):
        assert decision.candidates[name].status == "unsupported"
        assert "log-sum-exp" in decision.candidates[name].reason
    ordinary = da.explain(q, k, v, *("b s n d",) * 4)
    assert ordinary.key_id != decision.key_id and not ordinary.key["problem"]["layout"].endswith("+ lse")
    tunings = da.stats()["tunings"]
    L.attention_with_lse(q, k, v)  # a hit: planned already, no tuning
    assert da.stats()["tunings"] == tunings


def test_lse_backends_are_the_issue_list():
    names = {b.name for b in L.lse_backends()}
    # customized_fa_kernel: DiffSynth's FlashAttention build from a Hub repository (a FlashAttention-2 interface)
    assert names == {"customized_fa_kernel", "flash_attention_2", "flash_attention_3", "flash_attention_4", "torch_cudnn",
                     "torch_efficient", "torch_flash"}


def test_no_backend_can_serve_uses_exact_float32(caplog):
    q, k, v = bsnd(kv_heads=2)  # grouped-query: torch_flash's declared capabilities exclude it
    out, lse = L.attention_with_lse(q, k, v, is_causal=True)
    ref, ref_lse = reference(q, k, v, causal=True)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)
    assert L.selector().choose(q, k, v, None, True) == L.MATH


def test_a_forced_backend_that_cannot_return_the_lse_warns_and_auto_serves(caplog):
    q, k, v = bsnd(seed=3)
    with caplog.at_level(logging.WARNING, logger="diffsynth_attention"), da.use_backend("torch_math"):
        out, _ = L.attention_with_lse(q, k, v)
    assert "cannot return the log-sum-exp" in caplog.text
    torch.testing.assert_close(out.double(), reference(q, k, v)[0], atol=1e-5, rtol=1e-5)


def test_math_backward_matches_autograd_with_causal_and_gqa():
    q, k, v = (t.requires_grad_(True) for t in bsnd(s=20, kv_heads=2, dtype=torch.float64))
    ref, ref_lse = reference(q, k, v, causal=True)
    g, gl = torch.randn_like(ref), torch.randn_like(ref_lse)
    want = torch.autograd.grad((ref * g).sum() + (ref_lse * gl).sum(), (q, k, v))
    got = L.lse_backward(g, q, k, v, ref.detach(), ref_lse.detach(), None, True, gl)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)  # float64 in, float64 math


def test_math_paths_work_in_blocks(monkeypatch):
    monkeypatch.setattr(L, "_BLOCK_BYTES", 4 * 2 * 4 * 38 * 7)  # 7 queries per block
    q, k, v = bsnd(dtype=torch.float64)
    out, lse = L.math_lse(*(t.transpose(1, 2) for t in (q, k, v)), None, False)
    ref, ref_lse = reference(q, k, v)
    torch.testing.assert_close(out.transpose(1, 2), ref)
    torch.testing.assert_close(lse.transpose(1, 2).double(), ref_lse, atol=1e-6, rtol=1e-6)  # the LSE is float32


def _fake_flash(lse_layout, flag):
    def func(q, k, v, softmax_scale=None, causal=False, **kwargs):  # b s n d, as FlashAttention takes them
        ref, ref_lse = reference(q, k, v, causal)
        lse = ref_lse.float() if lse_layout == "bsn" else ref_lse.transpose(1, 2).float()
        return (ref.to(q.dtype), lse) if kwargs.get(flag) else ref.to(q.dtype)
    func.__signature__ = __import__("inspect").Signature(
        [__import__("inspect").Parameter(n, __import__("inspect").Parameter.POSITIONAL_OR_KEYWORD)
         for n in ("q", "k", "v", "softmax_scale", "causal", flag)])
    return func


@pytest.mark.parametrize("cls,flag,layout", [(FlashAttention2, "return_attn_probs", "bns"),
                                             (FlashAttention4, "return_lse", "bsn")])
def test_flash_forward_lse_asks_for_the_lse_and_normalises_its_layout(cls, flag, layout):
    backend = cls()
    backend._func = _fake_flash(layout, flag)
    q, k, v = bsnd()
    out, lse = backend.forward_lse(*(t.transpose(1, 2) for t in (q, k, v)), None, False)
    ref, ref_lse = reference(q, k, v)
    assert out.shape == (2, 4, 33, 16) and lse.shape == (2, 4, 33) and lse.dtype == torch.float32
    torch.testing.assert_close(out.transpose(1, 2).double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.transpose(1, 2).double(), ref_lse, atol=1e-5, rtol=1e-5)


def test_flash_forward_lse_without_an_lse_raises():
    backend = FlashAttention2()
    backend._func = lambda q, k, v, softmax_scale=None, causal=False: q
    with pytest.raises(RuntimeError, match="no log-sum-exp"):
        backend.forward_lse(*(t.transpose(1, 2) for t in bsnd()), None, False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["torch_flash", "torch_cudnn", "torch_efficient", "flash_attention_2",
                                  "flash_attention_3", "flash_attention_4"])
def test_every_lse_backend_on_the_gpu(name):
    from diffsynth_attention.backends import device_info
    from diffsynth_attention.problem import prepare

    backend = REGISTRY[name]
    q, k, v = bsnd(s=256, n=4, d=64, dtype=torch.bfloat16, device="cuda")
    k, v = k[:, :256], v[:, :256]
    call = prepare(q, k, v, "b s n d", "b s n d", "b s n d", "b s n d", None, None, None, False, None, False)
    why = backend.unavailable_reason() or "; ".join(backend.not_supported_reasons(call.problem, device_info(q.device)))
    if why:
        pytest.skip(f"{name}: {why}")
    out, lse = backend.forward_lse(*(t.transpose(1, 2) for t in (q, k, v)), None, False)
    ref, ref_lse = reference(q, k, v)
    assert lse.shape == (2, 4, 256) and lse.dtype == torch.float32
    torch.testing.assert_close(lse.transpose(1, 2).double(), ref_lse, atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(out.transpose(1, 2).double(), ref, atol=2e-2, rtol=2e-2)
