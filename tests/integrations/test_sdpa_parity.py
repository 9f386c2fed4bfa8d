"""patch_sdpa and attention_forward against PyTorch's own SDPA on calls the earlier passes did not
cover: meta tensors (which SDPA runs, an output with no data) and masks of fewer than 2 dims
(which SDPA refuses)."""
import pytest
import torch

import diffsynth_attention as da
from diffsynth_attention.integrations import patching

from support.helpers import qkv


def _compiled(fn, compiled):
    return torch.compile(fn, fullgraph=True, backend="aot_eager") if compiled else fn


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled-fullgraph"])
@pytest.mark.parametrize("mask", [None, "bool", "float"])
def test_patch_sdpa_runs_meta_tensors_as_sdpa_does(mask, compiled):
    """Before: routed to attention_forward, which refuses meta tensors ('q is a meta tensor'),
    where SDPA returns a meta output (shape inference, models built on the meta device)."""
    q, k, v = (t.to("meta") for t in qkv(b=2, hq=4, sq=8, skv=12, d=16))
    m = None if mask is None else torch.ones(8, 12, dtype=torch.bool if mask == "bool" else torch.float32, device="meta")
    want = patching._ORIGINAL_SDPA(q, k, v, attn_mask=m)
    before = da.stats()

    def fn(q, k, v, m):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m)

    torch._dynamo.reset()
    try:
        with da.patch_sdpa():
            got = _compiled(fn, compiled)(q, k, v, m)
    finally:
        torch._dynamo.reset()
    assert got.is_meta and got.shape == want.shape and got.dtype == want.dtype
    assert da.stats() == before  # SDPA's own call: nothing planned or tuned


@pytest.mark.parametrize("shape", [(), (12,)], ids=["0-dim", "1-dim"])
@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
def test_a_mask_of_fewer_than_2_dims_is_refused_as_sdpa_refuses_it(shape, dtype):
    """SDPA (and so DiffSynth-Studio's torch path) raises for a mask of 0 or 1 dims; attention_forward
    served it (broadcast as a row), and under patch_sdpa such an SDPA call succeeded where the same
    call unpatched failed."""
    q, k, v = qkv(b=2, hq=4, sq=8, skv=12, d=16)
    m = torch.ones(shape, dtype=dtype)
    with pytest.raises(Exception) as plain:
        patching._ORIGINAL_SDPA(q, k, v, attn_mask=m)
    with da.patch_sdpa():
        with pytest.raises(type(plain.value)):
            torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m)
    for _ in range(2):  # the first call and a repeat
        with pytest.raises(ValueError, match=r"^attn_mask of shape .* has [01] dims; a mask has at least 2"):
            da.attention_forward(q, k, v, attn_mask=m)
    torch._dynamo.reset()
    try:
        with pytest.raises(Exception, match=r"attn_mask of shape .* has [01] dims"):
            torch.compile(lambda q, k, v, m: da.attention_forward(q, k, v, attn_mask=m), fullgraph=True,
                          backend="aot_eager")(q, k, v, m)
    finally:
        torch._dynamo.reset()
    assert da.stats()["tunings"] == 0


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled-fullgraph"])
def test_patch_sdpa_leaves_a_math_only_sdpa_call_to_sdpa(compiled):
    """``sdpa_kernel(SDPBackend.MATH)`` asks SDPA for its math kernel, e.g. for a double backward
    (which the fused kernels lack). Before, patch_sdpa routed the call anyway, to a backend whose
    backward is not differentiable ('derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward
    is not implemented'), where the unpatched call gives the second derivative."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (t.requires_grad_() for t in qkv(b=1, hq=2, sq=8, d=8))

    def second(sdpa):
        out = sdpa(q, k, v)
        (g,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
        return out, torch.autograd.grad(g.sum(), q)[0]

    with sdpa_kernel(SDPBackend.MATH):
        want_out, want = second(patching._ORIGINAL_SDPA)
        before = da.stats()
        torch._dynamo.reset()
        try:
            with da.patch_sdpa(), da.use_backend("torch_flash"):
                graphs = []

                def recorder(gm, example_inputs):
                    graphs.append(gm.code)
                    return gm
                fn = torch.nn.functional.scaled_dot_product_attention
                if compiled:
                    got_out = torch.compile(lambda q, k, v: fn(q, k, v), fullgraph=True, backend=recorder)(q, k, v)
                    assert graphs and "diffsynth_attention" not in graphs[-1]  # SDPA's own op in the graph
                else:
                    got_out, got = second(fn)
                    assert torch.allclose(got, want, atol=1e-5)
        finally:
            torch._dynamo.reset()
    assert torch.allclose(got_out, want_out, atol=1e-6)
    assert da.stats() == before  # PyTorch's own call: not routed


def test_patch_sdpa_takes_the_arguments_sdpa_takes_and_no_others():
    """SDPA's ``scale`` and ``enable_gqa`` are keyword-only; the patch's wrapper took them as the
    7th and 8th positional arguments, so a call that fails unpatched ran patched."""
    q, k, v = qkv(b=1, hq=2, sq=8, d=8)
    calls = [((q, k, v, None, 0.0, False, 0.5), {}), ((q, k, v, None, 0.0, False, None, True), {}),
             ((q, k, v), {"attn_mask": None, "bogus": 1})]
    for args, kwargs in calls:
        with pytest.raises(TypeError) as plain:
            patching._ORIGINAL_SDPA(*args, **kwargs)
        with da.patch_sdpa():
            with pytest.raises(TypeError) as patched:
                torch.nn.functional.scaled_dot_product_attention(*args, **kwargs)
        assert ("positional" in str(plain.value)) == ("positional" in str(patched.value))
    with da.patch_sdpa():  # the positional and keyword forms SDPA takes still run
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, None, 0.0, True, scale=0.5, enable_gqa=False)
    assert torch.allclose(out, patching._ORIGINAL_SDPA(q, k, v, is_causal=True, scale=0.5), atol=1e-6)
