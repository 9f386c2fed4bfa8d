"""GPU: the thin kernel calls (backends/thin.py, issue 29 item 3) bit for bit against each
package's own function, the dispatcher using them, CUDA-graph replay, and FlashAttention-3's
first call importing no ``torch._dynamo`` (issue 31). Skipped without a CUDA GPU or the package.

Run on the GPU machine: ``python -m pytest -q -rs tests/backends/test_gpu_thin.py``. Every skip
says why (package unavailable, problem not supported, thin path off and the reason).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import diffsynth_attention as da
from diffsynth_attention.backends import REGISTRY, device_info, thin
from diffsynth_attention.problem import prepare

from support.subprocesses import ROOT, child_env

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

NAMES = ["flash_attention_3", "flash_attention_4"]
SHAPES = {  # b s n d callers; "view": b n s d memory seen as b s n d (what many models pass)
    "self_d64": dict(b=2, hq=8, hk=8, sq=256, skv=256, d=64),
    "self_d128": dict(b=1, hq=8, hk=8, sq=1024, skv=1024, d=128),
    "cross_77": dict(b=2, hq=8, hk=8, sq=512, skv=77, d=64),
    "causal_d128": dict(b=1, hq=4, hk=4, sq=512, skv=512, d=128, causal=True),
    "gqa_d128": dict(b=1, hq=8, hk=2, sq=256, skv=256, d=128),
    "gqa_causal_d64": dict(b=2, hq=8, hk=4, sq=384, skv=384, d=64, causal=True),
    "window_d64": dict(b=1, hq=4, hk=4, sq=512, skv=512, d=64, window=64),
    "scale_fp16": dict(b=1, hq=4, hk=4, sq=200, skv=333, d=128, scale=0.07, dtype=torch.float16),
    "tiny": dict(b=1, hq=2, hk=2, sq=16, skv=16, d=64),
    "view_d128": dict(b=1, hq=8, hk=8, sq=512, skv=512, d=128, view=True),
}


def _backend(name):
    backend = REGISTRY[name]
    why = backend.unavailable_reason()
    if why:
        pytest.skip(f"{name} unavailable: {why}")
    return backend


def _inputs(spec, seed=0):
    dt = spec.get("dtype", torch.bfloat16)
    g = torch.Generator(device="cuda").manual_seed(seed)
    shapes = [(spec["b"], spec["sq"], spec["hq"], spec["d"]), (spec["b"], spec["skv"], spec["hk"], spec["d"]),
              (spec["b"], spec["skv"], spec["hk"], spec["d"])]
    if spec.get("view"):
        return [torch.randn(b, n, s, d, device="cuda", dtype=dt, generator=g).transpose(1, 2) for b, s, n, d in shapes]
    return [torch.randn(s, device="cuda", dtype=dt, generator=g) for s in shapes]


def _served(backend, spec, q):
    k_shape = (spec["b"], spec["hk"], spec["skv"], spec["d"])
    qc = torch.empty(spec["b"], spec["hq"], spec["sq"], spec["d"], device="cuda", dtype=q.dtype)
    kc = torch.empty(k_shape, device="cuda", dtype=q.dtype)
    call = prepare(qc, kc, kc, "b n s d", "b n s d", "b n s d", "b n s d", None, None, spec.get("scale"),
                       spec.get("causal", False), spec.get("window"), False)
    reasons = backend.not_supported_reasons(call.problem, device_info(q.device))
    if reasons:
        pytest.skip(f"{backend.name} does not serve this problem: {'; '.join(reasons)}")


def _first(out):
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("name", NAMES)
def test_thin_path_is_on_for_the_checked_package_versions(name):
    """Fails (with the reason) if a checked version's internals are not found as expected."""
    backend = _backend(name)
    version = backend.version()
    checked = (thin._version_prefix(version) in thin.FA3_VERSIONS if name == "flash_attention_3"
               else version in thin.FA4_VERSIONS)
    if not checked:
        pytest.skip(f"{name} {version} is not a checked version: thin path off ({backend.thin_reason})")
    assert backend._thin is not None, f"{name} {version}: thin path off: {backend.thin_reason}"


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("name", NAMES)
def test_thin_call_is_bit_for_bit_the_packages(name, shape, monkeypatch):
    backend = _backend(name)
    if backend._thin is None:
        pytest.skip(f"{name}: thin path off: {backend.thin_reason}")
    spec = SHAPES[shape]
    q, k, v = _inputs(spec)
    _served(backend, spec, q)
    scale, causal, window = spec.get("scale"), spec.get("causal", False), spec.get("window")
    before = [t.clone() for t in (q, k, v)]
    package_calls = []
    with torch.no_grad():
        want = _first(backend._package_call(q, k, v, scale, causal, window))
        outs = [backend._thin(q, k, v, scale, causal, window)]  # FA4: the signature's first call records its kernel
        if name == "flash_attention_4":  # later calls of the signature: the compiled kernel, never the package
            inner = backend._thin._func
            monkeypatch.setattr(backend._thin, "_func", lambda *a, **kw: (package_calls.append(1), inner(*a, **kw))[1])
        outs += [backend._thin(q, k, v, scale, causal, window) for _ in range(2)]
        adapter = backend.forward_native(q, k, v, scale, causal, window)
    torch.cuda.synchronize()
    assert all(o is not None for o in outs), f"{name}: the thin path declined a plain call ({shape})"
    if name == "flash_attention_4":
        reasons = list(backend._thin.reasons.values())
        assert not package_calls, f"{name} {shape}: the package served a later call of the signature: {reasons}"
    for got in outs + [adapter]:
        assert got.shape == want.shape and got.dtype == want.dtype
        assert torch.equal(got, want), f"{name} {shape}: max diff {(got.float() - want.float()).abs().max().item()}"
    assert all(torch.equal(a, b) for a, b in zip(before, (q, k, v))), "inputs modified"


