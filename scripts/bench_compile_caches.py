#!/usr/bin/env python3
"""Compiled graphs that carry their decision (issue 30): the compile caches key on it.

Two measurements, each in fresh processes that share one inductor cache folder and one decision
cache folder (both new, under ``--work``), inductor's caches on (the default):

1. **The item-1 sequence.** diffusers Wan (``--blocks`` blocks, ``--tokens`` tokens) compiled the
   default way under ``DIFFSYNTH_ATTENTION_IMPLEMENTATION=A``; the variable switched to ``B``;
   ``torch.compiler.reset()``; compiled again. For each compile: the attention kernels the graph
   runs (``torch.profiler``, device kernels on CUDA, operators on a CPU), what ``explain`` says,
   and the caches' counters. Passes when the recompiled graph runs B's kernel, not A's.
2. **Cross-process compile time.** The decisions tuned once by an eager forward (a process of its
   own), then the same model compiled in a first fresh process (caches cold) and in a second one
   (caches warm), both against those decisions: the first call's time in each (compilation
   included), the FX/AOT cache hits of the second, and the ratio second/first (target <= 0.5).

On a CPU, inductor's attention pattern rewrites torch_math's matmuls into the flash kernel, so
the item-1 check needs two fused kernels (the GPU default: torch_efficient, then torch_flash).

Writes ``<device>-<date>-compile-caches[-TAG].{json,md}`` under ``--out``. GPU (see
../shared/gpu/README.md for the machine's paths)::

    PYTHONPATH=/tmp/diff-site:$PWD python3 scripts/bench_compile_caches.py --out $OUT

CPU smoke test: ``python scripts/bench_compile_caches.py --small --out /tmp/cc``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--tokens", type=int, default=None, help="Wan tokens (default 1560; --small: 64)")
    p.add_argument("--blocks", type=int, default=None, help="Wan blocks (default 4; --small: 1)")
    p.add_argument("--first", default=None, help="backend A of the item-1 sequence (default torch_efficient on CUDA, "
                                                 "torch_math on a CPU)")
    p.add_argument("--second", default="torch_flash", help="backend B of the item-1 sequence")
    p.add_argument("--small", action="store_true", help="a tiny Wan (CPU smoke test)")
    p.add_argument("--only", choices=("sequence", "cross"), default=None,
                   help="one of the two measurements (a device call is limited to 10 minutes)")
    p.add_argument("--work", default=None, help="folder for the caches (default: a new temporary one)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--tag", default="")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one measurement in this process
    return p.parse_args(argv)


def build_wan(small: bool, tokens: int, blocks: int, device, dtype):
    import torch
    from diffusers import WanTransformer3DModel

    if small:
        cfg = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4,
                   text_dim=64, freq_dim=32, ffn_dim=128, num_layers=blocks, cross_attn_norm=True, eps=1e-6)
        text_len = 16
    else:  # Wan2.1 T2V 1.3B geometry
        cfg = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                   text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=blocks, cross_attn_norm=True, eps=1e-6)
        text_len = 512
    if tokens % 1560 == 0 and not small:
        frames, h, w = tokens // 1560, 60, 104
    else:
        a = int(tokens ** 0.5)
        while tokens % a:
            a -= 1
        frames, h, w = 1, 2 * a, 2 * (tokens // a)
    torch.manual_seed(0)
    with torch.device(device):
        model = WanTransformer3DModel(**cfg).to(dtype=dtype).eval()
    x = torch.randn(1, cfg["in_channels"], frames, h, w, device=device, dtype=dtype)
    t = torch.tensor([500], device=device)
    text = torch.randn(1, text_len, cfg["text_dim"], device=device, dtype=dtype)
    return model, dict(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)


def attention_kernels(prof, device) -> list:
    names = set()
    for e in prof.key_averages():
        name = e.key
        low = name.lower()
        if any(w in low for w in ("flash", "fmha", "efficient_attention", "attention", "sdpa", "cudnn", "bmm")):
            if device.type == "cuda" and getattr(e, "device_type", None) is not None and "cuda" not in str(e.device_type).lower():
                if not name.startswith("aten::"):
                    continue
            names.add(name)
    return sorted(names)


def child(args) -> dict:
    """One fresh process: compile Wan (default torch.compile), first call timed, kernels profiled."""
    import torch
    from torch._dynamo.utils import counters

    import diffsynth_attention as da

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, kwargs = build_wan(args.small, args.tokens, args.blocks, device, dtype)
    handle = da.patch_sdpa()
    out = {}
    if args.child == "warm":  # the decisions, tuned eagerly, before either compiling process
        with torch.no_grad():
            model(**kwargs)
        handle.undo()
        return {"tunings": da.stats()["tunings"]}
    try:
        steps = [("cross", None)] if args.child == "cross" else [("first", args.first), ("second", args.second)]
        for name, backend in steps:
            if backend is not None:
                os.environ["DIFFSYNTH_ATTENTION_IMPLEMENTATION"] = backend
            torch.compiler.reset()
            counters.clear()
            fn = torch.compile(model)
            with torch.no_grad():
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn(**kwargs)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                first_s = time.perf_counter() - t0
                with torch.profiler.profile() as prof:
                    fn(**kwargs)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
            out[name] = {"implementation": backend, "first_call_s": first_s, "kernels": attention_kernels(prof, device),
                         "current_implementation": da.current_implementation(),
                         "aot_cache_hit": counters["aot_autograd"]["autograd_cache_hit"],
                         "aot_cache_miss": counters["aot_autograd"]["autograd_cache_miss"],
                         "fx_cache_hit": counters["inductor"]["fxgraph_cache_hit"],
                         "fx_cache_miss": counters["inductor"]["fxgraph_cache_miss"],
                         "tunings": da.stats()["tunings"]}
    finally:
        handle.undo()
    return out


def run_child(args, kind: str, env: dict) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--device", args.device, "--tokens", str(args.tokens),
           "--blocks", str(args.blocks), "--first", args.first, "--second", args.second] + (["--small"] if args.small else [])
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"{kind} child failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def markdown(result: dict) -> str:
    seq, cross = result["sequence"], result["cross_process"]
    lines = [f"# Compiled graphs carry their decision ({result['device']})", "",
             f"Wan {result['blocks']} blocks, {result['tokens']} tokens, default torch.compile, inductor caches on.", ""]
    if seq is not None:
        lines += ["## The item-1 sequence", "", "| compile | variable | attention kernels | AOT hit | FX hit |",
                  "|---|---|---|---|---|"]
        for name in ("first", "second"):
            s = seq[name]
            lines.append(f"| {name} | {s['implementation']} | {', '.join(s['kernels'])} | {s['aot_cache_hit']} | "
                         f"{s['fx_cache_hit']} |")
        lines += ["", f"Recompile runs the new decision: **{result['sequence_pass']}**", ""]
    if cross is not None:
        lines += ["## Cross-process compile time", "", "| process | first call (s) | AOT hit/miss | FX hit/miss | tunings |",
                  "|---|---|---|---|---|"]
        for i, c in enumerate(cross, 1):
            lines.append(f"| {i} | {c['first_call_s']:.2f} | {c['aot_cache_hit']}/{c['aot_cache_miss']} | "
                         f"{c['fx_cache_hit']}/{c['fx_cache_miss']} | {c['tunings']} |")
        lines += ["", f"Second / first: **{result['cross_ratio']:.3f}** (target <= 0.5)", ""]
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.tokens = args.tokens or (64 if args.small else 1560)
    args.blocks = args.blocks or (1 if args.small else 4)
    args.first = args.first or ("torch_efficient" if args.device.startswith("cuda") else "torch_math")
    if args.child:
        print(json.dumps(child(args)))
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="compile-caches-"))
    base = {k: v for k, v in os.environ.items() if not k.startswith("DIFFSYNTH_ATTENTION_")}
    base["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

    def env(name):
        return {**base, "TORCHINDUCTOR_CACHE_DIR": str(work / name / "inductor"),
                "DIFFSYNTH_ATTENTION_CACHE_DIR": str(work / name / "decisions")}

    sequence = run_child(args, "sequence", env("sequence")) if args.only != "cross" else None
    warm = run_child(args, "warm", env("cross")) if args.only != "sequence" else {"tunings": None}
    cross = [run_child(args, "cross", env("cross"))["cross"] for _ in range(2)] if args.only != "sequence" else None
    second_kernels = set(sequence["second"]["kernels"]) if sequence else set()
    from harness.bench import environment, save_result

    result = {"environment": environment(torch.device(args.device)),
              "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU", "tokens": args.tokens, "blocks": args.blocks, "sequence": sequence, "cross_process": cross, "warm_tunings": warm["tunings"],
              "sequence_pass": None if sequence is None else bool(second_kernels) and second_kernels != set(
                  sequence["first"]["kernels"]),
              "cross_ratio": None if cross is None else cross[1]["first_call_s"] / cross[0]["first_call_s"]}
    suffix = ("-compile-caches" + (f"-{args.only}" if args.only else "") + (f"-{args.tag}" if args.tag else "")
              + ("-smoke" if args.small else ""))
    stem = save_result(result, Path(args.out), "", suffix, lambda r, path: path.write_text(markdown(r)))
    print(markdown(result))
    print(stem)


if __name__ == "__main__":
    main()
