"""The 6-resolution loop of ``scripts/bench_e2e.py --resolutions``: one process renders 6 Wan
resolutions with the default ``torch.compile``, plain and routed through the dispatcher."""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from .e2e_attention import ORIGINAL_SDPA
from .e2e_models import build_wan, sync


class Routed(torch.nn.Module):
    """``model`` with ``with da.patch_sdpa():`` inside its forward: compiled, it routes in its own
    graph, so plain and routed graphs live side by side and can be called alternately."""

    def __init__(self, model, da):
        super().__init__()
        self.model, self.da = model, da

    def forward(self, **kw):
        with self.da.patch_sdpa():
            return self.model(**kw)


def resolution_loop(args, device, dtype, da) -> dict:
    """One process renders 6 Wan resolutions (twice each) with the default torch.compile, plain
    and routed: compiles, compiled-graph runs, and the dispatcher's tunings."""
    from .bench import sdpa_wrapper

    token_sets = [64, 96, 128, 160, 192, 256] if args.small else [1560, 2340, 3120, 3600, 4680, 6240]
    out = {"tokens": token_sets}
    F.scaled_dot_product_attention = sdpa_wrapper
    try:
        for variant in ("plain", "dispatcher"):
            torch._dynamo.reset()
            stats = {"compiles": 0, "graph_runs": 0}

            def backend(gm, example_inputs):
                from torch._inductor.compile_fx import compile_fx

                stats["compiles"] += 1
                inner = compile_fx(gm, example_inputs)

                def run(*a):
                    stats["graph_runs"] += 1
                    return inner(*a)
                return run

            torch.manual_seed(args.seed)
            t0 = time.perf_counter()
            before = da.stats()
            per_res = []
            model = build_wan(args, token_sets[0], device, dtype)[1]
            target = model if variant == "plain" else Routed(model, da)
            compiled = torch.compile(target, backend=backend)
            for tok in token_sets:
                inputs = build_wan(args, tok, device, dtype, model=model)[2]
                runs0 = stats["graph_runs"]
                with torch.no_grad():
                    for _ in range(2):
                        compiled(**inputs())
                    sync(device)
                    # Then timed forwards; the dispatcher's hit counter moves only where attention
                    # reached it at run time (the run-time operator, or an eager fallback): a graph
                    # with the backend baked in never calls it.
                    hits0, times = da.stats()["hits"], []
                    for _ in range(args.loop_iters):
                        args_now = inputs()
                        sync(device)
                        t1 = time.perf_counter()
                        compiled(**args_now)
                        sync(device)
                        times.append((time.perf_counter() - t1) * 1e3)
                per_res.append({"tokens": tok, "graph_runs": stats["graph_runs"] - runs0, "compiles_so_far": stats["compiles"],
                                "median_ms": statistics.median(times), "runtime_dispatch_calls": da.stats()["hits"] - hits0})
            del model, target, compiled
            out[variant] = {"compiles": stats["compiles"], "graph_runs": stats["graph_runs"], "per_resolution": per_res,
                            "tunings": da.stats()["tunings"] - before["tunings"], "seconds": time.perf_counter() - t0}
    finally:
        F.scaled_dot_product_attention = ORIGINAL_SDPA
        torch._dynamo.reset()
    return out
