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

from ..problem import Problem
from .base import Backend, DeviceInfo, module_present, package_version

logger = logging.getLogger("diffsynth_attention")

# FlashAttention-4's own on-disk cache of compiled kernels (off by default in flash-attn-4).
FA4_CACHE_ENABLED = "FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED"
FA4_CACHE_DIR = "FLASH_ATTENTION_CUTE_DSL_CACHE_DIR"


def fa4_compile_dir():
    """Where this library keeps FlashAttention-4's compilations: ``<cache folder>/fa4-compile``
    (the cache folder as :func:`diffsynth_attention.store.cache.cache_dir` resolves it)."""
    from pathlib import Path

    import platformdirs

    from .. import config

    override = config.cache_dir_override()
    base = Path(override).expanduser() if override else Path(platformdirs.user_cache_dir("diffsynth_attention"))
    return base / "fa4-compile"


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
    causal_any_lengths = False
    gqa = True
    window = True
    window_any_lengths = False

    def _call(self, q, k, v, scale, causal, window):  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, q, k, v, mask, scale, causal, window, need_grad):
        # b n s d views -> b s n d views; for a caller in b s n d these are its own tensors.
        out = self._call(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale, causal, window)
        if isinstance(out, tuple):  # FA3 builds before 2025-08 and FA4 return (out, lse)
            out = out[0]
        return out.transpose(1, 2)


class FlashAttention2(_FlashBase):
    """``flash_attn.flash_attn_func`` from the flash-attn 2.x package."""

    name = "flash_attention_2"
    package = "flash-attn"
    extra = "flash-attn-2"
    min_capability = (8, 0)
    max_head_dim = 256
    module = None  # installed only per its metadata: flash-attn-4 also installs a 'flash_attn' folder
    efficiency = 0.5  # ~0.35 of an H100's peak, ~0.7 of an A100's: the generous one
    launch_ms = 0.02

    def _metadata_version(self) -> Optional[str]:
        return package_version("flash-attn")

    def _install_hint(self) -> str:
        hint = f"pip install 'diffsynth-attention[{self.extra}]'"
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
        module = importlib.import_module("flash_attn")  # raises ImportError: undefined symbol after a torch upgrade
        self._func = getattr(module, "flash_attn_func")
        self._version = version
        self._has_window = _version_tuple(version) >= (2, 3)

    def extra_reasons(self, p: Problem, dev: Optional[DeviceInfo]) -> list:
        if p.window is not None and not getattr(self, "_has_window", True):
            return [f"window_size needs flash-attn 2.3 or newer (installed {self._version})"]
        return []

    def _call(self, q, k, v, scale, causal, window):
        w = (window, window) if window is not None else (-1, -1)
        if window is None and not self._has_window:
            return self._func(q, k, v, dropout_p=0.0, softmax_scale=scale, causal=causal)
        return self._func(q, k, v, dropout_p=0.0, softmax_scale=scale, causal=causal, window_size=w)


class FlashAttention3(_FlashBase):
    """``flash_attn_interface.flash_attn_func`` from FlashAttention-3 (Hopper only)."""

    name = "flash_attention_3"
    package = "flash-attn-3"
    extra = "flash-attn-3"
    capabilities = frozenset({9})
    max_head_dim = 256
    head_dim_multiple = 8
    module = "flash_attn_interface"
    efficiency = 0.75  # 2-10% faster than FlashAttention-4 on an H200
    launch_ms = 0.02

    def _metadata_version(self) -> Optional[str]:
        return package_version("flash_attn_3") or package_version("flash-attn-3") or package_version("tokenspeed-fa3")

    def _load(self) -> None:
        module = importlib.import_module("flash_attn_interface")
        self._func = getattr(module, "flash_attn_func")
        self._version = self._metadata_version() or getattr(module, "__version__", "unknown")

    def _call(self, q, k, v, scale, causal, window):
        w = (window, window) if window is not None else (-1, -1)
        return self._func(q, k, v, softmax_scale=scale, causal=causal, window_size=w)


class FlashAttention4(_FlashBase):
    """``flash_attn.cute.flash_attn_func`` from the flash-attn-4 package (CuTe DSL).

    Head-dim limits follow ``flash_attn/cute/interface.py`` (4.0.0b36): on SM90, 8..256 in
    multiples of 8; on SM100/110, 8..128, or (256, 256), or (192, 128). Each new specialisation
    compiles on its first call (1-3 s); the tuner reports that as tuning cost.
    """

    name = "flash_attention_4"
    package = "flash-attn-4"
    extra = "flash-attn-4"
    capabilities = frozenset({8, 9, 10, 11, 12})
    same_head_dim_v = False
    max_head_dim = 256
    head_dim_multiple = 8
    module = "flash_attn.cute"
    efficiency = 0.75  # 668 TFLOP/s of 989 on an H200 at 32,760 tokens
    launch_ms = 0.08  # its Python interface: 0.11-0.12 ms per call on small problems (H100, H200)

    def _metadata_version(self) -> Optional[str]:
        return package_version("flash-attn-4")

    def _load(self) -> None:
        enable_fa4_compile_cache()  # before the import: every process and rank shares the compilations
        module = importlib.import_module("flash_attn.cute")
        self._func = getattr(module, "flash_attn_func")
        self._version = package_version("flash-attn-4") or getattr(module, "__version__", "unknown")

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

    def _call(self, q, k, v, scale, causal, window):
        w = (window, window) if window is not None else (None, None)
        return self._func(q, k, v, softmax_scale=scale, causal=causal, window_size=w)
