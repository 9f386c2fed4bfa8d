"""The numeric gate and the decisions it makes: a NaN in the first call's inputs poisons nothing, the
mutation check treats NaN as equal, the gate's random inputs keep shape, dtype and strides, and a
decision whose candidates were all rejected is used once and never saved (nor trusted on disk)."""
import dataclasses
import torch

import diffsynth_attention as da
from diffsynth_attention.dispatch import default_dispatcher
from diffsynth_attention.store import cache as cache_mod
from diffsynth_attention.store.cache import DecisionCache
from diffsynth_attention.tuning import tuner
from diffsynth_attention.tuning import trial

from support.helpers import full_reference, qkv, rel

store = default_dispatcher().store


def _on_disk(isolated):
    return DecisionCache(isolated).entries()


def test_nan_in_the_first_call_does_not_poison_the_decision(isolated):
    q, k, v = qkv()
    bad_q = q.clone()
    bad_q[0, 0, 0, 0] = float("nan")
    info = da.explain(bad_q, k, v)
    assert info.source == "tuned"
    assert info.candidates["torch"]["status"] in ("chosen", "accepted", "slower")
    assert not any("modified its input" in (c["reason"] or "") for c in info.candidates.values())
    (saved,) = _on_disk(isolated).values()
    assert not cache_mod.all_rejected(saved)
    out = da.attention_forward(q, k, v)  # a clean call: the saved decision serves it, no tuning
    assert rel(out, full_reference(q, k, v)) < 1e-5
    assert da.stats()["tunings"] == 1


def test_a_mask_with_nan_or_inf_in_the_first_call_is_tuned_once(isolated):
    """A float mask holding NaN or +inf (a ``0 * -inf`` in the caller's mask arithmetic) made every
    candidate's output non-finite: all were rejected, no decision was stored, and every later call
    of the same shapes tuned again (a tuning per call). The gate takes those entries as 0 (-inf
    still masks a key); the call's own output is SDPA's, NaN where SDPA's is."""
    q, k, v = qkv(b=1, hq=2, sq=16)
    mask = torch.zeros(16, 16)
    mask[3, 5], mask[4, 4], mask[5, :3] = float("nan"), float("inf"), float("-inf")
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    for _ in range(3):
        out = da.attention_forward(q, k, v, attn_mask=mask)
        assert torch.equal(out.isnan(), want.isnan()) and torch.allclose(out.nan_to_num(), want.nan_to_num(), atol=1e-5)
    assert da.stats()["tunings"] == 1
    (saved,) = _on_disk(isolated).values()
    assert not cache_mod.all_rejected(saved)


def test_mutation_check_treats_nan_as_equal():
    a = torch.tensor([1.0, float("nan"), 3.0])
    assert tuner._same(a, a.clone())
    assert not tuner._same(a, torch.tensor([1.0, float("nan"), 4.0]))
    assert not tuner._same(a, torch.tensor([1.0, 2.0, 3.0]))


def test_random_gate_inputs_keep_shape_dtype_and_strides():
    t = torch.randn(2, 8, 3, 4).permute(0, 2, 1, 3)
    r = trial.random_like(t)
    assert r.shape == t.shape and r.dtype == t.dtype and r.stride() == t.stride() and torch.isfinite(r).all()


def test_an_all_rejected_decision_is_used_once_and_never_saved(isolated, monkeypatch, caplog):
    real = tuner.relative_l1
    monkeypatch.setattr(tuner, "relative_l1", lambda a, b: 1.0)  # every candidate fails the gate
    q, k, v = qkv()
    out = da.attention_forward(q, k, v)
    assert rel(out, full_reference(q, k, v)) < 1e-5
    assert _on_disk(isolated) == {}
    da.attention_forward(q, k, v)
    assert da.stats()["tunings"] == 2  # used for that call only: the next one tunes again
    monkeypatch.setattr(tuner, "relative_l1", real)
    assert da.explain(q, k, v).source == "tuned"
    assert len(_on_disk(isolated)) == 1


def test_an_all_rejected_decision_on_disk_is_ignored(isolated):
    q, k, v = qkv()
    info = da.explain(q, k, v)
    decision = info.decision
    store.put(decision.replace(candidates={
        n: c if c.status == "unsupported" else dataclasses.replace(c, status="rejected", reason="error above tolerance")
        for n, c in decision.candidates.items()}))
    store.forget_memory()
    default_dispatcher().reset()
    assert da.explain(q, k, v).source == "tuned"
