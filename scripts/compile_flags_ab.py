#!/usr/bin/env python3
"""What ``fullgraph=True`` costs a compiled call, apart from the graph: an interleaved A/B.

Three one-call modules (``attention_forward``, the decided backend called directly, plain SDPA),
each compiled twice with ``dynamic=False``, once with ``fullgraph=True`` and once without, every
one a class of its own (its own code object, so no compiled module checks another's guards). Host
microseconds per call on a small problem, in rounds of blocks whose order is shuffled each round;
median and minimum over the rounds. The compiled graph is the same with and without the flag.

Usage: python scripts/compile_flags_ab.py [--device cpu] [--rounds 31] [--out DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness import bench  # noqa: E402

BODIES = {
    "auto": "import diffsynth_attention as da\n        return da.attention_forward(q, k, v)",
    "best": "return REGISTRY[BEST].forward(q, k, v, None, None, False, None, False)",
    "sdpa": "return torch.nn.functional.scaled_dot_product_attention(q, k, v)",
}


def module(kind: str, best: str) -> torch.nn.Module:
    """A module class of its own (a fresh code object) whose forward is one attention call."""
    namespace = {"torch": torch, "REGISTRY": bench.REGISTRY, "BEST": best}
    exec(f"class M(torch.nn.Module):\n    def forward(self, q, k, v):\n        {BODIES[kind]}\n", namespace)
    return namespace["M"]()


def run(device, rounds: int, calls: int) -> dict:
    import diffsynth_attention as da

    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    q = torch.randn(1, 2, 16, 64, device=device, dtype=dt)
    k, v = torch.randn_like(q), torch.randn_like(q)
    fns = {}
    with torch.no_grad():
        best = da.explain(q, k, v).backend
        for kind in BODIES:
            for full in (True, False):
                fn = torch.compile(module(kind, best), fullgraph=full, dynamic=False)
                for _ in range(5):
                    fn(q, k, v)
                fns[f"{kind} fullgraph={full}"] = fn
        us: dict = {name: [] for name in fns}
        for r in range(rounds):
            for name in bench.round_order(list(fns), r):
                fn = fns[name]
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn(q, k, v)
                us[name].append((time.perf_counter() - t0) / calls * 1e6)
                bench.sync(device)
    return {"environment": bench.environment(device), "decision": best, "rounds": rounds, "calls_per_block": calls,
            "problem": f"1x2 s=16 d=64 {str(dt).replace('torch.', '')}",
            "host_us": {n: {"median": statistics.median(v), "min": min(v)} for n, v in us.items()}}


def write_md(result: dict, path: Path) -> None:
    env = result["environment"]
    lines = [f"# fullgraph=True against torch.compile's default, per call: {env['device']}", "",
             f"{env['date']}; torch {env['torch']}; problem {result['problem']}, decision {result['decision']}; "
             f"{result['rounds']} rounds of {result['calls_per_block']} calls per block, blocks shuffled each round; "
             "host microseconds per call.", "",
             "| module | fullgraph=True median (min) | default median (min) | difference of medians (of mins) |", "|---|---|---|---|"]
    h = result["host_us"]
    for kind in BODIES:
        a, b = h[f"{kind} fullgraph=True"], h[f"{kind} fullgraph=False"]
        lines.append(f"| {kind} | {a['median']:.1f} ({a['min']:.1f}) | {b['median']:.1f} ({b['min']:.1f}) | "
                     f"{a['median'] - b['median']:+.1f} ({a['min'] - b['min']:+.1f}) |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rounds", type=int, default=31)
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--tag", default=None)
    args = p.parse_args()
    result = run(torch.device(args.device), args.rounds, args.calls)
    stem = bench.save_result(result, args.out, args.tag, "-fullgraph-ab", write_md)
    print(Path(f"{stem}.md").read_text())


if __name__ == "__main__":
    main()
