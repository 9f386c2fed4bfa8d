"""The fp32 reference the numeric gate compares against, and the error metric.

The reference covers a slice of the problem (batch 0 and at most two heads) and is computed in
query chunks, so a 75,000-token problem needs a few hundred MB, never a full copy. It is computed
in float64 (on a device without float64, in float32), so it is exact to fp32 whatever the process
allows for fp32 matmuls (TF32 would put it off by ~4e-4, more than the fp32 tolerance), without
touching that process-wide setting: another thread's fp32 matmuls never see a tuning run.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

_SCORES_PER_CHUNK = 1 << 24  # 16 M float64 scores, 128 MB


def _exact_dtype(device: torch.device) -> torch.dtype:
    """float64 where the device has it (TF32 and reduced-precision fp32 matmuls never apply to it)."""
    return torch.float32 if device.type == "mps" else torch.float64


def gate_heads(heads_q: int) -> list:
    """The query heads the gate checks: the first and the last (at most two)."""
    return [0] if heads_q == 1 else [0, heads_q - 1]


def reference_slice(q, k, v, mask, scale: Optional[float], causal: bool, window: Optional[int], heads: Sequence[int]) -> torch.Tensor:
    """Attention for batch 0 and ``heads`` of ``b n s d`` inputs, computed in float64: fp32, shape
    (len(heads), s_q, d_v).

    Semantics: PyTorch's top-left causal mask; ``window`` keeps keys with |i - j| <= window; a
    boolean mask keeps True; an additive mask is added to the scores; rows with no key left
    give 0, as SDPA does.
    """
    s_q, s_kv, d = q.shape[2], k.shape[2], q.shape[3]
    groups = q.shape[1] // k.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    chunk = max(1, min(s_q, _SCORES_PER_CHUNK // max(s_kv, 1)))
    out = torch.empty(len(heads), s_q, v.shape[3], dtype=torch.float32, device=q.device)
    kj = torch.arange(s_kv, device=q.device)
    _fill(out, q, k, v, mask, scale, causal, window, heads, groups, chunk, kj, _exact_dtype(q.device))
    return out


def _fill(out, q, k, v, mask, scale, causal, window, heads, groups, chunk, kj, exact) -> None:
    s_q = q.shape[2]
    for hi, h in enumerate(heads):
        kh = k[0, h // groups].to(exact)
        vh = v[0, h // groups].to(exact)
        for start in range(0, s_q, chunk):
            end = min(start + chunk, s_q)
            scores = (q[0, h, start:end].to(exact) @ kh.transpose(0, 1)) * scale
            if mask is not None:
                m = mask[0, h if mask.shape[1] > 1 else 0]
                m = m[start:end] if m.shape[0] > 1 else m
                if m.dtype == torch.bool:
                    scores = scores.masked_fill(~m, float("-inf"))
                else:
                    scores = scores + m.to(exact)
            if causal or window is not None:
                qi = torch.arange(start, end, device=q.device).unsqueeze(1)
                drop = (kj.unsqueeze(0) > qi) if causal else ((qi - kj.unsqueeze(0)).abs() > window)
                scores = scores.masked_fill(drop, float("-inf"))
            probs = torch.softmax(scores, dim=-1).nan_to_num_(nan=0.0)
            out[hi, start:end] = probs @ vh


def relative_l1(out: torch.Tensor, ref: torch.Tensor) -> float:
    """sum |out - ref| / sum |ref|; inf if ``out`` has a NaN or an Inf."""
    out = out.float()
    if not bool(torch.isfinite(out).all()):
        return float("inf")
    denom = float(ref.abs().sum())
    num = float((out - ref).abs().sum())
    if denom == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / denom


def cosine(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Cosine similarity of the flattened ``out`` and ``ref`` (the SageAttention papers' second
    metric), accumulated in float64: 1.0 when both are zero, 0.0 when only one is, NaN-free (a
    NaN or Inf gives -1)."""
    a, b = out.double().flatten(), ref.double().flatten()  # fp32 sums over millions of elements drift by 1e-4
    if not bool(torch.isfinite(a).all()):
        return -1.0
    na, nb = float(a.norm()), float(b.norm())
    if na == 0.0 or nb == 0.0:
        return 1.0 if na == nb else 0.0
    return float((a @ b) / (na * nb))
