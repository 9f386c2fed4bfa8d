#!/usr/bin/env python3
"""Compiled and CUDA-graph columns of the benchmark, and the hit path's overhead.

For every problem of the shape suite, in the caller layouts ``b n s d`` and ``b s n d``, each a
module whose forward is one attention call, ``torch.compile``'d with its defaults (``fullgraph``
off: on, it adds 6-8 us to every call with torch 2.13 on the 2-core CPU, which would favour a module
compiled without it: ``compile_flags_ab.py``), ``dynamic=False``:

- ``auto``: ``attention_forward`` (its decision taken at trace time, a cache hit);
- ``sdpa``: ``F.scaled_dot_product_attention`` (with the transposes a ``b s n d`` caller needs);
- ``best``: the fastest backend of the eager run called directly (the ATen operator, or the
  kernel package's function);

the same three under ``mode="reduce-overhead"`` (CUDA graphs), and ``attention_forward`` eager
inside a manual ``torch.cuda.CUDAGraph`` (what reduce-overhead should approach).

The hit path's overhead: host time per call of ``attention_forward`` on a cache hit minus the
cheapest way to call the same kernel by hand (``F.scaled_dot_product_attention`` for ``torch``,
the ATen operator for the ``torch_*`` backends, the package function for kernel packages),
interleaved blocks, at least 20,000 calls each.

Every timed sample waits first (bounded) until no kernel package loads in the background, and each
row records what ran beside its samples (``hygiene``: loads, threads, garbage collections;
``harness/hygiene.py``), listed in the markdown.

Run directly; writes
benchmarks/results/<device>-<date>-compiled.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness.bench import direct_call, environment, hit_overhead, host_us, interleaved, save_result  # noqa: E402
from harness.compiled_modules import AttnModule, BackendModule, SDPAModule  # noqa: E402
from harness.hygiene import Watch, summary_md  # noqa: E402

HIT_PATH_TARGET_US = {"cuda": 2.0, "cpu": 2.5}  # issue 29: the GPU machine's host; the 2-core CPU (--overhead-only)


def operator_overhead(device, calls: int = 10000, blocks: int = 20) -> list:
    """Host time per call of this library's two graph operators, each against what it wraps:
    the run-time operator ``diffsynth_attention::dispatch`` (what a graph with symbolic sizes
    calls) against the decided backend's cheapest hand-written call, and the kernel operator
    ``diffsynth_attention::kernel`` against the kernel package's own function, for every kernel
    package that is usable here. Caller layout ``b s n d``, small problem (host-bound)."""
    import diffsynth_attention as da
    from harness.bench import default_dispatcher, dispatch_op, kernel_op, pack_dispatch_call

    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    qs = torch.randn(1, 16, 2, 64, device=device, dtype=dt)
    ks, vs = torch.randn_like(qs), torch.randn_like(qs)
    q, k, v = (t.transpose(1, 2) for t in (qs, ks, vs))  # b n s d views of b s n d tensors
    pat = "b s n d"
    token = default_dispatcher().trace_token
    call = pack_dispatch_call(pat, pat, pat, pat, None, False, None, False, None)
    rows = []
    with torch.no_grad():
        decision = da.explain(qs, ks, vs, pat, pat, pat, pat).backend
        direct = direct_call(decision, q, k, v)
        qb, kb, vb = (t.contiguous() for t in (q, k, v))  # a b n s d caller: no conversion either side
        bn = "b n s d"
        call_bn = pack_dispatch_call(bn, bn, bn, bn, None, False, None, False, None)
        da.attention_forward(qb, kb, vb)  # its own decision (the same problem, another layout)
        decision_bn = da.explain(qb, kb, vb).backend
        direct_bn = direct_call(decision_bn, qb, kb, vb)
        t = host_us({"direct": direct, "runtime_op": lambda: dispatch_op(qs, ks, vs, None, None, call, token),
                     "direct_bn": direct_bn, "runtime_op_bn": lambda: dispatch_op(qb, kb, vb, None, None, call_bn, token)},
                    device, calls, blocks)
        rows.append({"operator": "diffsynth_attention::dispatch", "device": str(device), "backend": decision, "caller": pat,
                     "direct_us": t["direct"], "operator_us": t["runtime_op"], "overhead_us": t["runtime_op"] - t["direct"]})
        rows.append({"operator": "diffsynth_attention::dispatch", "device": str(device), "backend": decision_bn,
                     "caller": bn, "direct_us": t["direct_bn"], "operator_us": t["runtime_op_bn"],
                     "overhead_us": t["runtime_op_bn"] - t["direct_bn"]})
        for name, why in da.available_backends().items():
            if why is not None or name.startswith("torch"):
                continue
            try:
                direct = direct_call(name, q, k, v)
                direct()
                kern = lambda n=name: kernel_op(n, q, k, v, None, None, False, None)  # noqa: E731
                kern()
            except Exception as exc:  # a package that cannot serve this problem here: say so
                rows.append({"operator": "diffsynth_attention::kernel", "backend": name,
                             "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"})
                continue
            t = host_us({"direct": direct, "kernel_op": kern}, device, calls, blocks)
            rows.append({"operator": "diffsynth_attention::kernel", "device": str(device), "backend": name,
                         "direct_us": t["direct"], "operator_us": t["kernel_op"], "overhead_us": t["kernel_op"] - t["direct"]})
    return rows


def manual_graph(fn, q, k, v):
    """``fn`` captured once in a torch.cuda.CUDAGraph; returns the replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn(q, k, v)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn(q, k, v)
    return g.replay


