"""The sentinel: every Nth call of a low-precision decision re-checks one slice against the fp32
reference; drift beyond the tier's bound falls back to the best exact backend within one
period, recorded in the decision with the measured error, one warning, not revisited."""
import dataclasses
import logging

import diffsynth_attention as da
from diffsynth_attention import tiers
from diffsynth_attention.dispatch import default_dispatcher, lowprec
from diffsynth_attention.store.cache import DecisionCache
from diffsynth_attention.tools import fuzz

from support.lowprec import NAME, Calls, install_fp8

EVERY = 5


def case(name, seq=192):
    return fuzz.make_case(name, seq=seq, heads=2, **fuzz.SUITE[name])


def choose_fp8(c):
    """Tune the key at the fast tier, then let the FP8 candidate (which passed the gate) be the
    choice, as it is on a GPU where it is the fastest (on this CPU the emulation is slow)."""
    with da.quality("fast"):
        e = da.explain(c.q, c.k, c.v)
    assert e.candidates[NAME]["status"] in ("chosen", "accepted", "slower")
    d = default_dispatcher()
    cands = {n: dataclasses.replace(x, status="accepted") if x.status == "chosen" else x
             for n, x in e.decision.candidates.items()}
    cands[NAME] = dataclasses.replace(cands[NAME], status="chosen")
    d.store.put(dataclasses.replace(e.decision, backend=NAME, candidates=cands))
    return e.decision.key_id


def test_drift_falls_back_within_one_period(isolated, monkeypatch, caplog):
    monkeypatch.setenv("DIFFSYNTH_ATTENTION_SENTINEL_EVERY", str(EVERY))
    install_fp8(monkeypatch)
    benign, drifted = case("rotary"), case("outliers_20x_k_mean")
    key_id = choose_fp8(benign)
    with da.quality("fast"):
        for _ in range(2 * EVERY + 2):
            da.attention_forward(benign.q, benign.k, benign.v)
        e = da.explain(benign.q, benign.k, benign.v)
        assert e.backend == NAME and e.source == "cache"
        assert e.quality["sentinel"]["checks"] == 2 and e.quality["sentinel"]["calls"] == 2 * EVERY + 2
        assert e.quality["sentinel"]["last_rel_l1"] <= tiers.BOUNDS["fast"].rel_l1
        caplog.set_level(logging.WARNING, "diffsynth_attention")
        fp8_calls = len(Calls.log)
        for i in range(EVERY):  # the activations change distribution: the next check sees it
            out = da.attention_forward(drifted.q, drifted.k, drifted.v)
            if da.explain(drifted.q, drifted.k, drifted.v).backend != NAME:
                break
        else:
            raise AssertionError("no fallback within one sentinel period")
        # the call that found the drift got the exact backend's output
        assert fuzz.errors(out, fuzz.reference(drifted.q, drifted.k, drifted.v))["rel_l1"] < 5e-3
        e = da.explain(drifted.q, drifted.k, drifted.v)
        fb = e.decision.quality["fallback"]
        assert fb["from"] == NAME and fb["to"] == e.backend == lowprec.best_exact(e.decision)
        assert fb["rel_l1"] > tiers.BOUNDS["fast"].rel_l1 or fb["cosine"] < tiers.BOUNDS["fast"].cosine
        assert e.candidates[NAME]["status"] == "rejected" and "sentinel" in e.candidates[NAME]["reason"]
        n = len(Calls.log)
        for _ in range(3 * EVERY):  # not revisited
            da.attention_forward(benign.q, benign.k, benign.v)
        assert len(Calls.log) == n and n <= fp8_calls + EVERY
    warnings = [r for r in caplog.records if "quality sentinel" in r.getMessage()]
    assert len(warnings) == 1
    on_disk = DecisionCache(isolated).get(key_id)  # recorded in the stored decision
    assert on_disk.backend != NAME and on_disk.quality["fallback"]["from"] == NAME


