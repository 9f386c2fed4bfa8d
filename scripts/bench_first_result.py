#!/usr/bin/env python3
"""Issue 24: the time from process start to the first attention result, plain SDPA against the
dispatcher with the decision already cached, in fresh processes.

For each kernel package a decision can name (FlashAttention-3, FlashAttention-4) on the problem
the issue measured it with, and for a baseline problem decided as tuning decides it:

1. a seeding process tunes the problem in a fresh cache folder and, for a package row, makes
   the decision name that package (its candidate must have passed the accuracy gate; its measured
   time is kept). FlashAttention-4 compiles its kernel there, into the folder's compile cache, as
   a real first process would;
2. fresh processes, alternating: plain SDPA (``F.scaled_dot_product_attention`` on ``b s n d``
   transposed, what DiffSynth-Studio does without a kernel package), the dispatcher with the
   preload on (the default), and the dispatcher with ``DIFFSYNTH_ATTENTION_PRELOAD=0``. Each
   reports the seconds from its start (the parent's clock before spawning it) to the first
   result (synchronised), what served the first call, whether ``torch._dynamo`` was imported
   by then, then keeps calling until the decided backend serves (the call index and time of the
   takeover; outputs before and after compared);
3. per package, an import breakdown: ``import torch``, CUDA start, the package's import (the
   modules that took longest, from ``-X importtime``), its first and second launch;
4. ``warm --preset all`` run twice in a fresh cache folder: the second run, every decision
   cached, against the start-up of a process that imports torch and starts the device
   (``--no-warm`` skips it).

Writes ``<out>/<device>-<date>-first-result.{json,md}``. Without a GPU (or a package) the rows
say why they were skipped; ``--device cpu`` runs the baseline on a CPU-sized problem.
5. with ``--window-seconds S`` (default 20): after its first result each process keeps calling
   for S seconds, every call synchronised, and reports the calls above 5x its median (issue 31:
   no stall after the first result while a package loads and takes over), with their
   distribution (scripts/harness/stalls.py): percentiles, counts above 2/5/10/100x and
   above the median + 0.1/1/10 ms, when they came, how many while the decided backend was still
   loading and how many after, and the garbage collections in the window.

Usage: PYTHONPATH=$PWD python scripts/bench_first_result.py --out benchmarks/results [--runs 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET_S = 0.3  # the first result within 0.3 s of plain SDPA's
LAYOUT = "b s n d"
ROWS = [  # (row, backend the decision names or None for tuning's own choice, module, problem)
    ("flash_attention_3", "flash_attention_3", "flash_attn_interface",
     {"batch": 1, "heads": 24, "seq": 4608, "head_dim": 128, "dtype": "bfloat16"}),
    ("flash_attention_4", "flash_attention_4", "flash_attn.cute",
     {"batch": 2, "heads": 16, "seq": 4096, "head_dim": 80, "dtype": "bfloat16"}),
    ("baseline", None, None, {"batch": 1, "heads": 24, "seq": 4608, "head_dim": 128, "dtype": "bfloat16"}),
]
CPU_PROBLEM = {"batch": 1, "heads": 2, "seq": 128, "head_dim": 32, "dtype": "float32"}


# -- children ------------------------------------------------------------------------------------------
def _since_start() -> float:
    return time.time() - float(os.environ["BENCH_T0"])


def _inputs(torch, p: dict, device: str):
    g = torch.Generator(device=device).manual_seed(0)
    shape = (p["batch"], p["seq"], p["heads"], p["head_dim"])  # b s n d
    dt = getattr(torch, p["dtype"])
    return [torch.randn(shape, device=device, dtype=dt, generator=g) for _ in range(3)]


def _sync(torch, device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def child_seed(p: dict, device: str, target) -> dict:
    import torch

    import diffsynth_attention as da
    from harness.bench import default_dispatcher

    q, k, v = _inputs(torch, p, device)
    pats = dict(q_pattern=LAYOUT, k_pattern=LAYOUT, v_pattern=LAYOUT, out_pattern=LAYOUT)
    with torch.no_grad():
        info = da.explain(q, k, v, **pats)
    store = default_dispatcher().store
    decision = store.get(info.key_id)
    tuned = decision.backend
    if target is not None and target != tuned:
        cand = decision.candidates.get(target)
        if cand is None or cand.status not in ("chosen", "accepted", "slower"):
            why = "not a candidate" if cand is None else f"{cand.status}: {cand.reason}"
            return {"error": f"{target} cannot be decided for this problem ({why})"}
        candidates = {n: dataclasses.replace(c, status="accepted") if c.status == "chosen" else c
                      for n, c in decision.candidates.items()}  # decisions are frozen: a new one
        candidates[target] = dataclasses.replace(cand, status="chosen", reason="seeded by bench_first_result.py")
        decision = decision.replace(backend=target, candidates=candidates)
        store.put(decision)
    store.flush()
    return {"key_id": info.key_id, "tuned": tuned, "decided": decision.backend}


STALL_FACTOR = 5.0  # target: in the first window of calls, none after the first above 5x the median (harness/stalls.py)


def child_first(p: dict, device: str, mode: str, max_s: float, window_s: float = 0.0) -> dict:
    import torch

    started = _since_start()
    if mode == "sdpa":
        import torch.nn.functional as F

        q, k, v = _inputs(torch, p, device)

        def sdpa():
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        with torch.no_grad():
            sdpa()
            _sync(torch, device)
            result = {"first_s": _since_start(), "torch_imported_s": started, "backend": "sdpa",
                      "dynamo": "torch._dynamo" in sys.modules}
            if window_s:
                from harness.stalls import call_window

                result["window"] = call_window(sdpa, lambda: _sync(torch, device), window_s)
        return result
    import diffsynth_attention as da

    pats = dict(q_pattern=LAYOUT, k_pattern=LAYOUT, v_pattern=LAYOUT, out_pattern=LAYOUT)
    q, k, v = _inputs(torch, p, device)
    with torch.no_grad():
        first = da.attention_forward(q, k, v, **pats)
        _sync(torch, device)
        result = {"first_s": _since_start(), "torch_imported_s": started, "dynamo": "torch._dynamo" in sys.modules}
        info = da.explain(q, k, v, **pats)  # the plan of the next call, and the decided backend
        if window_s:  # the first seconds of calls, as a pipeline makes them (the takeover happens in here)
            from harness.stalls import call_window, load_done

            decided = info.decision.backend if info.decision is not None else info.backend
            loaded = load_done(decided)
            result.update(second_call_plan=f"{info.backend} ({info.source})", loaded_at_first_result=loaded())
            result["window"] = call_window(lambda: da.attention_forward(q, k, v, **pats), lambda: _sync(torch, device),
                                           window_s, loaded)
            result["dynamo_after_window"] = "torch._dynamo" in sys.modules
            info = da.explain(q, k, v, **pats)
        decided = info.decision.backend if info.decision is not None else info.backend
        result.update(backend=info.backend, source=info.source, decided=decided, reason=info.reason)
        # ``info`` is the plan for the next call: a call made on it is served by its backend.
        calls, deadline = 1, time.perf_counter() + max_s
        takeover = 1 if info.source != "loading" else None  # (a load ending just after call 1 counts as 1)
        while takeover is None and time.perf_counter() < deadline:
            out = da.attention_forward(q, k, v, **pats)
            _sync(torch, device)
            calls += 1
            if info.backend == decided:
                takeover = calls
                diff = (out.float() - first.float()).abs().max().item()
                scale = first.float().abs().max().item() or 1.0
                result.update(max_abs_diff=diff, max_rel_diff=diff / scale)
            else:
                info = da.explain(q, k, v, **pats)
        result.update(takeover_call=takeover, takeover_s=_since_start() if takeover else None, calls=calls)
    return result


def child_import(p: dict, device: str, module: str) -> dict:
    import importlib

    import torch

    out = {"torch_s": _since_start()}
    q, k, v = _inputs(torch, p, device)
    _sync(torch, device)
    out["cuda_ready_s"] = _since_start()
    if module == "flash_attn.cute":
        from harness.bench import enable_fa4_compile_cache

        enable_fa4_compile_cache()  # as the backend does: the seeding process's compilations
    print("@@import-start", file=sys.stderr, flush=True)
    t = time.perf_counter()
    mod = importlib.import_module(module)
    out["import_s"] = time.perf_counter() - t
    print("@@import-end", file=sys.stderr, flush=True)
    out["dynamo_after_import"] = "torch._dynamo" in sys.modules
    fn = mod.flash_attn_func
    for name in ("first_launch_s", "second_launch_s"):
        t = time.perf_counter()
        with torch.no_grad():
            fn(q, k, v)
        _sync(torch, device)
        out[name] = time.perf_counter() - t
    return out


# -- the parent ----------------------------------------------------------------------------------------
def spawn(args: list, env: dict, importtime: bool = False, timeout: float = 300) -> tuple:
    cmd = [sys.executable] + (["-X", "importtime"] if importtime else []) + [__file__] + args
    env = dict(env, BENCH_T0=repr(time.time()))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    lines = proc.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1])
    except (IndexError, ValueError):
        result = {"error": f"rc {proc.returncode}: {proc.stderr.strip().splitlines()[-1:] or ['no output']}"}
    return result, proc.stderr


def import_breakdown(stderr: str, top: int = 12) -> list:
    """The slowest modules (cumulative us) imported between the child's markers."""
    inside, rows = False, []
    for line in stderr.splitlines():
        if line.startswith("@@import-start"):
            inside = True
        elif line.startswith("@@import-end"):
            break
        elif inside and line.startswith("import time:") and "|" in line:
            parts = [x.strip() for x in line[len("import time:"):].split("|")]
            if len(parts) == 3 and parts[1].isdigit():
                rows.append((int(parts[1]), parts[2].strip()))
    rows.sort(reverse=True)
    return [{"module": name, "cumulative_s": us / 1e6} for us, name in rows[:top]]


