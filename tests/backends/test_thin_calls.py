"""Thin kernel calls (issue 29, item 3) on the CPU, against fakes of the packages' internals:
the arguments each thin path prepares, and every case where the package's own function serves."""
import functools
import logging
import sys
import threading

import pytest
import torch
from einops import rearrange

import diffsynth_attention as da
from diffsynth_attention.backends import REGISTRY, flash_attention, thin, warmup
from diffsynth_attention.backends.flash_attention import FlashAttention3, FlashAttention4

from support import fake_kernels as fk
from support import fake_thin as ft
from support.fake_thin import install_fa4, on_cpu
from support.helpers import full_reference, qkv, rel

FA3_VERSION = "3.0.0.post20260810"


@pytest.fixture(autouse=True)
def clean():
    fk.Recorder.calls.clear()
    ft.FA3_CALLS.clear()


def bsnd(*ts):
    return [rearrange(t, "b n s d -> b s n d").contiguous() for t in ts]


@pytest.fixture
def fa3(monkeypatch):
    """FlashAttention-3 on the CPU: the fake interface, and the fake operator as its thin path."""
    monkeypatch.setitem(sys.modules, "flash_attn_interface", fk.make_fa3())
    monkeypatch.setattr(flash_attention, "package_version", lambda d: FA3_VERSION if d == "tokenspeed-fa3" else None)
    monkeypatch.setattr(thin, "build_fa3", functools.partial(thin.build_fa3, ops=ft.fa3_ops()))
    backend = on_cpu(FlashAttention3)
    monkeypatch.setitem(REGISTRY, "flash_attention_3", backend)
    assert backend.unavailable_reason() is None
    return backend


def test_fa3_thin_path_calls_the_operator_with_the_interfaces_arguments(fa3):
    assert fa3.thin_reason is None and isinstance(fa3._thin, thin.FA3Thin)
    q, k, v = qkv(hq=4, hk=2, d=16)
    with da.use_backend("flash_attention_3"):
        out = da.attention_forward(q, k, v, window_size=3)
        out_scaled = da.attention_forward(q, k, v, scale=0.3)
    assert not fk.Recorder.calls, "the interface was called"
    assert len(ft.FA3_CALLS) == 2
    args = ft.FA3_CALLS[0]
    assert len(args) == len(thin.FA3_ARGUMENTS)
    named = dict(zip(thin.FA3_ARGUMENTS, args))
    assert named["softmax_scale"] == 16 ** -0.5 and named["is_causal"] is False
    assert (named["window_size_left"], named["window_size_right"]) == (3, 3)
    # what flash_attn_func passes (not the operator's own defaults: num_splits 0, rotary False)
    assert (named["num_splits"], named["pack_gqa"], named["sm_margin"], named["attention_chunk"], named["softcap"],
            named["is_rotary_interleaved"]) == (1, None, 0, 0, 0.0, True)
    assert all(named[n] is None for n in thin.FA3_ARGUMENTS[3:23])
    assert dict(zip(thin.FA3_ARGUMENTS, ft.FA3_CALLS[1]))["softmax_scale"] == 0.3
    assert ft.FA3_CALLS[1][24:27] == (False, -1, -1)
    assert rel(out, full_reference(q, k, v, window=3)) < 1e-5
    assert rel(out_scaled, full_reference(q, k, v, scale=0.3)) < 1e-5


def test_fa3_thin_output_equals_the_interfaces(fa3):
    qs, ks, vs = bsnd(*qkv(hq=4, hk=2, d=16, sq=24))
    for causal, window in ((False, None), (True, None), (False, 2)):
        got = fa3.forward_native(qs, ks, vs, None, causal, window)
        w = (window, window) if window is not None else (-1, -1)
        want = fa3._func(qs, ks, vs, softmax_scale=None, causal=causal, window_size=w)[0]
        assert torch.equal(got, want)