def test_explain_shows_tier_bound_gate_and_sentinel(isolated, monkeypatch):
    monkeypatch.setenv("DIFFSYNTH_ATTENTION_SENTINEL_EVERY", "2")
    install_fp8(monkeypatch)
    c = case("randn", 176)
    choose_fp8(c)
    with da.quality("fast"):
        for _ in range(4):
            da.attention_forward(c.q, c.k, c.v)
        text = str(da.explain(c.q, c.k, c.v))
    assert "quality fast" in text and "sentinel: 2 checks in 4 calls (every 2)" in text and f"gate {NAME}" in text


def test_exact_decisions_are_never_watched(isolated, monkeypatch):
    monkeypatch.setenv("DIFFSYNTH_ATTENTION_SENTINEL_EVERY", "1")
    install_fp8(monkeypatch)
    measured = []
    monkeypatch.setattr(lowprec, "measure", lambda *a: measured.append(1) or (0.0, 1.0))
    c = case("randn", 168)
    for _ in range(5):
        da.attention_forward(c.q, c.k, c.v)
    with da.quality("fast"):  # a tier whose decision is an exact backend: no sentinel either
        for _ in range(5):
            da.attention_forward(c.q, c.k, c.v)
    assert measured == [] and default_dispatcher().sentinels == {}


def test_sentinel_off_with_zero(isolated, monkeypatch):
    monkeypatch.setenv("DIFFSYNTH_ATTENTION_SENTINEL_EVERY", "0")
    install_fp8(monkeypatch)
    measured = []
    monkeypatch.setattr(lowprec, "measure", lambda *a: measured.append(1) or (1.0, 0.0))
    c = case("randn", 160)
    choose_fp8(c)
    with da.quality("fast"):
        for _ in range(6):
            da.attention_forward(c.q, c.k, c.v)
        assert da.explain(c.q, c.k, c.v).backend == NAME
    assert measured == []


def test_the_sentinel_watches_every_head_in_turn(isolated, monkeypatch):
    """Drift in one middle head only (the gate's first and last heads stay benign) is found once
    the checks have rotated to it."""
    import torch

    monkeypatch.setenv("DIFFSYNTH_ATTENTION_SENTINEL_EVERY", "1")
    install_fp8(monkeypatch)
    good = fuzz.make_case("g", seq=152, heads=4, rotary=True)
    bad = fuzz.make_case("b", seq=152, heads=4, **fuzz.SUITE["outliers_20x_k_mean"])
    choose_fp8(good)
    mixed = [torch.cat([g[:, :1], b[:, 1:2], g[:, 2:]], dim=1) for g, b in
             ((good.q, bad.q), (good.k, bad.k), (good.v, bad.v))]
    with da.quality("fast"):
        for _ in range(4):  # checks of heads {0, 3}, {2, 3}, {0, 1}: the third one sees head 1
            da.attention_forward(*mixed)
        e = da.explain(*mixed)
    assert e.backend != NAME and e.decision.quality["fallback"]["checks"] == 3


def test_unset_period_stretches_to_keep_checks_under_one_percent(isolated, monkeypatch):
    install_fp8(monkeypatch)
    c = case("randn", 40)
    choose_fp8(c)
    d = default_dispatcher()
    with da.quality("fast"):
        e = da.explain(c.q, c.k, c.v)
        cands = dict(e.decision.candidates)
        cands[NAME] = dataclasses.replace(cands[NAME], time_ms=1e-3)  # a very fast kernel: checks are dear
        d.store.put(dataclasses.replace(e.decision, candidates=cands))
        for _ in range(200):  # DIFFSYNTH_ATTENTION_SENTINEL_EVERY unset: the first check at call 200
            da.attention_forward(c.q, c.k, c.v)
        s = da.explain(c.q, c.k, c.v).quality["sentinel"]
    assert s["checks"] == 1 and s["calls"] == 200
    assert s["every"] >= s["last_check_ms"] / (lowprec.SENTINEL_SHARE * 1e-3) > 200


