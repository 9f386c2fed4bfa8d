"""The operators a compiled ``attention_forward`` records and decomposes into.

Dynamo records one operator, ``diffsynth_attention::attention``, with the caller's tensors and
patterns, the dispatcher's token, the innermost ``use_backend`` and the identity of the decision
taken while Dynamo traced (:mod:`.baked`; None where the sizes are symbolic or a masked key has
no decision). That operator is ``CompositeImplicitAutograd``: when the graph is traced for real
(AOTAutograd, with every compile mode and backend that lowers through it, inductor included) its
Python body runs on fake tensors and decomposes into what its arguments say:

- **a decision**: the backend it names, and nothing read anywhere else (so the compile caches,
  which key on the operator's arguments, key on the decision): ``F.scaled_dot_product_attention``
  or the ATen ``_scaled_dot_product_*_attention`` operator for the ``torch_*`` backends (with their
  own backward), or the thin operator ``diffsynth_attention::kernel`` for a kernel package, on
  views of the caller's tensors;
- **no decision**: the run-time operator ``diffsynth_attention::dispatch``, whose body is the eager
  hot path (a plan-table lookup and the bound backend: no validation, no key, no file I/O per
  call). Its output has the strides the fast kernels produce (``b s n d`` in memory, viewed in
  ``out_pattern``), so it copies nothing for them.

A graph never reads anything a later decision changes: a new decision for one key recompiles no
graph (there is no process-wide epoch). ``torch.compiler.reset()`` after a change traces again.

This module is imported when a trace first reaches ``attention_forward`` (or when the operators
are used), so eager programs never import ``torch._dynamo`` through it.
A low-precision quality tier (``DIFFSYNTH_ATTENTION_QUALITY``, ``quality()``) is served by the
run-time operator, whose first real call gates it on its own data (docs/quality.md).
"""

from __future__ import annotations

import functools
import json
from typing import Optional

import torch

from .. import overrides
from ..backends import REGISTRY, TORCH_FAMILY
from ..backends.torch_sdpa import causal_mask
from ..callsite import convert, is_compiling, needs_grad
from ..problem import CANONICAL, effective_window, mask_4d, prepare, readable_mask
from .tokens import lookup_dispatcher

_BSND = "b s n d"
_AXES = ("b", "n", "s", "d")

# --------------------------------------------------------------------------------------------
# Operators
# --------------------------------------------------------------------------------------------
_LIB = torch.library.Library("diffsynth_attention", "DEF")
_LIB.define("attention(Tensor q, Tensor k, Tensor v, str q_pattern, str k_pattern, str v_pattern, str out_pattern, str? dims, "
            "Tensor? attn_mask, float? scale, bool is_causal, int? window_size, bool compatibility_mode, int dispatcher, "
            "str? backend=None, str? decision=None) -> Tensor")
# The run-time operator takes its non-tensor arguments packed in one string, ``call`` (pack_call):
# each argument of a Python operator costs host time to box and unbox on every call.
_LIB.define("dispatch(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, float? scale, str call, int dispatcher) -> Tensor")
_KERNEL_ARGS = "(str backend, Tensor q, Tensor k, Tensor v, Tensor? attn_mask, float? scale, bool is_causal, int? window_size)"
_LIB.define("kernel" + _KERNEL_ARGS + " -> Tensor")
_LIB.define("kernel_lse" + _KERNEL_ARGS + " -> (Tensor, Tensor)")
_LIB.define("kernel_backward(str backend, Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? attn_mask, Tensor out, "
            "Tensor lse, float? scale, bool is_causal, int? window_size) -> (Tensor, Tensor, Tensor)")
_LIB.define("dispatch_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? attn_mask, float? scale, str call, "
            "int dispatcher) -> (Tensor, Tensor, Tensor)")


def pack_call(q_pattern: str, k_pattern: str, v_pattern: str, out_pattern: str, dims: Optional[str], is_causal: bool,
              window_size: Optional[int], compatibility_mode: bool, backend: Optional[str]) -> str:
    """The run-time operator's ``call`` argument: its non-tensor arguments as one JSON list (the
    same text in every process, so the compile caches key on it)."""
    return json.dumps([q_pattern, k_pattern, v_pattern, out_pattern, dims, is_causal, window_size, compatibility_mode, backend])


