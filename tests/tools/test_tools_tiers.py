"""`warm` and `cache verify` make random inputs: whatever quality tier the environment (or a scope)
leaves in force, they never gate a low-precision candidate on them (docs/quality.md: only on a
pipeline's own activations). warm tunes the exact tier; verify re-times each decision at its own
key's tier, and --fix clears a low-precision tier's decision for the next real call to gate."""
import dataclasses

import torch

import diffsynth_attention as da
from diffsynth_attention import tiers
from diffsynth_attention.dispatch import default_dispatcher
from diffsynth_attention.tools import fuzz
from diffsynth_attention.tools.verify import verify
from diffsynth_attention.tools.warm import warm

from support.lowprec import NAME, Calls, install_fp8

SHAPE = {"batch": 1, "heads_q": 2, "heads_kv": 2, "seq_q": 64, "seq_kv": 64, "head_dim": 64, "dtype": "bfloat16",
         "causal": False, "window": None}


def test_warm_tunes_the_exact_tier_whatever_the_variable_says(isolated, monkeypatch):
    install_fp8(monkeypatch)
    monkeypatch.setenv(tiers.QUALITY, "fast")
    with da.quality("balanced"):
        [(_, info)] = warm([SHAPE], torch.device("cpu"))
    assert Calls.log == []  # the FP8 candidate was never gated (nor timed) on warm's random inputs
    assert "quality" not in info.key and info.candidates[NAME]["status"] == "unsupported"
    assert [d.key.get("quality") for d in default_dispatcher().store.entries().values()] == [None]
    [(_, again)] = warm([SHAPE], torch.device("cpu"))  # the second warm finds it (known() looks up the exact key)
    assert again.source == "cache" and again.key_id == info.key_id


def test_verify_fix_tunes_an_exact_decision_again_at_the_exact_tier(isolated, monkeypatch):
    install_fp8(monkeypatch)
    [(_, info)] = warm([SHAPE], torch.device("cpu"))
    d = default_dispatcher()
    stale = info.decision.replace(provisional=True)  # --fix tunes a provisional decision again
    d.store.put(stale)
    monkeypatch.setenv(tiers.QUALITY, "fast")  # left over in the environment
    [row] = verify(d, [stale], torch.device("cpu"), fix=True, samples=3)
    assert Calls.log == []
    assert set(d.store.entries()) == {info.key_id} and row["fixed"] and not row["fixed"].startswith("cleared")


def test_verify_fix_clears_a_low_precision_tier_decision_for_the_next_real_call(isolated, monkeypatch):
    install_fp8(monkeypatch)
    c = fuzz.make_case("rotary", seq=64, heads=2, **fuzz.SUITE["rotary"])
    with da.quality("fast"):
        e = da.explain(c.q, c.k, c.v)
    assert e.candidates[NAME]["status"] != "unsupported"
    d = default_dispatcher()
    stale = dataclasses.replace(e.decision, provisional=True)
    d.store.put(stale)
    Calls.log.clear()
    [row] = verify(d, [stale], torch.device("cpu"), fix=True, samples=3)
    assert row["fixed"].startswith("cleared") and "fast" in row["fixed"]
    assert d.store.entries() == {}  # not tuned again on random inputs, at no tier
    with da.quality("fast"):
        again = da.explain(c.q, c.k, c.v)  # the next real call gates it on its own data
    assert again.source == "tuned" and again.key_id == e.key_id


def test_warm_re_times_a_provisional_decision_on_a_quiet_host(isolated, monkeypatch):
    """A provisional decision (too noisy to confirm where it was tuned) is re-timed by a later
    process at its first quiet opportunity: a quiet warm is one (it answered it from the cache)."""
    from diffsynth_attention.tuning.policy import TuningPolicy

    [(_, first)] = warm([SHAPE], torch.device("cpu"))
    d = default_dispatcher()
    d.store.put(first.decision.replace(provisional=True))
    d.reset()
    monkeypatch.setenv("DIFFSYNTH_ATTENTION_RETIME", "on")
    monkeypatch.setattr(d, "policy", TuningPolicy(quiet=lambda: False))
    [(_, loaded)] = warm([SHAPE], torch.device("cpu"))
    assert loaded.source == "cache" and loaded.decision.provisional  # a loaded host: served as it is
    monkeypatch.setattr(d, "policy", TuningPolicy(quiet=lambda: True))
    [(_, quiet)] = warm([SHAPE], torch.device("cpu"))
    assert quiet.source == "tuned" and d.stats()["tunings"] == 1


def test_cli_explain_answers_for_the_exact_tier(isolated, monkeypatch, capsys):
    """`diffsynth-attention explain` makes random inputs too: with the variable left at fast it
    gated FP8 on them and stored the fast key's decision, which a pipeline's first real call then
    found in the cache (never gated on its own data)."""
    import json

    from diffsynth_attention.tools.cli import main

    install_fp8(monkeypatch)
    monkeypatch.setenv(tiers.QUALITY, "fast")
    assert main(["explain", "--heads", "2", "--seq-q", "64", "--head-dim", "64", "--device", "cpu", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert Calls.log == [] and "quality" not in doc["key"]
    assert [d.key.get("quality") for d in default_dispatcher().store.entries().values()] == [None]