def test_fa3_calls_the_thin_path_cannot_serve_go_to_the_interface(fa3):
    q, k, v = qkv(d=16)
    qs, ks, vs = bsnd(q, k, v)
    fa3.forward_native(*(t.clone().requires_grad_(True) for t in (qs, ks, vs)), None, False, None)
    assert [c[0] for c in fk.Recorder.calls] == ["fa3"] and not ft.FA3_CALLS  # gradients: the interface's autograd
    strided_v = vs.transpose(-1, -2).contiguous().transpose(-1, -2)  # last dim not contiguous: it copies first
    out = fa3.forward_native(qs, ks, strided_v, None, False, None)
    assert len(fk.Recorder.calls) == 2 and not ft.FA3_CALLS
    assert rel(rearrange(out, "b s n d -> b n s d"), full_reference(q, k, v)) < 1e-5


class _Op:
    def __init__(self, names, results=4):
        self.default = type("Op", (), {"_schema": type("S", (), {
            "arguments": [type("A", (), {"name": n})() for n in names], "returns": [None] * results})()})()


@pytest.mark.parametrize("case,needle", [
    ("version", "version 3.1.0 not among those checked"),
    ("defaults", "num_splits default is 0"),
    ("schema", "unexpected schema"),
    ("no_op", "AttributeError"),
    ("env", "DIFFSYNTH_ATTENTION_THIN_CALLS=0"),
])
def test_fa3_thin_path_is_off_with_a_reason_where_its_assumptions_fail(case, needle, monkeypatch):
    module = fk.make_fa3()
    version, ops = FA3_VERSION, ft.fa3_ops()
    if case == "version":
        version = "3.1.0"
    elif case == "defaults":
        module.flash_attn_func = lambda q, k, v, softmax_scale=None, causal=False, qv=None, q_descale=None, \
            k_descale=None, v_descale=None, window_size=(-1, -1), attention_chunk=0, softcap=0.0, num_splits=0, \
            pack_gqa=None, sm_margin=0: None
    elif case == "schema":
        ops = type("Ns", (), {"fwd": _Op(thin.FA3_ARGUMENTS[:-1])})()
    elif case == "no_op":
        ops = type("Ns", (), {})()
    else:
        monkeypatch.setenv("DIFFSYNTH_ATTENTION_THIN_CALLS", "0")
    got, why = thin.build_fa3(module, version, ops=ops)
    assert got is None and needle in why


def test_fa3_backend_without_a_thin_path_serves_through_the_interface(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "flash_attn_interface", fk.make_fa3())
    monkeypatch.setattr(flash_attention, "package_version", lambda d: "3.2.0" if d == "tokenspeed-fa3" else None)
    backend = on_cpu(FlashAttention3)
    with caplog.at_level(logging.INFO, logger="diffsynth_attention"):
        assert backend.unavailable_reason() is None
    assert backend._thin is None and "3.2.0" in backend.thin_reason
    assert any("thin kernel calls off" in r.getMessage() for r in caplog.records)
    q, k, v = qkv(d=16)
    out = backend.forward(q, k, v, None, None, False, None, False)
    assert fk.Recorder.calls and rel(out, full_reference(q, k, v)) < 1e-5


def test_a_thin_call_that_fails_where_the_interface_works_turns_the_thin_path_off(fa3, caplog):
    def broken(*args):
        raise TypeError("fwd() got an unexpected argument")
    fa3._thin = thin.FA3Thin(broken)
    q, k, v = qkv(d=16)
    with caplog.at_level(logging.WARNING, logger="diffsynth_attention"):
        out = fa3.forward(q, k, v, None, None, False, None, False)
    assert rel(out, full_reference(q, k, v)) < 1e-5
    assert fa3._thin is None and "TypeError" in fa3.thin_reason
    assert any("thin kernel calls turned off" in r.getMessage() for r in caplog.records)


def test_a_thin_call_failing_like_the_interface_keeps_the_thin_path(fa3):
    def broken(*args):
        raise RuntimeError("head dim not supported")
    fa3._thin = kept = thin.FA3Thin(broken)
    fa3._func = lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("head dim not supported"))
    q, k, v = qkv(d=16)
    with pytest.raises(RuntimeError, match="head dim"):
        fa3.forward(q, k, v, None, None, False, None, False)
    assert fa3._thin is kept


