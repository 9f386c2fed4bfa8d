"""A fuzz suite of realistic attention activations, and CPU emulations of the low-precision
kernels' arithmetic, to choose and check the quality tiers' bounds (docs/quality.md).

No real weights can be downloaded here, so the suite builds q, k and v with what real diffusion
transformers show and what hurts 8-bit and FP8 attention:

- **outlier channels**: a few channels of q and k 10-50x the rest (LLM.int8, SmoothQuant,
  SageAttention report them in every large transformer);
- **a non-zero mean K**: every key shares a large common component (SageAttention's reason to
  smooth K);
- **rotary embeddings** applied to q and k (Wan, HunyuanVideo and Flux use RoPE over the
  video's axes), which rotates outlier pairs across positions;
- **peaked softmaxes**: larger logits, so a few keys take most of the probability (the heads
  that attend to one token).

:func:`cases` yields named :class:`FuzzCase` values (``b n s d`` tensors). The emulations run
on any device, in float32 around real ``float8_e4m3fn`` / int8 rounding:

- :func:`emulate_fp8`: FlashAttention-3's FP8 path: q, k (smoothed) and v per-(batch, head)
  absmax-scaled to e4m3, and the unnormalised probabilities P = exp(s - rowmax) rounded to e4m3
  before P @ V (the row sums stay fp32), as the kernel does;
- :func:`emulate_sage`: SageAttention 1's scheme: K smoothed, q and k int8 per block (128 query
  rows, 64 key rows) of each head, P and V in fp16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from ..callsite import dtype_name

FP8 = torch.float8_e4m3fn


@dataclass
class FuzzCase:
    name: str
    q: torch.Tensor  # b n s d
    k: torch.Tensor
    v: torch.Tensor
    params: dict


def rope(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary embedding over the sequence axis of a ``b n s d`` tensor (pairs of channels
    (i, i + d/2), as Wan and HunyuanVideo apply it)."""
    s, d = x.shape[2], x.shape[3]
    half = d // 2
    freqs = base ** (-torch.arange(half, dtype=torch.float32, device=x.device) / half)
    angles = torch.arange(s, dtype=torch.float32, device=x.device)[:, None] * freqs[None, :]
    cos, sin = angles.cos(), angles.sin()
    xf = x.float()
    a, b = xf[..., :half], xf[..., half:2 * half]
    out = torch.cat([a * cos - b * sin, a * sin + b * cos, xf[..., 2 * half:]], dim=-1)
    return out.to(x.dtype)


def make_case(name: str, batch: int = 1, heads: int = 4, seq: int = 1024, head_dim: int = 64,
              dtype: torch.dtype = torch.bfloat16, device="cpu", outlier_channels: int = 0,
              outlier_scale: float = 1.0, k_mean: float = 0.0, rotary: bool = False, peak: float = 1.0,
              seq_kv: Optional[int] = None, seed: int = 0) -> FuzzCase:
    """One case: q, k, v ~ N(0, 1); ``outlier_channels`` channels of q and k scaled by
    ``outlier_scale``; ``k_mean`` times a random unit-variance per-channel offset added to every
    key; ``rotary`` embeddings applied; q scaled by ``peak`` (larger logits: peakier softmax)."""
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)  # generated where it is used (video sizes on a GPU)
    gc = torch.Generator().manual_seed(seed)
    s_kv = seq if seq_kv is None else seq_kv
    q = torch.randn(batch, heads, seq, head_dim, generator=g, device=device)
    k = torch.randn(batch, heads, s_kv, head_dim, generator=g, device=device)
    v = torch.randn(batch, heads, s_kv, head_dim, generator=g, device=device)
    if outlier_channels:
        idx = torch.randperm(head_dim, generator=gc)[:outlier_channels].to(device)
        q[..., idx] *= outlier_scale
        k[..., idx] *= outlier_scale
    if k_mean:
        k = k + k_mean * torch.randn(1, heads, 1, head_dim, generator=gc).to(device)
    q = q * peak
    q, k, v = (t.to(dtype=dtype) for t in (q, k, v))
    if rotary:
        q, k = rope(q), rope(k)
    params = {"batch": batch, "heads": heads, "seq": seq, "seq_kv": s_kv, "head_dim": head_dim,
              "dtype": dtype_name(dtype), "outlier_channels": outlier_channels,
              "outlier_scale": outlier_scale, "k_mean": k_mean, "rotary": rotary, "peak": peak, "seed": seed}
    return FuzzCase(name, q, k, v, params)


# The suite: name -> make_case arguments. Benign cases first, then each hazard, then together.
SUITE = {
    "randn": {},
    "rotary": {"rotary": True},
    "k_mean_4": {"k_mean": 4.0, "rotary": True},
    "outliers_10x": {"outlier_channels": 4, "outlier_scale": 10.0, "rotary": True},
    "outliers_20x_k_mean": {"outlier_channels": 4, "outlier_scale": 20.0, "k_mean": 4.0, "rotary": True},
    "outliers_50x": {"outlier_channels": 2, "outlier_scale": 50.0, "rotary": True},
    "peaked_2x": {"peak": 2.0, "rotary": True},
    "peaked_4x": {"peak": 4.0, "rotary": True},
    "peaked_4x_outliers_20x": {"peak": 4.0, "outlier_channels": 4, "outlier_scale": 20.0, "k_mean": 4.0, "rotary": True},
}


