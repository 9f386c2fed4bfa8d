"""PyTorch's scaled-dot-product attention and its sub-backends.

``torch`` is SDPA with its own choice of kernel. The sub-backends call the underlying ATen
operators directly rather than wrapping each call in ``torch.nn.attention.sdpa_kernel``, which
costs about 20 us of host time per call (measured on an H200: 17 -> 37 us on a small problem).
The ATen operators are differentiable, so these backends support backward.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..problem import Problem, additive_mask
from ..backend_names import BackendName
from ..states import MaskKind
from . import headless
from .base import Backend, DeviceInfo, element_size, register

# Bound at import: patch_sdpa() may later replace torch.nn.functional's attribute with a
# function that routes through this library, which must not route back to itself.
_SDPA = F.scaled_dot_product_attention
_ALL_FLOATS = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
_aten = torch.ops.aten


def _has_arg(op, name: str) -> bool:
    try:
        return any(a.name == name for a in op.default._schema.arguments)
    except Exception:
        return False


_SDPA_GQA = _has_arg(_aten.scaled_dot_product_attention, "enable_gqa")
_MATH_GQA = _has_arg(_aten._scaled_dot_product_attention_math, "enable_gqa")


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _without_trailing_defaults(overload, fixed: tuple) -> tuple:
    """``fixed`` (the arguments after q, k, v) without the trailing ones equal to the schema's
    defaults: each positional argument costs the builtin's parser ~0.1-0.3 us per call. ``fixed``
    as it is where the schema cannot be read."""
    try:
        schema = overload._schema.arguments[3:3 + len(fixed)]
        n = len(fixed)
        while n and schema[n - 1].has_default_value() and type(fixed[n - 1]) is type(schema[n - 1].default_value) \
                and fixed[n - 1] == schema[n - 1].default_value:
            n -= 1
        return fixed[:n]
    except Exception:  # another torch's schema objects
        return fixed


def _binding(op):
    """The cheapest way to call ATen operator ``op`` from Python: its ``torch._C._VariableFunctions``
    builtin (``torch._scaled_dot_product_efficient_attention``), which parses the arguments in C,
    where the resolved overload (``op.default``) adds a Python ``__call__`` frame (~0.7 us a call
    on the 2-core CPU); the overload where a torch lacks the builtin."""
    name = getattr(op, "_qualified_op_name", "").partition("::")[2]
    return getattr(torch._C._VariableFunctions, name, None) or op.default


def _bind_aten(backend, cls, op, fixed: tuple, p: Problem, need_grad: bool, scale_is_none: bool):
    """A runner for an ATen SDPA kernel on unmasked calls: the overload resolved once
    (``.default``), positional arguments decided at plan time, and the last-dim contiguity
    check only where the problem's tensors are not all dense in their last dim. Masked, GQA and windowed calls keep the generic runner."""
    if type(backend).forward is not cls.forward or p.mask != MaskKind.NONE \
            or p.heads_q != p.heads_kv or p.window is not None:
        return None
    fixed = _without_trailing_defaults(op.default, fixed)
    default = _binding(op)
    if p.dense_last:  # the plan's signature fixes the strides: no per-call check
        if scale_is_none:
            def run_dense(q, k, v, mask, scale):
                return default(q, k, v, *fixed)[0]
            return run_dense

        def run_dense_scaled(q, k, v, mask, scale):
            return default(q, k, v, *fixed, scale=scale)[0]
        return run_dense_scaled

    def contiguous(x):
        return x if x.stride(-1) == 1 else x.contiguous()

    if scale_is_none:
        def run(q, k, v, mask, scale):
            return default(contiguous(q), contiguous(k), contiguous(v), *fixed)[0]
        return run

    def run_scaled(q, k, v, mask, scale):
        return default(contiguous(q), contiguous(k), contiguous(v), *fixed, scale=scale)[0]
    return run_scaled


def _lse_3d(lse: torch.Tensor, seq_q: int) -> torch.Tensor:
    """An ATen kernel's log-sum-exp as (b, n, s_q) float32: cuDNN adds a trailing 1 on newer torch,
    the efficient kernel pads s_q to a multiple of 32."""
    if lse.dim() == 4:
        lse = lse.squeeze(-1)
    return lse[..., :seq_q].float()


def repeat_kv(k: torch.Tensor, v: torch.Tensor, groups: int):
    return k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)


