#!/usr/bin/env python3
"""Issue 29's CPU target: decisions made on a loaded machine are confirmed or provisional.

``load``: N fresh processes (default 5) each warm the CPU suite (`diffsynth-attention warm --preset
cpu`) into a cache folder of their own while B CPU burners run (default 2: ``while True: pass``).
``check`` (run later, on a quiet machine): `diffsynth-attention cache verify --json` re-times every
stored decision of each folder against the default (``torch``) and the runner-up, interleaved;
the report lists, per folder, every decision with its provisional flag and its time over the
default's, and the target: no non-provisional decision slower than 1.10x the default.

    python scripts/cpu_trust_check.py load --root /tmp/trust
    python scripts/cpu_trust_check.py check --root /tmp/trust --out benchmarks/results --tag dev-cpu-2026-12-07-trust
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "diffsynth_attention"]


def _env(folder: Path) -> dict:
    return dict(os.environ, DIFFSYNTH_ATTENTION_CACHE_DIR=str(folder), PYTHONPATH=str(ROOT))


def load(root: Path, n: int, burners: int) -> None:
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(burners)]
    try:
        for i in range(n):
            folder = root / f"run{i}"
            r = subprocess.run(CLI + ["warm", "--preset", "cpu", "--no-progress"], env=_env(folder),
                               capture_output=True, text=True, timeout=1800)
            print(f"run{i}: rc {r.returncode}: {r.stdout.strip().splitlines()[-1:] if r.stdout else r.stderr[-300:]}",
                  flush=True)
            (root / f"run{i}.load.txt").write_text(f"{os.getloadavg()}\n{r.stdout}\n{r.stderr}")
    finally:
        for p in procs:
            p.kill()


def check(root: Path, out: Path, tag: str) -> int:
    rows, bad = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        r = subprocess.run(CLI + ["cache", "verify", "--json"], env=_env(folder), capture_output=True, text=True,
                           timeout=1800)
        if r.returncode != 0:
            raise SystemExit(f"{folder}: cache verify failed: {r.stderr[-500:]}")
        for row in json.loads(r.stdout):
            times = row.get("times") or {}
            ratio = times[row["backend"]] / times["torch"] if "torch" in times and row["backend"] in times else None
            row.update(folder=folder.name, over_default=ratio)
            rows.append(row)
            if not row["provisional"] and ratio is not None and ratio > 1.10:
                bad.append(row)
    doc = {"machine": f"{platform.processor() or platform.machine()} ({os.cpu_count()} threads)",
           "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "load_at_check": os.getloadavg(), "rows": rows, "target_met": not bad,
           "provisional": sum(1 for r in rows if r["provisional"]), "decisions": len(rows)}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{tag}.json").write_text(json.dumps(doc, indent=1, default=str))
    lines = [f"# Decisions made under 2 CPU burners, re-timed on a quieter machine ({doc['machine']})", "",
             f"{doc['when']}; load average at the check {tuple(round(x, 2) for x in doc['load_at_check'])}. "
             "Each folder: one fresh `warm --preset cpu` process run while two `while True: pass` burners ran; "
             "then `cache verify --json` (interleaved, median of 15 samples).", "",
             "| run | key | decision | provisional | decision / torch (re-timed) | verify |", "|---|---|---|---|---|---|"]
    for r in rows:
        ratio = "-" if r["over_default"] is None else f"{r['over_default']:.3f}"
        lines.append(f"| {r['folder']} | {r['key_id'][:8]} | {r['backend']} | {'yes' if r['provisional'] else 'no'} | "
                     f"{ratio} | {r['verdict']} |")
    lines += ["", f"Target (no non-provisional decision slower than 1.10x the default): "
                  f"{'met' if not bad else '**not met**'}; {doc['provisional']} of {doc['decisions']} decisions provisional."]
    (out / f"{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("load")
    a.add_argument("--root", type=Path, required=True)
    a.add_argument("--n", type=int, default=5)
    a.add_argument("--burners", type=int, default=2)
    c = sub.add_parser("check")
    c.add_argument("--root", type=Path, required=True)
    c.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    c.add_argument("--tag", required=True)
    args = p.parse_args()
    if args.cmd == "load":
        load(args.root, args.n, args.burners)
        return 0
    return check(args.root, args.out, args.tag)


if __name__ == "__main__":
    sys.exit(main())
