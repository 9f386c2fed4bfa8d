"""Run-time faults: a repeated call is checked as strictly as a first call (no input error
reaches a backend or changes a stored decision), and a CUDA error that poisons the context
demotes nothing."""

import contextlib
import logging

import pytest
import torch

from diffsynth_attention.backends import REGISTRY
from diffsynth_attention.dispatch import Dispatcher
from diffsynth_attention.request import Request
from diffsynth_attention.store.cache import DecisionCache

from support.helpers import qkv
from support.flaky import force_flaky


def _spy_plans(disp):
    """Count the backend calls of every plan the dispatcher holds."""
    calls = []
    for plan in list(disp.plans.values()):
        inner = plan.run

        def run(*args, _inner=inner):
            calls.append(args)
            return _inner(*args)
        plan.run = run
    return calls


def _disk(disp):
    return {p.name: p.read_bytes() for p in sorted((disp.store.directory / "v2").glob("*.json"))}


def _meta(t):
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


# (first call's changes, bad repeat's changes, error type, what the message names)
BAD_REPEATS = [
    ({}, {"q": "sparse"}, TypeError, "q has layout"),
    ({}, {"k": "meta"}, ValueError, "k on meta"),
    ({}, {"v": "meta"}, ValueError, "v on meta"),
    ({"scale": 0.5}, {"scale": float("nan")}, ValueError, "scale=nan"),
    ({"scale": 0.5}, {"scale": float("inf")}, ValueError, "scale=inf"),
    ({"scale": 1}, {"scale": 10**400}, ValueError, "scale="),
    ({"window_size": 3}, {"window_size": 3.0}, ValueError, "window_size=3.0"),
    ({"window_size": 1}, {"window_size": True}, ValueError, "window_size=True"),
    ({"is_causal": True}, {"is_causal": 1.0}, TypeError, "is_causal"),
    ({"compatibility_mode": True}, {"compatibility_mode": 1.0}, TypeError, "compatibility_mode"),
    ({"attn_mask": "bool"}, {"attn_mask": "meta"}, TypeError, "attn_mask is a meta tensor"),
    ({"attn_mask": "bool"}, {"attn_mask": "sparse"}, TypeError, "attn_mask has layout"),
    ({"packed": {"n": 2}}, {"packed": {"n": 2.0}}, ValueError, "dims"),
]


def _kwargs(changes, q, k, v):
    kw = dict(q=q, k=k, v=v)
    for name, value in changes.items():
        if name in ("q", "k", "v"):
            kw[name] = kw[name].to_sparse() if value == "sparse" else _meta(kw[name])
        elif name == "attn_mask":
            mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool)
            kw[name] = {"bool": mask, "meta": _meta(mask), "sparse": mask.to_sparse()}[value]
        elif name == "packed":
            kw.update(q=q.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1),
                      k=k.transpose(1, 2).reshape(k.shape[0], k.shape[2], -1),
                      v=v.transpose(1, 2).reshape(v.shape[0], v.shape[2], -1),
                      q_pattern="b s (n d)", k_pattern="b s (n d)", v_pattern="b s (n d)", out_pattern="b s (n d)",
                      dims=value)
        else:
            kw[name] = value
    return kw


@pytest.mark.parametrize("first,bad,error,named", BAD_REPEATS, ids=[str(b) for _, b, _, _ in BAD_REPEATS])
def test_repeated_call_is_checked_as_strictly_as_a_first_call(disp, first, bad, error, named):
    q, k, v = qkv(b=1, hq=2, sq=8, d=8)
    good = _kwargs(first, q, k, v)
    disp.forward(**good)
    disp.forward(**good)  # planned and cached
    before = _disk(disp)
    calls = _spy_plans(disp)
    with pytest.raises(error, match=named):  # the first call of the bad input raises the same
        Dispatcher(DecisionCache(disp.store.directory.parent / "other")).forward(**_kwargs({**first, **bad}, q, k, v))
    with pytest.raises(error, match=named):
        disp.forward(**_kwargs({**first, **bad}, q, k, v))
    assert calls == []  # no backend saw it
    assert disp.dropped == {} and _disk(disp) == before


