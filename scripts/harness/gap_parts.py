"""The measurements of ``scripts/compiled_gap.py`` (part of the benchmark harness, not installed):
where a compiled function's time per call goes, for two or more compiled functions of one problem
timed interleaved.

- :func:`timed_rounds`: per sample, the synchronised wall time of single calls, the back-to-back
  time per call (the benchmarks' figure), the host time to issue a burst without synchronising,
  and on a GPU the device time per call (the tuner's ``Timer.measure``: a second burst issued
  while the GPU is held, so the kernels run back to back); interleaved, a new order every round;
- :func:`kernel_profile`: the operators a call runs on the host and the kernels it launches
  (``torch.profiler``), per call;
- :func:`graph_facts`: what Dynamo makes of a module (``torch._dynamo.explain``: graphs, graph
  breaks and their reasons, the operators of each graph, and for ``attention_forward`` the
  decision the bake wrote into its operator) and what AOTAutograd lowers it to;
- :func:`guard_facts`: a compiled module's cache entries and guards (leaf checks, nodes, the time
  one check takes), and :func:`dynamo_counters`: Dynamo's counters (frames, graph breaks,
  recompiles), whose differences tell what a phase compiled.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Optional

import torch

from .bench_calls import sync
from .guards import guard_sources, guard_us, leaf_count


def _median(xs: list) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _wall_ms(fn: Callable, device, calls: int) -> float:
    """Median ms of single calls, each synchronised (what one call costs the caller who waits)."""
    out = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(out)


def timed_rounds(methods: dict, device, samples: int = 9, target_ms: float = 2.0, wall_calls: int = 20, watch=None) -> dict:
    """{name: {"wall_ms", "ms", "host_ms", "device_ms"}}: medians over ``samples`` interleaved
    rounds (module docstring); ``device_ms`` None on a CPU. ``watch`` (a :class:`.hygiene.Watch`)
    around each method's sample of a round."""
    from .bench import Timer, round_order

    device = torch.device(device)
    timer = Timer(device)
    names = list(methods)
    for fn in methods.values():
        fn()
    sync(device)
    calls = {}
    for name, fn in methods.items():
        if watch is not None:
            watch.before(name)
        calls[name] = Timer.calls_for(timer.sample(fn, 1), target_ms)
        if watch is not None:
            watch.after(name)
    got: dict = {n: {"wall_ms": [], "ms": [], "host_ms": [], "device_ms": []} for n in names}
    for i in range(samples):
        for name in round_order(names, i):
            fn = methods[name]
            if watch is not None:
                watch.before(name)
            try:
                s = timer.measure(fn, calls[name])
                got[name]["ms"].append(s.ms)
                got[name]["device_ms"].append(s.device_ms)
                got[name]["host_ms"].append(s.host_ms if s.host_ms is not None else s.ms)  # a CPU: the host is the device
                got[name]["wall_ms"].append(_wall_ms(fn, device, min(wall_calls, calls[name])))
            finally:
                if watch is not None:
                    watch.after(name)
    return {n: {**{m: _median(v) for m, v in g.items()}, "calls_per_sample": calls[n]} for n, g in got.items()}


def kernel_profile(fn: Callable, device, calls: int = 20, top: int = 8) -> dict:
    """The host operators (self time) and, on a GPU, the kernels (device time) of one call of
    ``fn``, per call, from ``torch.profiler`` over ``calls`` calls."""
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fn()
    sync(device)
    with profile(activities=acts) as prof:
        for _ in range(calls):
            fn()
        sync(device)
    ops, kernels = [], []
    for e in prof.key_averages():
        dev_self = getattr(e, "self_device_time_total", None)
        if dev_self is None:
            dev_self = getattr(e, "self_cuda_time_total", 0)
        kind = str(getattr(e, "device_type", ""))
        row = {"name": e.key[:120], "count": round(e.count / calls, 2)}
        if kind.endswith("CUDA"):
            kernels.append({**row, "device_us": round(dev_self / calls, 2)})
        else:
            ops.append({**row, "self_cpu_us": round(e.self_cpu_time_total / calls, 2)})
    ops.sort(key=lambda r: -r["self_cpu_us"])
    kernels.sort(key=lambda r: -r["device_us"])
    out = {"host_ops": ops[:top], "host_self_us": round(sum(o["self_cpu_us"] for o in ops), 2)}
    if device.type == "cuda":
        out.update(kernels=kernels[:top], kernel_us=round(sum(k["device_us"] for k in kernels), 2),
                   kernels_per_call=round(sum(k["count"] for k in kernels), 2))
    return out