def summary(values: list) -> dict:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def run_row(row, target, module, problem, device, runs, max_s, base_env, unusable, window_s: float = 0.0) -> dict:
    out = {"row": row, "decided_for": target, "problem": problem, "layout": LAYOUT}
    if target is not None and unusable.get(target):
        out["skipped"] = unusable[target]
        return out
    folder = tempfile.mkdtemp(prefix="first-result-")
    env = dict(base_env, DIFFSYNTH_ATTENTION_CACHE_DIR=folder)
    seed, _ = spawn(["--child", "seed", json.dumps(problem), device, target or ""], dict(env, DIFFSYNTH_ATTENTION_PRELOAD="0"))
    out["seed"] = seed
    if "error" in seed:
        out["skipped"] = seed["error"]
        return out
    variants = {"sdpa": {}, "dispatcher": {"DIFFSYNTH_ATTENTION_PRELOAD": "1"},
                "dispatcher_no_preload": {"DIFFSYNTH_ATTENTION_PRELOAD": "0"}}
    samples = {name: [] for name in variants}
    for _ in range(runs):  # interleaved: drift (page cache, clocks) hits every variant alike
        for name, extra in variants.items():
            mode = "sdpa" if name == "sdpa" else "dispatcher"
            res, _ = spawn(["--child", "first", json.dumps(problem), device, mode, str(max_s), str(window_s)],
                           dict(env, **extra))
            samples[name].append(res)
    out["samples"] = samples
    out["first_s"] = {name: summary([r.get("first_s") for r in rs]) for name, rs in samples.items()}
    if window_s:  # per variant: the most stalls of a process, and the worst call against its median
        out["window"] = {name: {"stalls_max": max((r.get("window", {}).get("stalls", 0) for r in rs), default=None),
                                "max_over_median": max((r.get("window", {}).get("max_over_median") or 0 for r in rs),
                                                       default=None),
                                "median_ms": summary([r.get("window", {}).get("median_ms") for r in rs])}
                         for name, rs in samples.items()}
        out["window_target_met"] = out["window"]["dispatcher"]["stalls_max"] == 0
    sdpa = out["first_s"]["sdpa"]["median"]
    for name in ("dispatcher", "dispatcher_no_preload"):
        med = out["first_s"][name]["median"]
        out[f"{name}_minus_sdpa_s"] = None if med is None or sdpa is None else med - sdpa
        out[f"{name}_takeover_call"] = summary([r.get("takeover_call") for r in samples[name]])
        out[f"{name}_takeover_s"] = summary([r.get("takeover_s") for r in samples[name]])
        out[f"{name}_served_first_by"] = sorted({f"{r.get('backend')} ({r.get('source')})" for r in samples[name]})
        out[f"{name}_max_rel_diff"] = max((r.get("max_rel_diff") or 0.0 for r in samples[name]), default=None)
        out[f"{name}_dynamo_at_first_result"] = any(r.get("dynamo") for r in samples[name])
    delta = out["dispatcher_minus_sdpa_s"]
    out["target_met"] = None if delta is None else delta <= TARGET_S
    if module is not None:
        res, err = spawn(["--child", "import", json.dumps(problem), device, module], env, importtime=True)
        res["slowest_modules"] = import_breakdown(err)
        out["import_breakdown"] = res
    return out


