"""The issue-20 compile matrix on CPU: tiny diffusers models compiled with fullgraph=True as the
first thing a fresh process does, with SDPA routed through diffsynth-attention.

Models (random weights, the tiny configs of ``bench_e2e.py --small``): ``flux``
(FluxTransformer2DModel), ``wan`` (WanTransformer3DModel), ``unet`` (UNet2DConditionModel).
Modes: ``static`` (``dynamic=False``), ``dynamic`` (``dynamic=True``), ``default``.
Forms: ``global`` (``da.patch_sdpa()`` before compiling), ``inside`` (``with da.patch_sdpa():``
inside the compiled function), ``around`` (``with da.patch_sdpa():`` around the compiled calls).

Each variant runs in a new interpreter with a fresh ``DIFFSYNTH_ATTENTION_CACHE_DIR``. It calls
the compiled model 5 times over 2 input shapes (A, A, B, B, A) and checks:

- ``compiled``: it compiles without an error (a graph break fails under fullgraph);
- ``runs``: every call is served by a compiled graph (no recompile loop, no eager fallback), and
  no more compiles than the same model compiled the same way calling PyTorch's own SDPA (run
  after the variant in the same process, counted separately);
- ``routed``: the dispatcher tuned at least one key (``da.stats()['tunings'] > 0``), and the
  forward graphs of static shapes hold no run-time ``diffsynth_attention::dispatch`` operator;
- ``err``: the outputs match the plain (unpatched, eager) model's.

The compiler backend is a recorder that runs AOTAutograd (as inductor does, where
``diffsynth_attention::attention`` is decomposed) with eager graphs; ``--inductor`` runs one
variant (or the ones selected) with the default inductor backend.

    PYTHONPATH=$PWD python scripts/compile_matrix.py                  # 27 variants, table, exit 1 on failure
    PYTHONPATH=$PWD python scripts/compile_matrix.py --models flux --modes static --forms global --inductor
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

MODELS = ("flux", "wan", "unet")
MODES = ("static", "dynamic", "default")
FORMS = ("global", "inside", "around")
TOLERANCE = 1e-3  # float32 on CPU; relative to the reference's largest magnitude


# --------------------------------------------------------------------------------------------
# one variant (runs in the child process)
# --------------------------------------------------------------------------------------------
def _recorder():
    from harness.bench import CompileRecorder

    return CompileRecorder()


def _InductorCounter():
    from harness.bench import CompileRecorder

    return CompileRecorder(inductor=True)


def _build(name, shape, model=None):
    """(model, inputs) for the tiny config of ``name``; ``shape`` 0 or 1 picks the input size."""
    import torch

    torch.manual_seed(0)
    if name == "flux":
        from diffusers import FluxTransformer2DModel

        cfg = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=32,
                   num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True,
                   axes_dims_rope=(8, 12, 12))
        model = model or FluxTransformer2DModel(**cfg).eval()
        gh, gw = ((8, 8), (6, 8))[shape]
        n, text_len = gh * gw, 16
        g = torch.Generator().manual_seed(shape)
        ids = torch.zeros(gh, gw, 3)
        ids[..., 1] = torch.arange(gh)[:, None]
        ids[..., 2] = torch.arange(gw)[None, :]
        inputs = dict(hidden_states=torch.randn(1, n, 16, generator=g), encoder_hidden_states=torch.randn(1, text_len, 64, generator=g),
                      pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]),
                      img_ids=ids.reshape(n, 3), txt_ids=torch.zeros(text_len, 3), guidance=torch.tensor([3.5]),
                      return_dict=False)
    elif name == "wan":
        from diffusers import WanTransformer3DModel

        cfg = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4,
                   text_dim=64, freq_dim=32, ffn_dim=128, num_layers=1, cross_attn_norm=True, eps=1e-6)
        model = model or WanTransformer3DModel(**cfg).eval()
        h, w = ((16, 16), (12, 16))[shape]
        g = torch.Generator().manual_seed(shape)
        inputs = dict(hidden_states=torch.randn(1, 4, 1, h, w, generator=g), timestep=torch.tensor([500]),
                      encoder_hidden_states=torch.randn(1, 16, 64, generator=g), return_dict=False)
    elif name == "unet":
        from diffusers import UNet2DConditionModel

        cfg = dict(sample_size=16, in_channels=4, out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(32, 64), layers_per_block=1,
                   transformer_layers_per_block=(1, 1), attention_head_dim=(1, 2), cross_attention_dim=64,
                   use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                   projection_class_embeddings_input_dim=32 + 6 * 8, norm_num_groups=8)
        model = model or UNet2DConditionModel(**cfg).eval()
        side = (16, 24)[shape]
        b = 2
        g = torch.Generator().manual_seed(shape)
        inputs = dict(sample=torch.randn(b, 4, side, side, generator=g), timestep=torch.tensor([500] * b),
                      encoder_hidden_states=torch.randn(b, 77, 64, generator=g),
                      added_cond_kwargs={"text_embeds": torch.randn(b, 32, generator=g),
                                         "time_ids": torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]] * b)},
                      return_dict=False)
    else:
        raise ValueError(name)
    return model, inputs


def run_one(model_name: str, mode: str, form: str, inductor: bool = False, plain: bool = True) -> dict:
    """One variant, in this (fresh) process: the dict the parent prints a row of."""
    import torch
    import torch.nn.functional as F

    import diffsynth_attention as da

    original_sdpa = F.scaled_dot_product_attention
    model, _ = _build(model_name, 0)
    shapes = [_build(model_name, s, model)[1] for s in (0, 1)]
    order = [0, 0, 1, 1, 0]
    rec = _InductorCounter() if inductor else _recorder()
    kw = {"static": {"dynamic": False}, "dynamic": {"dynamic": True}, "default": {}}[mode]
    result = {"model": model_name, "mode": mode, "form": form, "backend": "inductor" if inductor else "aot_eager",
              "error": None}
    outs = []
    handle = None
    try:
        with torch.no_grad():
            if form == "global":
                handle = da.patch_sdpa()
                compiled = torch.compile(model, fullgraph=True, backend=rec, **kw)
                outs = [compiled(**shapes[i])[0] for i in order]
            elif form == "around":
                compiled = torch.compile(model, fullgraph=True, backend=rec, **kw)
                with da.patch_sdpa():
                    outs = [compiled(**shapes[i])[0] for i in order]
            else:
                def forward(**inputs):
                    with da.patch_sdpa():
                        return model(**inputs)

                compiled = torch.compile(forward, fullgraph=True, backend=rec, **kw)
                outs = [compiled(**shapes[i])[0] for i in order]
    except Exception as exc:  # noqa: BLE001 - reported in the table
        text = str(exc).strip().splitlines()
        result["error"] = f"{type(exc).__name__}: {text[0] if text else ''}"[:300]
    if handle is not None:
        handle.undo()
    result["sdpa_restored"] = F.scaled_dot_product_attention is original_sdpa or form == "inside"
    result.update(compiles=rec.compiles, runs=rec.runs, calls=len(order), stats=da.stats())
    graphs = getattr(rec, "forward_graphs", [])
    result["dispatch_ops"] = [sum(str(n.target).startswith("diffsynth_attention.dispatch") for n in g.graph.nodes)
                              for g in graphs]
    result["graph_symbolic"] = [any(isinstance(getattr(n.meta.get("val"), "shape", None), torch.Size)
                                    and any(not isinstance(s, int) for s in n.meta["val"].shape)
                                    for n in g.graph.nodes) for g in graphs]
    err = None
    if outs:
        with torch.no_grad():  # the plain model: PyTorch's own SDPA, eager
            assert F.scaled_dot_product_attention is original_sdpa or form == "inside", "SDPA still patched"
            err = 0.0
            for i, out in zip(order, outs):
                ref = model(**shapes[i])[0]
                err = max(err, float((out - ref).abs().max()) / max(1e-6, float(ref.abs().max())))
    result["err"] = err
    if not plain:
        return result
    # the same model compiled the same way with PyTorch's own SDPA: the compiles it needs anyway
    torch._dynamo.reset()
    from harness.bench import original_sdpa

    F.scaled_dot_product_attention = original_sdpa
    plain_rec = _InductorCounter() if inductor else _recorder()
    try:
        with torch.no_grad():
            compiled = torch.compile(model, fullgraph=True, backend=plain_rec, **kw)
            for i in order:
                compiled(**shapes[i])
        result.update(plain_compiles=plain_rec.compiles, plain_runs=plain_rec.runs)
    except Exception as exc:  # noqa: BLE001
        result.update(plain_compiles=None, plain_runs=None, plain_error=f"{type(exc).__name__}: {exc}"[:200])
    return result


def verdict(r: dict, max_compiles=None) -> list:
    """The failed checks of one variant (empty: it passed). ``max_compiles``: the bound on compiles
    where the plain baseline was not run (default: the baseline's count)."""
    bad = []
    if r.get("error"):
        return ["compile: " + r["error"]]
    if r["runs"] != r["calls"]:
        bad.append(f"{r['calls'] - r['runs']} calls uncompiled")
    bound = r.get("plain_compiles") if max_compiles is None else max_compiles
    if bound is None or r["compiles"] > bound:
        bad.append(f"{r['compiles']} compiles, plain SDPA {bound}")
    if r["stats"]["tunings"] == 0:
        bad.append("not routed (no tuning)")
    for ops, symbolic in zip(r["dispatch_ops"], r["graph_symbolic"]):
        if ops and not symbolic:
            bad.append("static graph holds the run-time operator")
            break
    if r["err"] is None or r["err"] > TOLERANCE:
        bad.append(f"output differs from plain (rel err {r['err']})")
    if not r["sdpa_restored"]:
        bad.append("F.scaled_dot_product_attention left patched")
    return bad


# --------------------------------------------------------------------------------------------
# the parent: one fresh process per variant
# --------------------------------------------------------------------------------------------
def spawn(model: str, mode: str, form: str, inductor: bool = False, timeout: float = 900, env=None, plain: bool = True) -> dict:
    """Run one variant in a new interpreter with a fresh cache folder; its result dict."""
    with tempfile.TemporaryDirectory(prefix="compile-matrix-") as tmp:
        env = dict(os.environ if env is None else env)
        env["DIFFSYNTH_ATTENTION_CACHE_DIR"] = os.path.join(tmp, "cache")
        env.setdefault("DIFFSYNTH_ATTENTION_TUNING_BUDGET", "0.05")
        env["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(tmp, "inductor")
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [here, env.get("PYTHONPATH")]))
        cmd = [sys.executable, os.path.abspath(__file__), "--child", model, mode, form] + (["--inductor"] if inductor else []) \
            + ([] if plain else ["--no-plain"])
        start = time.perf_counter()
        try:
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"model": model, "mode": mode, "form": form, "error": f"timed out after {timeout:.0f} s",
                    "seconds": time.perf_counter() - start}
        seconds = time.perf_counter() - start
    lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"model": model, "mode": mode, "form": form, "error": f"child exited {p.returncode}: {tail}"[:300],
                "seconds": seconds}
    r = json.loads(lines[-1])
    r["seconds"] = seconds
    return r


