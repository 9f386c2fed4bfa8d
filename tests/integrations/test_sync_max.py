"""sync_decisions(reduce="max"): candidate times reduced with MAX over ranks."""
import pytest

from diffsynth_attention.integrations.distributed import merge_rank_entries, merge_rank_entries_max
from diffsynth_attention.store.decision import Decision


def entry(backend, times, statuses=None):
    statuses = statuses or {}
    cands = {n: {"status": statuses.get(n, "chosen" if n == backend else "accepted"), "time_ms": t, "error": 0.001,
                 "reason": None, "first_call_ms": t, "reps": 5} for n, t in times.items()}
    return {"key": {"problem": {}, "device": {}, "versions": {}}, "backend": backend, "candidates": cands,
            "tolerance": 0.005, "created": "2026-11-30T00:00:00+00:00", "tuning_seconds": 0.1, "compile_seconds": 0.0}


def test_max_picks_the_fastest_by_the_slowest_rank():
    # rank 0 timed cudnn fastest, rank 1 saw cudnn slow (noise, or a slower GPU): by MAX, flash wins
    r0 = {"k": entry("torch_cudnn", {"torch_cudnn": 1.00, "torch_flash": 1.05})}
    r1 = {"k": entry("torch_cudnn", {"torch_cudnn": 1.20, "torch_flash": 1.06})}
    merged = merge_rank_entries_max([r0, r1])
    e = merged["k"]
    assert e["backend"] == "torch_flash"
    assert e["candidates"]["torch_flash"]["status"] == "chosen"
    assert e["candidates"]["torch_cudnn"] == {**r0["k"]["candidates"]["torch_cudnn"], "status": "accepted", "time_ms": 1.20}
    assert merged == merge_rank_entries_max([r0, r1])  # every rank computes the same result
    Decision.from_dict("k", e)  # still a decision
    assert merge_rank_entries([r0, r1])["k"]["backend"] == "torch_cudnn"  # rank 0's, by default


def test_a_candidate_rejected_on_one_rank_is_not_chosen():
    r0 = {"k": entry("torch_flash", {"torch_flash": 1.0, "torch": 2.0})}
    r1 = {"k": entry("torch", {"torch_flash": 0.5, "torch": 2.0}, statuses={"torch_flash": "rejected"})}
    assert merge_rank_entries_max([r0, r1])["k"]["backend"] == "torch"


def test_equal_times_go_to_the_keys_device_order():
    """A tie of the reduced times goes to the tie order of the device the key names: on Hopper
    (9.0) FlashAttention-3 ahead of -4, elsewhere the catalogue's order."""
    times = {"flash_attention_4": 1.0, "flash_attention_3": 1.0, "torch": 2.0}
    for capability, want in (("9.0", "flash_attention_3"), ("10.0", "flash_attention_4"), (None, "flash_attention_4")):
        r0, r1 = {"k": entry("torch", times)}, {"k": entry("torch", times)}
        for r in (r0, r1):
            r["k"]["key"]["device"] = {"type": "cuda", "name": "GPU"} if capability is None else \
                {"type": "cuda", "name": "GPU", "capability": capability, "sm_count": 132}
        assert merge_rank_entries_max([r0, r1])["k"]["backend"] == want, capability


def test_keys_known_by_one_rank_keep_its_decision():
    r0 = {"a": entry("torch", {"torch": 1.0})}
    r1 = {"b": entry("torch_math", {"torch_math": 3.0})}
    merged = merge_rank_entries_max([r0, r1])
    assert merged["a"] == r0["a"] and merged["b"] == r1["b"]


def test_bad_reduce_is_named():
    from diffsynth_attention import sync_decisions

    with pytest.raises(ValueError, match="reduce='mean'"):
        sync_decisions(reduce="mean")
