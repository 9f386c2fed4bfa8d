"""Fake kernel packages with the real packages' signatures, computing attention with torch on
the CPU, and recording what they were given. They follow the documented semantics: bottom-right
causal/window alignment for FlashAttention, (out, lse) tuples where the real ones return them,
sageattention 1.x's in-place smooth_k, xFormers' BMHK layout and LowerTriangularMask."""
import math
import types

import torch


def _attend_bsnd(q, k, v, scale, causal, window, bottom_right=True):
    """Reference on b s n d tensors; FlashAttention's alignment (bottom right)."""
    b, sq, hq, d = q.shape
    skv, hk = k.shape[1], k.shape[2]
    k = k.repeat_interleave(hq // hk, dim=2)
    v = v.repeat_interleave(hq // hk, dim=2)
    scale = 1 / math.sqrt(d) if scale is None else scale
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale
    i = torch.arange(sq).unsqueeze(1) + (skv - sq if bottom_right else 0)
    j = torch.arange(skv).unsqueeze(0)
    if causal:
        s = s.masked_fill(j > i, float("-inf"))
    if window is not None:
        left, right = window
        if left is not None and left >= 0:
            s = s.masked_fill(j < i - left, float("-inf"))
        if right is not None and right >= 0:
            s = s.masked_fill(j > i + right, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return torch.einsum("bhqk,bkhd->bqhd", p, v.float()).to(q.dtype)


class Recorder:
    calls: list = []


def make_fa2(version="2.6.3"):
    mod = types.ModuleType("flash_attn")
    mod.__version__ = version

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                        alibi_slopes=None, deterministic=False, return_attn_probs=False):
        assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1, "last dim must be contiguous"
        Recorder.calls.append(("fa2", q, k, v, dict(softmax_scale=softmax_scale, causal=causal, window_size=window_size)))
        return _attend_bsnd(q, k, v, softmax_scale, causal, window_size)

    mod.flash_attn_func = flash_attn_func
    return mod


def make_fa3(returns_tuple=True):
    mod = types.ModuleType("flash_attn_interface")

    def flash_attn_func(q, k, v, softmax_scale=None, causal=False, qv=None, q_descale=None, k_descale=None, v_descale=None,
                        window_size=(-1, -1), attention_chunk=0, softcap=0.0, num_splits=1, pack_gqa=None,
                        deterministic=False, sm_margin=0, return_attn_probs=False):
        Recorder.calls.append(("fa3", q, k, v, dict(softmax_scale=softmax_scale, causal=causal, window_size=window_size)))
        out = _attend_bsnd(q, k, v, softmax_scale, causal, window_size)
        return (out, torch.zeros(q.shape[0], q.shape[2], q.shape[1])) if returns_tuple else out

    mod.flash_attn_func = flash_attn_func
    return mod


def _lse_bsnd(q, k, scale, causal, window):
    """The log-sum-exp FlashAttention returns: (b, n, s_q), fp32, bottom-right alignment."""
    b, sq, hq, d = q.shape
    skv, hk = k.shape[1], k.shape[2]
    k = k.repeat_interleave(hq // hk, dim=2)
    scale = 1 / math.sqrt(d) if scale is None else scale
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale
    i = torch.arange(sq).unsqueeze(1) + (skv - sq)
    j = torch.arange(skv).unsqueeze(0)
    if causal:
        s = s.masked_fill(j > i, float("-inf"))
    return torch.logsumexp(s, -1)


def make_fa4():
    """flash_attn.cute with flash_attn_func (out, lse) and the interface's _flash_attn_bwd; every
    forward and backward call is recorded ("fa4", "fa4_bwd")."""
    pkg = types.ModuleType("flash_attn")
    pkg.__path__ = []
    cute = types.ModuleType("flash_attn.cute")
    cute.__path__ = []
    interface = types.ModuleType("flash_attn.cute.interface")

    def _flash_attn_bwd(q, k, v, out, dout, lse, softmax_scale=None, causal=False, softcap=0.0, window_size_left=None,
                        window_size_right=None, **kw):
        Recorder.calls.append(("fa4_bwd", q, k, v, dict(softmax_scale=softmax_scale, causal=causal)))
        assert torch.allclose(lse, _lse_bsnd(q, k, softmax_scale, causal, None), atol=1e-4), "lse is not the forward's"
        with torch.enable_grad():
            qd, kd, vd = (t.detach().requires_grad_(True) for t in (q, k, v))
            o = _attend_bsnd(qd, kd, vd, softmax_scale, causal, (window_size_left, window_size_right))
            return torch.autograd.grad(o, (qd, kd, vd), dout)

    interface._flash_attn_bwd = _flash_attn_bwd
    cute.interface = interface

    def flash_attn_func(q, k, v, qv=None, gather_kv_indices=None, softmax_scale=None, causal=False,
                        window_size=(None, None), learnable_sink=None, softcap=0.0, num_splits=1, pack_gqa=None,
                        deterministic=False, score_mod=None, score_mod_bwd=None, mask_mod=None, aux_tensors=None,
                        aux_scalars=None, block_sparse_tensors=None, block_sparse_tensors_bwd=None, return_lse=False,
                        gather_bwd_recompute_p=False, gather_bwd_token_chunk=None):
        Recorder.calls.append(("fa4", q, k, v, dict(softmax_scale=softmax_scale, causal=causal, window_size=window_size)))
        out = _attend_bsnd(q, k, v, softmax_scale, causal, window_size)
        return out, _lse_bsnd(q, k, softmax_scale, causal, window_size)

    cute.flash_attn_func = flash_attn_func
    pkg.cute = cute
    return pkg, cute


def make_sage(smooth_in_place=True):
    mod = types.ModuleType("sageattention")

    def sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None, smooth_k=True, **kwargs):
        assert tensor_layout == "HND"
        assert q.size(-1) in (64, 96, 128), "headdim should be in [64, 96, 128]."
        if smooth_k and smooth_in_place:
            k -= k.mean(dim=2, keepdim=True)  # what 1.0.6 does
        elif smooth_k:
            k = k - k.mean(dim=2, keepdim=True)
        Recorder.calls.append(("sage", q, k, v, dict(is_causal=is_causal, sm_scale=sm_scale)))
        out = _attend_bsnd(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), sm_scale, is_causal, None)
        return out.transpose(1, 2)

    mod.sageattn = sageattn
    return mod


class LowerTriangularMask:
    """xFormers' causal bias: top-left aligned."""


def make_xformers(cpp_ok=True):
    pkg = types.ModuleType("xformers")
    pkg.__path__ = []
    pkg._has_cpp_library = cpp_ok
    cpp = types.ModuleType("xformers._cpp_lib")
    cpp._cpp_library_load_exception = None if cpp_ok else ImportError("xFormers was built for PyTorch 2.10.0+cu128")
    pkg._cpp_lib = cpp
    ops = types.ModuleType("xformers.ops")

    def memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None, *, op=None, output_dtype=None):
        Recorder.calls.append(("xformers", query, key, value, dict(attn_bias=attn_bias, scale=scale)))
        causal = isinstance(attn_bias, LowerTriangularMask)
        if isinstance(attn_bias, torch.Tensor):
            assert attn_bias.stride(-2) % 8 == 0, "attn_bias storage must be 8-aligned"
            b, sq, h, d = query.shape
            s = torch.einsum("bqhd,bkhd->bhqk", query.float(), key.float()) * (scale or 1 / math.sqrt(d)) + attn_bias.float()
            return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1).nan_to_num(0.0), value.float()).to(query.dtype)
        return _attend_bsnd(query, key, value, scale, causal, None, bottom_right=False)

    ops.memory_efficient_attention = memory_efficient_attention
    ops.LowerTriangularMask = LowerTriangularMask
    pkg.ops = ops
    return pkg, ops


