"""The repeatability report of ``scripts/tuning_report.py repeat`` (issue 14 item 2, issue 21 item 6).

Every problem is tuned in N fresh processes, each with an empty cache folder of its own. Then,
in one process, **every backend** that can serve the problem here is timed directly: installed,
declared capable, predicted to fit in the free memory and passing the numeric gate on the same
inputs (a backend the tuner skipped on its cost model is timed too: a wrong skip shows). Per
problem: how often the decisions agree (a decision within the tie cap, 3%, of the most frequent
one's time counts as agreeing), and the worst decision over the best backend timed directly
(target <= 1.03).

Beyond the shape suite, ``EXTRA`` adds problems it lacks (head dims 80 and 96, an odd length,
fp16, grouped-query causal, a batch of 64 short sequences, one query token); on a CPU they are
cut to CPU size, and ``CPU_EXTRA`` adds the issue's CPU problem (1, 3, 41, 16) fp32.
"""

from __future__ import annotations

import datetime
import shutil
import tempfile
from pathlib import Path

# Problems the suite (diffsynth_attention/data/diffsynth_shapes.json) lacks; layout b n s d.
EXTRA = [
    {"name": "hd80_sd15_1024", "model": "head dim 80: SD 1.5 at 1024x1024, second UNet level (640 channels / 8 heads)",
     "batch": 2, "heads_q": 8, "heads_kv": 8, "seq_q": 4096, "seq_kv": 4096, "head_dim": 80, "causal": False,
     "dtype": "float16"},
    {"name": "hd96_4096", "model": "head dim 96: the issue's problem (1x16 heads, 4,096 tokens)", "batch": 1,
     "heads_q": 16, "heads_kv": 16, "seq_q": 4096, "seq_kv": 4096, "head_dim": 96, "causal": False, "dtype": "bfloat16"},
    {"name": "odd_4097", "model": "an odd length: 4,097 tokens (4,096 image + 1)", "batch": 1, "heads_q": 24,
     "heads_kv": 24, "seq_q": 4097, "seq_kv": 4097, "head_dim": 128, "causal": False, "dtype": "bfloat16"},
    {"name": "flux_1024_fp16", "model": "FLUX.1 1024x1024 in fp16", "batch": 1, "heads_q": 24, "heads_kv": 24,
     "seq_q": 4608, "seq_kv": 4608, "head_dim": 128, "causal": False, "dtype": "float16"},
    {"name": "gqa_causal_qwen7b", "model": "grouped-query causal: Qwen2.5-7B text encoder (28 q / 4 kv heads), 2k tokens",
     "batch": 1, "heads_q": 28, "heads_kv": 4, "seq_q": 2048, "seq_kv": 2048, "head_dim": 128, "causal": True,
     "dtype": "bfloat16"},
    {"name": "batch64_short", "model": "a batch of 64 short sequences (CLIP-like text encoder, 77 tokens)", "batch": 64,
     "heads_q": 12, "heads_kv": 12, "seq_q": 77, "seq_kv": 77, "head_dim": 64, "causal": False, "dtype": "bfloat16"},
    {"name": "tiny_1tok", "model": "one query token over 4,096 keys", "batch": 1, "heads_q": 16, "heads_kv": 16,
     "seq_q": 1, "seq_kv": 4096, "head_dim": 128, "causal": False, "dtype": "bfloat16"},
]
CPU_EXTRA = [{"name": "issue21_cpu", "model": "the issue's CPU problem: randn(1, 3, 41, 16) fp32", "batch": 1, "heads_q": 3,
              "heads_kv": 3, "seq_q": 41, "seq_kv": 41, "head_dim": 16, "causal": False, "dtype": "float32"}]


def extra_problems(device) -> list:
    """EXTRA (cut to CPU size on a CPU, plus CPU_EXTRA)."""
    if device.type != "cpu":
        return [dict(s) for s in EXTRA]
    from diffsynth_attention.tools.shapes import scale_for_cpu

    return [dict(s) for s in CPU_EXTRA] + [scale_for_cpu(s) for s in EXTRA]


