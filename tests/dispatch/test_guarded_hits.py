"""The hit path's guarded entries (dispatch/hot.py, dispatch/guards.py, PlanTable.fast): a call
served by a tensor guard gets exactly the plan its signature would get, an argument that
changes the signature is never served by another signature's entry, and every change of the
plan table empties the entries."""

import pytest
import torch

import diffsynth_attention as da
from diffsynth_attention import overrides, tiers
from diffsynth_attention.callsite import needs_grad
from diffsynth_attention.dispatch import guards
from diffsynth_attention.request import Request

from support.helpers import call_variants, full_reference, qkv, rel


def _sig(kwargs) -> tuple:
    req = Request(**kwargs)
    return req.signature(overrides.scope_get(), overrides.implementation_raw(), needs_grad(req.q, req.k, req.v, req.attn_mask),
                         tiers.scope_get(), tiers.raw())


_SERVED = [[]]  # where spied plans note their signature: the list of the latest _spy()


def _spy(disp) -> list:
    """Make every plan in the table note its signature when it runs; returns the (new) notes."""
    _SERVED[0] = served = []
    for sig, plan in list(disp.plans.items()):
        if getattr(plan.run, "spied", False):
            continue
        run = plan.run

        def spied(q, k, v, mask, scale, _run=run, _sig=sig):
            _SERVED[0].append(_sig)
            return _run(q, k, v, mask, scale)
        spied.spied = True
        plan.run = spied  # an attribute of the plan: the table (and its guarded entries) is left as it is
    return served


def _warm(disp, kwargs, times=3):
    for _ in range(times):
        disp.forward(**kwargs)


VARIANTS = list(call_variants())


@pytest.mark.parametrize("i", range(len(VARIANTS)))
def test_guarded_hits_serve_the_signatures_plan(disp, i):
    """Each variant and the base call, both warmed into guarded entries, then called in turn:
    every call runs the plan of its own signature."""
    base, other = VARIANTS[0], VARIANTS[i]
    _warm(disp, base)
    _warm(disp, other)
    assert disp.plans.fast, "the common call has a guarded entry"
    served = _spy(disp)
    for kwargs in (base, other, base, other):
        served.clear()
        disp.forward(**kwargs)
        assert served == [_sig(kwargs)]


def _changed_calls():
    q, k, v = qkv(b=1, hq=2, sq=8, d=8)
    base = dict(q=q, k=k, v=v)
    yield "k of another length", {**base, "k": qkv(b=1, hq=2, sq=8, skv=12, d=8)[1], "v": qkv(b=1, hq=2, sq=8, skv=12, d=8)[2]}
    yield "q of another length", {**base, "q": qkv(b=1, hq=2, sq=12, d=8)[0]}
    # the state holds k's size, not its shape: here only the tensor guard tells them apart
    gqa = qkv(b=1, hq=2, hk=1, sq=8, skv=16, d=8)
    yield "k and v of another shape, k's size", {**base, "k": gqa[1], "v": gqa[2]}
    yield "v of another dtype", {**base, "v": v.double()}
    yield "q in another memory order", {**base, "q": q.transpose(2, 3).contiguous().transpose(2, 3)}
    yield "k requires grad", {**base, "k": k.clone().requires_grad_()}
    yield "a tensor subclass", {**base, "q": q.as_subclass(_Marked)}
    yield "is_causal=1", {**base, "is_causal": 1}
    yield "another out pattern", {**base, "out_pattern": "b s n d"}


class _Marked(torch.Tensor):
    pass


@pytest.mark.parametrize("what,changed", list(_changed_calls()), ids=[w for w, _ in _changed_calls()])
def test_a_changed_call_is_not_served_by_the_base_entry(disp, what, changed):
    """With only the base call's entry, a call that differs in any tensor property or flag is
    looked up by its own signature (and gets a plan of its own)."""
    q, k, v = qkv(b=1, hq=2, sq=8, d=8)
    base = dict(q=q, k=k, v=v)
    _warm(disp, base)
    served = _spy(disp)
    if what == "v of another dtype":  # refused by validation, before any kernel runs
        with pytest.raises(TypeError, match="share a dtype"):
            disp.forward(**changed)
        assert served == []
        return
    disp.forward(**changed)
    assert all(s == _sig(changed) for s in served), f"{what}: served by another signature's plan"
    out = disp.forward(**changed)
    if changed.get("out_pattern", "b n s d") != "b n s d":
        out = out.transpose(1, 2)
    ref = full_reference(changed["q"], changed["k"], changed["v"], causal=bool(changed.get("is_causal", False)))
    assert rel(out, ref) < 1e-4


