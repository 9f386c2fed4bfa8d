"""What the trace of ``attention_forward`` reads (CPU): Dynamo guards each read on every call of the
compiled code, so the trace reads little (dispatch/baked.py), yet every scope and argument that
changes the call is still read, guarded and validated as an eager call validates it."""
import sys
from pathlib import Path

import pytest
import torch

import diffsynth_attention as da

from support.compile_helpers import Recorder, fresh_dynamo, require, requires_bake  # noqa: F401  (an autouse fixture)
from support.helpers import full_reference, qkv, rel

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from harness.guards import guard_sources  # noqa: E402

BSND = ("b s n d",) * 4


def bsnd(b=2, hq=4, s=32, d=16, seed=0):
    q, k, v = qkv(b=b, hq=hq, sq=s, d=d, seed=seed)
    return tuple(t.transpose(1, 2).contiguous() for t in (q, k, v)), (q, k, v)


class Attn(torch.nn.Module):
    def forward(self, q, k, v):
        return da.attention_forward(q, k, v, *BSND)


def test_a_graph_that_opens_use_backend_inside_still_guards_the_quality_scope(monkeypatch):
    """The trace of a ``use_backend`` block sets a scope while it bakes, so a trace that read the
    ``used`` flag as False would leave a guard on True behind and never read the quality scope: a
    later ``quality(...)`` around the call must still trace again."""
    require("contextmanager")
    from diffsynth_attention import trace_state

    monkeypatch.setattr(trace_state.TRACE, "used", False)

    class Inner(torch.nn.Module):
        def forward(self, q, k, v):
            with da.use_backend("torch_math"):
                return da.attention_forward(q, k, v, *BSND)

    (q, k, v), _ = bsnd()
    rec = Recorder()
    model = torch.compile(Inner(), fullgraph=True, backend=rec)
    with torch.no_grad():
        model(q, k, v)
        assert rec.compiles == 1
        with da.quality("fast"):
            model(q, k, v)
        assert rec.compiles == 2
        model(q, k, v)
        assert rec.compiles == 2 and rec.runs == 3


def test_a_symbolic_bool_is_causal_compiles_with_fullgraph_and_dynamic_shapes():
    """Under dynamic=True, ``is_causal=q.shape[1] > 16`` is a symbolic bool: the trace takes its
    value behind a guard (validation must not read it as a non-bool)."""
    fn = torch.compile(lambda a, b, c: da.attention_forward(a, b, c, *BSND, is_causal=a.shape[1] > 16), fullgraph=True,
                       dynamic=True)
    with torch.no_grad():
        for s in (32, 8, 40):
            (q, k, v), canon = bsnd(s=s)
            ref = full_reference(*canon, causal=s > 16).transpose(1, 2)
            assert rel(fn(q, k, v), ref) < 1e-5


@pytest.mark.parametrize("fullgraph", [False, True])
@pytest.mark.parametrize("bad", ["x", 2.0, torch.tensor(True)])
def test_a_compiled_call_rejects_the_is_causal_an_eager_call_rejects(bad, fullgraph):
    """Before: the trace turned any value into bool(value), so is_causal="x" ran causal attention."""
    if fullgraph:
        require("messages")
    (q, k, v), _ = bsnd()
    fn = torch.compile(lambda a, b, c: da.attention_forward(a, b, c, *BSND, is_causal=bad), fullgraph=fullgraph)
    with pytest.raises(Exception, match="is_causal must be a bool"):
        fn(q, k, v)


def test_a_graph_that_calls_before_its_inner_use_backend_still_guards_the_quality_scope(monkeypatch):
    """As above, with a call ahead of the block in the same graph: that call's trace reads the
    flag before the block sets it."""
    require("contextmanager")
    from diffsynth_attention import trace_state

    monkeypatch.setattr(trace_state.TRACE, "used", False)

    class Before(torch.nn.Module):
        def forward(self, q, k, v):
            a = da.attention_forward(q, k, v, *BSND)
            with da.use_backend("torch_math"):
                return a + da.attention_forward(q, k, v, *BSND)

    (q, k, v), _ = bsnd()
    rec = Recorder()
    model = torch.compile(Before(), fullgraph=True, backend=rec)
    with torch.no_grad():
        model(q, k, v)
        with da.quality("fast"):
            model(q, k, v)
    assert rec.compiles == 2


