"""The short questions a call site asks (diffsynth_attention/callsite.py): each is answered in one
place, so each answer is checked here once, against what torch itself says."""
import pytest
import torch
from einops import rearrange

from diffsynth_attention import callsite


def test_is_compiling_is_torchs_own_function_so_dynamo_folds_it():
    assert callsite.is_compiling() is False

    def f(x):
        return x + 1 if callsite.is_compiling() else x - 1

    x = torch.zeros(3)
    assert torch.equal(torch.compile(f, backend="eager", fullgraph=True)(x), x + 1)
    assert torch.equal(f(x), x - 1)


def test_capture_check_asks_cuda_only_for_cuda(monkeypatch):
    monkeypatch.setattr(callsite, "_capturing", lambda: True)
    assert callsite.capturing("cuda") and not callsite.capturing("cpu") and not callsite.capturing("meta")
    assert callsite.in_graph("cuda") and not callsite.in_graph("cpu")
    monkeypatch.setattr(callsite, "_capturing", lambda: False)
    assert not callsite.capturing("cuda") and not callsite.in_graph("cuda")
    monkeypatch.setattr(callsite, "is_compiling", lambda: True)  # process-wide on torch 2.13: not this thread's graph
    assert not callsite.in_graph("cpu")
    with callsite.building_graph():
        with callsite.building_graph():
            assert callsite.in_graph("cpu") and callsite.in_graph("cuda")
        assert callsite.in_graph("cpu")
    assert not callsite.in_graph("cpu")
    for name in ("dynamo_tracing", "is_exporting"):
        monkeypatch.setattr(callsite, name, lambda: True)
        assert callsite.in_graph("cpu") and callsite.tracing()
        monkeypatch.setattr(callsite, name, lambda: False)
    assert not callsite.tracing()


def test_needs_grad_follows_grad_mode_and_each_input():
    q, k, v = (torch.zeros(1, 1, 2, 4) for _ in range(3))
    mask = torch.zeros(1, 1, 2, 2)
    assert not callsite.needs_grad(q, k, v, mask)
    for i in range(3):
        ts = [q, k, v]
        ts[i] = ts[i].clone().requires_grad_()
        assert callsite.needs_grad(*ts)
        with torch.no_grad():
            assert not callsite.needs_grad(*ts)
    learned = mask.clone().requires_grad_()
    assert callsite.needs_grad(q, k, v, learned)  # a learned bias counts where the caller passes it
    assert not callsite.needs_grad(q, k, v)  # and not where it differentiates q, k and v only
    with torch.no_grad():
        assert not callsite.needs_grad(q, k, v, learned)


@pytest.mark.parametrize("dtype, name", [(torch.bfloat16, "bfloat16"), (torch.float16, "float16"),
                                         (torch.float32, "float32"), (torch.float64, "float64")])
def test_dtype_name(dtype, name):
    assert callsite.dtype_name(dtype) == name


def test_converter_permutes_as_a_view_and_round_trips():
    x = torch.randn(2, 5, 3, 4)  # b s n d
    to = callsite.converter("b s n d", "b n s d")
    y = to(x)
    assert torch.equal(y, x.transpose(1, 2)) and y.data_ptr() == x.data_ptr()  # a view: nothing copied
    assert torch.equal(callsite.converter("b n s d", "b s n d")(y), x)
    assert callsite.converter("b n s d", " b  n s d") is callsite.converter("b s n d", "b s n d")  # the identity
    assert callsite.converter("b s n d", "b n s d") is to  # built once per patterns
    z = torch.randn(3, 5, 2, 4)  # n s b d: a permutation that is not its own inverse
    assert torch.equal(callsite.converter("n s b d", "b n s d")(z), rearrange(z, "n s b d -> b n s d"))
    assert torch.equal(callsite.converter("b n s d", "n s b d")(rearrange(z, "n s b d -> b n s d")), z)


def test_converter_packs_and_unpacks_with_the_lengths_dims_gives():
    x = torch.randn(2, 5, 12)  # b s (n d), n = 3
    canonical = callsite.convert(x, "b s (n d)", "b n s d", {"n": 3})
    assert torch.equal(canonical, rearrange(x, "b s (n d) -> b n s d", n=3))
    assert torch.equal(callsite.convert(canonical, "b n s d", "b s (n d)"), x)
    with pytest.raises(Exception):  # no length for a packed pair: einops cannot split it
        callsite.convert(x, "b s (n d)", "b n s d")


@pytest.mark.parametrize("shape", [(2, 3, 4), (2, 3, 4, 5, 6)])
def test_a_reordering_converter_refuses_a_tensor_of_another_rank(shape):
    """A swap of two axes runs as transpose, which would take a tensor of any rank; a converter
    refuses what permute refuses (a 3-d or 5-d tensor for a 4-axis pattern), as einops does."""
    with pytest.raises(RuntimeError):
        callsite.convert(torch.randn(*shape), "b s n d", "b n s d")
    x = torch.randn(2, 3, 4, 5)
    assert callsite.convert(x, "b s n d", "b n s d").stride() == x.permute(0, 2, 1, 3).stride()
