#!/usr/bin/env python3
"""Measurements of tuning itself: repeatability, cost, first calls and neighbours.

Sub-commands (each writes ``benchmarks/results/<device>-<date>-tuning-<kind>.{json,md}``):

- ``repeat --n N`` (issues 14 and 21): tunes every problem in N fresh processes, each with an
  empty cache folder of its own. Then, in one process, every backend that can serve the problem
  here is timed directly: installed, declared capable, predicted to fit in the free memory and
  passing the numeric gate on the same inputs (one the tuner skipped on its cost model is timed
  too: a wrong skip shows). Per problem: how often the decisions agree (a decision within the tie
  cap, 3%, of the most frequent one's time counts as agreeing), and the worst decision over the
  best backend timed directly (target <= 1.03). Adds the problems the suite lacks
  (``REPEAT_EXTRA``: head dims 80 and 96, an odd length, fp16, grouped-query causal, a batch of 64
  short sequences, one query token; on a CPU cut to CPU size, plus the issue's (1, 3, 41, 16)
  fp32) unless ``--no-extra``.
- ``cost`` (issue 15, items 1-2): per problem, the tuning cost (total, compile, the rest against
  the budget ``max(DIFFSYNTH_ATTENTION_TUNING_BUDGET, 15x the fastest time)``), every candidate's
  prediction, and the skipped ones; then the same problem tuned again with skipping off, to
  check every skip against measured times (a skip is wrong if, unskipped, it would have won).
- ``first-call`` (issue 15, items 3-4): in fresh processes: start-up; every problem's first call
  with an empty cache (tuning), with decisions cached but FlashAttention-4's compile cache cold,
  and with both warm; the time from ``import torch`` done to the first result in a process whose
  decisions are all cached (a problem not decided for FlashAttention-4) and which kernel
  packages that process imported; and ``diffsynth-attention warm`` run again with both caches warm.
- ``neighbours`` (issue 15, item 5): sequence lengths swept around each problem (default -40%,
  -15%, -5%, +5%, +15%, +40%): the backend tuning picks against the one ``nearest`` would serve
  (the decision of the problem itself), whether the length falls in its bucket, and, where they
  differ, the slowdown of the neighbour's backend measured directly.

On a machine without a GPU, ``--device cpu`` runs the same code on problems cut to CPU size
(``--max-seq`` cuts them further for a smoke test).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from harness.tuning_parts import (  # noqa: E402
    OFFSETS, REPEAT_CPU_EXTRA, REPEAT_EXTRA, REPEAT_NEW, _torch, child_env, child_first_calls, child_first_result,
    child_tune, decision_summary, device_label, environment, fmt, fresh_dispatcher, inputs,
    interleaved, own_process_ratio, problems, run_child, shapes_file, write)


# -- repeat (issue 14 item 2, issue 21 item 6) ---------------------------------------------------------------
def repeat_tuning(shapes: list, device, n: int, out_dir: Path, samples: int = 15, stem=None, own_samples: int = 7,
                  runs_file=None) -> dict:
    """``runs_file``: the tuning processes' results, kept after each one, and read back by a run
    given the same file and the same problems, device and options, which tunes only the processes
    still missing and then scores: a run cut short by a time limit (600 s a GPU call) goes on."""
    from harness.bench import DEFAULT_POLICY, backend_call, servable

    torch, path, names, runs = _torch(), shapes_file(shapes), [s["name"] for s in shapes], []
    what = {"device": str(device), "shapes": shapes, "own_samples": own_samples}  # what the kept runs must match
    if runs_file and Path(runs_file).exists():
        kept = json.loads(Path(runs_file).read_text())
        runs = [r for r in kept.get("runs", []) if [p["name"] for p in r["problems"]] == names][:n] \
            if isinstance(kept, dict) and {k: kept.get(k) for k in what} == what else []  # (a list: the s7 format)
        print(f"{len(runs)} tuning processes read from {runs_file}", flush=True)
    for i in range(len(runs), n):
        cache = tempfile.mkdtemp(prefix=f"da-repeat-{i}-")
        runs.append(run_child(["_tune", "--device", str(device), "--shapes", path, "--own-samples", str(own_samples)], cache))
        shutil.rmtree(cache, ignore_errors=True)
        if runs_file:
            Path(runs_file).parent.mkdir(parents=True, exist_ok=True)
            Path(runs_file).write_text(json.dumps({**what, "runs": runs}, default=str))
        print(f"run {i + 1}/{n}: " + ", ".join(f"{r['name']}={r['backend']}" for r in runs[-1]["problems"]), flush=True)
    rows = []
    for j, shape in enumerate(shapes):
        decided = [r["problems"][j]["backend"] for r in runs]
        q, k, v, kw = inputs(shape, device)
        methods, not_timed = servable(q, k, v, **kw)
        for name in set(decided) - set(methods):  # a decision this process cannot reproduce: time it anyway
            fn = backend_call(name, q, k, v, **kw)
            if fn is not None:
                methods[name] = fn
        times = interleaved(methods, device, samples)
        graph_row = {}
        if device.type == "cuda":  # the same decisions, under CUDA graphs: each process's cudagraph pick, device time
            from harness.graph_timing import graph_times

            g_decided = [r["problems"][j].get("cudagraph_backend", r["problems"][j]["backend"]) for r in runs]
            g_times, g_failed = graph_times(methods, device, samples)
            if g_times:
                g_best = min(g_times, key=g_times.get)
                g_worst = max(g_times.get(d, float("inf")) for d in g_decided)
                graph_row = {"graph": {"decisions": g_decided, "times_ms": g_times, "not_captured": g_failed, "best": g_best,
                                       "worst_vs_best": g_worst / g_times[g_best]}}
        del q, k, v, methods
        if device.type == "cuda":
            torch.cuda.empty_cache()
        best = min(times, key=times.get)
        mode = max(set(decided), key=lambda b: (decided.count(b), -times.get(b, float("inf"))))
        tie = DEFAULT_POLICY.tie_cap
        agree = sum(1 for d in decided if d == mode or times.get(d, float("inf")) <= times.get(mode, float("inf")) * (1 + tie))
        worst = max(times.get(d, float("inf")) for d in decided)
        rows.append({"name": shape["name"], "problem": {k_: shape[k_] for k_ in shape if k_ != "name"},
                     "decisions": decided, "counts": {b: decided.count(b) for b in sorted(set(decided))},
                     "mode": mode, "agree": agree, "runs": n, "times_ms": times, "not_timed": not_timed, "best": best,
                     "best_ms": times[best], "worst_vs_best": worst / times[best],
                     "own_vs_best": [own_process_ratio(r["problems"][j]) for r in runs],
                     "tuning_seconds": [r["problems"][j].get("tuning_seconds") for r in runs],
                     "compile_seconds": [r["problems"][j].get("compile_seconds") for r in runs],
                     "candidates": [r["problems"][j].get("candidates", {}) for r in runs],
                     "confirmations": [r["problems"][j].get("confirmation") for r in runs],
                     "provisional": [r["problems"][j].get("provisional") for r in runs], **graph_row})
        # written after every problem: a run cut short by its time limit still leaves the problems scored so far
        result = write_repeat(rows, device, n, samples, out_dir, stem)
        print(f"scored {shape['name']}: worst/best {rows[-1]['worst_vs_best']:.3f}"
              + (f", graphs {graph_row['graph']['worst_vs_best']:.3f}" if graph_row else ""), flush=True)
    return result


def write_repeat(rows: list, device, n: int, samples: int, out_dir: Path, stem=None) -> dict:
    extra = {s["name"] for s in REPEAT_EXTRA + REPEAT_CPU_EXTRA + REPEAT_NEW} | {s["name"] + "@cpu" for s in REPEAT_EXTRA + REPEAT_NEW}
    result = {"environment": environment(device), "kind": "repeat-tuning", "runs": n, "samples": samples, "problems": rows,
              "target": "worst of the fresh decisions within 3% of the best backend timed directly, on every problem",
              "met": all(r["worst_vs_best"] <= 1.03 for r in rows),
              "own_met": all(x is None or x <= 1.03 for r in rows for x in r.get("own_vs_best", [])),
              "agree_all": sum(r["agree"] == r["runs"] for r in rows)}
    env = result["environment"]
    lines = [f"# Repeatability of tuning: {env['device']}", "",
             f"{env['date']}; torch {env['torch']}; {n} fresh processes, each with an empty cache; then every backend that "
             f"can serve the problem and passes the gate timed directly, interleaved, median of {samples} samples (ms). "
             "A decision within 3% of the most frequent one counts as agreeing (a tie). Problems marked + are not in the "
             "shape suite. *In its own process*: each decision over the fastest backend timed directly in the process "
             "that took it, right after tuning (the conditions it was taken in).", "",
             "| problem | decisions (count, ms) | agree | best backend (ms) | worst decision / best | worst in its own process |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        counts = ", ".join(f"{b} x{c} ({r['times_ms'].get(b, float('nan')):.4f})" for b, c in r["counts"].items())
        flag = "**" if r["worst_vs_best"] > 1.03 else ""
        mark = " +" if r["name"] in extra else ""
        own = [x for x in r.get("own_vs_best", []) if x is not None]
        own_text = "-" if not own else (f"**{max(own):.3f}**" if max(own) > 1.03 else f"{max(own):.3f}")
        lines.append(f"| {r['name']}{mark} | {counts} | {r['agree']}/{r['runs']} | {r['best']} ({r['best_ms']:.4f}) | "
                     f"{flag}{r['worst_vs_best']:.3f}{flag} | {own_text} |")
    lines += ["", f"Target (worst of {n} within 3% of the best on every problem): {'met' if result['met'] else '**not met**'}; "
              f"{result['agree_all']} of {len(rows)} problems agree {n}/{n}. Each decision within 3% of the best in its own "
              f"process: {'yes' if result['own_met'] else '**no**'}.", "", "## Every backend timed directly (ms)", ""]
    for r in rows:
        timed = ", ".join(f"{b} {t:.4f}" for b, t in sorted(r["times_ms"].items(), key=lambda x: x[1]))
        lines.append(f"- {r['name']}: {timed}")
    graphed = [r for r in rows if "graph" in r]
    if graphed:
        result["graph_met"] = all(r["graph"]["worst_vs_best"] <= 1.03 for r in graphed)
        lines += ["", "## Under CUDA graphs", "", "Each process's CUDA-graph pick (`Decision.backend_for(\"cudagraph\")`); every "
                  "backend captured once and replayed, interleaved, device time per call (ms).", "",
                  "| problem | picks | best backend (ms) | worst pick / best | not captured |", "|---|---|---|---|---|"]
        for r in graphed:
            g = r["graph"]
            picks = ", ".join(f"{b} x{g['decisions'].count(b)}" for b in sorted(set(g["decisions"])))
            flag = "**" if g["worst_vs_best"] > 1.03 else ""
            lines.append(f"| {r['name']} | {picks} | {g['best']} ({g['times_ms'][g['best']]:.4f}) | {flag}{g['worst_vs_best']:.3f}{flag} | "
                         f"{', '.join(sorted(g['not_captured'])) or '-'} |")
        lines += ["", f"Target under CUDA graphs (worst pick within 3% of the best): {'met' if result['graph_met'] else '**not met**'}."]
    stem = stem or f"{device_label(device)}-{datetime.date.today().isoformat()}-tuning-repeat"
    write(result, lines, out_dir, stem)
    return result


# -- cost (issue 15, items 1-2) ---------------------------------------------------------------------------------
def tuning_cost(shapes: list, device, out_dir: Path, compare: bool = True, stem=None) -> dict:
    from harness.bench import DEFAULT_POLICY

    torch = _torch()
    floor = DEFAULT_POLICY.budget_floor()
    rows = []
    for shape in shapes:
        q, k, v, kw = inputs(shape, device)
        with torch.no_grad():
            info = fresh_dispatcher().explain(q, k, v, **kw)
        d = decision_summary(info)
        timed = [c["time_ms"] for c in d["candidates"].values() if c["time_ms"] is not None]
        limit = DEFAULT_POLICY.limit(floor, min(timed) if timed else None)
        excl = d["tuning_seconds"] - d["compile_seconds"]
        row = {"name": shape["name"], "problem": info.problem, "decision": d, "limit_s": limit, "excl_compile_s": excl,
               "within_budget": excl <= limit,
               "skipped": {n: c for n, c in d["candidates"].items() if c["status"] == "skipped"}}
        if compare:
            with torch.no_grad():
                info2 = fresh_dispatcher(DEFAULT_POLICY.replace(early_skip=False)).explain(q, k, v, **kw)
            d2 = decision_summary(info2)
            row["no_skip"] = d2
            winner_ms = d2["candidates"].get(d2["backend"], {}).get("time_ms")
            checks = {}
            for name in row["skipped"]:
                c2 = d2["candidates"].get(name, {})
                t = c2.get("time_ms")
                checks[name] = {"no_skip_status": c2.get("status"), "no_skip_ms": t,
                                "vs_winner": (t / winner_ms) if t and winner_ms else None,
                                "would_have_won": d2["backend"] == name}
            row["skip_checks"] = checks
        rows.append(row)
        print(f"{shape['name']}: {d['backend']} tuning {d['tuning_seconds']:.3f}s (compile {d['compile_seconds']:.3f}s, "
              f"rest {excl:.3f}s / limit {limit:.3f}s), skipped {sorted(row['skipped'])}", flush=True)
        del q, k, v
        if device.type == "cuda":
            torch.cuda.empty_cache()
    wrong = [(r["name"], n) for r in rows for n, c in r.get("skip_checks", {}).items() if c["would_have_won"]]
    result = {"environment": environment(device), "kind": "tuning-cost", "budget_floor_s": floor, "problems": rows,
              "all_within_budget": all(r["within_budget"] for r in rows), "wrong_skips": wrong}
    lines = [f"# Tuning cost: {result['environment']['device']}", "",
             f"{result['environment']['date']}. Budget: max({floor:g} s, 15x the fastest time), compilation (first "
             "calls) excluded. Times in s; predictions and times in ms.", "",
             "| problem | decision | tuning s | compile s | rest s / limit s | skipped (predicted ms; unskipped ms) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        d = r["decision"]
        skipped = "; ".join(
            f"{n} ({c['predicted_ms'] if c['predicted_ms'] is None else round(c['predicted_ms'], 4)}; "
            f"{r.get('skip_checks', {}).get(n, {}).get('no_skip_ms') or '-'})" for n, c in r["skipped"].items()) or "-"
        flag = "" if r["within_budget"] else " **over**"
        lines.append(f"| {r['name']} | {d['backend']} | {d['tuning_seconds']:.3f} | {d['compile_seconds']:.3f} | "
                     f"{r['excl_compile_s']:.3f} / {r['limit_s']:.3f}{flag} | {skipped} |")
    lines += ["", f"Within the budget on every problem: {'yes' if result['all_within_budget'] else '**no**'}. "
              f"Skips that would have won: {wrong or 'none'}.", "", "## Candidates (predicted ms / measured ms / status)", ""]
    for r in rows:
        lines.append(f"- {r['name']}: " + "; ".join(
            f"{n} {fmt(c['predicted_ms'])}/{fmt(c['time_ms'])}/{c['status']}"
            for n, c in r["decision"]["candidates"].items()))
    write(result, lines, out_dir, stem or f"{device_label(device)}-{datetime.date.today().isoformat()}-tuning-cost")
    return result


# -- first calls (issue 15, items 3-4) ---------------------------------------------------------------------------
def first_calls(shapes: list, device, out_dir: Path, warm_cli: bool = True, stem=None) -> dict:
    from harness.bench import FA4_CACHE_DIR, FA4_CACHE_ENABLED

    for name in (FA4_CACHE_ENABLED, FA4_CACHE_DIR):
        os.environ.pop(name, None)  # the library's own setting is what is measured
    path = shapes_file(shapes)
    cache = tempfile.mkdtemp(prefix="da-first-call-")
    dev = ["--device", str(device)]
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], env=child_env(cache), check=True)
    startup_torch = time.perf_counter() - t0
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, diffsynth_attention"], env=child_env(cache), check=True)
    startup_lib = time.perf_counter() - t0
    cold = run_child(["_first_calls", *dev, "--shapes", path], cache)
    compile_dir = Path(cache) / "fa4-compile"
    compiled_files = sum(len(f) for _, _, f in os.walk(compile_dir)) if compile_dir.is_dir() else 0
    saved = Path(tempfile.mkdtemp(prefix="da-fa4-saved-")) / "fa4-compile"
    if compile_dir.is_dir():
        shutil.copytree(compile_dir, saved)
        shutil.rmtree(compile_dir)
    decisions_only = run_child(["_first_calls", *dev, "--shapes", path], cache)
    if saved.is_dir():
        shutil.rmtree(compile_dir, ignore_errors=True)
        shutil.copytree(saved, compile_dir)
    warm = run_child(["_first_calls", *dev, "--shapes", path], cache)
    not_fa4 = [s for s, r in zip(shapes, warm["problems"]) if r["backend"] != "flash_attention_4"]
    first_result = None
    if not_fa4:
        first_result = run_child(["_first_result", *dev, "--shapes", shapes_file(not_fa4[:1])], cache)
    warm_again = None
    if warm_cli:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "diffsynth_attention", "warm", "--shapes", path, "--device", str(device)],
                              env=child_env(cache), capture_output=True, text=True)
        warm_again = {"seconds": time.perf_counter() - t0, "returncode": proc.returncode, "stderr_tail": proc.stderr[-500:]}
    rows = []
    for c, d, w in zip(cold["problems"], decisions_only["problems"], warm["problems"]):
        rows.append({"name": c["name"], "backend": w["backend"], "cold_s": c["first_call_s"], "tuning_s": c.get("tuning_seconds"),
                     "compile_s": c.get("compile_seconds"), "decisions_cached_compile_cold_s": d["first_call_s"],
                     "both_warm_s": w["first_call_s"], "source_warm": w["source"]})
    fa4 = [r for r in rows if r["backend"] == "flash_attention_4"]
    result = {"environment": environment(device), "kind": "first-call", "startup_import_torch_s": startup_torch,
              "startup_import_torch_and_library_s": startup_lib, "fa4_compiled_files": compiled_files, "problems": rows,
              "first_result": first_result, "warm_again": warm_again,
              "targets": {
                  "first call of a FlashAttention-4 problem, compile cache warm, <= 0.5 s":
                      {"met": all(r["both_warm_s"] <= 0.5 for r in fa4) if fa4 else None,
                       "value": max((r["both_warm_s"] for r in fa4), default=None)},
                  "first result <= 0.5 s after import torch (decisions cached, not FlashAttention-4)":
                      {"met": None if first_result is None else first_result["seconds_after_import_torch"] <= 0.5,
                       "value": None if first_result is None else first_result["seconds_after_import_torch"]},
                  "second warm <= start-up + 2 s":
                      {"met": None if warm_again is None else warm_again["seconds"] <= startup_lib + 2.0,
                       "value": None if warm_again is None else warm_again["seconds"]}}}
    lines = [f"# First calls: {result['environment']['device']}", "",
             f"{result['environment']['date']}. Fresh processes over one cache folder; seconds. Start-up: `import torch` "
             f"{startup_torch:.2f} s, `import torch, diffsynth_attention` {startup_lib:.2f} s. FlashAttention-4 compile "
             f"cache after the first process: {compiled_files} files.", "",
             "| problem | decision | empty cache (tuning s, compile s) | decisions cached, compile cache cold | both warm |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['backend']} | {r['cold_s']:.3f} ({r['tuning_s'] or 0:.3f}, {r['compile_s'] or 0:.3f}) | "
                     f"{r['decisions_cached_compile_cold_s']:.3f} | {r['both_warm_s']:.3f} |")
    if first_result:
        lines += ["", f"Time to the first result after `import torch`, decisions cached ({first_result['name']}, "
                  f"{first_result['backend']}, source {first_result['source']}): **{first_result['seconds_after_import_torch']:.3f} s**; "
                  f"kernel packages imported: {first_result['kernel_modules_imported'] or 'none'}."]
    if warm_again:
        lines += ["", f"`diffsynth-attention warm` again with both caches warm: **{warm_again['seconds']:.2f} s** "
                  f"(start-up {startup_lib:.2f} s; exit {warm_again['returncode']})."]
    lines += ["", "| target | met | value |", "|---|---|---|"]
    for name, t in result["targets"].items():
        lines.append(f"| {name} | {t['met']} | {t['value']} |")
    write(result, lines, out_dir, stem or f"{device_label(device)}-{datetime.date.today().isoformat()}-tuning-first-call")
    shutil.rmtree(cache, ignore_errors=True)
    return result


# -- neighbours (issue 15, item 5) ---------------------------------------------------------------------------------
def neighbours(shapes: list, device, out_dir: Path, offsets=OFFSETS, samples: int = 11, stem=None) -> dict:
    from harness.bench import BUCKETS_PER_OCTAVE, backend_call, neighbour_distance

    torch = _torch()
    disp = fresh_dispatcher()
    rows = []
    for shape in shapes:
        q, k, v, kw = inputs(shape, device)
        with torch.no_grad():
            base = disp.explain(q, k, v, **kw)
        del q, k, v
        self_attention = shape["seq_q"] == shape["seq_kv"]
        for off in offsets:
            sq = max(1, round(shape["seq_q"] * (1 + off)))
            skv = sq if self_attention else shape["seq_kv"]
            variant = {**shape, "name": f"{shape['name']}{off:+.0%}", "seq_q": sq, "seq_kv": skv}
            q, k, v, kw = inputs(variant, device, seed=1)
            with torch.no_grad():
                tuned = disp.explain(q, k, v, **kw)
            in_bucket = neighbour_distance(tuned.key, base.key) is not None
            row = {"problem": shape["name"], "offset": off, "seq_q": sq, "seq_kv": skv, "in_bucket": in_bucket,
                   "tuned": tuned.backend, "neighbour": base.backend, "agree": tuned.backend == base.backend}
            if not row["agree"]:
                methods = {n: fn for n in (tuned.backend, base.backend) if (fn := backend_call(n, q, k, v, **kw)) is not None}
                if len(methods) == 2:
                    times = interleaved(methods, device, samples)
                    row["times_ms"] = times
                    row["slowdown"] = times[base.backend] / times[tuned.backend]
            rows.append(row)
            print(f"{variant['name']}: tuned {tuned.backend}, neighbour {base.backend}, bucket {in_bucket}"
                  + (f", slowdown {row['slowdown']:.3f}" if "slowdown" in row else ""), flush=True)
            del q, k, v
            if device.type == "cuda":
                torch.cuda.empty_cache()
    summary = {}
    for off in offsets:
        sel = [r for r in rows if r["offset"] == off]
        slow = [r.get("slowdown", 1.0) for r in sel]
        summary[f"{off:+.0%}"] = {"n": len(sel), "agree": sum(r["agree"] for r in sel), "in_bucket": sum(r["in_bucket"] for r in sel),
                                  "max_slowdown": max(slow) if slow else None,
                                  "mean_slowdown": statistics.mean(slow) if slow else None}
    in_bucket = [r for r in rows if r["in_bucket"]]
    result = {"environment": environment(device), "kind": "neighbours", "buckets_per_octave": BUCKETS_PER_OCTAVE,
              "rows": rows, "summary": summary,
              "in_bucket": {"n": len(in_bucket), "agree": sum(r["agree"] for r in in_bucket),
                            "max_slowdown": max((r.get("slowdown", 1.0) for r in in_bucket), default=None)}}
    lines = [f"# Neighbours: {result['environment']['device']}", "",
             f"{result['environment']['date']}. Sequence lengths swept around each problem (s_q, and s_kv for self-attention); "
             f"`nearest` serves the problem's own decision when the new length falls in its bucket "
             f"({BUCKETS_PER_OCTAVE} per octave). Slowdown: the neighbour's backend over the tuned one, measured directly.", "",
             "| offset | problems | same backend as tuning | in the bucket | worst slowdown | mean slowdown |", "|---|---|---|---|---|---|"]
    for off, s in summary.items():
        lines.append(f"| {off} | {s['n']} | {s['agree']} | {s['in_bucket']} | "
                     f"{fmt(s['max_slowdown'], '.3f')} | {fmt(s['mean_slowdown'], '.3f')} |")
    ib = result["in_bucket"]
    lines += ["", f"Within the bucket (what `nearest` serves): {ib['agree']}/{ib['n']} agree with tuning; worst slowdown "
              f"{ib['max_slowdown'] if ib['max_slowdown'] is None else round(ib['max_slowdown'], 3)}.", "",
              "| problem | offset | s_q x s_kv | in bucket | tuned | neighbour | slowdown |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['problem']} | {r['offset']:+.0%} | {r['seq_q']}x{r['seq_kv']} | {r['in_bucket']} | {r['tuned']} | "
                     f"{r['neighbour']} | {r.get('slowdown', 1.0):.3f} |")
    write(result, lines, out_dir, stem or f"{device_label(device)}-{datetime.date.today().isoformat()}-tuning-neighbours")
    return result


# -- command line ----------------------------------------------------------------------------------------------------
def add_problem_args(p) -> None:
    p.add_argument("--device", default=None, help="cuda (default where available) or cpu")
    p.add_argument("--shapes", help="a JSON file of problems (shape-suite format)")
    p.add_argument("--preset", action="append", help="presets as in `diffsynth-attention warm` (default all; cpu on --device cpu)")
    p.add_argument("--only", help="comma-separated problem names")
    p.add_argument("--max-seq", type=int, default=None, help="cut sequence lengths to this (CPU smoke tests)")
    p.add_argument("--max-heads", type=int, default=None, help="cut head counts to this (CPU smoke tests)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--tag", default=None, help="file name stem (default <device>-<date>-tuning-<kind>)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="{repeat,cost,first-call,neighbours}")  # not _*
    p = sub.add_parser("repeat", help="tune every problem in N fresh processes; agreement and worst/best")
    add_problem_args(p)
    p.add_argument("--n", type=int, default=5)
    p.add_argument("--samples", type=int, default=15)
    p.add_argument("--no-extra", action="store_true", help="leave out the problems the suite lacks (REPEAT_EXTRA)")
    p.add_argument("--new", action="store_true", help="add issue 29's 8 new problems (REPEAT_NEW)")
    p.add_argument("--own-samples", type=int, default=7,
                   help="samples of each backend timed in every tuning process right after it tunes (0: none)")
    p.add_argument("--runs", default=None, help="a JSON file that keeps the tuning processes' results: a run given "
                   "it again tunes only the processes still missing, then scores")
    p = sub.add_parser("cost", help="tuning cost per problem, skipped candidates and their predictions")
    add_problem_args(p)
    p.add_argument("--no-compare", action="store_true", help="skip the second tuning with skipping off")
    p.add_argument("--extra", action="store_true", help="add the issue's wan14b_720p_self (75,600 tokens, 40 heads)")
    p = sub.add_parser("first-call", help="first calls with the FlashAttention-4 compile cache cold and warm")
    add_problem_args(p)
    p.add_argument("--no-warm-cli", action="store_true", help="skip timing `diffsynth-attention warm` again")
    p = sub.add_parser("neighbours", help="the neighbour agreement table over swept sequence lengths")
    add_problem_args(p)
    p.add_argument("--offsets", default=",".join(f"{o:g}" for o in OFFSETS))
    for hidden in ("_tune", "_first_calls", "_first_result"):
        p = sub.add_parser(hidden)
        p.add_argument("--device", required=True)
        p.add_argument("--shapes", required=True)
        p.add_argument("--result", required=True)
        p.add_argument("--own-samples", type=int, default=0)
    args = parser.parse_args(argv)
    if args.cmd.startswith("_"):
        child = {"_tune": child_tune, "_first_calls": child_first_calls, "_first_result": child_first_result}[args.cmd]
        Path(args.result).write_text(json.dumps(child(args), default=str))
        return 0
    torch = _torch()
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    os.environ.setdefault("DIFFSYNTH_ATTENTION_CACHE_DIR", tempfile.mkdtemp(prefix="da-tuning-report-"))  # never the user's
    shapes = problems(args)
    out = Path(args.out)
    if args.cmd == "repeat":
        repeat_tuning(shapes, device, args.n, out, args.samples, args.tag, args.own_samples, args.runs)
    elif args.cmd == "cost":
        tuning_cost(shapes, device, out, not args.no_compare, args.tag)
    elif args.cmd == "first-call":
        first_calls(shapes, device, out, not args.no_warm_cli, args.tag)
    elif args.cmd == "neighbours":
        neighbours(shapes, device, out, tuple(float(o) for o in args.offsets.split(",")), stem=args.tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
