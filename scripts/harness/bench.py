"""The benchmark harness: what every script under ``scripts/`` measures with, the one surface
scripts use besides the public API (no script imports another script or a package module).
A development module: it lives in ``scripts/harness/`` and is not installed with the package
(a script runs with ``scripts/`` on ``sys.path``: ``from harness import bench``).

- :func:`environment`: the machine, torch, the kernel packages and what is usable;
- :func:`interleaved` (and :class:`Timer`, :func:`round_order`): the timer the tuner uses too,
  methods interleaved, each sample after a bounded wait for background kernel-package loads, what
  ran beside it recorded (:class:`.hygiene.Watch`);
- :func:`host_us`: host microseconds per call of several functions, interleaved blocks;
- :func:`shapes`, :func:`inputs`: the problems of the shape suite, random q, k, v for one;
- :func:`backend_call`: a backend called as a plan would call it (conversions included);
  :func:`diffsynth_fixed`: the backend DiffSynth-Studio's fixed priority list picks, and
  :func:`diffsynth_call`: that backend called as DiffSynth-Studio calls it;
  :func:`servable`: the backends that serve a problem and pass the accuracy gate;
- :func:`direct_call`: the cheapest hand-written call of a backend's kernel, the baseline of
  every overhead figure; :func:`hit_overhead`: ``attention_forward`` on a cache hit against it;
- :func:`fresh_dispatcher`: a dispatcher on an empty cache folder of its own;
- :func:`save_result`: ``<device>-<date><suffix>.{json,md}`` under a results folder;
- :class:`CompileRecorder`: a ``torch.compile`` backend that counts compiles and runs.

The objects scripts legitimately need from inside the package are re-exported here (loaded on
first use, see ``_REEXPORTS``): the backend ``REGISTRY``, the tuning policy (``TuningPolicy``,
``DEFAULT_POLICY``), the default dispatcher and its graph operators, the fault probes, the
diffusers registration, the SDPA patch's pieces, the cache's entry types and neighbour keys.
"""

from __future__ import annotations

import datetime
import json
import math
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from diffsynth_attention.tuning.timing import Timer, round_order
from diffsynth_attention.tuning.timing import interleaved as _interleaved
from .bench_calls import backend_call, diffsynth_call, diffsynth_fixed, fresh_dispatcher, inputs, servable, shapes, sync

# name here: (module, name there), imported on first use (some of them import a lot, or patch).
_REEXPORTS = {
    "REGISTRY": ("diffsynth_attention.backends", "REGISTRY"),  # every backend, by name
    "package_version": ("diffsynth_attention.backends", "package_version"),  # an installed distribution's version
    "enable_fa4_compile_cache": ("diffsynth_attention.backends.flash_attention", "enable_fa4_compile_cache"),
    "FA4_CACHE_ENABLED": ("diffsynth_attention.backends.flash_attention", "FA4_CACHE_ENABLED"),  # the variables that configure it
    "FA4_CACHE_DIR": ("diffsynth_attention.backends.flash_attention", "FA4_CACHE_DIR"),
    "TuningPolicy": ("diffsynth_attention.tuning.policy", "TuningPolicy"),
    "DEFAULT_POLICY": ("diffsynth_attention.tuning.policy", "DEFAULT_POLICY"),
    "default_dispatcher": ("diffsynth_attention.dispatch", "default_dispatcher"),  # what attention_forward uses
    "dispatch_op": ("diffsynth_attention.dispatch.compiled", "dispatch_op"),  # diffsynth_attention::dispatch
    "pack_dispatch_call": ("diffsynth_attention.dispatch.compiled", "pack_call"),  # its packed non-tensor arguments
    "kernel_op": ("diffsynth_attention.dispatch.compiled", "kernel_op"),  # diffsynth_attention::kernel
    "poisons_context": ("diffsynth_attention.dispatch.faults", "poisons_context"),
    "context_broken": ("diffsynth_attention.dispatch.faults", "context_broken"),
    "register_diffusers": ("diffsynth_attention.integrations.diffusers", "register"),  # the diffsynth_auto backend
    "sdpa_routable": ("diffsynth_attention.integrations.patching", "routable"),  # would the SDPA patch route this call
    "sdpa_wrapper": ("diffsynth_attention.integrations.patching", "scaled_dot_product_attention"),  # the patch's SDPA
    "original_sdpa": ("diffsynth_attention.integrations.patching", "_ORIGINAL_SDPA"),  # PyTorch's, before any patch
    "scale_for_cpu": ("diffsynth_attention.tools.shapes", "scale_for_cpu"),  # a problem cut to CPU size
    "DecisionCache": ("diffsynth_attention.store.cache", "DecisionCache"),
    "Candidate": ("diffsynth_attention.store.decision", "Candidate"),
    "Decision": ("diffsynth_attention.store.decision", "Decision"),
    "key_id": ("diffsynth_attention.store.decision", "key_id"),
    "neighbour_group": ("diffsynth_attention.store.neighbours", "neighbour_group"),
    "neighbour_cell": ("diffsynth_attention.store.neighbours", "cell"),  # the neighbour index's cell of a key
    "render_entry": ("diffsynth_attention.store.codec", "render_entry"),  # an entry file's text, in the current schema
    "index_neighbours": ("diffsynth_attention.store.group_index", "add"),  # the persisted neighbour index's markers
    "neighbour_distance": ("diffsynth_attention.store.key", "neighbour_distance"),
    "warm_split": ("diffsynth_attention.tools.torchrun", "split"),  # how warm under torchrun assigns problems to ranks
    "BUCKETS_PER_OCTAVE": ("diffsynth_attention.store.key", "BUCKETS_PER_OCTAVE"),
    "QUALITY_BOUNDS": ("diffsynth_attention.tiers", "BOUNDS"),  # the quality tiers' bounds (docs/quality.md)
    "quantize_fp8": ("diffsynth_attention.backends.fa3_fp8", "fused_quantize"),  # FlashAttention-3 FP8's quantisation, as it runs
    "fuzz_cases": ("diffsynth_attention.tools.fuzz", "cases"),  # the fuzz suite of realistic activations (tools/fuzz.py)
    "fuzz_case": ("diffsynth_attention.tools.fuzz", "make_case"),
    "FUZZ_SUITE": ("diffsynth_attention.tools.fuzz", "SUITE"),
    "fuzz_errors": ("diffsynth_attention.tools.fuzz", "errors"),  # relative L1 and cosine, overall and per head
    "fuzz_reference": ("diffsynth_attention.tools.fuzz", "reference"),
    "EMULATIONS": ("diffsynth_attention.tools.fuzz", "EMULATIONS"),  # CPU emulations of the low-precision kernels' arithmetic
    "gate_head_errors": ("diffsynth_attention.dispatch.lowprec", "head_errors"),  # the low-precision gate's per-head check
}

