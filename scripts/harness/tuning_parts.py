"""The parts of ``scripts/tuning_report.py``: its problem lists (the suite, cut for a CPU, and the
extra problems), inputs and interleaved timing, the result files, and the hidden children it runs
in fresh processes (``python scripts/tuning_report.py _tune ...``)."""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "tuning_report.py"  # the hidden children are its sub-commands

OFFSETS = (-0.40, -0.15, -0.05, 0.05, 0.15, 0.40)
# Problems the issue measured beyond the suite (``--extra``).
EXTRA = [{"name": "wan14b_720p_self", "model": "Wan2.1 14B, 1280x720, 81 frames", "batch": 1, "heads_q": 40, "heads_kv": 40,
          "seq_q": 75600, "seq_kv": 75600, "head_dim": 128, "causal": False, "dtype": "bfloat16"}]

# `repeat` (issue 21): problems the suite (diffsynth_attention/data/diffsynth_shapes.json) lacks; layout b n s d.
REPEAT_EXTRA = [
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
# Issue 29's "at least 8 new problems": self and cross, fp16 and bf16, head dims 64/80/96/128, long
# video (``tuning_report.py repeat --new``).
REPEAT_NEW = [
    {"name": "wan22_5b_720p_self", "model": "Wan 2.2 5B, 720p: long video self-attention", "batch": 1, "heads_q": 24,
     "heads_kv": 24, "seq_q": 27280, "seq_kv": 27280, "head_dim": 128, "causal": False, "dtype": "bfloat16"},
    {"name": "wan22_5b_720p_cross", "model": "Wan 2.2 5B, 720p: text cross-attention", "batch": 1, "heads_q": 24,
     "heads_kv": 24, "seq_q": 27280, "seq_kv": 512, "head_dim": 128, "causal": False, "dtype": "bfloat16"},
    {"name": "sd3_1024_self", "model": "SD3 1024x1024, joint image + text tokens, CFG batch", "batch": 2, "heads_q": 24,
     "heads_kv": 24, "seq_q": 4429, "seq_kv": 4429, "head_dim": 64, "causal": False, "dtype": "float16"},
    {"name": "sdxl_1024_mid_cross", "model": "SDXL 1024x1024, 32x32 level: text cross-attention", "batch": 2, "heads_q": 20,
     "heads_kv": 20, "seq_q": 1024, "seq_kv": 77, "head_dim": 64, "causal": False, "dtype": "float16"},
    {"name": "hd80_sd15_1024_cross", "model": "head dim 80: SD 1.5 at 1024x1024, text cross-attention", "batch": 2,
     "heads_q": 8, "heads_kv": 8, "seq_q": 4096, "seq_kv": 77, "head_dim": 80, "causal": False, "dtype": "float16"},
    {"name": "hd96_4096_cross", "model": "head dim 96, bf16: 4,096 queries over 512 text tokens", "batch": 1, "heads_q": 16,
     "heads_kv": 16, "seq_q": 4096, "seq_kv": 512, "head_dim": 96, "causal": False, "dtype": "bfloat16"},
    {"name": "flux_512", "model": "FLUX.1 512x512 (1,024 image + 512 text)", "batch": 1, "heads_q": 24, "heads_kv": 24,
     "seq_q": 1536, "seq_kv": 1536, "head_dim": 128, "causal": False, "dtype": "bfloat16"},
    {"name": "ltx_video_self", "model": "LTX-Video-like: 6,144 video tokens, 32 heads of 64", "batch": 1, "heads_q": 32,
     "heads_kv": 32, "seq_q": 6144, "seq_kv": 6144, "head_dim": 64, "causal": False, "dtype": "bfloat16"},
]
REPEAT_CPU_EXTRA = [{"name": "issue21_cpu", "model": "the issue's CPU problem: randn(1, 3, 41, 16) fp32", "batch": 1, "heads_q": 3,
              "heads_kv": 3, "seq_q": 41, "seq_kv": 41, "head_dim": 16, "causal": False, "dtype": "float32"}]


# -- shared helpers ------------------------------------------------------------------------------------
def _torch():
    import torch

    return torch


def device_label(device) -> str:
    torch = _torch()
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace("NVIDIA ", "").replace(" ", "-")
    return device.type


def problems(args) -> list:
    from . import bench

    shapes = bench.shapes(args.preset, args.shapes, default=["cpu"] if args.device == "cpu" else ["all"])
    if getattr(args, "extra", False):
        shapes = shapes + EXTRA
    if getattr(args, "cmd", None) == "repeat" and not args.no_extra:  # the problems the suite lacks (issue 21)
        shapes = shapes + extra_problems(_torch().device(args.device))
    if getattr(args, "new", False):  # issue 29's new problems
        device = _torch().device(args.device)
        if device.type == "cpu":
            from .bench import scale_for_cpu

            shapes = shapes + [scale_for_cpu(s) for s in REPEAT_NEW]
        else:
            shapes = shapes + [dict(s) for s in REPEAT_NEW]
    if args.only:
        wanted = set(args.only.split(","))
        shapes = [s for s in shapes if s["name"] in wanted or s["name"].split("@")[0] in wanted]
    if args.max_seq:
        shapes = [{**s, "seq_q": min(s["seq_q"], args.max_seq), "seq_kv": min(s["seq_kv"], args.max_seq)} for s in shapes]
    if args.max_heads:
        shapes = [{**s, "heads_q": min(s["heads_q"], args.max_heads),
                   "heads_kv": min(s["heads_kv"], args.max_heads) if s["heads_q"] == s["heads_kv"] else 1} for s in shapes]
    return shapes


def fmt(x, spec: str = ".4g") -> str:
    return "-" if x is None else format(x, spec)


def sync(device) -> None:
    from .bench import sync as run

    run(device)


def fresh_dispatcher(policy=None):
    from .bench import fresh_dispatcher as fresh

    return fresh(policy, prefix="da-tuning-report-")


def inputs(shape, device, seed=0):
    from . import bench

    return bench.inputs(shape, device, generator=_torch().Generator(device=device).manual_seed(seed))


def interleaved(methods: dict, device, samples: int = 15, target_ms: float = 2.0) -> dict:
    """The benchmarks' interleaved timing, without autograd."""
    from .bench import interleaved as run

    with _torch().no_grad():
        return run(methods, device, samples, target_ms)


def decision_summary(info) -> dict:
    d = info.decision
    out = {"backend": info.backend, "source": info.source, "key_id": info.key_id,
           "cudagraph_backend": info.backend if d is None else d.backend_for("cudagraph")}
    if d is not None:
        out.update(tuning_seconds=d.tuning_seconds, compile_seconds=d.compile_seconds, confirmation=d.confirmation,
                   provisional=d.provisional, modes=dict(d.modes),
                   candidates={n: {"status": c.status, "time_ms": c.time_ms, "predicted_ms": c.predicted_ms,
                                   "first_call_ms": c.first_call_ms, "error": c.error, "reason": c.reason}
                               for n, c in d.candidates.items() if c.status != "unsupported"})
    return out


def write(result: dict, lines: list, out_dir: Path, stem: str) -> tuple:
    out_dir.mkdir(parents=True, exist_ok=True)
    jpath, mpath = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    jpath.write_text(json.dumps(result, indent=1, default=str) + "\n")
    mpath.write_text("\n".join(lines) + "\n")
    print(mpath.read_text())
    return jpath, mpath


def environment(device) -> dict:
    from .bench import environment as env

    return env(device)


def child_env(cache_dir: str) -> dict:
    env = dict(os.environ)
    env["DIFFSYNTH_ATTENTION_CACHE_DIR"] = cache_dir
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def run_child(args_list: list, cache_dir: str, timeout: float = 3600) -> dict:
    """Run this script's hidden sub-command in a fresh process; return its JSON result and wall time."""
    with tempfile.NamedTemporaryFile("r", suffix=".json", delete=False) as fh:
        out = fh.name
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(SCRIPT), *args_list, "--result", out],
                          env=child_env(cache_dir), capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"child {args_list[0]} failed ({proc.returncode}): {proc.stderr[-3000:]}")
    data = json.loads(Path(out).read_text())
    os.unlink(out)
    data["wall_s"] = wall
    return data


