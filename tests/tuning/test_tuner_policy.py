"""The tuner's policy: decisions that are right and repeatable. No candidate excluded on a cold sample,
warm-up before timing, a second look, >= 3 samples per long call, a tolerance per dtype, and
the tuner's rules as an injected policy with a listener. Fakes spend virtual time (support/virtual.py)
with realistic warm-up: compilation, then a few slow calls."""
import threading

import pytest
import torch

import diffsynth_attention as da
from diffsynth_attention.tuning import reference
from diffsynth_attention.tuning.policy import DEFAULT_POLICY, DEFAULT_TOLERANCES, TF32_TOLERANCE, TuningPolicy

from support.helpers import qkv
from support.virtual import Heard, VirtualClock, dispatcher, only, tune_virtual, virtual_policy


def tune(monkeypatch, budget=1.5, sq=41, d=16, dtype=torch.float32, policy=None, **fakes):
    q, k, v = (t.to(dtype) for t in qkv(b=1, hq=3, hk=3, sq=sq, skv=sq, d=d))
    return tune_virtual(monkeypatch, q, k, v, budget=budget, policy=policy, **fakes)


# -- nothing excluded on a cold sample -------------------------------------------------------------
def test_a_backend_whose_first_three_calls_are_slow_still_wins(monkeypatch):
    # A measured CPU case: torch 6.7 ms and torch_flash 15.6 ms on their first calls, 0.19 ms warm.
    info, made, heard = tune(monkeypatch, torch_flash={"cost": 0.10, "warmup": (15.6, 6.7, 3.0)},
                             torch={"cost": 0.12, "warmup": (6.7, 2.0, 0.9)}, torch_math={"cost": 0.20})
    assert info.backend == "torch_flash", info.candidates
    c = info.decision.candidates
    assert c["torch_flash"].first_call_ms == pytest.approx(15.6)  # the gate's call: a compile measure ...
    assert c["torch"].status == "accepted" and "interleaved rounds" in c["torch"].reason  # ... never an exclusion
    (_, _, timings, hit), = heard.events
    warm = timings["torch_flash"]["warm"]
    assert warm[:2] == pytest.approx([6.7, 3.0]) and DEFAULT_POLICY.agree(warm[-2], warm[-1])
    assert len(timings["torch_flash"]["rounds"]) >= DEFAULT_POLICY.min_rounds and hit is False


def test_a_first_call_longer_than_the_budget_does_not_keep_a_candidate_from_being_timed(monkeypatch):
    # A measured H200 case: FlashAttention-4's 1,708 ms compilation against a 1.5 s budget.
    info, made, _ = tune(monkeypatch, budget=1.5, torch_cudnn={"cost": 0.2041},
                         flash_attention_4={"cost": 0.1808, "warmup": (1708.0, 40.0)})
    assert info.backend == "flash_attention_4", info.candidates
    d = info.decision
    assert d.compile_seconds >= 1.748 and d.tuning_seconds - d.compile_seconds <= 1.5


def test_a_slow_kernel_package_import_does_not_use_up_the_budget(monkeypatch):
    # The H200 case behind hd80_sd15_1024: importing flash_attn.cute took ~7 s of a 1.5 s budget, so
    # torch and torch_cudnn left the rounds ("no room for 3 rounds") and a warm probe decided.
    info, made, heard = tune(monkeypatch, budget=1.5, torch={"cost": 0.200}, torch_cudnn={"cost": 0.201},
                             flash_attention_4={"cost": 0.205, "import_ms": 7000.0, "warmup": (2479.0,)})
    timings = heard.events[0][2]
    for name in ("torch", "torch_cudnn", "flash_attention_4"):
        assert len(timings[name]["rounds"]) >= DEFAULT_POLICY.min_rounds, (name, info.candidates[name])
    assert info.backend == "torch", info.candidates
    d = info.decision
    assert d.compile_seconds >= 9.479 and d.tuning_seconds - d.compile_seconds <= 1.5


def test_warm_up_stops_at_the_cap_when_samples_never_agree(monkeypatch):
    swing = {"schedule": lambda i: 1.0 if i % 2 else 2.0}  # every sample differs from the last by 2x
    policy = virtual_policy(VirtualClock(), warm_cap=4)
    info, made, heard = tune(monkeypatch, policy=policy, torch=swing)
    timings = heard.events[0][2]["torch"]
    assert len(timings["warm"]) == 4 and info.backend == "torch"


