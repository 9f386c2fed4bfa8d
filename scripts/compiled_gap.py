#!/usr/bin/env python3
"""Where a compiled attention_forward spends time that compiled SDPA does not, problem by problem.

For each named problem of the shape suite, ``attention_forward`` (``auto``) and plain
``F.scaled_dot_product_attention`` (``sdpa``), each the forward of a module compiled alike
(``torch.compile``'s defaults, ``dynamic=False``: ``bench_compiled.py``'s modules), then:

- **time**, interleaved rounds (a new order each round: the GPU host is noisy), per call:
  ``wall`` (one call then a synchronize: what a waiting caller pays, host and device in series),
  ``b2b`` (back-to-back calls between CUDA events: ``bench_compiled.py``'s figure), ``host``
  (the time to issue the same burst without synchronising, so the host's cost shows even where the
  device bounds ``b2b``) and, on a GPU, ``device`` (the burst issued while the GPU is held, so the
  kernels run back to back: their own time);
- **kernels**: ``torch.profiler`` over 20 calls: the host operators' self time and, on a GPU, the
  kernels each call launches and their device time;
- **Dynamo**: graphs and graph breaks (``torch._dynamo.explain``), the compiled code's cache
  entries and guards (leaf checks, tree nodes, one check's microseconds), the counters of the
  compile and of the timing (a recompile while timed is a finding: a guard that fails);
- **the graph**: the operators Dynamo recorded and what AOTAutograd lowers them to, and for
  ``auto`` the decision the bake wrote into ``diffsynth_attention::attention``;
- **what ran beside the samples**: each sample waits first (bounded) until no kernel package loads
  in the background, then loads, threads and garbage collections beside it are recorded
  (``harness/hygiene.py``).

``--neighbours best,eager`` times auto and sdpa a second time with the compiled best backend and
the two eager calls in the same rounds, as ``bench_compiled.py`` does: a ratio that moves between
the two phases is the rounds' order, or state those calls leave, not the graph. Runs on a CPU
too (no device time there; ``--threads 1`` where other processes share the cores).

Usage: python scripts/compiled_gap.py [--only seed_example,sd15_512_self] [--shapes FILE] [--neighbours best,eager]
       [--samples 9] [--out DIR] [--tag NAME] [--keep-cache] [--threads N]
Writes <out>/<device>-<date>-compiled-gap.{json,md}.
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
sys.path.insert(0, str(ROOT))

from harness import bench  # noqa: E402
from harness.compiled_modules import AttnModule, BackendModule, SDPAModule  # noqa: E402
from harness.gap_parts import counters_since, dynamo_counters, graph_facts, guard_facts, kernel_profile, timed_rounds  # noqa: E402
from harness.guards import cache_entries  # noqa: E402
from harness.hygiene import Watch, summary_md  # noqa: E402

DEFAULT_ONLY = "seed_example,sd15_512_self,sdxl_1024_cross,flux_1024,wan13b_480p_cross,hd256"  # bench_compiled's six (s11)
METRICS = ("wall_ms", "ms", "host_ms", "device_ms")
LABELS = {"wall_ms": "wall", "ms": "b2b", "host_ms": "host", "device_ms": "device"}


def select(device, presets, only: str, file=None) -> list:
    """The problems named by ``only`` (a name matches with or without its ``@cpu`` suffix), from a
    shapes ``file`` or ``presets`` (default: ``all`` on a GPU, ``cpu``, the problems cut to CPU
    size, on a CPU)."""
    wanted = [n.strip() for n in only.split(",") if n.strip()]
    found = bench.shapes(presets or (["cpu"] if device.type == "cpu" else ["all"]), file)
    picked = [s for s in found if s["name"] in wanted or s["name"].split("@")[0] in wanted]
    missing = [n for n in wanted if not any(n in (s["name"], s["name"].split("@")[0]) for s in picked)]
    if missing or not picked:
        raise SystemExit(f"compiled_gap.py: unknown problem name(s) {', '.join(missing) or only!r}; "
                         f"known: {', '.join(s['name'] for s in found)}")
    return picked


def _error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"


def _compiled(modules: dict, q, k, v, device) -> tuple:
    """({name: compiled module}, {name: {"seconds", "counters"}}): each compiled alike, called 3 times."""
    fns, facts = {}, {}
    for name, module in modules.items():
        before, t0 = dynamo_counters(), time.perf_counter()
        try:
            fn = torch.compile(module, dynamic=False)
            for _ in range(3):
                fn(q, k, v)
            bench.sync(device)
        except Exception as exc:  # a module Dynamo cannot compile: said, and left out
            facts[name] = {"error": _error(exc)}
            continue
        fns[name] = fn
        facts[name] = {"seconds": round(time.perf_counter() - t0, 3), "counters": counters_since(before)}
    return fns, facts


def gap_row(shape: dict, device, layout: str, samples: int, neighbours: tuple) -> dict:
    import diffsynth_attention as da

    g = torch.Generator(device=device).manual_seed(0)
    q, k, v, kw = bench.inputs(shape, device, layout, g)
    causal, window = kw.get("is_causal", False), kw.get("window_size")
    gqa = shape["heads_q"] != shape["heads_kv"]
    row: dict = {"name": shape["name"], "layout": layout, "errors": {}}
    with torch.no_grad():
        info = da.explain(q, k, v, **kw)  # tunes if new: the graphs then bake the decision
        row["decision"] = info.backend
        if info.decision is not None:
            row["modes"] = {m: info.decision.backend_for(m) for m in ("eager", "compiled", "cudagraph")}
        cand = {n: c["time_ms"] for n, c in info.candidates.items() if c["status"] in ("chosen", "accepted") and c["time_ms"]}
        row["best"] = min(cand, key=cand.get) if cand else info.backend
        modules = {"auto": AttnModule(kw), "sdpa": SDPAModule(layout, causal, gqa)}
        best_module = BackendModule(row["best"], layout, causal, window)
        inspected = {**modules, **({"best": best_module} if "best" in neighbours else {})}
        row["graph"] = {n: graph_facts(m, (q, k, v)) for n, m in inspected.items()}  # (resets Dynamo: before the timed compiles)
        lowered = [row["graph"][n].get("lowered_ops") for n in modules]
        row["same_lowered_ops"] = None if None in lowered else lowered[0] == lowered[1]
        torch._dynamo.reset()
        fns, row["compile"] = _compiled(modules, q, k, v, device)
        row["errors"].update({n: f["error"] for n, f in row["compile"].items() if "error" in f})
        row["guards"] = {n: guard_facts(modules[n], (q, k, v)) for n in fns}
        calls = {n: (lambda f=f: f(q, k, v)) for n, f in fns.items()}
        watch, before = Watch(), dynamo_counters()
        row["times"] = timed_rounds(calls, device, samples, watch=watch)
        row["hygiene"], row["while_timed"] = watch.summary(), counters_since(before)
        row["while_timed"]["cache_entries_after"] = {n: cache_entries(modules[n]) for n in fns}
        row["profile"] = {n: kernel_profile(c, device) for n, c in calls.items()}
        if neighbours and len(calls) == 2:
            extra = dict(calls)
            if "best" in neighbours:
                best_fn, facts = _compiled({"best": best_module}, q, k, v, device)
                if "best" in best_fn:
                    extra["best"] = (lambda f=best_fn["best"]: f(q, k, v))
                else:
                    row["errors"]["best"] = facts["best"]["error"]
            if "eager" in neighbours:
                sdpa_mod = SDPAModule(layout, causal, gqa)
                extra.update(auto_eager=lambda: da.attention_forward(q, k, v, **kw), sdpa_eager=lambda: sdpa_mod(q, k, v))
            watch, before = Watch(), dynamo_counters()
            row["with_neighbours"] = {"times": timed_rounds(extra, device, samples, watch=watch), "hygiene": watch.summary(),
                                      "while_timed": counters_since(before),
                                      "cache_entries": {n: cache_entries(modules[n]) for n in fns}}
    for metric in METRICS:
        a, s = (row["times"].get(n, {}).get(metric) for n in ("auto", "sdpa"))
        row.setdefault("auto_vs_sdpa", {})[metric] = a / s if a and s else None
    del q, k, v
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def _f(x, nd: int = 4) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def _module_line(r: dict, name: str) -> str:
    t, gd, gf, p = r["times"].get(name, {}), r["guards"].get(name, {}), r["graph"].get(name, {}), r["profile"].get(name, {})
    kern = "-" if "kernel_us" not in p else f"{p['kernels_per_call']:g} ({p['kernel_us']:.1f})"
    timed = r.get("while_timed", {})
    entries = f"{gd.get('cache_entries', '-')} -> {timed.get('cache_entries_after', {}).get(name, '-')}"
    return (f"| {name} | {_f(t.get('wall_ms'))} | {_f(t.get('ms'))} | {_f(t.get('host_ms'))} | {_f(t.get('device_ms'))} | "
            f"{kern} | {_f(p.get('host_self_us'), 1)} | {gf.get('graphs', '-')} / {gf.get('graph_breaks', '-')} | "
            f"{gd.get('leaf_guards', '-')} / {gd.get('guard_nodes', '-')} | {_f(gd.get('check_us'), 2)} | "
            f"{entries} | {r['compile'].get(name, {}).get('seconds', '-')} |")


def write_markdown(result: dict, path: Path) -> None:
    env = result["environment"]
    lines = [f"# Compiled attention_forward against compiled SDPA, where the time goes: {env['device']}", "",
             f"{env['date']}; torch {env['torch']}, CUDA {env['cuda']}, Python {env['python']}; {result['samples']} "
             f"interleaved rounds; torch threads {result['threads']}; `scripts/compiled_gap.py`.", "",
             "Per call, medians: **wall** one call then a synchronize (host and device in series); **b2b** back-to-back "
             "calls (bench_compiled.py's figure); **host** issuing that burst, not synchronised (on a CPU: b2b); **device** "
             "the burst issued while the GPU is held (kernels back to back). Kernels: per call from torch.profiler "
             "(count, device us). Guards: leaf checks / tree nodes, one check in us.", "",
             "| problem | decision (graph) | auto/sdpa wall | b2b | host | device | graph breaks auto/sdpa | guards auto/sdpa "
             "| same lowered ops | loads beside samples |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        m, av = r.get("modes") or {}, r.get("auto_vs_sdpa", {})
        br = "/".join(str(r["graph"].get(n, {}).get("graph_breaks", "-")) for n in ("auto", "sdpa"))
        gu = "/".join(str(r["guards"].get(n, {}).get("leaf_guards", "-")) for n in ("auto", "sdpa"))
        lines.append(f"| {r['name']} [{r['layout']}] | {r['decision']} ({m.get('compiled', '-')}) | {_f(av.get('wall_ms'), 3)} | "
                     f"{_f(av.get('ms'), 3)} | {_f(av.get('host_ms'), 3)} | {_f(av.get('device_ms'), 3)} | {br} | {gu} | "
                     f"{r.get('same_lowered_ops')} | {'yes' if r['hygiene']['load_running'] else 'no'} |")
    for r in result["rows"]:
        lines += ["", f"## {r['name']} [{r['layout']}]: decision {r['decision']}, modes {r.get('modes')}, best {r['best']}", "",
                  "| module | wall ms | b2b ms | host ms | device ms | kernels/call (us) | host ops self us | graphs / breaks "
                  "| guards leaf / nodes | check us | cache entries (timing: before -> after) | compile s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        frames = r.get("while_timed", {}).get("frames", {}).get("total", 0)
        lines += [_module_line(r, n) for n in ("auto", "sdpa") if n in r["times"]]
        lines += ["", f"- frames Dynamo compiled while timed: {frames} (a guard that failed: a recompile)"]
        ga = r["graph"].get("auto", {})
        lines += ["", f"- auto's graph: baked decision `{ga.get('baked')}`; Dynamo ops {ga.get('dynamo_ops')}; lowered "
                  f"{ga.get('lowered_ops')}", f"- sdpa's graph: Dynamo ops {r['graph'].get('sdpa', {}).get('dynamo_ops')}; "
                  f"lowered {r['graph'].get('sdpa', {}).get('lowered_ops')}"]
        for n in ("auto", "sdpa"):
            reasons = r["graph"].get(n, {}).get("break_reasons")
            if reasons:
                lines.append(f"- {n}'s graph breaks: " + "; ".join(reasons[:4]))
            p = r["profile"].get(n, {})
            if p.get("kernels"):
                lines.append(f"- {n}'s kernels: " + "; ".join(f"`{k['name'][:70]}` x{k['count']:g} {k['device_us']:.1f} us"
                                                             for k in p["kernels"][:4]))
            lines.append(f"- {n}'s host ops (self us per call): " + "; ".join(
                f"`{o['name'][:50]}` {o['self_cpu_us']:.1f}" for o in p.get("host_ops", [])[:5]))
        nb = r.get("with_neighbours")
        if nb:
            t = nb["times"]
            ratio = {m: (t["auto"][m] / t["sdpa"][m]) if t["auto"].get(m) and t["sdpa"].get(m) else None for m in METRICS}
            lines.append("- with neighbours in the rounds (" + ", ".join(n for n in t if n not in ("auto", "sdpa")) + "): auto/sdpa "
                         + ", ".join(f"{LABELS[m]} {_f(ratio[m], 3)}" for m in METRICS) + "; "
                         + ", ".join(f"{n} b2b {_f(x.get('ms'))} ms" for n, x in t.items())
                         + f"; frames compiled while timed {nb['while_timed'].get('frames', {}).get('total', 0)}, cache entries after "
                         f"{nb['cache_entries']}")
        if r["errors"]:
            lines.append("- errors: " + "; ".join(f"{n}: {e}" for n, e in r["errors"].items()))
    beside = [(f"{r['name']}", r["hygiene"]) for r in result["rows"]]
    beside += [(f"{r['name']} + neighbours", r["with_neighbours"]["hygiene"]) for r in result["rows"] if r.get("with_neighbours")]
    lines += ["", "## What ran beside the timed samples", "", "Each sample waited first (bounded) until no kernel package "
              "loaded in the background; threads other than this one (where each was: the JSON).", ""] + summary_md(beside)
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", action="append", help="default: all on a GPU, cpu on a CPU")
    parser.add_argument("--shapes", help="a JSON file of problems (shape-suite format) instead of the presets")
    parser.add_argument("--only", default=DEFAULT_ONLY, help=f"comma-separated problem names (default {DEFAULT_ONLY})")
    parser.add_argument("--layout", default="b n s d")
    parser.add_argument("--samples", type=int, default=9)
    parser.add_argument("--neighbours", default="", help="best,eager: time auto and sdpa again beside these, as bench_compiled.py does")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (a CPU shared with other work: 1)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--tag")
    parser.add_argument("--keep-cache", action="store_true", help="the decision cache of the environment, not a fresh one")
    args = parser.parse_args(argv)
    neighbours = tuple(n for n in args.neighbours.split(",") if n)
    if set(neighbours) - {"best", "eager"}:
        parser.error(f"--neighbours takes best and eager, not {args.neighbours!r}")
    device = torch.device(args.device)
    shapes = select(device, args.preset, args.only, args.shapes)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.keep_cache:
        os.environ.setdefault("DIFFSYNTH_ATTENTION_CACHE_DIR", tempfile.mkdtemp(prefix="da-compiled-gap-"))
    t0 = time.perf_counter()
    rows = []
    for shape in shapes:
        t1 = time.perf_counter()
        rows.append(gap_row(shape, device, args.layout, args.samples, neighbours))
        r = rows[-1]
        print(f"{shape['name']}: {r['decision']} ({(r.get('modes') or {}).get('compiled')}) auto/sdpa "
              + ", ".join(f"{LABELS[m]} {_f(x, 3)}" for m, x in r["auto_vs_sdpa"].items()) + f" [{time.perf_counter() - t1:.1f} s]", flush=True)
    result = {"environment": bench.environment(device), "samples": args.samples, "threads": torch.get_num_threads(),
              "neighbours": list(neighbours), "seconds": round(time.perf_counter() - t0, 1), "rows": rows}
    path = bench.save_result(result, args.out, args.tag, "-compiled-gap", write_markdown)
    print(Path(f"{path}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