def shapes_file(shapes: list) -> str:
    fd, path = tempfile.mkstemp(prefix="da-shapes-", suffix=".json")
    with os.fdopen(fd, "w") as fh:
        json.dump({"shapes": shapes}, fh)
    atexit.register(_unlink, path)
    return path


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


# -- hidden children ---------------------------------------------------------------------------------------
def child_tune(args) -> dict:
    """Tune every problem (the cache folder is empty): its decision; with ``--own-samples N``, also
    every servable backend timed directly in this same process right after (N interleaved samples),
    so a decision can be judged against the conditions it was taken in."""
    import diffsynth_attention as da
    from . import bench

    torch = _torch()
    device = torch.device(args.device)
    rows = []
    for shape in bench.shapes(file=args.shapes):
        q, k, v, kw = inputs(shape, device)
        with torch.no_grad():
            info = da.explain(q, k, v, **kw)
        row = {"name": shape["name"], **decision_summary(info)}
        if args.own_samples:
            methods, _ = bench.servable(q, k, v, **kw)
            if info.backend not in methods:
                fn = bench.backend_call(info.backend, q, k, v, **kw)
                if fn is not None:
                    methods[info.backend] = fn
            row["own_times_ms"] = interleaved(methods, device, args.own_samples)
            del methods
        rows.append(row)
        del q, k, v
    return {"problems": rows}


