"""``use_flex`` / ``score_mod`` with DiffSynth-Studio 2.1.12's meaning (flex attention),
compared with DiffSynth's own module on the CPU (both eager: compiling flex here takes minutes)."""
import re

import pytest
import torch
from einops import rearrange

from diffsynth_attention import flex
from support.helpers import full_reference, qkv, rel
from support.diffsynth import load_diffsynth_attention

pytest.importorskip("torch.nn.attention.flex_attention")


@pytest.fixture(autouse=True)
def eager_flex(monkeypatch):
    monkeypatch.setitem(flex._state, "compile", False)


def _bias(score, b, h, q_idx, kv_idx):
    return torch.where((kv_idx >= 8) & (kv_idx < 16), score - 1.0, score)  # the Wan-Animate DiT's kind


@pytest.mark.parametrize("pattern,dims", [("b n s d", None), ("b s n d", None), ("b s (n d)", {"n": 4})])
def test_same_results_as_diffsynth_flex(monkeypatch, pattern, dims):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    ds = load_diffsynth_attention()
    monkeypatch.setattr(ds, "flex_attention_func", flex_attention)  # DiffSynth's, uncompiled
    monkeypatch.setattr(ds, "ATTENTION_IMPLEMENTATION", "torch")
    q, k, v = qkv(b=1, hq=4, sq=32, d=16)
    qs, ks, vs = (rearrange(t, f"b n s d -> {pattern}", **(dims or {})).contiguous() for t in (q, k, v))
    block = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, 32, 32, device="cpu")
    for kwargs in ({"score_mod": _bias}, {"use_flex": True, "scale": 0.3}, {"use_flex": True, "attn_mask": block, "score_mod": _bias}):
        theirs = ds.attention_forward(qs, ks, vs, pattern, pattern, pattern, pattern, dims, **kwargs)
        ours = flex.flex_attention_forward(qs, ks, vs, pattern, pattern, pattern, pattern, dims,
                                           kwargs.get("attn_mask"), kwargs.get("scale"), False, None, kwargs.get("score_mod"))
        assert ours.shape == theirs.shape and rel(ours, theirs) < 1e-6, kwargs


def test_masks_causal_window_and_gqa_mean_what_they_mean_elsewhere():
    q, k, v = qkv(b=2, hq=4, hk=2, sq=24, skv=24, d=16)
    mask = torch.rand(2, 1, 24, 24, generator=torch.Generator().manual_seed(1)) > 0.3
    mask[..., 0] = True
    for kw, ref in (({"attn_mask": mask}, {"mask": mask}), ({"is_causal": True}, {"causal": True}),
                    ({"window_size": 3}, {"window": 3})):
        out = flex.flex_attention_forward(q, k, v, **kw)
        assert rel(out, full_reference(q, k, v, **ref)) < 1e-5, kw


def test_patch_diffsynth_sends_use_flex_to_flex_attention_forward(monkeypatch):
    import diffsynth_attention as da

    ds = load_diffsynth_attention()
    seen = []
    monkeypatch.setattr(flex, "flex_attention_forward", lambda *a, **kw: seen.append((a, kw)) or "flex")
    with da.patch_diffsynth(wan=False):
        q, k, v = qkv(b=1, hq=2, sq=8, d=8)
        assert ds.attention_forward(q, k, v, use_flex=True) == "flex"
        assert ds.attention_forward(q, k, v, score_mod=_bias) == "flex"
        out = ds.attention_forward(q, k, v)
    assert isinstance(out, torch.Tensor) and len(seen) == 2 and seen[1][1]["score_mod"] is _bias


def test_patch_diffsynth_names_the_real_import_error(tmp_path, monkeypatch):
    import sys

    import diffsynth_attention as da
    from support.helpers import broken_package

    for name in [n for n in sys.modules if n == "diffsynth" or n.startswith("diffsynth.")]:
        monkeypatch.delitem(sys.modules, name)
    broken_package(tmp_path, monkeypatch, "diffsynth", "import torchvision_is_not_here")
    with pytest.raises(ImportError) as info:
        da.patch_diffsynth()
    text = str(info.value)
    assert "DiffSynth-Studio is installed" in text and "'torchvision_is_not_here' is missing" in text
    assert "pip install diffsynth)" not in text


def test_attention_forward_takes_diffsynths_use_flex_and_score_mod():
    """attention_forward has DiffSynth's whole signature: use_flex / score_mod route to flex attention."""
    import diffsynth_attention as da

    q, k, v = qkv(b=1, hq=2, sq=24, d=8)
    plain = da.attention_forward(q, k, v)
    assert rel(da.attention_forward(q, k, v, use_flex=True), plain) < 1e-5
    biased = da.attention_forward(q, k, v, score_mod=_bias)
    assert rel(biased, flex.flex_attention_forward(q, k, v, score_mod=_bias)) < 1e-6
    assert rel(biased, plain) > 1e-3  # the score_mod was applied, not dropped


@pytest.mark.parametrize("args,named", [
    (dict(out_pattern="b s n"), "out_pattern='b s n' lacks 'd'"),
    (dict(k_pattern="b s n d e"), "k_pattern='b s n d e' has unknown axes 'e'"),
    (dict(q=torch.randn(1, 16, 8)), "q_pattern='b s n d' has 4 axes but q has 3 dims"),
    (dict(dims=[2]), "dims must be a dict"),
])
def test_flex_names_a_bad_pattern_or_rank_as_attention_forward_does(args, named):
    """Flex attention takes the same patterns as attention_forward: a wrong one is refused with the
    same message, naming the argument, not with a permute error from inside (or, for a swap of two
    axes, no error and a tensor of the wrong rank)."""
    q = torch.randn(1, 16, 2, 8)
    call = dict(q=q, k=q, v=q, q_pattern="b s n d", k_pattern="b s n d", v_pattern="b s n d", out_pattern="b s n d") | args
    with pytest.raises((ValueError, TypeError), match=re.escape(named)):
        flex.flex_attention_forward(**call)


def test_a_tensor_mask_that_does_not_broadcast_is_refused_naming_attn_mask():
    q, k, v = qkv(b=1, hq=2, sq=8, d=8)
    with pytest.raises(ValueError, match=r"attn_mask of shape \(5, 8\) is not broadcastable"):
        flex.flex_attention_forward(q, k, v, attn_mask=torch.ones(5, 8, dtype=torch.bool))
