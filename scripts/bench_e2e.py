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
import math
import os
import platform
import re
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

_ORIGINAL_SDPA = F.scaled_dot_product_attention  # captured before anything can patch it
ATTENTION_KERNEL = re.compile(r"flash|fmha|attention|attn|sdpa|cudnn.*(mha|sdp)", re.IGNORECASE)


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


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}"


def factor2(n: int):
    """a, b with a * b == n, a <= b, a as close to sqrt(n) as divisors allow."""
    a = int(math.isqrt(n))
    while n % a:
        a -= 1
    return a, n // a


# --------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------
def build_wan(args, tokens, device, dtype, model=None):
    from diffusers import WanTransformer3DModel

    if args.small:
        cfg = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4,
                   text_dim=64, freq_dim=32, ffn_dim=128, num_layers=args.blocks, cross_attn_norm=True, eps=1e-6)
        text_len = 16
    else:  # Wan2.1 T2V 1.3B
        cfg = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                   text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=args.blocks, cross_attn_norm=True, eps=1e-6)
        text_len = 512
    if tokens % 1560 == 0 and not args.small:
        frames, h, w = tokens // 1560, 60, 104  # 480x832 px, VAE /8 spatial, patch 2x2
    else:
        a, b = factor2(tokens)
        frames, h, w = 1, 2 * a, 2 * b
    if model is None:
        with torch.device(device):
            model = WanTransformer3DModel(**cfg)
        model = model.to(dtype=dtype).eval()
    x = torch.randn(1, cfg["in_channels"], frames, h, w, device=device, dtype=dtype)
    t = torch.tensor([500], device=device)
    text = torch.randn(1, text_len, cfg["text_dim"], device=device, dtype=dtype)

    def inputs():
        return dict(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)

    desc = {"class": "WanTransformer3DModel", "config": cfg, "latent": [frames, h, w], "tokens": tokens, "text_tokens": text_len}
    return f"wan-{tokens}", model, inputs, desc


def build_flux(args, device, dtype):
    from diffusers import FluxTransformer2DModel

    double, single = args.flux_blocks
    if args.small:
        cfg = dict(patch_size=1, in_channels=16, num_layers=double, num_single_layers=single, attention_head_dim=32,
                   num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True,
                   axes_dims_rope=(8, 12, 12))
        text_len = 16
    else:  # FLUX.1-dev
        cfg = dict(patch_size=1, in_channels=64, num_layers=double, num_single_layers=single, attention_head_dim=128,
                   num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                   axes_dims_rope=(16, 56, 56))
        text_len = 512
    n = args.flux_tokens
    gh, gw = factor2(n)
    with torch.device(device):
        model = FluxTransformer2DModel(**cfg)
    model = model.to(dtype=dtype).eval()
    x = torch.randn(1, n, cfg["in_channels"], device=device, dtype=dtype)
    text = torch.randn(1, text_len, cfg["joint_attention_dim"], device=device, dtype=dtype)
    pooled = torch.randn(1, cfg["pooled_projection_dim"], device=device, dtype=dtype)
    img_ids = torch.zeros(gh, gw, 3, device=device)
    img_ids[..., 1] = torch.arange(gh, device=device)[:, None]
    img_ids[..., 2] = torch.arange(gw, device=device)[None, :]
    img_ids = img_ids.reshape(n, 3).to(dtype)
    txt_ids = torch.zeros(text_len, 3, device=device, dtype=dtype)
    t = torch.tensor([0.5], device=device, dtype=dtype)
    g = torch.tensor([3.5], device=device, dtype=dtype)

    def inputs():
        return dict(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled, timestep=t, img_ids=img_ids,
                    txt_ids=txt_ids, guidance=g, return_dict=False)

    cfg_out = dict(cfg, axes_dims_rope=list(cfg["axes_dims_rope"]))
    desc = {"class": "FluxTransformer2DModel", "config": cfg_out, "image_tokens": n, "grid": [gh, gw], "text_tokens": text_len}
    return f"flux-{n}", model, inputs, desc


