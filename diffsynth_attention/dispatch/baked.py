"""What Dynamo traces for ``attention_forward``: the decision taken while Dynamo traces, written
into the graph as the operator's arguments.

Dynamo records one operator, ``diffsynth_attention::attention`` (:mod:`.compiled`). Where the
sizes are concrete, :func:`bake` runs while Dynamo traces (``torch.compiler.assume_constant_result``:
Dynamo calls it with the call's sizes, strides, dtypes and devices, and writes its result into
the graph as a constant). It resolves the call with the same rule as an eager call
(:meth:`Dispatcher.trace_plan`) and returns the decision's identity, a string
``backend|source|key id|decision digest|tolerance``: the operator's ``decision`` argument. The
operator decomposes into that backend, and nothing else, so:

- the graph Dynamo hands to AOTAutograd and inductor names the decision: their FX/AOT caches key
  on it. A decision changed by any route (the variable, ``use_backend``, ``clear_cache`` and a
  new tuning, the tolerance) followed by ``torch.compiler.reset()`` traces a different graph, so a
  recompile runs the new decision, with the caches on;
- nothing per process is in the graph (the dispatcher is named by its token, 0 for the default
  one in every process: :mod:`.tokens`), so a second process compiling against the same
  decisions hits both caches.

With symbolic sequence lengths, :func:`bake_bucket` bakes the backend that every stored decision
of the traced lengths' neighbour bucket agrees on (or, where their picks differ, one within
``BUCKET_SLACK`` of each length's own: :func:`bucket_backend`), behind size comparisons Dynamo
turns into guards on the bucket (:func:`_within`); the run-time operator stays where nothing is
known.

The innermost ``use_backend`` is guarded per thread and per task: ``trace_state.TRACE.scope`` is a
property that reads the calling context's scope, and Dynamo evaluates the guard in the thread
that calls the compiled code. A scope opened inside the compiled function exists only in the
trace (``trace_state.TRACE.inner``); the graph carries it as the ``backend`` argument.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from typing import Optional

import torch

from ..callsite import dynamo_tracing as _dynamo_tracing
from ..callsite import needs_grad
from ..overrides import implementation_raw
from ..trace_state import traced_scopes
from ..backends import REGISTRY
from ..problem import check_flag
from ..request import FLOAT_MAX, Request, dims_length, scalar_scale, scale_number
from .buckets import bucket_backend
from .compiled import attention_op
from .tokens import lookup_dispatcher


def _dynamo_handles(name: str):
    """``torch.fx.experimental.symbolic_shapes.<name>`` where Dynamo evaluates it while tracing
    (it has a handler for it), else None."""
    try:
        from torch._dynamo.variables.torch import TorchInGraphFunctionVariable
        from torch.fx.experimental import symbolic_shapes

        fn = getattr(symbolic_shapes, name, None)
        return fn if fn is not None and fn in TorchInGraphFunctionVariable._get_handlers() else None
    except Exception:  # noqa: BLE001 - another torch's internals
        return None


# has_static_value: False for a size Dynamo made symbolic (isinstance and type() see an int there).
# guarding_hint_or_throw: the value a symbolic size has in the call being traced, as a constant.
# Where a torch lacks either, every size counts as symbolic, or symbolic sizes dispatch at run time.
# torch 2.11 (the GPU machine's) has no handler for guarding_hint_or_throw; its Dynamo evaluates
# size_hint instead (the same value for a size the call has: the observed one). Without that
# fallback every symbolic trace there kept the run-time operator (H100, Wan's 6-resolution loop).
_static_value = _dynamo_handles("has_static_value") or (lambda s: False)
_hint = _dynamo_handles("guarding_hint_or_throw") or _dynamo_handles("size_hint")
# torch 2.5's Dynamo has neither has_static_value nor a hint handler: no decision can be baked,
# and every compiled call runs the run-time operator (correct, with a plan lookup per call). Said
# once, when the first trace imports this module, rather than lost silently (docs/compile.md).
BAKES = _dynamo_handles("has_static_value") is not None
if not BAKES:
    logging.getLogger("diffsynth_attention").warning(
        "torch %s: its Dynamo cannot tell a static size from a symbolic one (no has_static_value), so compiled "
        "attention_forward calls dispatch at run time (diffsynth_attention::dispatch) instead of baking the decision "
        "into the graph (torch 2.11 and 2.13 bake it)", torch.__version__)
_grad_enabled = torch.is_grad_enabled  # one guard node fewer than torch.is_grad_enabled
# torch.export (strict and non-strict): its program serves every size its dynamic_shapes allow, so
# no bucket is baked there (the bucket's guards narrow the range, and export refuses them)


@torch.compiler.assume_constant_result
def _exporting() -> bool:
    """Whether torch.export is tracing, read in Python at trace time: torch 2.11's Dynamo folds a
    traced ``torch.compiler.is_exporting()`` to True under every ``torch.compile`` (2.13 reads the
    flag), which kept the run-time operator in every symbolic-length graph there (H100, s10)."""
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    if flag is None:  # a torch without the flag: its own function, called outside Dynamo
        return bool(getattr(torch.compiler, "is_exporting", lambda: False)())
    return bool(flag)


def _hinted(t) -> tuple:
    """What :func:`bake` needs of a tensor (sizes, strides, dtype, device, ``requires_grad``), for
    a tensor with symbolic sizes: each symbolic size or stride as minus the
    value it has in the call being traced."""
    return (tuple(s if _static_value(s) else -_hint(s) for s in t.shape),
            tuple(s if _static_value(s) else -_hint(s) for s in t.stride()), t.dtype, t.device, t.requires_grad)


def _stand_in(meta, mode):
    """A fake tensor of ``meta``'s shape, strides (their absolute values), dtype, device and ``requires_grad``."""
    if meta is None:
        return None
    shape, stride, dtype, device, requires_grad = meta
    with mode:
        t = torch.empty_strided(tuple(abs(n) for n in shape), tuple(abs(n) for n in stride), dtype=dtype, device=device)
    return t.requires_grad_(True) if requires_grad else t


