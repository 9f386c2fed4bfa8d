"""``attention_forward`` under ``torch.compile``: the decision taken while Dynamo traces.

With static shapes the problem key is known at trace time. :func:`traced_attention` asks the
dispatcher, once per trace (through ``torch.compiler.assume_constant_result``, so Dynamo calls
it instead of tracing it), which backend serves the call, and emits that backend into the graph:

- the ``torch_*`` backends are traced inline: ``F.scaled_dot_product_attention`` or the ATen
  ``_scaled_dot_product_*_attention`` operator, with their own backward, and only the layout
  changes the backend needs (views; no defensive copy);
- the kernel packages (FlashAttention-2/3/4, SageAttention, xFormers) become one thin operator,
  ``diffsynth_attention::kernel``, that calls the package on the views it takes natively
  (FlashAttention gets a ``b s n d`` caller's own tensors); its backward differentiates the
  same backend's own autograd function (recomputing its forward).

No Python dispatcher runs per call in such a graph. When the key has no decision yet, when an
override cannot be served, or with dynamic (symbolic) shapes, the graph calls the run-time
operator ``diffsynth_attention::attention`` instead, which dispatches (and tunes on the first
call) in eager Python. A graph traced without a decision reads ``overrides.TRACE.epoch``, which
every new decision bumps: Dynamo's guard on it recompiles that graph once, with the decision.
Every graph reads ``overrides.TRACE.scope`` (the innermost ``use_backend``), so entering or
leaving a ``use_backend`` block selects another compiled version. The environment variable
``DIFFSYNTH_ATTENTION_IMPLEMENTATION`` is read when a graph is traced: change it before
compiling, or call ``torch.compiler.reset()`` after changing it.

Operators are defined with ``torch.library.Library`` (a few us per call cheaper than
``@torch.library.custom_op``).
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Optional

import torch
from einops import rearrange

from .. import overrides
from ..backends import REGISTRY
from ..problem import CANONICAL, mask_4d

TORCH_FAMILY = frozenset({"torch", "torch_cudnn", "torch_flash", "torch_efficient", "torch_math"})
_BSND = "b s n d"
_AXES = ("b", "n", "s", "d")

_dispatchers: "weakref.WeakValueDictionary[int, object]" = weakref.WeakValueDictionary()


def register(dispatcher) -> int:
    """An integer that names ``dispatcher`` inside compiled graphs."""
    token = id(dispatcher)
    _dispatchers[token] = dispatcher
    return token


def _dispatcher(token: int):
    d = _dispatchers.get(token)
    if d is None:
        from . import default_dispatcher

        d = default_dispatcher()
    return d


# --------------------------------------------------------------------------------------------
# Operators
# --------------------------------------------------------------------------------------------
_LIB = torch.library.Library("diffsynth_attention", "DEF")
_LIB.define(
    "attention(Tensor q, Tensor k, Tensor v, str q_pattern, str k_pattern, str v_pattern, str out_pattern, str? dims, "
    "Tensor? attn_mask, float? scale, bool is_causal, int? window_size, bool compatibility_mode, int dispatcher) -> Tensor"
)
_LIB.define(
    "kernel(str backend, Tensor q, Tensor k, Tensor v, Tensor? attn_mask, float? scale, bool is_causal, "
    "int? window_size) -> Tensor"
)


def _parse_dims(text: Optional[str]) -> Optional[dict]:
    return None if text is None else {a: int(n) for a, n in (kv.split("=") for kv in text.split(",") if kv)}


def _attention_impl(q, k, v, q_pattern, k_pattern, v_pattern, out_pattern, dims, attn_mask, scale, is_causal, window_size,
                    compatibility_mode, dispatcher):
    """The run-time operator: the eager dispatcher, on the caller's tensors and patterns (so its
    key is the one eager calls and traces use)."""
    with torch.no_grad():
        out = _dispatcher(dispatcher).forward(q, k, v, q_pattern, k_pattern, v_pattern, out_pattern, _parse_dims(dims),
                                              attn_mask, scale, is_causal, compatibility_mode, window_size)
    return out if out.is_contiguous() else out.contiguous()


def _attention_fake(q, k, v, q_pattern, k_pattern, v_pattern, out_pattern, dims, attn_mask, scale, is_causal, window_size,
                    compatibility_mode, dispatcher):
    d = _parse_dims(dims)
    qc = _to(q, q_pattern, CANONICAL, d)
    vc = _to(v, v_pattern, CANONICAL, d)
    out = qc.new_empty((qc.shape[0], qc.shape[1], qc.shape[2], vc.shape[3]))
    return _to(out, CANONICAL, out_pattern, d).contiguous()


def _native_bsnd(name: str) -> bool:
    return getattr(REGISTRY[name], "output_layout", CANONICAL) == _BSND


def _kernel_impl(backend, q, k, v, attn_mask, scale, is_causal, window_size):
    """A kernel package on ``b n s d`` views; the output's strides are the ones the fake declares."""
    with torch.no_grad():
        out = REGISTRY[backend].forward(q, k, v, attn_mask, scale, is_causal, window_size, False)
    if _native_bsnd(backend):
        return out if out.transpose(1, 2).is_contiguous() else out.transpose(1, 2).contiguous().transpose(1, 2)
    return out if out.is_contiguous() else out.contiguous()