def row(r: dict, max_compiles=None) -> str:
    bad = verdict(r, max_compiles)
    if r.get("error"):
        return f"| {r['model']} | {r['mode']} | {r['form']} | - | - | - | - | FAIL: {r['error']} |"
    err = "-" if r["err"] is None else f"{r['err']:.1e}"
    return (f"| {r['model']} | {r['mode']} | {r['form']} | {r['compiles']} ({r.get('plain_compiles')}) | {r['runs']}/{r['calls']} | "
            f"{r['stats']['tunings']} | {err} | {'ok' if not bad else 'FAIL: ' + '; '.join(bad)} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--forms", default=",".join(FORMS))
    p.add_argument("--inductor", action="store_true", help="the default inductor backend instead of the AOT recorder")
    p.add_argument("--no-plain", action="store_true", help="skip the plain-SDPA baseline (compiles are then only listed)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--child", nargs=3, metavar=("MODEL", "MODE", "FORM"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(run_one(*a.child, inductor=a.inductor, plain=not a.no_plain)))
        return 0
    results = []
    print("| model | mode | form | compiles (plain) | compiled calls | tunings | rel err | verdict |")
    print("|---|---|---|---|---|---|---|---|")
    for model in a.models.split(","):
        for mode in a.modes.split(","):
            for form in a.forms.split(","):
                r = spawn(model, mode, form, a.inductor, plain=not a.no_plain)
                results.append(r)
                print(row(r, 99 if a.no_plain else None), flush=True)
    failed = [r for r in results if verdict(r, 99 if a.no_plain else None)]
    print(f"\n{len(results) - len(failed)}/{len(results)} variants passed"
          f" ({'inductor' if a.inductor else 'AOTAutograd recorder'} backend, fullgraph=True, fresh process each)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
