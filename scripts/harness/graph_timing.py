"""Timing under CUDA graphs (issue 29's repeat "in eager mode and under CUDA graphs"): each
backend's call captured once in a ``torch.cuda.CUDAGraph``, then replayed in interleaved samples
timed by CUDA events. What a caller under ``mode="reduce-overhead"`` or a manual graph pays: device
time only, no host time."""
from __future__ import annotations

import statistics

import torch


def capture(fn, device):
    """A CUDA graph of one call of ``fn`` (warmed on a side stream first, as capture requires),
    or the exception that stopped it."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except Exception as exc:  # a backend that syncs or allocates on the host mid-call cannot be captured
        torch.cuda.synchronize(device)
        return exc
    return graph


def graph_times(methods: dict, device, samples: int = 15, target_ms: float = 2.0) -> tuple:
    """({name: median ms per replay}, {name: why it could not be captured}); interleaved samples,
    each ``target_ms`` of back-to-back replays between two CUDA events."""
    device = torch.device(device)
    graphs, failed = {}, {}
    with torch.no_grad():
        for name, fn in methods.items():
            got = capture(fn, device)
            if isinstance(got, Exception):
                failed[name] = f"{type(got).__name__}: {str(got)[:160]}"
            else:
                graphs[name] = got
    if not graphs:
        return {}, failed
    reps = {}
    for name, g in graphs.items():  # replays per sample: about target_ms of device time
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(3):
            g.replay()
        end.record()
        end.synchronize()
        reps[name] = max(1, min(1000, int(target_ms / max(start.elapsed_time(end) / 3, 1e-3))))
    times = {n: [] for n in graphs}
    names = list(graphs)
    for i in range(samples):
        for name in names if i % 2 == 0 else names[::-1]:
            g = graphs[name]
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps[name]):
                g.replay()
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end) / reps[name])
    return {n: statistics.median(v) for n, v in times.items()}, failed
