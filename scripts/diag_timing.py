"""Diagnose a tuning decision that a direct benchmark disagrees with (issue 21's hd80 case).

For each problem: tune it in this process (``explain``) and print every candidate's record and
the tuner's listener timings (first call, warm-up, second look, rounds); then time the
decision's backend and the others directly, interleaved (back-to-back calls, as the tuner
does), a single call after a sync, host microseconds per call, and the kernels' own device
time from the profiler. Usage: ``python scripts/diag_timing.py --out DIR [--tag TAG]``.

``--fp8``: where FlashAttention-3 FP8's time goes on Wan 1.3B and Wan 2.2 5B (issue 32: the FP8 call
timed ~0.5-1 ms over its kernel plus its quantisation timed alone): the call, its two parts alone
and called one after the other by hand, each timed with one call a sample and with several, its
host time to issue, the profiler's kernels, and whether it synchronises the host
(``torch.cuda.set_sync_debug_mode``).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

import diffsynth_attention as da
from harness import bench

PROBLEMS = {  # name: (b, heads, seq, head_dim, dtype), layout b n s d
    "hd80_sd15_1024": (2, 8, 4096, 80, torch.float16),
    "hd96_4096": (1, 16, 4096, 96, torch.bfloat16),
}


def kernel_ms(fn, calls: int = 20) -> float:
    """Device time of the kernels one call launches (profiler), ms."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    total = 0.0
    for ev in prof.key_averages():
        total += getattr(ev, "self_device_time_total", getattr(ev, "self_cuda_time_total", 0.0))
    return total / calls / 1e3


def rotation_vs_shuffle(out: dict) -> None:
    """The same FlashAttention-4 call timed twice under two names (fa4_a right after
    torch_efficient, fa4_b right after flash_attention_3 in the rotation), with the order rotated
    (a fixed predecessor) and shuffled every round: Wan 2.1 1.3B 480p self-attention."""
    import statistics

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(1, 12, 32760, 128, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(3))
    fns = {}
    for label, name in (("torch", "torch"), ("torch_efficient", "torch_efficient"), ("fa4_a", "flash_attention_4"),
                        ("flash_attention_3", "flash_attention_3"), ("fa4_b", "flash_attention_4")):
        try:
            fns[label] = bench.direct_call(name, q, k, v)
            fns[label]()
        except Exception as exc:  # unavailable or unsupported: left out of the timing
            fns.pop(label, None)
            out.setdefault("order_skipped", {})[label] = repr(exc)[:200]
    timer = bench.Timer(dev)
    names = list(fns)
    for attempt in range(2):
        for mode in ("rotation", "shuffle"):
            times = {n: [] for n in names}
            with torch.no_grad():
                for i in range(15):
                    order = names[i % len(names):] + names[:i % len(names)] if mode == "rotation" else bench.round_order(names, i)
                    for n in order:
                        times[n].append(timer.sample(fns[n], 1))
            out.setdefault("order", []).append({"mode": mode, "attempt": attempt,
                                                "median_ms": {n: statistics.median(t) for n, t in times.items()}})
            print(mode, attempt, {n: round(statistics.median(t), 4) for n, t in times.items()}, flush=True)


FP8_PROBLEMS = {"wan13b_480p": (1, 32760, 12, 128), "wan22_5b_720p": (1, 27280, 24, 128)}  # b s n d, bf16