def causal_mask(mask: torch.Tensor, s_q: int, s_kv: int) -> torch.Tensor:
    """Additive ``mask`` with PyTorch's top-left causal mask applied too (-inf where key j > query
    i), broadcast to (..., s_q, s_kv): ``attn_mask`` and ``is_causal=True`` together, for a kernel
    that takes only one of them. ``torch.where`` keeps the mask's gradient where it is kept."""
    keep = torch.ones(s_q, s_kv, dtype=torch.bool, device=mask.device).tril()
    return torch.where(keep, mask, torch.tensor(float("-inf"), dtype=mask.dtype, device=mask.device))


def sliding_window(q, k, v, window: int, scale, attend) -> torch.Tensor:
    """|i - j| <= window attention, computed in query chunks with a local boolean mask.

    ``attend(q, k, v, mask, scale)`` computes one chunk. Same meaning as DiffSynth-Studio's
    ``torch_sdpa_sliding_window``, without materialising an s_q x s_kv mask.
    """
    s_q, s_kv = q.shape[2], k.shape[2]
    if s_q == 0 or s_kv == 0:  # no query (an empty output), or no key in any window (zeros): SDPA's own
        return attend(q, k, v, None, scale)  # answer, in the graph (a gradient of zeros, as SDPA's)
    chunk = max(window, 512)
    outs = []
    for start in range(0, s_q, chunk):
        end = min(start + chunk, s_q)
        lo, hi = max(0, start - window), min(s_kv, end + window)
        if lo >= hi:  # no key within the window of any query in this chunk
            outs.append(q.new_zeros(q.shape[0], q.shape[1], end - start, v.shape[3]))
            continue
        qi = torch.arange(start, end, device=q.device).unsqueeze(1)
        kj = torch.arange(lo, hi, device=q.device).unsqueeze(0)
        mask = (qi - kj).abs() <= window
        outs.append(attend(q[:, :, start:end], k[:, :, lo:hi], v[:, :, lo:hi], mask, scale))
    return torch.cat(outs, dim=2)


class TorchBackend(Backend):
    """PyTorch's own kernels: nothing to install or import, compiled into a graph as ATen operators."""

    inlined_under_compile = True
    same_op_in_graph = True

    def _load(self) -> None:
        self._version = torch.__version__