def test_fa3_first_launch_on_the_loading_thread_takes_the_thin_path(fa3):
    """The package's interface (a custom_op: its first call imports torch._dynamo, 1-1.6 s) is
    not what the loading thread's first launch runs."""
    key = {"problem": {"batch": 1, "heads_q": 2, "heads_kv": 2, "seq_q": 8, "seq_kv": 8, "head_dim": 16,
                       "head_dim_v": 16, "dtype": "float32", "mask": "none", "causal": False, "window": None},
           "device": {"type": "cpu"}}
    assert warmup.warm(fa3, [key]) == 1
    assert len(ft.FA3_CALLS) == 1 and not fk.Recorder.calls


# -- FlashAttention-4 ------------------------------------------------------------------------------------
def kernel_calls(interface):
    return sum(k.calls for k in interface._flash_attn_fwd.compile_cache.cache.values())


def test_fa4_first_call_of_a_signature_is_the_packages_then_the_compiled_kernel_directly(monkeypatch):
    fa4, interface = install_fa4(monkeypatch)
    assert fa4.thin_reason is None and isinstance(fa4._thin, thin.FA4Thin)
    cache = interface._flash_attn_fwd.compile_cache
    qs, ks, vs = bsnd(*qkv(hq=4, hk=2, d=16))
    first = fa4.forward_native(qs, ks, vs, None, True, None)
    assert interface.counts == {"func": 1, "compiles": 1} and interface._flash_attn_fwd.compile_cache is cache
    outs = [fa4.forward_native(qs, ks, vs, None, True, None) for _ in range(3)]
    assert interface.counts["func"] == 1 and kernel_calls(interface) == 4  # thin: the kernel, not the interface
    want = interface.flash_attn_func(qs, ks, vs, causal=True)[0]
    assert all(torch.equal(o, want) for o in [first] + outs)
    assert all(o.data_ptr() != first.data_ptr() for o in outs)  # a new output each call
    # another signature (scale, window, shape): the package's call first, then thin again
    before = interface.counts["func"]
    fa4.forward_native(qs, ks, vs, 0.25, False, 2)
    fa4.forward_native(qs, ks, vs, 0.25, False, 2)
    fa4.forward_native(qs[:, :8], ks, vs, 0.25, False, None)
    assert interface.counts["func"] == before + 2
    out = fa4.forward_native(qs, ks, vs, 0.25, False, 2)
    assert interface.counts["func"] == before + 2 and torch.equal(
        out, interface.flash_attn_func(qs, ks, vs, softmax_scale=0.25, window_size=(2, 2))[0])


def test_fa4_through_the_dispatcher_matches_the_reference(monkeypatch):
    install_fa4(monkeypatch)
    q, k, v = qkv(d=16, sq=24)
    with da.use_backend("flash_attention_4"):
        outs = [da.attention_forward(q, k, v, is_causal=True) for _ in range(3)]
    assert all(rel(o, full_reference(q, k, v, causal=True)) < 1e-5 for o in outs)


def test_fa4_calls_the_thin_path_cannot_serve_go_to_the_package(monkeypatch):
    fa4, interface = install_fa4(monkeypatch)
    qs, ks, vs = bsnd(*qkv(d=16))
    fa4.forward_native(qs, ks, vs, None, False, None)
    for _ in range(2):  # gradients: the package's autograd
        fa4.forward_native(qs.clone().requires_grad_(True), ks, vs, None, False, None)
    assert interface.counts["func"] == 3
    # the same signature on a misaligned pointer (the package copies it first)
    base = torch.randn(qs.numel() + 1)
    shifted = base[1:].view(qs.shape)
    shifted.copy_(qs)
    assert shifted.data_ptr() % 16 and shifted.stride() == qs.stride()
    out = fa4.forward_native(shifted, ks, vs, None, False, None)
    assert interface.counts["func"] == 4 and torch.equal(out, fa4.forward_native(qs, ks, vs, None, False, None))


