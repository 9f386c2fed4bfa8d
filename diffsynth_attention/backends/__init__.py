"""The backend registry: every backend by name, in the documented preference order.

The order breaks near-ties in the tuner (candidates within the measured noise of the fastest,
2% to 3%, in the same interleaved rounds): exact, dependency-free
PyTorch kernels first, then the kernel packages, then the quantized kernel, then the
reference math kernel. Fresh processes therefore choose the same backend for the same timings.
"""

from __future__ import annotations

from typing import Optional

from . import loading
from .base import Backend, DeviceInfo, device_info, package_version
from .flash_attention import clear_compiled, enable_fa4_compile_cache, fa4_compile_dir
from .flash_attention import FlashAttention2, FlashAttention3, FlashAttention4
from .hub_kernel import HubFlashAttention
from .sage import SageAttention
from .torch_sdpa import TorchCuDNN, TorchEfficient, TorchFlash, TorchMath, TorchSDPA
from .xformers import XFormers

_CLASSES = (
    TorchSDPA,
    TorchCuDNN,
    TorchFlash,
    TorchEfficient,
    HubFlashAttention,
    FlashAttention4,
    FlashAttention3,
    FlashAttention2,
    XFormers,
    SageAttention,
    TorchMath,
)

REGISTRY: dict = {cls.name: cls() for cls in _CLASSES}
PREFERENCE: tuple = tuple(REGISTRY)
# What DiffSynth-Studio picks, first installed wins (its attention.py, 2.1.12).
DIFFSYNTH_PRIORITY = ("customized_fa_kernel", "flash_attention_4", "flash_attention_3", "flash_attention_2", "sage_attention", "xformers", "torch")


def normalize(name, source: str) -> str:
    """A backend name or 'auto', case-insensitive; a ValueError naming ``source`` otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"{source} must be a backend name string, got {type(name).__name__}")
    value = name.strip().lower()
    if value == "auto" or value in REGISTRY:
        return value
    raise ValueError(f"{source}={name!r} is not a backend; valid names: auto, {', '.join(PREFERENCE)}")


def available_backends() -> "dict[str, Optional[str]]":
    """Every registered backend: None where it can run on this machine, else the reason."""
    return {name: backend.unavailable_reason() for name, backend in REGISTRY.items()}


def candidates(problem, dev: Optional[DeviceInfo]) -> tuple:
    """(usable backends for ``problem`` in preference order, {name: reasons} for the others).

    Imports no kernel package: a backend is usable here when it is installed (per its package
    metadata), this machine can run it and its declared capabilities cover the problem. A broken
    install is discovered when the backend is first used (``unavailable_reason``)."""
    usable, reasons = [], {}
    for name, backend in REGISTRY.items():
        why = backend.declared_reason()
        if why is not None:
            reasons[name] = [why]
            continue
        why_not = backend.not_supported_reasons(problem, dev)
        if why_not:
            reasons[name] = why_not
        else:
            usable.append(backend)
    return usable, reasons


__all__ = [
    "Backend", "DeviceInfo", "REGISTRY", "PREFERENCE", "DIFFSYNTH_PRIORITY",
    "available_backends", "candidates", "clear_compiled", "device_info", "enable_fa4_compile_cache",
    "fa4_compile_dir", "loading", "normalize", "package_version",
]