__all__ = ["CompileRecorder", "Timer", "backend_call", "diffsynth_call", "diffsynth_fixed", "direct_call", "environment", "fresh_dispatcher",
           "geomean", "hit_overhead", "host_us", "inputs", "interleaved", "round_order", "save_result", "servable",
           "shapes", "sync"]
__all__ += sorted(_REEXPORTS)


def __getattr__(name: str):
    where = _REEXPORTS.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(where[0]), where[1])
    globals()[name] = value
    return value


def geomean(xs) -> Optional[float]:
    xs = [x for x in xs if x and x > 0]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def environment(device) -> dict:
    """The machine and software a result was measured with."""
    import diffsynth_attention as da
    from diffsynth_attention.backends import REGISTRY

    device = torch.device(device)
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "python": platform.python_version(),
        "diffsynth_attention": da.__version__,
        "packages": {b.package: b.version() for b in REGISTRY.values() if b.package},
        "backends": da.available_backends(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["capability"] = f"{props.major}.{props.minor}"
        env["sm_count"] = props.multi_processor_count
    return env


def save_result(result: dict, out_dir, tag, suffix: str, write_md: Callable) -> Path:
    """Write ``<device>-<date><suffix>.json`` and ``.md`` (or ``<tag>.*``) under ``out_dir``;
    returns the path without its extension."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device_name = result["environment"]["device"].replace("NVIDIA ", "").replace(" ", "-")
    stem = out / (tag or f"{device_name}-{datetime.date.today().isoformat()}{suffix}")
    Path(f"{stem}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    write_md(result, Path(f"{stem}.md"))
    return stem


def direct_call(name: str, q, k, v) -> Callable:
    """The cheapest hand-written call of backend ``name`` on ``b n s d`` tensors (no mask, not
    causal): PyTorch's SDPA for ``torch``, the ATen operator's C builtin for the ``torch_*`` backends, the
    thin kernel call where FlashAttention-3/-4 have one (else the package's own function), on
    ``b s n d`` views, for kernel packages."""
    from diffsynth_attention.backends import REGISTRY
    from diffsynth_attention.backends.torch_sdpa import _SDPA

    if name == "torch":
        return lambda: _SDPA(q, k, v)
    vf = torch._C._VariableFunctions  # the C builtins: no Python frame of the operator objects
    if name == "torch_math":
        return lambda: vf._scaled_dot_product_attention_math(q, k, v)
    if name == "torch_flash":
        if q.device.type == "cpu":
            return lambda: vf._scaled_dot_product_flash_attention_for_cpu(q, k, v)
        return lambda: vf._scaled_dot_product_flash_attention(q, k, v)
    if name == "torch_efficient":
        return lambda: vf._scaled_dot_product_efficient_attention(q, k, v, None, False)
    if name == "torch_cudnn":
        return lambda: vf._scaled_dot_product_cudnn_attention(q, k, v, None, False)
    backend = REGISTRY[name]
    why = backend.unavailable_reason()
    if why is not None:
        raise RuntimeError(f"{name} is unavailable: {why}")
    func = backend._func
    qs, ks, vs = (t.transpose(1, 2) for t in (q, k, v))
    if name == "sage_attention":
        return lambda: func(q, k.clone(), v, tensor_layout="HND")
    thin = getattr(backend, "_thin", None)  # FlashAttention-3/-4: the compiled kernel directly (backends/thin.py)
    if thin is not None and thin(qs, ks, vs, None, False, None) is not None:  # (FA4: this first call records it)
        return lambda: thin(qs, ks, vs, None, False, None)
    return lambda: func(qs, ks, vs)


def interleaved(methods: dict, device, samples: int = 15, target_ms: float = 2.0, clock: Callable[[], float] = time.perf_counter,
                watch=None) -> dict:
    """Median ms per call of each of ``methods``: the library's interleaved timer
    (``diffsynth_attention.tuning.timing.interleaved``), each sample preceded by a bounded wait
    until no kernel package loads in the background; pass a :class:`.hygiene.Watch` as ``watch``
    to keep its record of what ran beside the samples (loads, threads, garbage collections)."""
    from .hygiene import Watch

    return _interleaved(methods, device, samples, target_ms, clock, watch if watch is not None else Watch())


def host_us(fns: dict, device, calls: int = 10000, blocks: int = 20, warmup: int = 300) -> dict:
    """Median host microseconds per call of each function: interleaved blocks (A, B, B, A, ...),
    the device synchronised between blocks so the launch queue never fills (host time only)."""
    device = torch.device(device)
    per = max(1, calls // blocks)
    host: dict = {name: [] for name in fns}
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    names = list(fns)
    for i in range(blocks):
        for name in (names if i % 2 == 0 else names[::-1]):
            fn = fns[name]
            t0 = time.perf_counter()
            for _ in range(per):
                fn()
            host[name].append((time.perf_counter() - t0) / per * 1e6)
            sync(device)
    return {name: statistics.median(v) for name, v in host.items()}


def hit_overhead(device, backend: Optional[str] = None, calls: int = 20000, blocks: int = 40) -> dict:
    """Host time per call: ``attention_forward`` on a cache hit minus :func:`direct_call` of the
    same kernel (the decision's, or ``backend`` forced), on a small problem."""
    import diffsynth_attention as da

    device = torch.device(device)
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    q = torch.randn(1, 2, 16, 64, device=device, dtype=dt)
    k, v = torch.randn_like(q), torch.randn_like(q)
    with torch.no_grad():
        if backend is None:
            backend = da.explain(q, k, v).backend
            scope = da.use_backend("auto")
        else:
            scope = da.use_backend(backend)
        with scope:
            t = host_us({"direct": direct_call(backend, q, k, v), "dispatched": lambda: da.attention_forward(q, k, v)},
                        device, calls, blocks, warmup=500)
    return {"device": str(device), "backend": backend, "calls_each": max(1, calls // blocks) * blocks,
            "direct_us": t["direct"], "dispatched_us": t["dispatched"], "overhead_us": t["dispatched"] - t["direct"]}


class CompileRecorder:
    """A ``torch.compile`` backend that counts compiles (Dynamo frames) and compiled runs (calls a
    compiled graph served). By default it lowers through AOTAutograd only and keeps the forward
    graphs, where ``diffsynth_attention::attention`` has been decomposed into what it runs;
    ``inductor=True`` compiles with inductor instead."""

    def __init__(self, inductor: bool = False):
        self.inductor = inductor
        self.compiles = 0
        self.runs = 0
        self.forward_graphs: list = []

    def __call__(self, gm, example_inputs):
        self.compiles += 1
        if self.inductor:
            from torch._inductor.compile_fx import compile_fx

            inner = compile_fx(gm, example_inputs)
        else:
            from torch._dynamo.backends.common import aot_autograd
            from torch._functorch.aot_autograd import make_boxed_func

            def fw(g, _inputs):
                self.forward_graphs.append(g)
                return make_boxed_func(g.forward)

            def bw(g, _inputs):
                return make_boxed_func(g.forward)

            inner = aot_autograd(fw_compiler=fw, bw_compiler=bw)(gm, example_inputs)

        def run(*args):
            self.runs += 1
            return inner(*args)
        return run

    def targets(self, index: int = -1) -> list:
        """The operators a kept forward graph calls."""
        return [str(n.target) for n in self.forward_graphs[index].graph.nodes if n.op == "call_function"]

