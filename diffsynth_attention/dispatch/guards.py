"""The hit path's tensor guards: one C call that tells whether q, k and v have the type, dtype,
device, sizes, strides, ``requires_grad`` and dispatch keys of the call a plan was looked up for.

Reading those attributes from Python costs 11 attribute calls and a 33-item tuple to hash (about
3 us of a hit's 5 on a 2-core CPU). Dynamo checks the same properties of a compiled graph's
inputs with ``torch._C._dynamo.guards.TensorGuards``, in C++; :func:`tensor_guard` builds one for
the tensors of a call. It is a private torch API: a torch whose ``TensorGuards`` is missing,
takes other arguments, or fails the self-check below gives None, and the hit path keeps the
signature tuple alone (what it did before).
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

logger = logging.getLogger("diffsynth_attention")

_usable: Optional[bool] = None  # whether this torch's TensorGuards passed the self-check (None: not tried yet)


def _build(tensors) -> Callable:
    from torch._C._dynamo.guards import TensorGuards  # noqa: PLC0415  (torch's C module: no Python import cost)

    guards = TensorGuards(*tensors, dynamic_dims_sizes=[list(t.shape) for t in tensors],
                          dynamic_dims_strides=[list(t.stride()) for t in tensors])
    return guards.check


def _self_check(q, k, v, check) -> bool:
    """The guard accepts the tensors it was built on and their views of the same layout, and
    refuses a tensor of another shape, dtype or memory order, and a non-tensor."""
    other_shape = torch.empty((0,), dtype=v.dtype, device="meta")
    other_dtype = torch.empty_strided(v.shape, v.stride(), dtype=torch.float64 if v.dtype != torch.float64 else torch.float32,
                                      device="meta")
    return (check(q, k, v) is True and check(q, k, v.view(v.shape)) is True and check(q, k, other_shape) is False
            and check(q, k, other_dtype) is False and check(q, k, None) is False)


def tensor_guard(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Optional[Callable]:
    """``check(q2, k2, v2) -> bool``: True only for tensors that match ``q, k, v`` in type, dtype,
    device, sizes, strides, ``requires_grad`` and dispatch keys (under the grad and inference
    modes of this moment). None where this torch has no usable guard, or for tensors it cannot
    guard: sparse or nested ones, and one tensor passed twice (``attention_forward(x, x, x)``:
    Dynamo's guard refuses aliased inputs, so it would never pass)."""
    global _usable
    if _usable is False:
        return None
    try:
        tensors = (q, k, v)
        if q is k or k is v or q is v or any(t.layout is not torch.strided or t.is_nested for t in tensors):
            return None
        check = _build(tensors)
        if _usable is None:
            _usable = _self_check(q, k, v, check)
            if not _usable:
                logger.debug("torch's TensorGuards failed the self-check: the hit path looks up every call's signature")
                return None
        return check
    except Exception as exc:  # another torch's TensorGuards: the signature tuple serves alone
        if _usable is None:
            _usable = False
            logger.debug("no tensor guards for the hit path (%s: %s)", type(exc).__name__, exc)
        return None
