"""FlashAttention-2, -3 and -4.

All three take ``b s n d`` natively; a caller in ``b s n d`` (most DiffSynth models) reaches
them with no copy. Their causal mask and window are aligned to the bottom right, PyTorch's to
the top left: the two agree only when seq_q == seq_kv, so those calls are declared unsupported
otherwise (the tuner then uses a torch backend). They take no attention mask.
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import Optional

import torch

from ..problem import Problem
from ..backend_names import BackendName
from . import thin
from .base import Backend, DeviceInfo, module_present, package_version, register

logger = logging.getLogger("diffsynth_attention")

# FlashAttention-4's own on-disk cache of compiled kernels (off by default in flash-attn-4).
FA4_CACHE_ENABLED = "FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED"
FA4_CACHE_DIR = "FLASH_ATTENTION_CUTE_DSL_CACHE_DIR"


def fa4_compile_dir():
    """Where this library keeps FlashAttention-4's compilations: ``<cache folder>/fa4-compile``
    (resolved by :mod:`diffsynth_attention.store.paths`, the one place that resolves the cache folder)."""
    from ..store.paths import fa4_compile_dir as resolve

    return resolve()


def enable_fa4_compile_cache() -> Optional[str]:
    """Turn FlashAttention-4's compile cache on, in :func:`fa4_compile_dir`, unless the user
    configured it (either variable set). Must run before ``flash_attn.cute`` is imported.
    Returns the folder used, or None when the user's settings were left alone."""
    if FA4_CACHE_ENABLED in os.environ or FA4_CACHE_DIR in os.environ:
        return None
    folder = fa4_compile_dir()
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        logger.debug("FlashAttention-4 compile cache left off: cannot create %s (%s)", folder, exc)
        return None
    os.environ[FA4_CACHE_ENABLED] = "1"
    os.environ[FA4_CACHE_DIR] = str(folder)
    return str(folder)


def clear_compiled() -> int:
    """Remove this library's FlashAttention-4 compile cache (``cache clear --compiled``).
    A folder the user configured through FLASH_ATTENTION_CUTE_DSL_CACHE_DIR is left alone.
    Returns the number of files removed."""
    import shutil

    folder = fa4_compile_dir()
    if not folder.is_dir() or folder.is_symlink():
        return 0
    count = sum(len(files) for _, _, files in os.walk(folder))
    shutil.rmtree(folder, ignore_errors=True)
    return count


def _version_tuple(text: Optional[str]) -> tuple:
    out = []
    for part in (text or "0").split("+")[0].split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            break
        out.append(int(digits))
        if not part.isdigit():
            break
    return tuple(out)


