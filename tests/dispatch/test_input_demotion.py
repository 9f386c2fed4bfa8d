"""Inputs cannot demote a backend (issue 31, item 6).

- A failure is confirmed on plain tensors: a tensor subclass whose attention raises is the
  caller's input, not the backend's fault, and never rewrites the decision every process reads.
- A call that needs gradients with a float mask (a learned bias) is part of the capabilities: a
  backend whose backward gives no gradient for the mask (SDPA's CPU flash kernel) is not a
  candidate, so the tuner never picks one that then fails on every such call.
"""
import dataclasses
import logging
from fractions import Fraction

import pytest
import torch

from diffsynth_attention.dispatch import Dispatcher
from diffsynth_attention.store.cache import DecisionCache
from diffsynth_attention.store.decision import ACCEPTED, CHOSEN

from support.helpers import full_reference, qkv, rel


class Hostile(torch.Tensor):
    """A tensor subclass whose attention raises (any function named for attention)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if "attention" in getattr(func, "__name__", "") or "attention" in str(func):
            raise RuntimeError("Hostile tensors refuse attention")
        return super().__torch_function__(func, types, args, kwargs or {})


def _decide(folder, q, k, v, backend: str) -> str:
    """Tune the key, then make ``backend`` its decision (as a previous process might have)."""
    disp = Dispatcher(DecisionCache(folder))
    info = disp.explain(q, k, v)
    d = disp.store.get(info.key_id)
    cands = {n: (dataclasses.replace(c, status=ACCEPTED, reason=None) if c.status == CHOSEN else c)
             for n, c in d.candidates.items()}
    cands[backend] = dataclasses.replace(cands[backend], status=CHOSEN, reason=None)
    disp.store.put(d.replace(backend=backend, candidates=cands))
    assert disp.store.flush()
    return info.key_id


def test_a_subclass_whose_attention_raises_never_rewrites_the_decision(tmp_path, caplog):
    folder = tmp_path / "cache"
    q, k, v = qkv(sq=24)
    kid = _decide(folder, q, k, v, "torch_math")
    disp = Dispatcher(DecisionCache(folder))
    hq, hk, hv = (t.as_subclass(Hostile) for t in (q, k, v))
    try:
        disp.forward(hq, hk, hv)
    except RuntimeError as exc:  # every backend refuses these inputs: the caller's error, as is
        assert "Hostile" in str(exc)
    assert DecisionCache(folder).get(kid).backend == "torch_math"  # the decision on disk is unchanged
    assert "from now on" not in caplog.text
    out = Dispatcher(DecisionCache(folder)).forward(q, k, v)  # plain inputs: the decided backend still serves
    assert rel(out, full_reference(q, k, v)) < 1e-4


def test_a_mask_that_requires_grad_is_never_served_by_a_backend_without_its_gradient(disp, caplog):
    caplog.set_level(logging.WARNING, logger="diffsynth_attention")
    q, k, v = qkv(b=1, hq=2, sq=32, d=16)
    mask = torch.randn(1, 1, 32, 32, requires_grad=True)
    info = disp.explain(q, k, v, attn_mask=mask)
    flash = info.decision.candidates["torch_flash"]
    assert flash.status == "unsupported" and "needs gradients" in flash.reason
    assert info.backend != "torch_flash" and info.decision.key["problem"]["requires_grad"] is True
    assert mask.grad is None  # tuning's backward passes filled a leaf of its own, not the caller's
    out = disp.forward(q, k, v, attn_mask=mask)
    out.sum().backward()
    assert mask.grad is not None and torch.isfinite(mask.grad).all()
    assert "failed at run time" not in caplog.text
    ref_mask = mask.detach().clone().requires_grad_()
    torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=ref_mask).sum().backward()
    assert rel(mask.grad, ref_mask.grad) < 1e-4


def test_a_constant_float_mask_without_gradients_keeps_every_candidate(disp):
    q, k, v = qkv(b=1, hq=2, sq=32, d=16)
    mask = torch.randn(1, 1, 32, 32)
    info = disp.explain(q, k, v, attn_mask=mask)
    assert info.decision.candidates["torch_flash"].status != "unsupported"
    assert info.decision.key["problem"]["requires_grad"] is False


def test_a_scale_no_backend_takes_is_refused_before_any_backend_runs(tmp_path, caplog):
    """``fractions.Fraction`` is a ``numbers.Real`` that PyTorch's argument parser refuses: it is
    the caller's input error, named by validation, and never rewrites the decision on disk."""
    folder = tmp_path / "cache"
    q, k, v = qkv(sq=24)
    kid = _decide(folder, q, k, v, "torch_flash")
    disp = Dispatcher(DecisionCache(folder))
    with pytest.raises(TypeError, match="scale must be"):
        disp.forward(q, k, v, scale=Fraction(1, 2))
    assert disp.dropped == {} and "from now on" not in caplog.text
    assert DecisionCache(folder).get(kid).backend == "torch_flash"


