"""Thin kernel calls: FlashAttention-3's operator and FlashAttention-4's compiled kernel, called
without the packages' Python interfaces (issue 29, item 3).

The interfaces cost 97-153 us of host time per call (FlashAttention-4's ~87 us) against
18-31 us for SDPA: on the 0.15-0.25 ms problems of image models that is the call's speed. A
plain forward (no gradient, no extras) needs none of their per-call work, so:

- FlashAttention-3 (``flash_attn_interface``): ``flash_attn_func`` goes through an
  ``autograd.Function`` and a ``torch.library.custom_op`` (whose first call also imports
  ``torch._dynamo``, 1-1.6 s of Python, on whichever thread calls first) to the operator that
  the extension registers, ``torch.ops.flash_attn_3.fwd``. :class:`FA3Thin` calls that operator
  with the arguments the interface would pass.
- FlashAttention-4 (``flash_attn.cute``): ``_flash_attn_fwd`` derives a compile key (about
  70 fields) on every call, looks the compiled kernel up in ``_flash_attn_fwd.compile_cache`` and
  calls it with its arguments. :class:`FA4Thin` lets the package's own function serve the first
  call of each signature (shapes, strides, dtypes, device, causal, window, scale), records the
  compiled kernel and the arguments it was called with, and calls that kernel directly on the
  next calls of the signature (a new output tensor, the caller's q, k, v).

Each is used only for an installed version it was checked against and whose internals are
found as expected (otherwise it is off, with the reason logged and kept in ``thin_reason``);
``DIFFSYNTH_ATTENTION_THIN_CALLS=0`` turns both off. A call the thin path does not cover
(gradients, a tensor subclass, a layout the package would copy, a signature whose first call
did not look as expected) goes to the package's own function, which also stays the reference:
the outputs are bit for bit the package's (tests/backends/test_gpu_thin.py).
"""

from __future__ import annotations

import inspect
import logging
import threading
from typing import Optional

import torch

from .. import process

logger = logging.getLogger("diffsynth_attention")

# The operator's arguments (tokenspeed-fa3 3.0.0.post20260810, hopper/flash_api.cpp), in order.
FA3_ARGUMENTS = ("q", "k", "v", "k_new", "v_new", "q_v", "out", "cu_seqlens_q", "cu_seqlens_k", "cu_seqlens_k_new",
                 "seqused_q", "seqused_k", "max_seqlen_q", "max_seqlen_k", "page_table", "kv_batch_idx", "leftpad_k",
                 "rotary_cos", "rotary_sin", "seqlens_rotary", "q_descale", "k_descale", "v_descale", "softmax_scale",
                 "is_causal", "window_size_left", "window_size_right", "attention_chunk", "softcap",
                 "is_rotary_interleaved", "scheduler_metadata", "num_splits", "pack_gqa", "sm_margin", "sinks")
_FA3_NONES = (None,) * 20  # k_new .. v_descale
# What flash_attn_interface.flash_attn_func passes for a plain forward: its defaults, checked at load.
FA3_INTERFACE_DEFAULTS = {"qv": None, "q_descale": None, "k_descale": None, "v_descale": None, "attention_chunk": 0,
                          "softcap": 0.0, "num_splits": 1, "pack_gqa": None, "sm_margin": 0}
FA3_VERSIONS = ((3, 0, 0),)  # (major, minor, patch) of the interfaces read (post releases included)
FA4_VERSIONS = ("4.0.0b36",)  # exact: FlashAttention-4's internals change between betas
MAX_SIGNATURES = 256  # FlashAttention-4 signatures kept per process (the oldest goes first)


def _version_prefix(text: Optional[str]) -> tuple:
    out = []
    for part in (text or "").split("+")[0].split(".")[:3]:
        digits = ""
        for ch in part:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


def _enabled() -> Optional[str]:
    from .. import config

    try:
        return None if config.thin_calls() else f"{config.THIN_CALLS}=0"
    except ValueError as exc:  # validate_all reports the bad value; the package's own call meanwhile
        return str(exc)


def _plain(q, k, v) -> bool:
    """Plain tensors that need no gradient: what the thin paths serve."""
    return (type(q) is torch.Tensor and type(k) is torch.Tensor and type(v) is torch.Tensor
            and not (q.requires_grad or k.requires_grad or v.requires_grad))


