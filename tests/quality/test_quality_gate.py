"""The gate on the caller's own activations, over the fuzz suite: a low-precision candidate is
admitted where its error on the caller's q, k, v is within the tier's bound, rejected where it
is not, and no low-precision decision exceeds its bound on the data it serves."""
import pytest
import torch

import diffsynth_attention as da
from diffsynth_attention import tiers
from diffsynth_attention.tools import fuzz

from support.lowprec import NAME, install_fp8

PASSED = ("chosen", "accepted", "slower")


def case(name, seq, heads=2):
    return fuzz.make_case(name, seq=seq, heads=heads, **fuzz.SUITE[name])


def gated(c, tier):
    with da.quality(tier):
        return da.explain(c.q, c.k, c.v)


def test_fast_admits_fp8_on_benign_activations(isolated, monkeypatch):
    install_fp8(monkeypatch)
    e = gated(case("rotary", 200), "fast")
    assert e.candidates[NAME]["status"] in PASSED
    ev = e.quality["gate"][NAME]
    bound = tiers.BOUNDS["fast"]
    assert ev["rel_l1"] <= bound.rel_l1 and ev["cosine"] >= bound.cosine
    assert ev["rel_l1"] == e.candidates[NAME]["error"]  # the evidence is the gate's own measurement


@pytest.mark.parametrize("name", ["outliers_10x", "outliers_50x", "peaked_4x_outliers_20x"])
def test_fast_rejects_fp8_where_the_callers_activations_make_it_exceed_the_bound(isolated, monkeypatch, name):
    install_fp8(monkeypatch)
    e = gated(case(name, 208), "fast")
    cand = e.candidates[NAME]
    assert cand["status"] == "rejected" and "bound" in cand["reason"] and e.backend != NAME
    ev = e.quality["gate"][NAME]
    assert ev["rel_l1"] > tiers.BOUNDS["fast"].rel_l1 or ev["cosine"] < tiers.BOUNDS["fast"].cosine


def test_balanced_rejects_fp8_even_on_benign_activations(isolated, monkeypatch):
    install_fp8(monkeypatch)
    e = gated(case("randn", 216), "balanced")
    assert e.candidates[NAME]["status"] == "rejected"


def test_the_gate_is_on_the_callers_data_not_random_data(isolated, monkeypatch):
    """Random data of the same shape would pass the fast bound; the caller's outlier data must not."""
    install_fp8(monkeypatch)
    bad = case("outliers_20x_k_mean", 224)
    assert gated(bad, "fast").candidates[NAME]["status"] == "rejected"
    rand = fuzz.make_case("randn", seq=232, heads=2)
    assert gated(rand, "fast").candidates[NAME]["status"] in PASSED


def test_non_finite_inputs_refuse_low_precision_candidates(isolated, monkeypatch):
    install_fp8(monkeypatch)
    c = case("randn", 240)
    q = c.q.clone()
    q[0, 0, 3, 1] = float("nan")
    e = gated(fuzz.FuzzCase("nan", q, c.k, c.v, {}), "fast")
    assert e.candidates[NAME]["status"] == "unsupported" and "not finite" in e.candidates[NAME]["reason"]


def test_a_decision_whose_gate_could_not_run_is_provisional(isolated, monkeypatch):
    """The first call of a key had a NaN in q: its low-precision candidates were never gated. The
    decision is served, but provisional: a later process on a quiet host gates them on its own
    finite call (it was final: FP8 was out of that key for good, on the strength of one bad call)."""
    from diffsynth_attention.dispatch import default_dispatcher
    from diffsynth_attention.store.cache import DecisionCache
    from diffsynth_attention.tuning.policy import TuningPolicy

    install_fp8(monkeypatch)
    c = case("randn", 248)
    q = c.q.clone()
    q[0, 1, 7, 2] = float("nan")
    first = gated(fuzz.FuzzCase("nan", q, c.k, c.v, {}), "fast")
    assert first.decision.provisional and "not gated" in first.decision.confirmation
    default_dispatcher().store.flush()
    monkeypatch.setenv("DIFFSYNTH_ATTENTION_RETIME", "on")
    later = da.Dispatcher(DecisionCache(isolated), policy=TuningPolicy(quiet=lambda: True))
    with da.quality("fast"):
        again = later.explain(c.q, c.k, c.v)
    assert first.key_id in later.retimed  # the stored decision, re-timed
    assert again.key_id == first.key_id and again.candidates[NAME]["status"] in PASSED


