"""Which backend a graph with symbolic lengths bakes for a bucket (dispatch/baked.py)."""
from diffsynth_attention.dispatch.buckets import BUCKET_SLACK, bucket_backend
from diffsynth_attention.store.decision import Candidate, Decision
from support.compile_helpers import requires_bake


def _decision(i, pick, times, modes=None, status=None):
    cands = {n: Candidate("chosen" if n == pick else (status or {}).get(n, "accepted"), t, 0.0, reps=3)
             for n, t in times.items()}
    return Decision(f"{i:024d}", {"seq_q": i}, pick, cands, modes=modes or {})


def test_one_pick_for_every_length_is_baked():
    ds = [_decision(i, "flash_attention_4", {"flash_attention_4": 1.0, "torch": 1.3}) for i in range(3)]
    assert bucket_backend(ds, "compiled") == "flash_attention_4"


def test_the_modes_own_picks_are_compared_not_the_eager_ones():
    """Eager picks differ (FlashAttention-3 / -4), the compiled picks agree (torch): torch."""
    ds = [_decision(0, "flash_attention_3", {"flash_attention_3": 1.0, "flash_attention_4": 1.01, "torch": 1.2},
                    modes={"compiled": "torch"}),
          _decision(1, "flash_attention_4", {"flash_attention_3": 1.01, "flash_attention_4": 1.0, "torch": 1.2},
                    modes={"compiled": "torch"})]
    assert bucket_backend(ds, "compiled") == "torch"
    assert bucket_backend(ds, "eager") == "flash_attention_3"  # 1% from each length's own: within the slack


def test_split_picks_take_the_backend_nearest_every_length_within_the_slack():
    ds = [_decision(0, "torch", {"torch": 1.0, "torch_flash": 1.02}),
          _decision(1, "torch_flash", {"torch": 1.01, "torch_flash": 1.0}),
          _decision(2, "torch_flash", {"torch": 1.03, "torch_flash": 1.0})]
    assert bucket_backend(ds, "eager") == "torch_flash"  # worst 1.02 against torch's 1.03
    far = ds + [_decision(3, "torch", {"torch": 1.0, "torch_flash": 1.0 + 2 * BUCKET_SLACK})]
    far[2] = _decision(2, "torch_flash", {"torch": 1.0 + 2 * BUCKET_SLACK, "torch_flash": 1.0})
    assert bucket_backend(far, "eager") is None  # each is 10% off some length's own pick: the run-time operator


def test_a_backend_that_failed_the_gate_for_one_length_is_never_baked():
    ds = [_decision(0, "torch", {"torch": 1.0, "sage_attention": 0.5}),
          _decision(1, "sage_attention", {"torch": 1.01, "sage_attention": 1.0}),
          _decision(2, "torch", {"torch": 1.0, "sage_attention": 0.5}, status={"sage_attention": "rejected"})]
    assert bucket_backend(ds, "eager") == "torch"


def test_this_torch_lets_a_trace_read_a_symbolic_size():
    """Bucket bakes need the traced value of a symbolic size: Dynamo evaluates
    guarding_hint_or_throw (torch 2.13) or size_hint (torch 2.11). Where neither is handled every
    symbolic graph keeps the run-time operator, silently: this test says so instead."""
    requires_bake()
    from diffsynth_attention.dispatch import baked

    assert baked._hint is not None
