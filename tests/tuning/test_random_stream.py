"""A tuning draws random numbers (the gradient it times the backward with, random stand-ins for a
non-finite call or a trace); PyTorch's SDPA draws none. Before, those draws came from the caller's
global generator, so whatever a pipeline drew after its first attention call (noise, dropout masks)
differed between a run that tuned (a cold cache) and one that did not (a warm cache)."""
import pytest
import torch

import diffsynth_attention as da

from support.helpers import qkv

SDPA = torch.nn.functional.scaled_dot_product_attention


def _after(fn, *args):
    torch.manual_seed(1234)
    fn(*args)
    return torch.randn(8)


def _backward(f):
    def run(q, k, v):
        f(q, k, v).sum().backward()
    return run


@pytest.mark.parametrize("case", ["grad", "non-finite", "compiled"])
def test_a_tuning_leaves_the_callers_random_stream_as_sdpa_does(case):
    q, k, v = qkv(b=1, hq=2, sq=12, d=8)
    if case == "grad":
        q.requires_grad_()
        want, got = _after(_backward(SDPA), q, k, v), _after(_backward(da.attention_forward), q, k, v)
    elif case == "non-finite":
        q[0, 0, 0, 0] = float("nan")
        want, got = _after(SDPA, q, k, v), _after(da.attention_forward, q, k, v)
    else:
        torch._dynamo.reset()
        try:
            want = _after(torch.compile(SDPA, fullgraph=True, backend="aot_eager"), q, k, v)
            torch._dynamo.reset()
            got = _after(torch.compile(da.attention_forward, fullgraph=True, backend="aot_eager"), q, k, v)
        finally:
            torch._dynamo.reset()
    assert da.stats()["tunings"] == 1  # the call tuned
    assert torch.equal(got, want)


def test_a_run_time_failures_fresh_trials_leave_the_random_stream():
    """A backend that fails at run time is tried on fresh random inputs before its decision changes
    (dispatch/faults.py): those draws too came from the caller's generator."""
    from diffsynth_attention.dispatch.faults import fails_on_fresh_inputs

    def broken(*args):
        raise RuntimeError("kernel failed")

    q, k, v = qkv(b=1, hq=2, sq=12, d=8)
    torch.manual_seed(1234)
    want = torch.randn(8)
    torch.manual_seed(1234)
    assert fails_on_fresh_inputs(broken, q, k, v, None, None)
    assert torch.equal(torch.randn(8), want)
