"""A call's arguments as one value (:class:`Request`), and its *signature*.

The signature is what a plan is looked up by: everything about a call that can change its
validation, its problem key or its backend (shapes, dtypes, devices, patterns, mask kind,
flags, the requested implementation), and nothing that costs much to read. It is defined once,
in :meth:`Request.signature`; the hot path of :mod:`diffsynth_attention.dispatch` builds the
same tuple inline (a method call costs more than the lookup), and a test proves the two agree
on every argument.

Devices: ``q.device`` for the query (a ``torch.device`` is exact), ``get_device()`` (an int,
half the cost) for the others. Validation has checked, when the plan was built, that all
tensors were on the query's device.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

CANONICAL = "b n s d"


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

    def signature(self, scoped, impl_raw, grad: bool) -> tuple:
        """The plan-table key. Raises AttributeError/TypeError for arguments that are not
        tensors or not hashable: validation then explains what is wrong."""
        q, k, v, m, dims = self.q, self.k, self.v, self.attn_mask, self.dims
        return (
            scoped, impl_raw, self.compatibility_mode, q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype,
            q.device, k.get_device(), v.get_device(), self.q_pattern, self.k_pattern, self.v_pattern, self.out_pattern,
            None if dims is None else tuple(dims.items()),
            None if m is None else (m.shape, m.dtype, m.get_device()),
            self.is_causal, self.window_size, type(self.scale), grad,
        )

    def needs_grad(self, grad_enabled: bool) -> bool:
        return bool(grad_enabled and any(getattr(t, "requires_grad", False) for t in (self.q, self.k, self.v)))