@functools.lru_cache(maxsize=1024)
def unpack_call(call: str) -> tuple:
    """``(q_pattern, k_pattern, v_pattern, out_pattern, dims, is_causal, window_size,
    compatibility_mode, backend)`` from :func:`pack_call`'s text."""
    return tuple(json.loads(call))


@functools.lru_cache(maxsize=256)
def _parse_dims(text: Optional[str]) -> Optional[tuple]:
    return None if text is None else tuple((a, int(n)) for a, n in (kv.split("=") for kv in text.split(",") if kv))


def dims_dict(text: Optional[str]) -> Optional[dict]:
    parsed = _parse_dims(text)
    return None if parsed is None else dict(parsed)


def _dims_for(pattern: str, dims: Optional[dict]) -> dict:
    if not dims:
        return {}
    names = pattern.replace("(", " ").replace(")", " ").split()
    return {a: n for a, n in dims.items() if a in names and a in _AXES}


def _to(x, pattern: str, target: str, dims):
    return convert(x, pattern, target, _dims_for(pattern if "(" in pattern else target, dims))


@functools.lru_cache(maxsize=256)
def _heads_vs_sequence(pattern: str) -> tuple:
    """Where a pattern puts heads against sequence: ``(True/False,)`` when fixed by packing,
    else the two axes whose strides tell."""
    groups = [g.split() for g in pattern.replace(")", "(").split("(")]
    axes = []
    for i, g in enumerate(groups):
        axes += [[a] for a in g] if i % 2 == 0 else [g]
    gn = next(i for i, g in enumerate(axes) if "n" in g)
    gs = next(i for i, g in enumerate(axes) if "s" in g)
    if gn == gs:
        return (axes[gn].index("n") > axes[gn].index("s"),)
    return gn, gs


def _heads_inner(q, q_pattern: str) -> bool:
    """Whether the query has heads inside sequence in memory (``b s n d``, as projections reshaped
    to heads give it, and as FlashAttention-style kernels write their output)."""
    return _heads_inner_at(q.stride(), q_pattern)


def _heads_inner_at(q_stride: tuple, q_pattern: str) -> bool:
    where = _heads_vs_sequence(q_pattern)
    if len(where) == 1:
        return where[0]
    return q_stride[where[0]] < q_stride[where[1]]


def _out_like(q, v, q_pattern, v_pattern, out_pattern, dims):
    """An empty output in ``out_pattern``, laid out in memory in the query's order (``b s n d`` or
    ``b n s d``): the order the kernels write for such a query, so the run-time operator copies
    nothing for them."""
    qc, vc = _to(q, q_pattern, CANONICAL, dims), _to(v, v_pattern, CANONICAL, dims)
    b, n, s, dv = qc.shape[0], qc.shape[1], qc.shape[2], vc.shape[3]
    heads_inner = _heads_inner(q, q_pattern)
    out = qc.new_empty((b, s, n, dv)).transpose(1, 2) if heads_inner else qc.new_empty((b, n, s, dv))
    return _to(out, CANONICAL, out_pattern, dims)


def _tracing(q) -> bool:
    """Whether the operator runs on fake/functional tensors (a trace), not on a real call.
    is_compiling() is process-wide on torch 2.13: a real call in another thread while one compiles
    takes the traced decomposition (the baked backend or the run-time operator: the same result)."""
    return type(q) is not torch.Tensor and not isinstance(q, torch.nn.Parameter) or is_compiling()


def _concrete(*tensors) -> bool:
    for t in tensors:
        if t is None:
            continue
        for s in t.shape:
            if type(s) is not int:
                return False
        for s in t.stride():
            if type(s) is not int:
                return False
    return True


class Scope:
    """The ``use_backend`` scope a graph was traced under (its ``backend`` argument), made the
    current one while the operator decides or runs: a scope opened inside the compiled function
    exists only in the trace (Dynamo traces no ContextVar), so the graph carries it."""

    __slots__ = ("backend", "token")

    def __init__(self, backend):
        self.backend = backend
        self.token = None

    def __enter__(self):
        if self.backend is not None and self.backend != overrides.scope_get():
            self.token = overrides.set_scope(self.backend)

    def __exit__(self, *exc):
        if self.token is not None:
            overrides.scope.reset(self.token)