def _decision_of(node) -> Optional[str]:
    """The ``decision`` argument of a ``diffsynth_attention::attention`` node (its 16th)."""
    if "decision" in node.kwargs:
        return node.kwargs["decision"]
    return node.args[15] if len(node.args) > 15 else None


def graph_facts(module, args: tuple) -> dict:
    """What Dynamo makes of ``module(*args)`` (``torch._dynamo.explain``, which resets Dynamo
    before and after) and what AOTAutograd lowers its graphs to (every forward graph's operators).
    For ``attention_forward``: the decision the bake wrote into the graph (``baked``: the
    operator's ``decision`` argument, ``backend|source|key...``; None where the graph dispatches at
    run time)."""
    from .bench import CompileRecorder

    out: dict = {}
    try:
        ex = torch._dynamo.explain(module)(*args)
        out.update(graphs=ex.graph_count, graph_breaks=ex.graph_break_count,
                   break_reasons=[str(getattr(r, "reason", r))[:200] for r in ex.break_reasons],
                   dynamo_ops=[[str(op) for op in ops] for ops in ex.ops_per_graph],
                   dynamo_guards=len(ex.out_guards or ()))
        for gm in ex.graphs:
            for node in gm.graph.nodes:
                if node.op == "call_function" and "diffsynth_attention" in str(node.target):
                    out.setdefault("custom_ops", []).append(str(node.target))
                    if "attention" in str(node.target):
                        out["baked"] = _decision_of(node)
    except Exception as exc:  # explain itself failing says something too
        out["explain_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    torch._dynamo.reset()
    rec = CompileRecorder()
    try:
        torch.compile(module, backend=rec, dynamic=False)(*args)
        out["lowered_ops"] = [t for i in range(len(rec.forward_graphs)) for t in rec.targets(i)]
    except Exception as exc:
        out["lowered_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    torch._dynamo.reset()
    return out


def guard_facts(module, args: tuple, calls: int = 5000) -> dict:
    """A compiled module's cache entries and guards: leaf checks, guard-tree nodes, and the
    median microseconds one check of the first entry takes (its guard manager called directly)."""
    check_us, entries = guard_us(module, args, calls=calls, repeats=5)
    return {"cache_entries": entries, "leaf_guards": leaf_count(module), "guard_nodes": len(guard_sources(module)),
            "check_us": None if check_us is None else round(check_us, 3)}


_COUNTED = ("frames", "graph_break", "recompiles", "unimplemented", "stats", "inductor", "aot_autograd")


def dynamo_counters() -> dict:
    """A copy of Dynamo's counters that say what was compiled (frames, breaks, recompiles...)."""
    from torch._dynamo.utils import counters

    return {k: dict(counters.get(k, {})) for k in _COUNTED}


def counters_since(before: dict) -> dict:
    """The counters that moved since ``before`` (:func:`dynamo_counters`), by how much."""
    now, out = dynamo_counters(), {}
    for group, values in now.items():
        moved = {k: v - before.get(group, {}).get(k, 0) for k, v in values.items()
                 if isinstance(v, (int, float)) and v != before.get(group, {}).get(k, 0)}
        if moved:
            out[group] = moved
    return out
