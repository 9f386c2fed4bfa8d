"""Compiled calls that must behave as the eager call does, found by a differential pass (eager
against torch.compile, fullgraph, with static, dynamic and marked-dynamic sizes)."""
import pytest
import torch

import diffsynth_attention as da

from support.helpers import qkv, rel


@pytest.mark.parametrize("dv", [8, 5], ids=["dv=d", "dv!=d"])
@pytest.mark.parametrize("sizes", ["dynamic", "mark_dynamic"])
def test_a_learned_mask_with_is_causal_compiles_with_symbolic_sizes(sizes, dv):
    """Before: with symbolic sizes a learned mask's call decomposes into PyTorch's SDPA with the mask
    and is_causal=True, which SDPA's math kernel (its choice on fake tensors) refuses: 'Explicit
    attn_mask should not be set when is_causal=True' failed the compile, where the eager call (served
    by torch_math, the causal mask folded in) returns the result and the mask's gradient."""
    q, k, v = (t.requires_grad_() for t in qkv(b=1, hq=2, sq=12, skv=16, d=8, dv=dv))
    mask = torch.randn(2, 12, 16, generator=torch.Generator().manual_seed(3)).requires_grad_()

    def fn(q, k, v, m):
        return da.attention_forward(q, k, v, attn_mask=m, is_causal=True)

    want = fn(q, k, v, mask)
    want_grads = torch.autograd.grad(want.square().sum(), (q, k, v, mask))
    torch._dynamo.reset()
    try:
        if sizes == "mark_dynamic":
            for t, dim in ((q, 2), (k, 2), (v, 2), (mask, 1), (mask, 2)):  # the sequences, wherever they are
                torch._dynamo.mark_dynamic(t, dim)
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=True if sizes == "dynamic" else None)
        got = compiled(q, k, v, mask)
        grads = torch.autograd.grad(got.square().sum(), (q, k, v, mask))
    finally:
        torch._dynamo.reset()
    assert rel(got, want) < 1e-5
    for g, w in zip(grads, want_grads):
        assert rel(g, w) < 1e-5