def servable(shape, q, k, v, kw, device) -> tuple:
    """({name: fn} every backend that can serve the problem here and passes the gate on these
    inputs, {name: why not} for the others)."""
    import torch

    import tuning_report as tr
    from diffsynth_attention.backends import REGISTRY, device_info
    from diffsynth_attention.problem import prepare
    from diffsynth_attention.tuning.policy import DEFAULT_POLICY
    from diffsynth_attention.tuning.reference import gate_heads, reference_slice, relative_l1
    from diffsynth_attention.tuning.trial import free_memory

    causal, window = kw.get("is_causal", False), kw.get("window_size")
    call, *_ = prepare(q, k, v, "b n s d", "b n s d", "b n s d", "b n s d", None, None, None, causal, window, False)
    problem, dev = call.problem, device_info(device)
    tolerance = DEFAULT_POLICY.tolerance(problem.dtype_name, device.type)
    heads = gate_heads(problem.heads_q)
    with torch.no_grad():
        ref = reference_slice(q, k, v, None, None, causal, window, heads)
    free = free_memory(device)
    methods, why = {}, {}
    for name, backend in REGISTRY.items():
        reasons = backend.not_supported_reasons(problem, dev)
        if reasons:
            why[name] = "; ".join(reasons)
            continue
        if free is not None and backend.predicted_bytes(problem) > free:
            why[name] = "predicted not to fit in the free memory"
            continue
        fn = tr.runner(name, q, k, v, kw)
        if fn is None:
            why[name] = backend.unavailable_reason() or "unavailable"
            continue
        try:
            with torch.no_grad():
                error = relative_l1(fn()[0, heads], ref)
        except Exception as exc:  # an out-of-memory error, a kernel that refuses the shape
            why[name] = f"raised {type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
            tr.sync(device)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        if not error <= tolerance:
            why[name] = f"error {error:.3g} above tolerance {tolerance:g}"
            continue
        methods[name] = fn
    return methods, why


def repeat_tuning(shapes: list, device, n: int, out_dir: Path, samples: int = 15, stem=None) -> dict:
    import tuning_report as tr
    from diffsynth_attention.tuning.policy import DEFAULT_POLICY

    torch = tr._torch()
    path = tr.shapes_file(shapes)
    runs = []
    for i in range(n):
        cache = tempfile.mkdtemp(prefix=f"da-repeat-{i}-")
        runs.append(tr.run_child(["_tune", "--device", str(device), "--shapes", path], cache))
        shutil.rmtree(cache, ignore_errors=True)
        print(f"run {i + 1}/{n}: " + ", ".join(f"{r['name']}={r['backend']}" for r in runs[-1]["problems"]), flush=True)
    rows = []
    for j, shape in enumerate(shapes):
        decided = [r["problems"][j]["backend"] for r in runs]
        q, k, v, kw = tr.inputs(shape, device)
        methods, not_timed = servable(shape, q, k, v, kw, device)
        for name in set(decided) - set(methods):  # a decision this process cannot reproduce: time it anyway
            fn = tr.runner(name, q, k, v, kw)
            if fn is not None:
                methods[name] = fn
        times = tr.interleaved(methods, device, samples)
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
                     "tuning_seconds": [r["problems"][j].get("tuning_seconds") for r in runs],
                     "compile_seconds": [r["problems"][j].get("compile_seconds") for r in runs],
                     "candidates": [r["problems"][j].get("candidates", {}) for r in runs]})
    return write(rows, device, n, samples, out_dir, stem)


def write(rows: list, device, n: int, samples: int, out_dir: Path, stem=None) -> dict:
    import tuning_report as tr

    extra = {s["name"] for s in EXTRA + CPU_EXTRA} | {s["name"] + "@cpu" for s in EXTRA}
    result = {"environment": tr.environment(device), "kind": "repeat-tuning", "runs": n, "samples": samples, "problems": rows,
              "target": "worst of the fresh decisions within 3% of the best backend timed directly, on every problem",
              "met": all(r["worst_vs_best"] <= 1.03 for r in rows),
              "agree_all": sum(r["agree"] == r["runs"] for r in rows)}
    env = result["environment"]
    lines = [f"# Repeatability of tuning: {env['device']}", "",
             f"{env['date']}; torch {env['torch']}; {n} fresh processes, each with an empty cache; then every backend that "
             f"can serve the problem and passes the gate timed directly, interleaved, median of {samples} samples (ms). "
             "A decision within 3% of the most frequent one counts as agreeing (a tie). Problems marked + are not in the "
             "shape suite.", "",
             "| problem | decisions (count, ms) | agree | best backend (ms) | worst decision / best |", "|---|---|---|---|---|"]
    for r in rows:
        counts = ", ".join(f"{b} x{c} ({r['times_ms'].get(b, float('nan')):.4f})" for b, c in r["counts"].items())
        flag = "**" if r["worst_vs_best"] > 1.03 else ""
        mark = " +" if r["name"] in extra else ""
        lines.append(f"| {r['name']}{mark} | {counts} | {r['agree']}/{r['runs']} | {r['best']} ({r['best_ms']:.4f}) | "
                     f"{flag}{r['worst_vs_best']:.3f}{flag} |")
    lines += ["", f"Target (worst of {n} within 3% of the best on every problem): {'met' if result['met'] else '**not met**'}; "
              f"{result['agree_all']} of {len(rows)} problems agree {n}/{n}.", "", "## Every backend timed directly (ms)", ""]
    for r in rows:
        timed = ", ".join(f"{b} {t:.4f}" for b, t in sorted(r["times_ms"].items(), key=lambda x: x[1]))
        lines.append(f"- {r['name']}: {timed}")
    stem = stem or f"{tr.device_label(device)}-{datetime.date.today().isoformat()}-tuning-repeat"
    tr.write(result, lines, out_dir, stem)
    return result