@pytest.mark.parametrize("kw,needle", [
    (dict(copies=True), "a copy"),
    (dict(kernel_calls=2), "2 compiled-kernel calls"),
    (dict(lse_always=True), "other tensors"),
])
def test_fa4_signature_whose_first_call_looks_unexpected_stays_on_the_package(monkeypatch, kw, needle):
    fa4, interface = install_fa4(monkeypatch, **kw)
    qs, ks, vs = bsnd(*qkv(d=16))
    for _ in range(3):
        out = fa4.forward_native(qs, ks, vs, None, False, None)
    assert interface.counts["func"] == 3
    assert list(fa4._thin.reasons.values()) and needle in list(fa4._thin.reasons.values())[0]
    assert rel(rearrange(out, "b s n d -> b n s d"), full_reference(*qkv(d=16))) < 1e-5


def test_fa4_failed_package_call_restores_the_compile_cache(monkeypatch):
    fa4, interface = install_fa4(monkeypatch)
    cache = interface._flash_attn_fwd.compile_cache
    qs, ks, vs = bsnd(*qkv(d=16))
    with pytest.raises(RuntimeError):  # fewer keys than values: the fake's einsum fails
        fa4.forward_native(qs, ks[:, :8], vs, None, False, None)
    assert interface._flash_attn_fwd.compile_cache is cache


def test_fa4_capture_records_only_the_capturing_threads_kernel_calls():
    seen = []
    cache = ft.JITCache()
    cache["key"] = lambda *a: seen.append(a)
    recording = thin._Recording(cache, threading.get_ident())
    other = []
    t = threading.Thread(target=lambda: other.append(recording["key"]))
    t.start()
    t.join()
    assert other[0] is cache["key"]  # another thread gets the kernel itself
    recording["key"](1, 2)
    assert recording.calls and recording.calls[0][1] == (1, 2) and seen == [(1, 2)]
    assert "key" in recording and recording.cache is cache.cache


@pytest.mark.parametrize("case,needle", [
    ("version", "version 4.0.0b35 not among those checked"),
    ("no_cache", "AttributeError"),
    ("signature", "no argument window_size_left"),
    ("func", "not the interface's"),
    ("env", "DIFFSYNTH_ATTENTION_THIN_CALLS=0"),
])
def test_fa4_thin_path_is_off_with_a_reason_where_its_assumptions_fail(case, needle, monkeypatch):
    _, cute, interface = ft.make_fa4_interface()
    version, func = "4.0.0b36", cute.flash_attn_func
    if case == "version":
        version = "4.0.0b35"
    elif case == "no_cache":
        del interface._flash_attn_fwd.compile_cache
    elif case == "signature":
        cache = interface._flash_attn_fwd.compile_cache
        interface._flash_attn_fwd = lambda q, k, v, softmax_scale=None, causal=False: None
        interface._flash_attn_fwd.compile_cache = cache
    elif case == "func":
        func = lambda *a, **kw: None  # noqa: E731
    else:
        monkeypatch.setenv("DIFFSYNTH_ATTENTION_THIN_CALLS", "0")
    got, why = thin.build_fa4(interface, func, version)
    assert got is None and needle in why


def test_fa4_signatures_kept_are_bounded(monkeypatch):
    fa4, interface = install_fa4(monkeypatch)
    monkeypatch.setattr(thin, "MAX_SIGNATURES", 3)
    qs, ks, vs = bsnd(*qkv(d=16, sq=40))
    for s in range(8, 14):
        fa4.forward_native(qs[:, :s], ks, vs, None, False, None)
    assert len(fa4._thin.entries) == 3


def test_fa4_cost_model_launch_floor_follows_the_thin_path(monkeypatch):
    fa4, _ = install_fa4(monkeypatch)
    assert fa4.launch_ms == FlashAttention4.thin_launch_ms < FlashAttention4.launch_ms
    monkeypatch.setenv("DIFFSYNTH_ATTENTION_THIN_CALLS", "0")
    off, _ = install_fa4(monkeypatch)
    assert off._thin is None and off.launch_ms == FlashAttention4.launch_ms
