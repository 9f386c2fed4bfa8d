"""Empty calls (a size-0 batch, heads, s_q, s_kv or head dim), which PyTorch's SDPA accepts: served
by SDPA itself, in the caller's layout, with the errors of a non-empty call for anything else that
is wrong, and without a key, a tuning or a decision (nothing is known about an empty problem that
helps a real one)."""
import pytest
import torch
from einops import rearrange

import diffsynth_attention as da

SDPA = torch.nn.functional.scaled_dot_product_attention

# (name, b, hq, hk, sq, skv, d, dv): each a size 0 somewhere (head dim 0 of q and k is not an
# empty output: every score is 0, so SDPA averages v; skv=0 gives zeros). The calls with no head
# that PyTorch's CPU SDPA dies of (SIGFPE) are test_empty_headless.py's, each path in a child
# process: the reference below could not run them here, and neither could a regression.
SHAPES = [("batch", 0, 4, 4, 8, 8, 16, 16), ("s_q", 2, 4, 4, 0, 8, 16, 16), ("s_kv", 2, 4, 4, 8, 0, 16, 16),
          ("head_dim", 2, 4, 4, 8, 8, 0, 16), ("head_dim_v", 2, 4, 4, 8, 8, 16, 0), ("gqa_batch", 0, 4, 2, 8, 8, 16, 16),
          ("all", 0, 0, 0, 0, 0, 0, 0)]


def tensors(b, hq, hk, sq, skv, d, dv, dtype=torch.float32, grad=False):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*s, generator=g).to(dtype) for s in ((b, hq, sq, d), (b, hk, skv, d), (b, hk, skv, dv)))
    return tuple(t.requires_grad_(grad) for t in (q, k, v))


def sdpa(q, k, v, **kw):
    return SDPA(q, k, v, enable_gqa=q.shape[1] != k.shape[1], **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kw", [{}, {"is_causal": True}, {"scale": 0.3}, {"mask": True}], ids=["plain", "causal", "scale", "mask"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s[0])
def test_an_empty_call_returns_what_sdpa_returns(shape, kw, dtype, isolated):
    q, k, v = tensors(*shape[1:], dtype=dtype)
    kw = dict(kw)
    if kw.pop("mask", False):
        kw["attn_mask"] = torch.rand(q.shape[2], k.shape[2], generator=torch.Generator().manual_seed(1)) > 0.3
    want = sdpa(q, k, v, **kw)
    for _ in range(2):  # the first call plans, the second is served by the plan
        out = da.attention_forward(q, k, v, **kw)
        assert out.shape == want.shape and out.dtype == want.dtype
        assert torch.equal(out, want)
    assert da.stats()["tunings"] == 0
    assert not isolated.exists() or not any(p.is_file() for p in isolated.rglob("*")), "an empty call wrote to the cache"
    assert da.explain(q, k, v, **kw).source == "empty"


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s[0])
def test_an_empty_call_in_a_packed_layout_comes_back_in_out_pattern(shape):
    b, hq, hk, sq, skv, d, dv = shape[1:]
    q, k, v = tensors(*shape[1:])
    if hk != hq or d != dv:  # q and v of another head count or head dim: one dims rule does not fit both
        pytest.skip("no one packed dims for q, k and v")
    packed = "b s (n d)"
    qs, ks, vs = (rearrange(t, f"b n s d -> {packed}") for t in (q, k, v))
    dims = {"d": d} if d else {"n": hq} if hq else None
    if dims is None:
        pytest.skip("n d packed with both 0: einops cannot unpack it")
    out = da.attention_forward(qs, ks, vs, packed, packed, packed, "b s n d", dims=dims)
    want = rearrange(sdpa(q, k, v), "b n s d -> b s n d")
    assert out.shape == want.shape and torch.equal(out, want)


def test_an_empty_call_is_validated_as_a_non_empty_one():
    q, k, v = tensors(0, 4, 4, 8, 8, 16, 16)
    with pytest.raises(TypeError, match="q, k and v must share a dtype"):
        da.attention_forward(q, k.double(), v)
    with pytest.raises(ValueError, match="same head dim"):
        da.attention_forward(q, k[..., :8], v)
    qa, ka, va = tensors(0, 6, 4, 8, 8, 16, 16)
    with pytest.raises(ValueError, match=r"query heads \(6\) must be a multiple of key/value heads \(4\)"):
        da.attention_forward(qa, ka, va)
    with pytest.raises(ValueError, match="attn_mask of shape"):
        da.attention_forward(q, k, v, attn_mask=torch.ones(5, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="scale"):
        da.attention_forward(q, k, v, scale=float("nan"))
    with pytest.raises(ValueError, match="k_pattern"):
        da.attention_forward(q, k, v, k_pattern="b n x d")
    with pytest.raises(ValueError, match="window_size cannot be combined with is_causal"):
        da.attention_forward(q, k, v, window_size=2, is_causal=True)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s[0])
@pytest.mark.parametrize("window", [0, 2])
def test_an_empty_windowed_call_returns_what_windowed_attention_gives(shape, window):
    """SDPA has no window: a window over no query is an empty output, over no key zeros (no key in
    any window, as SDPA gives for no key at all), and with head dim 0 the mean of v over the window."""
    q, k, v = tensors(*shape[1:])
    band = (torch.arange(q.shape[2])[:, None] - torch.arange(k.shape[2])[None, :]).abs() <= window
    want = sdpa(q, k, v, attn_mask=band)
    out = da.attention_forward(q, k, v, window_size=window)
    assert out.shape == want.shape and torch.allclose(out, want, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s[0])
def test_gradients_through_an_empty_call_are_sdpas(shape):
    q, k, v = tensors(*shape[1:], grad=True)
    sdpa(q, k, v).sum().backward()
    want = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    da.attention_forward(q, k, v).sum().backward()
    for got, exp in zip((q.grad, k.grad, v.grad), want):
        assert got.shape == exp.shape and torch.allclose(got, exp, atol=1e-6)


@pytest.mark.parametrize("shape", [s for s in SHAPES if s[0] in ("batch", "s_q", "s_kv")], ids=lambda s: s[0])
@pytest.mark.parametrize("window", [None, 1])
def test_an_empty_call_compiles_with_fullgraph(shape, window, isolated):
    torch._dynamo.reset()
    q, k, v = tensors(*shape[1:])
    bsnd = ("b s n d",) * 4
    qs, ks, vs = (t.transpose(1, 2) for t in (q, k, v))
    fn = torch.compile(lambda a, b, c: da.attention_forward(a, b, c, *bsnd, window_size=window), fullgraph=True)
    with torch.no_grad():
        out = fn(qs, ks, vs)
    want = da.attention_forward(qs, ks, vs, *bsnd, window_size=window)
    assert out.shape == want.shape and torch.equal(out, want)
    assert da.stats()["tunings"] == 0
    assert not isolated.exists() or not any(p.is_file() for p in isolated.rglob("*"))
    torch._dynamo.reset()
