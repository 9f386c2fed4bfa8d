#!/usr/bin/env python3
"""Benchmark the tuned dispatcher against every backend, SDPA's default and DiffSynth's fixed rule.

For each problem of the shape suite (or ``--shapes FILE``), on one device, in one run:

- tuning: the first ``attention_forward`` call in ``auto`` on a fresh cache; its wall time,
  the compile part (first calls) and the decision with every candidate's time and error;
- every usable backend called directly (layout conversions included), ``torch`` being SDPA's
  default; the fastest is the per-problem best;
- ``diffsynth_fixed``: DiffSynth-Studio's rule, the first *installed* of FlashAttention-4 > 3 >
  2 > SageAttention > xFormers > PyTorch (taken generously: the first that can serve the call),
  called as DiffSynth-Studio calls it (``harness.diffsynth_call``: einops rearranges and the
  package's public function, not this library's cheaper thin calls);
- ``auto``: ``attention_forward`` after warming, a cache hit, dispatcher overhead included.

All methods use the same inputs; repeats are interleaved (method A, B, C, A, B, C, ...) and
each sample is one untimed call then enough back-to-back calls to last ~2 ms, timed with
CUDA events (perf_counter on a CPU), the same ``diffsynth_attention.timing.Timer`` the tuner
uses; the reported time is the median sample. Then the dispatch overhead on
a cache hit: median host time per call of ``attention_forward`` minus the cheapest hand-written
call of the chosen kernel (``scripts/bench_compiled.py``'s ``hit_overhead``), on a small problem,
over at least 20,000 calls each.

Writes benchmarks/results/<device>-<date>.json, .md and .png.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
FIXED = "diffsynth_fixed"  # the timed method: DiffSynth-Studio's own call of its rule's backend
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


from harness.bench import environment, geomean, host_us, interleaved, save_result  # noqa: E402,F401
from harness.hygiene import Watch, summary_md  # noqa: E402


def select_shapes(args) -> list:
    """The problems of --shapes/--preset, narrowed by --only; a ValueError names what is unknown."""
    from harness import bench

    return bench.shapes(args.preset, args.shapes, args.only)


def run(args) -> dict:
    from diffsynth_attention import attention_forward, explain
    from harness.bench import Timer, backend_call, diffsynth_call, diffsynth_fixed, inputs

    device = torch.device(args.device)
    shapes = select_shapes(args)
    env = environment(device)
    rows = []
    g = torch.Generator(device=device).manual_seed(0)
    for shape in shapes:
        q, k, v, kw = inputs(shape, device, args.layout, g)
        with torch.no_grad():
            Timer(device).sync()
            t0 = time.perf_counter()
            info = explain(q, k, v, **kw)  # first call: tunes
            Timer(device).sync()
            first_call_s = time.perf_counter() - t0
            decision = info.decision
            usable = [n for n, c in info.candidates.items() if c["status"] in ("chosen", "accepted", "slower")]
            methods = {name: backend_call(name, q, k, v, **kw) for name in usable}
            fixed = diffsynth_fixed(q, k, v, **kw)
            # DiffSynth-Studio's own call of that kernel (its rearranges and the package's function)
            methods[FIXED] = diffsynth_call(fixed, q, k, v, **kw) or backend_call(fixed, q, k, v, **kw)
            methods["auto"] = lambda: attention_forward(q, k, v, **kw)
            watch = Watch()  # each sample after a bounded wait for background loads; what ran beside it
            times = interleaved(methods, device, args.samples, watch=watch)
        backend_times = {n: t for n, t in times.items() if n in usable}
        best_name = min(backend_times, key=backend_times.get)
        # auto against the backends within 1.5x of the best, interleaved alone: in the full round a
        # 5-9 ms kernel behind the 20-40 ms slow candidates ran 4-5% slower (H100, s10: auto, which
        # is FlashAttention-3's own runner, 1.048x FlashAttention-3 on wan13b_480p_self)
        near = {n: methods[n] for n, t in backend_times.items() if t <= 1.5 * backend_times[best_name]}
        with torch.no_grad():
            alone = interleaved({"auto": methods["auto"], **near}, device, args.samples)
        alone_best = min((n for n in alone if n != "auto"), key=alone.get)
        host = None
        if times["auto"] > 1.03 * backend_times[best_name] and times["auto"] < 1.0:  # short calls: is it host cost?
            with torch.no_grad():
                host = host_us({"auto": methods["auto"], best_name: methods[best_name]}, device, calls=4000, blocks=20, warmup=100)
        winner_ms = times[info.backend] if info.backend in times else times["auto"]
        row = {
            "name": shape["name"], "problem": info.problem, "decision": info.backend, "source": info.source,
            "times_ms": times, "best": best_name, "best_ms": backend_times[best_name],
            "sdpa_default_ms": times.get("torch"), "diffsynth_fixed": fixed, "diffsynth_fixed_ms": times.get(FIXED),
            "auto_ms": times["auto"],
            "hygiene": watch.summary(),  # the full round's samples: loads, threads, garbage collections beside them
            "host_us": host,  # host us per call of auto and of the best backend, where auto/best > 1.03 on a short call
            "auto_vs_best": times["auto"] / backend_times[best_name],
            "alone_ms": alone,  # auto and the backends within 1.5x of the best, re-timed without the slow ones
            "auto_vs_best_alone": alone["auto"] / alone[alone_best],
            "speedup_vs_sdpa": times["torch"] / times["auto"] if times.get("torch") else None,
            "speedup_vs_fixed": times[FIXED] / times["auto"] if times.get(FIXED) else None,
            "tuning": {
                "first_call_s": first_call_s,
                "tuning_seconds": decision.tuning_seconds if decision else None,
                "compile_seconds": decision.compile_seconds if decision else None,
                "excl_compile_s": (decision.tuning_seconds - decision.compile_seconds) if decision else None,
                "limit_s": max(1.5, 15 * winner_ms / 1e3),
            },
            "candidates": info.candidates,
        }
        rows.append(row)
        print(f"{shape['name']:22s} auto={row['auto_ms']:.4f}ms best={best_name}:{row['best_ms']:.4f} "
              f"sdpa={row['sdpa_default_ms']:.4f} fixed={fixed}:{row['diffsynth_fixed_ms']:.4f} -> {info.backend}", flush=True)
        del q, k, v
        if device.type == "cuda":
            torch.cuda.empty_cache()
    from harness.bench import hit_overhead  # against the cheapest hand-written call of the kernel

    overhead = [hit_overhead(torch.device("cpu"))]
    if device.type == "cuda":
        overhead.append(hit_overhead(device))
    return {"environment": env, "layout": args.layout, "samples": args.samples, "problems": rows,
            "dispatch_overhead": overhead, "summary": summarize(rows, overhead)}


def host_explanation(r) -> str | None:
    """Where auto is more than 3% behind the best backend on a short call: the host cost that
    explains it, or None. Explained when the call is host-bound (auto's host time per call is at
    least 70% of its time per call) and auto's extra host time covers at least half the gap."""
    h = r.get("host_us")
    if not h or r["auto_vs_best"] <= 1.03:
        return None
    gap_us = (r["auto_ms"] - r["best_ms"]) * 1e3
    extra_us = h["auto"] - h[r["best"]]
    if h["auto"] < 0.7 * r["auto_ms"] * 1e3 or extra_us < 0.5 * gap_us:
        return None
    return (f"{r['name']} {r['auto_vs_best']:.3f}x is host cost: a host-bound call ({h['auto']:.1f} us of host time a call "
            f"through attention_forward vs {h[r['best']]:.1f} us for {r['best']} called directly; {extra_us:.1f} us of the "
            f"{gap_us:.1f} us gap)")


