"""The tuner's decisions: from comparable
measurements, ties, cost-model skips and the budget. Every fake spends *virtual* time (see
support/virtual.py): what these tests assert does not depend on the machine's speed or load."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffsynth_attention.backends import PREFERENCE, REGISTRY, DeviceInfo
from diffsynth_attention.problem import Problem
from diffsynth_attention.tuning import tuner
from diffsynth_attention.tuning.policy import DEFAULT_POLICY, TuningPolicy

from support.helpers import qkv
from support.virtual import VirtualClock, dispatcher, only, tune_virtual, virtual_policy

H200 = DeviceInfo("cuda", "NVIDIA H200", (9, 0), 132)


def tune_with(monkeypatch, budget=5.0, sq=32, policy=None, **fakes):
    q, k, v = qkv(sq=sq)
    info, made, _ = tune_virtual(monkeypatch, q, k, v, budget=budget, policy=policy, **fakes)
    return info, made


# -- every candidate within 1.5x is re-timed in the same interleaved rounds ----
def test_every_candidate_within_1_5x_of_the_first_pass_is_retimed_in_the_rounds(monkeypatch):
    info, made = tune_with(monkeypatch, torch={"cost": 1.0}, torch_flash={"cost": 1.2}, torch_efficient={"cost": 1.45},
                           torch_math={"cost": 1.6})
    c = info.candidates
    assert info.backend == "torch"
    for name in ("torch_flash", "torch_efficient"):
        assert c[name]["status"] == "accepted" and "interleaved rounds" in c[name]["reason"]
    assert c["torch_math"]["status"] == "slower" and "not re-timed" in c["torch_math"]["reason"]
    reps = {n: cand.reps for n, cand in info.decision.candidates.items()}
    assert reps["torch_flash"] > 1 + 2 * DEFAULT_POLICY.min_rounds
    assert reps["torch_math"] == 1 + 2 + 1  # the gate, two warm samples that agree, one second look


def test_the_decision_compares_only_numbers_from_the_rounds(monkeypatch):
    # A measured run: 'torch' fastest in the first pass, 80% slower once the rounds start.
    def torch_schedule(i):
        return 0.20 if i < 20 else 0.36

    info, made = tune_with(monkeypatch, torch={"schedule": torch_schedule}, torch_cudnn={"cost": 0.213},
                           torch_efficient={"cost": 0.227})
    c = info.decision.candidates
    assert info.backend == "torch_cudnn"
    assert c["torch"].time_ms == pytest.approx(0.36, rel=1e-6)  # its round median, not its first pass
    assert c["torch_efficient"].time_ms == pytest.approx(0.227, rel=1e-6)


def test_a_tie_goes_to_the_preference_order_and_the_reason_says_so(monkeypatch):
    info, _ = tune_with(monkeypatch, torch_flash={"cost": 1.00}, torch_efficient={"cost": 1.015})
    assert PREFERENCE.index("torch_flash") < PREFERENCE.index("torch_efficient")
    assert info.backend == "torch_flash"
    info, _ = tune_with(monkeypatch, sq=40, torch_flash={"cost": 1.015}, torch_efficient={"cost": 1.00})
    assert info.backend == "torch_flash"
    reason = info.candidates["torch_flash"]["reason"]
    assert reason.startswith("tie with torch_efficient (within 2.0% noise): preferred by order"), reason
    assert "torch_flash is preferred by order" in info.candidates["torch_efficient"]["reason"]


def test_on_hopper_flashattention_3_wins_its_ties_with_flashattention_4():
    """The tie order is the device's: on Hopper (9.x) FlashAttention-3, built for it, ranks ahead
    of the other kernel packages, behind PyTorch's own kernels and ahead of no 8-bit variant's
    exact peers; elsewhere the catalogue's order stands. A tie is decided by it, a clear gap is not."""
    from diffsynth_attention.backends import preference_on
    from diffsynth_attention.tuning.confirm import choose

    hopper = preference_on((9, 0))
    assert hopper.index("flash_attention_3") < hopper.index("flash_attention_4")
    assert hopper[:4] == PREFERENCE[:4] and set(hopper) == set(PREFERENCE)
    assert hopper.index("flash_attention_3_fp8") > hopper.index("flash_attention_4")  # a tie goes to the exact kernel
    assert preference_on((10, 0)) == PREFERENCE == preference_on(None)
    assert PREFERENCE.index("flash_attention_4") < PREFERENCE.index("flash_attention_3")
    medians, noise = {"flash_attention_4": 9.60, "flash_attention_3": 9.66, "torch": 12.0}, {}
    assert choose(medians, noise)[0] == "flash_attention_4"
    assert choose(medians, noise, order=hopper)[0] == "flash_attention_3"
    medians["flash_attention_3"] = 9.60 * 1.05  # beyond the tie cap: the faster one, whatever the order
    assert choose(medians, noise, order=hopper)[0] == "flash_attention_4"


