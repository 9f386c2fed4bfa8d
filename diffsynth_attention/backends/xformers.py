"""xFormers' ``memory_efficient_attention``.

Takes ``b s n d`` (BMHK). Masks go in as a tensor bias whose last dimension is stored padded
to a multiple of 8, as xFormers requires; a boolean mask becomes 0/-inf. Causal calls use
``LowerTriangularMask``, which is aligned to the top left like PyTorch's. A build whose C++
operators do not load (e.g. 0.0.35 from the registry, built for torch 2.10 + CUDA 12.8, on
torch 2.11 + CUDA 13.0) is reported unavailable, with the loader's own error.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch

from ..problem import Problem
from ..states import MaskKind
from ..backend_names import BackendName
from .base import Backend, DeviceInfo, package_version, register


@register
class XFormers(Backend):
    name = BackendName.XFORMERS
    diffsynth_priority = 6
    package = "xformers"
    extra = "xformers"
    dtypes = frozenset({torch.float16, torch.bfloat16, torch.float32})
    max_head_dim = 256
    masks = frozenset({MaskKind.BOOL, MaskKind.ADDITIVE})
    min_capability = (5, 0)
    output_layout = "b s n d"  # BMHK: forward returns a b n s d view of it
    module = "xformers"
    efficiency = 0.5  # dispatches to FlashAttention kernels where it can: taken generously
    launch_ms = 0.03

    def _load(self) -> None:
        xformers = importlib.import_module("xformers")
        if getattr(xformers, "_has_cpp_library", True) is False:
            cpp = getattr(xformers, "_cpp_lib", None)
            cause = getattr(cpp, "_cpp_library_load_exception", None)
            raise RuntimeError(f"xformers' C++ operators did not load ({cause})")
        ops = importlib.import_module("xformers.ops")
        self._func = ops.memory_efficient_attention
        self._causal = ops.LowerTriangularMask()
        self._version = package_version("xformers") or getattr(xformers, "__version__", "unknown")

    def extra_reasons(self, p: Problem, dev: Optional[DeviceInfo]) -> list:
        if p.causal and p.mask != MaskKind.NONE:
            return ["is_causal together with attn_mask not supported"]
        return []

    @staticmethod
    def _bias(mask: torch.Tensor, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        b, h, sq, skv = shape
        padded = (skv + 7) // 8 * 8
        bias = torch.zeros((b, h, sq, padded), dtype=dtype, device=mask.device)[..., :skv]
        if mask.dtype == torch.bool:
            bias.masked_fill_(~mask.expand(shape), float("-inf"))
        else:
            bias.copy_(mask.expand(shape))
        return bias

    def forward(self, q, k, v, mask, scale, causal, window, need_grad):
        bias = None
        if mask is not None:
            bias = self._bias(mask, (q.shape[0], q.shape[1], q.shape[2], k.shape[2]), q.dtype)
        elif causal:
            bias = self._causal
        out = self._func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias, scale=scale)
        return out.transpose(1, 2)
