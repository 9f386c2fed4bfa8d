"""The warm loop: tune a list of problems ahead of time, whatever the caller's override says.

The problem lists are :mod:`.shapes`, the inputs :mod:`.inputs`, the device :mod:`.devices`
and the torchrun set-up :mod:`.torchrun`.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

from ..overrides import use_backend
from .inputs import make_inputs

logger = logging.getLogger("diffsynth_attention")


def warm(shapes: list, device: torch.device, dtype=None, layout: str = "b n s d", on_done: Optional[Callable] = None) -> list:
    """Tune every problem on ``device``; return [(shape, Explanation)]. Decisions go to the cache.

    Runs under ``use_backend("auto")``: ``DIFFSYNTH_ATTENTION_IMPLEMENTATION`` (and any scope of
    the caller) does not stop it from tuning."""
    from ..api import explain

    results = []
    g = torch.Generator(device=device).manual_seed(0)
    with use_backend("auto"):
        for shape in shapes:
            q, k, v, kwargs = make_inputs(shape, device, dtype, layout, g)
            with torch.no_grad():
                info = explain(q, k, v, **kwargs)
            del q, k, v
            results.append((shape, info))
            if on_done is not None:
                on_done(shape, info)
    return results
