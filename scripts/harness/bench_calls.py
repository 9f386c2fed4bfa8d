"""The benchmark harness's problems and backend calls (re-exported by :mod:`.bench`).

- :func:`shapes` and :func:`inputs`: the problems of the shape suite and random q, k, v for one;
- :func:`backend_call`: a backend called as a plan would call it (layout conversions included);
- :func:`diffsynth_fixed`: the backend DiffSynth-Studio's fixed priority list would pick;
  :func:`diffsynth_call`: that backend called as DiffSynth-Studio calls it;
- :func:`servable`: every backend that serves a problem here and passes the tuner's accuracy gate;
- :func:`fresh_dispatcher`: a dispatcher on an empty cache folder of its own.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from typing import Callable, Optional

import torch

_BNSD = "b n s d"


def sync(device) -> None:
    """Wait for ``device`` (a CUDA device; nothing to wait for on a CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def shapes(presets=None, file=None, only: Optional[str] = None, default=("all",)) -> list:
    """The problems of a shapes ``file``, else of the named ``presets`` (else ``default``),
    narrowed to the comma-separated names of ``only``; a ValueError names what is unknown."""
    from diffsynth_attention.tools.shapes import load_shapes_file, select_presets

    found = load_shapes_file(file) if file else select_presets(presets or list(default))
    if not only:
        return found
    wanted = [n.strip() for n in only.split(",") if n.strip()]
    known = [s["name"] for s in found]
    unknown = [n for n in wanted if n not in known]
    if unknown or not wanted:
        raise ValueError(f"--only {only!r}: unknown problem name(s) {', '.join(unknown) or '(none given)'}; "
                         f"known: {', '.join(known)}")
    return [s for s in found if s["name"] in wanted]


def inputs(shape: dict, device, layout: str = _BNSD, generator: Optional[torch.Generator] = None, dtype=None):
    """Random q, k, v for a problem of the shape suite, laid out as ``layout``; returns
    ``(q, k, v, kwargs)``, the keyword arguments ``attention_forward`` takes for them."""
    from diffsynth_attention.tools.inputs import make_inputs

    return make_inputs(shape, device, dtype, layout, generator)


def _call(q, k, v, kw: dict, canonical: bool = False):
    """The validated call ``attention_forward(q, k, v, **kw)`` would make (its problem, layout...);
    with ``canonical``, ``(call, qc, kc, vc)``: q, k, v as ``b n s d`` views too."""
    from diffsynth_attention.problem import prepare

    call = prepare(q, k, v, kw.get("q_pattern", _BNSD), kw.get("k_pattern", _BNSD), kw.get("v_pattern", _BNSD),
                   kw.get("out_pattern", _BNSD), kw.get("dims"), kw.get("attn_mask"), kw.get("scale"),
                   kw.get("is_causal", False), kw.get("window_size"), False)
    return (call, *call.canonical) if canonical else call


def backend_call(name: str, q, k, v, **attention_kwargs) -> Optional[Callable]:
    """Backend ``name`` called as a plan would call it on ``attention_forward(q, k, v,
    **attention_kwargs)`` (layout conversions included, no autograd), bound to q, k, v: a function
    of no argument; None where the backend is unavailable here."""
    from diffsynth_attention.backends import REGISTRY
    from diffsynth_attention.dispatch.runners import make_runner

    backend = REGISTRY[name]
    if backend.unavailable_reason() is not None:
        return None
    mask, scale = attention_kwargs.get("attn_mask"), attention_kwargs.get("scale")
    run = make_runner(backend, _call(q, k, v, attention_kwargs), False)
    return lambda: run(q, k, v, mask, scale)


# DiffSynth-Studio 2.1 (diffsynth/core/attention/attention.py): the layout each of its backend
# functions rearranges q, k and v into, and how it calls the package's public function.
_DIFFSYNTH_LAYOUT = {"torch": _BNSD, "sage_attention": _BNSD, "xformers": "b s n d", "flash_attention_2": "b s n d",
                     "flash_attention_3": "b s n d", "flash_attention_4": "b s n d", "customized_fa_kernel": "b s n d"}


def diffsynth_call(name: str, q, k, v, **attention_kwargs) -> Optional[Callable]:
    """Backend ``name`` called as DiffSynth-Studio's ``attention_forward`` calls it: einops
    ``rearrange`` of q, k and v into the package's layout (where the caller's differs), the
    package's public function (``flash_attn_func``, ``sageattn``, ``memory_efficient_attention``,
    or ``F.scaled_dot_product_attention``), the first element of a tuple result, and ``rearrange``
    back; masked calls, and causal or windowed ones set to SageAttention or xFormers, take its
    torch route, as there. What the "DiffSynth fixed" column times: this library's own adapters
    call the kernels more cheaply (thin calls), which would flatter DiffSynth's rule. None where
    ``name`` is unavailable here or DiffSynth-Studio has no function for it."""
    from einops import rearrange

    from diffsynth_attention.backends import REGISTRY

    scale, causal, window = attention_kwargs.get("scale"), attention_kwargs.get("is_causal", False), attention_kwargs.get("window_size")
    mask = attention_kwargs.get("attn_mask")
    # DiffSynth-Studio's routing: a mask goes to its torch route whatever the setting, and so do
    # causal or windowed calls set to SageAttention or xFormers (which it calls without either)
    if mask is not None or name in ("sage_attention", "xformers") and (causal or window is not None):
        name = "torch"
    if name == "torch" and window is not None:
        # its sliding-window route is a Python loop over query chunks: not mirrored here; this
        # library's own windowed SDPA call (the same result, cheaper) stands in for it
        return backend_call("torch", q, k, v, **attention_kwargs)
    layout = _DIFFSYNTH_LAYOUT.get(name)
    backend = REGISTRY.get(name)
    if layout is None or backend is None or backend.unavailable_reason() is not None:
        return None
    pats = [attention_kwargs.get(f"{t}_pattern", _BNSD) for t in "qkv"]
    out_pattern, dims = attention_kwargs.get("out_pattern", _BNSD), attention_kwargs.get("dims") or {}
    sdpa = torch.nn.functional.scaled_dot_product_attention
    func = getattr(backend, "_func", None)
    win = (window, window) if window is not None else (-1, -1)
    kernel = {"torch": lambda a, b, c: sdpa(a, b, c, mask, scale=scale, is_causal=causal,
                                            **({"enable_gqa": True} if a.shape[1] != b.shape[1] else {})),
              "sage_attention": lambda a, b, c: func(a, b, c, sm_scale=scale),
              "xformers": lambda a, b, c: func(a, b, c, scale=scale)}.get(
        name, lambda a, b, c: func(a, b, c, softmax_scale=scale, causal=causal, window_size=win))

    def run():
        a, b, c = (t if p == layout else rearrange(t, f"{p} -> {layout}", **dims) for t, p in zip((q, k, v), pats))
        out = kernel(a, b, c)
        if isinstance(out, tuple):
            out = out[0]
        return out if out_pattern == layout else rearrange(out, f"{layout} -> {out_pattern}", **dims)
    return run


def diffsynth_fixed(q, k, v, **attention_kwargs) -> str:
    """The backend DiffSynth-Studio's fixed priority list picks for this call on this machine:
    the first that is usable and supports the problem, else ``torch``."""
    from diffsynth_attention.backends import DIFFSYNTH_PRIORITY, REGISTRY, device_info

    problem, dev = _call(q, k, v, attention_kwargs).problem, device_info(q.device)
    for name in DIFFSYNTH_PRIORITY:
        b = REGISTRY[name]
        if b.unavailable_reason() is None and not b.not_supported_reasons(problem, dev):
            return name
    return "torch"


def servable(q, k, v, **attention_kwargs) -> tuple:
    """``({name: fn}, {name: why not})``: every backend that can serve the call here and passes the
    tuner's accuracy gate on these inputs (its :func:`backend_call`), and why each other one is
    left out (unsupported, predicted not to fit, unavailable, raised, error above tolerance)."""
    from diffsynth_attention.backends import REGISTRY, device_info
    from diffsynth_attention.problem import mask_4d
    from diffsynth_attention.tuning.policy import DEFAULT_POLICY
    from diffsynth_attention.tuning.reference import gate_heads, reference_slice, relative_l1
    from diffsynth_attention.tuning.trial import free_memory

    device = q.device
    call, qc, kc, vc = _call(q, k, v, attention_kwargs, canonical=True)
    problem, dev = call.problem, device_info(device)
    tolerance = DEFAULT_POLICY.tolerance(problem.dtype_name, device.type)
    heads = gate_heads(problem.heads_q)
    with torch.no_grad():  # the tuner's gate: the call's own layout, mask and scale
        ref = reference_slice(qc, kc, vc, mask_4d(attention_kwargs.get("attn_mask")), call.scale, problem.causal,
                              problem.window, heads)
    free = free_memory(device)
    methods, why = {}, {}
    for name, backend in REGISTRY.items():
        reasons = backend.not_supported_reasons(problem, dev)
        if reasons:
            why[name] = "; ".join(reasons)
            continue
        if free is not None and backend.predicted_bytes(problem) > free:
            why[name] = "predicted not to fit in the free memory"
            continue
        fn = backend_call(name, q, k, v, **attention_kwargs)
        if fn is None:
            why[name] = backend.unavailable_reason() or "unavailable"
            continue
        try:
            with torch.no_grad():
                out = call.out_canonical(fn())
                error = relative_l1(out[0, heads], ref)
        except Exception as exc:  # an out-of-memory error, a kernel that refuses the shape
            why[name] = f"raised {type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
            sync(device)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        if not error <= tolerance:
            why[name] = f"error {error:.3g} above tolerance {tolerance:g}"
            continue
        methods[name] = fn
    return methods, why


def fresh_dispatcher(policy=None, prefix: str = "da-bench-"):
    """A :class:`Dispatcher` on a new empty cache folder (a temporary one named ``prefix...``):
    every problem it sees is tuned afresh, under ``policy`` (the default policy if None)."""
    from diffsynth_attention.dispatch import Dispatcher
    from diffsynth_attention.store.cache import DecisionCache

    folder = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, folder, True)  # a scratch cache: gone when the process ends
    return Dispatcher(DecisionCache(folder), policy=policy)
