#!/usr/bin/env python3
"""diffusers Wan with Ulysses context parallelism: ``diffsynth_auto`` against ``native``.

Run on 2 GPUs (issue 22)::

    torchrun --nproc_per_node=2 scripts/bench_cp.py --out benchmarks/results

The model is diffusers' ``WanTransformer3DModel`` with Wan 2.1 1.3B's shapes (12 heads of 128,
dim 1536, FFN 8960), 4 blocks, random bf16 weights, on a 480p 81-frame latent: 21 x 60 x 104
-> 32,760 tokens, 512 text tokens, ``ContextParallelConfig(ulysses_degree=2)``. On each rank the
attention sees the full sequence and 6 heads. Measured, eager and ``torch.compile`` (default
mode, static shapes), with the two backends interleaved in the same rounds:

- the model's forward (4 blocks), median of the rounds;
- Wan's self-attention alone through ``dispatch_attention_fn`` with the model's parallel config
  (Ulysses all-to-alls included), eager;
- the decisions each rank holds for its attention keys (after ``sync_decisions``), and whether
  they agree;
- the output difference ``diffsynth_auto`` vs ``native`` (max abs, relative L1), both under CP.

Writes ``<out>/<device>-<date>-wan-cp-<world>gpu.json`` and ``.md`` on rank 0 (the harness's
``save_result``). A fresh cache folder
is used unless ``--keep-cache``. ``--tiny`` runs a small model on the CPU over gloo (the test of
this script). A missing kernel package only narrows the candidates; a compile failure is
recorded, and the eager result is still written.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--tag", default=None, help="file name stem (default <device>-<date>-wan-cp-<world>gpu)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--frames", type=int, default=21, help="latent frames (21: 81 video frames)")
    p.add_argument("--height", type=int, default=60, help="latent height (60: 480 px)")
    p.add_argument("--width", type=int, default=104, help="latent width (104: 832 px)")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--keep-cache", action="store_true")
    p.add_argument("--tiny", action="store_true", help="a tiny model on the CPU over gloo (tests)")
    return p.parse_args(argv)


def setup(args):
    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available() and not args.tiny
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=1800))
    if not cuda:
        if hasattr(torch, "accelerator"):  # torch 2.6+; diffusers maps ranks to accelerators, the CPU has none
            torch.accelerator.device_count = lambda: 1
        import diffusers.hooks.context_parallel as hooks

        if not hasattr(hooks.logger, "warning_once"):  # diffusers 0.42.1 calls a method its logger lacks
            hooks.logger.warning_once = hooks.logger.warning
    return torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")


def build(args, device):
    import torch
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    if args.tiny:
        cfg = dict(num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=4, text_dim=32,
                   freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=64)
        shape, text, dtype = (1, 4, 2, 8, 8), (1, 8, 32), torch.float32
    else:
        cfg = dict(num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
                   freq_dim=256, ffn_dim=8960, num_layers=args.layers)
        shape, text, dtype = (1, 16, args.frames, 2 * args.height, 2 * args.width), (1, 512, 4096), torch.bfloat16
    model = WanTransformer3DModel(**cfg).to(device=device, dtype=dtype).eval()
    g = torch.Generator(device="cpu").manual_seed(1)
    inputs = {"hidden_states": torch.randn(shape, generator=g).to(device, dtype),
              "timestep": torch.tensor([500], device=device),
              "encoder_hidden_states": torch.randn(text, generator=g).to(device, dtype), "return_dict": False}
    tokens = shape[2] * (shape[3] // 2) * (shape[4] // 2)
    return model, inputs, tokens, cfg


class Clock:
    def __init__(self, device):
        import torch

        self.cuda = device.type == "cuda"
        self.torch = torch

    def time_ms(self, fn) -> float:
        import torch.distributed as dist

        dist.barrier()
        if self.cuda:
            self.torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if self.cuda:
            self.torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1e3


def interleaved(clock, fns: dict, rounds: int, before=None) -> dict:
    """{name: median ms}: each round times every function once, in a new seeded order (the
    benchmarks' :func:`round_order`, the same on every rank: the collectives stay matched);
    ``before[name]()`` runs untimed ahead of each sample (switching the model's backend)."""
    from harness.bench import round_order

    names = list(fns)
    samples = {n: [] for n in names}
    for r in range(rounds):
        for n in round_order(names, r):
            if before is not None:
                before[n]()
            samples[n].append(clock.time_ms(fns[n]))
    return {n: round(statistics.median(s), 4) for n, s in samples.items()}


def max_over_ranks(values: dict) -> dict:
    """The slowest rank's time per entry (every collective waits for it)."""
    import torch.distributed as dist

    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, values)
    return {k: max(g[k] for g in gathered) for k in values}


def decisions() -> dict:
    from harness.bench import default_dispatcher

    return {kid: {"backend": d.backend, "problem": d.key["problem"]}
            for kid, d in sorted(default_dispatcher().store.entries().items())}


def environment(device) -> dict:
    import torch.distributed as dist

    from harness.bench import environment as bench_environment, package_version

    return {**bench_environment(device), "world_size": dist.get_world_size(), "diffusers": package_version("diffusers")}


def run(args) -> dict:
    import torch
    import torch.distributed as dist

    device = setup(args)
    rank, world = dist.get_rank(), dist.get_world_size()
    import diffusers

    diffusers.utils.logging.set_verbosity_error()  # set_attention_backend warns "experimental" at every switch
    if not args.keep_cache and "DIFFSYNTH_ATTENTION_CACHE_DIR" not in os.environ:  # a fresh one, shared by the ranks
        folder = [tempfile.mkdtemp(prefix="dsa-bench-cp-") if rank == 0 else None]
        dist.broadcast_object_list(folder, src=0)
        os.environ["DIFFSYNTH_ATTENTION_CACHE_DIR"] = folder[0]

    from harness.bench import register_diffusers

    register_diffusers()
    import diffsynth_attention as da
    from diffusers import ContextParallelConfig
    from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn

    model, inputs, tokens, cfg = build(args, device)
    model.set_attention_backend("native")
    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
    clock = Clock(device)
    result = {"environment": environment(device), "model": {**cfg, "tokens": tokens, "ulysses_degree": world},
              "rounds": args.rounds}

    def forward(backend, run=model):  # ``run``: the model, or its compiled version
        def fn():
            model.set_attention_backend(backend)
            with torch.no_grad():
                return run(**inputs)[0]
        return fn

    def timed(fn):  # the model's backend is switched untimed, by ``switch``
        def run():
            with torch.no_grad():
                return fn(**inputs)[0]
        return run
    switch = {b: (lambda b=b: model.set_attention_backend(b)) for b in ("native", "diffsynth_auto")}

    # first calls: each rank tunes (ranks on one node share the cache: one tunes, the other reads)
    t0 = time.perf_counter()
    out_ours = forward("diffsynth_auto")()
    result["first_call_s"] = round(time.perf_counter() - t0, 3)
    out_native = forward("native")()
    diff = (out_ours.float() - out_native.float())
    result["output_difference"] = {"max_abs": diff.abs().max().item(),
                                   "relative_l1": (diff.abs().sum() / out_native.float().abs().sum()).item()}
    del out_ours, out_native, diff
    before = decisions()
    da.sync_decisions()
    after = decisions()
    gathered = [None] * world
    dist.all_gather_object(gathered, {k: v["backend"] for k, v in after.items()})
    result["decisions"] = {"per_rank": gathered, "agree": all(g == gathered[0] for g in gathered),
                           "changed_by_sync": sum(before.get(k, {}).get("backend") != v["backend"] for k, v in after.items()),
                           "keys": after}

    eager = interleaved(clock, {"native": timed(model), "diffsynth_auto": timed(model)}, args.rounds, switch)
    result["eager_forward_ms"] = max_over_ranks(eager)

    # Wan's self-attention alone, Ulysses all-to-alls included (q, k, v: this rank's sequence shard)
    heads, dim = cfg["num_attention_heads"], cfg["attention_head_dim"]
    g = torch.Generator(device="cpu").manual_seed(2 + rank)
    q, k, v = (torch.randn(1, tokens // world, heads, dim, generator=g).to(device, next(model.parameters()).dtype)
               for _ in range(3))
    config = model._parallel_config

    def attention(backend):
        name = AttentionBackendName(backend)
        return lambda: dispatch_attention_fn(q, k, v, backend=name, parallel_config=config)
    attention("diffsynth_auto")()
    result["eager_attention_ms"] = max_over_ranks(
        interleaved(clock, {"native": attention("native"), "diffsynth_auto": attention("diffsynth_auto")}, args.rounds))
    local = torch.randn(1, tokens, heads // world, dim, generator=g).to(device, q.dtype)  # a rank's Ulysses problem
    result["local_problem"] = da.explain(local, local, local, *("b s n d",) * 4).as_dict()
    del local

    if not args.no_compile:
        try:
            compiled = torch.compile(model)

            def cforward(backend):
                return forward(backend, compiled)
            t0 = time.perf_counter()
            for b in ("native", "diffsynth_auto"):
                cforward(b)()
                cforward(b)()
            result["compile_s"] = round(time.perf_counter() - t0, 2)
            result["compiled_forward_ms"] = max_over_ranks(
                interleaved(clock, {"native": timed(compiled), "diffsynth_auto": timed(compiled)}, args.rounds, switch))
        except Exception as exc:  # recorded; the eager results stand
            result["compiled_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:500]
    for name in ("eager_forward_ms", "eager_attention_ms", "compiled_forward_ms"):
        if name in result:
            r = result[name]
            result[name.replace("_ms", "_speedup")] = round(r["native"] / r["diffsynth_auto"], 4)
    result["target"] = {"speedup": 1.15, "met": bool(result["decisions"]["agree"]) and
                        result.get("eager_attention_speedup", 0) >= 1.15}
    return result


def write_md(result: dict, path: Path) -> None:
    env, m = result["environment"], result["model"]
    lines = [f"# diffusers Wan, Ulysses {m['ulysses_degree']}: diffsynth_auto vs native",
             "", f"{env['device']} x{env['world_size']}, torch {env['torch']}, diffusers {env['diffusers']}, "
             f"kernel packages {env.get('packages')}; "
             f"{m.get('num_layers')} blocks, {m['tokens']} tokens, {m['num_attention_heads']} heads of "
             f"{m['attention_head_dim']} ({m['num_attention_heads'] // m['ulysses_degree']} per rank)", "",
             "| measurement | native ms | diffsynth_auto ms | speed-up |", "|---|---|---|---|"]
    for name in ("eager_attention", "eager_forward", "compiled_forward"):
        if f"{name}_ms" in result:
            r = result[f"{name}_ms"]
            lines.append(f"| {name.replace('_', ' ')} | {r['native']} | {r['diffsynth_auto']} | "
                         f"{result[f'{name}_speedup']}x |")
    if "compiled_error" in result:
        lines.append(f"\ncompiled: failed ({result['compiled_error']})")
    d = result["decisions"]
    lines += ["", f"Decisions agree across ranks: **{d['agree']}** (changed by sync_decisions: {d['changed_by_sync']}); "
              "per rank: " + "; ".join(", ".join(sorted(set(r.values()))) for r in d["per_rank"]),
              f"Output difference vs native: max abs {result['output_difference']['max_abs']:.3g}, relative L1 "
              f"{result['output_difference']['relative_l1']:.3g}",
              f"Target (attention >= 1.15x with identical decisions): **{'met' if result['target']['met'] else 'missed'}**"]
    path.write_text("\n".join(lines) + "\n")


def late_kernel_paths() -> None:
    """diffusers first, then the kernel packages (``DA_LATE_PATH``, as in bench_e2e.py): on the GPU
    machine flash-attn-4's bare ``flash_attn`` namespace would make diffusers import FlashAttention-2."""
    import diffusers  # noqa: F401

    for extra in filter(None, os.environ.get("DA_LATE_PATH", "").split(":")):
        if extra not in sys.path:
            sys.path.append(extra)


def main(argv=None) -> int:
    args = parse(argv)
    late_kernel_paths()
    import torch.distributed as dist

    result = run(args)
    if dist.get_rank() == 0:
        from harness.bench import save_result

        stem = save_result(result, args.out, args.tag, f"-wan-cp-{result['environment']['world_size']}gpu", write_md)
        print(Path(f"{stem}.md").read_text())
    dist.barrier()
    dist.destroy_process_group()
    # Skip the interpreter's teardown: gloo with diffusers' functional collectives sometimes
    # aborts in a C++ destructor at exit (SIGABRT) on a loaded machine, after the work is done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
