"""Every backend's name, in the documented preference order, without importing torch.

The command line and :mod:`.config` check names here on their fast paths; a test proves that
this tuple equals the registry's (:data:`diffsynth_attention.backends.REGISTRY`).
"""

BACKEND_NAMES = (
    "torch",
    "torch_cudnn",
    "torch_flash",
    "torch_efficient",
    "customized_fa_kernel",
    "flash_attention_4",
    "flash_attention_3",
    "flash_attention_2",
    "xformers",
    "sage_attention",
    "torch_math",
)


def check_backend(backend, source: str = "backend") -> str:
    """``backend`` if it names a backend, else a ValueError naming ``source`` and the valid names."""
    if backend not in BACKEND_NAMES:
        raise ValueError(f"{source}={backend!r} is not a backend; valid names: {', '.join(BACKEND_NAMES)}")
    return backend