@register
class TorchSDPA(TorchBackend):
    """``torch.nn.functional.scaled_dot_product_attention`` with PyTorch's own kernel choice."""

    name = BackendName.TORCH
    diffsynth_priority = 7
    devices = frozenset({"cpu", "cuda", "mps", "xpu", "hpu", "npu", "meta"})
    dtypes = _ALL_FLOATS
    max_head_dim = 1 << 20
    same_head_dim_v = False
    masks = frozenset({MaskKind.BOOL, MaskKind.ADDITIVE, MaskKind.ADDITIVE_FLOAT32})
    mask_grad = True
    gqa = True
    window = True
    efficiency = 0.5  # picks cuDNN on an H200 (0.57 of peak)
    launch_ms = 0.018

    def forward(self, q, k, v, mask, scale, causal, window, need_grad):
        if q.shape[1] == 0 or k.shape[1] == 0:  # no head: SDPA's kernels die of SIGFPE on some (headless.py)
            return headless.attend(q, k, v, mask)
        if window is not None:
            return sliding_window(q, k, v, window, scale, self._sdpa_masked)
        if q.shape[1] != k.shape[1]:
            if _SDPA_GQA:
                return _SDPA(q, k, v, mask, is_causal=causal, scale=scale, enable_gqa=True)
            k, v = repeat_kv(k, v, q.shape[1] // k.shape[1])
        return _SDPA(q, k, v, mask, is_causal=causal, scale=scale)

    def _sdpa_masked(self, q, k, v, mask, scale):
        return self.forward(q, k, v, mask, scale, False, None, False)

    def bind(self, p: Problem, need_grad: bool, scale_is_none: bool = False):
        if type(self).forward is not TorchSDPA.forward or p.window is not None or p.heads_q == 0 or p.heads_kv == 0 \
                or (p.heads_q != p.heads_kv and not _SDPA_GQA):
            return super().bind(p, need_grad)  # a subclass's own forward, windows, no head (headless.py), GQA by repeating k/v
        sdpa, causal = _SDPA, p.causal
        if p.heads_q != p.heads_kv:
            def run_gqa(q, k, v, mask, scale):
                return sdpa(q, k, v, mask, 0.0, causal, scale=scale, enable_gqa=True)
            return run_gqa
        if scale_is_none and p.mask == MaskKind.NONE and not causal:  # the common call: SDPA's own defaults
            def run_plain(q, k, v, mask, scale):
                return sdpa(q, k, v)
            return run_plain
        if scale_is_none:  # keyword arguments cost ~100 ns per call on a builtin: none here
            def run_default_scale(q, k, v, mask, scale):
                return sdpa(q, k, v, mask, 0.0, causal)
            return run_default_scale

        def run(q, k, v, mask, scale):
            return sdpa(q, k, v, mask, 0.0, causal, scale=scale)
        return run


@register
class TorchMath(TorchBackend):
    """SDPA's reference math kernel (``aten._scaled_dot_product_attention_math``)."""

    name = BackendName.TORCH_MATH
    same_op_in_graph = False  # a composite operator: inductor decomposes it into matmuls and a fused softmax
    devices = frozenset({"cpu", "cuda"})
    dtypes = _ALL_FLOATS
    max_head_dim = 1 << 20
    same_head_dim_v = False
    masks = frozenset({MaskKind.BOOL, MaskKind.ADDITIVE, MaskKind.ADDITIVE_FLOAT32})
    mask_grad = True
    gqa = True
    efficiency = 0.05  # two matmuls in float32 and the scores through memory
    launch_ms = 0.03

    def predicted_bytes(self, p: Problem) -> int:
        """The b x n x s_q x s_kv scores and their softmax, in its compute dtype (float32 for 16-bit
        inputs: the math kernel upcasts q, k and v), plus those upcast copies and the output."""
        compute = 4 if p.dtype in (torch.float16, torch.bfloat16) else element_size(p.dtype)
        scores = 2 * p.batch * p.heads_q * p.seq_q * p.seq_kv * compute
        tensors = p.batch * (p.heads_q * p.seq_q * (p.head_dim + p.head_dim_v)
                             + p.heads_kv * p.seq_kv * (p.head_dim + p.head_dim_v)) * compute
        if p.requires_grad:
            scores *= 2
        return scores + tensors

    def forward(self, q, k, v, mask, scale, causal, window, need_grad):
        if mask is not None:
            mask = additive_mask(mask, q.dtype)
            if causal:  # the math kernel refuses a mask with is_causal: the top-left causal mask folded in,
                mask, causal = causal_mask(mask, q.shape[2], k.shape[2]), False  # as SDPA's CPU kernel applies both
        if q.shape[1] != k.shape[1]:
            if _MATH_GQA:
                return _aten._scaled_dot_product_attention_math(q, k, v, mask, 0.0, causal, None, scale=scale, enable_gqa=True)[0]
            k, v = repeat_kv(k, v, q.shape[1] // k.shape[1])
        return _aten._scaled_dot_product_attention_math(q, k, v, mask, 0.0, causal, None, scale=scale)[0]


@register
class TorchFlash(TorchBackend):
    """SDPA's FlashAttention kernel: ``aten._scaled_dot_product_flash_attention`` on CUDA and
    ``aten._scaled_dot_product_flash_attention_for_cpu`` on the CPU."""

    name = BackendName.TORCH_FLASH
    devices = frozenset({"cpu", "cuda"})
    dtypes = _ALL_FLOATS  # narrowed to 16-bit on CUDA in extra_reasons
    max_head_dim = 256
    masks = frozenset({MaskKind.BOOL, MaskKind.ADDITIVE, MaskKind.ADDITIVE_FLOAT32})  # CPU only; see extra_reasons
    causal_any_lengths = False
    efficiency = 0.32  # 317-345 TFLOP/s on an H200
    launch_ms = 0.018

    def extra_reasons(self, p: Problem, dev: Optional[DeviceInfo]) -> list:
        reasons = []
        if p.device_type == "cuda":
            if p.dtype not in (torch.float16, torch.bfloat16):
                reasons.append(f"dtype {p.dtype_name} not supported on CUDA (supports bfloat16, float16)")
            if p.mask != MaskKind.NONE:
                reasons.append("attn_mask not supported on CUDA (SDPA's flash kernel takes no mask)")
            if p.head_dim % 8:
                reasons.append(f"head dim {p.head_dim} not supported on CUDA (needs a multiple of 8)")
            if dev is not None and dev.capability is not None and dev.capability < (8, 0):
                reasons.append(f"GPU {dev.name} is too old; SDPA's flash kernel needs compute capability 8.0 or newer")
        return reasons

    def forward(self, q, k, v, mask, scale, causal, window, need_grad):
        q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
        if q.device.type == "cuda":
            return _aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)[0]
        if mask is not None:
            mask = additive_mask(mask, q.dtype)
        return _aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=mask, scale=scale)[0]

    def forward_lse(self, q, k, v, scale, causal):
        """``(out, lse)`` on ``b n s d`` views without a mask: the output and its log-sum-exp,
        (b, n, s_q) float32 (ring attention merges partial results with it)."""
        q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
        if q.device.type == "cuda":
            out, lse = _aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)[:2]
        else:
            out, lse = _aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)[:2]
        return out, _lse_3d(lse, q.shape[2])

    def bind(self, p: Problem, need_grad: bool, scale_is_none: bool = False):
        op = _aten._scaled_dot_product_flash_attention if p.device_type == "cuda" else _aten._scaled_dot_product_flash_attention_for_cpu
        fixed = (0.0, p.causal, False) if p.device_type == "cuda" else (0.0, p.causal)
        run = _bind_aten(self, TorchFlash, op, fixed, p, need_grad, scale_is_none)
        return run or super().bind(p, need_grad, scale_is_none)


