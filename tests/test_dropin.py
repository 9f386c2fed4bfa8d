"""Issue 23, a drop-in for DiffSynth and PyTorch: masks of another float dtype, DiffSynth's
values of DIFFSYNTH_ATTENTION_IMPLEMENTATION, current_implementation() under a fallback."""

import logging

import pytest
import torch
import torch.nn.functional as F

import diffsynth_attention as da
from diffsynth_attention.backends import REGISTRY

from helpers import qkv, rel
from test_integration import _load_diffsynth_attention


def _bf16_with_fp32_mask(pattern="b n s d"):
    q, k, v = qkv(b=1, hq=2, sq=8, d=16, dtype=torch.bfloat16)
    mask = torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(3))
    if pattern != "b n s d":
        q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    return q, k, v, mask


@pytest.mark.parametrize("pattern", ["b n s d", "b s n d"])
def test_float32_mask_with_bf16_query_matches_diffsynth_and_sdpa(pattern):
    ds = _load_diffsynth_attention()
    q, k, v, mask = _bf16_with_fp32_mask(pattern)
    copies = [t.clone() for t in (q, k, v, mask)]
    theirs = ds.attention_forward(q, k, v, pattern, pattern, pattern, pattern, attn_mask=mask)
    tuned = da.attention_forward(q, k, v, pattern, pattern, pattern, pattern, attn_mask=mask)
    assert tuned.dtype == torch.bfloat16 and rel(tuned, theirs) < 1e-2  # the tuned backend: within tolerance
    with da.use_backend("torch"):  # DiffSynth's own path, SDPA: bit for bit, first call and hit
        for _ in range(2):
            ours = da.attention_forward(q, k, v, pattern, pattern, pattern, pattern, attn_mask=mask)
            assert ours.dtype == torch.bfloat16 and torch.equal(ours, theirs)
    for before, after in zip(copies, (q, k, v, mask)):
        assert torch.equal(before, after) and before.dtype == after.dtype
    info = da.explain(q, k, v, pattern, pattern, pattern, pattern, attn_mask=mask)
    assert info.key["problem"]["mask"] == "additive_float32"


def test_mask_dtypes_sdpa_refuses_are_refused_naming_attn_mask():
    q, k, v = qkv(b=1, hq=2, sq=8, d=16, dtype=torch.float16)
    bad = torch.zeros(8, 8, dtype=torch.float64)
    with pytest.raises(RuntimeError):
        F.scaled_dot_product_attention(q, k, v, attn_mask=bad)  # PyTorch refuses it too
    with pytest.raises(TypeError, match="attn_mask must be bool, float32 or of the query's dtype"):
        da.attention_forward(q, k, v, attn_mask=bad)


def test_patch_sdpa_routes_a_float32_mask_with_a_bf16_query():
    from diffsynth_attention.integrations import patching

    q, k, v, mask = _bf16_with_fp32_mask()
    expected = patching._ORIGINAL_SDPA(q, k, v, attn_mask=mask)
    before = da.stats()["tunings"]
    with da.patch_sdpa():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert da.stats()["tunings"] == before + 1  # through the dispatcher, not around it
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)


def test_current_implementation_reports_the_backend_actually_serving(monkeypatch):
    q, k, v = qkv(b=1, hq=2, sq=8, d=16)
    assert REGISTRY["flash_attention_4"].unavailable_reason() is not None  # no GPU / package here
    with da.use_backend("flash_attention_4"):
        da.attention_forward(q, k, v)
        assert da.current_implementation() == "torch"  # the calls run on torch
        assert da.explain(q, k, v).backend == "torch"
        monkeypatch.setenv("DIFFSYNTH_ATTENTION_STRICT", "1")  # strict: calls raise, nothing falls back
        assert da.current_implementation() == "flash_attention_4"
    monkeypatch.delenv("DIFFSYNTH_ATTENTION_STRICT")
    with da.use_backend("torch_math"):
        assert da.current_implementation() == "torch_math"
    monkeypatch.setenv("DIFFSYNTH_ATTENTION_IMPLEMENTATION", "flash_attention_4")
    assert da.current_implementation() == "torch"
    monkeypatch.setenv("DIFFSYNTH_ATTENTION_IMPLEMENTATION", "auto")
    assert da.current_implementation() == "auto"
