"""First launches of a kernel package's kernels, on its loading thread (issue 31, item 1).

Importing FlashAttention-3 takes 0.02 s, but CUDA loads the extension's kernels lazily, at their
first launch (4.07 s on an H200); FlashAttention-4 loads (or compiles) the kernel of each variant
at its first call. Whichever call first reaches the kernel pays that, so after the import the
loading thread launches the kernel once for each variant that the cached decisions name (dtype,
head dims, grouping, causal, window: the problem of the first decision of each variant, its own
shapes), on a side stream, before the backend is reported ready. Until then the calls of those
keys are served by the best ready candidate (the dispatcher's ``loading`` plan).

CUDA is never initialised here (that would break a caller that forks later): the launches wait,
on the loading thread, until the caller has started CUDA (at most ``CUDA_WAIT_S``), and are
skipped if it does not. A launch that fails is logged and skipped: the call that needs the kernel
finds the failure as before. A backend warms the devices of ``warm_devices`` (CUDA; the tests'
fake kernels add the CPU), on the CUDA devices the process already uses (each with a primary
context), never on the loading thread's own current device, which is GPU 0 in every rank.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Iterable

logger = logging.getLogger("diffsynth_attention")

MAX_VARIANTS = 8  # first launches per backend at most (one per kernel variant the decisions name)
CUDA_WAIT_S = 120.0  # how long the loading thread waits for the caller to start CUDA
_POLL_S = 0.05


def variants(keys: Iterable) -> list:
    """One problem (a key's ``problem`` fields, with its device type) per kernel variant, in order."""
    seen, out = set(), []
    for key in keys:
        try:
            p, device = key["problem"], key["device"]["type"]
            sig = (device, p["dtype"], p["head_dim"], p["head_dim_v"], p["heads_q"] // p["heads_kv"], p["causal"],
                   p["window"], p["mask"], p.get("layout"))
        except (KeyError, TypeError, ZeroDivisionError):
            continue
        if sig in seen or p["mask"] != "none":
            continue
        seen.add(sig)
        out.append({**p, "device": device})
        if len(out) == MAX_VARIANTS:
            break
    return out


def _cuda_started(torch) -> bool:
    deadline = time.monotonic() + CUDA_WAIT_S
    while not torch.cuda.is_initialized():
        if time.monotonic() > deadline:
            return False
        time.sleep(_POLL_S)
    return True


def cuda_devices(torch) -> list:
    """The CUDA devices this process already uses: those with a primary context. Not the loading
    thread's current device, which is device 0 whatever the caller chose (the current device is
    per thread): warming it would create a context on GPU 0 in every rank of a node. Empty until
    the caller has made one; where torch cannot tell, the current device."""
    has_context = getattr(torch._C, "_cuda_hasPrimaryContext", None)
    if has_context is None:
        return [torch.cuda.current_device()]
    return [i for i in range(torch.cuda.device_count()) if has_context(i)]


def _used_devices(torch) -> list:
    deadline = time.monotonic() + CUDA_WAIT_S
    while True:
        found = cuda_devices(torch)
        if found or time.monotonic() > deadline:
            return found
        time.sleep(_POLL_S)


def _launch(backend, p: dict, torch, index=None) -> None:
    if p["device"] == "cuda":
        with torch.cuda.device(index):
            return _launch_on(backend, p, torch, torch.device("cuda", index))
    return _launch_on(backend, p, torch, torch.device(p["device"]))


def _launch_on(backend, p: dict, torch, device) -> None:
    dtype = getattr(torch, p["dtype"])
    native = getattr(backend, "forward_native", None)  # FlashAttention: its own b s n d layout, contiguous
    shapes = [(p["batch"], p["heads_q"], p["seq_q"], p["head_dim"]), (p["batch"], p["heads_kv"], p["seq_kv"], p["head_dim"]),
              (p["batch"], p["heads_kv"], p["seq_kv"], p["head_dim_v"])]
    if native is not None:
        shapes = [(b, s, n, d) for b, n, s, d in shapes]
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    with torch.no_grad(), (torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()):
        # zeros, not random numbers: drawing them would advance the caller's default generator (a
        # seeded pipeline would then depend on when this thread ran); the values do not matter here
        q, k, v = (torch.zeros(s, dtype=dtype, device=device) for s in shapes)
        if native is not None:
            native(q, k, v, None, bool(p["causal"]), p["window"])
        else:
            backend.forward(q, k, v, None, None, bool(p["causal"]), p["window"], False)
        del q, k, v
    if stream is not None:
        stream.synchronize()


def warm(backend, keys: Iterable) -> int:
    """Launch ``backend``'s kernel once per variant ``keys`` name (on this, the loading, thread).
    Returns how many launches ran."""
    todo = [p for p in variants(keys) if p["device"] in getattr(backend, "warm_devices", ())]
    if not todo:
        return 0
    import torch

    indices = []
    if any(p["device"] == "cuda" for p in todo):
        indices = _used_devices(torch) if _cuda_started(torch) else []
    runs = [(p, i) for p in todo for i in (indices if p["device"] == "cuda" else [None])]
    done = 0
    for p, index in runs:
        t0 = time.perf_counter()
        try:
            _launch(backend, p, torch, index)
        except Exception as exc:  # the call that needs it finds the failure as before
            logger.debug("the first launch of %s for %s failed on the loading thread: %s", backend.name, p, exc)
            continue
        done += 1
        logger.info("backend %s: first launch for %s %s d%d done on the loading thread (%.2fs)", backend.name,
                    p["dtype"], "causal" if p["causal"] else "", p["head_dim"], time.perf_counter() - t0)
    return done