def identity(plan, tolerance: float, backend: Optional[str] = None) -> str:
    """The decision a plan serves, as the graph carries it: its backend (or ``backend``, a bucket's:
    :func:`bucket_backend`), where the choice came from, the key, a digest of the decision (any new
    tuning changes it) and the tolerance."""
    digest = ""
    if plan.decision is not None:
        blob = json.dumps(plan.decision.to_dict(), sort_keys=True, default=str)
        digest = plan.decision.key_id + ":" + hashlib.sha256(blob.encode()).hexdigest()[:16]
    return f"{backend or plan.backend}|{plan.source}|{plan.key.id}|{digest}|{tolerance!r}"


def _compile_mode() -> str:
    """The mode the graph Dynamo is tracing will run in: ``cudagraph`` where its backend captures
    CUDA graphs (``mode="reduce-overhead"``, or inductor's ``triton.cudagraphs`` set), else
    ``compiled``. Read from Dynamo's backend: inductor applies the mode's options only later."""
    import sys

    from ..store.decision import COMPILED, CUDAGRAPH

    inductor = sys.modules.get("torch._inductor.config")
    if inductor is not None and getattr(getattr(inductor, "triton", None), "cudagraphs", False):
        return CUDAGRAPH
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        fn = InstructionTranslator.current_tx().output.compiler_fn
    except Exception:  # noqa: BLE001 - another torch's internals: the compiled price
        return COMPILED
    for _ in range(8):  # through Dynamo's wrappers to torch.compile's inductor wrapper
        options = getattr(fn, "config", None)
        if isinstance(options, dict) and options.get("triton.cudagraphs"):
            return CUDAGRAPH
        inner = getattr(fn, "_torchdynamo_orig_backend", None) or getattr(fn, "compiler_fn", None)
        if inner is None or inner is fn:
            break
        fn = inner
    return COMPILED