class FA3Thin:
    """``torch.ops.flash_attn_3.fwd`` with the arguments ``flash_attn_func`` passes (a plain
    forward); returns the output, or None where the package's own function must serve."""

    def __init__(self, op) -> None:
        self._op = op

    def __call__(self, q, k, v, scale, causal, window):
        if not _plain(q, k, v):
            return None
        if q.stride(-1) != 1 or k.stride(-1) != 1 or (v.stride(-1) != 1 and v.stride(-3) != 1):
            return None  # the interface makes these contiguous first
        w = -1 if window is None else window
        if scale is None:
            scale = q.shape[-1] ** (-0.5)
        return self._op(q, k, v, *_FA3_NONES, scale, causal, w, w, 0, 0.0, True, None, 1, None, 0, None)[0]


def build_fa3(module, version: Optional[str], ops=None) -> tuple:
    """(FA3Thin or None, reason it is off or None) for the imported ``flash_attn_interface``
    ``module`` of ``version``; ``ops``: the operator namespace (``torch.ops.flash_attn_3``)."""
    why = _enabled()
    if why:
        return None, why
    if _version_prefix(version) not in FA3_VERSIONS:
        return None, f"version {version} not among those checked ({', '.join('.'.join(map(str, v)) for v in FA3_VERSIONS)})"
    try:
        if getattr(module, "USE_TRITON_ROCM", False):
            return None, "the interface runs its Triton (ROCm) implementation"
        params = inspect.signature(module.flash_attn_func).parameters
        for name, value in FA3_INTERFACE_DEFAULTS.items():
            if name not in params or params[name].default != value:
                got = params[name].default if name in params else "no such argument"
                return None, f"flash_attn_func's {name} default is {got!r}, not {value!r}"
        if ops is None:
            ops = torch.ops.flash_attn_3
        op = ops.fwd.default
        schema = op._schema
        names = tuple(a.name for a in schema.arguments)
        if names != FA3_ARGUMENTS or len(schema.returns) != 4:
            return None, f"flash_attn_3::fwd has an unexpected schema ({len(names)} arguments, {len(schema.returns)} results)"
    except Exception as exc:  # any missing internal: the interface serves
        return None, f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    return FA3Thin(op), None


# -- FlashAttention-4 ------------------------------------------------------------------------------------
_capture_lock = process.new_rlock()  # one capture at a time (a forked child finds it unlocked)
_NO_THIN = ("no thin path for this signature",)


class _Recording:
    """Stands in for ``_flash_attn_fwd.compile_cache`` during one capture: looks up as the cache
    does and hands the capturing thread a wrapper that records the compiled kernel's call."""

    def __init__(self, cache, thread: int) -> None:
        self._cache, self._thread, self.calls = cache, thread, []

    def __contains__(self, key) -> bool:
        return key in self._cache

    def __setitem__(self, key, fn) -> None:
        self._cache[key] = fn

    def __getitem__(self, key):
        fn = self._cache[key]
        if threading.get_ident() != self._thread:
            return fn
        calls = self.calls

        def record(*args, **kwargs):
            calls.append((fn, args, kwargs))
            return fn(*args, **kwargs)
        return record

    def __getattr__(self, name):
        return getattr(self._cache, name)


def _holds_tensor(value, depth: int = 0) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (tuple, list)) and depth < 3:
        return any(_holds_tensor(x, depth + 1) for x in value)
    if isinstance(value, dict) and depth < 3:
        return any(_holds_tensor(x, depth + 1) for x in value.values())
    return False


def _same_tensor(a, b) -> bool:
    return (isinstance(a, torch.Tensor) and a.data_ptr() == b.data_ptr() and a.shape == b.shape
            and a.stride() == b.stride() and a.dtype == b.dtype)


def entry_from(calls: list, q, k, v, out) -> tuple:
    """(entry, None) from the compiled-kernel calls recorded during one package call, or
    (None, why not): exactly one call, on the caller's q, k, v (no copy) and the returned output,
    and no other tensor among its arguments (an lse, a split-KV workspace, scheduler metadata)."""
    if len(calls) != 1:
        return None, f"{len(calls)} compiled-kernel calls in one package call"
    fn, args, kwargs = calls[0]
    if kwargs or len(args) < 4:
        return None, "the compiled kernel was called with keywords or fewer than 4 arguments"
    if not all(_same_tensor(a, b) for a, b in zip(args[:3], (q, k, v))):
        return None, "the package passed other tensors than the caller's q, k, v (a copy)"
    if not isinstance(out, torch.Tensor) or not _same_tensor(args[3], out) or not out.is_contiguous():
        return None, "the compiled kernel did not write the returned output"
    if _holds_tensor(args[4:]):
        return None, "the compiled kernel took other tensors"
    return (fn, tuple(args[4:]), tuple(out.shape), out.dtype, out.device), None