def summarize(rows, overhead) -> dict:
    by = {r["name"]: r for r in rows}
    auto_vs_best = [r["auto_vs_best"] for r in rows]
    gm_best = geomean(auto_vs_best)
    alone = [r["auto_vs_best_alone"] for r in rows if r.get("auto_vs_best_alone")]
    gm_fixed = geomean([r["speedup_vs_fixed"] for r in rows])
    gm_sdpa = geomean([r["speedup_vs_sdpa"] for r in rows])
    wan = by.get("wan13b_480p_self")
    tuning_ok = [r["tuning"]["excl_compile_s"] is not None and r["tuning"]["excl_compile_s"] <= r["tuning"]["limit_s"] for r in rows]
    targets = {
        "auto within 3% of best on every problem": (max(auto_vs_best) <= 1.03, f"worst {max(auto_vs_best):.3f}x ({max(rows, key=lambda r: r['auto_vs_best'])['name']})"),
        "auto geomean <= 1.01x best": (gm_best <= 1.01, f"{gm_best:.4f}x"),
        "auto geomean <= 1.01x best, re-timed alone against the backends within 1.5x of the best": (
            bool(alone) and geomean(alone) <= 1.01, f"{geomean(alone):.4f}x, worst {max(alone):.3f}x" if alone else "not run"),
        "no problem over 1.03x best unless host cost explains it (issue 21)": (
            all(r["auto_vs_best"] <= 1.03 or host_explanation(r) for r in rows),
            "; ".join(host_explanation(r) or f"{r['name']} {r['auto_vs_best']:.3f}x: not explained by host cost"
                      for r in rows if r["auto_vs_best"] > 1.03) or "none over 1.03x"),
        ">= 1.15x faster than SDPA default on wan13b_480p_self": (bool(wan and wan["speedup_vs_sdpa"] >= 1.15), f"{wan['speedup_vs_sdpa']:.3f}x" if wan else "not run"),
        ">= 1.4x faster than DiffSynth fixed priority (geomean)": (bool(gm_fixed and gm_fixed >= 1.4), f"{gm_fixed:.3f}x" if gm_fixed else "n/a"),
        "dispatch overhead <= 2 us per call on a GPU's host, 2.5 us on a CPU (issue 29)": (
            all(o["overhead_us"] <= (2.0 if o["device"].startswith("cuda") else 2.5) for o in overhead),
            ", ".join(f"{o['device']} {o['overhead_us']:.2f} us" for o in overhead)),
        "do no harm: auto >= 0.97x SDPA default on every problem": (
            all(r["speedup_vs_sdpa"] >= 0.97 for r in rows if r["speedup_vs_sdpa"]),
            "worst " + ", ".join(f"{r['name']} {r['speedup_vs_sdpa']:.3f}x" for r in sorted(rows, key=lambda r: r["speedup_vs_sdpa"] or 9)[:2])
            + "".join(f"; {r['name']} ({r['sdpa_default_ms'] * 1e3:.0f} us a call) is host-bound in eager: the compiled path or CUDA graphs "
                      "remove the dispatcher's cost (see the -compiled results)" for r in rows if (r["speedup_vs_sdpa"] or 1) < 0.97)),
        "tuning cost <= max(1.5 s, 15x winner) excl. compile": (all(tuning_ok), f"{sum(tuning_ok)}/{len(rows)} within"),
    }
    return {"geomean_auto_vs_best": gm_best, "geomean_speedup_vs_sdpa": gm_sdpa, "geomean_speedup_vs_fixed": gm_fixed,
            "targets": {k: {"met": bool(v[0]), "value": v[1]} for k, v in targets.items()}}