def test_the_tuner_breaks_ties_in_its_device_order(monkeypatch):
    from diffsynth_attention.tuning.trial import Trial

    fakes = {"flash_attention_4": {"cost": 1.00}, "flash_attention_3": {"cost": 1.01}}
    info, _ = tune_with(monkeypatch, **fakes)
    assert info.backend == "flash_attention_4"  # the catalogue's order
    hopper = tuple(n for n in PREFERENCE if n != "flash_attention_3")
    hopper = hopper[:hopper.index("flash_attention_4")] + ("flash_attention_3",) + hopper[hopper.index("flash_attention_4"):]
    monkeypatch.setattr(Trial, "order", property(lambda self: hopper))
    info, _ = tune_with(monkeypatch, sq=40, **fakes)
    assert info.backend == "flash_attention_3"
    assert "preferred by order" in info.candidates["flash_attention_3"]["reason"]


def test_a_trials_order_is_its_keys_device_s():
    """Trial.order follows the DeviceInfo the key and the cost models were built from (a fake H200
    here, on CPU tensors), not only the tensors' device."""
    from types import SimpleNamespace

    from diffsynth_attention.backends import preference_on
    from diffsynth_attention.tuning.trial import Trial

    order = Trial.order.func
    assert order(SimpleNamespace(dev=H200, device=torch.device("cpu"))) == preference_on((9, 0)) != PREFERENCE
    assert order(SimpleNamespace(dev=None, device=torch.device("cpu"))) == PREFERENCE


def test_no_tie_beyond_the_noise_floor(monkeypatch):
    info, _ = tune_with(monkeypatch, torch_flash={"cost": 1.05}, torch_efficient={"cost": 1.00})
    assert info.backend == "torch_efficient"
    assert info.candidates["torch_efficient"]["reason"] is None