class FA4Thin:
    """FlashAttention-4's compiled kernel per signature, found through the package's first call."""

    def __init__(self, fwd, func) -> None:
        self._fwd = fwd  # flash_attn.cute.interface._flash_attn_fwd (holds .compile_cache)
        self._func = func  # flash_attn.cute.flash_attn_func: the package's own call
        self.entries: dict = {}
        self.reasons: dict = {}  # signature -> why it has no thin path (the first few)

    def __call__(self, q, k, v, scale, causal, window):
        if not _plain(q, k, v):
            return None
        sig = (q.shape, k.shape, v.shape, q.stride(), k.stride(), v.stride(), q.dtype, k.dtype, v.dtype,
               q.get_device(), causal, window, scale)
        entry = self.entries.get(sig)
        if entry is None:
            return self._capture(sig, q, k, v, scale, causal, window)
        if entry is _NO_THIN or (q.data_ptr() | k.data_ptr() | v.data_ptr()) & 15:
            return None  # the package copies a misaligned input first
        fn, rest, shape, dtype, device = entry
        out = torch.empty(shape, dtype=dtype, device=device)
        fn(q, k, v, out, *rest)
        return out

    def _capture(self, sig, q, k, v, scale, causal, window):
        """The package's own call, recording the compiled kernel it calls."""
        w = (window, window) if window is not None else (None, None)
        with _capture_lock:
            cache = self._fwd.compile_cache
            recording = _Recording(cache, threading.get_ident())
            self._fwd.compile_cache = recording
            try:
                res = self._func(q, k, v, softmax_scale=scale, causal=causal, window_size=w)
            finally:
                self._fwd.compile_cache = cache
        out = res[0] if isinstance(res, tuple) else res
        entry, why = (None, "misaligned inputs") if (q.data_ptr() | k.data_ptr() | v.data_ptr()) & 15 else \
            entry_from(recording.calls, q, k, v, out)
        if entry is None:
            entry = _NO_THIN
            if len(self.reasons) < 16:
                self.reasons[sig] = why
            logger.debug("FlashAttention-4: no thin call for %s: %s", sig, why)
        if len(self.entries) >= MAX_SIGNATURES:
            self.entries.pop(next(iter(self.entries), None), None)
        self.entries[sig] = entry
        return out


def build_fa4(interface, func, version: Optional[str]) -> tuple:
    """(FA4Thin or None, reason it is off or None) for the imported ``flash_attn.cute.interface``
    module, the package's ``flash_attn_func`` and the installed ``version``."""
    why = _enabled()
    if why:
        return None, why
    if version not in FA4_VERSIONS:
        return None, f"version {version} not among those checked ({', '.join(FA4_VERSIONS)})"
    try:
        fwd = interface._flash_attn_fwd
        cache = fwd.compile_cache
        for name in ("__contains__", "__getitem__", "__setitem__"):
            if not callable(getattr(cache, name, None)):
                return None, f"_flash_attn_fwd.compile_cache has no {name}"
        params = inspect.signature(fwd).parameters
        missing = [n for n in ("q", "k", "v", "softmax_scale", "causal", "window_size_left", "window_size_right")
                   if n not in params]
        if missing:
            return None, f"_flash_attn_fwd has no argument {missing[0]}"
        if getattr(interface, "flash_attn_func", None) is not func:
            return None, "flash_attn.cute.flash_attn_func is not the interface's"
    except Exception as exc:
        return None, f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    return FA4Thin(fwd, func), None


def call(backend, q, k, v, scale, causal, window, package_call):
    """The backend's thin path if it serves this call, else ``package_call()``. A thin call that
    raises where the package's call then succeeds turns the thin path off (logged)."""
    thin = backend._thin
    failed = None
    if thin is not None:
        try:
            out = thin(q, k, v, scale, causal, window)
        except Exception as exc:  # the package's call decides whether the input was the problem
            out, failed = None, exc
        if out is not None:
            return out
    out = package_call()
    if failed is not None and not isinstance(failed, torch.OutOfMemoryError) and backend._thin is thin:
        backend._thin = None
        backend.thin_reason = f"a thin call failed where the package's call succeeded: {type(failed).__name__}: {failed}"
        logger.warning("%s: thin kernel calls turned off: %s", backend.name, backend.thin_reason)
    return out
