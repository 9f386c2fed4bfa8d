"""An FP8-emulating low-precision candidate for CPU tests of the quality tiers' machinery.

The package's own :class:`~diffsynth_attention.backends.fa3_fp8.FlashAttention3FP8` adapter (its
quantisation: K smoothing, per-(batch, kv-head) absmax scales, real ``float8_e4m3fn`` casts) is
registered on CPU over a fake ``flash_attn_interface`` whose ``flash_attn_func`` takes the e4m3
q, k, v and their descales as FlashAttention-3 does, dequantises them, and computes attention
in fp32 with the unnormalised probabilities rounded to e4m3 before P @ V (the kernel's
arithmetic; the row sums stay fp32). Its error therefore follows the data: about 5e-2 relative
L1 on random activations, 0.1-0.2 with outlier channels or peaked softmaxes. ``drift``: an
extra relative error added to its output (a kernel whose error changes at run time).
"""
import math
import sys
import types

import torch

from diffsynth_attention.backends import REGISTRY
from diffsynth_attention.backends.fa3_fp8 import FlashAttention3FP8

NAME = "flash_attention_3_fp8"


class Calls:
    """Every call of the fake kernel: (q dtype, q_descale shape, k_descale shape, v_descale shape)."""

    log: list = []


def fp8_interface(drift=None) -> types.ModuleType:
    """A ``flash_attn_interface`` module emulating FlashAttention-3's FP8 forward (b s n d)."""
    mod = types.ModuleType("flash_attn_interface")

    def flash_attn_func(q, k, v, softmax_scale=None, causal=False, qv=None, q_descale=None, k_descale=None,
                        v_descale=None, window_size=(-1, -1), **kwargs):
        Calls.log.append((q.dtype, tuple(q_descale.shape), tuple(k_descale.shape), tuple(v_descale.shape)))
        b, sq, hq, d = q.shape
        hk = k.shape[2]
        g = hq // hk
        qd = q.float() * q_descale.repeat_interleave(g, dim=1)[:, None, :, None]
        kd = (k.float() * k_descale[:, None, :, None]).repeat_interleave(g, dim=2)
        vd = (v.float() * v_descale[:, None, :, None]).repeat_interleave(g, dim=2)
        scale = 1 / math.sqrt(d) if softmax_scale is None else softmax_scale
        s = torch.einsum("bqhd,bkhd->bhqk", qd, kd) * scale
        if causal:
            s = s.masked_fill(torch.ones(sq, k.shape[1], dtype=torch.bool).triu(1), float("-inf"))
        p = torch.exp(s - s.amax(dim=-1, keepdim=True))
        rowsum = p.sum(dim=-1, keepdim=True)
        p8 = p.to(torch.float8_e4m3fn).float()
        out = torch.einsum("bhqk,bkhd->bqhd", p8 / rowsum, vd)
        if drift is not None and drift[0]:
            out = out * (1 + drift[0])
        return out.to(torch.bfloat16)  # the FP8 kernel writes bf16

    mod.flash_attn_func = flash_attn_func
    return mod


def install_fp8(monkeypatch, drift=None, devices=("cpu",)):
    """Register the FP8 adapter on CPU (bf16, fp16) as ``flash_attention_3_fp8``, over the fake
    interface. ``drift``: a one-item list; its value is added as a relative error when set.
    ``devices``: where it is declared able (``("cpu", "cuda")`` for the GPU tests)."""
    monkeypatch.setitem(sys.modules, "flash_attn_interface", fp8_interface(drift))
    cls = type("CpuFA3FP8", (FlashAttention3FP8,), {"devices": frozenset(devices), "capabilities": None,
                                                     "max_head_dim": 256, "head_dim_multiple": 8})
    backend = cls()
    backend.declare_build = lambda flags: None  # no flash_attn_config here: the class's declarations
    monkeypatch.setitem(REGISTRY, NAME, backend)
    Calls.log.clear()
    return backend
