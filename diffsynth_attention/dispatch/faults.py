"""Run-time failures of a backend: what they say about the backend, and what they do not.

A failure changes the decision on disk (which every process of the user reads) only when it is
the backend's: the call failed, failed again on a retry with the same inputs, and failed on
:data:`FRESH_TRIALS` calls with fresh random inputs of the same shapes. A failure that passes
on fresh inputs is tied to the inputs (or to the moment) and drops the backend for its key in
this process only.

A CUDA error that poisons the context (an illegal address, a device-side assert, a launch
failure: "sticky" errors) says nothing about the backend: every later CUDA call of the process
fails the same way, whatever runs it. Then nothing is retried, no decision changes, and the
error is raised as PyTorch raised it, after one log line that says so.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

logger = logging.getLogger("diffsynth_attention")

FRESH_TRIALS = 2  # calls on fresh inputs that must fail too before a decision on disk changes

# The messages of CUDA's sticky errors (cudaError_t descriptions): after one of them the context
# is unusable and the process must exit (CUDA Runtime API, "Error Handling").
STICKY_CUDA_ERRORS = (
    "illegal memory access",
    "device-side assert",
    "unspecified launch failure",
    "misaligned address",
    "illegal instruction",
    "invalid program counter",
    "hardware stack error",
    "uncorrectable ecc error",
    "unrecoverable",
    "an illegal address",
    "cuda_error_illegal_address",
    "cuda_error_launch_failed",
    "context is destroyed",
)


def poisons_context(exc: BaseException) -> bool:
    """Whether ``exc`` is a CUDA error after which the CUDA context cannot be used (sticky)."""
    text = str(exc).lower()
    if "cuda" not in text and type(exc).__name__ != "AcceleratorError":
        return False
    return any(phrase in text for phrase in STICKY_CUDA_ERRORS)


def context_broken(device: torch.device) -> bool:
    """Whether CUDA on ``device`` still works: a sync and a one-element kernel. Catches sticky
    errors whose message :func:`poisons_context` does not know. Always False off CUDA."""
    if getattr(device, "type", None) != "cuda":
        return False
    try:
        torch.cuda.synchronize(device)
        torch.ones(1, device=device).add_(1).item()
    except Exception:
        return True
    return False


def report_poisoned(backend: str, exc: BaseException) -> None:
    logger.error(
        "backend %s raised a CUDA error that poisons this process's CUDA context (%s): every later CUDA "
        "call fails, whatever backend runs it, so the backend is not blamed and no decision is changed; "
        "the process must exit (as PyTorch would). Rerun with CUDA_LAUNCH_BLOCKING=1 to find the kernel.",
        backend, str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__,
    )


def _fresh_like(t):
    if t is None:
        return None
    out = torch.empty_like(t)  # same shape, dtype, device and (dense) strides
    if out.is_floating_point():
        out.normal_()
    return out


def fails_on_fresh_inputs(run: Callable, q, k, v, mask, scale, trials: int = FRESH_TRIALS) -> bool:
    """Whether ``run`` fails on each of ``trials`` calls with fresh random q, k and v of the
    caller's shapes and layouts (the mask and scale kept: they were validated). Out-of-memory
    errors and poisoning CUDA errors count as passes: they are not the backend's."""
    for _ in range(trials):
        try:
            fresh = [_fresh_like(t) for t in (q, k, v)]
        except Exception:  # cannot make inputs (overlapping strides...): do not blame the backend
            return False
        try:
            with torch.no_grad():
                run(fresh[0], fresh[1], fresh[2], mask, scale)
        except torch.cuda.OutOfMemoryError:
            return False
        except Exception as exc:
            if poisons_context(exc):
                return False
            continue
        return False
    return True