def own_process_ratio(run_row: dict) -> float | None:
    """A child's decision over the fastest backend timed in that same process (None: not timed)."""
    own = run_row.get("own_times_ms")
    if not own or run_row["backend"] not in own:
        return None
    return own[run_row["backend"]] / min(own.values())


def child_first_calls(args) -> dict:
    """The first call of every problem in this process: wall time, backend and source."""
    torch = _torch()
    device = torch.device(args.device)
    torch.zeros(1, device=device)  # the device context, outside the timings
    sync(device)
    import diffsynth_attention as da
    from . import bench

    rows = []
    for shape in bench.shapes(file=args.shapes):
        q, k, v, kw = inputs(shape, device)
        sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            da.attention_forward(q, k, v, **kw)
        sync(device)
        first = time.perf_counter() - t0
        with torch.no_grad():
            info = da.explain(q, k, v, **kw)
        rows.append({"name": shape["name"], "first_call_s": first, **decision_summary(info)})
        del q, k, v
    return {"problems": rows, "stats": da.stats()}


def child_first_result(args) -> dict:
    """Seconds from ``import torch`` done to the first attention result, decisions all cached."""
    torch = _torch()
    t_torch = time.perf_counter()
    device = torch.device(args.device)
    import diffsynth_attention as da
    from . import bench

    shape = bench.shapes(file=args.shapes)[0]
    q, k, v, kw = inputs(shape, device)
    with torch.no_grad():
        da.attention_forward(q, k, v, **kw)
    sync(device)
    elapsed = time.perf_counter() - t_torch
    info = da.explain(q, k, v, **kw)
    kernel_modules = sorted(m for m in ("flash_attn", "flash_attn.cute", "flash_attn_interface", "sageattention", "xformers")
                            if m in sys.modules)
    return {"name": shape["name"], "seconds_after_import_torch": elapsed, "backend": info.backend, "source": info.source,
            "kernel_modules_imported": kernel_modules, "stats": da.stats()}


def extra_problems(device) -> list:
    """REPEAT_EXTRA (cut to CPU size on a CPU, plus REPEAT_CPU_EXTRA)."""
    if device.type != "cpu":
        return [dict(s) for s in REPEAT_EXTRA]
    from .bench import scale_for_cpu

    return [dict(s) for s in REPEAT_CPU_EXTRA] + [scale_for_cpu(s) for s in REPEAT_EXTRA]
