#!/usr/bin/env python3
"""Training: forward + backward of one attention call, compiled, through ``attention_forward``
against ``F.scaled_dot_product_attention``, on every problem of the shape suite.

Each problem in the caller layout ``b s n d``, with q, k, v requiring gradients, both functions
``torch.compile(fullgraph=True, dynamic=False)``'d; one sample = one forward and one backward
(``out.backward(g)``), timed interleaved (``diffsynth_attention.tuning.timing.interleaved``).
The dispatcher's decision for the gradient-needing key is reported; a kernel package that has a
backward saves its output and log-sum-exp in the forward and runs its own backward on them
(``diffsynth_attention::kernel_lse`` / ``kernel_backward``), so no forward runs twice.

Writes ``<device>-<date>-training.{json,md}`` under ``--out`` (default benchmarks/results).
CPU smoke test: ``PYTHONPATH=$PWD python scripts/bench_training.py --device cpu --only seed_example --out /tmp/tr``.
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


def run(args) -> dict:
    import diffsynth_attention as da
    from harness.bench import environment, inputs, interleaved, shapes as select

    device = torch.device(args.device)
    shapes = select(["all"])
    if args.only:
        shapes = [s for s in shapes if s["name"] in args.only.split(",")]
    g = torch.Generator(device=device).manual_seed(0)
    rows = []
    for shape in shapes:
        dtype = None if device.type == "cuda" else torch.float32
        q, k, v, kw = inputs(shape, device, "b s n d", g, dtype)
        q, k, v = (t.requires_grad_(True) for t in (q, k, v))
        causal = kw.get("is_causal", False)
        row = {"name": shape["name"], "problem": f"{tuple(q.shape)} kv {tuple(k.shape)} causal={causal}"}
        if kw.get("window_size") is not None or shape["heads_q"] != shape["heads_kv"]:
            row["skipped"] = "window or grouped-query: not compared against plain SDPA here"
            rows.append(row)
            continue
        torch._dynamo.reset()
        try:
            info = da.explain(q, k, v, **kw)  # the gradient-needing key (tunes if new)
            row["decision"] = info.backend

            def ours(a, b, c):
                return da.attention_forward(a, b, c, **kw)

            def sdpa(a, b, c):
                return torch.nn.functional.scaled_dot_product_attention(
                    a.transpose(1, 2), b.transpose(1, 2), c.transpose(1, 2), is_causal=causal).transpose(1, 2)

            fns = {name: torch.compile(fn, fullgraph=True, dynamic=False) for name, fn in (("auto", ours), ("sdpa", sdpa))}
            grad = torch.randn_like(q)

            def step(f):
                def go():
                    out = f(q, k, v)
                    out.backward(grad)
                    q.grad = k.grad = v.grad = None
                return go

            outs = {}
            for name, f in fns.items():
                out = f(q, k, v)
                out.backward(grad)
                outs[name] = (out.detach().float(), q.grad.float())
                q.grad = k.grad = v.grad = None
            row["out_rel_l1"] = float((outs["auto"][0] - outs["sdpa"][0]).abs().sum() / outs["sdpa"][0].abs().sum())
            row["dq_rel_l1"] = float((outs["auto"][1] - outs["sdpa"][1]).abs().sum() / outs["sdpa"][1].abs().sum())
            t = interleaved({name: step(f) for name, f in fns.items()}, device, args.samples)
            row["fwd_bwd_ms"] = t
            row["speedup_vs_sdpa"] = t["sdpa"] / t["auto"]
        except Exception as exc:  # a problem this machine cannot run: say so, go on
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        rows.append(row)
        print(row, flush=True)
        del q, k, v
        if device.type == "cuda":
            torch.cuda.empty_cache()
    done = [r for r in rows if "speedup_vs_sdpa" in r]
    geo = None
    if done:
        import math

        geo = math.exp(sum(math.log(r["speedup_vs_sdpa"]) for r in done) / len(done))
    return {"environment": environment(device), "samples": args.samples, "rows": rows,
            "geomean_speedup_vs_sdpa": geo}


def write_markdown(result: dict, path: Path) -> None:
    env = result["environment"]
    lines = [f"# Training (compiled forward + backward, b s n d): {env['device']}", "",
             f"{env['date']}; torch {env.get('torch')}; median of {result['samples']} interleaved samples; ms per "
             "forward+backward.", "",
             "| problem | decision | attention_forward | SDPA | speedup | out rel-L1 | dq rel-L1 |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "fwd_bwd_ms" in r:
            t = r["fwd_bwd_ms"]
            lines.append(f"| {r['name']} | {r['decision']} | {t['auto']:.4f} | {t['sdpa']:.4f} | {r['speedup_vs_sdpa']:.3f} | "
                         f"{r['out_rel_l1']:.1e} | {r['dq_rel_l1']:.1e} |")
        else:
            lines.append(f"| {r['name']} | - | - | - | - | {r.get('error') or r.get('skipped')} | |")
    if result["geomean_speedup_vs_sdpa"]:
        lines += ["", f"Geometric mean speed-up over SDPA: {result['geomean_speedup_vs_sdpa']:.3f}x"]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--only", help="comma-separated problem names")
    p.add_argument("--samples", type=int, default=9)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--tag")
    args = p.parse_args(argv)
    os.environ.setdefault("DIFFSYNTH_ATTENTION_CACHE_DIR", tempfile.mkdtemp(prefix="da-bench-training-"))
    from harness.bench import save_result

    path = save_result(run(args), args.out, args.tag, "-training", write_markdown)
    print(Path(f"{path}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