def _attention_composite(q, k, v, q_pattern, k_pattern, v_pattern, out_pattern, dims, attn_mask, scale, is_causal,
                         window_size, compatibility_mode, dispatcher, backend=None, decision=None):
    """The decomposition: the backend ``decision`` names (taken while Dynamo traced: dispatch/baked.py),
    else the run-time operator."""
    dims_d = dims_dict(dims)
    if not _tracing(q):  # called eagerly, or by a graph compiled without AOTAutograd (backend="eager")
        with Scope(backend):
            return lookup_dispatcher(dispatcher).forward(q, k, v, q_pattern, k_pattern, v_pattern, out_pattern, dims_d,
                                                         attn_mask, scale, is_causal, compatibility_mode, window_size)
    grad = needs_grad(q, k, v)
    if decision is None:
        if _concrete(q, k, v, attn_mask):  # validation raises here, at trace time, naming the argument
            prepare(q, k, v, q_pattern, k_pattern, v_pattern, out_pattern, dims_d, attn_mask, scale, is_causal, window_size,
                    grad, compatibility_mode=compatibility_mode)
        if attn_mask is not None and torch.is_grad_enabled() and attn_mask.requires_grad:
            # A learned mask (its gradient needed): the run-time operator differentiates q, k and v
            # only, so the call decomposes into PyTorch's SDPA (a mask excludes windows), as eager's
            # torch backend runs it, with the mask's gradient.
            # With is_causal the top-left causal mask is folded in, as eager's torch_math serves it: SDPA
            # refuses a mask with is_causal where it picks its math kernel (a trace's symbolic sizes, v's head dim not q's).
            qc, kc, vc = (_to(t, p, CANONICAL, dims_d) for t, p in ((q, q_pattern), (k, k_pattern), (v, v_pattern)))
            mask4 = readable_mask(mask_4d(attn_mask), q.dtype)
            if is_causal:
                mask4 = causal_mask(mask4, qc.shape[2], kc.shape[2])
            out = REGISTRY["torch"].forward(qc, kc, vc, mask4, scale, False, None, True)
            return _to(out, CANONICAL, out_pattern, dims_d)
        return dispatch_op(q, k, v, attn_mask, scale, pack_call(q_pattern, k_pattern, v_pattern, out_pattern, dims, is_causal,
                                                                window_size, compatibility_mode, backend), dispatcher)
    name = decision.split("|", 1)[0]  # validated when it was taken, while Dynamo traced (dispatch/baked.py)
    qc, kc, vc = (_to(t, p, CANONICAL, dims_d) for t, p in ((q, q_pattern), (k, k_pattern), (v, v_pattern)))
    causal, window = bool(is_causal), window_size
    if _concrete(q, k, v, attn_mask):  # else baked for a bucket of lengths: no mask, no window
        window = effective_window(window_size, qc.shape[2], kc.shape[2])
    mask4 = readable_mask(mask_4d(attn_mask), q.dtype)  # as eager's runners do
    if name in TORCH_FAMILY:
        out = REGISTRY[name].forward(qc, kc, vc, mask4, scale, causal, window, grad)
        return _to(out, CANONICAL, out_pattern, dims_d)
    native = _native_layout(name)  # the package's own layout: a b s n d caller's tensors reach it as they are
    qn, kn, vn = (_to(t, CANONICAL, native, None) for t in (qc, kc, vc))
    out = kernel_op(name, qn, kn, vn, mask4, scale, causal, window)
    return _to(_to(out, native, CANONICAL, None), CANONICAL, out_pattern, dims_d)


