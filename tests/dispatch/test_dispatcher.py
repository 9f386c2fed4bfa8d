"""The Dispatcher object, its signature, per-key plan invalidation, explain's key id
and decision, and run-time failures that demote a backend only when they repeat."""

import pytest

import diffsynth_attention as da
from diffsynth_attention.callsite import needs_grad
from diffsynth_attention.dispatch import Dispatcher
from diffsynth_attention.request import Request
from diffsynth_attention.store.cache import DecisionCache
from diffsynth_attention.store.key import key_id

from support.flaky import force_flaky
from support.helpers import call_variants, full_reference, qkv, rel


class Recording(dict):
    """A plan table that records the signature every lookup asks for."""

    def __init__(self):
        super().__init__()
        self.asked = []

    def get(self, sig, default=None):
        self.asked.append(sig)
        return super().get(sig, default)


@pytest.mark.parametrize("kwargs", list(call_variants()))
def test_hot_path_signature_is_request_signature(disp, kwargs, monkeypatch):
    """The inlined tuple of the hot path equals Request.signature on every argument."""
    table = Recording()
    disp.plans = table  # the hot path closes over the table's .get: build a fresh forward on it
    from diffsynth_attention.dispatch.hot import make_forward

    fwd = make_forward(disp)
    monkeypatch.setenv("DIFFSYNTH_ATTENTION_IMPLEMENTATION", "auto")
    for scoped in (None, "torch"):
        table.asked.clear()
        if scoped:
            with da.use_backend(scoped):
                fwd(**kwargs)
        else:
            fwd(**kwargs)
        from diffsynth_attention import overrides

        req = Request(**kwargs)
        grad = needs_grad(req.q, req.k, req.v, req.attn_mask)
        assert table.asked[0] == req.signature(scoped, overrides.implementation_raw(), grad)


def test_signatures_differ_for_each_argument():
    """Every argument that changes a plan changes the signature (no two variants collide)."""
    reqs = [Request(**kw) for kw in call_variants()]
    sigs = [r.signature(None, None, needs_grad(r.q, r.k, r.v, r.attn_mask)) for r in reqs]
    assert len(set(sigs)) == len(sigs)


def test_own_dispatcher_has_own_cache_and_stats(tmp_path):
    a, b = Dispatcher(DecisionCache(tmp_path / "a")), Dispatcher(DecisionCache(tmp_path / "b"))
    q, k, v = qkv()
    a.forward(q, k, v)
    a.forward(q, k, v)
    assert a.stats()["tunings"] == 1 and a.stats()["hits"] == 1
    assert b.stats() == {"hits": 0, "tunings": 0, "tuning_seconds": 0.0}
    assert len(a.store.entries()) == 1 and b.store.entries() == {}
    assert len(list((tmp_path / "a" / "v2").glob("*.json"))) == 1 and not list((tmp_path / "b").glob("v2/*.json"))


def test_plans_are_invalidated_per_key(disp):
    q1, k1, v1 = qkv(sq=16)
    q2, k2, v2 = qkv(sq=24)
    disp.forward(q1, k1, v1)
    disp.forward(q2, k2, v2)
    assert len(disp.plans) == 2
    plan1 = next(p for p in disp.plans.values() if p.problem.seq_q == 16)
    plan2 = next(p for p in disp.plans.values() if p.problem.seq_q == 24)
    d = disp.store.get(plan1.key.id)
    disp.store.put(d)  # a new decision for key 1 only
    assert plan1 not in disp.plans.values()
    assert plan2 in disp.plans.values()


def test_explain_returns_key_id_and_decision(disp):
    q, k, v = qkv()
    info = disp.explain(q, k, v)
    assert info.key_id == key_id(info.key)
    assert info.decision is not None and info.decision.backend == info.backend
    assert info.decision is disp.store.get(info.key_id)
    assert info.as_dict()["decision"]["backend"] == info.backend


def test_transient_failure_drops_backend_in_process_but_keeps_disk(disp, monkeypatch):
    q, k, v = qkv()
    flaky, kid = force_flaky(disp, monkeypatch, q, k, v)
    flaky.failures = 1  # fails once; the retry passes
    out = disp.forward(q, k, v)
    assert rel(out, full_reference(q, k, v)) < 1e-5
    info = disp.explain(q, k, v)
    assert info.backend != "flash_attention_4"
    assert "once; a retry passed" in info.dropped["flash_attention_4"]
    assert "dropped in this process" in info.candidates["flash_attention_4"]["reason"]
    fresh = Dispatcher(DecisionCache(disp.store.directory))
    assert fresh.store.get(kid).backend == "flash_attention_4"  # the disk still holds it


def test_failure_tied_to_inputs_keeps_disk(disp, monkeypatch):
    """A failure that repeats on the retry but passes on fresh inputs is not the
    backend's: dropped in this process, the decision on disk is kept."""
    q, k, v = qkv()
    flaky, kid = force_flaky(disp, monkeypatch, q, k, v)
    flaky.failures = 2  # fails, and fails again on the retry; fresh inputs pass
    out = disp.forward(q, k, v)
    assert rel(out, full_reference(q, k, v)) < 1e-5
    assert "not on fresh inputs" in disp.explain(q, k, v).dropped["flash_attention_4"]
    fresh = Dispatcher(DecisionCache(disp.store.directory))
    assert fresh.store.get(kid).backend == "flash_attention_4"


def test_repeated_failure_on_fresh_inputs_rewrites_disk_decision(disp, monkeypatch):
    q, k, v = qkv()
    flaky, kid = force_flaky(disp, monkeypatch, q, k, v)
    flaky.failures = 10**6  # fails on the call, the retry and every fresh input
    out = disp.forward(q, k, v)
    assert rel(out, full_reference(q, k, v)) < 1e-5
    assert "fresh inputs" in disp.explain(q, k, v).dropped["flash_attention_4"]
    fresh = Dispatcher(DecisionCache(disp.store.directory))
    on_disk = fresh.store.get(kid)
    assert on_disk.backend != "flash_attention_4"
    assert on_disk.candidates["flash_attention_4"].status == "rejected"