def build_unet(args, device, dtype):
    from diffusers import UNet2DConditionModel

    layers = args.unet_transformer_layers
    if args.small:  # as many levels as --unet-transformer-layers has entries (default 2: quicker to compile)
        levels = len(layers)
        cfg = dict(sample_size=args.unet_latent, in_channels=4, out_channels=4,
                   down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
                   up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
                   block_out_channels=(32,) + (64,) * (levels - 1), layers_per_block=args.unet_layers_per_block,
                   transformer_layers_per_block=layers, attention_head_dim=(1,) + (2,) * (levels - 1), cross_attention_dim=64,
                   use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                   projection_class_embeddings_input_dim=32 + 6 * 8, norm_num_groups=8)
        pooled_dim = 32
    else:  # SDXL base 1.0 (only the transformer layers per block may be reduced)
        cfg = dict(sample_size=args.unet_latent, in_channels=4, out_channels=4,
                   down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                   block_out_channels=(320, 640, 1280), layers_per_block=args.unet_layers_per_block,
                   transformer_layers_per_block=layers, attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                   use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                   projection_class_embeddings_input_dim=2816, norm_num_groups=32, upcast_attention=False)
        pooled_dim = 1280
    b, side = args.batch_unet, args.unet_latent
    with torch.device(device):
        model = UNet2DConditionModel(**cfg)
    model = model.to(dtype=dtype).eval()
    x = torch.randn(b, 4, side, side, device=device, dtype=dtype)
    t = torch.tensor([500] * b, device=device)
    text = torch.randn(b, 77, cfg["cross_attention_dim"], device=device, dtype=dtype)
    added = {"text_embeds": torch.randn(b, pooled_dim, device=device, dtype=dtype),
             "time_ids": torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]] * b, device=device, dtype=dtype)}

    def inputs():
        return dict(sample=x, timestep=t, encoder_hidden_states=text, added_cond_kwargs=added, return_dict=False)

    cfg_out = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}
    desc = {"class": "UNet2DConditionModel", "config": cfg_out, "latent": [b, 4, side, side], "text_tokens": 77}
    return f"unet-{side}", model, inputs, desc


# --------------------------------------------------------------------------------------------
# attention census and per-problem timing
# --------------------------------------------------------------------------------------------
def _tensor_sig(t):
    if t is None:
        return None
    return (tuple(t.shape), tuple(t.stride()), str(t.dtype).replace("torch.", ""))


def census(forward):
    """Run one forward with a counting SDPA; return (calls, [problem dicts with counts])."""
    seen: dict = {}
    order = []

    def counting(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        sig = (_tensor_sig(query), _tensor_sig(key), _tensor_sig(value), _tensor_sig(attn_mask) if isinstance(attn_mask, torch.Tensor) else None,
               float(dropout_p), bool(is_causal), None if scale is None else float(scale), bool(enable_gqa))
        if sig not in seen:
            seen[sig] = 0
            order.append(sig)
        seen[sig] += 1
        return _ORIGINAL_SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                              enable_gqa=enable_gqa)

    previous = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = counting
    try:
        forward()
    finally:
        F.scaled_dot_product_attention = previous
    problems = []
    for sig in order:
        q, k, v, m, dropout, causal, scale, gqa = sig
        problems.append({"q": {"shape": list(q[0]), "stride": list(q[1]), "dtype": q[2]},
                         "k": {"shape": list(k[0]), "stride": list(k[1]), "dtype": k[2]},
                         "v": {"shape": list(v[0]), "stride": list(v[1]), "dtype": v[2]},
                         "mask": None if m is None else {"shape": list(m[0]), "stride": list(m[1]), "dtype": m[2]},
                         "dropout_p": dropout, "is_causal": causal, "scale": scale, "enable_gqa": gqa,
                         "count": seen[sig],
                         "summary": f"b{q[0][0]} h{q[0][1]} {q[0][2]}x{k[0][2]} d{q[0][3]}" + ("" if m is None else " mask")})
    return sum(seen.values()), problems


def make_tensor(spec, device):
    dtype = getattr(torch, spec["dtype"])
    try:
        t = torch.empty_strided(spec["shape"], spec["stride"], device=device, dtype=dtype)
        if dtype == torch.bool:
            t.fill_(True)
        else:
            t.normal_()
        return t
    except Exception:  # overlapping strides (expanded masks): a dense copy of the same shape
        t = torch.ones(spec["shape"], device=device, dtype=dtype) if dtype == torch.bool else torch.randn(spec["shape"], device=device, dtype=dtype)
        return t