def test_a_key_chosen_again_after_clear_cache_is_watched_again(isolated, monkeypatch, caplog):
    """After a fallback, ``clear_cache()`` lets the key choose the low-precision backend again: its
    sentinel must watch the new decision (not keep the old one's fell_back state, which skips every
    check), and its fallback is logged again (one warning per fallback, not per key and process)."""
    monkeypatch.setenv("DIFFSYNTH_ATTENTION_SENTINEL_EVERY", "1")
    install_fp8(monkeypatch)
    benign, drifted = case("rotary", 136), case("outliers_20x_k_mean", 136)
    choose_fp8(benign)
    with da.quality("fast"):
        da.attention_forward(drifted.q, drifted.k, drifted.v)  # the first check falls back
        assert da.explain(drifted.q, drifted.k, drifted.v).backend != NAME
    da.clear_cache()
    choose_fp8(benign)  # tuned again and the FP8 candidate chosen, as after a fresh start
    with da.quality("fast"):
        for _ in range(3):
            da.attention_forward(drifted.q, drifted.k, drifted.v)
        e = da.explain(drifted.q, drifted.k, drifted.v)
    assert e.backend != NAME and e.decision.quality["fallback"]["from"] == NAME
    told = [r for r in caplog.records if r.levelname == "WARNING" and r.getMessage().startswith("quality sentinel:")
            and "drifted" in r.getMessage()]
    assert len(told) == 2, [r.getMessage() for r in told]


def test_a_provisional_decision_that_fell_back_is_not_re_timed_back(isolated, monkeypatch):
    """A fallback is not revisited unless the cache is cleared: a later process on a quiet host
    re-times provisional decisions, and must not re-gate (and so re-admit) the backend that drifted."""
    from diffsynth_attention.store.cache import DecisionCache as Cache
    from diffsynth_attention.tuning.policy import TuningPolicy

    monkeypatch.setenv("DIFFSYNTH_ATTENTION_SENTINEL_EVERY", "1")
    install_fp8(monkeypatch)
    benign, drifted = case("rotary", 128), case("outliers_20x_k_mean", 128)
    key_id = choose_fp8(benign)
    d = default_dispatcher()
    d.store.put(d.store.get(key_id, tolerance=1.0).replace(provisional=True))  # too noisy to confirm where it was tuned
    with da.quality("fast"):
        da.attention_forward(drifted.q, drifted.k, drifted.v)  # the first check falls back
    d.store.flush()
    monkeypatch.setenv("DIFFSYNTH_ATTENTION_RETIME", "on")
    later = da.Dispatcher(Cache(isolated), policy=TuningPolicy(quiet=lambda: True))
    with da.quality("fast"):
        e = later.explain(benign.q, benign.k, benign.v)
    assert e.source == "cache" and later.stats()["tunings"] == 0
    assert e.decision.quality["fallback"]["from"] == NAME and e.candidates[NAME]["status"] == "rejected"


def test_non_finite_inputs_are_not_drift(isolated, monkeypatch):
    """A NaN in the caller's q makes every backend's output NaN: the sentinel skips that check
    rather than store a permanent fallback blaming the low-precision kernel; the next finite call is checked."""
    monkeypatch.setenv("DIFFSYNTH_ATTENTION_SENTINEL_EVERY", "1")
    install_fp8(monkeypatch)
    c = case("rotary", 128)
    choose_fp8(c)
    q = c.q.clone()
    q[0, 0, 5, 3] = float("nan")
    with da.quality("fast"):
        da.attention_forward(q, c.k, c.v)
        da.attention_forward(c.q, c.k, c.v)
        e = da.explain(c.q, c.k, c.v)
    assert e.backend == NAME and e.decision.quality["fallback"] is None
    assert e.quality["sentinel"]["checks"] == 1 and e.quality["sentinel"]["calls"] == 2