def timed(cmd: list, env: dict, timeout: float = 600) -> dict:
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    out = {"wall_s": time.perf_counter() - t, "rc": proc.returncode}
    if proc.returncode:
        out["stderr_tail"] = proc.stderr.strip().splitlines()[-3:]
    return out


def warm_again(device: str, base_env: dict, runs: int) -> dict:
    """``warm --preset all`` twice in a fresh cache folder: the second one finds every decision
    cached (target: at most the process start-up plus 2 s). Start-up: a process that imports torch
    and starts the device."""
    env = dict(base_env, DIFFSYNTH_ATTENTION_CACHE_DIR=tempfile.mkdtemp(prefix="first-result-warm-"))
    warm = [sys.executable, "-m", "diffsynth_attention", "warm", "--preset", "all", "--device", device, "--no-progress",
            "--json"]
    start = [sys.executable, "-c", f"import torch; torch.zeros(1, device={device!r}).sum().item()"]
    out = {"first": timed(warm, env)}
    out["startup"] = [timed(start, env) for _ in range(runs)]
    out["again"] = [timed(warm, env) for _ in range(runs)]
    startup = statistics.median(r["wall_s"] for r in out["startup"])
    again = statistics.median(r["wall_s"] for r in out["again"])
    out.update(startup_s=startup, again_s=again, again_minus_startup_s=again - startup,
               target_met=again - startup <= 2.0 and all(r["rc"] == 0 for r in out["again"]))
    return out