def test_warm_up_is_setup_outside_the_budget(monkeypatch):
    info, made, _ = tune(monkeypatch, budget=0.05, torch={"cost": 0.5, "warmup": (100.0, 50.0, 20.0, 5.0)},
                         torch_math={"cost": 0.55})
    d = info.decision
    assert d.compile_seconds >= 0.175 and d.tuning_seconds - d.compile_seconds <= 0.05
    assert info.candidates["torch_math"]["status"] == "accepted"  # both compared in the rounds


# -- a second look -------------------------------------------------------------------------------
def test_a_candidate_excluded_by_its_warm_probe_joins_the_rounds_on_its_prediction(monkeypatch):
    # Steady at 2.0 ms while warming up (its clocks ramping, say), then 0.9 ms: the prediction says look again.
    info, made, heard = tune(monkeypatch, torch={"cost": 1.0, "predicted_ms": 1.0},
                             torch_math={"schedule": lambda i: 2.0 if i < 4 else 0.9, "predicted_ms": 1.2})
    assert len(heard.events[0][2]["torch_math"]["rounds"]) >= 3
    assert info.backend == "torch_math" and info.candidates["torch"]["status"] == "accepted"


def test_a_candidate_excluded_by_its_warm_probe_joins_the_rounds_on_a_second_probe(monkeypatch):
    info, made, heard = tune(monkeypatch, torch={"cost": 1.0}, torch_math={"schedule": lambda i: 2.0 if i < 3 else 0.9})
    t = heard.events[0][2]["torch_math"]
    assert t["warm"] == pytest.approx([2.0, 2.0]) and t["second_look"] == pytest.approx([0.9])
    assert info.backend == "torch_math"


def test_a_candidate_slow_on_both_looks_is_slower_with_both_probes_in_its_reason(monkeypatch):
    info, made, heard = tune(monkeypatch, torch={"cost": 1.0, "predicted_ms": 1.0}, torch_math={"cost": 1.8, "predicted_ms": 3.0})
    c = info.candidates["torch_math"]
    assert c["status"] == "slower" and heard.events[0][2]["torch_math"]["rounds"] == []
    assert "warm probe 1.8 ms, second look 1.8 ms is more than 1.5x the best (1 ms)" in c["reason"]
    assert "not re-timed" in c["reason"]


def test_a_second_look_needs_room_in_the_budget_and_the_reason_says_when_there_was_none(monkeypatch):
    policy = virtual_policy(VirtualClock(), budget=0.0, budget_winner_factor=1.0)  # 0.1 s: no room for a 300 ms look
    info, made, heard = tune(monkeypatch, policy=policy, torch={"cost": 100.0}, torch_math={"cost": 300.0})
    c = info.candidates["torch_math"]
    assert c["status"] == "slower" and "no room in the budget for a second look" in c["reason"]
    assert heard.events[0][2]["torch_math"]["second_look"] == [] and made["torch_math"].calls == 3


# -- long calls ------------------------------------------------------------------------------------
def test_long_calls_compare_at_least_three_samples_and_one_outlier_cannot_decide(monkeypatch):
    spike = {"schedule": lambda i: 500.0 if i == 4 else 50.0}  # call 4 is its first round sample
    # budget 1 s: 3 rounds of both (0.31 s), the confirmation's reserve (3 paired rounds, 0.31 s) and a second look fit
    info, made, heard = tune(monkeypatch, budget=1.0, torch=spike, torch_flash={"cost": 52.0}, torch_math={"cost": 130.0})
    timings = heard.events[0][2]
    for name in ("torch", "torch_flash"):
        assert len(timings[name]["rounds"]) >= 3, timings[name]
    assert 500.0 in timings["torch"]["rounds"]
    assert info.backend == "torch" and info.decision.candidates["torch"].time_ms == pytest.approx(50.0)
    assert info.candidates["torch_math"]["status"] == "slower"


