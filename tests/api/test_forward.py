"""The public ``attention_forward``: DiffSynth-compatible results against the fp32 reference, the
registry, overrides (``use_backend``, the environment, ``current_implementation``) and clear errors."""
import asyncio
import sys
import threading
import types
from types import MappingProxyType

import pytest
import torch
from einops import rearrange

import diffsynth_attention as da
from diffsynth_attention.backends import REGISTRY

from support.helpers import broken_package, full_reference, qkv, rel


@pytest.fixture(autouse=True)
def torch_only(monkeypatch):
    monkeypatch.setenv("DIFFSYNTH_ATTENTION_IMPLEMENTATION", "torch")


CASES = [
    dict(name="plain"),
    dict(name="cross", skv=48),
    dict(name="gqa", hq=8, hk=2),
    dict(name="causal", causal=True),
    dict(name="causal_rect", skv=48, causal=True),
    dict(name="scale", scale=0.3),
    dict(name="dv", dv=24),
    dict(name="bool_mask", mask="bool"),
    dict(name="additive_mask", mask="additive"),
    dict(name="window", window=3),
    dict(name="window0", window=0),
]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1.5e-2)])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c["name"])
@pytest.mark.parametrize("impl", ["torch", "torch_math", "torch_flash", "auto"])
def test_matches_fp32_reference(case, dtype, tol, impl, monkeypatch):
    monkeypatch.setenv("DIFFSYNTH_ATTENTION_IMPLEMENTATION", impl)
    q, k, v = qkv(hq=case.get("hq", 4), hk=case.get("hk"), skv=case.get("skv"), dv=case.get("dv"), dtype=dtype)
    mask = None
    if case.get("mask") == "bool":
        mask = torch.rand(1, 4, q.shape[2], k.shape[2], generator=torch.Generator().manual_seed(1)) > 0.3
    elif case.get("mask") == "additive":
        mask = torch.randn(q.shape[2], k.shape[2], generator=torch.Generator().manual_seed(1)).to(dtype)
    kwargs = dict(attn_mask=mask, scale=case.get("scale"), is_causal=case.get("causal", False), window_size=case.get("window"))
    out = da.attention_forward(q, k, v, **kwargs)
    ref = full_reference(q, k, v, mask, case.get("scale"), case.get("causal", False), case.get("window"))
    assert out.shape == ref.shape
    assert rel(out, ref) < tol


@pytest.mark.parametrize("pattern,dims", [("b s n d", None), ("b s (n d)", {"n": 4}), ("b s (n d)", {"d": 16}), ("s b n d", None),
                                          ("b s (n d)", MappingProxyType({"n": 4}))])  # any mapping, as einops' **dims takes
def test_patterns_match_canonical(pattern, dims):
    q, k, v = qkv()
    qs, ks, vs = (rearrange(t, f"b n s d -> {pattern}").contiguous() for t in (q, k, v))
    out = da.attention_forward(qs, ks, vs, pattern, pattern, pattern, pattern, dims=dims)
    expected = rearrange(da.attention_forward(q, k, v), f"b n s d -> {pattern}")
    assert torch.allclose(out, expected, atol=1e-6)


def test_canonical_layout_hands_the_callers_tensors_to_the_backend(monkeypatch):
    """In b n s d the runner passes q, k, v through untouched: no permute, no copy."""
    from diffsynth_attention.backends import torch_sdpa

    seen = []
    real = torch_sdpa._SDPA

    def spy(q, k, v, *args, **kwargs):
        seen.append((q, k, v))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch_sdpa, "_SDPA", spy)
    q, k, v = qkv()
    with da.use_backend("torch"):
        da.attention_forward(q, k, v)
    assert seen and all(a is b for a, b in zip(seen[-1], (q, k, v)))


def test_compatibility_mode_forces_torch(monkeypatch):
    monkeypatch.setenv("DIFFSYNTH_ATTENTION_IMPLEMENTATION", "torch_math")
    q, k, v = qkv()
    assert da.explain(q, k, v).backend == "torch_math"
    assert da.explain(q, k, v, compatibility_mode=True).backend == "torch"


def test_caller_tensors_are_not_modified():
    q, k, v = qkv()
    copies = [t.clone() for t in (q, k, v)]
    da.attention_forward(q, k, v)
    assert all(torch.equal(a, b) for a, b in zip(copies, (q, k, v)))


