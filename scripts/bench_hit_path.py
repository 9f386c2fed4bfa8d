#!/usr/bin/env python3
"""Where the hit path's host time goes (issue 29, item 6): ``attention_forward`` on a cache hit
against the backend's cheapest direct call, and its parts timed alone, interleaved in one process.

Rows: for each backend forced by ``use_backend`` (torch, torch_efficient, torch_flash on CUDA;
torch on CPU), direct call vs dispatched; then the parts: a Python function of the same 15
parameters doing nothing, the compiling check, the signature tuple built and looked up, and the
plan's runner called directly. Host microseconds per call, median over interleaved blocks.

Usage: python scripts/bench_hit_path.py --out DIR [--device cuda] [--tag NAME]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import torch  # noqa: E402

import diffsynth_attention as da  # noqa: E402
from harness.bench import host_us  # noqa: E402
from harness.hit_path import hit_path_parts  # noqa: E402


def direct(name, q, k, v):
    aten = torch.ops.aten
    if name == "torch":
        sdpa = torch.nn.functional.scaled_dot_product_attention
        return lambda: sdpa(q, k, v)
    if name == "torch_efficient":
        return lambda: aten._scaled_dot_product_efficient_attention(q, k, v, None, False)
    if name == "torch_flash":
        return lambda: aten._scaled_dot_product_flash_attention(q, k, v)
    raise ValueError(name)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", required=True)
    ap.add_argument("--tag", default=None)
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--blocks", type=int, default=40)
    a = ap.parse_args()
    device = torch.device(a.device)
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    q = torch.randn(1, 2, 16, 64, device=device, dtype=dt)
    k, v = torch.randn_like(q), torch.randn_like(q)
    backends = ["torch", "torch_efficient", "torch_flash"] if device.type == "cuda" else ["torch"]
    rows = []
    torch.set_grad_enabled(False)
    f = da.attention_forward
    for name in backends:
        with da.use_backend(name):
            f(q, k, v)
            t = host_us({"direct": direct(name, q, k, v), "dispatched": lambda: f(q, k, v)}, device, a.calls, a.blocks)
        rows.append({"backend": name, "direct_us": t["direct"], "dispatched_us": t["dispatched"],
                     "overhead_us": t["dispatched"] - t["direct"]})

    pt = hit_path_parts(q, k, v, device, a.calls // 2, a.blocks, host_us, direct("torch", q, k, v))
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "rows": rows, "parts_us": pt,
              "plan_found": any(n.startswith("plan.run") for n in pt)}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = a.tag or f"{result['device'].replace(' ', '-')}-{result['date']}-hit-path"
    (out / f"{tag}.json").write_text(json.dumps(result, indent=1))
    lines = [f"# Hit path on {result['device']} (torch {result['torch']}, {result['date']})", "",
             "Host us per call, median of interleaved blocks (`scripts/bench_hit_path.py`).", "",
             "| backend | direct | dispatched | overhead |", "|---|---|---|---|"]
    lines += [f"| {r['backend']} | {r['direct_us']:.2f} | {r['dispatched_us']:.2f} | **{r['overhead_us']:.2f}** |" for r in rows]
    lines += ["", "| part | us |", "|---|---|"] + [f"| {n} | {u:.3f} |" for n, u in pt.items()]
    (out / f"{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
