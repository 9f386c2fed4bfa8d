"""The backend catalogue: every backend's name, in preference order, without importing torch.

The order of :class:`BackendName` is the preference order: it breaks near-ties in the tuner
(candidates within the measured noise of the fastest, 2% to 3%, in the same interleaved rounds):
exact, dependency-free PyTorch kernels first, then the kernel packages, then the quantized
kernels (admitted only in the low-precision quality tiers), then the reference math kernel. Fresh processes therefore choose the same backend for
the same timings. On a GPU the order is the device's: a kernel package native to its architecture
(``Backend.native_majors``) moves ahead of the other packages (``backends.preference_on``).

Adding a backend: one line here, and one module in ``backends/`` whose class carries
``@register`` (the registry imports every module of that folder). The registry
(:data:`diffsynth_attention.backends.REGISTRY`), ``PREFERENCE``, ``DIFFSYNTH_PRIORITY`` and
``TORCH_FAMILY`` all follow from this order and the classes' attributes. The command line and
:mod:`.config` check names here (:func:`check_backend`, the one validator) on their fast paths.
"""

from enum import Enum
from typing import Optional


class BackendName(str, Enum):
    """A backend's name; the members' order is the preference order. Compares equal to its text."""

    TORCH = "torch"
    TORCH_CUDNN = "torch_cudnn"
    TORCH_FLASH = "torch_flash"
    TORCH_EFFICIENT = "torch_efficient"
    CUSTOMIZED_FA_KERNEL = "customized_fa_kernel"
    FLASH_ATTENTION_4 = "flash_attention_4"
    FLASH_ATTENTION_3 = "flash_attention_3"
    FLASH_ATTENTION_2 = "flash_attention_2"
    XFORMERS = "xformers"
    SAGE_ATTENTION = "sage_attention"
    FLASH_ATTENTION_3_FP8 = "flash_attention_3_fp8"
    TORCH_MATH = "torch_math"

    __str__ = str.__str__
    __format__ = str.__format__


BACKEND_NAMES = tuple(member.value for member in BackendName)


def check_backend(backend, source: str = "backend", *, auto: Optional[str] = None) -> str:
    """The one check of a backend name: ``backend`` if it names a backend, else a ValueError
    naming ``source`` and the valid names.

    ``auto`` None: a backend name exactly as written. Otherwise 'auto' is accepted too, case and
    surrounding blanks are ignored (the lower-cased name is returned), a non-string is a TypeError,
    and ``auto`` is how the error introduces the list (e.g. ``"valid names: auto"``)."""
    if auto is None:
        if backend not in BACKEND_NAMES:
            raise ValueError(f"{source}={backend!r} is not a backend; valid names: {', '.join(BACKEND_NAMES)}")
        return str(backend)
    if not isinstance(backend, str):
        raise TypeError(f"{source} must be a backend name string, got {type(backend).__name__}")
    value = backend.strip().lower()
    if value == "auto" or value in BACKEND_NAMES:
        return value
    raise ValueError(f"{source}={backend!r} is not a backend; {auto}, {', '.join(BACKEND_NAMES)}")