def test_a_compiled_call_guards_only_what_the_trace_must_read():
    """Dynamo checks every guard on every call of the compiled code (~30 ns each on the CPU), so
    the traced path reads little: both scopes through one object, no helper whose code is
    guarded where it can be inlined, no builtin bool() or tuple() on the common call."""
    (q, k, v), _ = bsnd()
    model = Attn()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        compiled(q, k, v)
    sources = guard_sources(model)
    if not sources:
        pytest.skip("this torch exposes no guard tree")
    ours = [s for s in sources if not s.startswith("L[")]
    assert any("trace_state" in s for s in ours)  # the scopes are read, and guarded ...
    for name in ("tiers", "overrides", "['bool']", "['tuple']", "['isinstance']", "['dict']", "_meta", "_static.", "trace_scope"):
        assert not any(name in s for s in ours), (name, ours)  # ... through one object, and nothing of these
    # of attention_forward's closure, only the dispatcher (its trace key and re-gate epoch) and the
    # Dynamo test, whose call folds to True: nothing the rest of that test reads
    require("lazy_closure")
    assert len([s for s in ours if s.endswith("cell_contents")]) <= 2, ours


@pytest.mark.parametrize("dynamic,scales", [(None, (0.3, 0.5, 0.7)), (True, (0.3, 0.5)), (True, (2, 3))])
def test_a_scale_that_changes_between_calls_compiles_with_fullgraph(dynamic, scales):
    """A scale passed as an argument: Dynamo makes a float symbolic once its value changes (and
    dynamic=True makes any number symbolic). Before the fix the trace handed the symbolic scale to
    the bake, which takes constants: Unsupported under fullgraph, graph breaks without it."""
    if dynamic and isinstance(scales[0], int):  # a symbolic int: made a float, then a constant
        require("specialize")
    q, k, v = qkv(b=1, hq=2, sq=16)
    rec = Recorder()
    f = torch.compile(lambda q, k, v, s: da.attention_forward(q, k, v, scale=s), fullgraph=True, backend=rec,
                      dynamic=dynamic)
    with torch.no_grad():
        for s in scales:
            assert rel(f(q, k, v, s), full_reference(q, k, v, scale=s)) < 1e-5
    assert rec.runs == len(scales)


@pytest.mark.parametrize("bad,says,fullgraph", [
    (True, "scale must be a number or None, got bool", False), (True, "scale must be a number or None, got bool", True),
    ("0.5", "scale must be a number or None, got str", False), ("0.5", "scale must be a number or None, got str", True),
    (10 ** 400, "must be a finite number", True)], ids=["bool", "bool-fullgraph", "str", "str-fullgraph", "huge-fullgraph"])
def test_a_compiled_call_rejects_the_scale_an_eager_call_rejects(bad, says, fullgraph):
    """Before: the trace took float(scale) before validating it, so scale=True ran with 1.0 and
    scale="0.5" with 0.5 where eager raises, and 10**400 failed the trace with an OverflowError.
    (Without fullgraph, 10**400 still does: Dynamo traces the eager validation, whose float() it
    cannot catch.)"""
    if fullgraph:
        require("messages")
    (q, k, v), _ = bsnd()
    with pytest.raises(Exception, match=says):
        da.attention_forward(q, k, v, *BSND, scale=bad)
    fn = torch.compile(lambda a, b, c: da.attention_forward(a, b, c, *BSND, scale=bad), fullgraph=fullgraph)
    with pytest.raises(Exception, match=says):
        fn(q, k, v)


@pytest.mark.parametrize("length", [2.0, "2", True], ids=["float", "str", "bool"])
def test_a_compiled_call_rejects_the_dims_an_eager_call_rejects(length):
    """Before: the trace wrote dims into the operator's text as they came and parsed that text
    back before validating, so dims={"n": "2"} ran as 2 where eager raises, and 2.0 failed with
    int()'s own message, which names no argument."""
    require("messages")
    (q, k, v), _ = bsnd()
    pattern = ("b s (n d)",) * 4
    q, k, v = (t.flatten(2) for t in (q, k, v))
    says = rf"dims\['n'\]={length!r} must be a positive int"
    with pytest.raises(Exception, match=says):
        da.attention_forward(q, k, v, *pattern, dims={"n": length})
    fn = torch.compile(lambda a, b, c: da.attention_forward(a, b, c, *pattern, dims={"n": length}), fullgraph=True)
    with pytest.raises(Exception, match=says):
        fn(q, k, v)


