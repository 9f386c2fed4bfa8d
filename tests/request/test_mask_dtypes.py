"""Masks of another float dtype than the query's, as DiffSynth-Studio and PyTorch take them: a
float32 mask with a bfloat16 query is served (and routed under ``patch_sdpa``), a mask dtype SDPA
refuses is a ``TypeError`` naming ``attn_mask``."""

import pytest
import torch
import torch.nn.functional as F

import diffsynth_attention as da

from support.helpers import qkv, rel
from support.diffsynth import load_diffsynth_attention


def _bf16_with_fp32_mask(pattern="b n s d"):
    q, k, v = qkv(b=1, hq=2, sq=8, d=16, dtype=torch.bfloat16)
    mask = torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(3))
    if pattern != "b n s d":
        q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    return q, k, v, mask


@pytest.mark.parametrize("pattern", ["b n s d", "b s n d"])
def test_float32_mask_with_bf16_query_matches_diffsynth_and_sdpa(pattern):
    ds = load_diffsynth_attention()
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
        with da.use_backend("torch"):
            exact = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert da.stats()["tunings"] == before + 1  # through the dispatcher, not around it
    assert out.dtype == torch.bfloat16 and rel(out, expected) < 1e-2  # the tuned backend
    assert torch.equal(exact, expected)


@pytest.mark.parametrize("backend", ["torch", "torch_flash", "auto"])
@pytest.mark.parametrize("causal", [False, True])
def test_float32_mask_with_float64_query_is_added_as_its_values(backend, causal):
    """PyTorch's CPU flash kernel (SDPA's choice) misreads a float32 mask of a float64 query; the
    mask is served as its (exactly upcast) values, whichever backend serves the call."""
    q, k, v = qkv(b=1, hq=2, sq=16, d=8, dtype=torch.float64)
    mask = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    bias = mask.double()
    if causal:
        bias = bias.masked_fill(torch.ones(16, 16, dtype=torch.bool).triu(1), float("-inf"))
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    with da.use_backend(backend):
        for _ in range(2):  # the first call and a hit
            out = da.attention_forward(q, k, v, attn_mask=mask, is_causal=causal)
            assert out.dtype == torch.float64 and rel(out, expected) < 1e-6
