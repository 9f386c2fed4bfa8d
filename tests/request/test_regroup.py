"""The layout converters do what einops' rearrange does (same values, same strides, a view exactly
where rearrange gives one) for every grouping of b, n, s, d, without calling rearrange."""
import torch
from einops import rearrange
from hypothesis import given, settings
from hypothesis import strategies as st

from diffsynth_attention.callsite import _converter

AXES = ("b", "n", "s", "d")


@st.composite
def patterns(draw):
    """A pattern of b, n, s, d in some order, with some adjacent axes packed into one group."""
    order = draw(st.permutations(AXES))
    out, i = [], 0
    while i < 4:
        width = draw(st.integers(1, 4 - i))
        group = order[i:i + width]
        out.append(group[0] if width == 1 else "(" + " ".join(group) + ")")
        i += width
    return " ".join(out)


def _shape(pattern, sizes):
    from einops.parsing import ParsedExpression

    shape = []
    for group in ParsedExpression(pattern).composition:
        n = 1
        for a in group:
            n *= sizes[a]
        shape.append(n)
    return shape


@settings(max_examples=300, deadline=None)
@given(patterns(), patterns(), st.fixed_dictionaries({a: st.integers(1, 4) for a in AXES}), st.booleans(),
       st.sets(st.sampled_from(AXES)))
def test_converters_match_rearrange(source, target, sizes, transposed, given_axes):
    x = torch.arange(float(sizes["b"] * sizes["n"] * sizes["s"] * sizes["d"])).reshape(_shape(source, sizes))
    if transposed and x.dim() > 1:  # a non-contiguous input: the same values in another memory order
        x = x.transpose(0, -1).contiguous().transpose(0, -1)
    lengths = {a: sizes[a] for a in given_axes}
    if source == target:  # the same pattern: the tensor itself (validation asks for the lengths a pack needs)
        assert _converter(source, target, tuple(sorted(lengths.items())))(x) is x
        return
    try:
        want = rearrange(x, f"{source} -> {target}", **lengths)
    except Exception:  # einops refuses (an unknown length it cannot infer): ours may only do the same
        try:
            _converter(source, target, tuple(sorted(lengths.items())))(x)
        except Exception:
            return
        raise AssertionError("converted where rearrange refused")
    got = _converter(source, target, tuple(sorted(lengths.items())))(x)
    assert torch.equal(got, want)
    assert got.shape == want.shape and got.stride() == want.stride()
    shares = got.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    assert shares == (want.untyped_storage().data_ptr() == x.untyped_storage().data_ptr())


def test_diffsynth_packed_heads_never_reach_rearrange(monkeypatch):
    import diffsynth_attention.callsite as callsite

    monkeypatch.setattr(callsite, "rearrange", None)  # a call would raise TypeError
    x = torch.randn(2, 16, 4 * 8)
    canon = _converter("b s (n d)", "b n s d", (("n", 4),))(x)
    assert canon.shape == (2, 4, 16, 8) and canon.data_ptr() == x.data_ptr()
    back = _converter("b n s d", "b s (n d)", (("n", 4),))(canon)
    assert torch.equal(back, x)
