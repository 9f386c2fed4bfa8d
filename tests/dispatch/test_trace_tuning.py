"""A key first met while a graph is traced (issue 30 item 4, issue 33 item 3): the call is
validated once, tuned on one set of random q, k and v (the tuner runs the candidates on them, no
second copy), a candidate that modifies them is still caught, and no plan keeps a call's tensors."""
import gc
import weakref

import pytest
import torch

import diffsynth_attention as da
from diffsynth_attention import problem as problem_module
from diffsynth_attention.backends import REGISTRY
from diffsynth_attention.backends.torch_sdpa import TorchSDPA
from diffsynth_attention.dispatch import Dispatcher, default_dispatcher
from diffsynth_attention.integrations import lse as L

from support.compile_helpers import Recorder, fresh_dynamo, requires_bake  # noqa: F401  (an autouse fixture)
from support.helpers import qkv


def stored():
    (decision,) = default_dispatcher().store.entries().values()
    return decision


def test_prepare_runs_once_for_a_traced_call_that_tunes(monkeypatch):
    """Validation (problem.prepare) runs once: while Dynamo traces, on the fake tensors. The random
    stand-ins the key is tuned on, and the decomposition AOTAutograd traces, are not validated again
    (before: three times, and twice on the LSE path)."""
    requires_bake()
    made = []
    real = problem_module.compile_layout  # prepare's first step, once per prepare

    def counting(*args):
        made.append(args)
        return real(*args)
    monkeypatch.setattr(problem_module, "compile_layout", counting)
    q, k, v = qkv()
    rec = Recorder()
    fn = torch.compile(lambda q, k, v: da.attention_forward(q, k, v, is_causal=True), fullgraph=True, backend=rec)
    with torch.no_grad():
        fn(q, k, v)
        fn(q, k, v)
    assert da.stats()["tunings"] == 1 and stored().evidence == "synthetic" and rec.runs == 2
    assert len(made) == 1, made


class _Allocations:
    """Counts the real (not fake) tensors of the given shapes that torch's factories and ``clone``
    make while ``active``: every way the dispatcher and the tuner make inputs."""

    FACTORIES = ("empty_strided", "empty", "randn", "empty_like", "randn_like", "zeros_like", "rand_like")

    def __init__(self, monkeypatch, shapes):
        self.shapes, self.active, self.made = {tuple(s) for s in shapes}, False, []
        for name in self.FACTORIES:
            monkeypatch.setattr(torch, name, self.wrap(getattr(torch, name), name))
        monkeypatch.setattr(torch.Tensor, "clone", self.wrap(torch.Tensor.clone, "clone"))

    def wrap(self, fn, name):
        def counted(*args, **kwargs):
            out = fn(*args, **kwargs)
            if self.active and type(out) in (torch.Tensor, torch.nn.Parameter) and tuple(out.shape) in self.shapes:
                self.made.append((name, tuple(out.shape)))
            return out
        return counted

    def during(self, monkeypatch, owner, method):
        real = getattr(owner, method)

        def counted(*args, **kwargs):
            self.active = True
            try:
                return real(*args, **kwargs)
            finally:
                self.active = False
        monkeypatch.setattr(owner, method, counted)


def test_trace_time_tuning_holds_one_copy_of_q_k_and_v(monkeypatch):
    """While Dynamo traces, the undecided key is tuned on random tensors of the call's shapes: one
    q, one k, one v, which the candidates run on. Before, the tuner cloned them again (two copies
    each, on top of a model being compiled)."""
    requires_bake()
    q, k, v = qkv(hq=4, hk=2, sq=24, skv=40, d=16, dv=8)  # three different shapes
    count = _Allocations(monkeypatch, (q.shape, k.shape, v.shape))
    count.during(monkeypatch, Dispatcher, "trace_plan")
    fn = torch.compile(lambda q, k, v: da.attention_forward(q, k, v), fullgraph=True, backend=Recorder())
    with torch.no_grad():
        fn(q, k, v)
    assert da.stats()["tunings"] == 1 and stored().evidence == "synthetic"
    assert sorted(shape for _, shape in count.made) == sorted(tuple(t.shape) for t in (q, k, v)), count.made