def compiled_rows(shapes: list, device, layouts, samples: int, modes=("default", "reduce-overhead")) -> list:
    import diffsynth_attention as da
    from harness.bench import inputs

    rows = []
    g = torch.Generator(device=device).manual_seed(0)
    for shape in shapes:
        for layout in layouts:
            q, k, v, kw = inputs(shape, device, layout, g)
            causal, window = kw.get("is_causal", False), kw.get("window_size")
            row = {"name": shape["name"], "layout": layout, "times_ms": {}, "errors": {}}
            torch._dynamo.reset()  # one set of graphs per row: no recompile limit across problems
            with torch.no_grad():
                info = da.explain(q, k, v, **kw)  # tunes if new; the compiled graphs then bake the decision
                row["decision"] = info.backend
                if info.decision is not None:  # what each mode runs: a graph bakes the compiled pick
                    row["modes"] = {m: info.decision.backend_for(m) for m in ("eager", "compiled", "cudagraph")}
                    row["confirmation"] = info.decision.confirmation
                eager_methods = {"auto_eager": lambda: da.attention_forward(q, k, v, **kw)}
                cand = {n: c["time_ms"] for n, c in info.candidates.items() if c["status"] in ("chosen", "accepted") and c["time_ms"]}
                best = min(cand, key=cand.get) if cand else info.backend
                row["best_backend"] = best
                gqa = shape["heads_q"] != shape["heads_kv"]
                sdpa_mod = SDPAModule(layout, causal, gqa)
                eager_methods["sdpa_eager"] = lambda: sdpa_mod(q, k, v)
                methods = dict(eager_methods)
                try:  # no graph break in attention_forward: fullgraph=True compiles it (untimed; a code object of its own)
                    torch.compile(lambda a, b, c: da.attention_forward(a, b, c, **kw), fullgraph=True, dynamic=False)(q, k, v)
                    row["fullgraph"] = True
                except Exception as exc:
                    row["fullgraph"] = False
                    row["errors"]["auto_fullgraph"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                for mode in modes:
                    suffix = "" if mode == "default" else "_ro"
                    for label, module in (("auto", AttnModule(kw)), ("sdpa", SDPAModule(layout, causal, gqa)),
                                          ("best", BackendModule(best, layout, causal, window))):
                        name = f"{label}_compiled{suffix}"
                        try:  # torch.compile's defaults, alike for all three (fullgraph=True costs every call: module docstring)
                            fn = torch.compile(module, dynamic=False, mode=None if mode == "default" else mode)
                            for _ in range(3):
                                fn(q, k, v)
                            methods[name] = (lambda f=fn: f(q, k, v))
                        except Exception as exc:  # a backend that Dynamo cannot trace: say so
                            row["errors"][name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                if device.type == "cuda":
                    try:
                        replay = manual_graph(lambda a, b, c: da.attention_forward(a, b, c, **kw), q, k, v)
                        methods["auto_manual_cudagraph"] = replay
                    except Exception as exc:
                        row["errors"]["auto_manual_cudagraph"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                watch = Watch()
                row["times_ms"] = interleaved(methods, device, samples, watch=watch)
                row["hygiene"] = watch.summary()
            t = row["times_ms"]
            for a, b, key in (("auto_compiled", "sdpa_compiled", "auto_vs_sdpa_compiled"), ("auto_compiled", "best_compiled", "auto_vs_best_compiled"),
                              ("auto_compiled_ro", "sdpa_compiled_ro", "auto_vs_sdpa_ro"), ("auto_compiled_ro", "best_compiled_ro", "auto_vs_best_ro"),
                              ("auto_compiled_ro", "auto_manual_cudagraph", "ro_vs_manual_graph"), ("auto_eager", "sdpa_eager", "auto_vs_sdpa_eager")):
                if t.get(a) and t.get(b):
                    row[key] = t[a] / t[b]
            rows.append(row)
            print(f"{shape['name']} [{layout}] {row['decision']}: " + ", ".join(f"{n}={x:.4f}" for n, x in t.items()), flush=True)
            del q, k, v
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def cpu_small_module(samples: int = 15) -> dict:
    """The CPU target: a small compiled module through attention_forward vs the same through SDPA."""

    import diffsynth_attention as da

    device = torch.device("cpu")
    torch._dynamo.reset()
    q = torch.randn(1, 64, 4, 32)
    k, v = torch.randn_like(q), torch.randn_like(q)
    kw = dict(q_pattern="b s n d", k_pattern="b s n d", v_pattern="b s n d", out_pattern="b s n d")
    with torch.no_grad():
        decision = da.explain(q, k, v, **kw).backend
        a = torch.compile(AttnModule(kw), fullgraph=True, dynamic=False)
        s = torch.compile(SDPAModule("b s n d", False), fullgraph=True, dynamic=False)
        for _ in range(3):
            a(q, k, v), s(q, k, v)
        watch = Watch()
        t = interleaved({"auto_compiled": lambda: a(q, k, v), "sdpa_compiled": lambda: s(q, k, v)}, device, samples, watch=watch)
    return {"problem": "1x4 s=64 d=32 float32 [b s n d]", "decision": decision, "times_ms": t,
            "ratio": t["auto_compiled"] / t["sdpa_compiled"], "hygiene": watch.summary()}


def summarize(rows: list, overhead: list, cpu: dict | None) -> dict:
    def worst(key):
        vals = [(r[key], f"{r['name']} [{r['layout']}]") for r in rows if key in r]
        return max(vals) if vals else (None, "-")

    targets = {}
    w, where = worst("auto_vs_best_compiled")
    targets["compiled auto within 2% of compiled best on every problem"] = (w is not None and w <= 1.02, f"worst {w:.3f}x ({where})" if w else "n/a")
    w, where = worst("auto_vs_sdpa_compiled")
    targets["compiled auto never more than 2% slower than compiled SDPA"] = (w is not None and w <= 1.02, f"worst {w:.3f}x ({where})" if w else "n/a")
    wan = [r for r in rows if r["name"] == "wan13b_480p_self" and "auto_vs_sdpa_compiled" in r]
    if wan:
        sp = min(1 / r["auto_vs_sdpa_compiled"] for r in wan)
        targets["wan13b_480p_self: compiled auto >= 1.15x faster than compiled SDPA"] = (sp >= 1.15, f"{sp:.3f}x (worst layout)")
    w, where = worst("ro_vs_manual_graph")
    if w is not None:
        small = [r["ro_vs_manual_graph"] for r in rows if r["times_ms"].get("sdpa_eager", 1) < 0.1 and "ro_vs_manual_graph" in r]
        wm = max(small) if small else w
        targets["reduce-overhead within 5% of a manual CUDA graph (small problems)"] = (wm <= 1.05, f"worst {wm:.3f}x on problems under 0.1 ms")
    for o in overhead:
        limit = HIT_PATH_TARGET_US[o["device"].split(":")[0]]
        targets[f"hit path <= {limit} us over the cheapest call ({o['device']}, {o['backend']})"] = (o["overhead_us"] <= limit, f"{o['overhead_us']:.2f} us")
    if cpu:
        targets["CPU: small compiled module within 5% of SDPA"] = (cpu["ratio"] <= 1.05, f"{cpu['ratio']:.3f}x")
    return {k: {"met": bool(v[0]), "value": v[1]} for k, v in targets.items()}


def write_markdown(result: dict, path: Path) -> None:
    env = result["environment"]
    lines = [f"# Compiled, CUDA-graph and hit-path benchmark: {env['device']}", "",
             f"{env['date']}; torch {env['torch']}, CUDA {env['cuda']}; median of {result['samples']} interleaved samples; ms per call.", "",
             "`auto` = attention_forward, `sdpa` = F.scaled_dot_product_attention, `best` = the eager run's fastest backend "
             "called directly, all compiled with `torch.compile`'s defaults and `dynamic=False` (`attention_forward` also compiled once with `fullgraph=True`, untimed: a failure is listed under Errors); `_ro` = mode=\"reduce-overhead\"; `manual graph` = eager attention_forward captured in a torch.cuda.CUDAGraph.", "",
             "| problem | layout | decision | auto eager | SDPA eager | auto comp. | SDPA comp. | best comp. | auto ro | SDPA ro | best ro | manual graph |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(x):
        return "-" if x is None else f"{x:.4f}"

    for r in result["rows"]:
        t = r["times_ms"]
        m = r.get("modes") or {}
        shown = r["decision"] + ("" if not m or m.get("compiled") == r["decision"] else f" (graph: {m['compiled']})")
        lines.append(f"| {r['name']} | {r['layout']} | {shown} | {f(t.get('auto_eager'))} | {f(t.get('sdpa_eager'))} | "
                     f"{f(t.get('auto_compiled'))} | {f(t.get('sdpa_compiled'))} | {f(t.get('best_compiled'))} ({r['best_backend']}) | "
                     f"{f(t.get('auto_compiled_ro'))} | {f(t.get('sdpa_compiled_ro'))} | {f(t.get('best_compiled_ro'))} | {f(t.get('auto_manual_cudagraph'))} |")
    errs = [(r["name"], r["layout"], n, e) for r in result["rows"] for n, e in r["errors"].items()]
    if errs:
        lines += ["", "Errors (a column left out):", ""] + [f"- {a} [{b}] {n}: {e}" for a, b, n, e in errs]
    beside = [(f"{r['name']} [{r['layout']}]", r.get("hygiene")) for r in result["rows"]]
    if result.get("cpu_small_module"):
        beside.append(("CPU small module", result["cpu_small_module"].get("hygiene")))
    if any(h for _, h in beside):
        lines += ["", "What ran beside the timed samples (each waited first, bounded, until no kernel package loaded in the "
                  "background; loads: samples with a load running at their start or end; threads other than this one, "
                  "where each was is in the JSON; GC: collections during the samples):", ""] + summary_md(beside)
    lines += ["", "Hit path (cache hit) over the cheapest hand-written call of the same kernel, host time per call:", ""]
    for o in result["hit_overhead"]:
        lines.append(f"- {o['device']} ({o['backend']}): {o['dispatched_us']:.2f} us vs {o['direct_us']:.2f} us: **{o['overhead_us']:.2f} us** "
                     f"over {o['calls_each']} calls each")
    if result.get("cpu_small_module"):
        c = result["cpu_small_module"]
        lines += ["", f"CPU, small compiled module ({c['problem']}, decision {c['decision']}): attention_forward "
                  f"{c['times_ms']['auto_compiled']:.4f} ms vs SDPA {c['times_ms']['sdpa_compiled']:.4f} ms: {c['ratio']:.3f}x"]
    ops = result.get("operator_overhead") or []
    if ops:
        lines += ["", "## Graph operators' host overhead (small problem, us per call, interleaved; `direct`: the backend's "
                  "own call on b n s d views, so a b s n d caller's row includes its four transposes)", "",
                  "| operator | caller | backend | direct | operator | overhead |", "|---|---|---|---|---|---|"]
        for o in ops:
            if "error" in o:
                lines.append(f"| {o['operator']} | b n s d | {o['backend']} | - | - | {o['error']} |")
            else:
                lines.append(f"| {o['operator']} | {o.get('caller', 'b n s d')} | {o['backend']} | {o['direct_us']:.1f} | {o['operator_us']:.1f} | "
                             f"{o['overhead_us']:.1f} |")
    lines += ["", "## Targets", "", "| target | met | value |", "|---|---|---|"]
    for name, t in result["summary"].items():
        lines.append(f"| {name} | {'yes' if t['met'] else '**no**'} | {t['value']} |")
    path.write_text("\n".join(lines) + "\n")


def run(args) -> dict:
    from harness import bench

    device = torch.device(args.device)
    shapes = bench.shapes(args.preset, args.shapes)
    if args.only:
        shapes = [s for s in shapes if s["name"] in args.only.split(",")]
    modes = ("default", "reduce-overhead") if device.type == "cuda" else ("default",)
    rows = compiled_rows(shapes, device, args.layouts.split(","), args.samples, modes) if not args.overhead_only else []
    overhead = [hit_overhead(torch.device("cpu")), hit_overhead(torch.device("cpu"), "torch")]
    if device.type == "cuda":
        overhead += [hit_overhead(device), hit_overhead(device, "torch")]
    operators = operator_overhead(device)
    cpu = cpu_small_module() if args.cpu_module else None
    return {"environment": environment(device), "samples": args.samples, "rows": rows, "hit_overhead": overhead,
            "operator_overhead": operators, "cpu_small_module": cpu, "summary": summarize(rows, overhead, cpu)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes")
    parser.add_argument("--preset", action="append")
    parser.add_argument("--only", help="comma-separated problem names")
    parser.add_argument("--layouts", default="b n s d,b s n d")
    parser.add_argument("--samples", type=int, default=9)
    parser.add_argument("--overhead-only", action="store_true", help="only the hit path's overhead")
    parser.add_argument("--cpu-module", action="store_true", help="also the CPU small-module target")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--tag")
    parser.add_argument("--keep-cache", action="store_true")
    args = parser.parse_args(argv)
    if not args.keep_cache:
        os.environ.setdefault("DIFFSYNTH_ATTENTION_CACHE_DIR", tempfile.mkdtemp(prefix="da-bench-compiled-"))
    result = run(args)
    path = save_result(result, args.out, args.tag, "-compiled", write_markdown)
    print(Path(f"{path}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