def problem_inputs(p, device):
    q, k, v = (make_tensor(p[n], device) for n in ("q", "k", "v"))
    m = make_tensor(p["mask"], device) if p["mask"] else None
    if m is not None and m.dtype != torch.bool:
        m.zero_()
    kw = dict(attn_mask=m, dropout_p=p["dropout_p"], is_causal=p["is_causal"], scale=p["scale"], enable_gqa=p["enable_gqa"])
    return q, k, v, kw


def interleaved(methods: dict, device, samples: int, target_ms: float = 2.0) -> dict:
    from harness.bench import interleaved as run

    return run(methods, device, samples, target_ms)


class Patch:
    """The process-wide ``da.patch_sdpa()`` handle, switched on and off between variants."""

    def __init__(self, da):
        self.da, self.handle = da, None

    def set(self, on: bool):
        if on and self.handle is None:
            self.handle = self.da.patch_sdpa()
        elif not on and self.handle is not None:
            self.handle.undo()
            self.handle = None


def time_problems_eager(problems, da, patch, device, samples):
    for p in problems:
        q, k, v, kw = problem_inputs(p, device)
        try:
            patch.set(True)
            ex = da.explain(q, k, v, attn_mask=kw["attn_mask"], scale=kw["scale"], is_causal=kw["is_causal"])
            p["decision"] = {"backend": ex.backend, "source": ex.source}
        except Exception as exc:
            p["decision"] = {"error": f"{type(exc).__name__}: {exc}"}
        patched = F.scaled_dot_product_attention  # the patch's wrapper while the handle is on
        from harness.bench import sdpa_routable
        p["routed"] = bool(sdpa_routable(q, k, v, kw["attn_mask"], kw["dropout_p"], kw["is_causal"], kw["scale"], kw["enable_gqa"]))
        with torch.no_grad():
            patched(q, k, v, **kw)  # tunes if the key is new (not timed)
            sync(device)
            r = interleaved({"sdpa": lambda: _ORIGINAL_SDPA(q, k, v, **kw), "dispatcher": lambda: patched(q, k, v, **kw)},
                            device, samples)
        p["eager_ms"] = r
        patch.set(False)


def time_problems_compiled(problems, patch, device, samples, compile_mode):
    """Each problem inside a compiled one-call function (static shapes: one graph per problem),
    SDPA plain then patched, each variant compiled afresh."""
    inputs = [problem_inputs(p, device) for p in problems]
    for p in problems:
        p["compiled_ms"] = {}
        p.pop("compiled_errors", None)
    for variant in ("sdpa", "dispatcher"):
        patch.set(variant == "dispatcher")
        torch._dynamo.reset()

        def call(q, k, v, m, dropout_p, is_causal, scale, enable_gqa):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=m, dropout_p=dropout_p, is_causal=is_causal,
                                                  scale=scale, enable_gqa=enable_gqa)
        for p, (q, k, v, kw) in zip(problems, inputs):
            args = (q, k, v, kw["attn_mask"], kw["dropout_p"], kw["is_causal"], kw["scale"], kw["enable_gqa"])
            try:
                fn = torch.compile(call, dynamic=False, mode=compile_mode)  # same code object: one graph per problem
                with torch.no_grad():
                    for _ in range(2):
                        fn(*args)
                    sync(device)
                    p["compiled_ms"][variant] = interleaved({variant: lambda: fn(*args)}, device, samples)[variant]
            except Exception as exc:
                p.setdefault("compiled_errors", {})[variant] = f"{type(exc).__name__}: {str(exc)[:400]}"
    patch.set(False)
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------------
# end-to-end timing
# --------------------------------------------------------------------------------------------
def timed_forward(fn, device):
    """(device ms, host ms) of one call, after a synchronisation."""
    sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        h0 = time.perf_counter()
        start.record()
        fn()
        host = (time.perf_counter() - h0) * 1e3
        end.record()
        end.synchronize()
        return start.elapsed_time(end), host
    h0 = time.perf_counter()
    fn()
    ms = (time.perf_counter() - h0) * 1e3
    return ms, ms


def first_calls(fn, device, warmup):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    first = time.perf_counter() - t0
    for _ in range(warmup):
        fn()
    sync(device)
    return out, first


def rel_l1(a, b):
    a, b = a.float(), b.float()
    return float((a - b).abs().sum() / b.abs().sum().clamp_min(1e-30))