def fp8_parts(out: dict) -> None:
    """The FP8 call against its parts (module docstring, ``--fp8``)."""
    dev = torch.device("cuda")
    kw = dict(q_pattern="b s n d", k_pattern="b s n d", v_pattern="b s n d", out_pattern="b s n d")
    fp8 = bench.REGISTRY["flash_attention_3_fp8"]
    for name, shape in FP8_PROBLEMS.items():
        g = torch.Generator(device=dev).manual_seed(0)
        q, k, v = (torch.randn(*shape, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(3))
        row: dict = {"shape_bsnd": shape}
        fns = {n: bench.backend_call(n, q, k, v, **kw) for n in ("flash_attention_4", "flash_attention_3", "flash_attention_3_fp8")}
        fns = {n: f for n, f in fns.items() if f is not None}
        if "flash_attention_3_fp8" not in fns:
            row["skipped"] = fp8.unavailable_reason()
            out.setdefault("fp8", {})[name] = row
            continue
        q8, k8, v8, qd, kd, vd = bench.quantize_fp8(q, k, v)
        fns["kernel_only"] = lambda: fp8._func(q8, k8, v8, causal=False, q_descale=qd, k_descale=kd, v_descale=vd)
        fns["quantize_only"] = lambda: bench.quantize_fp8(q, k, v)

        def by_hand():
            a, b_, c, da_, db, dc = bench.quantize_fp8(q, k, v)
            return fp8._func(a, b_, c, causal=False, q_descale=da_, k_descale=db, v_descale=dc)
        fns["by_hand"] = by_hand
        try:
            _fp8_measure(fns, row, dev)
        except Exception as exc:  # a diagnostic: keep what was measured, say what failed
            row["error"] = repr(exc)[:500]
        out.setdefault("fp8", {})[name] = row
        print(name, json.dumps({k_: v_ for k_, v_ in row.items() if k_ != "fp8_kernels_us"}), flush=True)
        fns.clear()  # the closures hold q, k, v and their FP8 copies until the next problem rebinds them


def _fp8_measure(fns: dict, row: dict, dev) -> None:
    import warnings

    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        for f in fns.values():
            f()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fns["flash_attention_3_fp8"]()
        torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
        row["fp8_call_syncs"] = [str(w.message)[:300] for w in caught]
        row["interleaved_1call_ms"] = bench.interleaved(fns, dev, 11, target_ms=2.0)
        row["interleaved_burst_ms"] = bench.interleaved(fns, dev, 7, target_ms=60.0)
        timer = bench.Timer(dev)
        row["single_call_ms"] = {n: min(timer.sample(f, 1, warm=False) for _ in range(5)) for n, f in fns.items()}
        row["host_us"] = bench.host_us(fns, dev, calls=60, blocks=6, warmup=3)
        row["kernel_ms"] = {n: kernel_ms(f, calls=5) for n, f in fns.items()}
        fns["flash_attention_3_fp8"]()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fns["flash_attention_3_fp8"]()
            torch.cuda.synchronize()
        row["fp8_kernels_us"] = [(ev.key[:80], round(getattr(ev, "self_device_time_total", 0.0), 1))
                                 for ev in prof.key_averages() if getattr(ev, "self_device_time_total", 0.0) > 0]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--tag", default="diag")
    ap.add_argument("--no-tune", action="store_true")
    ap.add_argument("--order", action="store_true", help="only the rotation-vs-shuffle test on Wan 480p")
    ap.add_argument("--fp8", action="store_true", help="only FlashAttention-3 FP8's call against its parts")
    args = ap.parse_args()
    dev = torch.device("cuda")
    timings = {}

    def listener(key, decision, t, hit):
        timings[key.id] = t

    result = {"tag": args.tag, "fa4_compile_dir": os.environ.get("FLASH_ATTENTION_CUTE_DSL_CACHE_DIR"), "problems": {}}
    if args.order or args.fp8:
        (fp8_parts if args.fp8 else rotation_vs_shuffle)(result)
        with open(os.path.join(args.out, f"diag-{args.tag}.json"), "w") as f:
            json.dump(result, f, indent=1, default=str)
        return 0
    t_import = time.perf_counter()
    for name, (b, h, s, d, dt) in PROBLEMS.items():
        g = torch.Generator(device=dev).manual_seed(0)
        q, k, v = (torch.randn(b, h, s, d, device=dev, dtype=dt, generator=g) for _ in range(3))
        row = {}
        if not args.no_tune:
            import tempfile

            from harness.bench import TuningPolicy

            disp = da.Dispatcher(da.DecisionCache(tempfile.mkdtemp(prefix="da-diag-")), policy=TuningPolicy(listeners=(listener,)))
            t0 = time.perf_counter()
            with torch.no_grad():
                info = disp.explain(q, k, v)
            row["explain_s"] = time.perf_counter() - t0
            row["decision"] = info.backend if hasattr(info, "backend") else str(info)
            row["explain"] = str(info)
            row["decision_record"] = info.decision.to_dict() if info.decision is not None else None
            row["listener"] = {kid: {n: {kk: vv for kk, vv in c.items()} for n, c in t.items()} for kid, t in timings.items()}
            timings.clear()
        fns = {}
        for n in ("torch", "torch_cudnn", "flash_attention_4"):  # FA3 lacks these head dims here
            try:
                fns[n] = bench.direct_call(n, q, k, v)
                fns[n]()
            except Exception as exc:  # unavailable or unsupported
                row.setdefault("skipped", {})[n] = repr(exc)[:200]
                fns.pop(n, None)
        torch.cuda.synchronize()
        with torch.no_grad():
            row["interleaved_ms"] = bench.interleaved(fns, dev, 15)
            timer = bench.Timer(dev)
            row["single_call_ms"] = {n: min(timer.sample(f, 1, warm=False) for _ in range(5)) for n, f in fns.items()}
            row["host_us"] = bench.host_us(fns, dev, calls=2000, blocks=10, warmup=50)
            row["kernel_ms"] = {n: kernel_ms(f) for n, f in fns.items()}
        result["problems"][name] = row
        print(name, json.dumps({k_: v_ for k_, v_ in row.items() if k_ not in ("listener", "explain")}), flush=True)
    result["seconds"] = time.perf_counter() - t_import
    path = os.path.join(args.out, f"diag-{args.tag}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print("wrote", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