def test_no_low_precision_decision_exceeds_its_bound_on_the_fuzz_suite(isolated, monkeypatch):
    """The guard target: over every case of the suite (each a key of its own), wherever the FP8
    candidate passed the gate, its error on every head of the caller's data is within the bound."""
    install_fp8(monkeypatch)
    bound = tiers.BOUNDS["fast"]
    admitted = rejected = 0
    for i, name in enumerate(fuzz.SUITE):
        c = case(name, 128 + 8 * i, heads=3)
        e = gated(c, "fast")
        if e.candidates[NAME]["status"] not in PASSED:
            rejected += 1
            continue
        admitted += 1
        with da.use_backend(NAME):
            out = da.attention_forward(c.q, c.k, c.v)
        err = fuzz.errors(out, fuzz.reference(c.q, c.k, c.v))
        assert max(err["per_head_rel_l1"]) <= bound.rel_l1 * 1.1, (name, err)
        assert min(err["per_head_cosine"]) >= bound.cosine - 1e-3, (name, err)
    assert admitted and rejected  # the suite has both sides


def test_fuzz_cases_have_the_hazards_they_name():
    c = fuzz.make_case("x", seq=64, heads=2, head_dim=32, dtype=torch.float32, outlier_channels=3, outlier_scale=30.0,
                       k_mean=5.0)
    per_channel = c.q.abs().mean(dim=(0, 1, 2))
    assert (per_channel > 10 * per_channel.median()).sum() == 3
    assert c.k.mean(dim=2).abs().mean() > 2  # a large shared component over the sequence
    r = fuzz.make_case("r", seq=64, heads=1, head_dim=32, dtype=torch.float32, rotary=True)
    plain = fuzz.make_case("p", seq=64, heads=1, head_dim=32, dtype=torch.float32)
    assert torch.allclose(r.q.norm(dim=-1), plain.q.norm(dim=-1), rtol=1e-4)  # a rotation: norms kept
    assert not torch.allclose(r.q, plain.q)
    peaked = fuzz.make_case("k", seq=64, heads=1, head_dim=32, dtype=torch.float32, peak=4.0)
    top = lambda t: torch.softmax(t.q @ t.k.transpose(-1, -2) / 32 ** 0.5, -1).amax(-1).mean()  # noqa: E731
    assert top(peaked) > 2 * top(plain)


def test_every_head_is_checked_not_only_the_slice(isolated, monkeypatch):
    """A middle head with outlier channels (the slice's first and last heads are benign) is found."""
    install_fp8(monkeypatch)
    good = fuzz.make_case("g", seq=248, heads=3, rotary=True)
    bad = fuzz.make_case("b", seq=248, heads=3, **fuzz.SUITE["outliers_20x_k_mean"])
    q, k, v = (torch.cat([g[:, :1], b[:, 1:2], g[:, 2:]], dim=1) for g, b in
               ((good.q, bad.q), (good.k, bad.k), (good.v, bad.v)))
    e = gated(fuzz.FuzzCase("mixed", q, k, v, {}), "fast")
    ev = e.quality["gate"][NAME]
    assert ev["rel_l1"] <= tiers.BOUNDS["fast"].rel_l1  # the slice alone would pass
    assert e.candidates[NAME]["status"] == "rejected" and e.candidates[NAME]["reason"].startswith("head 1:")
    assert ev["worst_head"] == 1


def test_the_last_batch_element_is_checked_too(isolated, monkeypatch):
    """A classifier-free-guidance batch whose second element has outlier channels (batch 0 is
    benign in every head): before, the gate read batch 0 only and admitted the FP8 kernel."""
    install_fp8(monkeypatch)
    good = fuzz.make_case("g", seq=248, heads=2, rotary=True)
    bad = fuzz.make_case("b", seq=248, heads=2, **fuzz.SUITE["outliers_20x_k_mean"])
    q, k, v = (torch.cat([g, b]) for g, b in ((good.q, bad.q), (good.k, bad.k), (good.v, bad.v)))
    e = gated(fuzz.FuzzCase("cfg", q, k, v, {}), "fast")
    ev = e.quality["gate"][NAME]
    assert ev["rel_l1"] <= tiers.BOUNDS["fast"].rel_l1  # batch 0 alone would pass
    assert e.candidates[NAME]["status"] == "rejected" and e.candidates[NAME]["reason"].startswith("batch 1 head ")
    assert ev["worst_head_batch"] == 1
    from diffsynth_attention.explain_text import quality_lines

    assert any("worst batch 1 head" in line for line in quality_lines(e.quality))