def test_when_three_rounds_do_not_fit_the_slowest_leaves_the_rounds(monkeypatch):
    info, made, heard = tune(monkeypatch, budget=2.2, torch={"cost": 100.0}, torch_flash={"cost": 110.0},
                             torch_efficient={"cost": 120.0}, torch_math={"cost": 140.0})
    # the rounds aim at 0.9 x 2.2 s = 1.98 s, leaving the confirmation its reserve (3 paired rounds of torch and the
    # slowest other): all four, 1.41 s + 0.72 s, do not fit; three, 0.99 s + 0.66 s, do
    c = info.candidates
    assert c["torch_math"]["status"] == "slower" and "no room for 3 rounds" in c["torch_math"]["reason"]
    assert all(len(heard.events[0][2][n]["rounds"]) >= 3 for n in ("torch", "torch_flash", "torch_efficient"))
    d = info.decision
    assert d.tuning_seconds - d.compile_seconds <= 2.2


def test_the_rounds_stop_sooner_when_the_machine_slows_down_mid_way(monkeypatch):
    # 40x slower from its fourth round on (another process took the device): the budget still holds.
    info, made, heard = tune(monkeypatch, budget=0.2, torch={"schedule": lambda i: 1.0 if i < 13 else 40.0},
                             torch_flash={"cost": 1.05})
    d = info.decision
    assert len(heard.events[0][2]["torch"]["rounds"]) >= 4
    assert d.tuning_seconds - d.compile_seconds <= 0.2



def test_gpu_rounds_count_both_bursts_of_a_sample_against_the_budget(monkeypatch):
    """A GPU round sample is two bursts (the eager one, then the GPU held for 1.5x its host time and
    the burst again for the device time); the rounds priced one burst, as on a CPU, and the
    confirmation's reserve two: on host-bound 100 ms calls (host 0.9 of the time), a 2.2 s budget
    was spent 1.8 times over. Each sample is now priced as the GPU timer takes it."""
    from diffsynth_attention.tuning import tuner
    from support.virtual import gpu_timer

    monkeypatch.setattr(tuner, "Timer", gpu_timer(host_share=0.9))
    info, made, heard = tune(monkeypatch, budget=2.2, torch={"cost": 100.0}, torch_flash={"cost": 90.0},
                             torch_efficient={"cost": 120.0}, torch_math={"cost": 140.0})
    d = info.decision
    assert d.candidates["torch_flash"].status == "chosen" and "confirmed" in d.confirmation, d.confirmation
    assert d.tuning_seconds - d.compile_seconds <= 2.2, (d.tuning_seconds - d.compile_seconds, info.candidates)

# -- a tolerance per dtype -------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,status", [(torch.float32, "rejected"), (torch.bfloat16, "chosen")])
def test_an_error_a_bf16_kernel_may_have_is_rejected_on_an_fp32_problem(monkeypatch, dtype, status):
    info, _, _ = tune(monkeypatch, dtype=dtype, torch={"cost": 1.0, "inaccurate": 1e-3}, torch_math={"cost": 3.0})
    c = info.candidates["torch"]
    assert c["status"] == status, c
    assert info.decision.tolerance == DEFAULT_TOLERANCES[str(dtype)[6:]]
    if status == "rejected":
        assert "above tolerance 0.0001" in c["reason"]


@pytest.fixture
def matmul_precision():
    """Restores the process's fp32 matmul precision (TF32 on or off) after the test."""
    before = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(before)


def test_the_tolerance_table_and_its_overrides(monkeypatch, matmul_precision):
    p = TuningPolicy()
    assert p.tolerance("float32") < p.tolerance("float16") < p.tolerance("bfloat16") == 5e-3
    assert p.tolerance("float32", "cuda") == DEFAULT_TOLERANCES["float32"]
    torch.set_float32_matmul_precision("high")  # TF32 allowed
    assert p.tolerance("float32", "cuda") == TF32_TOLERANCE and p.tolerance("float32", "cpu") == 1e-4
    monkeypatch.setenv("DIFFSYNTH_ATTENTION_TOLERANCE", "0.02")  # one value, every dtype
    assert {p.tolerance(d) for d in DEFAULT_TOLERANCES} == {0.02}
    assert TuningPolicy(tolerances={"float32": 0.3}).tolerance("float32") == 0.3  # a policy's own table wins