def _kernel_fake(backend, q, k, v, attn_mask, scale, is_causal, window_size):
    b, n, s, dv = q.shape[0], q.shape[1], q.shape[2], v.shape[3]
    if _native_bsnd(backend):
        return q.new_empty((b, s, n, dv)).transpose(1, 2)
    return q.new_empty((b, n, s, dv))


_LIB.impl("attention", _attention_impl, "CompositeExplicitAutograd")
_LIB.impl("kernel", _kernel_impl, "CompositeExplicitAutograd")
torch.library.register_fake("diffsynth_attention::attention", _attention_fake, lib=_LIB)
torch.library.register_fake("diffsynth_attention::kernel", _kernel_fake, lib=_LIB)


def _save_attention(ctx, inputs, output):
    q, k, v, q_pattern, k_pattern, v_pattern, out_pattern, dims, attn_mask, *rest = inputs
    ctx.save_for_backward(q, k, v, attn_mask)
    ctx.args = (q_pattern, k_pattern, v_pattern, out_pattern, dims, *rest)


def _attention_backward(ctx, grad_out):
    """Differentiates the backend the dispatcher chooses for the gradient-needing key."""
    q, k, v, mask = ctx.saved_tensors
    q_pattern, k_pattern, v_pattern, out_pattern, dims, scale, is_causal, window_size, compatibility_mode, dispatcher = ctx.args
    with torch.enable_grad():
        qd, kd, vd = (t.detach().requires_grad_(True) for t in (q, k, v))
        out = _dispatcher(dispatcher).forward(qd, kd, vd, q_pattern, k_pattern, v_pattern, out_pattern, _parse_dims(dims),
                                              mask, scale, is_causal, compatibility_mode, window_size)
        gq, gk, gv = torch.autograd.grad(out, (qd, kd, vd), grad_out)
    return (gq, gk, gv) + (None,) * 11


def _save_kernel(ctx, inputs, output):
    backend, q, k, v, attn_mask, scale, is_causal, window_size = inputs
    ctx.save_for_backward(q, k, v, attn_mask)
    ctx.args = (backend, scale, is_causal, window_size)


def _kernel_backward(ctx, grad_out):
    """The backend's own backward (its autograd function), after recomputing its forward."""
    q, k, v, mask = ctx.saved_tensors
    backend, scale, is_causal, window_size = ctx.args
    with torch.enable_grad():
        qd, kd, vd = (t.detach().requires_grad_(True) for t in (q, k, v))
        out = REGISTRY[backend].forward(qd, kd, vd, mask, scale, is_causal, window_size, True)
        gq, gk, gv = torch.autograd.grad(out, (qd, kd, vd), grad_out)
    return None, gq, gk, gv, None, None, None, None


torch.library.register_autograd("diffsynth_attention::attention", _attention_backward, setup_context=_save_attention, lib=_LIB)
torch.library.register_autograd("diffsynth_attention::kernel", _kernel_backward, setup_context=_save_kernel, lib=_LIB)

attention_op = torch.ops.diffsynth_attention.attention.default
kernel_op = torch.ops.diffsynth_attention.kernel.default


# --------------------------------------------------------------------------------------------
# The decision at trace time
# --------------------------------------------------------------------------------------------
def _unflatten(flat: tuple) -> tuple:
    """(shape, stride) pairs from ``ndim, *shape, *stride`` runs."""
    out, i = [], 0
    while i < len(flat):
        n = flat[i]
        out.append((tuple(flat[i + 1:i + 1 + n]), tuple(flat[i + 1 + n:i + 1 + 2 * n])))
        i += 1 + 2 * n
    return tuple(out)