def write_md(result: dict, path: Path) -> None:
    fmt = lambda s: "-" if s is None or s.get("median") is None else f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})"  # noqa: E731
    lines = [f"# First result in a fresh process: {result['environment']['device']}", "",
             "torch {torch}, packages {packages}, {date}".format(**{k: result["environment"].get(k) for k in
                                                                      ("torch", "packages", "date")}), "",
             f"Seconds from process start to the first result, median (min-max) of {result['runs']} processes; "
             f"target: the dispatcher within {TARGET_S} s of plain SDPA.", "",
             "| row | problem | plain SDPA | dispatcher | - SDPA | no preload | takeover call (s) | first served by | met |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        p = r["problem"]
        prob = f"{p['batch']}x{p['heads']}, s={p['seq']}, d={p['head_dim']}"
        if "skipped" in r:
            lines.append(f"| {r['row']} | {prob} | skipped: {r['skipped']} |||||||")
            continue
        f = r["first_s"]
        tc, ts = r["dispatcher_takeover_call"], r["dispatcher_takeover_s"]
        take = "-" if tc["median"] is None else f"{tc['median']:.0f} ({ts['median']:.2f} s)"
        delta = r["dispatcher_minus_sdpa_s"]
        lines.append(f"| {r['row']} | {prob} | {fmt(f['sdpa'])} | {fmt(f['dispatcher'])} | "
                     f"{'-' if delta is None else f'{delta:+.2f}'} | {fmt(f['dispatcher_no_preload'])} | {take} | "
                     f"{', '.join(r['dispatcher_served_first_by'])} | {'yes' if r['target_met'] else 'no'} |")
    if any("window" in r for r in result["rows"]):
        lines += ["", f"## The first {result.get('window_seconds', 20):g} s of calls (every call synchronised)", "",
                  f"Stalls: calls after the first above {STALL_FACTOR:g}x the process's median (most of any process); "
                  "target: none for the dispatcher.", "",
                  "| row | variant | median ms | worst call / median | stalls | met |", "|---|---|---|---|---|---|"]
        for r in result["rows"]:
            for name, w in r.get("window", {}).items():
                met = "" if name != "dispatcher" else ("yes" if r.get("window_target_met") else "no")
                lines.append(f"| {r['row']} | {name} | {fmt(w['median_ms'])} | {w['max_over_median']} | "
                             f"{w['stalls_max']} | {met} |")
        from harness.stalls import distribution_md, loader_md

        lines += ["", "Per process: the distribution of those calls (ms); slow calls while the decided backend was "
                  "still loading (import, first launches) and after; Python garbage collections in the window.", ""]
        lines += distribution_md([(r["row"], name, s.get("window")) for r in result["rows"]
                                  for name, rs in r.get("samples", {}).items() for s in rs])
        lines += [""] + loader_md([(r["row"], name, s.get("window")) for r in result["rows"]
                                   for name, rs in r.get("samples", {}).items() for s in rs])
    lines += ["", "## Where a package's first use goes (one fresh process each)", ""]
    for r in result["rows"]:
        b = r.get("import_breakdown")
        if not b:
            continue
        lines.append(f"- **{r['row']}**: import torch {b.get('torch_s', 0):.2f} s after start; CUDA ready at "
                     f"{b.get('cuda_ready_s', 0):.2f} s; package import {b.get('import_s', 0):.2f} s (torch._dynamo "
                     f"imported by it: {b.get('dynamo_after_import')}); first launch {b.get('first_launch_s', 0):.3f} s, "
                     f"second {b.get('second_launch_s', 0):.4f} s. Slowest modules: "
                     + ", ".join(f"{m['module']} {m['cumulative_s']:.2f} s" for m in b.get("slowest_modules", [])[:6]))
    w = result.get("warm")
    if w:
        lines += ["", "## `warm --preset all` again, every decision cached", "",
                  f"First run (tuning) {w['first']['wall_s']:.1f} s; start-up (import torch, start the device) "
                  f"{w['startup_s']:.2f} s; second run {w['again_s']:.2f} s (median of {len(w['again'])}): start-up "
                  f"{w['again_minus_startup_s']:+.2f} s; target (<= start-up + 2 s) {'met' if w['target_met'] else 'missed'}."]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="folder for <device>-<date>-first-result.{json,md} (required)")
    parser.add_argument("--runs", type=int, default=3, help="fresh processes per variant (default 3)")
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="how long a process calls before giving up on a takeover")
    parser.add_argument("--window-seconds", type=float, default=20.0,
                        help="after the first result, call for this long and report calls above 5x the median (0: off)")
    parser.add_argument("--only", help="comma-separated rows: flash_attention_3, flash_attention_4, baseline (default all)")
    parser.add_argument("--tag", help="file name stem instead of <device>-<date>-first-result")
    parser.add_argument("--no-warm", action="store_true", help="skip timing `warm --preset all` run again")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        mode, problem, device, *rest = args.child
        problem = json.loads(problem)
        if mode == "seed":
            res = child_seed(problem, device, rest[0] or None)
        elif mode == "first":
            res = child_first(problem, device, rest[0], float(rest[1]), float(rest[2]) if len(rest) > 2 else 0.0)
        else:
            res = child_import(problem, device, rest[0])
        print(json.dumps(res))
        return 0
    if not args.out:
        parser.error("--out is required")
    os.environ["DIFFSYNTH_ATTENTION_PRELOAD"] = "0"  # this parent process loads no kernel package
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    sys.path.insert(0, str(ROOT))
    from harness.bench import REGISTRY

    unusable = {name: REGISTRY[name].declared_reason() for name in ("flash_attention_3", "flash_attention_4")}
    if device == "cpu":
        unusable = {name: "no GPU: --device cpu" for name in unusable}
    env = dict(os.environ, DIFFSYNTH_ATTENTION_PRELOAD="1", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.pop("DIFFSYNTH_ATTENTION_IMPLEMENTATION", None)
    from harness.bench import environment, save_result

    result = {"environment": environment(device), "runs": args.runs, "window_seconds": args.window_seconds, "rows": []}
    only = set(args.only.split(",")) if args.only else {r[0] for r in ROWS}
    for row, target, module, problem in (r for r in ROWS if r[0] in only):
        problem = CPU_PROBLEM if device == "cpu" else problem
        result["rows"].append(run_row(row, target, module, problem, device, args.runs, args.max_seconds, env, unusable,
                                      args.window_seconds))
        print(f"{row}: done", file=sys.stderr)
    if not args.no_warm:
        result["warm"] = warm_again(device, env, args.runs)
        print("warm again: done", file=sys.stderr)
    stem = save_result(result, args.out, args.tag, "-first-result", write_md)
    print(f"wrote {stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
