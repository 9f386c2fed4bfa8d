#!/usr/bin/env python3
"""End to end: diffusers models with and without the dispatcher, eager and ``torch.compile``'d.

Models (randomly initialised, ``--models``):

- ``wan``: ``WanTransformer3DModel`` with Wan2.1-1.3B's geometry (12 heads x 128, 1536 wide,
  FFN 8960, 512 text tokens of width 4096) and ``--blocks`` blocks, once per ``--tokens`` value
  (1,560 = one 480x832 frame; 32,760 = 81 frames at 480x832);
- ``flux``: ``FluxTransformer2DModel`` with FLUX.1-dev's geometry (24 heads x 128, 3072 wide,
  guidance embedding) and ``--flux-blocks`` double/single blocks, ``--flux-tokens`` image tokens
  (4,096 = 1024x1024) and 512 text tokens;
- ``unet``: ``UNet2DConditionModel`` with SDXL's block configuration (320/640/1280 channels,
  heads 5/10/20 of 64, cross-attention width 2048, text_time conditioning) and
  ``--unet-transformer-layers`` transformer layers per block (SDXL: 1,2,10), latent 128x128,
  77 text tokens, batch 2: many small attention calls.

For each model, under ``torch.no_grad``, bf16 on CUDA and fp32 on a CPU:

1. **Attention census.** One forward through a counting wrapper around
   ``torch.nn.functional.scaled_dot_product_attention``: how many calls, and each distinct
   problem (shapes, strides, mask, dtype) with its count and the dispatcher's decision.
2. **End to end**, per mode (``eager``, ``compile``), two variants: ``plain`` (no patch) and
   ``dispatcher`` (the process-wide ``da.patch_sdpa()`` handle). The first call (tuning,
   compilation) and ``--warmup`` more are excluded and reported apart; then ``--iters`` forwards,
   each timed alone (CUDA events, or ``perf_counter`` on a CPU) after a synchronisation; the
   median is reported, with the host time of the call (time until the Python call returns).
   Eager variants are interleaved; compiled ones run one after the other, each compiled afresh
   (``torch._dynamo.reset()``, ``dynamic=False``), with Dynamo's graph and graph-break counts.
3. **Explanation.** Each distinct problem is timed on its own (same shapes and strides) through
   SDPA directly and through the patched SDPA (a cache hit), interleaved, back-to-back calls
   (``diffsynth_attention.tuning.timing.Timer``), eager and, in ``compile`` mode, inside a
   compiled one-call function. ``attention_ms_*`` = sum over problems of count x time;
   ``non_attention_ms_*`` = end-to-end minus that; ``unexplained_diff_ms`` = the end-to-end
   difference the attention calls' own times do not account for.
4. ``--profile``: ``torch.profiler`` over ``--profile-iters`` forwards of each variant:
   top kernels/operators by self device time (self CPU time on a CPU), the sum of kernel time
   and of attention kernel time per forward.

Writes ``<device>-<date>-e2e[-TAG].{json,md}`` under ``--out`` (default benchmarks/results),
after every model, so a run cut short keeps what it measured. ``--small`` (tiny configs, for a
CPU smoke test) names its files ``...-e2e-smoke...``.

On the GPU machine (see ../shared/gpu/README.md) diffusers lies in /tmp/diff-site and must be
imported before the kernel packages: run with ``PYTHONPATH=/tmp/diff-site:$PWD`` and
``DA_LATE_PATH=/tmp/gpu-site:/tmp/gpu-site/nvidia_cutlass_dsl/dsl_packages`` (appended to
``sys.path`` after diffusers is imported). A device call is limited to 10 minutes, and its $OUT
starts empty, so split the run and merge in /tmp (kept while the machine stays warm)::

    PYTHONPATH=/tmp/diff-site:$PWD DA_LATE_PATH=/tmp/gpu-site:/tmp/gpu-site/nvidia_cutlass_dsl/dsl_packages \
      python3 scripts/bench_e2e.py --device cuda --models wan --profile --out /tmp/e2e --append; cp /tmp/e2e/* $OUT/
    (the same with --models flux,unet)

CPU smoke test: ``PYTHONPATH=$PWD python scripts/bench_e2e.py --small --device cpu --out /tmp/e2e-smoke``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness.e2e_attention import ORIGINAL_SDPA as _ORIGINAL_SDPA  # noqa: E402  (before anything can patch SDPA)
from harness.e2e_attention import (census, dynamo_counts, first_calls, Patch, profile_summary,  # noqa: E402
                           rel_l1, time_problems_compiled, time_problems_eager, timed_forward)
from harness.e2e_models import build_flux, build_unet, build_wan, device_name, sync  # noqa: E402
from harness.e2e_loop import Routed, resolution_loop  # noqa: E402
from harness.e2e_report import explain_mode, fmt, write_markdown  # noqa: E402


# --------------------------------------------------------------------------------------------
# set-up
# --------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)")
    p.add_argument("--models", default="wan,flux,unet", help="comma list of wan, flux, unet")
    p.add_argument("--tokens", default=None, help="Wan video tokens, comma list (default 1560,32760; --small: 64)")
    p.add_argument("--blocks", type=int, default=None, help="Wan transformer blocks (default 4; --small: 1)")
    p.add_argument("--flux-tokens", type=int, default=None, help="FLUX image tokens (default 4096 = 1024x1024)")
    p.add_argument("--flux-blocks", default=None, help="FLUX double,single blocks (default 1,2)")
    p.add_argument("--unet-transformer-layers", default=None,
                   help="transformer layers in the UNet's 3 blocks (SDXL: 1,2,10; default 1,2,4: 68 attention calls)")
    p.add_argument("--unet-layers-per-block", type=int, default=None, help="resnet layers per UNet block (SDXL: 2)")
    p.add_argument("--unet-latent", type=int, default=None, help="latent side (SDXL 1024px: 128)")
    p.add_argument("--batch-unet", type=int, default=2, help="UNet batch (2: classifier-free guidance)")
    p.add_argument("--iters", type=int, default=None, help="timed forwards per variant (default 10; --small: 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed forwards after the first (default 2; --small: 1)")
    p.add_argument("--samples", type=int, default=None, help="samples per problem in per-call timing (default 15)")
    p.add_argument("--compile", dest="compile", action=argparse.BooleanOptionalAction, default=True,
                   help="include the torch.compile'd mode (default on)")
    p.add_argument("--eager", dest="eager", action=argparse.BooleanOptionalAction, default=True,
                   help="include the eager mode (default on)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (default None; e.g. max-autotune-no-cudagraphs)")
    p.add_argument("--compiled-attention", action=argparse.BooleanOptionalAction, default=True,
                   help="in compile mode, also time each attention problem inside a compiled function")
    p.add_argument("--profile", action=argparse.BooleanOptionalAction, default=False, help="torch.profiler summaries")
    p.add_argument("--profile-iters", type=int, default=2)
    p.add_argument("--profile-top", type=int, default=12)
    p.add_argument("--small", action="store_true", help="tiny configs (CPU smoke test)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--tag", default="", help="suffix of the output file names")
    p.add_argument("--append", action="store_true",
                   help="keep the models of an existing output file of the same name (those not run again); "
                        "for a run split over several commands")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--loop-iters", type=int, default=5, help="timed forwards per resolution in the 6-resolution loop")
    p.add_argument("--resolutions", action=argparse.BooleanOptionalAction, default=False,
                   help="also the 6-resolution loop (one Wan model, default torch.compile, plain and routed)")
    a = p.parse_args(argv)
    small = a.small
    a.tokens = [int(t) for t in (a.tokens or ("64" if small else "1560,32760")).split(",") if t]
    a.blocks = a.blocks or (1 if small else 4)
    a.flux_tokens = a.flux_tokens or (64 if small else 4096)
    a.flux_blocks = tuple(int(x) for x in (a.flux_blocks or ("1,1" if small else "1,2")).split(","))
    a.unet_transformer_layers = tuple(int(x) for x in (a.unet_transformer_layers or ("1,1" if small else "1,2,4")).split(","))
    a.unet_layers_per_block = a.unet_layers_per_block or (1 if small else 2)
    a.unet_latent = a.unet_latent or (16 if small else 128)
    a.iters = a.iters or (3 if small else 10)
    a.warmup = a.warmup if a.warmup is not None else (1 if small else 2)
    a.samples = a.samples or (3 if small else 15)
    a.models = [m.strip() for m in a.models.split(",") if m.strip()]
    for m in a.models:
        if m not in ("wan", "flux", "unet"):
            p.error(f"--models: unknown model {m!r} (wan, flux, unet)")
    a.modes = [m for m, on in (("eager", a.eager), ("compile-default", a.compile), ("compile", a.compile)) if on]
    if not a.modes:
        p.error("--no-eager and --no-compile leave nothing to run")
    return a


def import_everything():
    """diffusers first, then the kernel packages (DA_LATE_PATH), then this library."""
    import diffusers  # noqa: F401
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel, WanTransformer3DModel  # noqa: F401
    import diffusers.models.attention_dispatch  # noqa: F401  (decides which attention packages it sees now)

    # flash-attn-4 installs a bare `flash_attn` namespace that makes diffusers import FA2 modules
    # that are not there; DA_LATE_PATH adds the kernel packages only after diffusers is imported.
    for extra in filter(None, os.environ.get("DA_LATE_PATH", "").split(":")):
        sys.path.append(extra)
    import diffsynth_attention as da
    return diffusers, da


def run_mode(mode, model, inputs, ref, patch, device, args, da):
    """Both variants of one mode: {'plain': {...}, 'dispatcher': {...}}."""
    forward = lambda m: (lambda: m(**inputs())[0])  # noqa: E731
    res = {}
    fns = {}
    if mode == "eager":
        for variant in ("plain", "dispatcher"):
            patch.set(variant == "dispatcher")
            before = da.stats()
            try:
                with torch.no_grad():
                    out, first = first_calls(forward(model), device, args.warmup)
                after = da.stats()
                res[variant] = {"first_call_s": first, "output_rel_l1_vs_eager_plain": rel_l1(out, ref),
                                "tunings_in_first_calls": after["tunings"] - before["tunings"],
                                "tuning_seconds": after["tuning_seconds"] - before["tuning_seconds"],
                                "device_ms": [], "host_ms": []}
                fns[variant] = forward(model)
            except Exception as exc:
                res[variant] = {"error": f"{type(exc).__name__}: {str(exc)[:600]}", "traceback": traceback.format_exc()[-2000:]}
        patch.set(False)
        live = [v for v in ("plain", "dispatcher") if v in fns]
        with torch.no_grad():
            for i in range(args.iters):
                for variant in (live if i % 2 == 0 else live[::-1]):
                    patch.set(variant == "dispatcher")
                    d, h = timed_forward(fns[variant], device)
                    res[variant]["device_ms"].append(d)
                    res[variant]["host_ms"].append(h)
            if args.profile:
                for variant in live:
                    patch.set(variant == "dispatcher")
                    res[variant]["profile"] = profile_summary(fns[variant], device, args.profile_iters, args.profile_top)
        patch.set(False)
    else:
        res = run_compiled(mode, model, forward, inputs, ref, patch, device, args, da)
    for r in res.values():
        if r.get("device_ms"):
            r["median_ms"] = statistics.median(r["device_ms"])
            r["median_host_ms"] = statistics.median(r["host_ms"])
            q = statistics.quantiles(r["device_ms"], n=4) if len(r["device_ms"]) > 1 else [r["median_ms"]] * 3
            r["spread_ms"] = [q[0], q[2]]  # interquartile range
    return res


COMPILE_DYNAMIC = {"compile": False, "compile-default": None}


def run_compiled(mode, model, forward, inputs, ref, patch, device, args, da):
    """Both variants compiled (``compile``: dynamic=False; ``compile-default``: torch.compile's
    default), then timed interleaved: plain, routed, routed, plain, ... one forward each."""
    from torch._dynamo.utils import counters

    from harness.bench import sdpa_wrapper

    patch.set(False)
    torch._dynamo.reset()
    counters.clear()
    # The pass-through wrapper in front of SDPA for both variants alike (a routed graph puts it there).
    F.scaled_dot_product_attention = sdpa_wrapper
    res, fns = {}, {}
    try:
        for variant in ("plain", "dispatcher"):
            before = da.stats()
            try:
                target = model if variant == "plain" else Routed(model, da)
                fn = forward(torch.compile(target, dynamic=COMPILE_DYNAMIC[mode], mode=args.compile_mode))
                with torch.no_grad():
                    out, first = first_calls(fn, device, args.warmup)
                after = da.stats()
                res[variant] = {"first_call_s": first, "output_rel_l1_vs_eager_plain": rel_l1(out, ref),
                                "tunings_in_first_calls": after["tunings"] - before["tunings"],
                                "device_ms": [], "host_ms": []}
                fns[variant] = fn
            except Exception as exc:
                res[variant] = {"error": f"{type(exc).__name__}: {str(exc)[:600]}",
                                "traceback": traceback.format_exc()[-2000:]}
        with torch.no_grad():  # both compiled once more with the wrapper in place, then stable
            for fn in fns.values():
                fn()
        res_dynamo = dynamo_counts()
        live = list(fns)
        with torch.no_grad():
            for i in range(args.iters):
                for variant in (live if i % 2 == 0 else live[::-1]):
                    d, h = timed_forward(fns[variant], device)
                    res[variant]["device_ms"].append(d)
                    res[variant]["host_ms"].append(h)
            if args.profile:
                for variant in live:
                    res[variant]["profile"] = profile_summary(fns[variant], device, args.profile_iters, args.profile_top)
        for variant in live:
            res[variant]["dynamo"] = res_dynamo
            res[variant]["dynamo_after_timing"] = dynamo_counts()
    finally:
        F.scaled_dot_product_attention = _ORIGINAL_SDPA
        torch._dynamo.reset()
    return res


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("DIFFSYNTH_ATTENTION_CACHE_DIR", tempfile.mkdtemp(prefix="da-e2e-"))
    diffusers, da = import_everything()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(device if device.index is not None else torch.device("cuda", 0))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    now = datetime.datetime.now(datetime.timezone.utc)
    dev_name = device_name(device)
    stem = f"{dev_name.replace('NVIDIA ', '').replace(' ', '-')}-{now.date().isoformat()}-e2e"
    stem += "-smoke" if args.small else ""
    stem += f"-{args.tag}" if args.tag else ""
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {
        "environment": {"date": now.isoformat(timespec="seconds"), "device": dev_name, "torch": torch.__version__,
                        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
                        "diffusers": diffusers.__version__, "diffsynth_attention": da.__version__,
                        "python": platform.python_version(), "dtype": str(dtype).replace("torch.", ""),
                        "available_backends": {k: v for k, v in da.available_backends().items()},
                        "cache_dir": os.environ["DIFFSYNTH_ATTENTION_CACHE_DIR"]},
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
        "notes": [
            "plain: no patch; dispatcher: the process-wide da.patch_sdpa() handle (F.scaled_dot_product_attention -> attention_forward).",
            "End-to-end samples: one forward each after a synchronisation, CUDA events (perf_counter on a CPU); median. "
            "host_ms: time until the Python call returned (close to device ms when the host is the bottleneck).",
            "Per-problem times: back-to-back calls of one problem (Timer), so host overhead that a model would hide behind "
            "other kernels counts here; compiled per-problem times come from a compiled one-call function.",
            "Every mode is timed interleaved (plain, dispatcher, dispatcher, plain, ...). compile: dynamic=False; "
            "compile-default: torch.compile's default (automatic dynamic shapes). The compiled dispatcher variant is the "
            "model wrapped in `with da.patch_sdpa():` (routed in its own graph), so both graphs stay compiled side by side.",
        ],
        "models": [],
    }
    if args.resolutions:
        print("== 6-resolution loop", flush=True)
        result["resolution_loop"] = resolution_loop(args, device, dtype, da)
        print(json.dumps(result["resolution_loop"])[:2000], flush=True)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    kept = []
    if args.append and json_path.exists():
        kept = json.loads(json_path.read_text()).get("models", [])
    print(f"device {dev_name}, {result['environment']['dtype']}; modes {args.modes}; writing {json_path}", flush=True)
    patch = Patch(da)

    builders = []
    for m in args.models:
        if m == "wan":
            builders += [(lambda tok=tok: build_wan(args, tok, device, dtype)) for tok in args.tokens]
        elif m == "flux":
            builders.append(lambda: build_flux(args, device, dtype))
        else:
            builders.append(lambda: build_unet(args, device, dtype))

    fresh: list = []
    for build in builders:
        torch.manual_seed(args.seed)
        entry: dict = {"settings": result["settings"]}
        fresh.append(entry)
        t_model = time.perf_counter()
        try:
            name, model, inputs, desc = build()
            entry.update(name=name, description=desc,
                         parameters=sum(p.numel() for p in model.parameters()))
            print(f"== {name}: {entry['parameters'] / 1e6:.1f} M parameters", flush=True)
            with torch.no_grad():
                ref = model(**inputs())[0]
                sync(device)
                entry["attention_calls"], problems = census(lambda: model(**inputs()))
            entry["problems"] = problems
            print(f"   {entry['attention_calls']} attention calls, {len(problems)} distinct problems", flush=True)
            entry["modes"], entry["explanation"] = {}, {}
            phases = entry["phase_seconds"] = {}
            for i, mode in enumerate(args.modes):
                # the model's first dispatcher call tunes (and is excluded); then each problem alone
                t0 = time.perf_counter()
                entry["modes"][mode] = run_mode(mode, model, inputs, ref, patch, device, args, da)
                phases[f"{mode}_e2e"] = time.perf_counter() - t0
                if i == 0:
                    t0 = time.perf_counter()
                    time_problems_eager(problems, da, patch, device, args.samples)
                    phases["eager_per_problem"] = time.perf_counter() - t0
                if mode == "compile" and args.compiled_attention:  # dynamic=False: per-problem compiled times
                    t0 = time.perf_counter()
                    time_problems_compiled(problems, patch, device, args.samples, args.compile_mode)
                    phases["compiled_per_problem"] = time.perf_counter() - t0
                entry["explanation"][mode] = e = explain_mode(mode, entry["modes"][mode], problems)
                print(f"   {mode}: plain {fmt(e.get('plain_ms'))} ms, dispatcher {fmt(e.get('dispatcher_ms'))} ms, "
                      f"speedup {fmt(e.get('speedup'))}; attention sdpa {fmt(e.get('attention_ms_sdpa'))} / disp "
                      f"{fmt(e.get('attention_ms_dispatcher'))} ms; unexplained {fmt(e.get('unexplained_diff_ms'))} ms", flush=True)
                for variant, r in entry["modes"][mode].items():
                    if "error" in r:
                        print(f"   {mode} {variant}: ERROR {r['error'][:300]}", flush=True)
            del model, ref
        except Exception as exc:
            entry["error"] = f"{type(exc).__name__}: {str(exc)[:600]}"
            entry["traceback"] = traceback.format_exc()[-3000:]
            print(f"   ERROR {entry['error']}", flush=True)
        finally:
            patch.set(False)
            torch._dynamo.reset()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        entry["seconds"] = time.perf_counter() - t_model
        result["stats"] = da.stats()
        names = {m.get("name") for m in fresh}
        result["models"] = [m for m in kept if m.get("name") not in names] + fresh
        json_path.write_text(json.dumps(result, indent=1, default=str) + "\n")
        write_markdown(result, md_path)
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
