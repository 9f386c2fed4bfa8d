"""Fakes of the internals the thin kernel calls use (backends/thin.py), on the CPU:

- FlashAttention-3's operator, defined for real with torch.library under a test namespace and
  the schema of tokenspeed-fa3 3.0.0.post20260810 (so torch checks every argument's position
  and type), recording its calls;
- FlashAttention-4's interface: ``_flash_attn_fwd`` deriving a compile key, compiling into
  ``_flash_attn_fwd.compile_cache`` (a JITCache-like object) on a miss and calling the compiled
  kernel with (q, k, v, out, lse, scale, ..., window left/right, AuxData), as 4.0.0b36 does.
"""
import sys
import types
from typing import NamedTuple

import torch

from diffsynth_attention.backends import REGISTRY, flash_attention
from diffsynth_attention.backends.flash_attention import FlashAttention4

from support.fake_kernels import _attend_bsnd

FA3_SCHEMA = (
    "fwd(Tensor q,Tensor k,Tensor v,Tensor(k_new!)? k_new = None,Tensor(v_new!)? v_new = None,Tensor? q_v = None,"
    "Tensor(out!)? out = None,Tensor? cu_seqlens_q = None,Tensor? cu_seqlens_k = None,Tensor? cu_seqlens_k_new = None,"
    "Tensor? seqused_q = None,Tensor? seqused_k = None,int? max_seqlen_q = None,int? max_seqlen_k = None,"
    "Tensor? page_table = None,Tensor? kv_batch_idx = None,Tensor? leftpad_k = None,Tensor? rotary_cos = None,"
    "Tensor? rotary_sin = None,Tensor? seqlens_rotary = None,Tensor? q_descale = None,Tensor? k_descale = None,"
    "Tensor? v_descale = None,float? softmax_scale = None,bool is_causal = False,int window_size_left = -1,"
    "int window_size_right = -1,int attention_chunk = 0,float softcap = 0.0,bool is_rotary_interleaved = False,"
    "Tensor? scheduler_metadata = None,int num_splits = 0,bool? pack_gqa = None,int sm_margin = 0,"
    "Tensor? sinks = None) -> (Tensor(out!), Tensor, Tensor, Tensor)")
FA3_NAMESPACE = "da_test_fa3"
FA3_CALLS: list = []  # the operator's calls: the 35 arguments as the kernel got them

_lib = None


def fa3_ops():
    """The test namespace holding the fake ``fwd`` (defined once per process)."""
    global _lib
    if _lib is None:
        lib = torch.library.Library(FA3_NAMESPACE, "DEF")
        lib.define(FA3_SCHEMA)

        def fwd(q, k, v, *rest):
            # torch leaves out trailing arguments equal to their defaults: put them back
            arguments = getattr(torch.ops, FA3_NAMESPACE).fwd.default._schema.arguments
            rest = tuple(rest) + tuple(a.default_value for a in arguments[3 + len(rest):])
            FA3_CALLS.append((q, k, v) + rest)
            scale, causal, left, right = rest[20], rest[21], rest[22], rest[23]
            out = _attend_bsnd(q, k, v, scale, causal, (left, right) if left >= 0 or right >= 0 else None)
            lse = torch.zeros(q.shape[0], q.shape[2], q.shape[1])
            return out, lse, torch.empty(0), torch.empty(0)

        lib.impl("fwd", fwd, "CPU")
        _lib = lib
    return getattr(torch.ops, FA3_NAMESPACE)


class AuxData(NamedTuple):
    tensors: tuple = None
    scalars: tuple = None


class JITCache:
    def __init__(self):
        self.cache = {}

    def __contains__(self, key):
        return key in self.cache

    def __getitem__(self, key):
        return self.cache[key]

    def __setitem__(self, key, fn):
        self.cache[key] = fn


