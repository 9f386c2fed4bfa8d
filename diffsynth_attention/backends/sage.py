"""SageAttention (``sageattention.sageattn``): 8-bit QK kernels.

- 1.x (1.0.6) is Triton-only, takes head dims 64/96/128, and subtracts the key's mean from
  ``k`` in place (``smooth_k``): the adapter hands it a copy of k, and that copy is part of the
  timed call.
- 2.x picks CUDA kernels by compute capability (8.0, 8.6, 8.9, 9.0, 12.0) and silently ignores
  an ``attn_mask``: masks are declared unsupported, so a masked call never reaches it.

Its error against fp32 is several times that of exact bf16 kernels (1.3e-2 against 2.2e-3 on
an H200, and 0.29 with 77 keys): the tuner's numeric gate decides where it may be used.
"""

from __future__ import annotations


import torch

from ..backend_names import BackendName
from .base import Backend, package_version, register
from .flash_attention import _version_tuple


@register
class SageAttention(Backend):
    name = BackendName.SAGE_ATTENTION
    diffsynth_priority = 5
    package = "sageattention"
    extra = "sageattention"
    dtypes = frozenset({torch.float16, torch.bfloat16, torch.float32})
    head_dims = frozenset({64, 96, 128})
    causal_any_lengths = False
    gqa = True
    backward = False
    min_capability = (8, 0)
    exact = False
    low_precision = True  # the balanced and fast tiers only (the exact tolerance rejected it everywhere)
    module = "sageattention"
    efficiency = 0.9  # 8-bit QK: can pass the 16-bit peak on its native parts (0.43 measured on an H200)
    launch_ms = 0.05  # 0.19-0.31 ms per call on small problems (H200)

    def _metadata_version(self):  # this module's name: tests install fake versions here
        return package_version(self.package)

    def _load(self) -> None:
        self._import_kernel("sageattention", "sageattn", package_version(self.package))
        if self.declared_version() in (None, "unknown"):
            self._configure(self._version)

    def _configure(self, version) -> None:
        self._major = (_version_tuple(version) or (1,))[0]
        if self._major >= 2:
            # 2.x: CUDA kernels per architecture, 16-bit inputs, head dims up to 128.
            self.dtypes = frozenset({torch.float16, torch.bfloat16})
            self.head_dims = frozenset(range(8, 129, 8))
            self.capabilities = frozenset({8, 9, 12})

    def forward(self, q, k, v, mask, scale, causal, window, need_grad):
        if self._major < 2:
            k = k.clone()  # 1.x subtracts the key mean in place: never touch the caller's k
        return self._func(q, k, v, tensor_layout="HND", is_causal=causal, sm_scale=scale)