class _FlashBase(Backend):
    output_layout = "b s n d"  # the kernel's own output layout (forward returns a b n s d view of it)
    causal_any_lengths = False
    gqa = True
    window = True
    window_any_lengths = False

    # The direct call of the package's compiled kernel (thin.py), set at load; None: the interface.
    _thin = None
    thin_reason: Optional[str] = "not loaded"

    thin_launch_ms: Optional[float] = None  # the cost model's launch floor with the thin path on

    def _set_thin(self, built: tuple) -> None:
        self._thin, self.thin_reason = built
        if self._thin is not None and self.thin_launch_ms is not None:
            self.launch_ms = self.thin_launch_ms
        if self.thin_reason is not None:
            logger.info("%s: thin kernel calls off (the package's interface serves every call): %s", self.name,
                        self.thin_reason)

    _no_window = (-1, -1)  # the package's ``window_size`` for no window

    def _call(self, q, k, v, scale, causal, window):
        if self._thin is not None:
            return thin.call(self, q, k, v, scale, causal, window, lambda: self._package_call(q, k, v, scale, causal, window))
        return self._package_call(q, k, v, scale, causal, window)

    def _package_call(self, q, k, v, scale, causal, window):
        """The package's public function (FlashAttention-3 and -4; FlashAttention-2 adds dropout)."""
        w = (window, window) if window is not None else self._no_window
        return self._func(q, k, v, softmax_scale=scale, causal=causal, window_size=w)

    def forward(self, q, k, v, mask, scale, causal, window, need_grad):
        # b n s d views -> b s n d views; for a caller in b s n d these are its own tensors.
        return self.forward_native(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale, causal,
                                   window).transpose(1, 2)

    @property
    def binds_native(self) -> bool:
        """Whether plans may call :meth:`forward_native` on tensors in ``b s n d`` (dispatch/runners.py):
        this class's ``forward`` is that call between two transposes, and a subclass that
        replaces ``forward`` keeps it."""
        return type(self).forward is _FlashBase.forward

    def forward_native(self, q, k, v, scale, causal, window):
        """``b s n d`` in and out (the kernel operator's call under torch.compile)."""
        out = self._call(q, k, v, scale, causal, window)
        if isinstance(out, tuple):  # FA3 builds before 2025-08 and FA4 return (out, lse)
            out = out[0]
        return out

    # The keyword that makes the interface return the log-sum-exp, found in its signature at first use.
    _lse_flag: Optional[str] = None

    def forward_lse(self, q, k, v, scale, causal):
        """``(out, lse)`` on ``b n s d`` views without a mask: the output (a ``b n s d`` view of the
        kernel's ``b s n d`` result) and its log-sum-exp as (b, n, s_q) float32."""
        if self._lse_flag is None:
            import inspect

            try:
                params = inspect.signature(self._func).parameters
            except (TypeError, ValueError):
                params = {}
            self._lse_flag = next((f for f in ("return_lse", "return_attn_probs") if f in params), "")
        kwargs = {self._lse_flag: True} if self._lse_flag else {}
        res = self._func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale, causal=causal,
                         **kwargs)
        if not isinstance(res, tuple) or len(res) < 2 or res[1] is None:
            raise RuntimeError(f"{self.name}: this build's flash_attn_func returned no log-sum-exp")
        out, lse = res[0], res[1]
        b, n, s_q = q.shape[0], q.shape[1], q.shape[2]
        if tuple(lse.shape) == (b, s_q, n) and (b, s_q, n) != (b, n, s_q):
            lse = lse.transpose(1, 2)
        if tuple(lse.shape) != (b, n, s_q):
            raise RuntimeError(f"{self.name}: log-sum-exp of shape {tuple(lse.shape)}, expected {(b, n, s_q)}")
        return out.transpose(1, 2), lse.float()


@register
class FlashAttention2(_FlashBase):
    """``flash_attn.flash_attn_func`` from the flash-attn 2.x package."""

    name = BackendName.FLASH_ATTENTION_2
    diffsynth_priority = 4
    package = "flash-attn"
    extra = "flash-attn-2"
    min_capability = (8, 0)
    max_head_dim = 256
    module = None  # installed only per its metadata: flash-attn-4 also installs a 'flash_attn' folder
    efficiency = 0.5  # ~0.35 of an H100's peak, ~0.7 of an A100's: the generous one
    launch_ms = 0.02

    def _metadata_version(self) -> Optional[str]:  # this module's name: tests install fake versions here
        return package_version(self.package)

    def _install_hint(self) -> str:
        # flash-attn's setup imports torch: pip's build isolation hides it ("No module named 'torch'")
        hint = f"pip install --no-build-isolation 'diffsynth-attention[{self.extra}]'"
        if module_present("flash_attn"):
            hint += "; the 'flash_attn' module here (flash-attn-4's) is not FlashAttention-2"
        return hint

    def _configure(self, version: Optional[str]) -> None:
        self._has_window = _version_tuple(version) >= (2, 3) if version else True

    def _load(self) -> None:
        version = package_version("flash-attn")
        if version is None:
            raise ModuleNotFoundError(
                "no distribution flash-attn (a 'flash_attn' folder may still exist: flash-attn-4 installs flash_attn.cute)"
            )
        self._import_kernel("flash_attn", "flash_attn_func", version)  # ImportError: undefined symbol after a torch upgrade
        self._has_window = _version_tuple(version) >= (2, 3)

    def extra_reasons(self, p: Problem, dev: Optional[DeviceInfo]) -> list:
        if p.window is not None and not getattr(self, "_has_window", True):
            return [f"window_size needs flash-attn 2.3 or newer (installed {self._version})"]
        return []

    def _package_call(self, q, k, v, scale, causal, window):
        w = (window, window) if window is not None else (-1, -1)
        if window is None and not self._has_window:
            return self._func(q, k, v, dropout_p=0.0, softmax_scale=scale, causal=causal)
        return self._func(q, k, v, dropout_p=0.0, softmax_scale=scale, causal=causal, window_size=w)


# The head-dim kernels a FlashAttention-3 build may hold; a head dim d runs on the smallest one
# >= d (flash_attn_interface.round_up_headdim, hopper/flash_api.cpp).
FA3_HEAD_DIMS = (64, 96, 128, 192, 256)