@pytest.mark.parametrize("name", NAMES)
def test_dispatcher_calls_go_through_the_thin_path(name, monkeypatch, tmp_path):
    monkeypatch.setenv("DIFFSYNTH_ATTENTION_CACHE_DIR", str(tmp_path))
    backend = _backend(name)
    if backend._thin is None:
        pytest.skip(f"{name}: thin path off: {backend.thin_reason}")
    inner, served = backend._thin, []

    def counting(*args):
        out = inner(*args)
        served.append(out is not None)
        return out
    monkeypatch.setattr(backend, "_thin", counting)
    spec = SHAPES["self_d128"]
    q, k, v = _inputs(spec)
    pat = ("b s n d",) * 4
    with da.use_backend(name), torch.no_grad():
        outs = [da.attention_forward(q, k, v, *pat) for _ in range(3)]
        want = _first(backend._package_call(q, k, v, None, False, None))
    assert served and served[-1], f"{name}: thin path not used by the dispatcher ({served})"
    assert all(torch.equal(o, want) for o in outs)


@pytest.mark.parametrize("name", NAMES)
def test_thin_call_replays_under_a_cuda_graph(name):
    backend = _backend(name)
    if backend._thin is None:
        pytest.skip(f"{name}: thin path off: {backend.thin_reason}")
    spec = SHAPES["self_d64"]
    q, k, v = _inputs(spec)
    with torch.no_grad():
        eager = [backend._thin(q, k, v, None, False, None) for _ in range(2)][-1]
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            backend._thin(q, k, v, None, False, None)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = backend._thin(q, k, v, None, False, None)
        q2, k2, v2 = _inputs(spec, seed=1)
        for dst, src in ((q, q2), (k, k2), (v, v2)):
            dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        fresh = _first(backend._package_call(q, k, v, None, False, None))
    assert out is not None and torch.equal(out, fresh) and not torch.equal(out, eager)


CHILD = r"""
import json, sys, time, torch
q = torch.randn(1, 256, 8, 128, device="cuda", dtype=torch.bfloat16)
from diffsynth_attention.backends import REGISTRY
b = REGISTRY["flash_attention_3"]
why = b.unavailable_reason()
out = {"why": why, "thin_reason": getattr(b, "thin_reason", None), "dynamo_before": "torch._dynamo" in sys.modules}
if why is None:
    t = time.perf_counter()
    with torch.no_grad():
        b.forward_native(q, q, q, None, False, None)
    torch.cuda.synchronize()
    out.update(first_call_s=time.perf_counter() - t, dynamo_after="torch._dynamo" in sys.modules)
print(json.dumps(out))
"""


def test_fa3_first_call_imports_no_dynamo_on_the_thin_path(tmp_path):
    """FlashAttention-3's interface is a torch.library.custom_op, whose first call imports
    torch._dynamo (1-1.6 s of Python): the thin path (what the loading thread's first launch runs)
    must not, in a fresh process."""
    env = child_env(tmp_path)
    proc = subprocess.run([sys.executable, "-c", CHILD], env=env, cwd=str(ROOT), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    if res["why"]:
        pytest.skip(f"flash_attention_3 unavailable: {res['why']}")
    if res["thin_reason"]:
        pytest.skip(f"flash_attention_3: thin path off: {res['thin_reason']}")
    assert not res["dynamo_before"], "torch._dynamo imported before the first call"
    assert not res["dynamo_after"], f"the first call imported torch._dynamo ({res['first_call_s']:.2f} s)"