def cases(seq: int = 1024, heads: int = 4, head_dim: int = 64, batch: int = 1, dtype: torch.dtype = torch.bfloat16,
          device="cpu", seeds=(0,), names=None) -> Iterator[FuzzCase]:
    """Every case of :data:`SUITE` (or of ``names``) at the given size, once per seed."""
    for seed in seeds:
        for name, kw in SUITE.items():
            if names is None or name in names:
                yield make_case(name if len(seeds) == 1 else f"{name}/seed{seed}", batch=batch, heads=heads, seq=seq,
                                head_dim=head_dim, dtype=dtype, device=device, seed=seed, **kw)


# -- reference and metrics --------------------------------------------------------------------------------
def reference(q, k, v, scale: Optional[float] = None) -> torch.Tensor:
    """fp32 attention of ``b n s d`` tensors (full precision matmuls)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    return torch.softmax(s, dim=-1) @ v.float()


def errors(out: torch.Tensor, ref: torch.Tensor) -> dict:
    """Relative L1 and cosine similarity of ``out`` against ``ref``, overall and per (batch, head)."""
    o, r = out.double(), ref.double()  # float64 sums: fp32 ones over millions of elements drift by 1e-4
    per_head_l1 = ((o - r).abs().sum(dim=(-1, -2)) / r.abs().sum(dim=(-1, -2))).flatten()
    of, rf = o.flatten(-2), r.flatten(-2)
    per_head_cos = torch.nn.functional.cosine_similarity(of, rf, dim=-1).flatten()
    return {"rel_l1": float((o - r).abs().sum() / r.abs().sum()),
            "cosine": float(torch.nn.functional.cosine_similarity(o.flatten(), r.flatten(), dim=0)),
            "per_head_rel_l1": per_head_l1.tolist(), "per_head_cosine": per_head_cos.tolist()}


# -- emulations -----------------------------------------------------------------------------------------
def _fp8_per_head(t: torch.Tensor) -> torch.Tensor:
    """``t`` (b n s d) through e4m3 with a per-(batch, head) absmax scale, back in fp32."""
    amax = t.float().abs().amax(dim=(2, 3), keepdim=True).clamp_min(1e-30)
    scale = amax / 448.0
    return (t.float() / scale).to(FP8).float() * scale


def emulate_fp8(q, k, v, scale: Optional[float] = None, smooth_k: bool = True, quantize_p: bool = True) -> torch.Tensor:
    """FlashAttention-3 FP8's arithmetic in fp32 around real e4m3 rounding (see the module)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    kf = k.float()
    if smooth_k:
        kf = kf - kf.mean(dim=2, keepdim=True)
    q8, k8, v8 = _fp8_per_head(q), _fp8_per_head(kf), _fp8_per_head(v)
    s = (q8 @ k8.transpose(-1, -2)) * scale
    p = torch.exp(s - s.amax(dim=-1, keepdim=True))
    rowsum = p.sum(dim=-1, keepdim=True)
    if quantize_p:
        p = p.to(FP8).float()
    return ((p @ v8) / rowsum).to(q.dtype)


def _int8_blocks(t: torch.Tensor, block: int) -> torch.Tensor:
    """``t`` (b n s d) through int8 with one absmax scale per block of ``block`` rows, in fp32."""
    b, n, s, d = t.shape
    pad = (-s) % block
    tf = torch.nn.functional.pad(t.float(), (0, 0, 0, pad)).view(b, n, -1, block, d)
    scale = tf.abs().amax(dim=(3, 4), keepdim=True).clamp_min(1e-30) / 127.0
    out = (tf / scale).round().clamp(-127, 127) * scale
    return out.view(b, n, s + pad, d)[:, :, :s]


def emulate_sage(q, k, v, scale: Optional[float] = None) -> torch.Tensor:
    """SageAttention 1's arithmetic (K smoothed, int8 q/k per block, fp16 P and V)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    kf = k.float() - k.float().mean(dim=2, keepdim=True)
    s = (_int8_blocks(q, 128) @ _int8_blocks(kf, 64).transpose(-1, -2)) * scale
    p = torch.exp(s - s.amax(dim=-1, keepdim=True))
    rowsum = p.sum(dim=-1, keepdim=True)
    out = p.half().float() @ v.half().float()
    return (out / rowsum).to(q.dtype)


def emulate_exact(q, k, v, scale: Optional[float] = None) -> torch.Tensor:
    """An exact 16-bit kernel's result: fp32 arithmetic, the output rounded to the input dtype."""
    return reference(q, k, v, scale).to(q.dtype)


EMULATIONS = {"exact": emulate_exact, "sage_int8": emulate_sage, "fa3_fp8": emulate_fp8}

__all__ = ["EMULATIONS", "FuzzCase", "SUITE", "cases", "emulate_exact", "emulate_fp8", "emulate_sage", "errors",
           "make_case", "reference", "rope"]