def fa3_build_flags() -> Optional[dict]:
    """The installed FlashAttention-3 build's flags (``flash_attn_config.CONFIG["build_flags"]``,
    written by its setup.py; the ``tokenspeed-fa3`` wheel ships it), or None if there is none."""
    try:
        module = importlib.import_module("flash_attn_config")
    except ModuleNotFoundError:
        return None
    flags = getattr(module, "CONFIG", {}).get("build_flags")
    if not isinstance(flags, dict):
        raise ValueError("flash_attn_config.CONFIG has no 'build_flags' dict")
    return {str(k): bool(v) for k, v in flags.items()}


@register
class FlashAttention3(_FlashBase):
    """``flash_attn_interface.flash_attn_func`` from FlashAttention-3 (Hopper; SM8x if built for it).

    What a build supports is read from its ``flash_attn_config.py`` (build flags such as
    ``FLASHATTENTION_DISABLE_BACKWARD`` or ``..._HDIM96``) and declared per instance: backward,
    the head-dim kernels, fp16, the local (window) kernels, SM8x. ``tokenspeed-fa3``
    3.0.0.post20260810, the build that installs from the registry, is forward only, without
    the head-dim-96 kernel (so no head dim 65..96), for Hopper only. With no config file, a
    full build is assumed.
    """

    name = BackendName.FLASH_ATTENTION_3
    diffsynth_priority = 3
    package = "tokenspeed-fa3"
    extra = "flash-attn-3"
    capabilities = frozenset({9})
    native_majors = frozenset({9})  # written for Hopper (warp-specialised, TMA); FlashAttention-4 is a port there
    max_head_dim = 256
    head_dim_multiple = 8
    head_dim_kernels: tuple = FA3_HEAD_DIMS
    fp8 = True  # fp8 inputs (not used by this library: its inputs are fp16/bf16)
    build: Optional[dict] = None
    module = "flash_attn_interface"
    efficiency = 0.75  # 2-10% faster than FlashAttention-4 on an H200
    launch_ms = 0.02

    def _metadata_version(self) -> Optional[str]:
        return package_version("tokenspeed-fa3") or package_version("flash_attn_3") or package_version("flash-attn-3")

    def _configure(self, version: Optional[str]) -> None:
        # The build's flags come from its small flash_attn_config.py, read when the backend is
        # declared (before any candidate is chosen), without importing the kernel module. A build
        # declared explicitly (declare_build) is kept.
        if self.build is not None:
            return
        try:
            flags = fa3_build_flags()
        except Exception:  # a malformed config file: keep the class's declarations
            flags = None
        if flags is not None:
            self.declare_build(flags)

    def _load(self) -> None:
        # The first use costs the import of the extension and nothing else: the version and the
        # build flags were read when the backend was declared (no second metadata scan here).
        module = self._import_kernel("flash_attn_interface", "flash_attn_func")
        flags = fa3_build_flags() if self.build is None else None
        if flags is not None:
            self.declare_build(flags)
        self._set_thin(thin.build_fa3(module, self._version))

    def declare_build(self, flags: dict) -> None:
        """Declare what a build with ``flags`` supports (instance attributes over the class's)."""
        def off(name: str) -> bool:
            return bool(flags.get(name, False))

        self.build = dict(flags)
        self.backward = not off("FLASHATTENTION_DISABLE_BACKWARD")
        self.dtypes = type(self).dtypes - ({torch.float16} if off("FLASHATTENTION_DISABLE_FP16") else set())
        self.fp8 = not off("FLASHATTENTION_DISABLE_FP8")
        self.window = not off("FLASHATTENTION_DISABLE_LOCAL")
        self.capabilities = frozenset({9} if off("FLASHATTENTION_DISABLE_SM8x") else {8, 9})
        self.head_dim_kernels = tuple(d for d in FA3_HEAD_DIMS if not off(f"FLASHATTENTION_DISABLE_HDIM{d}"))

    def build_summary(self) -> Optional[str]:
        """E.g. ``forward only; head-dim kernels 64, 128, 192, 256; bf16, fp16, fp8; window; SM 9.x``
        (None without a config file)."""
        if self.build is None:
            return None
        names = {torch.bfloat16: "bf16", torch.float16: "fp16"}
        dtypes = [names[t] for t in (torch.bfloat16, torch.float16) if t in self.dtypes]
        return "; ".join([
            "forward and backward" if self.backward else "forward only",
            "head-dim kernels " + ", ".join(map(str, self.head_dim_kernels)),
            ", ".join(dtypes + (["fp8"] if self.fp8 else [])),
            "window" if self.window else "no window",
            "SM " + ", ".join(f"{m}.x" for m in sorted(self.capabilities)),
        ])

    def extra_reasons(self, p: Problem, dev: Optional[DeviceInfo]) -> list:
        if self.head_dim_kernels == FA3_HEAD_DIMS:
            return []
        for d in sorted({p.head_dim, p.head_dim_v}):
            kernel = next((k for k in FA3_HEAD_DIMS if d <= k), None)
            if kernel is not None and kernel not in self.head_dim_kernels:
                return [f"head dim {d} runs on the head-dim-{kernel} kernel, which this build leaves out "
                        f"(FLASHATTENTION_DISABLE_HDIM{kernel}; it has {', '.join(map(str, self.head_dim_kernels))})"]
        return []



