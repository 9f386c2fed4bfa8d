#!/usr/bin/env python3
"""Where a compiled ``attention_forward`` spends what compiled SDPA does not: one problem at a time.

For each named problem of the shape suite (``b n s d`` caller, no autograd), the three modules of
``bench_compiled.py`` (``auto``, ``sdpa``, ``best``) compiled alike, with torch.compile's defaults and ``dynamic=False``:

- time per call, interleaved (the device synchronised per call, so host cost shows);
- host time per call (a burst, synchronised once per block);
- the time Dynamo's guards take to accept the call (the cache entry's guard manager, called
  directly), and how many cache entries the code object has;
- the operators each compiled call runs (profiler, CPU side; the compiled graph's name is its
  cache key, so two modules that run one graph show the same name), and with ``--code`` the
  generated code (``<out>/<problem>-<module>.py``).

Usage: python scripts/compiled_probe.py --only seed_example,sdxl_1024_cross --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness import bench  # noqa: E402
from harness.compiled_modules import AttnModule, BackendModule, SDPAModule  # noqa: E402
from harness.guards import guard_us  # noqa: E402


def profile_ops(fn, n: int = 200) -> list:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            fn()
    rows = []
    for e in prof.key_averages():
        rows.append({"op": e.key, "count": e.count // n if e.count >= n else e.count / n,
                     "cpu_us_per_call": e.cpu_time_total / n, "self_cpu_us_per_call": e.self_cpu_time_total / n})
    rows.sort(key=lambda r: -r["self_cpu_us_per_call"])
    return rows[:25]


def probe(shape, device, out: Path, samples: int, code: bool) -> dict:
    import diffsynth_attention as da
    from torch._inductor.utils import run_and_get_code

    g = torch.Generator(device=device).manual_seed(0)
    q, k, v, kw = bench.inputs(shape, device, "b n s d", g)
    causal, window = kw.get("is_causal", False), kw.get("window_size")
    row = {"name": shape["name"]}
    with torch.no_grad():
        info = da.explain(q, k, v, **kw)
        cand = {n: c["time_ms"] for n, c in info.candidates.items() if c["status"] in ("chosen", "accepted") and c["time_ms"]}
        best = min(cand, key=cand.get) if cand else info.backend
        row.update(decision=info.backend, best=best,
                   modes=None if info.decision is None else {m: info.decision.backend_for(m) for m in ("eager", "compiled")})
        mods = {"auto": AttnModule(kw), "sdpa": SDPAModule("b n s d", causal), "best": BackendModule(best, "b n s d", causal, window)}
        fns = {}
        for name, mod in mods.items() if code else ():
            torch._dynamo.reset()
            fn = torch.compile(mod, dynamic=False)
            _, text = run_and_get_code(fn, q, k, v)
            (out / f"{shape['name']}-{name}.py").write_text("\n\n# ----\n\n".join(text))
        torch._dynamo.reset()
        for name, mod in mods.items():
            fns[name] = torch.compile(mod, dynamic=False)  # defaults, alike (bench_compiled.py)
            for _ in range(5):
                fns[name](q, k, v)
        calls = {name: (lambda f=f: f(q, k, v)) for name, f in fns.items()}
        row["times_ms"] = bench.interleaved(calls, device, samples)
        row["host_us"] = bench.host_us(calls, device, calls=4000, blocks=20)
        row["guards"] = {name: dict(zip(("check_us", "entries"), guard_us(mods[name], (q, k, v)))) for name in mods}
        row["ops"] = {name: profile_ops(c) for name, c in calls.items()}
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", action="append")
    p.add_argument("--only", required=True)
    p.add_argument("--samples", type=int, default=9)
    p.add_argument("--out", default="compiled-probe")
    p.add_argument("--code", action="store_true", help="also write each module's generated code (compiles each twice)")
    args = p.parse_args()
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = args.only.split(",")
    shapes = [s for s in bench.shapes(args.preset, None) if s["name"].split("@")[0] in names]
    rows = [probe(s, device, out, args.samples, args.code) for s in shapes]
    result = {"environment": bench.environment(device), "rows": rows}
    (out / "compiled-probe.json").write_text(json.dumps(result, indent=1, default=str))
    for r in rows:
        print(r["name"], r["decision"], r["modes"], "best", r["best"])
        for name in ("auto", "sdpa", "best"):
            print(f"  {name:5s} {r['times_ms'].get(name, float('nan')):.4f} ms  host {r['host_us'][name]:.1f} us  guards {r['guards'][name]}")
            for o in r["ops"][name][:8]:
                print(f"      {o['op'][:60]:60s} x{o['count']} self {o['self_cpu_us_per_call']:.2f} us")


if __name__ == "__main__":
    main()