class _RefusesFlash:
    """Mixed into a torch mode: refuses SDPA's CPU flash kernel (a profiler or debug mode that does
    not support an operator), and lets everything else run."""

    def _check(self, func):
        if "flash" in str(func):
            raise RuntimeError(f"this mode does not support {func}")


def _dispatch_refuses_flash():
    """A ``TorchDispatchMode`` that refuses the flash kernel (:class:`_RefusesFlash`)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class DispatchRefuses(_RefusesFlash, TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self._check(func)
            return func(*args, **(kwargs or {}))
    return DispatchRefuses()


@pytest.mark.parametrize("kind", ["dispatch", "function"])
def test_a_call_under_a_mode_that_refuses_the_backend_never_rewrites_the_decision(kind, tmp_path, caplog):
    """A ``__torch_dispatch__`` or ``__torch_function__`` mode is the caller's context, like a tensor
    subclass: the retry and the fresh trials run under it, so they confirm nothing about the backend."""
    from torch.overrides import TorchFunctionMode

    class FunctionRefuses(_RefusesFlash, TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            self._check(func)
            return func(*args, **(kwargs or {}))

    folder = tmp_path / "cache"
    q, k, v = qkv(sq=24)
    kid = _decide(folder, q, k, v, "torch_flash")
    disp = Dispatcher(DecisionCache(folder))
    with _dispatch_refuses_flash() if kind == "dispatch" else FunctionRefuses():
        try:
            disp.forward(q, k, v)
        except RuntimeError as exc:  # the mode may refuse the fallback too: the caller's error, as is
            assert "this mode does not support" in str(exc)
    assert disp.store.flush() and "from now on" not in caplog.text
    assert DecisionCache(folder).get(kid).backend == "torch_flash"  # the decision on disk is unchanged
    out = Dispatcher(DecisionCache(folder)).forward(q, k, v)
    assert rel(out, full_reference(q, k, v)) < 1e-4


def test_a_default_device_context_still_lets_a_real_failure_be_confirmed():
    """``torch.device(...)`` as a context (a DeviceContext mode) changes no result: not a caller's mode."""
    from diffsynth_attention.dispatch.faults import caller_modes, fails_on_fresh_inputs

    q, k, v = qkv(sq=8)

    def broken(*args):
        raise RuntimeError("the kernel is broken")
    with torch.device("cpu"):
        assert caller_modes() == [] and fails_on_fresh_inputs(broken, q, k, v, None, None)


class Picky(torch.Tensor):
    """A tensor subclass that refuses one backend's kernel (SDPA's CPU flash kernel) only."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if "flash" in str(func):
            raise RuntimeError("Picky tensors refuse the flash kernel")
        return super().__torch_function__(func, types, args, kwargs or {})


def test_tuning_on_a_subclass_never_rejects_a_backend_for_every_process(tmp_path):
    """A new key first met with subclass inputs is tuned on plain views of their data: the stored
    decision, which every process reads, does not record the subclass's refusal as the backend's."""
    folder = tmp_path / "cache"
    q, k, v = qkv(sq=24)
    disp = Dispatcher(DecisionCache(folder))
    pq, pk, pv = (t.as_subclass(Picky) for t in (q, k, v))
    try:
        disp.forward(pq, pk, pv)
    except RuntimeError as exc:  # the decided backend may be the one it refuses: the caller's error
        assert "Picky" in str(exc)
    assert disp.store.flush()
    (stored,) = DecisionCache(folder).entries().values()
    flash = stored.candidates["torch_flash"]
    assert flash.status != "rejected" and "Picky" not in (flash.reason or ""), flash


def test_a_new_key_met_under_a_callers_mode_is_tuned_outside_it(tmp_path):
    """Under a dispatch mode of the caller's (here one that refuses the flash kernel) the tuner
    would time and gate the mode's behaviour: the call is served as plain SDPA would be, and the
    key is tuned at its first call outside the mode."""
    folder = tmp_path / "cache"
    q, k, v = qkv(sq=24)
    disp = Dispatcher(DecisionCache(folder))
    with _dispatch_refuses_flash():
        try:
            out = disp.forward(q, k, v)
        except RuntimeError as exc:  # plain SDPA runs the flash kernel here too: the mode refuses it
            assert "this mode does not support" in str(exc)
    assert disp.store.flush() and DecisionCache(folder).entries() == {}  # nothing tuned under the mode
    out = disp.forward(q, k, v)
    assert rel(out, full_reference(q, k, v)) < 1e-4
    (stored,) = DecisionCache(folder).entries().values()
    assert stored.candidates["torch_flash"].status != "rejected"
