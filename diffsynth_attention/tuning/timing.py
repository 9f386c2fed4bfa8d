"""Timing what the caller pays, the same way in the tuner and in the benchmarks.

A *sample* is one untimed call (so caches and allocator state look as they do in a pipeline,
whatever ran before) followed by ``calls`` back-to-back calls between two CUDA events (or
``time.perf_counter`` readings on a CPU, after which the device is synchronised); its value is
the time per call. Back-to-back calls measure throughput, as a pipeline sees it: host overhead
counts where it exceeds the kernel's time, and is hidden where the GPU is the bottleneck.

A *measurement* (:meth:`Timer.measure`, what the tuner's rounds take) adds the two costs behind
that time, on a GPU: the **host** time to issue one call (``perf_counter`` around the issuing
loop of the same burst: the launch queue does not fill in ``calls`` <= 200 calls, so the loop
does not wait for the GPU) and the **device** time per call, from a second burst issued while
the GPU is held by ``torch.cuda._sleep`` (sized from the host time just measured), so the
calls run back to back with the host ahead of them. On a CPU the two are one: both None.
"""

from __future__ import annotations

import random
import statistics
import time
from typing import Callable, NamedTuple, Optional

import torch


class Sample(NamedTuple):
    """One measurement: ms per call back to back, and (GPU only) host and device ms per call."""

    ms: float
    host_ms: Optional[float] = None
    device_ms: Optional[float] = None


_cycles_per_ms: dict = {}  # device index -> torch.cuda._sleep cycles per ms (calibrated once)


def _sleep_cycles_per_ms() -> float:
    dev = torch.cuda.current_device()
    if dev not in _cycles_per_ms:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        cycles = 2_000_000
        torch.cuda._sleep(cycles)  # first launch loads the kernel
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        _cycles_per_ms[dev] = cycles / max(start.elapsed_time(end), 1e-3)
    return _cycles_per_ms[dev]


def _burst(fn: Callable, calls: int) -> tuple:
    """``calls`` back-to-back calls between two CUDA events: (start, end, host seconds to issue them)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host_s = time.perf_counter() - t0
    end.record()
    return start, end, host_s


class Timer:
    """Samples on ``device``; on a CPU the time is read from ``clock`` (seconds; injected by the
    tuner's policy, so tests can run on a virtual clock)."""

    def __init__(self, device: torch.device, clock: Callable[[], float] = time.perf_counter):
        self.cuda = device.type == "cuda"
        self.clock = clock

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def sample(self, fn: Callable, calls: int, warm: bool = True) -> float:
        """ms per call over ``calls`` back-to-back calls, after one untimed call (``warm``)."""
        if warm:
            fn()
        elif self.cuda:
            torch.cuda.synchronize()
        if self.cuda:
            start, end, _ = _burst(fn, calls)
            end.synchronize()
            return start.elapsed_time(end) / calls
        t0 = self.clock()
        for _ in range(calls):
            fn()
        return (self.clock() - t0) * 1e3 / calls

    def measure(self, fn: Callable, calls: int, warm: bool = True) -> Sample:
        """A :class:`Sample` of ``calls`` back-to-back calls (after one untimed call, ``warm``): on a
        GPU also the host time to issue a call and the device time per call (module docstring)."""
        if not self.cuda:
            return Sample(self.sample(fn, calls, warm))
        if warm:
            fn()
        else:
            torch.cuda.synchronize()
        start, end, host_s = _burst(fn, calls)
        # the second burst: the GPU held long enough that the host issues every call before it runs
        hold_ms = host_s * 1e3 * 1.5 + 0.05
        torch.cuda._sleep(int(hold_ms * _sleep_cycles_per_ms()))
        d_start, d_end, _ = _burst(fn, calls)
        d_end.synchronize()
        return Sample(start.elapsed_time(end) / calls, host_s * 1e3 / calls, d_start.elapsed_time(d_end) / calls)

    @staticmethod
    def calls_for(one_call_ms: float, target_ms: float, most: int = 200) -> int:
        """How many back-to-back calls make a sample of about ``target_ms``."""
        return max(1, min(most, int(target_ms / max(one_call_ms, 1e-4))))


def round_order(names: list, i: int, seed: str = "") -> list:
    """The order of round ``i``: a permutation drawn from a generator seeded by the names and
    ``i`` (deterministic). Not a rotation: rotating keeps each method behind the same one, and a
    kernel's time depends on what ran before it (an H200 timed the same FlashAttention-4 call 6.8%
    apart behind two different kernels)."""
    order = list(names)
    random.Random(f"{seed}|{'|'.join(map(str, names))}|{i}").shuffle(order)
    return order


def interleaved(methods: dict, device, samples: int = 15, target_ms: float = 2.0,
                clock: Callable[[], float] = time.perf_counter, watch=None) -> dict:
    """Median ms per call of each of ``methods`` ({name: fn}): samples of back-to-back calls
    (about ``target_ms`` each), interleaved, in a new order every round (:func:`round_order`).
    The benchmarks' timer. ``watch``: an object whose ``before(name)`` and ``after(name)`` are
    called around every sample, the one that sizes the others included (outside the timed
    calls: the benchmarks wait there for background loads and record what ran beside a sample)."""
    timer = Timer(device, clock)

    def sample(name: str, calls: int) -> float:
        if watch is None:
            return timer.sample(methods[name], calls)
        watch.before(name)
        try:
            return timer.sample(methods[name], calls)
        finally:
            watch.after(name)

    calls = {name: Timer.calls_for(sample(name, 1), target_ms) for name in methods}
    names = list(methods)
    times: dict = {name: [] for name in names}
    for i in range(samples):
        for name in round_order(names, i):
            times[name].append(sample(name, calls[name]))
    return {name: statistics.median(t) for name, t in times.items()}
