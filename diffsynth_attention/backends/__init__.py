"""The backend registry: every backend by name, in the catalogue's preference order.

The catalogue is :class:`diffsynth_attention.backend_names.BackendName`: its order is the
tuner's tie-break preference. Each backend module registers its class with ``@register``; this
package imports every module in its folder, so adding a backend touches its own module and the
catalogue line only. ``REGISTRY``, ``PREFERENCE``, ``DIFFSYNTH_PRIORITY`` and ``TORCH_FAMILY``
follow from the catalogue and the classes' attributes.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Optional

from ..backend_names import BACKEND_NAMES, check_backend
from . import loading
from .base import REGISTERED, Backend, DeviceInfo, device_info, package_version, register
from .flash_attention import clear_compiled, enable_fa4_compile_cache, fa4_compile_dir

for _module in pkgutil.iter_modules(__path__):  # every backend module registers its classes
    importlib.import_module(f"{__name__}.{_module.name}")

_missing = [name for name in BACKEND_NAMES if name not in REGISTERED]
if _missing:
    raise ImportError(f"backends named in backend_names.BackendName but registered by no module: {', '.join(_missing)}")

REGISTRY: dict = {name: REGISTERED[name] for name in BACKEND_NAMES}
PREFERENCE: tuple = tuple(REGISTRY)
# What DiffSynth-Studio picks, first installed wins (its attention.py, 2.1.12).
DIFFSYNTH_PRIORITY: tuple = tuple(sorted((n for n, b in REGISTRY.items() if b.diffsynth_priority is not None),
                                         key=lambda n: REGISTRY[n].diffsynth_priority))
# Backends that compile into a graph as PyTorch's own operators (the rest are kernel packages,
# called through one thin operator): dispatch/compiled.py.
TORCH_FAMILY = frozenset(n for n, b in REGISTRY.items() if b.inlined_under_compile)
# Those of them whose graph runs the very operator their eager call runs: priced by eager time in a
# graph (``torch`` counts too: inductor may lower SDPA to another kernel, but that is what plain
# torch.compile runs, the default a graph falls back to).
SAME_OP_IN_GRAPH = frozenset(n for n, b in REGISTRY.items() if b.same_op_in_graph)


def preference_on(capability: Optional[tuple]) -> tuple:
    """The tie-break order on a device of CUDA ``capability`` (major, minor), or None (not CUDA):
    :data:`PREFERENCE`, except that a kernel package native to the device's architecture
    (``Backend.native_majors``, exact ones) moves ahead of the other kernel packages; PyTorch's own kernels
    stay first. On Hopper, FlashAttention-3 then wins its ties with FlashAttention-4: the tuner's
    rounds saw the two within 1% on Wan's long self-attention where direct timings put
    FlashAttention-3 3.8-3.9% ahead, in all 5 fresh processes (H100, benchmarks/results/
    H100-80GB-HBM3-2026-12-07-s7-tuning-repeat.md)."""
    if capability is None:
        return PREFERENCE
    major = capability[0]
    # (an 8-bit or FP8 variant stays behind the exact kernels: a tie goes to the exact one)
    native = [n for n in PREFERENCE if major in (REGISTRY[n].native_majors or ()) and not REGISTRY[n].low_precision
              and n not in TORCH_FAMILY]
    if not native:
        return PREFERENCE
    packages = [n for n in PREFERENCE if n not in TORCH_FAMILY]
    first = min(PREFERENCE.index(n) for n in packages) if packages else len(PREFERENCE)
    rest = [n for n in PREFERENCE[first:] if n not in native]
    return PREFERENCE[:first] + tuple(native) + tuple(rest)


def normalize(name, source: str) -> str:
    """A backend name or 'auto', case-insensitive; a ValueError naming ``source`` otherwise."""
    return check_backend(name, source, auto="valid names: auto")


def available_backends() -> "dict[str, Optional[str]]":
    """Every registered backend: None where it can run on this machine, else the reason (a kernel
    package's import that runs past ``DIFFSYNTH_ATTENTION_LOAD_WAIT`` answers "not loaded")."""
    return loading.reasons(REGISTRY.values())


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


LOW_PRECISION_REASON = ("low precision (8-bit/FP8): a candidate only in the balanced and fast quality tiers "
                        "(DIFFSYNTH_ATTENTION_QUALITY, quality(...)), where the gate admits it on the caller's data")


def for_tier(usable: list, reasons: dict, tier: str) -> tuple:
    """``candidates``' answer for quality ``tier``: in ``exact`` the low-precision backends leave the
    usable list (with the reason), so they are never gated, timed or chosen; other tiers keep all."""
    if tier != "exact":
        return usable, reasons
    reasons = dict(reasons)
    for backend in usable:
        if backend.low_precision:
            reasons[backend.name] = [LOW_PRECISION_REASON]
    return [b for b in usable if not b.low_precision], reasons


__all__ = [
    "Backend", "DeviceInfo", "REGISTRY", "PREFERENCE", "preference_on", "DIFFSYNTH_PRIORITY", "TORCH_FAMILY", "SAME_OP_IN_GRAPH", "register",
    "available_backends", "candidates", "for_tier", "clear_compiled", "device_info", "enable_fa4_compile_cache",
    "fa4_compile_dir", "loading", "normalize", "package_version",
]
