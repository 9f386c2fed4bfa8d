"""Calls inside ``torch.func`` transforms (grad, vmap, jacrev), which PyTorch's SDPA takes. Before,
a first call of a key there tuned on the transform's wrapped tensors and raised (grad: 'You are
attempting to call Tensor.requires_grad_() ... inside of a function being transformed by a
functorch transform'; vmap: 'data-dependent control flow' in the tuner's finiteness check). Now a
call there is served by its decision, or, undecided, by SDPA, and the first call outside tunes."""
import pytest
import torch

import diffsynth_attention as da

from support.helpers import qkv, rel

SDPA = torch.nn.functional.scaled_dot_product_attention


def _stored(cache):
    return [p for p in cache.rglob("*") if p.is_file() and p.suffix == ".json"] if cache.exists() else []


@pytest.mark.parametrize("kw", [{}, {"is_causal": True}, {"scale": 0.4}, {"attn_mask": "bool"}, {"gqa": True}],
                         ids=["plain", "causal", "scale", "mask", "gqa"])
def test_torch_func_grad_of_a_new_key_is_sdpas(kw, isolated):
    q, k, v = qkv(b=2, hq=4, hk=2 if kw.get("gqa") else 4, sq=8, skv=12, d=16)
    kw = {n: x for n, x in kw.items() if n != "gqa"}
    if kw.get("attn_mask") == "bool":
        kw["attn_mask"] = torch.rand(8, 12, generator=torch.Generator().manual_seed(2)) > 0.3
    gqa = q.shape[1] != k.shape[1]

    def loss(f):
        return lambda q, k, v: f(q, k, v, **kw).square().sum()

    want = torch.func.grad(loss(lambda *a, **w: SDPA(*a, enable_gqa=gqa, **w)), argnums=(0, 1, 2))(q, k, v)
    got = torch.func.grad(loss(da.attention_forward), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        assert rel(g, w) < 1e-5
    assert da.stats()["tunings"] == 0 and not _stored(isolated)  # nothing tuned inside the transform
    da.attention_forward(q, k, v, **kw)  # outside: the key tunes
    assert da.stats()["tunings"] == 1


def test_vmap_of_a_new_key_is_sdpas():
    q, k, v = qkv(b=2, hq=4, sq=6, skv=10, d=16)
    qs = torch.stack([q, q.flip(2), q * 0.5])
    want = torch.vmap(SDPA, in_dims=(0, None, None))(qs, k, v)
    got = torch.vmap(da.attention_forward, in_dims=(0, None, None))(qs, k, v)
    assert rel(got, want) < 1e-5
    assert da.stats()["tunings"] == 0


def test_jacrev_and_a_decided_key_inside_a_transform():
    q, k, v = qkv(b=1, hq=2, sq=3, skv=4, d=4)
    da.attention_forward(q.requires_grad_(), k, v).sum().backward()  # decided (with gradients) outside
    q = q.detach()
    tunings = da.stats()["tunings"]
    want = torch.func.jacrev(lambda x: SDPA(x, k, v))(q)
    got = torch.func.jacrev(lambda x: da.attention_forward(x, k, v))(q)
    assert rel(got, want) < 1e-5
    assert da.stats()["tunings"] == tunings