# flash_attn_config.py of the tokenspeed-fa3 3.0.0.post20260810 wheel (copied from the wheel).
TOKENSPEED_FA3_FLAGS = {
    'FLASHATTENTION_DISABLE_BACKWARD': True, 'FLASHATTENTION_DISABLE_SPLIT': False, 'FLASHATTENTION_DISABLE_PAGEDKV': False,
    'FLASHATTENTION_DISABLE_APPENDKV': False, 'FLASHATTENTION_DISABLE_LOCAL': False, 'FLASHATTENTION_DISABLE_SOFTCAP': True,
    'FLASHATTENTION_DISABLE_PACKGQA': False, 'FLASHATTENTION_DISABLE_FP16': False, 'FLASHATTENTION_DISABLE_FP8': False,
    'FLASHATTENTION_DISABLE_VARLEN': False, 'FLASHATTENTION_DISABLE_CLUSTER': False, 'FLASHATTENTION_DISABLE_HDIM64': False,
    'FLASHATTENTION_DISABLE_HDIM96': True, 'FLASHATTENTION_DISABLE_HDIM128': False, 'FLASHATTENTION_DISABLE_HDIM192': False,
    'FLASHATTENTION_DISABLE_HDIM256': False, 'FLASHATTENTION_DISABLE_SM8x': True, 'FLASHATTENTION_ENABLE_VCOLMAJOR': False,
    'FLASH_ATTENTION_DISABLE_HDIMDIFF64': True, 'FLASH_ATTENTION_DISABLE_HDIMDIFF192': True,
}


def make_fa3_config(**changes):
    """A ``flash_attn_config`` module as FlashAttention-3's setup.py writes it (tokenspeed-fa3's flags by default)."""
    mod = types.ModuleType("flash_attn_config")
    mod.CONFIG = {"build_flags": {**TOKENSPEED_FA3_FLAGS, **changes}}
    return mod
