"""Calls inside a ``torch.autocast`` region. Autocast runs PyTorch's SDPA (and so DiffSynth-Studio's
torch path) in its lower-precision dtype: q, k, v and a float mask cast to it, a bfloat16 result.
Before, attention_forward served the float32 problem, and the output's dtype depended on the backend
that served it (``torch``, which calls SDPA, gave bfloat16; ``torch_math`` and ``torch_flash``,
ATen kernels autocast does not list, float32), eager and compiled alike."""
import pytest
import torch

import diffsynth_attention as da

from support.helpers import qkv, rel

SDPA = torch.nn.functional.scaled_dot_product_attention
LOW = torch.bfloat16


def _autocast():
    return torch.autocast("cpu", dtype=LOW)


def _cases():
    q, k, v = qkv(b=2, hq=4, sq=12, skv=20, d=16)
    g = torch.Generator().manual_seed(3)
    return {
        "plain": ((q, k, v), {}),
        "causal": ((q, k, v), {"is_causal": True}),
        "float32-mask": ((q, k, v), {"attn_mask": torch.randn(12, 20, generator=g)}),
        "bool-mask": ((q, k, v), {"attn_mask": torch.rand(2, 1, 12, 20, generator=g) > 0.2}),
        "scale": ((q, k, v), {"scale": 0.3}),
        "gqa": ((q, k[:, :2], v[:, :2]), {}),
    }


@pytest.mark.parametrize("backend", [None, "torch", "torch_math", "torch_flash"], ids=lambda b: b or "auto")
@pytest.mark.parametrize("case", list(_cases()))
def test_a_call_in_an_autocast_region_is_sdpas_call_there(case, backend):
    (q, k, v), kw = _cases()[case]
    before = [t.clone() for t in (q, k, v)]
    with _autocast():
        want = SDPA(q, k, v, enable_gqa=q.shape[1] != k.shape[1], **kw)
        for _ in range(2):  # the first call plans, the second is served by the plan
            if backend is None:
                out = da.attention_forward(q, k, v, **kw)
            else:
                with da.use_backend(backend):
                    out = da.attention_forward(q, k, v, **kw)
            assert out.dtype == want.dtype == LOW
            assert rel(out.float(), want.float()) < 2e-2
        assert da.explain(q, k, v, **kw).key["problem"]["dtype"] == "bfloat16"
    assert all(torch.equal(a, b) and a.dtype == torch.float32 for a, b in zip((q, k, v), before))


def test_autocast_takes_what_it_casts_and_leaves_float64():
    q, k, v = qkv(sq=8)
    with _autocast():
        mixed = da.attention_forward(q, k.to(LOW), v)  # SDPA takes it: autocast casts q and v
        assert mixed.dtype == LOW and rel(mixed.float(), SDPA(q, k.to(LOW), v).float()) < 2e-2
        d = da.attention_forward(q.double(), k.double(), v.double())  # autocast leaves float64 alone
        assert d.dtype == torch.float64 and rel(d, SDPA(q.double(), k.double(), v.double())) < 1e-6
        with pytest.raises(TypeError, match="share a dtype"):  # float64 with a cast float32: refused, as SDPA does
            da.attention_forward(q, k.double(), v.double())


def test_gradients_through_autocast_reach_the_float32_leaves():
    q, k, v = (t.requires_grad_() for t in qkv(sq=8))
    with _autocast():
        want = torch.autograd.grad(SDPA(q, k, v, is_causal=True).float().square().sum(), (q, k, v))
        got = torch.autograd.grad(da.attention_forward(q, k, v, is_causal=True).float().square().sum(), (q, k, v))
    for g, w in zip(got, want):
        assert g.dtype == w.dtype == torch.float32 and rel(g, w) < 3e-2


def test_patch_sdpa_in_an_autocast_region():
    q, k, v = qkv(sq=8)
    with _autocast():
        want = SDPA(q, k, v)
        with da.patch_sdpa():
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert da.stats()["tunings"] == 1  # routed
    assert out.dtype == want.dtype == LOW and rel(out.float(), want.float()) < 2e-2


@pytest.mark.parametrize("region", ["inside", "around"])
def test_a_compiled_call_in_an_autocast_region_is_the_eager_call(region):
    q, k, v = qkv(sq=8)
    m = torch.randn(8, 8, generator=torch.Generator().manual_seed(1))

    def fn(q, k, v, m):
        if region == "inside":
            with _autocast():
                return da.attention_forward(q, k, v, attn_mask=m)
        return da.attention_forward(q, k, v, attn_mask=m)

    torch._dynamo.reset()
    try:
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        with _autocast():
            got = compiled(q, k, v, m)
            want = da.attention_forward(q, k, v, attn_mask=m)
    finally:
        torch._dynamo.reset()
    assert got.dtype == want.dtype == LOW
    assert rel(got.float(), want.float()) < 1e-2