@functools.lru_cache(maxsize=1024)
def _restride(shape: tuple, stride: tuple, q_stride: tuple, q_pattern: str, out_pattern: str, dims: Optional[str]):
    """None where an output of ``shape`` and ``stride`` already has the layout :func:`_out_like`
    declares (for a query of ``q_stride`` in ``q_pattern``), else the strides it must be copied to.
    One cached call per run-time call: meta tensors and the pattern converters cost ~10 us."""
    dims_d = dims_dict(dims)
    canon = _to(torch.empty(shape, device="meta"), out_pattern, CANONICAL, dims_d)
    b, n, s, dv = canon.shape
    heads_inner = _heads_inner_at(q_stride, q_pattern)
    out = canon.new_empty((b, s, n, dv)).transpose(1, 2) if heads_inner else canon.new_empty((b, n, s, dv))
    want = _to(out, CANONICAL, out_pattern, dims_d).stride()
    if stride == want or all(size == 1 or have == w for size, have, w in zip(shape, stride, want)):
        return None
    return want


def _dispatch_impl(q, k, v, attn_mask, scale, call, dispatcher):
    """The run-time operator: the eager hot path on the caller's tensors and patterns (so its key
    is the one eager calls use), returning the layout the fake declares. It opens no ``no_grad``
    scope (~1.8 us a call on the 2-core CPU): its callers do where gradients could be on
    (``_dispatch_autograd``; ``_DispatchGrad.forward`` runs with them off)."""
    q_pattern, k_pattern, v_pattern, out_pattern, dims, is_causal, window_size, compatibility_mode, backend = unpack_call(call)
    if backend is not None and backend != overrides.scope_get():  # a use_backend opened inside the compiled code
        with Scope(backend):
            return _dispatch_impl(q, k, v, attn_mask, scale, call, dispatcher)
    out = lookup_dispatcher(dispatcher).forward(q, k, v, q_pattern, k_pattern, v_pattern, out_pattern, dims_dict(dims),
                                                attn_mask, scale, is_causal, compatibility_mode, window_size)
    want = _restride(out.shape, out.stride(), q.stride(), q_pattern, out_pattern, dims)
    if want is not None:
        out = torch.empty_strided(out.shape, want, dtype=out.dtype, device=out.device).copy_(out)
    return out


def _dispatch_fake(q, k, v, attn_mask, scale, call, dispatcher):
    q_pattern, _, v_pattern, out_pattern, dims = unpack_call(call)[:5]
    return _out_like(q, v, q_pattern, v_pattern, out_pattern, dims_dict(dims))


def _native_layout(name: str) -> str:
    """The layout a kernel package takes and returns (``b s n d`` for FlashAttention and xFormers)."""
    return getattr(REGISTRY[name], "output_layout", CANONICAL)


def _saves_lse(name: str) -> bool:
    """Whether the backend has a forward that returns the log-sum-exp and a backward that takes it."""
    b = REGISTRY[name]
    return getattr(b, "forward_native_lse", None) is not None and getattr(b, "backward_native", None) is not None \
        and b.supports_lse_backward()


def _native_call(name: str, q, k, v, attn_mask, scale, is_causal, window_size):
    """The backend on tensors in its native layout; its output, contiguous, in that layout."""
    backend = REGISTRY[name]
    native = _native_layout(name)
    forward_native = getattr(backend, "forward_native", None)
    if forward_native is not None and attn_mask is None:
        out = forward_native(q, k, v, scale, is_causal, window_size)
    elif native == CANONICAL:
        out = backend.forward(q, k, v, attn_mask, scale, is_causal, window_size, False)
    else:
        out = backend.forward(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask, scale, is_causal,
                              window_size, False).transpose(1, 2)
    return out if out.is_contiguous() else out.contiguous()


def _kernel_impl(backend, q, k, v, attn_mask, scale, is_causal, window_size):
    with torch.no_grad():
        return _native_call(backend, q, k, v, attn_mask, scale, is_causal, window_size)


def _kernel_fake(backend, q, k, v, attn_mask, scale, is_causal, window_size):
    return q.new_empty((q.shape[0], q.shape[1], q.shape[2], v.shape[3]))


def _lse_shape(backend, q) -> tuple:
    if _native_layout(backend) == _BSND:
        return q.shape[0], q.shape[2], q.shape[1]
    return q.shape[0], q.shape[1], q.shape[2]