@torch.compiler.assume_constant_result
def _trace_choice(token, q_pattern, k_pattern, v_pattern, out_pattern, dims_text, dtype, device, mask_dtype, scale_kind,
                  is_causal, window_size, compatibility_mode, grad, *flat):
    """Called (not traced) by Dynamo with constants only: the backend for this call, or None
    when the graph must dispatch at run time. Validation errors raise here, at trace time."""
    shapes = _unflatten(flat)
    meta = [torch.empty_strided(size, stride, dtype=dtype, device="meta") for size, stride in shapes[:3]]
    mask = None
    if mask_dtype is not None:
        size, stride = shapes[3]
        mask = torch.empty_strided(size, stride, dtype=mask_dtype, device="meta")
    dims = _parse_dims(dims_text)
    scale = scale_kind  # None or the call's (constant) scale
    return _dispatcher(token).trace_decision(meta, mask, (q_pattern, k_pattern, v_pattern, out_pattern), dims, scale,
                                             is_causal, window_size, compatibility_mode, grad, device)


def _version() -> tuple:
    try:
        return tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    except ValueError:  # pragma: no cover - an unusual version string
        return (0, 0)


# Under Dynamo, ``isinstance(s, torch.SymInt)`` is False and ``type(s)`` is int even for a
# symbolic size. From torch 2.13 ``s.__class__`` tells them apart; on torch 2.11 it does not (it
# is never int there, measured on the H200), and nothing traceable does. There, the static path
# is taken only when the graph is compiled with ``dynamic=False`` (no automatic dynamic shapes);
# otherwise the run-time operator serves the call.
_CLASS_CHECK = _version() >= (2, 13)


def _static(*tensors) -> bool:
    """Whether every size and stride is a plain int (see ``_CLASS_CHECK``)."""
    if not _CLASS_CHECK:
        config = torch._dynamo.config
        return not config.automatic_dynamic_shapes and config.assume_static_by_default
    for t in tensors:
        if t is None:
            continue
        for s in t.shape:
            if s.__class__ is not int:
                return False
        for s in t.stride():
            if s.__class__ is not int:
                return False
    return True


def _dims_for(pattern: str, dims: Optional[dict]) -> dict:
    if not dims:
        return {}
    names = pattern.replace("(", " ").replace(")", " ").split()
    return {a: n for a, n in dims.items() if a in names and a in _AXES}


def _to(x, pattern: str, target: str, dims):
    if pattern == target:
        return x
    if "(" not in pattern and "(" not in target:
        src = pattern.split()
        return x.permute(*[src.index(a) for a in target.split()])
    return rearrange(x, f"{pattern} -> {target}", **_dims_for(pattern if "(" in pattern else target, dims))


def traced_attention(d, q, k, v, q_pattern, k_pattern, v_pattern, out_pattern, dims, attn_mask, scale, is_causal,
                     compatibility_mode, window_size):
    """What Dynamo traces for ``attention_forward``."""
    token = d.trace_token
    if overrides.TRACE.scope is not None:  # read, so the graph is guarded on use_backend
        pass
    choice = None
    dims_text = None if dims is None else ",".join(f"{a}={n}" for a, n in dims.items())
    if _static(q, k, v, attn_mask) and (scale is None or scale.__class__ in (int, float)):
        flat = []
        for t in (q, k, v) + (() if attn_mask is None else (attn_mask,)):
            flat += [t.dim(), *t.shape, *t.stride()]
        grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        choice = _trace_choice(token, q_pattern, k_pattern, v_pattern, out_pattern, dims_text, q.dtype, q.device,
                               None if attn_mask is None else attn_mask.dtype, None if scale is None else float(scale),
                               bool(is_causal), window_size, bool(compatibility_mode), grad, *flat)
    scale_f = None if scale is None else float(scale)
    if choice is None:
        if overrides.TRACE.epoch >= 0:  # read, so a new decision recompiles this graph once
            pass
        return attention_op(q, k, v, q_pattern, k_pattern, v_pattern, out_pattern, dims_text, attn_mask, scale_f,
                            bool(is_causal), window_size, bool(compatibility_mode), token)
    mask4 = mask_4d(attn_mask)
    backend, causal, window, need_grad = choice
    qc, kc, vc = _to(q, q_pattern, CANONICAL, dims), _to(k, k_pattern, CANONICAL, dims), _to(v, v_pattern, CANONICAL, dims)
    if backend in TORCH_FAMILY:
        out = REGISTRY[backend].forward(qc, kc, vc, mask4, scale_f, causal, window, need_grad)
    else:
        out = kernel_op(backend, qc, kc, vc, mask4, scale_f, causal, window)
    return _to(out, CANONICAL, out_pattern, dims)


def trace_problem(call, device):
    """A :class:`~diffsynth_attention.problem.Call` validated on meta tensors, moved to ``device``."""
    return dataclasses.replace(call, problem=dataclasses.replace(call.problem, device_type=device.type))
