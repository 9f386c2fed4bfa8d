#!/usr/bin/env python3
"""Issue 31, item 5: the wall time of ``warm --preset all`` projected for 1-8 GPUs from a measured
one-GPU run's per-problem costs.

Input: a ``scripts/parallel_warm.py`` log (``benchmarks/results/*-parallel-warm.log``). Its one-GPU
section gives the run's wall time and, per problem in warm's order, the seconds each tuning took
(the ``tuned ... (X s)`` lines, FlashAttention-4 compilations included where that problem paid
them). ``start-up`` is the rest of the wall: the process start, imports, CUDA, the final write.

For N ranks, problems go to ranks as ``warm`` under torchrun assigns them (the library's own split,
``diffsynth_attention.tools.torchrun.split``), and each rank's load is the sum of its problems'
measured seconds. Projected wall = start-up + the largest rank load. The projection is optimistic:
it leaves out a compilation a rank pays again where the one-GPU run had paid it on another
problem of the same specialisation, the decision exchange, and start-up contention between ranks;
the log's measured multi-GPU wall is printed beside it.

Usage: python scripts/warm_projection.py LOG --out benchmarks/results [--tag STEM]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

_SECTION = re.compile(r"^== (\d+) GPUs?: ([\d.]+) s, rc (\d+)$", re.M)
_TUNED = re.compile(r"INFO diffsynth_attention: tuned (.+) \(([\d.]+)s\)$", re.M)


def parse(text: str) -> dict:
    """{gpus: {"wall_s", "tuned": [(description, seconds), ...]}} of each section of the log."""
    marks = list(_SECTION.finditer(text))
    runs = {}
    for i, m in enumerate(marks):
        body = text[m.end(): marks[i + 1].start() if i + 1 < len(marks) else len(text)]
        runs[int(m.group(1))] = {"wall_s": float(m.group(2)), "rc": int(m.group(3)),
                                 "tuned": [(t.group(1), float(t.group(2))) for t in _TUNED.finditer(body)]}
    return runs


def project(problems: list, seconds: list, startup_s: float, split, worlds=(1, 2, 4, 8)) -> list:
    """One row per world size: the split's rank loads (measured seconds) and the projected wall."""
    cost = {p["name"]: s for p, s in zip(problems, seconds)}
    single = startup_s + sum(seconds)
    rows = []
    for world in worlds:
        ranks = split(problems, world)
        loads = [sum(cost[p["name"]] for p in rank) for rank in ranks]
        wall = startup_s + max(loads)
        rows.append({"gpus": world, "rank_problems": [[p["name"] for p in rank] for rank in ranks],
                     "rank_loads_s": loads, "projected_wall_s": wall, "projected_speedup": single / wall})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("log", help="a scripts/parallel_warm.py log")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--tag", default=None, help="file name stem (default: the log's, -parallel-warm -> -warm-projection)")
    args = ap.parse_args(argv)
    from harness.bench import shapes, warm_split

    log = Path(args.log)
    runs = parse(log.read_text())
    one = runs.get(1)
    problems = shapes(["all"])
    if one is None or len(one["tuned"]) != len(problems):
        ap.error(f"{log}: no one-GPU section with one 'tuned' line per problem of --preset all ({len(problems)})")
    seconds = [s for _, s in one["tuned"]]
    startup = one["wall_s"] - sum(seconds)
    rows = project(problems, seconds, startup, warm_split)
    result = {"source": str(log), "problems": [p["name"] for p in problems], "tuning_s": seconds,
              "one_gpu_wall_s": one["wall_s"], "startup_s": startup, "rows": rows,
              "measured": {str(n): r["wall_s"] for n, r in runs.items()}}
    stem = args.tag or log.name.replace("-parallel-warm.log", "-warm-projection")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    lines = [f"# `warm --preset all` projected over GPUs, from `{log.name}`", "",
             f"One GPU measured: {one['wall_s']:.1f} s = {startup:.1f} s start-up (process, imports, CUDA, write) + "
             f"{sum(seconds):.1f} s of tuning over {len(problems)} problems (largest {max(seconds):.2f} s). "
             "Projected wall for N GPUs = start-up + the largest rank's measured tuning seconds, ranks assigned by "
             "the library's own split; optimistic (no repeated compilation, exchange or start-up contention).", "",
             "| GPUs | projected wall s | projected speed-up | measured wall s | rank loads s |", "|---|---|---|---|---|"]
    for r in rows:
        measured = runs.get(r["gpus"], {}).get("wall_s")
        lines.append(f"| {r['gpus']} | {r['projected_wall_s']:.1f} | {r['projected_speedup']:.2f}x | "
                     f"{'-' if measured is None else f'{measured:.1f}'} | {', '.join(f'{x:.1f}' for x in r['rank_loads_s'])} |")
    bound = one["wall_s"] / (startup + max(seconds))
    lines += ["", f"With unlimited GPUs the wall cannot fall below start-up + the largest problem, "
                  f"{startup + max(seconds):.1f} s: at most {bound:.2f}x for this problem list."]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
