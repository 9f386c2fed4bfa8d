#!/usr/bin/env python3
"""Wall time of `diffsynth-attention warm --preset all` on one GPU against all GPUs (torchrun).

Each run starts from an empty cache, so both pay every tuning and FlashAttention-4 compilation.
Usage: python scripts/parallel_warm.py OUT.json
"""
import json
import os
import subprocess
import sys
import tempfile
import time

import torch


LOGS = []


def timed(cmd, env, label):
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    LOGS.append(f"== {label}: {wall:.1f} s, rc {proc.returncode}\n{proc.stderr}")
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-3000:])
    return wall, proc.returncode


def main():
    n = torch.cuda.device_count()
    warm = ["-m", "diffsynth_attention", "-v", "warm", "--preset", "all", "--no-progress", "--json"]
    result = {"device": torch.cuda.get_device_name(0), "gpus": n, "torch": torch.__version__}
    env = dict(os.environ, DIFFSYNTH_ATTENTION_CACHE_DIR=tempfile.mkdtemp(), CUDA_VISIBLE_DEVICES="0")
    result["gpus_1_wall_s"], result["gpus_1_rc"] = timed([sys.executable] + warm, env, "1 GPU")
    if n >= 2:
        env = dict(os.environ, DIFFSYNTH_ATTENTION_CACHE_DIR=tempfile.mkdtemp())
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"] + warm
        result[f"gpus_{n}_wall_s"], result[f"gpus_{n}_rc"] = timed(cmd, env, f"{n} GPUs")
        entries = [f for f in os.listdir(os.path.join(env["DIFFSYNTH_ATTENTION_CACHE_DIR"], "v2")) if f.endswith(".json")]
        result[f"gpus_{n}_decisions_in_cache"] = len(entries)
        result["speedup"] = result["gpus_1_wall_s"] / result[f"gpus_{n}_wall_s"]
    text = json.dumps(result, indent=1)
    print(text)
    if len(sys.argv) > 1:
        open(sys.argv[1], "w").write(text + "\n")
        open(sys.argv[1].replace(".json", ".log"), "w").write("\n".join(LOGS))


if __name__ == "__main__":
    main()
