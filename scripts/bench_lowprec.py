#!/usr/bin/env python3
"""Low-precision attention (issue 32): speed where the gate admits it, and which share of the
fuzz suite each quality tier admits, with the error figures.

1. **speed** (a CUDA GPU): on the video problems of >= 27k tokens (Wan 2.2 5B 720p, HunyuanVideo
   720p, Wan 14B 720p; Wan 2.1 1.3B 480p from the shape suite), in DiffSynth's ``b s n d``
   layout: FlashAttention-3 FP8 called as a plan calls it (its quantisation included), the FP8
   kernel alone on pre-quantised inputs, SageAttention where installed, and every exact backend
   that passes the exact gate; interleaved rounds, medians. The speed-up is FP8 (quantisation
   included) over the best exact backend. Each problem's FP8 error on random activations and on
   fuzz activations of the same shape (rotary; and outlier channels 20x with a mean-offset K)
   against fp32, on a slice (batch 0, the first and last heads, 1,024 query rows).
2. **e2e**: diffusers' Wan (Wan 2.1 1.3B geometry, 4 blocks, 32,760 tokens, random weights) through
   ``diffsynth_auto``: the forward at the ``fast`` tier against ``exact``, time and output rel-L1/cosine.
3. **decisions**: a fresh dispatcher at the ``fast`` tier on each problem's benign (rotary)
   activations: the backend it chooses, the gate's evidence, and the time against the exact
   tier's decision.
4. **fuzz suite**: every case of ``tools/fuzz.py`` (``--fuzz-seq`` tokens, 8 heads, d128, bf16, two
   seeds) through each low-precision kernel (on CPU, ``--emulate``: the kernels' arithmetic
   emulated); per tier, the share of cases the gate admits (on its slice) and the share of heads
   within the bound, with relative L1 and cosine per case.

Writes ``<out>/<device>-<date>-lowprec.{json,md}`` (``--tag`` names the files).

    python scripts/bench_lowprec.py --out benchmarks/results
    python scripts/bench_lowprec.py --device cpu --emulate --fuzz-seq 1024 --out /tmp/lowprec  # part 3 only
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness import bench  # noqa: E402

FP8, SAGE = "flash_attention_3_fp8", "sage_attention"
LOW = (SAGE, FP8)
# (name, model, batch, heads, tokens, head dim): issue 32's problems, >= 27k tokens.
VIDEO = [
    ("wan22_5b_720p", "Wan 2.2 5B, 1280x704, 121 frames", 1, 24, 27280, 128),
    ("wan13b_480p", "Wan 2.1 1.3B, 832x480, 81 frames", 1, 12, 32760, 128),
    ("hunyuanvideo_720p", "HunyuanVideo, 1280x720, 129 frames", 1, 24, 67576, 128),
    ("wan14b_720p", "Wan 2.1/2.2 14B, 1280x720, 81 frames", 1, 40, 75600, 128),
]
SLICE_ROWS = 1024


def _slice_error(out_bsnd, q, k, v) -> dict:
    """FP8/any output (b s n d) against fp32 on batch 0, the first and last heads, 1,024 rows."""
    n, s = q.shape[2], q.shape[1]
    heads = [0, n - 1]
    rows = torch.linspace(0, s - 1, min(SLICE_ROWS, s), device=q.device).round().long()
    qs = q[:1, rows][:, :, heads].transpose(1, 2)
    ks, vs = k[:1, :, heads].transpose(1, 2), v[:1, :, heads].transpose(1, 2)
    ref = bench.fuzz_reference(qs, ks, vs)
    got = out_bsnd[:1, rows][:, :, heads].transpose(1, 2)
    e = bench.fuzz_errors(got, ref)
    return {"rel_l1": e["rel_l1"], "cosine": e["cosine"]}


BSND = dict(q_pattern="b s n d", k_pattern="b s n d", v_pattern="b s n d", out_pattern="b s n d")


def _problems(args) -> list:
    """The VIDEO problems ``--only`` keeps (all without it)."""
    keep = set(args.only.split(",")) if args.only else None
    return [row for row in VIDEO if keep is None or row[0] in keep]


def _bsnd(case):
    return tuple(t.transpose(1, 2).contiguous() for t in (case.q, case.k, case.v))


def _onestep(q, k, v):
    """The quantisation before this session's change, for an interleaved A/B: every maximum
    taken over (s, d) at once, K's mean subtracted before its maximum (two passes over K)."""
    b, nq, nk = q.shape[0], q.shape[2], k.shape[2]
    k = k - k.mean(dim=1, keepdim=True)
    out = []
    for t, amax, rep in ((q, q.abs().amax(dim=(1, 3)).view(b, nk, nq // nk).amax(dim=2), nq // nk),
                         (k, k.abs().amax(dim=(1, 3)), 1), (v, v.abs().amax(dim=(1, 3)), 1)):
        f = (440.0 / amax.float().clamp_min(1e-30)).clamp(max=torch.finfo(t.dtype).max / 4).to(t.dtype)
        out.append((t * f.repeat_interleave(rep, dim=1)[:, None, :, None]).to(torch.float8_e4m3fn))
    return out


_ONESTEP = {}


def _onestep_compiled():
    if "fn" not in _ONESTEP:
        _ONESTEP["fn"] = torch.compile(_onestep, dynamic=None)
    return _ONESTEP["fn"]


def speed(args, device) -> list:
    rows = []
    kw = BSND
    for name, model, b, n, s, d in _problems(args):
        row = {"name": name, "model": model, "shape": [b, n, s, d]}
        case = bench.fuzz_case("randn", batch=b, heads=n, seq=s, head_dim=d, device=device)
        q, k, v = _bsnd(case)
        del case
        exact, why = bench.servable(q, k, v, **kw)
        methods = dict(exact)
        for low in LOW:
            fn = bench.backend_call(low, q, k, v, **kw)
            if fn is None:
                why[low] = bench.REGISTRY[low].unavailable_reason()
            else:
                methods[low] = fn
        if FP8 in methods:
            fa3 = bench.REGISTRY[FP8]
            q8, k8, v8, qd, kd, vd = bench.quantize_fp8(q, k, v)
            methods["fp8_kernel_only"] = lambda: fa3._func(q8, k8, v8, causal=False, q_descale=qd, k_descale=kd, v_descale=vd)
            methods["fp8_quantize_only"] = lambda: bench.quantize_fp8(q, k, v)
            methods["fp8_quantize_onestep"] = lambda: _onestep_compiled()(q, k, v)  # the old formulation, A/B
        times = bench.interleaved(methods, device, samples=args.samples)
        best = min(exact, key=lambda m: times[m]) if exact else None
        row.update(times_ms=times, best_exact=best, best_exact_ms=times.get(best), unavailable=why)
        if FP8 in methods and best:
            row["fp8_speedup"] = times[best] / times[FP8]
            row["fp8_kernel_speedup"] = times[best] / times["fp8_kernel_only"]
            errs = {"randn": _slice_error(methods[FP8](), q, k, v)}
            del q, k, v, q8, k8, v8, methods
            for fz in ("rotary", "outliers_20x_k_mean"):
                c = bench.fuzz_case(fz, batch=b, heads=n, seq=s, head_dim=d, device=device, **bench.FUZZ_SUITE[fz])
                cq, ck, cv = _bsnd(c)
                del c
                errs[fz] = _slice_error(bench.backend_call(FP8, cq, ck, cv, **kw)(), cq, ck, cv)
                del cq, ck, cv
            row["fp8_error"] = errs
        rows.append(row)
        bench.sync(device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"{name}: best exact {best} {row.get('best_exact_ms')}, FP8 x{row.get('fp8_speedup')}", flush=True)
    return rows


def decisions(args, device) -> list:
    import diffsynth_attention as da

    rows = []
    kw = BSND
    for name, model, b, n, s, d in _problems(args):
        c = bench.fuzz_case("rotary", batch=b, heads=n, seq=s, head_dim=d, device=device, rotary=True)
        q, k, v = _bsnd(c)
        del c
        d_exact, d_fast = bench.fresh_dispatcher(prefix="da-lowprec-exact-"), bench.fresh_dispatcher(prefix="da-lowprec-fast-")
        e_exact = d_exact.explain(q, k, v, **kw)
        with da.quality("fast"):
            e_fast = d_fast.explain(q, k, v, **kw)
        ms = lambda e: (e.decision.candidates[e.backend].time_ms if e.decision and e.backend in e.decision.candidates else None)  # noqa: E731
        rows.append({"name": name, "exact": e_exact.backend, "exact_ms": ms(e_exact), "fast": e_fast.backend,
                     "fast_ms": ms(e_fast), "gate": (e_fast.quality or {}).get("gate"),
                     "candidates": {n_: {"status": c_["status"], "time_ms": c_["time_ms"], "error": c_["error"]}
                                    for n_, c_ in e_fast.candidates.items() if c_["status"] != "unsupported"}})
        del q, k, v
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def e2e(args, device) -> dict:
    """diffusers' WanTransformer3DModel with Wan 2.1 1.3B's geometry, ``--blocks`` blocks, random
    weights, 32,760 video tokens (21 x 60 x 104 latent, 81 frames at 480x832) and 512 text tokens,
    through the ``diffsynth_auto`` backend: the forward at the fast tier against the exact tier."""
    import diffsynth_attention as da
    from diffusers import WanTransformer3DModel

    bench.register_diffusers()
    cfg = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
               text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=args.blocks, cross_attn_norm=True, eps=1e-6)
    torch.manual_seed(0)
    with torch.device(device):
        model = WanTransformer3DModel(**cfg)
    model = model.to(dtype=torch.bfloat16).eval()
    model.set_attention_backend("diffsynth_auto")
    x = torch.randn(1, 16, 21, 60, 104, device=device, dtype=torch.bfloat16)
    t = torch.tensor([500], device=device)
    text = torch.randn(1, 512, 4096, device=device, dtype=torch.bfloat16)

    def exact():
        return model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]

    def fast():
        with da.quality("fast"):
            return exact()
    out_exact, out_fast = exact(), fast()  # the first call of each tier tunes its keys
    times = bench.interleaved({"exact": exact, "fast": fast}, device, samples=args.samples)
    err = bench.fuzz_errors(out_fast.float(), out_exact.float())
    decisions = [{"tier": dd.key.get("quality", "exact"), "backend": dd.backend, "seq_q": dd.key["problem"]["seq_q"],
                  "seq_kv": dd.key["problem"]["seq_kv"], "gate": (dd.quality or {}).get("gate")}
                 for dd in bench.default_dispatcher().store.entries().values()
                 if dd.key["problem"]["heads_q"] == 12 and dd.key["problem"]["seq_q"] == 32760]
    return {"config": cfg, "tokens": 32760, "times_ms": times, "speedup": times["exact"] / times["fast"],
            "rel_l1": err["rel_l1"], "cosine": err["cosine"], "decisions": decisions}


