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


SDPA = torch.nn.functional.scaled_dot_product_attention


@pytest.mark.parametrize("scale", [torch.tensor(0.3), torch.tensor(0.3, dtype=torch.float64), torch.tensor(0.3, dtype=torch.float16),
                                   torch.tensor(2)], ids=["float32", "float64", "float16", "int64"])
def test_a_0_dim_tensor_scale_is_its_float(scale):
    """PyTorch's SDPA takes a 0-dim tensor scale as float(scale). Before: a TypeError. Now the same
    call as with that float: its result, its key and its plan (no plan of its own)."""
    from diffsynth_attention.dispatch import default_dispatcher

    q, k, v = qkv()
    want = da.attention_forward(q, k, v, scale=float(scale))
    plans = len(default_dispatcher().plans)
    for _ in range(2):
        out = da.attention_forward(q, k, v, scale=scale)
        assert torch.equal(out, want)
    assert len(default_dispatcher().plans) == plans
    assert rel(out, SDPA(q, k, v, scale=scale)) < 1e-5
    assert da.explain(q, k, v, scale=scale).key_id == da.explain(q, k, v, scale=float(scale)).key_id


@pytest.mark.parametrize("scale,error,says", [
    (torch.tensor(True), TypeError, r"^scale must be a number or None, got a bool tensor"),
    (torch.tensor([0.5]), TypeError, r"^scale must be a number or None, got a tensor of shape \(1,\)"),
    (torch.tensor(0.5, requires_grad=True), TypeError, r"^scale must be a number or None, got a tensor that requires grad"),
    (torch.tensor(0.5 + 1j), TypeError, r"^scale must be a number or None, got a complex64 tensor"),
    (torch.tensor(0.5, device="meta"), TypeError, r"^scale must be a number or None, got a meta tensor"),
    (torch.tensor(float("nan")), ValueError, r"^scale=nan must be a finite number"),
    (torch.tensor(float("inf")), ValueError, r"^scale=inf must be a finite number"),
], ids=["bool", "1-dim", "requires-grad", "complex", "meta", "nan", "inf"])
def test_a_tensor_scale_that_is_no_finite_number_is_refused_naming_scale(scale, error, says):
    """What SDPA refuses (a tensor of 1 dim or more, one that requires grad, complex) and what this
    library refuses of a number (a bool, NaN, infinity) are refused for a tensor too, every call."""
    q, k, v = qkv()
    da.attention_forward(q, k, v, scale=torch.tensor(0.5))  # a tensor scale planned first: no hit for a bad one
    for _ in range(2):
        with pytest.raises(error, match=says):
            da.attention_forward(q, k, v, scale=scale)


@pytest.mark.parametrize("n", ["int64", "int32", "uint8", "intp"])
def test_numpy_integer_dims_are_their_int(n):
    """einops (which DiffSynth-Studio calls) takes ``dims={"n": np.int64(4)}``. Before: a ValueError."""
    np = pytest.importorskip("numpy")
    q, k, v = qkv()
    packed = tuple(t.transpose(1, 2).flatten(2) for t in (q, k, v))
    pattern = ("b s (n d)",) * 4
    want = da.attention_forward(*packed, *pattern, dims={"n": 4})
    for _ in range(2):
        assert torch.equal(da.attention_forward(*packed, *pattern, dims={"n": getattr(np, n)(4)}), want)
    assert da.explain(*packed, *pattern, dims={"n": getattr(np, n)(4)}).key_id == da.explain(*packed, *pattern, dims={"n": 4}).key_id


@pytest.mark.parametrize("length", ["bool_", "float64", "int0"], ids=["numpy-bool", "numpy-float", "numpy-zero"])
def test_numpy_dims_that_are_no_positive_int_are_refused(length):
    np = pytest.importorskip("numpy")
    value = {"bool_": np.bool_(True), "float64": np.float64(4.0), "int0": np.int64(0)}[length]
    q, k, v = qkv()
    packed = tuple(t.transpose(1, 2).flatten(2) for t in (q, k, v))
    with pytest.raises(ValueError, match=r"dims\['n'\]=.* must be a positive int"):
        da.attention_forward(*packed, *(("b s (n d)",) * 4), dims={"n": value})
