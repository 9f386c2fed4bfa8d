"""The tuner with real CPU backends and fake backends forcing every path."""
import time

import pytest
import torch

import diffsynth_attention as da
from diffsynth_attention.backends import REGISTRY
from diffsynth_attention.backends.torch_sdpa import TorchSDPA

from support.helpers import full_reference, qkv, rel


class Fake(TorchSDPA):
    """A CPU backend under a reserved name, whose forward misbehaves on purpose."""

    devices = frozenset({"cpu"})

    def __init__(self, name, behaviour):
        super().__init__()
        self.name = name
        self.behaviour = behaviour
        self.calls = 0

    def forward(self, q, k, v, mask, scale, causal, window, need_grad):
        self.calls += 1
        out = super().forward(q, k, v, mask, scale, causal, window, need_grad)
        if self.behaviour == "slow":
            time.sleep(0.01)
        elif self.behaviour == "inaccurate":
            out = out + 0.05 * out.abs().mean()
        elif self.behaviour == "raise":
            raise RuntimeError("kernel exploded")
        elif self.behaviour == "oom":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 48 GiB")
        elif self.behaviour == "nan":
            out = out.clone()
            out[0, 0, 0, 0] = float("nan")
        elif self.behaviour == "mutate":
            k.mul_(2.0)  # like sageattention 1.x's in-place smooth_k
        elif self.behaviour == "fast":
            pass
        return out


def install(monkeypatch, **fakes):
    made = {}
    for name, behaviour in fakes.items():
        made[name] = Fake(name, behaviour)
        monkeypatch.setitem(REGISTRY, name, made[name])
    return made


def test_real_tuning_over_cpu_backends():
    q, k, v = qkv(sq=64)
    info = da.explain(q, k, v)
    assert info.source == "tuned"
    assert info.backend in ("torch", "torch_flash", "torch_math")
    for name in ("torch", "torch_flash", "torch_math"):
        c = info.candidates[name]
        assert c["error"] is not None and c["error"] < 1e-5
        assert c["status"] in ("chosen", "accepted", "slower")
        assert c["time_ms"] is None and c["reason"].startswith("not timed: the budget") or c["time_ms"] > 0
    assert info.candidates[info.backend]["time_ms"] > 0
    assert info.candidates["torch_cudnn"]["status"] == "unsupported"
    assert "CUDA" in info.candidates["torch_cudnn"]["reason"]
    assert da.stats()["tunings"] == 1
    # a second call is a hit: no tuning
    da.attention_forward(q, k, v)
    assert da.stats() ["tunings"] == 1 and da.stats()["hits"] == 1
    assert da.explain(q, k, v).source == "cache"


def test_key_holds_problem_device_and_versions():
    q, k, v = qkv(hq=8, hk=2, sq=16, skv=24, d=16, dv=8)
    key = da.explain(q, k, v, is_causal=True).key
    p = key["problem"]
    assert (p["batch"], p["heads_q"], p["heads_kv"], p["seq_q"], p["seq_kv"], p["head_dim"], p["head_dim_v"]) == (2, 8, 2, 16, 24, 16, 8)
    assert p["causal"] is True and p["dtype"] == "float32" and p["requires_grad"] is False
    assert key["device"]["type"] == "cpu" and "index" not in key["device"]
    assert key["versions"]["torch"] == torch.__version__


def test_each_bad_candidate_is_rejected_with_its_reason(monkeypatch):
    install(monkeypatch, flash_attention_2="inaccurate", flash_attention_3="raise", flash_attention_4="nan",
            xformers="mutate", sage_attention="oom")
    q, k, v = qkv()
    copies = [t.clone() for t in (q, k, v)]
    info = da.explain(q, k, v)
    c = info.candidates
    assert c["flash_attention_2"]["status"] == "rejected" and "above tolerance" in c["flash_attention_2"]["reason"]
    assert c["flash_attention_2"]["error"] > 0.005
    assert "RuntimeError: kernel exploded" in c["flash_attention_3"]["reason"]
    assert c["flash_attention_4"]["reason"] == "output has NaN or Inf"
    assert "modified its input tensor(s) k in place" in c["xformers"]["reason"]
    assert c["sage_attention"]["reason"].startswith("out of memory")
    assert info.backend in ("torch", "torch_flash", "torch_math")
    assert all(torch.equal(a, b) for a, b in zip(copies, (q, k, v))), "tuning modified the caller's tensors"
    out = da.attention_forward(q, k, v)
    assert rel(out, full_reference(q, k, v)) < 1e-5


def test_tolerance_is_configurable(monkeypatch):
    install(monkeypatch, flash_attention_2="inaccurate")
    monkeypatch.setenv("DIFFSYNTH_ATTENTION_TOLERANCE", "0.5")
    q, k, v = qkv()
    info = da.explain(q, k, v)
    assert info.candidates["flash_attention_2"]["status"] != "rejected"
    monkeypatch.setenv("DIFFSYNTH_ATTENTION_TOLERANCE", "-1")
    q2, k2, v2 = qkv(sq=40)
    with pytest.raises(ValueError, match="DIFFSYNTH_ATTENTION_TOLERANCE"):
        da.explain(q2, k2, v2)