def dynamo_counts():
    from torch._dynamo.utils import counters
    breaks = dict(counters.get("graph_break", {}))
    return {"unique_graphs": int(counters.get("stats", {}).get("unique_graphs", 0)),
            "graph_breaks": int(sum(breaks.values())),
            "graph_break_reasons": [str(r)[:200] for r, _ in sorted(breaks.items(), key=lambda kv: -kv[1])[:5]]}


def profile_summary(fn, device, iters, top):
    """Top kernels by self device time (CUDA) and top operators by self CPU time, per forward."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync(device)
    with profile(activities=acts) as prof:
        for _ in range(iters):
            fn()
        sync(device)
    events = prof.key_averages()

    def dev(e):
        return float(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0) or 0)

    def cpu(e):
        return float(e.self_cpu_time_total)

    kernels = [e for e in events if cuda and e.device_type == DeviceType.CUDA]
    ops = [e for e in events if e.device_type == DeviceType.CPU]
    row = lambda e: {"name": e.key[:160], "count_per_forward": e.count / iters,  # noqa: E731
                     "self_device_ms_per_forward": dev(e) / 1e3 / iters, "self_cpu_ms_per_forward": cpu(e) / 1e3 / iters}
    return {
        "per_forward_of": iters,
        "kernel_ms_per_forward": sum(dev(e) for e in kernels) / 1e3 / iters if cuda else None,
        "attention_kernel_ms_per_forward": sum(dev(e) for e in kernels if ATTENTION_KERNEL.search(e.key)) / 1e3 / iters if cuda else None,
        "kernel_launches_per_forward": sum(e.count for e in kernels) / iters if cuda else None,
        "cpu_ops_self_ms_per_forward": sum(cpu(e) for e in ops) / 1e3 / iters,
        "attention_ops_self_cpu_ms_per_forward": sum(cpu(e) for e in ops if ATTENTION_KERNEL.search(e.key)) / 1e3 / iters,
        "top_kernels": [row(e) for e in sorted(kernels, key=dev, reverse=True)[:top]],
        "top_cpu_ops": [row(e) for e in sorted(ops, key=cpu, reverse=True)[:top]],
    }


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


class Routed(torch.nn.Module):
    """``model`` with ``with da.patch_sdpa():`` inside its forward: compiled, it routes in its own
    graph, so plain and routed graphs live side by side and can be called alternately."""

    def __init__(self, model, da):
        super().__init__()
        self.model, self.da = model, da

    def forward(self, **kw):
        with self.da.patch_sdpa():
            return self.model(**kw)


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


def resolution_loop(args, device, dtype, da) -> dict:
    """One process renders 6 Wan resolutions (twice each) with the default torch.compile, plain
    and routed: compiles, compiled-graph runs, and the dispatcher's tunings."""
    from harness.bench import sdpa_wrapper

    token_sets = [64, 96, 128, 160, 192, 256] if args.small else [1560, 2340, 3120, 3600, 4680, 6240]
    out = {"tokens": token_sets}
    F.scaled_dot_product_attention = sdpa_wrapper
    try:
        for variant in ("plain", "dispatcher"):
            torch._dynamo.reset()
            stats = {"compiles": 0, "graph_runs": 0}

            def backend(gm, example_inputs):
                from torch._inductor.compile_fx import compile_fx

                stats["compiles"] += 1
                inner = compile_fx(gm, example_inputs)

                def run(*a):
                    stats["graph_runs"] += 1
                    return inner(*a)
                return run

            torch.manual_seed(args.seed)
            t0 = time.perf_counter()
            before = da.stats()
            per_res = []
            model = build_wan(args, token_sets[0], device, dtype)[1]
            target = model if variant == "plain" else Routed(model, da)
            compiled = torch.compile(target, backend=backend)
            for tok in token_sets:
                inputs = build_wan(args, tok, device, dtype, model=model)[2]
                runs0 = stats["graph_runs"]
                with torch.no_grad():
                    for _ in range(2):
                        compiled(**inputs())
                    sync(device)
                    # Then timed forwards; the dispatcher's hit counter moves only where attention
                    # reached it at run time (the run-time operator, or an eager fallback): a graph
                    # with the backend baked in never calls it.
                    hits0, times = da.stats()["hits"], []
                    for _ in range(args.loop_iters):
                        args_now = inputs()
                        sync(device)
                        t1 = time.perf_counter()
                        compiled(**args_now)
                        sync(device)
                        times.append((time.perf_counter() - t1) * 1e3)
                per_res.append({"tokens": tok, "graph_runs": stats["graph_runs"] - runs0, "compiles_so_far": stats["compiles"],
                                "median_ms": statistics.median(times), "runtime_dispatch_calls": da.stats()["hits"] - hits0})
            del model, target, compiled
            out[variant] = {"compiles": stats["compiles"], "graph_runs": stats["graph_runs"], "per_resolution": per_res,
                            "tunings": da.stats()["tunings"] - before["tunings"], "seconds": time.perf_counter() - t0}
    finally:
        F.scaled_dot_product_attention = _ORIGINAL_SDPA
        torch._dynamo.reset()
    return out


