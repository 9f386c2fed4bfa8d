#!/usr/bin/env python3
"""What Dynamo's guards on a compiled ``attention_forward`` cost, against compiled plain SDPA.

Two one-call modules, ``da.attention_forward(q, k, v)`` (as a user writes it, the decision a cache
hit) and ``F.scaled_dot_product_attention(q, k, v)``, compiled with ``torch.compile``'s defaults and
``dynamic=False`` on a small CPU problem. For each: the guard tree's nodes and leaf checks, and the
time one check of the whole tree takes (the cache entry's guard manager called directly; what every
call of the compiled code pays before its graph runs), in rounds that alternate the two modules;
the median and the minimum over the rounds.

Each run appends one record, labelled, to ``--out`` (JSON lines), and ``--report`` writes a markdown
table of every record in that file. Comparing two versions of the library: run each version in
turn, several times (``PYTHONPATH=<its tree>``), interleaved, with its own label.

Usage: python scripts/guard_cost.py --label NAME --out FILE.jsonl [--rounds 15] [--report FILE.md]
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness.guards import guard_sources, guard_us, leaf_count  # noqa: E402


class Auto(torch.nn.Module):
    def forward(self, q, k, v):
        import diffsynth_attention as da

        return da.attention_forward(q, k, v)


class SDPA(torch.nn.Module):
    def forward(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def measure(rounds: int, calls: int) -> dict:
    import diffsynth_attention as da

    q, k, v = (torch.randn(2, 4, 64, 32) for _ in range(3))
    mods = {"auto": Auto(), "sdpa": SDPA()}
    torch._dynamo.reset()  # one compiled entry each, this run's
    with torch.no_grad():
        da.attention_forward(q, k, v)  # the decision first: the trace bakes a cache hit
        for m in mods.values():
            compiled = torch.compile(m, dynamic=False)
            compiled(q, k, v)
            compiled(q, k, v)
        times = {n: [] for n in mods}  # checked under no_grad, as compiled (the grad mode is guarded)
        for r in range(rounds):
            for n in (list(mods) if r % 2 == 0 else list(mods)[::-1]):
                us = guard_us(mods[n], (q, k, v), calls=calls, repeats=1)[0]
                if us is None:
                    raise RuntimeError(f"the {n} module's guards did not accept its own call")
                times[n].append(us)
    out = {"library": str(Path(da.__file__).resolve().parent), "torch": torch.__version__, "rounds": rounds,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    for n, m in mods.items():
        out[n] = {"nodes": len(guard_sources(m)), "leaves": leaf_count(m), "median_us": statistics.median(times[n]),
                  "min_us": min(times[n])}
    out["extra_median_us"] = out["auto"]["median_us"] - out["sdpa"]["median_us"]
    out["extra_min_us"] = out["auto"]["min_us"] - out["sdpa"]["min_us"]
    return out


def report(records: list, path: Path) -> None:
    lines = ["# Dynamo's guard check on a compiled attention_forward, against compiled SDPA", "",
             "`scripts/guard_cost.py`: one record per process, in the order run; torch.compile's defaults, "
             "`dynamic=False`, a 2x4x64x32 float32 CPU problem; microseconds per check of the whole guard tree "
             "(median and minimum over the rounds, the two modules alternating).", "",
             "| label | date | torch | auto nodes / leaves | SDPA nodes / leaves | auto us (median, min) | SDPA us (median, min) "
             "| auto - SDPA us (median, min) |", "|---|---|---|---|---|---|---|---|"]
    for r in records:
        a, s = r["auto"], r["sdpa"]
        lines.append(f"| {r['label']} | {r['date']} | {r['torch']} | {a['nodes']} / {a['leaves']} | {s['nodes']} / {s['leaves']} "
                     f"| {a['median_us']:.2f}, {a['min_us']:.2f} | {s['median_us']:.2f}, {s['min_us']:.2f} "
                     f"| {r['extra_median_us']:.2f}, {r['extra_min_us']:.2f} |")
    by = {}
    for r in records:
        by.setdefault(r["label"], []).append(r["extra_min_us"])
    lines += ["", "Per label, auto - SDPA by the minima, over its processes: "
              + "; ".join(f"{k} {min(v):.2f}-{max(v):.2f} us ({len(v)} processes)" for k, v in by.items()) + "."]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--label", required=True)
    p.add_argument("--out", required=True, help="a JSON-lines file: this run's record is appended")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--calls", type=int, default=20000, help="guard checks timed per round and module")
    p.add_argument("--report", help="write a markdown table of every record in --out here")
    args = p.parse_args(argv)
    record = {"label": args.label, **measure(args.rounds, args.calls)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record))
    if args.report:
        report([json.loads(line) for line in out.read_text().splitlines() if line.strip()], Path(args.report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