@register
class FlashAttention4(_FlashBase):
    """``flash_attn.cute.flash_attn_func`` from the flash-attn-4 package (CuTe DSL).

    Head-dim limits follow ``flash_attn/cute/interface.py`` (4.0.0b36): on SM90, 8..256 in
    multiples of 8; on SM100/110, 8..128, or (256, 256), or (192, 128). Each new specialisation
    compiles on its first call (1-3 s); the tuner reports that as tuning cost.
    """

    name = BackendName.FLASH_ATTENTION_4
    diffsynth_priority = 2
    package = "flash-attn-4"
    extra = "flash-attn-4"
    capabilities = frozenset({8, 9, 10, 11, 12})
    same_head_dim_v = False
    max_head_dim = 256
    head_dim_multiple = 8
    module = "flash_attn.cute"
    _no_window = (None, None)
    efficiency = 0.75  # 668 TFLOP/s of 989 on an H200 at 32,760 tokens
    launch_ms = 0.08  # its Python interface: 0.11-0.12 ms per call on small problems (H100, H200)
    thin_launch_ms = 0.03  # the thin call (thin.py): SDPA-like host cost, not measured yet (kept generous)

    def _metadata_version(self) -> Optional[str]:
        return package_version(self.package)

    def _load(self) -> None:
        enable_fa4_compile_cache()  # before the import: every process and rank shares the compilations
        self._import_kernel("flash_attn.cute", "flash_attn_func")
        try:  # the backward that takes the saved output and log-sum-exp (flash-attn-4 4.0.0b36)
            interface = importlib.import_module("flash_attn.cute.interface")
        except Exception as exc:  # an older or changed layout: training recomputes the forward
            interface = None
            self._set_thin((None, f"no flash_attn.cute.interface ({type(exc).__name__})"))
        self._bwd = getattr(interface, "_flash_attn_bwd", None)
        if interface is not None:
            self._set_thin(thin.build_fa4(interface, self._func, self._version))

    def supports_lse_backward(self) -> bool:
        return self.unavailable_reason() is None and getattr(self, "_bwd", None) is not None

    def forward_native_lse(self, q, k, v, scale, causal, window):
        """``b s n d`` in and out: the output and its log-sum-exp (b, n, s), fp32."""
        w = (window, window) if window is not None else (None, None)
        out, lse = self._func(q, k, v, softmax_scale=scale, causal=causal, window_size=w, return_lse=True)
        return out, lse

    def backward_native(self, grad_out, q, k, v, out, lse, scale, causal, window):
        left, right = (window, window) if window is not None else (None, None)
        grads = self._bwd(q, k, v, out, grad_out, lse, scale, causal, window_size_left=left, window_size_right=right)
        return grads[0], grads[1], grads[2]

    def extra_reasons(self, p: Problem, dev: Optional[DeviceInfo]) -> list:
        if dev is None or dev.capability is None:
            return []
        major = dev.capability[0]
        d, dv = p.head_dim, p.head_dim_v
        if major == 9:
            ok = 8 <= d <= 256 and 8 <= dv <= 256
        elif major in (10, 11):
            ok = (d <= 128 and dv <= 128) or (d, dv) in ((256, 256), (192, 128))
        else:  # SM80 and SM120 use the Ampere-style path: keep to the standard range
            ok = d <= 128 and dv <= 128 and d == dv
        if not ok:
            return [f"head dims ({d}, {dv}) not supported on compute capability {major}.x"]
        return []

