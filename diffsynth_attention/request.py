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
            type(scale), scale is None or -FLOAT_MAX <= scale <= FLOAT_MAX, grad, tier_scoped, tier_raw,
        )
