"""A call's arguments as one value (:class:`Request`), and its *signature*.

The signature is what a plan is looked up by: everything about a call that can change its
validation, its problem key or its backend (shapes, dtypes, devices, patterns, mask kind,
flags, the requested implementation), and nothing that costs much to read. It is defined once,
in :meth:`Request.signature`; the hot path of :mod:`diffsynth_attention.dispatch` builds the
same tuple inline (a method call costs more than the lookup), and a test proves the two agree
on every argument.

Devices are ``torch.device`` values (``get_device()`` is -1 for both the CPU and the meta
device, and a meta tensor must be refused before any backend sees it). Strides
give the memory order (a ``b n s d`` view of ``b s n d`` memory is another problem) and tell
sparse tensors, which have none, from dense ones. For float32 queries, whether cuBLAS may use
TF32 is part of it. A NaN, infinite or overflowing scale gives another signature than a finite
one. A repeated call is therefore checked exactly as strictly as its first call, for a few
scalar reads and comparisons.
"""

from __future__ import annotations

import sys
from typing import NamedTuple, Optional

import torch

CANONICAL = "b n s d"
FLOAT_MAX = sys.float_info.max  # -FLOAT_MAX <= scale <= FLOAT_MAX: False for NaN, +-inf and 10**400
FLOAT32 = torch.float32
# Whether cuBLAS may run float32 matmuls in TF32 (``torch.backends.cuda.matmul.allow_tf32``,
# ``set_float32_matmul_precision("high")``): a C call, read for float32 queries only.
cublas_tf32 = getattr(torch._C, "_get_cublas_allow_tf32", None) or (lambda: False)
# The NumPy scalar types a scale may be, by name (what ``numbers.Real`` admits, less bool and
# timedelta64), so that NumPy need not be imported. A trace cannot ask this of a NumPy scalar
# (Dynamo sees one as an array, with no readable dtype): it takes one by its module (dispatch/baked.py)
NUMPY_REALS = frozenset({"float16", "float32", "float64", "longdouble", "int8", "int16", "int32", "int64", "longlong",
                         "uint8", "uint16", "uint32", "uint64", "ulonglong"})


def scale_number(scale) -> bool:
    """Whether ``scale`` is a number a scale may be: an int or float (not a bool), or a NumPy
    integer or float scalar. Eager validation asks this, and the compiled trace of every scale
    that is not a NumPy one."""
    t = type(scale)
    return (t is not bool and isinstance(scale, (int, float))) or (t.__module__ == "numpy" and t.__name__ in NUMPY_REALS)


def finite_scale(scale) -> bool:
    """Whether scale number ``scale`` is finite: False for NaN, +-inf, an int beyond any float
    (10**400) and what :func:`scale_number` refuses. Through ``float()``: comparing a NumPy float32
    with FLOAT_MAX casts FLOAT_MAX to float32, with an overflow warning on every call."""
    if not scale_number(scale):
        return False
    try:
        return -FLOAT_MAX <= float(scale) <= FLOAT_MAX
    except OverflowError:
        return False


def dims_length(n) -> Optional[int]:
    """``n`` as a ``dims`` length: an int (not a bool) as it is, a NumPy integer scalar as its int
    (einops, which DiffSynth-Studio calls, takes one); None for anything else (a bool, a float, a
    NumPy bool or float). A NumPy value by its module and ``.item()``, not its type or ABCs: under
    Dynamo a NumPy scalar's type reads as ``ndarray`` and ``isinstance(n, numbers.Integral)`` as
    False, while ``.item()`` gives the Python number's type; so eager validation (problem._dims_tuple) and
    the trace (dispatch/baked.py) share this one rule."""
    if isinstance(n, bool):
        return None
    if isinstance(n, int):
        return n
    if type(n).__module__ == "numpy" and n.ndim == 0:
        kind = n.item()  # its type only: in a trace int(n) is the constant, .item() a value to guard
        if isinstance(kind, int) and not isinstance(kind, bool):
            return int(n)
    return None


def scalar_scale(scale):
    """``scale`` with a 0-dim tensor as the float PyTorch's SDPA reads from it (its argument parser
    takes one as ``float(scale)``), so that the call is the call with that float: one signature, one
    key, one plan. ``float()`` of a CUDA tensor waits for the device: a sync on every such call (pass
    a number where that matters). Any other value as it is. A tensor SDPA refuses (of 1 dim or more,
    needing grad, complex), a bool one (``scale=True`` is refused) or a meta one is a TypeError
    naming ``scale``. The dispatcher's slow path and validation convert it (dispatcher.Dispatcher.call,
    problem.prepare), and the trace (dispatch/baked.py): the hot path reads nothing more."""
    if not isinstance(scale, torch.Tensor):
        return scale
    why = ("a bool tensor" if scale.dtype == torch.bool else f"a tensor of shape {tuple(scale.shape)}" if scale.dim()
           else "a tensor that requires grad" if scale.requires_grad else f"a {str(scale.dtype)[6:]} tensor"
           if scale.is_complex() else "a meta tensor" if scale.is_meta else None)
    if why is not None:
        raise TypeError(f"scale must be a number or None, got {why}")
    return float(scale)


class Request(NamedTuple):
    q: object
    k: object
    v: object
    q_pattern: str = CANONICAL
    k_pattern: str = CANONICAL
    v_pattern: str = CANONICAL
    out_pattern: str = CANONICAL
    dims: Optional[dict] = None
    attn_mask: object = None
    scale: Optional[float] = None
    is_causal: bool = False
    compatibility_mode: bool = False
    window_size: Optional[int] = None

    def signature(self, scoped, impl_raw, grad: bool, tier_scoped=None, tier_raw=None) -> tuple:
        """The plan-table key. Raises (AttributeError, TypeError, ...) for arguments that are not
        tensors or not hashable: validation then explains what is wrong. Everything a first
        call's validation looks at is here, so that a repeated call is checked as strictly:
        devices (meta included), strides (memory order; sparse tensors have none), the types of the flags
        and of the window and dims (``3.0 == 3``), and whether the scale is finite. ``tier_scoped``
        and ``tier_raw``: the quality scope and DIFFSYNTH_ATTENTION_QUALITY's raw value."""
        q, k, v, m, dims, scale = self.q, self.k, self.v, self.attn_mask, self.dims, self.scale
        qd = q.dtype
        return (
            scoped, impl_raw, self.compatibility_mode, type(self.compatibility_mode), q.shape, k.shape, v.shape,
            q.stride(), k.stride(), v.stride(), qd, k.dtype, v.dtype, qd is FLOAT32 and cublas_tf32(),
            q.device, k.device, v.device,
            self.q_pattern, self.k_pattern, self.v_pattern, self.out_pattern,
            None if dims is None else tuple((a, n, type(n)) for a, n in dims.items()),
            None if m is None else (m.shape, m.dtype, m.device, m.layout),
            self.is_causal, type(self.is_causal), self.window_size, type(self.window_size),
            type(scale), scale is None or finite_scale(scale), grad, tier_scoped, tier_raw,
        )
