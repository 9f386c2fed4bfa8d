#!/usr/bin/env python3
"""Issue 29, item 3: host cost per call of FlashAttention-3 and -4, through the package's own
function against the thin kernel call (backends/thin.py), and PyTorch SDPA's own cost.

On a small problem (default 1x16x2x64 bf16, ``b s n d``; the kernel takes a few us), each
variant makes ``--calls`` un-synchronised calls per block, ``torch.cuda.synchronize()`` only
before and after a block; blocks are interleaved (A B C D, D C B A, ...) for ``--rounds``
rounds. Per variant it reports, in us per call (median over the rounds, and the minimum):

- *issue*: the time to issue the block's calls (the host cost: the launch queue never fills);
- *wall*: the same block up to the final synchronize (the larger of host and device time).

Variants: ``package`` (the package's ``flash_attn_func``), ``thin`` (the thin call),
``adapter`` (the backend's ``forward_native``: thin path with its checks and fallback, what the
dispatcher's runner calls), ``dispatcher`` (``attention_forward`` under ``use_backend``, the
whole hit path), ``sdpa`` (``F.scaled_dot_product_attention`` on ``b n s d`` tensors). The target
is thin issue <= 1.5x SDPA's. The thin output is compared with the package's (``torch.equal``).

Usage: PYTHONPATH=$PWD python scripts/bench_thin_calls.py OUT.md [--calls 200] [--rounds 30]
       [--shape 1,16,2,64] [--shape 2,1024,24,128]
Writes OUT.md (a table naming the device) and OUT.json next to it.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NAMES = ("flash_attention_3", "flash_attention_4")
TARGET = 1.5


def _block(fn, calls: int, sync) -> tuple:
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    sync()
    t2 = time.perf_counter()
    return (t1 - t0) / calls * 1e6, (t2 - t0) / calls * 1e6


def time_variants(fns: dict, calls: int, rounds: int, sync, warmup: int = 50) -> dict:
    """{name: {"issue": [us per round], "wall": [...]}} over interleaved rounds (A B C, C B A, ...);
    ``sync()`` synchronises the device."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync()
    out = {name: {"issue": [], "wall": []} for name in fns}
    names = list(fns)
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(rounds):
            for name in (names if r % 2 == 0 else names[::-1]):
                issue, wall = _block(fns[name], calls, sync)
                out[name]["issue"].append(issue)
                out[name]["wall"].append(wall)
    finally:
        if enabled:
            gc.enable()
    return out


def stats(values: list) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)} if values else {}


def measure(name: str, shape: tuple, calls: int, rounds: int, torch, da, device: str = "cuda", warmup: int = 50) -> dict:
    from harness.bench import REGISTRY

    backend = REGISTRY[name]
    row = {"backend": name, "shape": list(shape)}
    why = backend.unavailable_reason()
    if why:
        return dict(row, skipped=f"unavailable: {why}")
    row["version"] = backend.version()
    row["thin_reason"] = getattr(backend, "thin_reason", "no thin path in this version of the adapter")
    b, s, n, d = shape
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(b, s, n, d, device=device, dtype=torch.bfloat16, generator=g) for _ in range(3))
    qb, kb, vb = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    F = torch.nn.functional
    pat = ("b s n d",) * 4
    thin_fn = getattr(backend, "_thin", None)
    fns = {"package": lambda: backend._func(q, k, v, softmax_scale=None, causal=False)}
    if thin_fn is not None:
        fns["thin"] = lambda: thin_fn(q, k, v, None, False, None)
    fns["adapter"] = lambda: backend.forward_native(q, k, v, None, False, None)
    fns["dispatcher"] = lambda: da.attention_forward(q, k, v, *pat)
    fns["sdpa"] = lambda: F.scaled_dot_product_attention(qb, kb, vb)
    with torch.no_grad(), da.use_backend(name):
        try:
            want = backend._func(q, k, v, softmax_scale=None, causal=False)
            want = want[0] if isinstance(want, tuple) else want
            if thin_fn is not None:
                outs = [thin_fn(q, k, v, None, False, None) for _ in range(3)]  # FA4: the first call records
                row["thin_served"] = outs[-1] is not None
                row["bit_equal"] = all(o is not None and torch.equal(o, want) for o in outs)
                if name == "flash_attention_4":
                    row["fa4_signature_reasons"] = [str(x) for x in getattr(thin_fn, "reasons", {}).values()]
            row["adapter_equal"] = bool(torch.equal(backend.forward_native(q, k, v, None, False, None), want))
            sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
            times = time_variants(fns, calls, rounds, sync, warmup)
        except Exception as exc:  # report it: the lead runs this once
            return dict(row, skipped=f"failed: {type(exc).__name__}: {exc}")
    row["us"] = {name_: {kind: stats(vals) for kind, vals in t.items()} for name_, t in times.items()}
    sdpa = row["us"]["sdpa"]["issue"]["median"]
    for variant in fns:
        row.setdefault("ratio_issue_to_sdpa", {})[variant] = row["us"][variant]["issue"]["median"] / sdpa
    if "thin" in fns:
        row["target_met"] = row["ratio_issue_to_sdpa"]["thin"] <= TARGET
    return row