def test_modes_and_scopes_are_part_of_the_state(disp, monkeypatch):
    """Grad mode, the backend scope, DIFFSYNTH_ATTENTION_IMPLEMENTATION and the quality tier each
    change the plan a call gets: none is served by the entry made without it."""
    q, k, v = qkv(b=1, hq=2, sq=8, d=8)
    _warm(disp, dict(q=q, k=k, v=v))
    _spy(disp)
    with da.use_backend("torch_math"):
        disp.forward(q, k, v)
        assert disp.explain(q, k, v).backend == "torch_math"
    monkeypatch.setenv("DIFFSYNTH_ATTENTION_IMPLEMENTATION", "torch_math")
    _warm(disp, dict(q=q, k=k, v=v))
    served = _spy(disp)
    disp.forward(q, k, v)
    monkeypatch.delenv("DIFFSYNTH_ATTENTION_IMPLEMENTATION")
    disp.forward(q, k, v)
    assert served[0] != served[1] and served[0][1] in ("torch_math", b"torch_math")
    qg = q.clone().requires_grad_()
    with torch.no_grad():
        _warm(disp, dict(q=qg, k=k, v=v))
    served = _spy(disp)
    out = disp.forward(qg, k, v)  # grad enabled now: the no-grad entry must not serve it
    assert out.requires_grad
    assert all(s == _sig(dict(q=qg, k=k, v=v)) for s in served)


def test_dims_are_compared_with_their_types(disp):
    """dims {"n": 2.0} equals {"n": 2}, and validation refuses it: a guarded entry never serves it."""
    q, k, v = (t.transpose(1, 2).reshape(1, 8, 16) for t in qkv(b=1, hq=2, sq=8, d=8))
    kw = dict(q_pattern="b s (n d)", k_pattern="b s (n d)", v_pattern="b s (n d)", out_pattern="b s (n d)")
    for _ in range(3):
        disp.forward(q, k, v, dims={"n": 2}, **kw)
    assert disp.plans.fast
    for bad in (2.0, True):
        with pytest.raises(ValueError, match="dims"):
            disp.forward(q, k, v, dims={"n": bad}, **kw)
    served = _spy(disp)
    out = disp.forward(q, k, v, dims={"n": 4}, **kw)  # valid (d = 4), and another signature
    assert served == [] and out.shape == q.shape


def test_every_table_change_empties_the_entries(disp):
    q, k, v = qkv(b=1, hq=2, sq=8, d=8)
    _warm(disp, dict(q=q, k=k, v=v))
    assert disp.plans.fast
    plan = next(iter(disp.plans.values()))
    disp.store.put(disp.store.get(plan.key.id))  # a new decision for the key: its plans are dropped
    assert not disp.plans.fast and plan not in disp.plans.values()
    _warm(disp, dict(q=q, k=k, v=v))
    assert disp.plans.fast
    sig = next(iter(disp.plans))
    disp.plans[sig] = disp.plans[sig]  # a replacement
    assert not disp.plans.fast


def test_an_entry_is_added_only_while_its_plan_is_in_the_table(disp):
    q, k, v = qkv(b=1, hq=2, sq=8, d=8)
    disp.forward(q, k, v)
    sig, plan = next(iter(disp.plans.items()))
    guard = guards.tensor_guard(q, k, v)
    assert guard is not None
    disp.invalidate()  # another thread drops the plan between the lookup and the entry
    disp.plans.add_fast(("state",), sig, plan, guard, None)
    assert not disp.plans.fast


def test_a_guarded_hit_that_fails_goes_to_the_failure_path(disp, monkeypatch):
    """A backend that raises on a guarded hit is handled as on any hit: the call still returns
    the right result, and the backend is dropped in this process."""
    from support.flaky import force_flaky

    q, k, v = qkv()
    flaky, kid = force_flaky(disp, monkeypatch, q, k, v)
    flaky.failures = 0
    _warm(disp, dict(q=q, k=k, v=v))
    assert disp.plans.fast
    flaky.failures = 1
    out = disp.forward(q, k, v)
    assert rel(out, full_reference(q, k, v)) < 1e-5
    assert "flash_attention_4" in disp.explain(q, k, v).dropped


