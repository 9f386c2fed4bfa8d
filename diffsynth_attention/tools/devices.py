"""Device choice for ``warm`` and ``explain``: the syntax is checked without torch (a usage
error), the device's presence with it (a failure of this machine)."""

from __future__ import annotations

import re
from typing import Optional

_DEVICE = re.compile(r"^(cpu|cuda|mps|xpu|hip)(:\d+)?$")


class DeviceError(ValueError):
    pass


def check_device(text: Optional[str], what: str = "--device") -> Optional[str]:
    """``text`` if it spells a device (cpu, cuda, cuda:N, ...), else a ValueError in the user's terms."""
    if text is None:
        return None
    if not _DEVICE.match(text.strip()):
        raise DeviceError(f"{what} {text!r} is not a device; use cpu, cuda or cuda:N")
    return text.strip()


def resolve_device(device: Optional[str]):
    """The torch device: ``device``, else cuda when available, else cpu. A RuntimeError when the
    device is not on this machine."""
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(check_device(device))
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"--device {device}: this machine has no usable CUDA GPU (torch.cuda.is_available() is False)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RuntimeError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif dev.type != "cpu":
        raise RuntimeError(f"--device {device}: only cpu and cuda devices are supported")
    return dev


def on_cpu(device: Optional[str]) -> bool:
    """Whether ``warm`` runs on a CPU (and therefore scales problems down)."""
    import torch

    if device is None:
        return not torch.cuda.is_available()
    return device.startswith("cpu")
