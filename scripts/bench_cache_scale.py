#!/usr/bin/env python3
"""The decision cache at fleet scale (issue 23): `cache show`, `clear` and `export` with tens of
thousands of entries (valid, and bad or forged), a new shape's neighbour lookup, and a version-1
migration. CPU only; the cache is a temporary folder (the user's cache is never touched).

Example: PYTHONPATH=$PWD python scripts/bench_cache_scale.py --out benchmarks/results
         PYTHONPATH=$PWD python scripts/bench_cache_scale.py --entries 2000 --legacy 5000 --out /tmp/x

Writes <out>/<machine>-<date>-cache-scale<suffix>.json and .md. The valid cache is written with
its neighbour index (store/group_index.py), as this version writes it; the neighbour lookups
are then those of a process whose cache this version wrote.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness.bench import (  # noqa: E402
    Candidate, Decision, index_neighbours, key_id, neighbour_cell, render_entry)

BACKENDS = ["torch", "torch_cudnn", "torch_flash", "torch_efficient", "flash_attention_4", "flash_attention_3",
            "flash_attention_2", "xformers", "sage_attention", "torch_math"]
GPUS = [("NVIDIA H200", "9.0", 132), ("NVIDIA H100 80GB HBM3", "9.0", 132), ("NVIDIA A100-SXM4-80GB", "8.0", 108),
        ("NVIDIA L40S", "8.9", 142)]


def fleet_decision(i: int) -> Decision:
    """A realistic decision: one of many shapes x GPU models x library versions."""
    rng = random.Random(i)
    gpu, cap, sms = GPUS[i % len(GPUS)]
    seq = 256 + i  # unique per i: every decision has its own key
    key = {"problem": {"batch": 1 + i % 2, "heads_q": 24, "heads_kv": 24, "seq_q": seq, "seq_kv": seq if i % 3 else 512,
                       "head_dim": 128, "head_dim_v": 128, "dtype": "bfloat16",
                       "layout": "b n s d, b n s d, b n s d -> b n s d", "mask": "none", "mask_shape": None,
                       "causal": False, "window": None, "requires_grad": False},
           "device": {"type": "cuda", "name": gpu, "capability": cap, "sm_count": sms},
           "versions": {"diffsynth_attention": "0.1.0", "torch": f"2.{11 + i % 3}.0", "cuda": "13.0",
                        "cuda_driver": "13000", "cudnn": "91200", "flash-attn-4": "4.0.0b36"}}
    cands = {}
    chosen = BACKENDS[i % 5]
    for j, name in enumerate(BACKENDS):
        status = "chosen" if name == chosen else "accepted" if j % 3 else "slower"
        cands[name] = Candidate(status, round(rng.uniform(0.1, 2.0), 4), rng.uniform(0, 0.004), None,
                                round(rng.uniform(1, 900), 3), reps=rng.randint(3, 60))
    cands["torch_math"] = Candidate("rejected", None, 0.2, "error 0.2 above tolerance 0.005", 12.0)
    return Decision(key_id(key), key, chosen, cands, created="2026-11-30T00:00:00+00:00", tuning_seconds=1.5)


def populate(folder: Path, n: int, kind: str = "valid") -> list:
    """Write ``n`` entry files; ``kind``: valid, bad (unparsable), forged (an id not the hash of its key)."""
    v2 = folder / "v2"
    v2.mkdir(parents=True, mode=0o700, exist_ok=True)
    os.chmod(folder, 0o700)
    ids = []
    for i in range(n):
        d = fleet_decision(i)
        text = render_entry(d)  # the current schema version
        kid = d.key_id
        if kind == "bad":
            text = text[: len(text) // 2]
        elif kind == "forged":
            kid = key_id({"forged": i})
            text = text.replace(d.key_id, kid)
        fd = os.open(v2 / f"{kid}.json", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.write(fd, text.encode())
        os.close(fd)
        ids.append(kid)
    if kind == "valid":  # the neighbour index, as this version's writes keep it (store/group_index.py)
        vfd = os.open(v2, os.O_RDONLY)
        try:
            index_neighbours(vfd, [(neighbour_cell(fleet_decision(i).key), kid) for i, kid in enumerate(ids)], complete=True)
        finally:
            os.close(vfd)
    return ids


def _children_cpu() -> float:
    use = resource.getrusage(resource.RUSAGE_CHILDREN)
    return use.ru_utime + use.ru_stime


def cli(env, *args) -> dict:
    """Run one command; its wall time, its CPU time (the machine is shared: wall time grows with
    the load, CPU time much less), and the load average around it."""
    t0, c0, load0 = time.perf_counter(), _children_cpu(), os.getloadavg()[0]
    r = subprocess.run([sys.executable, "-m", "diffsynth_attention", *args], env=env, capture_output=True, text=True,
                       stdin=subprocess.DEVNULL, timeout=3600)
    seconds, cpu = time.perf_counter() - t0, _children_cpu() - c0
    return {"seconds": round(seconds, 2), "cpu seconds": round(cpu, 2), "load": round((load0 + os.getloadavg()[0]) / 2, 1),
            "exit": r.returncode, "warnings": r.stderr.count("WARNING"),
            "stderr": r.stderr.strip().splitlines()[-1][:300] if r.stderr.strip() else ""}


def files(folder: Path) -> int:
    return sum(1 for _ in (folder / "v2").glob("*.json*"))


NEIGHBOUR = r"""
import json, sys, time
sys.path.insert(0, sys.argv[2])
from harness.bench import DecisionCache, neighbour_group
from bench_cache_scale import fleet_decision
c = DecisionCache(sys.argv[1])
out = {}
for label, i in (("first new shape", 5), ("second new shape", 9)):
    fields = fleet_decision(i).key
    if fields["problem"]["seq_q"] == fields["problem"]["seq_kv"]:
        fields["problem"]["seq_kv"] += 1
    fields["problem"]["seq_q"] += 1  # a new length, same bucket
    t0 = time.perf_counter()
    found = c.neighbours(neighbour_group(fields), fields=fields)  # as the dispatcher asks: the new key's cell
    out[label] = {"seconds": round(time.perf_counter() - t0, 3), "group size": len(found)}