def fuzz(args, device) -> dict:
    bounds = bench.QUALITY_BOUNDS
    kernels = {}
    if args.emulate:
        kernels = {"sage_attention (emulated)": bench.EMULATIONS["sage_int8"], "fa3_fp8 (emulated)": bench.EMULATIONS["fa3_fp8"],
                   "exact bf16 (emulated)": bench.EMULATIONS["exact"]}
    else:
        kw = dict(q_pattern="b n s d", k_pattern="b n s d", v_pattern="b n s d", out_pattern="b n s d")
        for low in LOW:
            if bench.REGISTRY[low].unavailable_reason() is None:
                kernels[low] = (lambda name: lambda q, k, v: bench.backend_call(name, q, k, v, **kw)())(low)
    cases, share = [], {}
    for c in bench.fuzz_cases(seq=args.fuzz_seq, heads=8, head_dim=128, device=device, seeds=(0, 1)):
        ref = bench.fuzz_reference(c.q, c.k, c.v)
        row = {"case": c.name, "params": c.params, "kernels": {}}
        for kname, fn in kernels.items():
            out = fn(c.q, c.k, c.v)
            e = bench.fuzz_errors(out, ref)
            gate_heads = [0, len(e["per_head_rel_l1"]) - 1]  # the gate's slice: batch 0, first and last heads, all rows
            g = bench.fuzz_errors(out[:1, gate_heads], ref[:1, gate_heads])
            per_head = bench.gate_head_errors(out[0], c.q, c.k, c.v, None, None, False, None)  # its all-heads check
            row["kernels"][kname] = {"rel_l1": e["rel_l1"], "cosine": e["cosine"], "max_head_rel_l1": max(e["per_head_rel_l1"]),
                                     "min_head_cosine": min(e["per_head_cosine"]), "tiers": {}}
            for tier, bnd in bounds.items():
                admitted = (bnd.violation(g["rel_l1"], g["cosine"]) is None
                            and all(bnd.violation(*x) is None for x in per_head))
                heads_ok = sum(bnd.violation(a, b) is None for a, b in zip(e["per_head_rel_l1"], e["per_head_cosine"]))
                over = admitted and any(bnd.violation(a, b) for a, b in zip(e["per_head_rel_l1"], e["per_head_cosine"]))
                row["kernels"][kname]["tiers"][tier] = {"admitted": admitted, "heads_within": heads_ok,
                                                        "heads": len(e["per_head_rel_l1"]), "admitted_but_a_head_over": over}  # over on all rows
                s = share.setdefault(tier, {}).setdefault(kname, {"cases": 0, "admitted": 0, "heads": 0, "heads_within": 0,
                                                                   "admitted_but_a_head_over": 0})
                s["cases"] += 1
                s["admitted"] += admitted
                s["heads"] += len(e["per_head_rel_l1"])
                s["heads_within"] += heads_ok
                s["admitted_but_a_head_over"] += over
        cases.append(row)
        print(f"fuzz {c.name}: " + ", ".join(f"{k} {v['rel_l1']:.3g}/{v['cosine']:.5f}" for k, v in row["kernels"].items()),
              flush=True)
    return {"bounds": {t: b.as_dict() for t, b in bounds.items()}, "seq": args.fuzz_seq, "share": share, "cases": cases}