def test_trace_time_tuning_of_an_lse_key_holds_one_copy_too(monkeypatch):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, s, 2, 16, generator=g) for s in (24, 40, 40))  # b s n d; k and v one shape
    count = _Allocations(monkeypatch, (q.shape, k.shape))
    count.during(monkeypatch, L.LseSelector, "choose")
    fn = torch.compile(lambda q, k, v: L.attention_with_lse(q, k, v), fullgraph=True, backend=Recorder())
    with torch.no_grad():
        fn(q, k, v)
    assert da.stats()["tunings"] == 1
    assert sorted(shape for _, shape in count.made) == sorted(tuple(t.shape) for t in (q, k, v)), count.made


class _Mutates(TorchSDPA):
    """A CPU candidate that scales its k in place (as sageattention 1.x's smooth_k did)."""

    devices = frozenset({"cpu"})

    def __init__(self):
        super().__init__()
        self.name = "xformers"

    def forward(self, q, k, v, mask, scale, causal, window, need_grad):
        out = super().forward(q, k, v, mask, scale, causal, window, need_grad)
        k.mul_(2.0)
        return out


def test_a_candidate_that_modifies_the_random_inputs_is_rejected_and_the_next_is_gated_on_intact_ones(monkeypatch):
    """No copy of the random stand-ins is kept, yet a candidate that writes into them is found (their
    row sums changed), and the candidates after it run on new random inputs, against a reference
    computed on those: they pass the gate as they would have."""
    monkeypatch.setitem(REGISTRY, "xformers", _Mutates())
    for name, ms in (("xformers", 0.5), ("torch", 1.0), ("torch_flash", 1.0), ("torch_math", 1.0)):
        monkeypatch.setattr(REGISTRY[name], "predicted_ms", lambda p, dev, ms=ms: ms)  # the mutator is gated first
    q, k, v = qkv()
    fn = torch.compile(lambda q, k, v: da.attention_forward(q, k, v), fullgraph=True, backend=Recorder())
    with torch.no_grad():
        out = fn(q, k, v)
    decision = stored()
    bad = decision.candidates["xformers"]
    assert bad.status == "rejected" and "modified its input tensor(s) k in place" in bad.reason
    for name in ("torch", "torch_flash", "torch_math"):
        assert decision.candidates[name].status != "rejected", decision.candidates[name]
        assert decision.candidates[name].error < 1e-4
    assert decision.backend != "xformers"
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))


def test_a_plan_keeps_no_tensor_of_the_call_that_made_it():
    """The call value carries the caller's tensors from validation to the tuner; the plan stored for
    its signature keeps the call without them, so a served call's tensors are freed."""
    q, k, v = qkv()
    refs = [weakref.ref(t) for t in (q, k, v)]
    da.attention_forward(q, k, v)
    plans = [p for p in default_dispatcher().plans.values()]
    assert plans and all(p.call.q is None and p.call.canonical == () for p in plans)
    del q, k, v
    gc.collect()
    assert all(r() is None for r in refs)


@pytest.mark.parametrize("pattern", ["b s n d", "b n s d"])
def test_the_call_moves_to_random_stand_ins_without_validation(pattern):
    q, k, v = qkv()
    if pattern == "b s n d":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    call = problem_module.prepare(q, k, v, pattern, pattern, pattern, pattern, None, None, None, False, None, False)
    assert not call.synthetic and call.canonical[0].shape == (2, 4, 32, 16)
    r = torch.randn_like(q)
    moved = call.on(r, k, v)
    assert moved.synthetic and moved.problem == call.problem and moved.q is r
    assert torch.equal(moved.canonical[0], r if pattern == "b n s d" else r.transpose(1, 2))
    assert moved.bare().q is None and moved.bare().problem == call.problem
