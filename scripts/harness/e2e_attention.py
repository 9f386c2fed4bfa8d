"""The attention parts of ``scripts/bench_e2e.py``: the census of a forward's SDPA calls, each
problem timed on its own (eager and compiled, plain SDPA against the patched one), the timing of
whole forwards and the profiler's summaries. Imported before anything can patch SDPA."""

from __future__ import annotations

import re
import time

import torch
import torch.nn.functional as F

from .e2e_models import sync

ORIGINAL_SDPA = F.scaled_dot_product_attention  # captured before anything can patch it
ATTENTION_KERNEL = re.compile(r"flash|fmha|attention|attn|sdpa|cudnn.*(mha|sdp)", re.IGNORECASE)


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
        return ORIGINAL_SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
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
    from .bench import interleaved as run

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
        from .bench import sdpa_routable
        p["routed"] = bool(sdpa_routable(q, k, v, kw["attn_mask"], kw["dropout_p"], kw["is_causal"], kw["scale"], kw["enable_gqa"]))
        with torch.no_grad():
            patched(q, k, v, **kw)  # tunes if the key is new (not timed)
            sync(device)
            r = interleaved({"sdpa": lambda: ORIGINAL_SDPA(q, k, v, **kw), "dispatcher": lambda: patched(q, k, v, **kw)},
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