def test_guard_checks_what_the_signature_reads():
    q, k, v = qkv(b=1, hq=2, sq=8, d=8)
    check = guards.tensor_guard(q, k, v)
    assert check(q, k, v) and check(q.clone(), k.clone(), v.clone())
    assert not check(q, k, v.double())
    assert not check(q, k, v.transpose(2, 3).contiguous().transpose(2, 3))
    assert not check(q, k, v.clone().requires_grad_())
    assert not check(q, k, v.to("meta"))
    assert not check(q, k, "v")
    with torch.inference_mode():
        qi, ki, vi = q.clone(), k.clone(), v.clone()
        inner = guards.tensor_guard(qi, ki, vi)
        assert inner(qi, ki, vi)
    assert guards.tensor_guard(q.to_sparse(), k, v) is None


def test_is_causal_one_is_not_true(disp):
    """is_causal=1 is valid and has a signature of its own (1 == True): True's entry never serves it."""
    q, k, v = qkv(b=1, hq=2, sq=8, d=8)
    _warm(disp, dict(q=q, k=k, v=v, is_causal=True))
    assert disp.plans.fast
    served = _spy(disp)
    disp.forward(q, k, v, is_causal=1)
    assert all(s == _sig(dict(q=q, k=k, v=v, is_causal=1)) for s in served) and not served


def test_is_causal_zero_is_not_served_by_is_causal_one(disp):
    """1 and 0 are both valid and neither is a bool: a call with 0 after warm calls with 1 runs
    non-causal attention (its own signature's plan), never the plan 1 made."""
    q, k, v = qkv(b=1, hq=2, sq=8, d=8)
    _warm(disp, dict(q=q, k=k, v=v, is_causal=1))
    out = disp.forward(q, k, v, is_causal=0)
    assert rel(out, full_reference(q, k, v)) < 1e-5
    assert rel(disp.forward(q, k, v, is_causal=1), full_reference(q, k, v, causal=True)) < 1e-5


def test_one_tensor_passed_twice_has_no_guard_and_leaves_guards_on(disp, monkeypatch):
    """Dynamo's guard refuses a tensor passed twice: such calls take the signature, are served
    right, and do not turn the guards off for the process."""
    monkeypatch.setattr(guards, "_usable", None)
    q, k, v = qkv(b=1, hq=2, sq=8, d=8)
    for _ in range(3):
        out = disp.forward(q, q, q)
    assert rel(out, full_reference(q, q, q)) < 1e-5
    assert guards.tensor_guard(q, k, k) is None
    assert guards.tensor_guard(q, k, v) is not None


def test_a_call_reads_each_scope_and_variable_once(monkeypatch, tmp_path):
    """The guarded entry a signature hit adds is keyed by the state the call read, under the
    signature it looked up: both must hold the same values of the scopes and variables, or a
    variable changed by another thread between two reads (DIFFSYNTH_ATTENTION_QUALITY, say) would
    leave an entry that serves the other value's plan. So each is read once per call."""
    from diffsynth_attention import Dispatcher, DecisionCache

    reads = {"quality": 0, "implementation": 0}
    quality_get, impl_get = tiers._env_get, overrides._env_get

    def counted(name, get):
        def read(key):
            reads[name] += 1
            return get(key)
        return read
    monkeypatch.setattr(tiers, "_env_get", counted("quality", quality_get))
    monkeypatch.setattr(overrides, "_env_get", counted("implementation", impl_get))
    d = Dispatcher(DecisionCache(tmp_path / "cache"))
    q, k, v = qkv(b=1, hq=2, sq=8, d=8)
    _warm(d, dict(q=q, k=k, v=v))
    d.plans.fast.clear()  # the next call misses the guarded entries, hits its signature and adds one
    reads.update(quality=0, implementation=0)
    d.forward(q, k, v)
    assert reads == {"quality": 1, "implementation": 1}
    assert d.plans.fast  # ... and it added the entry
