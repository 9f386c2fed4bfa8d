"""A call's arguments are validated before anything runs: a non-finite scale, a window wider than
the sequences, meta and sparse tensors, unknown or contradicting ``dims`` and a non-bool
``compatibility_mode`` are errors naming the argument, or mean what they say."""
import pytest
import torch

import diffsynth_attention as da

from support.helpers import full_reference, qkv, rel


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf"), 10 ** 400])
def test_non_finite_scale_is_a_value_error(scale):
    q, k, v = qkv()
    with pytest.raises(ValueError, match="scale"):
        da.attention_forward(q, k, v, scale=scale)


@pytest.mark.parametrize("window", [2 ** 63, 10 ** 30, 31, 40])
def test_a_window_wider_than_the_sequences_means_no_window(window):
    q, k, v = qkv(sq=32)
    out = da.attention_forward(q, k, v, window_size=window)
    assert rel(out, full_reference(q, k, v)) < 1e-5
    assert da.explain(q, k, v, window_size=window).key["problem"]["window"] is None


def test_a_narrow_window_is_kept():
    q, k, v = qkv(sq=32)
    out = da.attention_forward(q, k, v, window_size=3)
    assert rel(out, full_reference(q, k, v, window=3)) < 1e-5
    assert da.explain(q, k, v, window_size=3).key["problem"]["window"] == 3


def test_meta_and_sparse_tensors_are_type_errors_naming_the_argument():
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"^q is a meta tensor"):
        da.attention_forward(q.to("meta"), k.to("meta"), v.to("meta"))
    with pytest.raises(TypeError, match=r"^v has layout"):
        da.attention_forward(q, k, v.to_sparse())
    mask = torch.ones(32, 32, dtype=torch.bool)
    with pytest.raises(TypeError, match=r"^attn_mask has layout"):
        da.attention_forward(q, k, v, attn_mask=mask.to_sparse())


def test_unknown_or_contradicting_dims_are_value_errors():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"dims has an unknown axis 'h'"):
        da.attention_forward(q, k, v, dims={"h": 4})
    with pytest.raises(ValueError, match=r"dims\['n'\]=7 contradicts"):
        da.attention_forward(q, k, v, dims={"n": 7})
    out = da.attention_forward(q, k, v, dims={"n": 4, "d": 16})  # agreeing dims are fine
    assert out.shape == q.shape


@pytest.mark.parametrize("value", ["no", 2, None, 0.5, torch.tensor(True)])
def test_a_non_bool_is_causal_is_a_type_error_and_0_or_1_are_bools(value):
    q, k, v = qkv()
    with pytest.raises(TypeError, match="is_causal must be a bool, got " + ("a Tensor" if torch.is_tensor(value) else repr(value))):
        da.attention_forward(q, k, v, is_causal=value)
    assert torch.equal(da.attention_forward(q, k, v, is_causal=1), da.attention_forward(q, k, v, is_causal=True))
    assert torch.equal(da.attention_forward(q, k, v, is_causal=0), da.attention_forward(q, k, v, is_causal=False))


@pytest.mark.parametrize("value", ["no", "", 2, None, 0.5])
def test_non_bool_compatibility_mode_is_a_type_error(value):
    q, k, v = qkv()
    with pytest.raises(TypeError, match="compatibility_mode"):
        da.attention_forward(q, k, v, compatibility_mode=value)


def test_a_numpy_bool_flag_is_refused_naming_its_type():
    """PyTorch's SDPA refuses ``is_causal=np.True_`` too. Before: the message read "is_causal must
    be a bool, got a bool" (NumPy's type is named ``bool``)."""
    np = pytest.importorskip("numpy")
    q, k, v = qkv()
    for name in ("is_causal", "compatibility_mode"):
        with pytest.raises(TypeError, match=rf"^{name} must be a bool, got a numpy\.bool_?$"):
            da.attention_forward(q, k, v, **{name: np.True_})