def test_the_sentinel_watches_every_batch_element_in_turn(isolated, monkeypatch):
    """A classifier-free-guidance batch: drift in batch element 1 only (element 0 stays benign).
    Before, every check measured batch 0, so the drift was never seen; now the second check
    measures element 1, with the gate's first and last heads."""
    import types

    import torch

    monkeypatch.setenv("DIFFSYNTH_ATTENTION_SENTINEL_EVERY", "1")
    install_fp8(monkeypatch)
    good = fuzz.make_case("g", seq=152, heads=2, rotary=True)
    bad = fuzz.make_case("b", seq=152, heads=2, **fuzz.SUITE["outliers_20x_k_mean"])
    pair = types.SimpleNamespace(**{n: torch.cat([getattr(good, n)] * 2) for n in "qkv"})
    choose_fp8(pair)  # the batch-2 key, tuned on benign data
    mixed = [torch.cat([getattr(good, n), getattr(bad, n)]) for n in "qkv"]
    with da.quality("fast"):
        da.attention_forward(*mixed)  # check 0: batch element 0, benign
        s = da.explain(*mixed).quality["sentinel"]
        assert s["checks"] == 1 and s["last_batch"] == 0 and s["last_heads"] == [0, 1] and not s["fell_back"]
        for _ in range(3):
            da.attention_forward(*mixed)
        e = da.explain(*mixed)
    assert e.backend != NAME and e.decision.quality["fallback"]["checks"] == 2


def test_a_check_another_thread_is_running_is_not_run_twice(isolated, monkeypatch):
    """Threads that reach a check at once run one check: a call that finds the check lock held
    serves its output unchecked (before, each ran its own check, at the reference's cost)."""
    monkeypatch.setenv("DIFFSYNTH_ATTENTION_SENTINEL_EVERY", "1")
    install_fp8(monkeypatch)
    c = case("rotary")
    choose_fp8(c)
    with da.quality("fast"):
        da.attention_forward(c.q, c.k, c.v)
        state = default_dispatcher().sentinels[da.explain(c.q, c.k, c.v).decision.key_id]
        assert state.checks == 1
        with state.checking:  # another thread's check, in progress
            da.attention_forward(c.q, c.k, c.v)
        assert state.checks == 1 and state.calls == 2
        da.attention_forward(c.q, c.k, c.v)  # the next call after it checks again
    assert state.checks == 2


def test_a_plan_of_the_decision_that_fell_back_serves_the_exact_backend(isolated, monkeypatch):
    """A thread that planned the key from the low-precision decision while another thread's check
    fell back stores its plan after the fallback dropped the key's plans: that stale plan must not
    go on serving the low-precision kernel, unwatched (its sentinel has fallen back: no check runs)."""
    monkeypatch.setenv("DIFFSYNTH_ATTENTION_SENTINEL_EVERY", "1")
    install_fp8(monkeypatch)
    benign, drifted = case("rotary", 152), case("outliers_20x_k_mean", 152)
    choose_fp8(benign)
    d = default_dispatcher()
    with da.quality("fast"):
        da.attention_forward(benign.q, benign.k, benign.v)
        [(sig, stale)] = [(s, p) for s, p in d.plans.items() if p.backend == NAME]
        da.attention_forward(drifted.q, drifted.k, drifted.v)  # the check falls back: the key's plans dropped
        d._store_plan(sig, stale)  # the other thread's plan, stored now
        Calls.log.clear()
        out = da.attention_forward(drifted.q, drifted.k, drifted.v)
        assert Calls.log == []
        assert da.explain(drifted.q, drifted.k, drifted.v).backend != NAME
    assert fuzz.errors(out, fuzz.reference(drifted.q, drifted.k, drifted.v))["rel_l1"] < 5e-3