def _kernel_lse_impl(backend, q, k, v, attn_mask, scale, is_causal, window_size):
    """The forward that training saves: the output and, where the backend has the pair, the
    log-sum-exp its backward takes (an empty tensor otherwise)."""
    with torch.no_grad():
        if _saves_lse(backend):
            out, lse = REGISTRY[backend].forward_native_lse(q, k, v, scale, is_causal, window_size)
            return (out if out.is_contiguous() else out.contiguous()), lse.contiguous()
        return _native_call(backend, q, k, v, attn_mask, scale, is_causal, window_size), q.new_empty((0,), dtype=torch.float32)


def _kernel_lse_fake(backend, q, k, v, attn_mask, scale, is_causal, window_size):
    out = _kernel_fake(backend, q, k, v, attn_mask, scale, is_causal, window_size)
    if _saves_lse(backend):
        return out, q.new_empty(_lse_shape(backend, q), dtype=torch.float32)
    return out, q.new_empty((0,), dtype=torch.float32)


def _kernel_backward_impl(backend, grad_out, q, k, v, attn_mask, out, lse, scale, is_causal, window_size):
    """The backend's own backward from the saved output and log-sum-exp; a backend without that
    pair differentiates its own forward (recomputed: the only case that runs it twice)."""
    if lse.numel() and _saves_lse(backend):
        dq, dk, dv = REGISTRY[backend].backward_native(grad_out, q, k, v, out, lse, scale, is_causal, window_size)
        return dq.contiguous(), dk.contiguous(), dv.contiguous()
    with torch.enable_grad():
        qd, kd, vd = (t.detach().requires_grad_(True) for t in (q, k, v))
        o = _native_call_grad(backend, qd, kd, vd, attn_mask, scale, is_causal, window_size)
        dq, dk, dv = torch.autograd.grad(o, (qd, kd, vd), grad_out)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


def _native_call_grad(name, q, k, v, attn_mask, scale, is_causal, window_size):
    backend = REGISTRY[name]
    if _native_layout(name) == CANONICAL:
        return backend.forward(q, k, v, attn_mask, scale, is_causal, window_size, True)
    return backend.forward(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask, scale, is_causal,
                           window_size, True).transpose(1, 2)


def _kernel_backward_fake(backend, grad_out, q, k, v, attn_mask, out, lse, scale, is_causal, window_size):
    # contiguous, as the implementation returns them (q may be a b n s d caller's transposed view)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _dispatch_backward_impl(grad_out, q, k, v, attn_mask, scale, call, dispatcher):
    """Differentiates the backend the dispatcher chooses for the gradient-needing key (its
    forward recomputed: the run-time operator does not know its backend at trace time)."""
    q_pattern, k_pattern, v_pattern, out_pattern, dims, is_causal, window_size, compatibility_mode, backend = unpack_call(call)
    with torch.enable_grad(), Scope(backend):
        qd, kd, vd = (t.detach().requires_grad_(True) for t in (q, k, v))
        out = lookup_dispatcher(dispatcher).forward(qd, kd, vd, q_pattern, k_pattern, v_pattern, out_pattern,
                                                    dims_dict(dims), attn_mask, scale, is_causal, compatibility_mode,
                                                    window_size)
        grads = torch.autograd.grad(out, (qd, kd, vd), grad_out)
    # laid out as the fake declares (empty_like: inductor asserts the strides), whatever autograd gave
    return tuple(g if g.stride() == t.stride() else torch.empty_like(t).copy_(g) for g, t in zip(grads, (q, k, v)))


def _dispatch_backward_fake(grad_out, q, k, v, *rest):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


_LIB.impl("attention", _attention_composite, "CompositeImplicitAutograd")
_LIB.impl("dispatch", _dispatch_impl, "CompositeExplicitAutograd")
_LIB.impl("kernel", _kernel_impl, "CompositeExplicitAutograd")
_LIB.impl("kernel_lse", _kernel_lse_impl, "CompositeExplicitAutograd")
_LIB.impl("kernel_backward", _kernel_backward_impl, "CompositeExplicitAutograd")
_LIB.impl("dispatch_backward", _dispatch_backward_impl, "CompositeExplicitAutograd")
torch.library.register_fake("diffsynth_attention::dispatch", _dispatch_fake, lib=_LIB)
torch.library.register_fake("diffsynth_attention::kernel", _kernel_fake, lib=_LIB)
torch.library.register_fake("diffsynth_attention::kernel_lse", _kernel_lse_fake, lib=_LIB)
torch.library.register_fake("diffsynth_attention::kernel_backward", _kernel_backward_fake, lib=_LIB)
torch.library.register_fake("diffsynth_attention::dispatch_backward", _dispatch_backward_fake, lib=_LIB)