def explain_mode(mode, variants, problems):
    """The explanation fields: attention sums from the per-problem times, the rest, and the diff."""
    plain, disp = variants.get("plain", {}), variants.get("dispatcher", {})
    out = {"plain_ms": plain.get("median_ms"), "dispatcher_ms": disp.get("median_ms")}
    if out["plain_ms"] and out["dispatcher_ms"]:
        out["speedup"] = out["plain_ms"] / out["dispatcher_ms"]
        out["e2e_diff_ms"] = out["plain_ms"] - out["dispatcher_ms"]
    source = "eager_ms"
    if mode == "compile" and problems and all(len(p.get("compiled_ms", {})) == 2 for p in problems):
        source = "compiled_ms"
    if problems and all(len(p.get(source, {})) == 2 for p in problems):
        out["per_call_times_from"] = source
        out["attention_ms_sdpa"] = sum(p["count"] * p[source]["sdpa"] for p in problems)
        out["attention_ms_dispatcher"] = sum(p["count"] * p[source]["dispatcher"] for p in problems)
        out["attention_diff_ms"] = out["attention_ms_sdpa"] - out["attention_ms_dispatcher"]
        if out["plain_ms"] is not None:
            out["non_attention_ms_plain"] = out["plain_ms"] - out["attention_ms_sdpa"]
        if out["dispatcher_ms"] is not None:
            out["non_attention_ms_dispatcher"] = out["dispatcher_ms"] - out["attention_ms_dispatcher"]
        if "e2e_diff_ms" in out:
            out["unexplained_diff_ms"] = out["e2e_diff_ms"] - out["attention_diff_ms"]
    for name, r in (("plain", plain), ("dispatcher", disp)):
        prof = r.get("profile")
        if prof:
            out[f"profile_kernel_ms_{name}"] = prof["kernel_ms_per_forward"]
            out[f"profile_attention_kernel_ms_{name}"] = prof["attention_kernel_ms_per_forward"]
            out[f"profile_kernel_launches_{name}"] = prof["kernel_launches_per_forward"]
            out[f"profile_cpu_ops_self_ms_{name}"] = prof["cpu_ops_self_ms_per_forward"]
        if r.get("median_host_ms") is not None:
            out[f"host_ms_{name}"] = r["median_host_ms"]
    return out