@register
class TorchEfficient(TorchBackend):
    """SDPA's memory-efficient kernel (``aten._scaled_dot_product_efficient_attention``)."""

    name = BackendName.TORCH_EFFICIENT
    dtypes = frozenset({torch.float16, torch.bfloat16, torch.float32})
    max_head_dim = 512
    head_dim_multiple = 8
    min_capability = (5, 0)
    efficiency = 0.2  # 163-179 TFLOP/s on an H200
    launch_ms = 0.018

    def forward(self, q, k, v, mask, scale, causal, window, need_grad):
        q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
        return _aten._scaled_dot_product_efficient_attention(q, k, v, None, need_grad, 0.0, causal, scale=scale)[0]

    def forward_lse(self, q, k, v, scale, causal):
        """``(out, lse)`` without a mask; lse (b, n, s_q) float32."""
        q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
        out, lse = _aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal, scale=scale)[:2]
        return out, _lse_3d(lse, q.shape[2])

    def bind(self, p: Problem, need_grad: bool, scale_is_none: bool = False):
        run = _bind_aten(self, TorchEfficient, _aten._scaled_dot_product_efficient_attention, (None, need_grad, 0.0, p.causal), p, need_grad,
                         scale_is_none)
        return run or super().bind(p, need_grad, scale_is_none)


@register
class TorchCuDNN(TorchBackend):
    """SDPA's cuDNN kernel (``aten._scaled_dot_product_cudnn_attention``)."""

    name = BackendName.TORCH_CUDNN
    max_head_dim = 256
    head_dim_multiple = 8
    causal_any_lengths = False
    min_capability = (8, 0)
    efficiency = 0.55  # 562-609 TFLOP/s on an H200
    launch_ms = 0.018

    def _machine_reason(self) -> Optional[str]:
        reason = super()._machine_reason()
        if reason is None and not torch.backends.cudnn.is_available():
            return f"this torch ({torch.__version__}) was built without cuDNN"
        return reason

    def forward(self, q, k, v, mask, scale, causal, window, need_grad):
        q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
        return _aten._scaled_dot_product_cudnn_attention(q, k, v, None, need_grad, 0.0, causal, False, scale=scale)[0]

    def forward_lse(self, q, k, v, scale, causal):
        """``(out, lse)`` without a mask; lse (b, n, s_q) float32."""
        q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
        out, lse = _aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=scale)[:2]
        return out, _lse_3d(lse, q.shape[2])

    def bind(self, p: Problem, need_grad: bool, scale_is_none: bool = False):
        run = _bind_aten(self, TorchCuDNN, _aten._scaled_dot_product_cudnn_attention, (None, need_grad, 0.0, p.causal, False), p,
                         need_grad, scale_is_none)
        return run or super().bind(p, need_grad, scale_is_none)
