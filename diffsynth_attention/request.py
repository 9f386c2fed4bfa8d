"""A call's arguments as one value (:class:`Request`), and its *signature*.

The signature is what a plan is looked up by: everything about a call that can change its
validation, its problem key or its backend (shapes, dtypes, devices, patterns, mask kind,
flags, the requested implementation), and nothing that costs much to read. It is defined once,
in :meth:`Request.signature`; the hot path of :mod:`diffsynth_attention.dispatch` builds the
same tuple inline (a method call costs more than the lookup), and a test proves the two agree
on every argument.

Devices are ``torch.device`` values (``get_device()`` is -1 for both the CPU and the meta
device); layouts tell sparse tensors from dense ones; a NaN, infinite or overflowing scale
gives another signature than a finite one. A repeated call is therefore checked exactly as
strictly as its first call, for a few scalar reads and comparisons.
"""

from __future__ import annotations

import sys
from typing import NamedTuple, Optional

CANONICAL = "b n s d"
FLOAT_MAX = sys.float_info.max  # -FLOAT_MAX <= scale <= FLOAT_MAX: False for NaN, +-inf and 10**400


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
        devices (meta included) and layouts (sparse) of every tensor, the types of the flags
        and of the window and dims (``3.0 == 3``), and whether the scale is finite. ``tier_scoped``
        and ``tier_raw``: the quality scope and DIFFSYNTH_ATTENTION_QUALITY's raw value."""
        q, k, v, m, dims, scale = self.q, self.k, self.v, self.attn_mask, self.dims, self.scale
        return (
            scoped, impl_raw, self.compatibility_mode, type(self.compatibility_mode), q.shape, k.shape, v.shape,
            q.dtype, k.dtype, v.dtype, q.device, k.device, v.device, q.layout, k.layout, v.layout,
            self.q_pattern, self.k_pattern, self.v_pattern, self.out_pattern,
            None if dims is None else tuple((a, n, type(n)) for a, n in dims.items()),
            None if m is None else (m.shape, m.dtype, m.device, m.layout),
            self.is_causal, type(self.is_causal), self.window_size, type(self.window_size),
            type(scale), scale is None or -FLOAT_MAX <= scale <= FLOAT_MAX, grad, tier_scoped, tier_raw,
        )