# --------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------
def fmt(x, nd=3):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def write_markdown(result, path: Path):
    env = result["environment"]
    lines = [f"# End to end: diffusers models with and without the dispatcher ({env['device']})", "",
             f"{env['date']}, torch {env['torch']}, diffusers {env['diffusers']}, {env['dtype']}, "
             f"{result['settings']['iters']} timed forwards per variant (median), warm-up excluded."
             + (" **Smoke test with tiny configs (--small): not a benchmark.**" if result["settings"]["small"] else ""), "",
             "ms per forward. `attention (sdpa / disp)`: sum over the forward's attention calls of count x that problem's "
             "own time (eager, or compiled in compile mode). `unexplained`: the end-to-end difference minus the attention "
             "difference.", "",
             "| model | mode | plain | dispatcher | speedup | attention sdpa | attention disp | non-attention plain | "
             "non-attention disp | unexplained | host plain | host disp |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    loop = result.get("resolution_loop")
    if loop:
        lines += ["", f"6-resolution loop (default torch.compile, tokens {loop['tokens']}, two forwards each): "
                  + "; ".join(f"{v}: {loop[v]['compiles']} compiles, {loop[v]['graph_runs']} compiled-graph runs, "
                              f"{loop[v]['tunings']} tunings" for v in ("plain", "dispatcher") if v in loop), ""]
        if "plain" in loop and "dispatcher" in loop:
            lines += ["| tokens | plain ms | dispatcher ms | plain / dispatcher | run-time operator calls |", "|---|---|---|---|---|"]
            for a, b in zip(loop["plain"]["per_resolution"], loop["dispatcher"]["per_resolution"]):
                if "median_ms" in a and "median_ms" in b:
                    lines.append(f"| {a['tokens']} | {a['median_ms']:.3f} | {b['median_ms']:.3f} | "
                                 f"{a['median_ms'] / b['median_ms']:.3f} | {b['runtime_dispatch_calls']} |")
            lines.append("")
    for m in result["models"]:
        for mode, e in m.get("explanation", {}).items():
            lines.append(f"| {m['name']} | {mode} | {fmt(e.get('plain_ms'))} | {fmt(e.get('dispatcher_ms'))} | "
                         f"{fmt(e.get('speedup'))} | {fmt(e.get('attention_ms_sdpa'))} | {fmt(e.get('attention_ms_dispatcher'))} | "
                         f"{fmt(e.get('non_attention_ms_plain'))} | {fmt(e.get('non_attention_ms_dispatcher'))} | "
                         f"{fmt(e.get('unexplained_diff_ms'))} | {fmt(e.get('host_ms_plain'))} | {fmt(e.get('host_ms_dispatcher'))} |")
    for m in result["models"]:
        lines += ["", f"## {m['name']}: {m.get('description', {}).get('class', '')}", ""]
        if "error" in m:
            lines += [f"Error: `{m['error']}`", ""]
        lines.append(f"{m.get('attention_calls', '-')} attention calls per forward.")
        for mode, variants in m.get("modes", {}).items():
            for variant, r in variants.items():
                if "error" in r:
                    lines.append(f"- {mode} {variant}: **error** `{r['error'][:300]}`")
                else:
                    dyn = r.get("dynamo")
                    extra = f", {dyn['unique_graphs']} graphs, {dyn['graph_breaks']} graph breaks" if dyn else ""
                    lines.append(f"- {mode} {variant}: first call {r['first_call_s']:.2f} s{extra}, "
                                 f"output rel-L1 vs eager plain {r['output_rel_l1_vs_eager_plain']:.2e}")
        lines += ["", "| problem (b, heads, s_q x s_kv, d) | calls | decision | eager sdpa | eager disp | compiled sdpa | compiled disp |",
                  "|---|---|---|---|---|---|---|"]
        for p in m.get("problems", []):
            e, c, d = p.get("eager_ms", {}), p.get("compiled_ms", {}), p.get("decision", {})
            lines.append(f"| {p['summary']} | {p['count']} | {d.get('backend', d.get('error', '-'))} | {fmt(e.get('sdpa'), 4)} | "
                         f"{fmt(e.get('dispatcher'), 4)} | {fmt(c.get('sdpa'), 4)} | {fmt(c.get('dispatcher'), 4)} |")
        for mode, variants in m.get("modes", {}).items():
            for variant, r in variants.items():
                prof = r.get("profile")
                if not prof:
                    continue
                lines += ["", f"Profile, {mode} {variant}, per forward: kernels {fmt(prof['kernel_ms_per_forward'])} ms "
                          f"({fmt(prof['kernel_launches_per_forward'], 0)} launches), attention kernels "
                          f"{fmt(prof['attention_kernel_ms_per_forward'])} ms, operators' self CPU time "
                          f"{fmt(prof['cpu_ops_self_ms_per_forward'])} ms", "",
                          "| kernel / operator | calls | self device ms | self CPU ms |", "|---|---|---|---|"]
                for row in prof["top_kernels"] + prof["top_cpu_ops"][:8]:
                    name = row["name"].replace("|", "\\|").replace("`", "'")
                    lines.append(f"| `{name[:100]}` | {row['count_per_forward']:g} | {row['self_device_ms_per_forward']:.3f} | "
                                 f"{row['self_cpu_ms_per_forward']:.3f} |")
    path.write_text("\n".join(lines) + "\n")


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