# -- errors -----------------------------------------------------------------------------
def _err(exc, match, *args, **kwargs):
    q, k, v = qkv()
    with pytest.raises(exc, match=match):
        da.attention_forward(*(args or (q, k, v)), **kwargs)


def test_unknown_backend_lists_names(monkeypatch):
    monkeypatch.setenv("DIFFSYNTH_ATTENTION_IMPLEMENTATION", "flash_attention_9")
    _err(ValueError, r"DIFFSYNTH_ATTENTION_IMPLEMENTATION='flash_attention_9' is not a backend; allowed: auto.*torch")
    with pytest.raises(ValueError, match=r"use_backend\(name\)='nope'.*torch_cudnn"):
        with da.use_backend("nope"):
            pass


def test_pattern_errors():
    q, k, v = qkv()
    _err(ValueError, r"q_pattern=.\(b n\) s d. has 3 axes but q has 4 dims", q, k, v, q_pattern="(b n) s d", dims={"n": 4})
    _err(ValueError, r"k_pattern='b n x d' lacks 's'", q, k, v, k_pattern="b n x d")
    q3 = rearrange(q, "b n s d -> b s (n d)")
    _err(ValueError, r"q_pattern='b s \(n d\)' packs \(n d\) but dims gives the length of none", q3, k, v, q_pattern="b s (n d)")
    _err(TypeError, r"dims must be a dict", q, k, v, dims=[("n", 4)])


def test_tensor_errors():
    q, k, v = qkv()
    _err(TypeError, r"q, k and v must share a dtype", q, k.double(), v)
    _err(TypeError, r"floating tensor", q, k.long(), v.long())
    _err(TypeError, r"q must be a torch.Tensor", q.tolist(), k, v)
    _err(ValueError, r"same head dim; q has 16, k has 8", q, k[..., :8], v)
    qa, ka, va = qkv(hq=6, hk=4)
    _err(ValueError, r"query heads \(6\) must be a multiple of key/value heads \(4\)", qa, ka, va)
    if torch.device("meta") != q.device:
        _err(ValueError, r"one device", q, k.to("meta"), v)


def test_mask_and_window_errors():
    q, k, v = qkv()
    _err(ValueError, r"attn_mask of shape \(5, 32\) does not broadcast to \(b, n, s_q, s_kv\) = \(2, 4, 32, 32\)", q, k, v,
         attn_mask=torch.zeros(5, 32, dtype=torch.bool))
    _err(TypeError, r"attn_mask must be bool, float32 or of the query's dtype", q, k, v, attn_mask=torch.zeros(32, 32, dtype=torch.int64))
    _err(ValueError, r"window_size cannot be combined with is_causal", q, k, v, window_size=2, is_causal=True)
    _err(ValueError, r"window_size cannot be combined with attn_mask", q, k, v, window_size=2, attn_mask=torch.ones(32, 32, dtype=torch.bool))
    _err(ValueError, r"window_size=-1 must be a non-negative int", q, k, v, window_size=-1)
    _err(TypeError, r"scale must be a number", q, k, v, scale="0.5")


def test_errors_come_before_any_kernel(monkeypatch):
    calls = []
    monkeypatch.setattr(REGISTRY["torch"], "forward", lambda *a: calls.append(a))
    q, k, v = qkv()
    with pytest.raises(ValueError):
        da.attention_forward(q, k[..., :8], v)
    assert calls == []


# -- overrides (items 5, 6) ---------------------------------------------------------------
def test_environment_is_read_at_call_time(monkeypatch):
    q, k, v = qkv()
    monkeypatch.setenv("DIFFSYNTH_ATTENTION_IMPLEMENTATION", "TORCH_MATH")
    assert da.explain(q, k, v).backend == "torch_math"
    monkeypatch.setenv("DIFFSYNTH_ATTENTION_IMPLEMENTATION", "torch_flash")
    assert da.explain(q, k, v).backend == "torch_flash"


def test_scope_wins_nests_and_restores_on_exception(monkeypatch):
    q, k, v = qkv()
    with da.use_backend("torch_math"):
        assert da.explain(q, k, v).backend == "torch_math"
        with pytest.raises(RuntimeError):
            with da.use_backend("torch_flash"):
                assert da.explain(q, k, v).backend == "torch_flash"
                raise RuntimeError("boom")
        assert da.explain(q, k, v).backend == "torch_math"
    assert da.explain(q, k, v).backend == "torch"