@pytest.mark.parametrize("kind", ["float64", "float32", "float16", "int64", "sqrt"])
@pytest.mark.parametrize("fullgraph", [True, False], ids=["fullgraph", "graph-breaks"])
def test_a_numpy_scale_compiles_where_plain_sdpa_compiles_it(kind, fullgraph):
    """``scale=1 / np.sqrt(d)`` is a np.float64, which Dynamo traces as a NumPy scalar, not a
    float. Before the fix the trace refused every NumPy scale (``isinstance(scale, (int, float))``
    is False there), so that common call failed under ``fullgraph=True`` where plain SDPA's compile
    takes it. Now each NumPy scale compiles, or fails, as plain SDPA's does, with its value."""
    if fullgraph:
        require("type_module")
    np = pytest.importorskip("numpy")
    scale = np.float64(16) ** -0.5 if kind == "sqrt" else getattr(np, kind)(0.25 if kind != "int64" else 1)
    q, k, v = qkv(b=1, hq=2, sq=16)
    want = full_reference(q, k, v, scale=float(scale))

    def outcome(fn):
        torch._dynamo.reset()
        try:
            return torch.compile(fn, fullgraph=fullgraph)(q, k, v)
        except Exception as exc:  # noqa: BLE001  (the outcome compared is "it raised")
            return type(exc)

    sdpa = outcome(lambda a, b, c: torch.nn.functional.scaled_dot_product_attention(a, b, c, scale=scale))
    auto = outcome(lambda a, b, c: da.attention_forward(a, b, c, scale=scale))
    assert isinstance(auto, torch.Tensor) == isinstance(sdpa, torch.Tensor), (auto, sdpa)
    if isinstance(auto, torch.Tensor):
        assert rel(auto, want) < 1e-5
    if kind in ("float64", "sqrt"):  # the common case compiles whole
        assert isinstance(auto, torch.Tensor)


@pytest.mark.parametrize("fullgraph", [True, False], ids=["fullgraph", "graph-breaks"])
def test_a_compiled_call_refuses_a_numpy_bool_scale_as_eager_does(fullgraph):
    """Before: the trace took every NumPy scale by ``float()``, so ``scale=np.True_`` ran as 1.0
    where the eager call raises a TypeError naming scale (and under fullgraph failed in sympy
    with an AssertionError). Now the trace reads the scalar's kind and refuses it: the eager
    error where the frame runs eagerly, Dynamo's error carrying it under fullgraph."""
    require("numpy_bool")
    np = pytest.importorskip("numpy")
    q, k, v = qkv(b=1, hq=2, sq=16)
    with pytest.raises(TypeError, match="scale must be a number or None, got bool"):
        da.attention_forward(q, k, v, scale=np.True_)
    torch._dynamo.reset()
    fn = torch.compile(lambda a, b, c: da.attention_forward(a, b, c, scale=np.True_), fullgraph=fullgraph)
    with pytest.raises(TypeError if not fullgraph else Exception) as got:
        fn(q, k, v)
    assert not isinstance(got.value, AssertionError)
    if not fullgraph:
        assert "scale must be a number or None, got bool" in str(got.value)


def _refused_calls():
    (q, k, v), _ = bsnd(s=16, d=8)
    return {
        "head-dim": ((q, k[..., :4], v), {}, ValueError, "q and k must have the same head dim"),
        "batch": ((q, k[:1], v[:1]), {}, ValueError, "batch sizes differ"),
        "dtype": ((q, k, v.double()), {}, TypeError, "q, k and v must share a dtype"),
        "window": ((q, k, v), {"window_size": -3}, ValueError, "window_size=-3 must be"),
        "mask": ((q, k, v), {"attn_mask": torch.zeros(16, 3)}, ValueError, r"attn_mask of shape \(16, 3\)"),
    }