def test_the_tie_threshold_follows_the_measured_noise_between_floor_and_cap():
    p = DEFAULT_POLICY
    assert p.tie_threshold(None, None) == p.tie_floor == 0.02
    assert p.tie_threshold(0.025, 0.001) == pytest.approx(0.025)
    assert p.tie_threshold(0.5, None) == p.tie_cap == 0.025
    assert tuner.relative_spread([1.0, 1.0, 1.0]) is None
    assert tuner.relative_spread([1.0, 1.1, 1.0, 0.9, 1.0]) == pytest.approx(0.0)
    assert tuner.relative_spread([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx(2.0 / 3.0)


# -- noisy fakes never make a decision prefer one >3% slower -------------------
ratios = st.floats(min_value=1.0, max_value=1.12)


@settings(max_examples=40, deadline=None)
@given(base=st.floats(min_value=0.05, max_value=2.0), ra=ratios, rb=ratios, noise=st.sampled_from([0.0, 0.02, 0.1, 0.3]),
       seed=st.integers(0, 10_000))
def test_noisy_timings_never_prefer_a_candidate_3pct_slower_than_another(base, ra, rb, noise, seed):
    # The preferred backends are the slower ones, by 0-12%: only the tie rule can pick them.
    with pytest.MonkeyPatch.context() as mp:
        clock = VirtualClock()
        only(mp, clock, torch={"cost": base * ra * rb, "noise": noise, "seed": seed},
             torch_flash={"cost": base * rb, "noise": noise, "seed": seed}, torch_math={"cost": base, "noise": noise, "seed": seed})
        q, k, v = qkv(sq=16)
        decision = dispatcher(virtual_policy(clock, budget=1.0)).explain(q, k, v).decision
    chosen = decision.candidates[decision.backend]
    compared = [cand for cand in decision.candidates.values() if cand.status == "accepted"]
    if noise <= 0.1:  # first passes within 1.5x of each other: all of them in the rounds (not a vacuous check)
        assert len(compared) == 2, decision.candidates
    for other in compared:  # accepted = re-timed in the same rounds as the chosen one
        if decision.backend == "torch" and "not confirmed" in (decision.confirmation or ""):
            continue  # the default kept: the winner of the rounds did not beat it in the paired re-time
        assert chosen.time_ms <= 1.03 * other.time_ms + 1e-12, (decision.backend, chosen, other)


# -- skip what cannot fit or cannot win -----------------------------------------
def test_memory_skip_is_recorded_with_its_prediction_and_never_run(monkeypatch):
    info, made = tune_with(monkeypatch, torch={"cost": 1.0}, torch_math={"cost": 0.5, "predicted_bytes": 1 << 62})
    c = info.candidates["torch_math"]
    assert c["status"] == "skipped" and "predicted to allocate" in c["reason"] and "GiB" in c["reason"]
    assert made["torch_math"].calls == 0 and info.backend == "torch"


def test_time_skip_beyond_the_factor_of_the_best_prediction(monkeypatch):
    info, made = tune_with(monkeypatch, torch={"cost": 1.0, "predicted_ms": 1.0}, torch_flash={"cost": 1.0, "predicted_ms": 3.9},
                           torch_math={"cost": 0.1, "predicted_ms": 4.1})
    c = info.decision.candidates
    assert c["torch_math"].status == "skipped" and c["torch_math"].predicted_ms == 4.1
    assert "predicted 4.1 ms, more than 4x the best prediction (1 ms, torch)" in c["torch_math"].reason
    assert made["torch_math"].calls == 0
    assert c["torch_flash"].status in ("accepted", "chosen") and made["torch_flash"].calls > 0


def test_a_skip_does_not_hold_when_the_best_prediction_fails_the_gate(monkeypatch):
    info, made = tune_with(monkeypatch, torch={"cost": 1.0, "predicted_ms": 1.0, "inaccurate": True},
                           torch_math={"cost": 2.0, "predicted_ms": 10.0})
    assert info.candidates["torch"]["status"] == "rejected"
    assert made["torch_math"].calls > 0 and info.backend == "torch_math"


def test_no_skips_when_early_skip_is_off(monkeypatch):
    info, made = tune_with(monkeypatch, policy=TuningPolicy(budget_s=5.0, early_skip=False), torch={"cost": 1.0, "predicted_ms": 1.0},
                           torch_math={"cost": 0.5, "predicted_ms": 9.0, "predicted_bytes": 1 << 62})
    assert made["torch_math"].calls > 0 and info.backend == "torch_math"


# The H200 table of shared/gpu/README.md: (b, heads, s_q, s_kv, d) -> measured ms per backend.
H200_TABLE = [
    ((32, 8, 128, 128, 64), {"torch_cudnn": 0.027, "torch_flash": 0.056, "torch_efficient": 0.071, "flash_attention_4": 0.119}),
    ((2, 10, 4096, 77, 64), {"torch_cudnn": 0.044, "torch_flash": 0.113, "torch_efficient": 0.076, "flash_attention_4": 0.110}),
    ((1, 24, 4608, 4608, 128), {"torch_cudnn": 0.428, "torch_flash": 0.822, "torch_efficient": 1.600, "flash_attention_4": 0.477}),
    ((1, 24, 16896, 16896, 128), {"torch_cudnn": 5.63, "torch_flash": 9.97, "torch_efficient": 19.6, "flash_attention_4": 5.24}),
    ((1, 12, 32760, 32760, 128), {"torch_cudnn": 11.7, "torch_flash": 19.1, "torch_efficient": 36.9, "flash_attention_4": 9.86}),
]


def _problem(b, n, sq, skv, d, dtype=torch.bfloat16):
    return Problem(batch=b, heads_q=n, heads_kv=n, seq_q=sq, seq_kv=skv, head_dim=d, head_dim_v=d, dtype=dtype,
                   device_type="cuda")


@pytest.mark.parametrize("shape,measured", H200_TABLE)
def test_cost_models_never_skip_the_measured_winner_on_the_h200_table(shape, measured):
    p = _problem(*shape)
    names = list(measured) + ["torch", "torch_math", "flash_attention_3", "sage_attention"]
    preds = {n: REGISTRY[n].predicted_ms(p, H200) for n in names}
    best_pred = min(preds.values())
    winner = min(measured, key=measured.get)
    assert preds[winner] <= DEFAULT_POLICY.skip_factor * best_pred
    for name, ms in measured.items():  # generous: anything within 2x of the winner is never skipped
        if ms <= 2 * measured[winner]:
            assert preds[name] <= DEFAULT_POLICY.skip_factor * best_pred, (name, preds)


def test_torch_math_memory_model_matches_the_851_gib_allocation():
    wan14b = _problem(1, 40, 75600, 75600, 128)
    need = REGISTRY["torch_math"].predicted_bytes(wan14b)
    one_scores = 40 * 75600 * 75600 * 4
    assert one_scores / 2**30 == pytest.approx(851, rel=0.01)
    assert need >= 2 * one_scores
    assert REGISTRY["flash_attention_4"].predicted_bytes(wan14b) < 2**30
    memory, _ = tuner.plan_skips([REGISTRY["torch_math"], REGISTRY["torch"]], wan14b, H200, 139 * 2**30)
    assert set(memory) == {"torch_math"} and "more than the 139 GiB free" in memory["torch_math"]


# -- an honest budget --------------------------------------------------------------
@pytest.mark.parametrize("costs", [(1.0, 1.1, 1.2), (40.0, 45.0, 50.0), (300.0, 310.0, 330.0), (5.0, 5.0, 7.4)])
def test_tuning_time_excluding_compilation_stays_within_the_documented_rule(monkeypatch, costs):
    info, _ = tune_with(monkeypatch, budget=0.2, torch={"cost": costs[0], "noise": 0.1},
                        torch_flash={"cost": costs[1], "noise": 0.1}, torch_math={"cost": costs[2], "noise": 0.1})
    d = info.decision
    fastest_ms = 0.9 * min(costs)  # a lower bound of every time measured (noise is +-10%)
    limit = max(0.2, 15 * fastest_ms / 1e3)
    assert d.tuning_seconds - d.compile_seconds <= limit + 1e-9, (d.tuning_seconds, d.compile_seconds, limit)
    assert d.compile_seconds > 0


def test_the_budget_floor_reads_the_environment_unless_the_policy_sets_one(monkeypatch):
    assert DEFAULT_POLICY.limit(1.5, 10.0) == 1.5
    assert DEFAULT_POLICY.limit(1.5, 200.0) == pytest.approx(3.0)
    monkeypatch.setenv("DIFFSYNTH_ATTENTION_TUNING_BUDGET", "0.7")
    assert DEFAULT_POLICY.budget_floor() == 0.7
    assert TuningPolicy(budget_s=2.0).budget_floor() == 2.0


def test_a_host_bound_candidate_loses_its_ties():
    """A candidate whose host time per call is near its device time runs eagerly at the host's
    speed, which changes between processes: on an H100, FlashAttention-3 (host ~ device on a
    grouped-query causal call) tied -4 in the rounds, took the tie by order, and ran 1.15-1.3x
    slower than -4 in another process. A tie now goes to the device-bound one; a clear lead still wins."""
    from types import SimpleNamespace

    from diffsynth_attention.backends import preference_on
    from diffsynth_attention.tuning.trial import Run

    def run(name, eager, host, device):
        return Run(backend=SimpleNamespace(name=name), cand=SimpleNamespace(time_ms=None, reason=None), call=None,
                   rounds=[eager] * 5, host=[host] * 5, device=[device] * 5)
    hopper = preference_on((9, 0))
    runs = {"flash_attention_3": run("flash_attention_3", 0.0554, 0.055, 0.0526),
            "flash_attention_4": run("flash_attention_4", 0.0565, 0.034, 0.055)}
    trial = SimpleNamespace(runs=runs, policy=DEFAULT_POLICY, order=hopper)
    winner, note = tuner.choose_winner(trial, list(runs), list(runs))
    assert winner == "flash_attention_4" and "preferred not host-bound" in note, note
    assert "flash_attention_3 is host-bound" in runs["flash_attention_3"].cand.reason
    runs["flash_attention_4"] = run("flash_attention_4", 0.0565, 0.050, 0.055)  # both host-bound: the order decides
    assert tuner.choose_winner(trial, list(runs), list(runs))[0] == "flash_attention_3"
    runs["flash_attention_3"] = run("flash_attention_3", 0.0554, 0.015, 0.0526)  # neither: the order decides
    assert tuner.choose_winner(trial, list(runs), list(runs))[0] == "flash_attention_3"
    runs["flash_attention_4"] = run("flash_attention_4", 0.0565, 0.034, 0.055)
    runs["flash_attention_3"] = run("flash_attention_3", 0.0500, 0.055, 0.0526)  # host-bound, but 13% ahead: no tie
    assert tuner.choose_winner(trial, list(runs), list(runs))[0] == "flash_attention_3"