class Kernel:
    """A 'compiled' forward: writes attention into ``out``; counts its calls."""

    def __init__(self, key):
        self.key, self.calls = key, 0

    def __call__(self, q, k, v, out, lse, scale, cu_q, cu_k, used_q, used_k, page_table, left, right, sink, sparse, aux):
        self.calls += 1
        causal = self.key[2]
        out.copy_(_attend_bsnd(q, k, v, scale, causal, (left, right) if (left, right) != (None, None) else None))


def make_fa4_interface(copies=False, kernel_calls=1, lse_always=False):
    """(pkg, cute, interface) modules. ``copies``: the interface copies q before the kernel (as
    for a misaligned input); ``kernel_calls``: compiled calls per package call; ``lse_always``:
    an lse tensor is passed to the kernel. ``interface.counts`` counts package calls and compilations."""
    pkg = types.ModuleType("flash_attn")
    pkg.__path__ = []
    cute = types.ModuleType("flash_attn.cute")
    cute.__path__ = []
    interface = types.ModuleType("flash_attn.cute.interface")
    counts = {"func": 0, "compiles": 0}

    def _flash_attn_fwd(q, k, v, qv=None, softmax_scale=None, causal=False, window_size_left=None,
                        window_size_right=None, return_lse=False, **kw):
        q = q.clone() if copies or q.data_ptr() % 16 else q
        b, sq, h, d = q.shape
        scale = d ** -0.5 if softmax_scale is None else softmax_scale
        out = torch.empty(b, sq, h, v.shape[-1], dtype=q.dtype, device=q.device)
        lse = torch.empty(b, h, sq) if (return_lse or lse_always) else None
        key = (q.dtype, d, causal, window_size_left, lse is None)
        if key not in _flash_attn_fwd.compile_cache:
            counts["compiles"] += 1
            _flash_attn_fwd.compile_cache[key] = Kernel(key)
        for _ in range(kernel_calls):
            _flash_attn_fwd.compile_cache[key](q, k, v, out, lse, scale, None, None, None, None, None,
                                               window_size_left, window_size_right, None, None, AuxData(None, None))
        return out, lse

    _flash_attn_fwd.compile_cache = JITCache()

    def flash_attn_func(q, k, v, qv=None, gather_kv_indices=None, softmax_scale=None, causal=False,
                        window_size=(None, None), learnable_sink=None, softcap=0.0, num_splits=1, pack_gqa=None,
                        deterministic=False, return_lse=False, **kw):
        counts["func"] += 1
        return _flash_attn_fwd(q, k, v, softmax_scale=softmax_scale, causal=causal, window_size_left=window_size[0],
                               window_size_right=window_size[1], return_lse=return_lse)

    interface._flash_attn_fwd = _flash_attn_fwd
    interface.flash_attn_func = flash_attn_func
    interface.counts = counts
    cute.interface = interface
    cute.flash_attn_func = flash_attn_func
    return pkg, cute, interface


def on_cpu(cls):
    """A backend instance allowed to run (and warm) on CPU float32 tensors."""
    return type(cls.__name__, (cls,), {"devices": frozenset({"cpu", "cuda"}), "dtypes": cls.dtypes | {torch.float32},
                                       "warm_devices": frozenset({"cpu", "cuda"})})()


def install_fa4(monkeypatch, **kw):
    """FlashAttention-4 4.0.0b36 on the CPU over :func:`make_fa4_interface`: (backend, interface)."""
    pkg, cute, interface = make_fa4_interface(**kw)
    for name, module in (("flash_attn", pkg), ("flash_attn.cute", cute), ("flash_attn.cute.interface", interface)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(flash_attention, "package_version", lambda d: "4.0.0b36" if d == "flash-attn-4" else None)
    monkeypatch.setattr(flash_attention, "enable_fa4_compile_cache", lambda: None)
    backend = on_cpu(FlashAttention4)
    monkeypatch.setitem(REGISTRY, "flash_attention_4", backend)
    assert backend.unavailable_reason() is None
    return backend, interface