def write_md(result: dict, path: Path) -> None:
    env = result["environment"]
    lines = [f"# Low-precision attention on {env['device']} ({env['date']})", "",
             f"torch {env['torch']}, packages {env['packages']}", ""]
    if result.get("speed"):
        lines += ["## Speed (b s n d, bf16; FP8 includes its quantisation)", "",
                  "| problem | best exact | ms | FP8 ms | FP8 speed-up | kernel only | quantise ms (before: one-step maxima) | sage ms | FP8 rel-L1 / cos: randn, rotary, outliers 20x + K mean |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in result["speed"]:
            t = r["times_ms"]
            err = r.get("fp8_error", {})
            errs = ", ".join(f"{v['rel_l1']:.3g} / {v['cosine']:.5f}" for v in err.values()) or "-"
            f = lambda x: "-" if x is None else f"{x:.4g}"  # noqa: E731
            lines.append(f"| {r['name']} ({'x'.join(map(str, r['shape']))}) | {r['best_exact']} | {f(r.get('best_exact_ms'))} | "
                         f"{f(t.get(FP8))} | {f(r.get('fp8_speedup'))} | {f(r.get('fp8_kernel_speedup'))} | "
                         f"{f(t.get('fp8_quantize_only'))} ({f(t.get('fp8_quantize_onestep'))}) | {f(t.get(SAGE))} | {errs} |")
        lines.append("")
    if result.get("e2e"):
        r = result["e2e"]
        lines += [f"## diffusers Wan ({r['config']['num_layers']} blocks, {r['tokens']} tokens), fast tier against exact", "",
                  f"exact {r['times_ms']['exact']:.4g} ms, fast {r['times_ms']['fast']:.4g} ms: x{r['speedup']:.3f}; "
                  f"output rel-L1 {r['rel_l1']:.3g}, cosine {r['cosine']:.6f} (fast against exact)", ""]
        lines += [f"- {x['tier']}: {x['seq_q']}x{x['seq_kv']} -> {x['backend']}; gate {x['gate']}" for x in r["decisions"]] + [""]
    if result.get("decisions"):
        lines += ["## Decisions on benign (rotary) activations, fresh caches", "",
                  "| problem | exact tier | ms | fast tier | ms | gate evidence |", "|---|---|---|---|---|---|"]
        for r in result["decisions"]:
            gate = "; ".join(f"{n}: {g['rel_l1']:.3g} / {g['cosine']:.5f}" for n, g in (r["gate"] or {}).items()) or "-"
            lines.append(f"| {r['name']} | {r['exact']} | {r['exact_ms']} | {r['fast']} | {r['fast_ms']} | {gate} |")
        lines.append("")
    fz = result.get("fuzz")
    if fz:
        lines += [f"## Fuzz suite ({fz['seq']} tokens, 8 heads, d128, bf16, 2 seeds)", "",
                  "| tier | kernel | cases the gate admits | heads within the bound (all rows) | admitted, a head over on all rows |", "|---|---|---|---|---|"]
        for tier, per in fz["share"].items():
            for k, s in per.items():
                lines.append(f"| {tier} {fz['bounds'][tier]} | {k} | {s['admitted']}/{s['cases']} | {s['heads_within']}/{s['heads']} | "
                             f"{s['admitted_but_a_head_over']} |")
        kernels = list(fz["cases"][0]["kernels"]) if fz["cases"] else []
        lines += ["", "| case | " + " | ".join(f"{k} rel-L1 / cos" for k in kernels) + " |", "|---|" + "---|" * len(kernels)]
        for c in fz["cases"]:
            lines.append(f"| {c['case']} | " + " | ".join(f"{c['kernels'][k]['rel_l1']:.3g} / {c['kernels'][k]['cosine']:.5f}"
                                                          for k in kernels) + " |")
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for the JSON and Markdown results")
    ap.add_argument("--tag", default=None, help="file name stem (default <device>-<date>-lowprec)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--only", default=None, help="comma-separated video problems (default all)")
    ap.add_argument("--parts", default="speed,decisions,e2e,fuzz", help="comma-separated: speed, decisions, e2e, fuzz")
    ap.add_argument("--blocks", type=int, default=4, help="e2e: transformer blocks")
    ap.add_argument("--fuzz-seq", type=int, default=4096)
    ap.add_argument("--samples", type=int, default=11)
    ap.add_argument("--emulate", action="store_true", help="fuzz part: the CPU emulations instead of the kernels")
    args = ap.parse_args(argv)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    bad = parts - {"speed", "decisions", "e2e", "fuzz"}
    known = {v[0] for v in VIDEO}
    unknown = [n for n in (args.only or "").split(",") if n and n not in known]
    if bad or unknown:
        ap.error(f"unknown part(s) {sorted(bad)}" if bad else f"unknown problem name(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    device = torch.device(args.device)
    if device.type != "cuda" and parts & {"speed", "decisions", "e2e"}:
        print("no CUDA device: only the fuzz part runs", file=sys.stderr)
        parts &= {"fuzz"}
    if "e2e" in parts:
        # diffusers before the kernel packages: flash-attn-4's bare `flash_attn` namespace makes
        # diffusers import FlashAttention-2 modules that are not there (see bench_e2e.py); the
        # kernel packages come from DA_LATE_PATH, appended once diffusers is imported.
        import diffusers.models.attention_dispatch  # noqa: F401
    for extra in filter(None, os.environ.get("DA_LATE_PATH", "").split(":")):  # every part needs the kernels
        sys.path.append(extra)
    result = {"environment": bench.environment(device), "args": vars(args)}
    with torch.no_grad():
        if "speed" in parts:
            result["speed"] = speed(args, device)
        if "decisions" in parts:
            result["decisions"] = decisions(args, device)
        if "e2e" in parts:
            result["e2e"] = e2e(args, device)
        if "fuzz" in parts:
            result["fuzz"] = fuzz(args, device)
    stem = bench.save_result(result, args.out, args.tag, "-lowprec", write_md)
    print(f"wrote {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
