#!/usr/bin/env python3
"""End-to-end: a randomly initialised diffusers Wan transformer, with and without ``patch_sdpa``.

Builds ``WanTransformer3DModel`` with Wan2.1-1.3B's attention geometry (12 heads x 128, 1536
wide) but only ``--layers`` blocks, runs a 832x480x81-frame latent (32,760 tokens) and 512 text
tokens, and times the forward pass interleaved (plain / patched), median of ``--samples``.
The patched run is warmed first so that tuning is excluded; its decisions are reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import os
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--frames", type=int, default=21, help="latent frames (81 video frames -> 21)")
    parser.add_argument("--height", type=int, default=60)
    parser.add_argument("--width", type=int, default=104)
    parser.add_argument("--samples", type=int, default=7)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("DIFFSYNTH_ATTENTION_CACHE_DIR", tempfile.mkdtemp(prefix="da-e2e-"))
    from diffusers import WanTransformer3DModel

    # flash-attn-4 installs a bare `flash_attn` namespace that makes diffusers import FA2 modules
    # that are not there; DA_LATE_PATH adds the kernel packages only after diffusers is imported.
    for extra in filter(None, os.environ.get("DA_LATE_PATH", "").split(":")):
        sys.path.append(extra)

    import diffsynth_attention as da

    device = torch.device("cuda")
    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=args.layers, cross_attn_norm=True, eps=1e-6,
    ).to(device=device, dtype=torch.bfloat16).eval()
    x = torch.randn(1, 16, args.frames, args.height, args.width, device=device, dtype=torch.bfloat16)
    t = torch.tensor([500], device=device)
    text = torch.randn(1, 512, 4096, device=device, dtype=torch.bfloat16)

    def plain():
        return model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]

    def patched():
        with da.patch_sdpa():
            return plain()

    def timed(fn):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    with torch.no_grad():
        ref = plain()
        out = patched()  # tunes every attention problem of the model
        torch.cuda.synchronize()
        rel = float((out.float() - ref.float()).abs().sum() / ref.float().abs().sum())
        tunings = da.stats()["tunings"]
        times = {"plain": [], "patched": []}
        for _ in range(args.samples):
            times["plain"].append(timed(plain))
            times["patched"].append(timed(patched))
    result = {
        "device": torch.cuda.get_device_name(device), "torch": torch.__version__,
        "model": f"WanTransformer3DModel, {args.layers} layers, 12x128 heads, latent {args.frames}x{args.height}x{args.width}",
        "tokens": args.frames * (args.height // 2) * (args.width // 2),
        "plain_ms": statistics.median(times["plain"]), "patched_ms": statistics.median(times["patched"]),
        "samples": times, "tunings": tunings, "output_rel_l1_vs_plain": rel,
        "decisions": [{"problem": d.key["problem"], "backend": d.backend} for d in da.DecisionCache().entries().values()],
    }
    result["speedup"] = result["plain_ms"] / result["patched_ms"]
    text_out = json.dumps(result, indent=1)
    print(text_out)
    if args.out:
        Path(args.out).write_text(text_out + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