@pytest.mark.parametrize("sizes", ["static", "mark_dynamic"])
@pytest.mark.parametrize("case", list(_refused_calls()))
def test_a_compiled_call_raises_the_eager_calls_error_type(case, sizes):
    """Before: the trace's validation raised inside the bake (an ``assume_constant_result``), and
    Dynamo handed every such error on as ``InternalTorchDynamoError``, so ``except ValueError``
    around a compiled call missed what it catches around the eager one. Now the default compile
    raises the eager error itself, and ``fullgraph=True`` Dynamo's error with the same message."""
    if sizes == "static":
        requires_bake()  # validated in the bake: the run-time operator's fake raises TorchRuntimeError
    (q, k, v), kwargs, error, says = _refused_calls()[case]
    with pytest.raises(error, match=says):
        da.attention_forward(q, k, v, *BSND, **kwargs)
    if sizes == "mark_dynamic":  # symbolic lengths: the bucket's bake validates
        if "attn_mask" in kwargs or "window_size" in kwargs:
            pytest.skip("masked and windowed calls are baked on concrete sizes only")
        for t in (q, k, v):
            torch._dynamo.mark_dynamic(t, 1)
    for fullgraph in (False, True):
        torch._dynamo.reset()
        fn = torch.compile(lambda a, b, c: da.attention_forward(a, b, c, *BSND, **kwargs), fullgraph=fullgraph,
                           backend="eager")
        with pytest.raises(error if not fullgraph else Exception, match=says) as got:
            fn(q, k, v)
        assert "Internal" not in type(got.value).__name__


@pytest.mark.parametrize("passed", ["closure", "argument"])
@pytest.mark.parametrize("fullgraph", [True, False], ids=["fullgraph", "graph-breaks"])
def test_a_tensor_scale_compiles_where_plain_sdpa_compiles_it(passed, fullgraph):
    """A 0-dim tensor scale: plain SDPA's compile reads its value (data-dependent: refused under
    fullgraph, a graph break without). attention_forward's compile does the same, with its value."""
    scale = torch.tensor(0.25)
    q, k, v = qkv(b=1, hq=2, sq=16)
    want = full_reference(q, k, v, scale=0.25)

    def outcome(attend):
        torch._dynamo.reset()
        if passed == "closure":
            fn, args = (lambda a, b, c: attend(a, b, c, scale=scale)), (q, k, v)
        else:
            fn, args = (lambda a, b, c, s: attend(a, b, c, scale=s)), (q, k, v, scale)
        try:
            return torch.compile(fn, fullgraph=fullgraph)(*args)
        except Exception as exc:  # noqa: BLE001  (the outcome compared is "it raised")
            return type(exc)

    sdpa = outcome(torch.nn.functional.scaled_dot_product_attention)
    auto = outcome(da.attention_forward)
    assert isinstance(auto, torch.Tensor) == isinstance(sdpa, torch.Tensor), (auto, sdpa)
    if isinstance(auto, torch.Tensor):
        assert rel(auto, want) < 1e-5
    else:  # SDPA's own refusal (a data-dependent value), not a refusal of the scale
        assert auto is sdpa
    assert isinstance(auto, torch.Tensor) != fullgraph


@pytest.mark.parametrize("kind", ["int64", "intp", "int32", "uint8"])
@pytest.mark.parametrize("fullgraph", [True, False], ids=["fullgraph", "graph-breaks"])
def test_numpy_integer_dims_compile(kind, fullgraph):
    """``dims={"n": np.int64(2)}``, as einops takes it, compiles whole (a trace cannot read a NumPy
    scalar's ABCs or type name: the rule reads its module and ``.item()``). Dynamo reads a NumPy
    integer of another width as data, not a constant: a graph break (eager serves it), so under
    fullgraph an error."""
    if fullgraph:
        require("type_module")
    np = pytest.importorskip("numpy")
    (q, k, v), canon = bsnd(hq=2)
    pattern = ("b s (n d)",) * 4
    q, k, v = (t.flatten(2) for t in (q, k, v))
    n = getattr(np, kind)(2)
    fn = torch.compile(lambda a, b, c: da.attention_forward(a, b, c, *pattern, dims={"n": n}), fullgraph=fullgraph)
    with torch.no_grad():
        if fullgraph and kind in ("int32", "uint8"):
            with pytest.raises(Exception, match="graph_break"):
                fn(q, k, v)
            return
        out = fn(q, k, v)
    assert rel(out, full_reference(*canon).transpose(1, 2).flatten(2)) < 1e-5