def test_a_low_precision_stand_in_for_a_dropped_backend_is_watched(isolated, monkeypatch):
    """The decided exact backend fails once at run time (a retry passes): it is dropped for the key
    in this process and the decision's next best serves. Where that is the low-precision candidate,
    its sentinel watches it as it watches a low-precision decision (it served unwatched)."""
    monkeypatch.setenv("DIFFSYNTH_ATTENTION_SENTINEL_EVERY", "1")
    install_fp8(monkeypatch)
    benign, drifted = case("rotary", 160), case("outliers_20x_k_mean", 160)
    with da.quality("fast"):
        e = da.explain(benign.q, benign.k, benign.v)
    d = default_dispatcher()
    cands = {n: dataclasses.replace(x, time_ms=1e-6) if n == NAME else x for n, x in e.decision.candidates.items()}
    d.store.put(dataclasses.replace(e.decision, candidates=cands))  # the FP8 candidate: the runner-up
    assert e.decision.backend != NAME and e.candidates[NAME]["status"] in ("accepted", "slower")
    d.dropped[e.key_id] = {e.decision.backend: "failed at run time (once; a retry passed)"}  # as faults.after_failure
    d.invalidate(e.key_id)
    with da.quality("fast"):
        out = da.attention_forward(drifted.q, drifted.k, drifted.v)
        after = da.explain(drifted.q, drifted.k, drifted.v)
    assert after.backend != NAME and after.candidates[NAME]["status"] == "rejected"
    assert after.decision.quality["fallback"]["from"] == NAME
    assert fuzz.errors(out, fuzz.reference(drifted.q, drifted.k, drifted.v))["rel_l1"] < 5e-3


def test_a_batch_element_that_stays_non_finite_does_not_hide_the_others(isolated, monkeypatch):
    """One element of a batch of two went NaN (an fp16 overflow, say) and stays NaN; the other
    drifts. A skipped check moves on to the next slice: before, it measured the NaN element again
    at every period, so the other element was never watched."""
    import types

    import torch

    monkeypatch.setenv("DIFFSYNTH_ATTENTION_SENTINEL_EVERY", "1")
    install_fp8(monkeypatch)
    good = fuzz.make_case("g", seq=168, heads=2, rotary=True)
    bad = fuzz.make_case("b", seq=168, heads=2, **fuzz.SUITE["outliers_20x_k_mean"])
    choose_fp8(types.SimpleNamespace(**{n: torch.cat([getattr(good, n)] * 2) for n in "qkv"}))
    nan_q = good.q.clone()
    nan_q[0, 0, 3, 1] = float("nan")
    mixed = [torch.cat([nan_q, bad.q]), torch.cat([good.k, bad.k]), torch.cat([good.v, bad.v])]
    with da.quality("fast"):
        for _ in range(4):
            da.attention_forward(*mixed)
        e = da.explain(*mixed)
    assert e.backend != NAME and e.decision.quality["fallback"]["from"] == NAME


def test_no_check_runs_while_a_cuda_graph_is_captured(isolated, monkeypatch):
    """A check reads two numbers back (a device synchronisation), which a CUDA graph capture
    refuses ("operation not permitted when stream is capturing"): a check that falls due during a
    capture waits for the next call outside it. (Simulated on the CPU: callsite.capturing() says so.)"""
    from diffsynth_attention import callsite

    monkeypatch.setenv("DIFFSYNTH_ATTENTION_SENTINEL_EVERY", "1")
    install_fp8(monkeypatch)
    benign, drifted = case("rotary", 176), case("outliers_20x_k_mean", 176)
    key_id = choose_fp8(benign)
    state = None
    with da.quality("fast"):
        da.attention_forward(benign.q, benign.k, benign.v)  # planned (outside a capture), checked once
        state = default_dispatcher().sentinels[key_id]
        monkeypatch.setattr(callsite, "capturing", lambda device_type: True)
        da.attention_forward(drifted.q, drifted.k, drifted.v)  # captured: its check waits
        assert state.checks == 1 and not state.fell_back
        monkeypatch.setattr(callsite, "capturing", lambda device_type: False)
        da.attention_forward(drifted.q, drifted.k, drifted.v)
    assert state.checks == 2 and state.fell_back