print(json.dumps(out))
"""

MIGRATE = r"""
import json, resource, sys, time
from diffsynth_attention import DecisionCache
t0 = time.perf_counter()
c = DecisionCache(sys.argv[1])
first = c.get(sys.argv[2])           # a key of the old file: served lazily while migrating
t1 = time.perf_counter()
miss = c.get("0" * 24)               # a key nowhere: a miss, at most one lazy wait
t2 = time.perf_counter()
c.migrate()                          # wait for the background migration to end
t3 = time.perf_counter()
use = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"CPU seconds": round(use.ru_utime + use.ru_stime, 2), "first get (served from the old file)": round(t1 - t0, 3), "found": first is not None,
                  "a miss meanwhile (no second wait)": round(t2 - t1, 3), "whole migration": round(t3 - t0, 2),
                  "peak RSS MB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))
"""


def machine() -> str:
    name = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} CPU threads (the CPU dev machine)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for the JSON and markdown results")
    ap.add_argument("--entries", type=int, default=60000)
    ap.add_argument("--legacy", type=int, default=100000, help="entries of the version-1 file to migrate")
    ap.add_argument("--name", default="CPU-dev-2core", help="the machine's name in the file names")
    ap.add_argument("--suffix", default="", help="appended to the file names (e.g. -issue31)")
    ap.add_argument("--parts", default="scale,migration", help="comma-separated: scale (show/clear/export/neighbours), migration")
    args = ap.parse_args()
    rows, extra = [], {}
    n = args.entries
    with tempfile.TemporaryDirectory(prefix="da-cache-scale-") as tmp:
        for kind in ("valid", "forged", "bad") if "scale" in args.parts else ():
            folder = Path(tmp) / kind
            populate(folder, n, kind)
            env = dict(os.environ, DIFFSYNTH_ATTENTION_CACHE_DIR=str(folder),
                       PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
            show = cli(env, "cache", "show", "--json") if kind == "valid" else cli(env, "cache", "show")
            rows.append({"operation": "cache show", "entries": n, "kind": kind, **show, "files after": files(folder)})
            if kind == "valid":
                rows.append({"operation": "cache export", "entries": n, "kind": kind,
                             **cli(env, "cache", "export", str(Path(tmp) / "export.json"))})
                r = subprocess.run([sys.executable, "-c", NEIGHBOUR, str(folder), str(ROOT / "scripts")], env=env,
                                   capture_output=True, text=True, timeout=3600)
                extra["neighbours"] = json.loads(r.stdout) if r.returncode == 0 else {"error": r.stderr[-500:]}
                rows.append({"operation": "cache clear --backend torch", "entries": n, "kind": kind,
                             **cli(env, "cache", "clear", "--backend", "torch", "--yes"), "files after": files(folder)})
            rows.append({"operation": "cache clear", "entries": files(folder), "kind": kind,
                         **cli(env, "cache", "clear", "--yes"), "files after": files(folder)})
        legacy = Path(tmp) / "legacy"
        legacy.mkdir(mode=0o700)
        if "migration" not in args.parts:
            args.legacy = 0
        entries = {}
        for i in range(args.legacy):
            d = fleet_decision(i)
            entries[d.key_id] = d.to_dict()
        probe = next(iter(entries), "0" * 24)
        (legacy / "decisions.json").write_text(json.dumps({"schema_version": 1, "entries": entries}))
        size = (legacy / "decisions.json").stat().st_size
        del entries
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        r = subprocess.run([sys.executable, "-c", MIGRATE, str(legacy), probe], env=env, capture_output=True, text=True,
                           timeout=3600) if args.legacy else None
        extra["migration"] = {} if r is None else {"entries": args.legacy, "MB": round(size / 2**20), **(
            json.loads(r.stdout) if r.returncode == 0 else {"error": r.stderr[-500:]})}
    result = {"machine": machine(), "python": platform.python_version(), "date": datetime.date.today().isoformat(),
              "rows": rows, **extra}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{args.name}-{result['date']}-cache-scale{args.suffix}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# Decision cache at scale: {result['machine']}", "",
             f"`PYTHONPATH=$PWD python scripts/bench_cache_scale.py --entries {n} --legacy {args.legacy}`", "",
             "Wall seconds grow with the machine's load (shared by several engineers; the load average of its 2 CPU "
             "threads is given); CPU seconds are the command's own work.", "",
             "| operation | entries | kind | wall s | CPU s | load | exit | warnings | files after |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r['operation']}` | {r['entries']} | {r['kind']} | {r['seconds']} | {r['cpu seconds']} | {r['load']} | "
                     f"{r['exit']} | {r['warnings']} | {r.get('files after', '')} |")
    lines += ["", "Neighbour lookup of a new shape (`DecisionCache.neighbours`, index per group):", ""]
    for label, v in extra.get("neighbours", {}).items():
        lines.append(f"- {label}: {v}")
    lines += ["", f"Version-1 migration (in the background): {extra.get('migration')}", ""]
    stem.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