def test_a_frame_dynamo_gives_up_is_served_eagerly_without_compiling_the_library():
    """A NumPy uint8 ``dims`` length breaks the graph inside the trace's loop, so Dynamo gives the
    trace's frame up and runs it for real, its frame callback still on. The call is then the eager
    call, and no frame of the library is compiled: before, Dynamo compiled 25 graphs of the planning
    and tuning (the reference, the synthetic inputs, the candidates' runs) and the tuning timed
    candidates through them."""
    np = pytest.importorskip("numpy")
    (q, k, v), canon = bsnd(hq=2)
    pattern = ("b s (n d)",) * 4
    q, k, v = (t.flatten(2) for t in (q, k, v))
    n = np.uint8(2)
    library = []

    def backend(gm, example_inputs):
        library.extend(str(nd.meta.get("stack_trace", "")).strip().splitlines()[-2:] for nd in gm.graph.nodes
                       if "diffsynth_attention" in str(nd.meta.get("stack_trace", "")))
        return gm.forward

    fn = torch.compile(lambda a, b, c: da.attention_forward(a, b, c, *pattern, dims={"n": n}), backend=backend)
    with torch.no_grad():
        out = fn(q, k, v)
    assert rel(out, full_reference(*canon).transpose(1, 2).flatten(2)) < 1e-5
    assert library == []
    assert da.stats()["tunings"] == 1


@pytest.mark.parametrize("bad", ["bool_", "float64"])
def test_a_compiled_call_rejects_numpy_dims_an_eager_call_rejects(bad):
    require("type_module")
    np = pytest.importorskip("numpy")
    (q, k, v), _ = bsnd(hq=2)
    pattern = ("b s (n d)",) * 4
    q, k, v = (t.flatten(2) for t in (q, k, v))
    n = np.bool_(True) if bad == "bool_" else np.float64(2.0)
    fn = torch.compile(lambda a, b, c: da.attention_forward(a, b, c, *pattern, dims={"n": n}), fullgraph=True)
    with pytest.raises(Exception, match=r"dims\['n'\]=.* must be a positive int"):
        fn(q, k, v)


@pytest.mark.parametrize("fullgraph", [True, False], ids=["fullgraph", "graph-breaks"])
@pytest.mark.parametrize("value", [True, False])
@pytest.mark.parametrize("axis", ["n", "d"])
def test_a_compiled_call_refuses_a_numpy_bool_dims_length_with_the_librarys_error(axis, value, fullgraph):
    """Before (torch 2.11): ``dims={"n": np.bool_(True)}`` under torch.compile raised Dynamo's
    data-dependent error ("Could not guard on data-dependent expression Eq(u0, 1)") from the
    library's own message, which formatted the scalar's ``.item()`` (a symbol there, which no
    text can hold). Now the message that names ``dims`` and its axis, as an eager call's, under
    both torch versions: the ValueError itself where the graph may break, Dynamo's report of it
    under fullgraph."""
    require("type_module")
    np = pytest.importorskip("numpy")
    (q, k, v), _ = bsnd(hq=2)
    pattern = ("b s (n d)",) * 4
    q, k, v = (t.flatten(2) for t in (q, k, v))
    n = np.bool_(value)
    fn = torch.compile(lambda a, b, c: da.attention_forward(a, b, c, *pattern, dims={axis: n}), fullgraph=fullgraph)
    with pytest.raises(Exception if fullgraph else ValueError, match=rf"dims\['{axis}'\]=.* must be a positive int") as got:
        fn(q, k, v)
    assert "data-dependent" not in str(got.value), got.value
    with pytest.raises(ValueError, match=rf"dims\['{axis}'\]=.* must be a positive int"):
        da.attention_forward(q, k, v, *pattern, dims={axis: n})