def test_slow_candidate_is_not_retimed_and_fast_one_wins(monkeypatch):
    from support.virtual import tune_virtual

    q, k, v = qkv(sq=16, d=8)
    info, fakes, _ = tune_virtual(monkeypatch, q, k, v, torch={"cost": 1.0}, flash_attention_2={"cost": 10.0},
                                  flash_attention_4={"cost": 0.5})
    slow = info.candidates["flash_attention_2"]
    assert slow["status"] == "slower" and "not re-timed" in slow["reason"]
    assert fakes["flash_attention_2"].calls == 4  # gate run, two warm-up samples, one second look: never in the rounds
    assert info.backend == "flash_attention_4"


def test_near_tie_goes_to_the_preferred_backend(monkeypatch):
    from support.virtual import VirtualClock, tune_virtual, virtual_policy

    policy = virtual_policy(VirtualClock(), tie_floor=10.0, tie_cap=10.0)  # every candidate in the rounds is a tie
    q, k, v = qkv()
    info, _, _ = tune_virtual(monkeypatch, q, k, v, policy=policy, torch={"cost": 1.4}, torch_flash={"cost": 1.0},
                              torch_math={"cost": 1.2})
    assert info.backend == "torch"


def test_tuning_off_uses_known_decision_or_torch(monkeypatch):
    monkeypatch.setenv("DIFFSYNTH_ATTENTION_TUNING", "off")
    q, k, v = qkv()
    info = da.explain(q, k, v)
    assert info.backend == "torch" and info.source == "fallback"
    da.attention_forward(q, k, v)
    assert da.stats()["tunings"] == 0
    monkeypatch.setenv("DIFFSYNTH_ATTENTION_TUNING", "on")
    assert da.explain(q, k, v).source == "tuned"
    monkeypatch.setenv("DIFFSYNTH_ATTENTION_TUNING", "off")
    assert da.explain(q, k, v).source == "cache"


def test_the_call_that_tunes_returns_a_correct_result(monkeypatch):
    install(monkeypatch, flash_attention_2="mutate")
    q, k, v = qkv()
    out = da.attention_forward(q, k, v, is_causal=True)
    assert rel(out, full_reference(q, k, v, causal=True)) < 1e-5
    assert da.stats()["tunings"] == 1


def test_runtime_failure_in_auto_drops_backend_for_that_key(monkeypatch, caplog):
    fakes = install(monkeypatch, flash_attention_4="fast")
    q, k, v = qkv()
    # force the decision to the fake, then make it fail at run time
    info = da.explain(q, k, v)
    from diffsynth_attention.dispatch import default_dispatcher

    store = default_dispatcher().store
    from diffsynth_attention.store.key import key_id

    decision = store.get(key_id(info.key))
    store.put(decision.replace(backend="flash_attention_4"))
    fakes["flash_attention_4"].behaviour = "raise"
    out = da.attention_forward(q, k, v)
    assert rel(out, full_reference(q, k, v)) < 1e-5
    after = da.explain(q, k, v)
    assert after.backend != "flash_attention_4"
    assert "failed at run time" in after.candidates["flash_attention_4"]["reason"]


def test_gradients_need_backward_capable_candidates_and_match_reference():
    q, k, v = (t.requires_grad_(True) for t in qkv(sq=24))
    info = da.explain(q, k, v)
    assert info.key["problem"]["requires_grad"] is True
    out = da.attention_forward(q, k, v)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    qf, kf, vf = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(qf, kf, vf)
    ref_grads = torch.autograd.grad(ref, (qf, kf, vf), g.double())
    for a, b in zip(grads, ref_grads):
        assert rel(a, b.float()) < 1e-4


@pytest.mark.parametrize("name", ["torch", "torch_flash", "torch_math"])
def test_every_backward_capable_cpu_backend_matches_reference_gradients(name):
    q, k, v = (t.requires_grad_(True) for t in qkv(sq=20, hq=4))
    with da.use_backend(name):
        out = da.attention_forward(q, k, v, is_causal=True)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    qf, kf, vf = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(qf, kf, vf, is_causal=True)
    for a, b in zip(grads, torch.autograd.grad(ref, (qf, kf, vf), g.double())):
        assert rel(a, b.float()) < 1e-4


def test_no_backward_backend_is_not_a_candidate_when_gradients_are_needed(monkeypatch):
    fake = Fake("sage_attention", "fast")
    fake.backward = False
    monkeypatch.setitem(REGISTRY, "sage_attention", fake)
    q, k, v = (t.requires_grad_(True) for t in qkv())
    info = da.explain(q, k, v)
    assert info.candidates["sage_attention"]["status"] == "unsupported"
    assert "backward" in info.candidates["sage_attention"]["reason"]


def test_reference_handles_long_sequences_in_chunks(monkeypatch):
    from diffsynth_attention.tuning import reference

    monkeypatch.setattr(reference, "_SCORES_PER_CHUNK", 64)
    q, k, v = qkv(sq=50, skv=30)
    chunked = reference.reference_slice(q, k, v, None, None, True, None, [0, 3])
    full = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)[0, [0, 3]]
    assert rel(chunked, full.float()) < 1e-5
