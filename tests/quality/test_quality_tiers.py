"""Quality tiers: how a tier is set (variable, scope, per call, per module), and that ``exact``
is today's behaviour: no low-precision candidate gated, timed or chosen, and the same key."""
import threading

import pytest
import torch

import diffsynth_attention as da
from diffsynth_attention import tiers
from diffsynth_attention.backends import LOW_PRECISION_REASON, REGISTRY, candidates, device_info
from diffsynth_attention.problem import prepare
from diffsynth_attention.store.key import make_key
from diffsynth_attention.tools import fuzz

from support.lowprec import NAME, Calls, install_fp8


def case(seq, name="randn"):
    return fuzz.make_case(name, seq=seq, heads=2, **fuzz.SUITE[name])


def test_exact_never_gates_times_or_chooses_a_low_precision_candidate(isolated, monkeypatch):
    install_fp8(monkeypatch)
    c = case(96)
    e = da.explain(c.q, c.k, c.v)
    assert e.candidates[NAME]["status"] == "unsupported"
    assert e.candidates[NAME]["reason"] == LOW_PRECISION_REASON
    assert e.candidates["sage_attention"]["status"] == "unsupported"
    assert Calls.log == []  # the FP8 kernel never ran
    assert e.quality is None and "quality" not in e.key and "quality" not in e.decision.to_dict()


def test_exact_key_is_the_key_made_before_tiers(isolated, monkeypatch):
    """The exact tier's key is make_key over every backend declared able (low-precision ones
    included, as before), with no tier field: entries stored before tiers keep matching."""
    install_fp8(monkeypatch)
    c = case(80)
    call = prepare(c.q, c.k, c.v, "b n s d", "b n s d", "b n s d", "b n s d", None, None, None, False, None, False)
    dev = device_info(c.q.device)
    before = make_key(call.problem, dev, candidates(call.problem, dev)[0])  # the old call: no tier argument
    assert da.explain(c.q, c.k, c.v).key_id == before.id
    with da.quality("fast"):
        fast = da.explain(c.q, c.k, c.v)
    assert fast.key_id != before.id and fast.key["quality"] == "fast"
    assert {k: v for k, v in fast.key.items() if k != "quality"} == before.fields


def test_the_variable_and_the_scope_set_the_tier_per_call(isolated, monkeypatch):
    install_fp8(monkeypatch)
    c = case(72)
    da.attention_forward(c.q, c.k, c.v)
    assert Calls.log == []
    monkeypatch.setenv(tiers.QUALITY, "fast")
    da.attention_forward(c.q, c.k, c.v)  # read on every call: a new plan, a new key, the FP8 gate
    assert Calls.log
    assert da.explain(c.q, c.k, c.v).key["quality"] == "fast"
    with da.quality("exact"):  # the scope wins over the variable
        assert "quality" not in da.explain(c.q, c.k, c.v).key
        assert da.current_quality() == "exact"
    assert da.current_quality() == "fast"


def test_scopes_are_per_thread_and_nest():
    seen = {}
    with da.quality("balanced"):
        with da.quality("fast"):
            t = threading.Thread(target=lambda: seen.update(other=da.current_quality()))
            t.start()
            t.join()
            seen["inner"] = da.current_quality()
        seen["outer"] = da.current_quality()
    assert seen == {"other": "exact", "inner": "fast", "outer": "balanced"}
    assert da.current_quality() == "exact"


@pytest.mark.parametrize("bad", ["fastest", "1", "exact!"])
def test_a_bad_tier_is_an_error_naming_its_source(isolated, monkeypatch, bad):
    with pytest.raises(ValueError, match=r"quality\(tier\)"):
        with da.quality(bad):
            pass
    monkeypatch.setenv(tiers.QUALITY, bad)
    q = torch.randn(1, 1, 8, 8)
    with pytest.raises(ValueError, match=tiers.QUALITY):
        da.attention_forward(q, q, q)


def test_empty_variable_is_exact(isolated, monkeypatch):
    monkeypatch.setenv(tiers.QUALITY, " ")
    assert tiers.current() == "exact"
    monkeypatch.setenv(tiers.QUALITY, "FAST")
    assert tiers.current() == "fast"


def test_the_fp8_backend_is_unavailable_with_a_reason_without_cuda():
    backend = REGISTRY[NAME]
    why = backend.unavailable_reason()
    assert why is not None and ("CUDA" in why or "not installed" in why)
    assert backend.low_precision and not backend.exact and REGISTRY["sage_attention"].low_precision


def test_a_plan_is_of_the_tier_its_signature_read(isolated, monkeypatch):
    """DIFFSYNTH_ATTENTION_QUALITY is process-wide: another thread may set it while this one plans
    a call. The plan is stored under the signature read before planning, so it must be of that
    signature's tier; a fast plan stored under the exact signature served every later exact call
    at the fast tier (the tier was read again while planning)."""
    import diffsynth_attention.dispatch.dispatcher as dispatcher_module

    install_fp8(monkeypatch)
    c = case(88)
    real = dispatcher_module.prepare_request

    def another_thread_sets_the_variable(*args, **kwargs):  # between the signature and the plan
        monkeypatch.setattr(dispatcher_module, "prepare_request", real)
        monkeypatch.setenv(tiers.QUALITY, "fast")
        return real(*args, **kwargs)
    monkeypatch.setattr(dispatcher_module, "prepare_request", another_thread_sets_the_variable)
    da.attention_forward(c.q, c.k, c.v)  # planned under the exact signature
    monkeypatch.delenv(tiers.QUALITY)
    Calls.log.clear()
    for _ in range(2):
        da.attention_forward(c.q, c.k, c.v)
    e = da.explain(c.q, c.k, c.v)
    assert "quality" not in e.key and e.candidates[NAME]["status"] == "unsupported" and Calls.log == []


def test_quality_decorates_functions_and_coroutine_functions_and_serves_async_with():
    """``@quality("fast")`` on an ``async def`` ran its body at the caller's tier (the decorator's
    block ended when the coroutine object was made, before it ran); now the body runs at the tier.
    A generator function is refused (its scope would leak between its yields); a block is entered once."""
    import asyncio

    import pytest

    @da.quality("fast")
    async def denoise():
        await asyncio.sleep(0)
        return da.current_quality()

    @da.quality("balanced")
    def encode():
        return da.current_quality()

    async def main():
        async with da.quality("balanced"):
            inside = da.current_quality()
        return inside, da.current_quality()
    assert asyncio.run(denoise()) == "fast"
    assert asyncio.run(main()) == ("balanced", "exact")
    assert encode() == "balanced" and encode() == "balanced" and da.current_quality() == "exact"
    with pytest.raises(TypeError, match="generator"):
        @da.quality("fast")
        def frames():
            yield da.current_quality()
    block = da.quality("fast")
    with block:
        pass
    with pytest.raises(RuntimeError, match="once"):
        with block:
            pass
    assert da.current_quality() == "exact"
