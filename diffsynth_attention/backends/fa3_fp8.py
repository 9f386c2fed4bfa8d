"""FlashAttention-3 in FP8 (Hopper): ``flash_attn_interface.flash_attn_func`` on ``float8_e4m3fn``
q, k and v with per-(batch, kv-head) ``q_descale``, ``k_descale`` and ``v_descale``.

A low-precision candidate (``low_precision``): used only in the ``balanced`` and ``fast``
quality tiers, where the gate admits it on the caller's own activations (docs/quality.md).

The quantisation is part of the candidate, so its timing includes it:

- K is smoothed first: its mean over the sequence is subtracted (per batch, head and channel).
  Softmax does not change (every score of a query row moves by the same q . mean(k)), and the
  outlier-free remainder quantises with a smaller scale.
- q, k and v are scaled per (batch, head) by their absolute maximum into e4m3's range (448,
  with a margin), and cast; q's scale is per kv head (the kernel takes one q_descale per
  (batch, kv head)), the maximum over the query heads of the group. The descales are exactly
  the inverses of the 16-bit factors applied, so no systematic scale error is left.
- The ops are vectorised over every head at once (one absmax reduction, one multiply-and-cast
  per tensor); on CUDA they are compiled with ``torch.compile`` into fused kernels at first use,
  eager where compilation fails (logged once).

Its capabilities are FlashAttention-3's (same package, same build flags) minus gradients and
windows, and it needs a build with FP8 on (``FLASHATTENTION_DISABLE_FP8`` off): it is never a
candidate where FlashAttention-3 is not, so it adds nothing to a key's versions.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from ..backend_names import BackendName
from ..problem import Problem
from .base import DeviceInfo, register
from .flash_attention import FlashAttention3

logger = logging.getLogger("diffsynth_attention")

FP8_MAX = 448.0  # float8_e4m3fn's largest finite value
FP8_TARGET = 440.0  # the absmax lands here: a 16-bit factor rounded up stays below 448


def _factor(amax: torch.Tensor, dtype: torch.dtype) -> tuple:
    """(factor in ``dtype``, descale in fp32 = 1 / that factor) for per-head absmax ``amax``."""
    factor = (FP8_TARGET / amax.float().clamp_min(1e-30)).clamp(max=torch.finfo(dtype).max / 4).to(dtype)
    return factor, factor.float().reciprocal()


def quantize_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, smooth_k: bool = True) -> tuple:
    """``(q8, k8, v8, q_descale, k_descale, v_descale)`` for ``b s n d`` 16-bit inputs: e4m3 tensors
    (same layout) and (batch, kv-heads) fp32 descales. The inputs are not modified."""
    fp8 = torch.float8_e4m3fn
    b, nq, nk = q.shape[0], q.shape[2], k.shape[2]
    # Per-(batch, head) maxima in two steps: over the head dim first (contiguous rows, one output
    # per token and head: a reduction every thread block can share), then over the tokens of a
    # small (b, s, n) tensor. Reduced over (s, d) at once, 12 heads gave 12 outputs to spread a
    # 100 MB read over: 0.80 ms of quantisation against 0.53 ms for 24 heads of 168 MB (H100).
    qa = q.abs().amax(dim=3).amax(dim=1).view(b, nk, nq // nk).amax(dim=2)  # per (batch, kv head): the group's max
    if smooth_k:
        # One pass over K for its mean and its per-channel range: max |k - mean| over a channel is
        # max(hi - mean, mean - lo), the same value the subtraction would give element by element.
        mean = k.mean(dim=1, keepdim=True)
        hi, lo = k.amax(dim=1, keepdim=True), k.amin(dim=1, keepdim=True)
        ka = torch.maximum(hi - mean, mean - lo).amax(dim=(1, 3))
        k = k - mean
    else:
        ka = k.abs().amax(dim=3).amax(dim=1)
    va = v.abs().amax(dim=3).amax(dim=1)
    qf, qd = _factor(qa, q.dtype)
    kf, kd = _factor(ka, k.dtype)
    vf, vd = _factor(va, v.dtype)
    q8 = (q * qf.repeat_interleave(nq // nk, dim=1)[:, None, :, None]).to(fp8)
    k8 = (k * kf[:, None, :, None]).to(fp8)
    v8 = (v * vf[:, None, :, None]).to(fp8)
    return q8, k8, v8, qd, kd, vd


_compiled = {}


def fused_quantize(q, k, v):
    """:func:`quantize_fp8`, compiled by ``torch.compile`` on CUDA (fused: one pass per reduction
    and per cast); eager on other devices and where compilation fails."""
    if q.device.type != "cuda":
        return quantize_fp8(q, k, v)
    fn = _compiled.get("fn")
    if fn is None:
        try:
            fn = torch.compile(quantize_fp8, dynamic=None)
        except Exception as exc:  # no compiler here: eager
            logger.info("FP8 quantisation not compiled (%s): eager", exc)
            fn = quantize_fp8
        _compiled["fn"] = fn
    if fn is quantize_fp8:
        return fn(q, k, v)
    try:
        return fn(q, k, v)
    except Exception as exc:  # a compiler failure at first call: eager from now on
        logger.warning("torch.compile of the FP8 quantisation failed (%s); quantising eagerly", str(exc).splitlines()[0][:200])
        _compiled["fn"] = quantize_fp8
        return quantize_fp8(q, k, v)


@register
class FlashAttention3FP8(FlashAttention3):
    """FlashAttention-3's FP8 forward, quantisation included (see the module's text)."""

    name = BackendName.FLASH_ATTENTION_3_FP8
    diffsynth_priority = None  # not one of DiffSynth-Studio's routes
    exact = False
    low_precision = True
    backward = False
    window = False
    efficiency = 0.95  # FP8 kernel 1.26-1.35x bf16 FlashAttention-3 (H100, issue 32), quantisation extra
    launch_ms = 0.06  # the quantisation's few kernels
    head_dim_multiple = 16  # FP8 mha_fwd: "head_size should be a multiple of 16" (H100, d 40)
    forward_lse = None  # no log-sum-exp route: not an LSE backend (integrations/lse.py)

    def declare_build(self, flags: dict) -> None:
        super().declare_build(flags)
        self.backward = False
        self.window = False

    def extra_reasons(self, p: Problem, dev: Optional[DeviceInfo]) -> list:
        reasons = list(super().extra_reasons(p, dev))
        if not self.fp8:
            reasons.append("this FlashAttention-3 build has FP8 off (FLASHATTENTION_DISABLE_FP8)")
        return reasons

    def _call(self, q, k, v, scale, causal, window):
        q8, k8, v8, qd, kd, vd = fused_quantize(q, k, v)
        out = self._func(q8, k8, v8, softmax_scale=scale, causal=causal, q_descale=qd, k_descale=kd, v_descale=vd)
        if isinstance(out, tuple):
            out = out[0]
        return out if out.dtype == q.dtype else out.to(q.dtype)