def write_md(result: dict, path: Path) -> None:
    env = result["environment"]
    lines = [f"# Thin kernel calls: host cost per call on {env['device']}", "",
             f"torch {env['torch']}, CUDA {env['cuda']}, {env['date']}; {result['calls']} un-synchronised calls per "
             f"block, {result['rounds']} interleaved rounds; us per call, median (min) over rounds. *issue*: time to "
             f"issue the calls (host cost); *wall*: to the synchronize after them. Target: thin issue <= "
             f"{TARGET:g}x SDPA's.", "",
             "| backend | version | shape (b s n d) | variant | issue us | wall us | issue / SDPA | bit-equal | met |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        shape = "x".join(map(str, row["shape"]))
        if "skipped" in row:
            lines.append(f"| {row['backend']} | {row.get('version', '-')} | {shape} | skipped: {row['skipped']} "
                         "||||||")
            continue
        for variant, t in row["us"].items():
            ratio = row["ratio_issue_to_sdpa"][variant]
            equal = {"thin": row.get("bit_equal"), "adapter": row.get("adapter_equal")}.get(variant)
            met = "" if variant != "thin" else ("yes" if row.get("target_met") else "no")
            lines.append(f"| {row['backend']} | {row['version']} | {shape} | {variant} | "
                         f"{t['issue']['median']:.1f} ({t['issue']['min']:.1f}) | "
                         f"{t['wall']['median']:.1f} ({t['wall']['min']:.1f}) | {ratio:.2f} | "
                         f"{'' if equal is None else ('yes' if equal else 'NO')} | {met} |")
        if row.get("thin_reason"):
            lines.append(f"| {row['backend']} | | {shape} | thin path off: {row['thin_reason']} ||||||")
        if row.get("fa4_signature_reasons"):
            lines.append(f"| {row['backend']} | | {shape} | signatures left to the package: "
                         f"{'; '.join(row['fa4_signature_reasons'])} ||||||")
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="the markdown file to write (the JSON goes next to it)")
    parser.add_argument("--calls", type=int, default=200, help="un-synchronised calls per block (default 200)")
    parser.add_argument("--rounds", type=int, default=30, help="interleaved rounds (default 30)")
    parser.add_argument("--shape", action="append", help="b,s,n,d (repeatable; default 1,16,2,64)")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT))
    import diffsynth_attention as da
    from harness.bench import environment

    shapes = [tuple(int(x) for x in s.split(",")) for s in (args.shape or ["1,16,2,64"])]
    env = environment("cuda")
    env["device"] = torch.cuda.get_device_name()
    env.setdefault("cuda", torch.version.cuda)
    env.setdefault("torch", torch.__version__)
    env.setdefault("date", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    result = {"environment": env, "calls": args.calls, "rounds": args.rounds,
              "rows": [measure(name, shape, args.calls, args.rounds, torch, da) for shape in shapes for name in NAMES]}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_md(result, out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