attention_op = torch.ops.diffsynth_attention.attention.default
dispatch_op = torch.ops.diffsynth_attention.dispatch.default
kernel_op = torch.ops.diffsynth_attention.kernel.default
kernel_lse_op = torch.ops.diffsynth_attention.kernel_lse.default
kernel_backward_op = torch.ops.diffsynth_attention.kernel_backward.default
dispatch_backward_op = torch.ops.diffsynth_attention.dispatch_backward.default


# Autograd. Our own kernels at the Autograd key rather than torch.library.register_autograd,
# whose generic wrapper costs ~10 us of host time per call: a call that needs no gradient goes
# straight to the implementation (a real call) or below autograd (a trace).
class _KernelGrad(torch.autograd.Function):
    """Training through a kernel package: the forward saves the output and the log-sum-exp, and
    the backward is the package's own backward on them (no second forward)."""

    @staticmethod
    def forward(ctx, backend, q, k, v, attn_mask, scale, is_causal, window_size):
        out, lse = kernel_lse_op(backend, q, k, v, attn_mask, scale, is_causal, window_size)
        ctx.save_for_backward(q, k, v, attn_mask, out, lse)
        ctx.args = (backend, scale, is_causal, window_size)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, attn_mask, out, lse = ctx.saved_tensors
        backend, scale, is_causal, window_size = ctx.args
        dq, dk, dv = kernel_backward_op(backend, grad_out.contiguous(), q, k, v, attn_mask, out, lse, scale, is_causal,
                                        window_size)
        return None, dq, dk, dv, None, None, None, None


def _kernel_autograd(backend, q, k, v, attn_mask, scale, is_causal, window_size):
    if needs_grad(q, k, v):
        return _KernelGrad.apply(backend, q, k, v, attn_mask, scale, is_causal, window_size)
    if type(q) is torch.Tensor and attn_mask is None:  # a real call, no mask, no gradient: no guard (~0.6 us)
        return _native_call(backend, q, k, v, attn_mask, scale, is_causal, window_size)
    with torch._C._AutoDispatchBelowAutograd():
        if type(q) is torch.Tensor:
            return _native_call(backend, q, k, v, attn_mask, scale, is_causal, window_size)
        return kernel_op(backend, q, k, v, attn_mask, scale, is_causal, window_size)


class _DispatchGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, attn_mask, scale, call, dispatcher):
        out = dispatch_op(q, k, v, attn_mask, scale, call, dispatcher)
        ctx.save_for_backward(q, k, v, attn_mask)
        ctx.args = (scale, call, dispatcher)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, attn_mask = ctx.saved_tensors
        dq, dk, dv = dispatch_backward_op(grad_out.contiguous(), q, k, v, attn_mask, *ctx.args)
        return dq, dk, dv, None, None, None, None


def _dispatch_autograd(q, k, v, attn_mask, scale, call, dispatcher):
    if needs_grad(q, k, v):
        return _DispatchGrad.apply(q, k, v, attn_mask, scale, call, dispatcher)
    if type(q) is torch.Tensor and attn_mask is None:  # a real call, no mask: nothing below could record a gradient
        return _dispatch_impl(q, k, v, attn_mask, scale, call, dispatcher)
    with torch._C._AutoDispatchBelowAutograd(), torch.no_grad():  # a mask needing grad: this key has none
        if type(q) is torch.Tensor:
            return _dispatch_impl(q, k, v, attn_mask, scale, call, dispatcher)
        return dispatch_op(q, k, v, attn_mask, scale, call, dispatcher)


_LIB.impl("kernel", _kernel_autograd, "Autograd")
_LIB.impl("dispatch", _dispatch_autograd, "Autograd")