def test_failure_handler_raises_input_errors_and_changes_nothing(disp, monkeypatch):
    """Even if a bad input reached a failing backend, the handler names the input error and
    neither drops the backend nor touches the decision on disk."""
    q, k, v = qkv()
    flaky, kid = force_flaky(disp, monkeypatch, q, k, v)
    plan = next(iter(disp.plans.values()))
    before = _disk(disp)
    flaky.failures = 10**6
    with pytest.raises(ValueError, match="k on meta"):
        disp.run(plan, Request(q, _meta(k), v), None, False)
    assert disp.dropped == {} and _disk(disp) == before


@pytest.mark.parametrize("message", [
    "CUDA error: an illegal memory access was encountered",
    "CUDA error: device-side assert triggered\nCUDA kernel errors might be asynchronously reported",
    "CUDA error: unspecified launch failure",
])
def test_poisoning_cuda_error_demotes_nothing_and_is_raised(disp, monkeypatch, caplog, message):
    q, k, v = qkv()
    flaky, kid = force_flaky(disp, monkeypatch, q, k, v)

    def poisoned(*args, **kwargs):
        raise RuntimeError(message)
    monkeypatch.setattr(flaky, "forward", poisoned)
    disp.invalidate()
    before = _disk(disp)
    with caplog.at_level(logging.ERROR, logger="diffsynth_attention"):
        with pytest.raises(RuntimeError, match="CUDA error"):
            disp.forward(q, k, v)
    assert disp.dropped == {} and _disk(disp) == before
    assert any("poisons" in r.getMessage() for r in caplog.records)
    assert Dispatcher(DecisionCache(disp.store.directory)).store.get(kid).backend == "flash_attention_4"


def test_non_sticky_cuda_error_is_still_a_backend_failure(disp, monkeypatch):
    q, k, v = qkv()
    flaky, kid = force_flaky(disp, monkeypatch, q, k, v)

    def bad_config(*args, **kwargs):
        raise RuntimeError("CUDA error: invalid configuration argument")
    monkeypatch.setattr(flaky, "forward", bad_config)
    disp.invalidate()
    disp.forward(q, k, v)  # served by another backend
    assert "flash_attention_4" in disp.dropped[kid]
    assert REGISTRY["flash_attention_4"] is flaky


def test_unknown_sticky_error_is_found_by_probing_the_context(disp, monkeypatch):
    """An error whose text is not a known sticky one still demotes nothing when CUDA no longer
    works afterwards (the probe is a sync and a one-element kernel; faked here on the CPU)."""
    from diffsynth_attention.dispatch import faults

    q, k, v = qkv()
    flaky, kid = force_flaky(disp, monkeypatch, q, k, v)
    flaky.failures = 10**6
    monkeypatch.setattr(faults, "context_broken", lambda device: True)
    before = _disk(disp)
    with pytest.raises(RuntimeError, match="launch failed"):
        disp.forward(q, k, v)
    assert disp.dropped == {} and _disk(disp) == before


@pytest.mark.parametrize("forced", [False, True], ids=["decided", "use_backend"])
def test_a_call_sdpa_refuses_alike_drops_no_backend(disp, monkeypatch, forced):
    """An inference-mode q in a call whose k and v need gradients: PyTorch's SDPA refuses it
    ('Inference tensors cannot be saved for backward', autograd's error for any backend). Before, the
    gradient-free retry passed, so the failure read as the backend's: this one call dropped the
    decided backend for the process (later valid calls ran the next best), or replaced a
    use_backend plan by torch."""
    import diffsynth_attention as da

    q, k, v = qkv()
    k, v = k.requires_grad_(), v.requires_grad_()
    flaky, kid = force_flaky(disp, monkeypatch, q, k, v)
    with torch.inference_mode():
        qi = q.clone()
    before = _disk(disp)
    with da.use_backend("flash_attention_4") if forced else contextlib.nullcontext():
        with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
            disp.forward(qi, k, v)
        assert disp.dropped == {} and _disk(disp) == before
        info = disp.explain(q, k, v)
        assert info.backend == "flash_attention_4" and info.source in ("cache", "override")
        disp.forward(q, k, v).sum().backward()  # the valid call still runs its backend