def write_markdown(result: dict, path: Path) -> None:
    env = result["environment"]
    lines = [f"# Attention benchmark: {env['device']}", "",
             f"{env['date']}; torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}, Python {env['python']}, "
             f"diffsynth-attention {env['diffsynth_attention']}; packages: "
             + ", ".join(f"{k} {v or 'not installed'}" for k, v in env["packages"].items()), "",
             f"Layout `{result['layout']}`; median of {result['samples']} interleaved samples; times in ms. *auto/best alone*: "
             "auto re-timed against the backends within 1.5x of the best only (a kernel's time depends on what ran before it).", "",
             "| problem | auto (decision) | best backend | SDPA default | DiffSynth fixed | auto/best | auto/best alone | vs SDPA | vs fixed | tuning s (compile s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["problems"]:
        t = r["tuning"]
        lines.append(
            f"| {r['name']} | {r['auto_ms']:.4f} ({r['decision']}) | {r['best_ms']:.4f} ({r['best']}) | {r['sdpa_default_ms']:.4f} | "
            f"{r['diffsynth_fixed_ms']:.4f} ({r['diffsynth_fixed']}) | {r['auto_vs_best']:.3f} | "
            f"{r['auto_vs_best_alone']:.3f} | {r['speedup_vs_sdpa']:.2f}x | "
            f"{r['speedup_vs_fixed']:.2f}x | {t['tuning_seconds']:.2f} ({t['compile_seconds']:.2f}) |")
    s = result["summary"]
    lines += ["", f"Geometric means: auto/best {s['geomean_auto_vs_best']:.4f}, speedup vs SDPA default "
              f"{s['geomean_speedup_vs_sdpa']:.3f}x, vs DiffSynth fixed priority {s['geomean_speedup_vs_fixed']:.3f}x.", "",
              "Dispatch overhead on a cache hit (median host time per call):", ""]
    for o in result["dispatch_overhead"]:
        lines.append(f"- {o['device']}: attention_forward {o['dispatched_us']:.2f} us vs {o['backend']} directly {o['direct_us']:.2f} us: "
                     f"**{o['overhead_us']:.2f} us** over {o['calls_each']} calls each")
    lines += ["", "## Targets", "", "| target | met | value |", "|---|---|---|"]
    for name, t in s["targets"].items():
        lines.append(f"| {name} | {'yes' if t['met'] else '**no**'} | {t['value']} |")
    beside = [(r["name"], r.get("hygiene")) for r in result["problems"]]
    if any(h for _, h in beside):
        lines += ["", "## What ran beside the timed samples (the full round; each waited first, bounded, until no kernel "
                  "package loaded in the background)", ""] + summary_md(beside)
    lines += ["", "## Candidates per problem (time ms / rel-L1 error vs fp32 / status)", ""]
    for r in result["problems"]:
        parts = []
        for n, c in r["candidates"].items():
            if c["status"] == "unsupported":
                continue
            tm = "-" if c["time_ms"] is None else f"{c['time_ms']:.4f}"
            err = "-" if c["error"] is None else f"{c['error']:.2e}"
            parts.append(f"{n} {tm}/{err}/{c['status']}" + (f" ({c['reason']})" if c["reason"] and c["status"] == "rejected" else ""))
        lines.append(f"- {r['name']}: " + "; ".join(parts))
    path.write_text("\n".join(lines) + "\n")


def write_chart(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["problems"]
    names = [r["name"] for r in rows]
    methods = [("auto", lambda r: r["auto_ms"]), ("best backend", lambda r: r["best_ms"]),
               ("SDPA default", lambda r: r["sdpa_default_ms"]), ("DiffSynth fixed", lambda r: r["diffsynth_fixed_ms"])]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(12, 9))
    width = 0.2
    for i, (label, get) in enumerate(methods):
        ax1.bar([x + i * width for x in range(len(rows))], [get(r) for r in rows], width, label=label)
    ax1.set_yscale("log")
    ax1.set_ylabel("ms per call (log)")
    ax1.set_xticks([x + 1.5 * width for x in range(len(rows))], names, rotation=30, ha="right")
    ax1.legend()
    ax1.set_title(f"{result['environment']['device']}: time per problem")
    ax2.bar(range(len(rows)), [r["speedup_vs_sdpa"] for r in rows], color="tab:green")
    ax2.axhline(1.0, color="black", lw=0.8)
    ax2.set_ylabel("auto speedup over SDPA default")
    ax2.set_xticks(range(len(rows)), names, rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", help="a JSON file of problems (shape-suite format)")
    parser.add_argument("--preset", action="append", help="presets as in `diffsynth-attention warm` (default all)")
    parser.add_argument("--only", help="comma-separated problem names")
    parser.add_argument("--layout", default="b n s d")
    parser.add_argument("--samples", type=int, default=15)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--tag", default=None, help="file name stem (default <device>-<date>)")
    parser.add_argument("--keep-cache", action="store_true", help="use the user's cache instead of a fresh one")
    args = parser.parse_args(argv)
    try:  # a bad --shapes/--preset/--only is a usage error, before any work
        select_shapes(args)
    except ValueError as exc:
        parser.error(str(exc))
    if not args.keep_cache:
        os.environ["DIFFSYNTH_ATTENTION_CACHE_DIR"] = tempfile.mkdtemp(prefix="da-bench-")
    result = run(args)
    path = save_result(result, args.out, args.tag, "", write_markdown)
    write_chart(result, Path(f"{path}.png"))
    print(Path(f"{path}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
