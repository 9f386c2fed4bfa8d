"""DiffSynth-Studio's seventh backend: a FlashAttention kernel loaded from the Hugging Face Hub
through the ``kernels`` package.

DiffSynth-Studio 2.1.12 loads ``kernels.get_kernel(DIFFSYNTH_FLASH_ATTN_KERNEL_REPO_ID,
version=int(DIFFSYNTH_FLASH_ATTN_KERNEL_VERSION))`` when the first variable is set, calls the
module's ``flash_attn_func(q, k, v, softmax_scale=, causal=, window_size=(w, w))`` on ``b s n d``
tensors, and names the route ``customized_fa_kernel`` (ahead of FlashAttention-4 in its order).
Here it is a backend like the others, under the same name: a candidate when both variables are
set and ``kernels`` is installed (``pip install 'diffsynth-attention[hf-kernels]'``), tuned and
gated like every candidate, and unavailable with the reason when the kernel cannot be loaded
(no access to the Hub, no build for this machine, a bad version). ``kernels`` itself honours
``LOCAL_KERNELS=<repo id>=<folder>`` (a local kernel folder) and ``HF_HUB_OFFLINE=1``.

The kernel is a FlashAttention API: bottom-right causal and window alignment (declared
unsupported where it differs from PyTorch's, seq_q != seq_kv), grouped-query attention, no mask.
The repository and version are part of the key (as this backend's version), so another kernel
is tuned afresh.
"""

from __future__ import annotations

import importlib
import os
from typing import Optional

from ..backend_names import BackendName
from .base import module_present, package_version, register
from .flash_attention import _FlashBase

REPO_ID = "DIFFSYNTH_FLASH_ATTN_KERNEL_REPO_ID"
VERSION = "DIFFSYNTH_FLASH_ATTN_KERNEL_VERSION"


def kernel_settings() -> tuple:
    """(repo id or None, version text or None), as DiffSynth-Studio reads them."""
    repo = os.environ.get(REPO_ID) or None
    version = os.environ.get(VERSION) or None
    return (repo.strip() if repo else None), (version.strip() if version else None)


def settings_reason(repo: Optional[str], version: Optional[str]) -> Optional[str]:
    """Why the variables name no loadable kernel (None when they do)."""
    if repo is None:
        return f"{REPO_ID} is not set (DiffSynth-Studio's variable naming a Hugging Face kernel repository)"
    if version is None:
        return f"{VERSION} is not set (DiffSynth-Studio loads {repo} with version=int({VERSION}))"
    try:
        int(version)
    except ValueError:
        return f"{VERSION}={version!r} is not a whole number (the kernel's major version)"
    return None


@register
class HubFlashAttention(_FlashBase):
    """``kernels.get_kernel(repo, version=N).flash_attn_func`` (DiffSynth's ``customized_fa_kernel``)."""

    name = BackendName.CUSTOMIZED_FA_KERNEL
    diffsynth_priority = 1
    package = "kernels"
    extra = "hf-kernels"
    module = "kernels"
    devices = frozenset({"cuda", "cpu"})  # what the loaded build serves is found by the tuner's gate
    max_head_dim = 256
    efficiency = 0.5
    launch_ms = 0.03

    def __init__(self) -> None:
        super().__init__()
        self._settings: Optional[tuple] = None

    def _follow_settings(self) -> None:
        """The variables may change between calls: a change forgets what was declared/loaded."""
        now = kernel_settings()
        if now != self._settings:
            self._settings = now
            self._declared, self._loaded, self._unavailable, self._version = None, False, None, None

    def _declare(self) -> tuple:
        self._follow_settings()
        if self._declared is None:
            reason = settings_reason(*self._settings)
            if reason is not None:  # no kernel named: nothing to import; the package named if it is missing too
                if package_version("kernels") is None and not module_present("kernels"):
                    reason = f"package kernels is not installed ({self._install_hint()}), and {reason}"
                self._declared = (reason, None)
        return super()._declare()

    def _metadata_version(self) -> Optional[str]:
        version = package_version("kernels")
        repo, kernel_version = self._settings or kernel_settings()
        if version is None or repo is None:
            return version
        return f"{version} {repo} v{kernel_version}"

    def _load(self) -> None:
        repo, version = self._settings or kernel_settings()
        reason = settings_reason(repo, version)
        if reason is not None:
            raise RuntimeError(reason)
        get_kernel = importlib.import_module("kernels").get_kernel
        try:
            module = get_kernel(repo, version=int(version))
        except Exception as exc:
            text = str(exc).strip().splitlines()
            raise RuntimeError(f"kernels.get_kernel({repo!r}, version={int(version)}) failed: "
                               f"{type(exc).__name__}: {text[0] if text else ''}") from exc
        func = getattr(module, "flash_attn_func", None)
        if not callable(func):
            raise RuntimeError(f"the kernel {repo} v{version} has no flash_attn_func")
        self._func = func
        self._version = self._metadata_version()

    def unavailable_reason(self) -> Optional[str]:
        self._follow_settings()
        return super().unavailable_reason()

    def _call(self, q, k, v, scale, causal, window):
        w = (window, window) if window is not None else (-1, -1)
        return self._func(q, k, v, softmax_scale=scale, causal=causal, window_size=w)