def test_the_reference_is_exact_whatever_fp32_matmul_precision_the_process_allows(matmul_precision):
    q, k, v = qkv(sq=8)
    exact = torch.softmax(q[0, :1].double() @ k[0, :1].double().transpose(-1, -2) / 4.0, -1) @ v[0, :1].double()
    for precision in ("highest", "high", "medium"):
        torch.set_float32_matmul_precision(precision)
        ref = reference.reference_slice(q, k, v, None, None, False, None, [0])
        assert float((ref.double() - exact).abs().max()) < 1e-6, precision
        assert torch.get_float32_matmul_precision() == precision


def test_fp32_matmuls_in_another_thread_keep_their_precision_while_a_key_tunes(monkeypatch, matmul_precision):
    """Before: the reference set the process-wide fp32 matmul precision to "highest" while it ran,
    and every other thread's matmuls saw it."""
    torch.set_float32_matmul_precision("high")
    inside, release = threading.Event(), threading.Event()
    real = reference._fill

    def fill(*args):  # the reference is under way: let this test's thread look
        inside.set()
        release.wait(60)
        return real(*args)

    monkeypatch.setattr(reference, "_fill", fill)
    q, k, v = qkv(sq=16)
    tuner = threading.Thread(target=lambda: da.explain(q, k, v))
    tuner.start()
    try:
        assert inside.wait(60)
        seen = torch.get_float32_matmul_precision()
    finally:
        release.set()
        tuner.join(60)
    assert seen == "high"
    assert da.stats()["tunings"] == 1


# -- the policy, the clock and the listener --------------------------------------------------------
def test_a_listener_hears_every_candidate_on_tuning_and_the_hit_on_a_known_decision(monkeypatch):
    clock = VirtualClock()
    only(monkeypatch, clock, torch={"cost": 1.0}, torch_math={"cost": 1.1}, torch_flash={"cost": 9.0, "inaccurate": True})
    heard = Heard()
    disp = dispatcher(virtual_policy(clock, listeners=(heard,)))
    q, k, v = qkv(sq=16)
    info = disp.explain(q, k, v)
    (key_id, decision, timings, hit), = heard.events
    assert hit is False and key_id == info.key_id and decision is info.decision
    assert set(timings) == set(decision.candidates)  # every candidate, the unsupported ones too
    assert timings["torch_flash"]["status"] == "rejected" and timings["torch_flash"]["warm"] == []
    assert timings["torch"]["first_call_ms"] == pytest.approx(1.0) and len(timings["torch"]["rounds"]) >= 3
    other = type(disp)(disp.store, policy=disp.policy)  # another dispatcher over the same cache: a hit
    other.explain(q, k, v)
    assert [e[3] for e in heard.events] == [False, True] and heard.events[1][1].backend == info.backend
    assert heard.events[1][2]["torch"]["time_ms"] == decision.candidates["torch"].time_ms


def test_a_failing_listener_never_breaks_the_call(monkeypatch, caplog):
    def broken(*args):
        raise RuntimeError("listener bug")

    q, k, v = qkv(sq=16)
    clock = VirtualClock()
    only(monkeypatch, clock, torch={"cost": 1.0})
    info = dispatcher(virtual_policy(clock, listeners=(broken,))).explain(q, k, v)
    assert info.backend == "torch" and "tuning listener" in caplog.text


def test_the_clock_is_the_policys(monkeypatch):
    # Every time in the decision is virtual: a real clock would give microseconds, not these.
    info, made, _ = tune(monkeypatch, torch={"cost": 7.0}, torch_math={"cost": 7.3})
    d = info.decision
    assert d.candidates["torch"].first_call_ms == pytest.approx(7.0)
    assert d.candidates["torch"].time_ms == pytest.approx(7.0) and d.candidates["torch_math"].time_ms == pytest.approx(7.3)
    spent = sum(sum(f.costs) for f in made.values()) / 1e3
    assert d.tuning_seconds == pytest.approx(spent, rel=1e-6)


@pytest.mark.parametrize("field,value", [("retime", 0.5), ("warm_cap", 1), ("tie_cap", -1.0), ("budget_s", float("nan")),
                                         ("min_rounds", 0), ("tolerances", {"float32": 0.0}), ("listeners", (1,)),
                                         ("confirm_max", 5), ("confirm_alpha", 0.0), ("confirm_alpha", 0.5)])
def test_a_bad_policy_names_the_field(field, value):
    with pytest.raises((ValueError, TypeError), match=field):
        TuningPolicy(**{field: value})


