"""FlashAttention-3 FP8's adapter on CPU: its quantisation (K smoothing, per-(batch, kv-head)
absmax scales, e4m3 casts, exact descales), its call into a fake FP8 interface, and its
declarations (a subset of FlashAttention-3's: it never adds to a key)."""
import itertools

import pytest
import torch

import diffsynth_attention as da
from diffsynth_attention.backends import DeviceInfo, REGISTRY
from diffsynth_attention.backends.fa3_fp8 import FP8_MAX, quantize_fp8
from diffsynth_attention.problem import Problem
from diffsynth_attention.tools import fuzz

from support.lowprec import NAME, Calls, install_fp8

H100 = DeviceInfo("cuda", "NVIDIA H100", (9, 0), 132)


def bsnd(t):
    return t.transpose(1, 2)


def test_quantize_is_per_kv_head_smooths_k_and_dequantises_closely():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 64, 4, 32, generator=g).bfloat16()  # b s n d, 4 query heads
    k = (torch.randn(2, 64, 2, 32, generator=g) + 7.0).bfloat16()  # 2 kv heads, a large mean
    v = torch.randn(2, 64, 2, 32, generator=g).bfloat16()
    q[1, :, 3] *= 30  # one query head of batch 1's second group is much larger
    before = [t.clone() for t in (q, k, v)]
    q8, k8, v8, qd, kd, vd = quantize_fp8(q, k, v)
    assert all(torch.equal(a, b) for a, b in zip(before, (q, k, v)))  # inputs untouched
    assert q8.dtype == k8.dtype == v8.dtype == torch.float8_e4m3fn
    assert qd.shape == kd.shape == vd.shape == (2, 2) and qd.dtype == torch.float32
    assert q8.float().abs().max() <= FP8_MAX and bool(torch.isfinite(q8.float()).all())
    assert qd[1, 1] > 10 * qd[1, 0]  # q's scale is the group's maximum, per (batch, kv head)
    deq = q8.float() * qd.repeat_interleave(2, dim=1)[:, None, :, None]
    assert (deq - q.float()).abs().max() / q.float().abs().max() < 0.07  # e4m3: 3 mantissa bits
    smoothed = k.float() - k.float().mean(dim=1, keepdim=True)
    kdeq = k8.float() * kd[:, None, :, None]
    assert (kdeq - smoothed).abs().mean() < 0.05 * smoothed.abs().mean()
    assert kdeq.mean(dim=1).abs().max() < 0.1  # the mean is gone


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_one_pass_scales_equal_the_absmax_of_the_smoothed_tensors(dtype):
    """The maxima are taken in steps (over d, then s; K's from its per-channel mean and range in
    one pass): the scales and the e4m3 tensors are bit for bit those of the absolute maximum of
    the smoothed tensors over (s, d), including channels whose extreme is below the mean."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 97, 6, 64, generator=g).to(dtype)
    k = (torch.randn(2, 97, 3, 64, generator=g) * 2 + 1.5).to(dtype)
    v = torch.randn(2, 97, 3, 64, generator=g).to(dtype)
    k[:, :, 1, 7] *= 40  # an outlier channel
    k[0, 5, 2, 9] = -300  # an extreme below the mean
    q8, k8, v8, qd, kd, vd = quantize_fp8(q, k, v)
    ks = k - k.mean(dim=1, keepdim=True)
    for got8, got_d, t, group in ((q8, qd, q, 2), (k8, kd, ks, 1), (v8, vd, v, 1)):
        amax = t.abs().amax(dim=(1, 3)).view(2, 3, group).amax(dim=2)
        factor = (440.0 / amax.float()).clamp(max=torch.finfo(dtype).max / 4).to(dtype)
        assert torch.equal(got_d, factor.float().reciprocal())
        want = (t * factor.repeat_interleave(group, dim=1)[:, None, :, None]).to(torch.float8_e4m3fn)
        assert torch.equal(got8.view(torch.uint8), want.view(torch.uint8))


def test_zero_heads_quantise_to_zero():
    z = torch.zeros(1, 8, 2, 16, dtype=torch.float16)
    q8, k8, v8, qd, kd, vd = quantize_fp8(z, z, z)
    assert not bool(q8.float().any()) and bool(torch.isfinite(qd).all())


def test_adapter_calls_the_fp8_interface_and_matches_the_reference(isolated, monkeypatch):
    install_fp8(monkeypatch)
    c = fuzz.make_case("randn", seq=128, heads=4, head_dim=64)
    k, v = c.k[:, :2], c.v[:, :2]  # grouped-query attention: 4 query heads, 2 kv heads
    with da.use_backend(NAME):
        out = da.attention_forward(bsnd(c.q).contiguous(), bsnd(k).contiguous(), bsnd(v).contiguous(),
                                   "b s n d", "b s n d", "b s n d", "b n s d")
    assert Calls.log[-1] == (torch.float8_e4m3fn, (1, 2), (1, 2), (1, 2))
    assert out.dtype == torch.bfloat16 and out.shape == (1, 4, 128, 64)
    ref = fuzz.reference(c.q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))
    assert fuzz.errors(out, ref)["rel_l1"] < 0.07


def _problems():
    for d, dtype, causal, sq, window, grad, hk in itertools.product(
            (64, 80, 96, 128, 256, 512), (torch.bfloat16, torch.float16, torch.float32), (False, True), (64, 96),
            (None, 8), (False, True), (4, 2)):
        yield Problem(1, 4, hk, sq, 64, d, d, dtype, "cuda", causal=causal, window=window, requires_grad=grad)


def test_fp8_serves_only_problems_flash_attention_3_serves():
    fp8, fa3 = REGISTRY[NAME], REGISTRY["flash_attention_3"]
    served = 0
    for p in _problems():
        if not fp8.not_supported_reasons(p, H100):
            served += 1
            assert not fa3.not_supported_reasons(p, H100), p
    assert served
    p = Problem(1, 4, 4, 64, 64, 128, 128, torch.bfloat16, "cuda", requires_grad=True)
    assert any("backward" in r for r in fp8.not_supported_reasons(p, H100))


def test_fp8_needs_a_head_dim_multiple_of_16():
    """FlashAttention-3 serves d 40 in 16 bits, its FP8 kernel raises on it (H100: "head_size
    should be a multiple of 16"): the FP8 backend declares it, so it is never timed there."""
    fp8, fa3 = REGISTRY[NAME], REGISTRY["flash_attention_3"]
    for d, fp8_serves in ((40, False), (72, False), (64, True), (80, True), (128, True)):
        p = Problem(1, 4, 4, 256, 256, d, d, torch.float16, "cuda")
        assert not fa3.not_supported_reasons(p, H100), d
        assert (not fp8.not_supported_reasons(p, H100)) is fp8_serves, d


def test_a_build_with_fp8_off_declares_it_unsupported(monkeypatch):
    backend = type(REGISTRY[NAME])()
    backend.declare_build({"FLASHATTENTION_DISABLE_FP8": True})
    p = Problem(1, 4, 4, 64, 64, 128, 128, torch.bfloat16, "cuda")
    assert any("FP8 off" in r for r in backend.not_supported_reasons(p, H100))
    assert backend.backward is False and backend.window is False


@pytest.mark.parametrize("name", [NAME, "sage_attention"])
def test_low_precision_backends_are_not_lse_backends(name):
    from diffsynth_attention.integrations.lse import lse_backends

    assert REGISTRY[name] not in lse_backends()
