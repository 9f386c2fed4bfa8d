#!/usr/bin/env python3
"""Writes that get done (issue 31, item 3, target "durability"): N decisions stored while the disk
flips between failing and writable; then the fault clears for good. Measures how long until none
is pending, how many are pending 3 s after the fault cleared, and, after a SIGKILL at that moment,
how many a fresh process finds (lost = N - found). CPU only; the cache is a temporary folder.

The fault is injected as the store's tests inject it: every new file the store creates (entry,
journal) fails with EROFS while the fault is on (``fs.open_temp``). Scenarios:
  flapping: the disk flips every --flip decisions (the fault on for the last stretch), then clears;
  down:     the disk fails for every decision (all N pending), then clears: the worst case.

Example: PYTHONPATH=$PWD python scripts/bench_cache_durability.py --out benchmarks/results --suffix -s2
Writes <out>/<name>-<date>-cache-durability<suffix>.json and .md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import errno, json, os, signal, sys, time
sys.path.insert(0, sys.argv[4])
from bench_cache_scale import fleet_decision
from diffsynth_attention.store import fs
from diffsynth_attention.store.cache import DecisionCache
folder, n, scenario, _, flip, kill_after = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5]), float(sys.argv[6])
real = fs.open_temp
broken = [True]
def flaky(name, dfd):
    if broken[0]:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    return real(name, dfd)
fs.open_temp = flaky
decisions = [fleet_decision(i) for i in range(n)]
c = DecisionCache(folder)
t0 = time.perf_counter()
for i, d in enumerate(decisions):
    broken[0] = True if scenario == "down" else (i // flip) % 2 == 0 or i >= n - flip
    c.put(d)
put_s = time.perf_counter() - t0
pending_at_clear = len(c._pending)
cpu0, clear = time.process_time(), time.perf_counter()
broken[0] = False  # the fault clears for good; nothing is stored after this
drained = None
while time.perf_counter() - clear < kill_after:
    if drained is None and not c._pending:
        drained = time.perf_counter() - clear
    time.sleep(0.005)
out = {"scenario": scenario, "decisions": n, "put seconds": round(put_s, 1), "pending when the fault cleared": pending_at_clear,
       "none pending after s": None if drained is None else round(drained, 2),
       "pending %g s after" % kill_after: len(c._pending),
       "journaled, entry file not yet written, at the kill": len(c._journaled),
       "process CPU s from the clear to the kill": round(time.process_time() - cpu0, 2)}
print(json.dumps(out), flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # no flush at exit
"""

READER = r"""
import json, sys, time
from diffsynth_attention.store.cache import DecisionCache
t0, c0 = time.perf_counter(), time.process_time()
found = len(DecisionCache(sys.argv[1]).entries())  # a fresh process: a journal left behind is written out first
print(json.dumps({"found by a fresh process": found, "its read seconds": round(time.perf_counter() - t0, 2),
                  "its CPU s": round(time.process_time() - c0, 2)}))
"""


def run(scenario: str, n: int, flip: int, kill_after: float, env: dict) -> dict:
    with tempfile.TemporaryDirectory(prefix="da-durability-") as tmp:
        load0 = os.getloadavg()[0]
        r = subprocess.run([sys.executable, "-c", CHILD, tmp, str(n), scenario, str(ROOT / "scripts"), str(flip),
                            str(kill_after)], env=env, capture_output=True, text=True, timeout=3600)
        lines = [x for x in r.stdout.splitlines() if x.startswith("{")]
        if r.returncode != -9 or not lines:
            return {"scenario": scenario, "error": f"exit {r.returncode}: {r.stderr[-800:]}"}
        row = json.loads(lines[-1])
        v2 = Path(tmp) / "v2"
        row["entry files at the kill"] = sum(1 for _ in v2.glob("*.json"))
        row["journals at the kill"] = sum(1 for p in v2.glob("journal-*") if ".bad-" not in p.name)
        r = subprocess.run([sys.executable, "-c", READER, tmp], env=env, capture_output=True, text=True, timeout=3600)
        row.update(json.loads(r.stdout) if r.returncode == 0 else {"reader error": r.stderr[-800:]})
        row["lost"] = n - row.get("found by a fresh process", 0)
        row["load"] = round((load0 + os.getloadavg()[0]) / 2, 1)
        return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for the JSON and markdown results")
    ap.add_argument("--decisions", type=int, default=50000)
    ap.add_argument("--flip", type=int, default=1000, help="flapping: decisions between two flips of the disk")
    ap.add_argument("--kill-after", type=float, default=3.0, help="seconds after the fault clears: count, then SIGKILL")
    ap.add_argument("--scenarios", default="flapping,down")
    ap.add_argument("--name", default="CPU-dev-2core", help="the machine's name in the file names")
    ap.add_argument("--suffix", default="")
    args = ap.parse_args(argv)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    rows = [run(s, args.decisions, args.flip, args.kill_after, env) for s in args.scenarios.split(",") if s]
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU threads",
              "python": platform.python_version(), "date": datetime.date.today().isoformat(), "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{args.name}-{result['date']}-cache-durability{args.suffix}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# Writes that get done: {args.decisions} decisions, a flapping disk ({result['machine']})", "",
             f"`PYTHONPATH=$PWD python scripts/bench_cache_durability.py --decisions {args.decisions} --flip {args.flip} "
             f"--kill-after {args.kill_after}`", ""]
    for row in rows:
        lines += [f"## {row['scenario']}", ""] + [f"- {k}: {v}" for k, v in row.items() if k != "scenario"] + [""]
    stem.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