def _plan(token, q, k, v, mask, patterns, dims, scale, is_causal, window_size, compatibility_mode, grad_enabled, backend):
    """The dispatcher and its :meth:`Dispatcher.trace_plan` for a call of these metas (fake tensors)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .compiled import Scope, dims_dict

    d = lookup_dispatcher(token)
    # outside the tracer's own modes (torch.export's non-strict trace, make_fx): the stand-ins and a
    # tuning's real calls are this library's, never recorded into the traced graph
    with _outside_modes():
        mode = FakeTensorMode()
        qf, kf, vf, mf = (_stand_in(m, mode) for m in (q, k, v, mask))
        req = Request(qf, kf, vf, *patterns, dims_dict(dims), mf, scale, is_causal, compatibility_mode, window_size)
        grad = grad_enabled and (q[4] or k[4] or v[4] or mask is not None and mask[4])  # as eager's (callsite.needs_grad)
        with Scope(backend):
            return d, d.trace_plan(req, grad, _compile_mode())


def _outside_modes():
    """A context with the current dispatch modes (a tracer's fake and proxy modes) set aside."""
    try:
        from torch.utils._python_dispatch import _disable_current_modes
    except ImportError:  # pragma: no cover - a torch without it
        return contextlib.nullcontext()
    return _disable_current_modes()


# The errors a call's validation raises (BackendNotSupportedError is a ValueError: a strict use_backend).
_REFUSALS = {e.__name__: e for e in (ValueError, TypeError)}


def _refused(plan_call):
    """``plan_call()``, or where the call is refused (validation raising while Dynamo traces a
    bake), ``"!<error type>|<message>"``: the traced code raises it (:func:`traced_attention`). An
    exception escaping a bake reaches the caller as Dynamo's ``InternalTorchDynamoError``, where
    the eager call raises a ValueError or a TypeError; raised by the traced code, it is the eager
    error itself (the frame runs eagerly), or under ``fullgraph=True`` Dynamo's error with its message."""
    try:
        return plan_call()
    except tuple(_REFUSALS.values()) as exc:
        name = next(c.__name__ for c in type(exc).__mro__ if c.__name__ in _REFUSALS)
        return f"!{name}|{exc}"


@torch.compiler.assume_constant_result
def bake(token: int, q, k, v, mask, q_pattern: str, k_pattern: str, v_pattern: str, out_pattern: str, dims: Optional[str],
         scale: Optional[float], is_causal: bool, window_size: Optional[int], compatibility_mode: bool, grad_enabled: bool,
         backend: Optional[str], epoch: str = "0", quality: Optional[str] = None) -> Optional[str]:
    """The identity of the decision a call with these sizes gets (:func:`identity`), taken while
    Dynamo traces, in the thread that compiles; None where the graph dispatches at run time (a
    masked call whose key has no decision yet: its mask values matter for tuning; a low-precision
    quality tier, gated on the first real call's own data). ``epoch`` and ``quality`` (the calling
    context's quality scope) are arguments so that Dynamo guards on them (the trace reads the tier itself)."""
    got = _refused(lambda: _plan(token, q, k, v, mask, (q_pattern, k_pattern, v_pattern, out_pattern), dims, scale,
                                 is_causal, window_size, compatibility_mode, grad_enabled, backend))
    if isinstance(got, str):
        return got
    d, plan = got
    from ..states import PlanSource

    if plan is None or plan.source == PlanSource.LOADING:  # a stand-in for a package loading past its deadline
        return None
    return identity(plan, d.tolerance(plan.problem))


def _seq_dim(pattern: str) -> Optional[int]:
    """The dimension of a tensor in ``pattern`` that is the sequence axis alone (None if packed)."""
    tokens, depth, current = [], 0, ""
    for ch in pattern:
        if ch == " " and depth == 0:
            if current:
                tokens.append(current)
            current = ""
            continue
        depth += ch == "("
        depth -= ch == ")"
        current += ch
    tokens.append(current)
    return tokens.index("s") if "s" in tokens else None


def _frame_compiles() -> int:
    """How many times Dynamo has compiled the frame being traced (0 for its first graph)."""
    compile_id = torch._guards.CompileContext.current_compile_id()
    return 0 if compile_id is None else int(getattr(compile_id, "frame_compile_id", 0) or 0)


def _recompile_limit() -> int:
    config = torch._dynamo.config
    return int(getattr(config, "recompile_limit", None) or getattr(config, "cache_size_limit", 8))


@torch.compiler.assume_constant_result
def bake_bucket(token: int, q, k, v, q_pattern: str, k_pattern: str, v_pattern: str, out_pattern: str, dims: Optional[str],
                scale: Optional[float], is_causal: bool, compatibility_mode: bool, grad_enabled: bool,
                backend: Optional[str], epoch: str = "0", quality: Optional[str] = None) -> Optional[tuple]:
    """For a call whose sequence lengths are symbolic (metas from :func:`_hinted`): ``(identity,
    checks)`` where one backend serves every length of the bucket the traced lengths fall in (a
    forced backend; else the traced lengths' own decision, tuned now if need be, and every stored
    decision of that bucket agree), else None (the run-time operator). ``checks``: the size
    comparisons that keep the graph to that bucket (``("range", tensor, dim, lo, hi)``, and
    ``("same", tensor, dim, tensor, dim, equal)`` for whether seq_q == seq_kv), which Dynamo turns
    into guards. None too where a symbolic size is not a sequence length, and where the frame
    has used all but one of Dynamo's recompiles (the last graph serves every length)."""
    from ..states import PlanSource
    from ..store.neighbours import bucket_bounds, neighbour_distance, neighbour_group, seq_bucket

    if _frame_compiles() >= _recompile_limit() - 2:
        return None
    metas, patterns = (q, k, v), (q_pattern, k_pattern, v_pattern)
    symbolic = [(ti, di) for ti, m in enumerate(metas) for di, n in enumerate(m[0]) if n < 0]
    if any(di != _seq_dim(patterns[ti]) for ti, di in symbolic):  # a batch, head or head-dim size: run time
        return None
    got = _refused(lambda: _plan(token, q, k, v, None, patterns + (out_pattern,), dims, scale, is_causal, None,
                                 compatibility_mode, grad_enabled, backend))
    if isinstance(got, str):
        return got, ()
    d, plan = got
    if plan is None or plan.source in (PlanSource.FALLBACK, PlanSource.LOADING):  # nothing known for it
        return None
    tolerance = d.tolerance(plan.problem)
    if plan.source == PlanSource.OVERRIDE:  # forced: the same backend for every length
        return identity(plan, tolerance), ()
    fields = plan.key.fields
    bucket = [plan.decision] if plan.decision is not None else []
    for other in d.store.neighbours(neighbour_group(fields), tolerance):
        try:
            same_bucket = neighbour_distance(fields, other.key) is not None
        except (KeyError, TypeError, ValueError, ZeroDivisionError):  # a foreign entry
            continue
        if same_bucket and other.key_id != plan.key.id:
            bucket.append(other)
    mode = _compile_mode()
    name = bucket_backend(bucket, mode) if bucket else plan.backend
    if name is None or name != plan.backend and REGISTRY[name].unavailable_reason() is not None:
        return None  # the bucket has no backend near every length's own pick: the run-time operator
    checks = tuple(("range", ti, di) + bucket_bounds(seq_bucket(-metas[ti][0][di])) for ti, di in symbolic)
    bounds = ",".join(f"{lo}-{hi}" for *_, lo, hi in checks)
    q_dim, k_dim = _seq_dim(q_pattern), _seq_dim(k_pattern)
    if q_dim is not None and k_dim is not None:  # causal and window alignment depend on it
        checks += (("same", 0, q_dim, 1, k_dim, plan.problem.seq_q == plan.problem.seq_kv),)
    return identity(plan, tolerance, name) + "|" + bounds, checks


def _within(tensors, checks) -> bool:
    """Traced by Dynamo: each comparison becomes a guard (they all hold for the traced sizes)."""
    ok = True
    for c in checks:
        if c[0] == "range":
            n = tensors[c[1]].shape[c[2]]
            if n < c[3]:
                ok = False
            if n > c[4]:
                ok = False
        else:
            a, b = tensors[c[1]].shape[c[2]], tensors[c[3]].shape[c[4]]
            if c[5]:
                if a != b:
                    ok = False
            elif a == b:
                ok = False
    return ok


@torch.compiler.disable
def _served_eagerly(d, q, k, v, q_pattern, k_pattern, v_pattern, out_pattern, dims, attn_mask, scale, is_causal,
                    compatibility_mode, window_size):
    """The eager call, where Dynamo gave :func:`traced_attention`'s frame up and runs it for real (a
    graph break in its loops: a NumPy ``dims`` length narrower than int64). Dynamo's frame callback
    is still on there, so without ``disable`` it compiled every frame the planning and tuning
    reached, and timed candidates through those fragments (25 graphs, 7.5 s of tuning on the CPU)."""
    req = Request(q, k, v, q_pattern, k_pattern, v_pattern, out_pattern, dims, attn_mask, scale, is_causal,
                  compatibility_mode, window_size)
    return d.call(req, implementation_raw(), needs_grad(q, k, v, attn_mask))


def _numpy_kind(n) -> str:
    """A NumPy scalar as a trace can name it, by its ``.item()``'s type: torch 2.11's Dynamo reads
    a ``np.bool_``'s ``.item()`` as a data-dependent symbol, which no text can hold (formatting it
    raised Dynamo's data-dependent error in place of this module's own)."""
    kind = n.item()
    if isinstance(kind, (bool, torch.SymBool)):
        return "a NumPy bool"
    if isinstance(kind, (float, torch.SymFloat)):
        return "a NumPy float"
    return "a NumPy scalar"


def traced_attention(d, q, k, v, q_pattern, k_pattern, v_pattern, out_pattern, dims, attn_mask, scale, is_causal,
                     compatibility_mode, window_size):
    """What Dynamo traces for ``attention_forward``: one operator call, its decision baked in
    where the sizes are concrete.

    Dynamo guards what this reads, on every call of the compiled code, so it reads little: the
    common call's helpers are inlined (each function called is a guard on its code), the booleans
    are tested with ``is`` before ``bool()`` (a guard on the builtin), and both scopes come through
    one object (:func:`traced_scopes`). tests/dispatch/test_compile_trace_reads.py lists what is guarded."""
    # run for real on real tensors, not traced (Dynamo folds the first test to True while it traces)
    if not _dynamo_tracing() and type(q) is torch.Tensor and not _exporting():
        return _served_eagerly(d, q, k, v, q_pattern, k_pattern, v_pattern, out_pattern, dims, attn_mask, scale,
                               is_causal, compatibility_mode, window_size)
    # int(n): a head count Dynamo made symbolic (an int argument under dynamic=True) is specialized;
    # a length that is no int (or NumPy integer: dims_length, eager's rule) is refused as eager refuses
    # it (problem._dims_tuple), before the text (parsed back with int()) could take "2" as 2
    if dims is not None and isinstance(dims, dict):  # `is not None` first: the common call guards no builtin
        lengths = {}
        for a, n in dims.items():
            lengths[a] = dims_length(n)
            if lengths[a] is None:  # a NumPy value by its kind: a trace can print neither it nor its .item()
                raise ValueError(f"dims[{a!r}]={_numpy_kind(n) if type(n).__module__ == 'numpy' else repr(n)} must be a positive int")
            # isinstance first: torch 2.5's Dynamo cannot compare an int's type().__module__
            if not isinstance(n, int) and type(n).__module__ == "numpy" and n.itemsize != 8:
                # Dynamo (2.13) takes an int64 NumPy scalar's value as a size it specializes, but reads
                # a narrower one (int32, uint8...) as data the text cannot hold (str.join refuses it):
                # a graph break (eager serves it); under fullgraph an error that says so
                torch._dynamo.graph_break()
        dims = lengths
    dims_text = None if dims is None else ",".join(f"{a}={int(n)}" for a, n in dims.items())
    if scale is not None:  # validated as eager validates it (problem.prepare) before float() could accept it
        # Dynamo traces a NumPy scalar (1 / np.sqrt(d) is a np.float64) as a 0-d ndarray whose
        # dtype it cannot read: a number by float(), as plain SDPA's compile takes it, and its kind
        # by .item()'s type (after float(), which would read the .item() value), so that a np.bool_
        # is refused as eager refuses it (request.scale_number); a NumPy complex fails in .item()
        if isinstance(scale, torch.Tensor):  # its value, as plain SDPA's compile reads it: data-dependent (a
            scale = scalar_scale(scale)  # graph break; refused under fullgraph), eager then converts it
        numpy = not isinstance(scale, (int, float)) and type(scale).__module__ == "numpy"  # isinstance first: as above
        if isinstance(scale, bool) or not (numpy or scale_number(scale)):
            raise TypeError(f"scale must be a number or None, got {type(scale).__name__}")
        if numpy:
            scale, kind = float(scale), type(scale.item())
            if kind is bool:
                raise TypeError("scale must be a number or None, got bool")
        # a symbolic scale (Dynamo makes a float argument symbolic once it changes; dynamic=True any
        # number) is specialized, as plain SDPA's compile does: the bake takes constants
        if not _static_value(scale):
            scale = float(scale).__float__()
        if not -FLOAT_MAX <= scale <= FLOAT_MAX:  # NaN, an infinity, an int beyond any float (10**400)
            raise ValueError(f"scale={scale!r} must be a finite number")
        scale = float(scale)
    # validated as eager validates it; a symbolic bool (dynamic=True) becomes a constant behind a guard
    if is_causal is not False and is_causal is not True:
        is_causal = True if check_flag(is_causal, "is_causal") else False
    if compatibility_mode is not False and compatibility_mode is not True:
        compatibility_mode = True if check_flag(compatibility_mode, "compatibility_mode") else False
    token = int(d.trace_key)  # a constant: dynamic=True makes an int attribute symbolic, never a str
    backend, quality = traced_scopes()  # read here so Dynamo guards on the calling context's scopes
    epoch = d.regate_epoch  # an argument of the bakes, so Dynamo guards on it (dispatch/regate.py)
    decision = None
    static = True  # every size and stride concrete (has_static_value; inlined, as below)
    for t in (q, k, v, attn_mask):
        if t is not None:
            for n in t.shape:
                if not _static_value(n):
                    static = False
            for n in t.stride():
                if not _static_value(n):
                    static = False
    if static:  # what bake needs of each tensor: sizes, strides, dtype, device, requires_grad (a torch.Size is a tuple)
        decision = bake(token, (q.shape, q.stride(), q.dtype, q.device, q.requires_grad),
                        (k.shape, k.stride(), k.dtype, k.device, k.requires_grad),
                        (v.shape, v.stride(), v.dtype, v.device, v.requires_grad),
                        None if attn_mask is None else (attn_mask.shape, attn_mask.stride(), attn_mask.dtype,
                                                        attn_mask.device, attn_mask.requires_grad),
                        q_pattern, k_pattern, v_pattern, out_pattern, dims_text, scale, is_causal, window_size,
                        compatibility_mode, _grad_enabled(), backend, epoch, quality)
    elif _hint is not None and attn_mask is None and window_size is None and not _exporting():  # symbolic lengths: per bucket
        got = bake_bucket(token, _hinted(q), _hinted(k), _hinted(v), q_pattern, k_pattern, v_pattern, out_pattern,
                          dims_text, scale, is_causal, compatibility_mode, _grad_enabled(), backend, epoch,
                          quality)
        if got is not None and _within((q, k, v), got[1]):
            decision = got[0]
    if decision is not None and decision[0] == "!":  # refused: the eager call's own error (_refused)
        name, _, message = decision[1:].partition("|")
        raise _REFUSALS[name](message)
    return attention_op(q, k, v, q_pattern, k_pattern, v_pattern, out_pattern, dims_text, attn_mask, scale, is_causal,
                        window_size, compatibility_mode, token, backend, decision)