def test_scope_is_per_thread_and_per_task():
    q, k, v = qkv()
    seen = {}

    def other():
        seen["thread"] = da.explain(q, k, v).backend

    async def task(name, backend):
        with da.use_backend(backend):
            await asyncio.sleep(0.01)
            seen[name] = da.explain(q, k, v).backend

    with da.use_backend("torch_math"):
        t = threading.Thread(target=other)
        t.start()
        t.join()

    async def both():
        await asyncio.gather(task("a", "torch_flash"), task("b", "torch_math"))

    asyncio.run(both())
    assert seen == {"thread": "torch", "a": "torch_flash", "b": "torch_math"}


def test_forced_backend_that_cannot_serve_falls_back_with_one_warning(caplog):
    q, k, v = qkv(hq=8, hk=2)  # torch_flash takes no grouped-query attention
    with da.use_backend("torch_flash"):
        for _ in range(3):
            out = da.attention_forward(q, k, v)
        info = da.explain(q, k, v)
    warnings = [r for r in caplog.records if "cannot serve" in r.message]
    assert len(warnings) == 1 and "grouped-query attention" in warnings[0].message
    assert info.backend == "torch" and info.source == "fallback"
    assert rel(out, full_reference(q, k, v)) < 1e-5


def test_strict_mode_raises_with_reasons(monkeypatch):
    monkeypatch.setenv("DIFFSYNTH_ATTENTION_STRICT", "1")
    q, k, v = qkv(hq=8, hk=2)
    with da.use_backend("torch_flash"), pytest.raises(da.BackendNotSupportedError, match="grouped-query attention"):
        da.attention_forward(q, k, v)


def test_missing_package_warns_with_package_then_torch(caplog, monkeypatch):
    q, k, v = qkv()
    with da.use_backend("xformers"):
        out = da.attention_forward(q, k, v)
    assert any("xformers" in r.message and "install" in r.message for r in caplog.records)
    assert rel(out, full_reference(q, k, v)) < 1e-5
    monkeypatch.setenv("DIFFSYNTH_ATTENTION_STRICT", "1")
    with da.use_backend("xformers"), pytest.raises(da.BackendNotSupportedError, match="xformers"):
        da.attention_forward(q, k, v)


def test_bad_strict_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("DIFFSYNTH_ATTENTION_STRICT", "maybe")
    q, k, v = qkv(hq=8, hk=2)
    # (raised at the first call, or where a fresh process first loads the public functions)
    with pytest.raises(ValueError, match="DIFFSYNTH_ATTENTION_STRICT='maybe'"), da.use_backend("torch_flash"):
        da.attention_forward(q, k, v)


# -- availability -------------------------------------------------------------------------
def test_available_backends_lists_every_name():
    avail = da.available_backends()
    assert set(avail) == set(REGISTRY)
    assert avail["torch"] is None
    for name in ("flash_attention_2", "flash_attention_3", "flash_attention_4", "sage_attention", "xformers"):
        assert avail[name] is None or isinstance(avail[name], str)


def test_installed_but_broken_package_is_unavailable_with_reason(monkeypatch):
    broken = types.ModuleType("flash_attn_interface")

    def explode(name):
        raise OSError("libcudart.so.13: cannot open shared object file")

    broken.__getattr__ = explode
    monkeypatch.setitem(sys.modules, "flash_attn_interface", broken)
    from diffsynth_attention.backends.flash_attention import FlashAttention3

    backend = FlashAttention3()
    reason = backend.unavailable_reason()
    assert reason.startswith("installed but unusable") and "libcudart" in reason


def test_import_error_of_any_kind_never_breaks_the_package(monkeypatch, tmp_path):
    broken_package(tmp_path, monkeypatch, "sageattention", "raise RuntimeError('CUDA driver version is insufficient')")
    from diffsynth_attention.backends.sage import SageAttention

    reason = SageAttention().unavailable_reason()
    assert "RuntimeError: CUDA driver version is insufficient" in reason