def test_the_docs_tolerance_table_is_the_policys():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "tuning.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| ([0-9.e-]+) \|", text, re.M))
    assert {d: float(t) for d, t in rows.items()} == dict(DEFAULT_TOLERANCES)
    tf32 = re.search(r"TF32 allowed[^|]*\| ([0-9.e-]+) \|", text)
    assert tf32 and float(tf32.group(1)) == TF32_TOLERANCE


# -- on a GPU: the table passes every exact kernel (run by the lead on the GPU machine) -----------------------
GPU_SHAPES = [dict(b=2, hq=8, hk=8, s=1024, d=128, causal=False), dict(b=1, hq=8, hk=2, s=512, d=64, causal=True),
              dict(b=2, hq=4, hk=4, s=4097, d=96, causal=False), dict(b=2, hq=8, hk=8, s=256, d=40, causal=False)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_every_exact_kernel_passes_the_tolerance_of_its_dtype(dtype):
    from diffsynth_attention.backends import REGISTRY, device_info
    from diffsynth_attention.problem import prepare

    tolerance = DEFAULT_POLICY.tolerance(str(dtype)[6:], "cuda")
    errors, failed = {}, []
    for spec in GPU_SHAPES:
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(spec["b"], spec["hq"], spec["s"], spec["d"], device="cuda", dtype=dtype, generator=g)
        k, v = (torch.randn(spec["b"], spec["hk"], spec["s"], spec["d"], device="cuda", dtype=dtype, generator=g) for _ in "kv")
        call = prepare(q, k, v, "b n s d", "b n s d", "b n s d", "b n s d", None, None, None, spec["causal"], None, False)
        qc, kc, vc = call.canonical
        heads = [0, spec["hq"] - 1]
        ref = reference.reference_slice(qc, kc, vc, None, None, spec["causal"], None, heads)
        for name, backend in REGISTRY.items():
            if name == "sage_attention" or not backend.exact or backend.unavailable_reason() or backend.not_supported_reasons(
                    call.problem, device_info(q.device)):
                continue  # the 8-bit and FP8 kernels are meant to fail; the exact ones must pass
            with torch.no_grad():
                out = backend.forward(qc, kc, vc, None, None, spec["causal"], None, False)
            err = reference.relative_l1(out[0, heads], ref)
            errors[(name, spec["s"], spec["d"])] = err
            if not err <= tolerance:
                failed.append((name, spec, err))
    print({k: f"{e:.2e}" for k, e in errors.items()})
    assert errors and not failed, (tolerance, failed)


def test_when_every_candidate_in_the_rounds_raises_the_fastest_one_left_is_chosen(monkeypatch):
    from diffsynth_attention.backends import REGISTRY

    clock = VirtualClock()
    made = only(monkeypatch, clock, torch={"cost": 1.0}, torch_flash={"cost": 1.1}, torch_math={"cost": 3.0})
    for name in ("torch", "torch_flash"):  # fail from their first round sample on
        fake = made[name]
        real = fake.forward

        def forward(*a, fake=fake, real=real):
            if fake.calls >= 4:
                raise RuntimeError("device lost")
            return real(*a)
        monkeypatch.setattr(fake, "forward", forward)
        monkeypatch.setitem(REGISTRY, name, fake)
    q, k, v = qkv(sq=16)
    info = dispatcher(virtual_policy(clock)).explain(q, k, v)
    c = info.candidates
    assert c["torch"]["status"] == c["torch_flash"]["status"] == "rejected" and "interleaved rounds" in c["torch"]["reason"]
    assert info.backend == "torch_math" and c["torch_math"]["status"] == "chosen"


def test_rounds_change_the_order_so_no_candidate_always_follows_the_same_one():
    from diffsynth_attention.tuning.timing import round_order

    names = ["torch", "torch_cudnn", "torch_efficient", "flash_attention_4", "flash_attention_3"]
    orders = [round_order(names, i) for i in range(15)]
    assert all(sorted(o) == sorted(names) for o in orders)
    assert orders == [round_order(names, i) for i in range(15)]  # deterministic
    for name in names:
        before = {o[o.index(name) - 1] for o in orders if o.index(name) > 0}
        assert len(before) >= 2, (name, before)