def test_current_implementation_reports_the_backend_actually_serving(monkeypatch):
    from support.virtual import Off

    monkeypatch.setitem(REGISTRY, "flash_attention_4", Off("flash_attention_4"))  # unavailable, on a GPU too
    q, k, v = qkv(b=1, hq=2, sq=8, d=16)
    assert REGISTRY["flash_attention_4"].unavailable_reason() is not None
    with da.use_backend("flash_attention_4"):
        da.attention_forward(q, k, v)
        assert da.current_implementation() == "torch"  # the calls run on torch
        assert da.explain(q, k, v).backend == "torch"
        monkeypatch.setenv("DIFFSYNTH_ATTENTION_STRICT", "1")  # strict: calls raise, nothing falls back
        assert da.current_implementation() == "flash_attention_4"
    monkeypatch.delenv("DIFFSYNTH_ATTENTION_STRICT")
    with da.use_backend("torch_math"):
        assert da.current_implementation() == "torch_math"
    monkeypatch.setenv("DIFFSYNTH_ATTENTION_IMPLEMENTATION", "flash_attention_4")
    assert da.current_implementation() == "torch"
    monkeypatch.setenv("DIFFSYNTH_ATTENTION_IMPLEMENTATION", "auto")
    assert da.current_implementation() == "auto"


def test_a_numpy_float32_scale_warns_nothing():
    """Before: the hot path's finiteness check compared the scale with the largest float, which
    NumPy casts to float32 first: an overflow RuntimeWarning on every call with a np.float32 scale."""
    np = pytest.importorskip("numpy")
    import warnings

    q, k, v = qkv(b=1, hq=2, sq=16)
    with warnings.catch_warnings(record=True) as seen:  # recorded: the hot path catches what "error" raises
        warnings.simplefilter("always")
        for _ in range(3):  # the first call (the signature path) and the hits after it
            out = da.attention_forward(q, k, v, scale=np.float32(0.25))
    assert [w for w in seen if issubclass(w.category, RuntimeWarning)] == []
    assert rel(out, full_reference(q, k, v, scale=0.25)) < 1e-5


@pytest.mark.parametrize("mask_kind", ["bool", "additive"])
@pytest.mark.parametrize("skv", [32, 48])
def test_math_kernel_serves_a_mask_with_is_causal(mask_kind, skv, monkeypatch):
    """attn_mask and is_causal=True together mean both (PyTorch's CPU SDPA, the gate's reference).
    Before: ``torch_math`` passed both to ``aten._scaled_dot_product_attention_math``, which refuses
    them ("Explicit attn_mask should not be set when is_causal=True"): a backend declared able to
    serve the call failed on every such call (strict mode raised it)."""
    monkeypatch.setenv("DIFFSYNTH_ATTENTION_STRICT", "1")
    q, k, v = qkv(skv=skv)
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(1, 4, 32, skv, generator=g) > 0.3 if mask_kind == "bool" else torch.randn(32, skv, generator=g)
    ref = full_reference(q, k, v, mask, None, True)
    with da.use_backend("torch_math"):
        out = da.attention_forward(q, k, v, attn_mask=mask, is_causal=True)
        assert da.explain(q, k, v, attn_mask=mask, is_causal=True).backend == "torch_math"
    assert rel(out, ref) < 1e-5


def test_use_backend_decorates_a_coroutine_function_for_its_run_and_its_task_alone():
    """``@use_backend(name)`` on an ``async def`` set the scope only while the coroutine object was
    made (contextlib's decorator), so its body ran at the caller's backend. Now the body runs under
    the scope, in its own task only: another task running while it is suspended inside sees none,
    and nothing is left once it returns. It shares quality()'s decorator (a generator function is refused)."""
    seen = {}

    @da.use_backend("torch_math")
    async def denoise(started, resume):
        seen["before"] = da.current_implementation()
        started.set()
        await resume.wait()  # suspended inside its scope while the other task runs
        seen["after"] = da.current_implementation()
        return da.current_implementation()

    async def other(started, resume):
        await started.wait()
        seen["other"] = da.current_implementation()
        resume.set()

    async def main():
        started, resume = asyncio.Event(), asyncio.Event()
        got, _ = await asyncio.gather(denoise(started, resume), other(started, resume))
        return got, da.current_implementation()

    assert asyncio.run(main()) == ("torch_math", "torch")  # this module's variable: torch
    assert seen == {"before": "torch_math", "after": "torch_math", "other": "torch"}
    assert da.current_implementation() == "torch"

    @da.use_backend("torch_math")
    def encode():
        return da.current_implementation()
    assert encode() == "torch_math" and encode() == "torch_math" and da.current_implementation() == "torch"
    with pytest.raises(TypeError, match="generator"):
        @da.use_backend("torch_math")
        def frames():
            yield da.current_implementation()
