"""The ATen runners pass only the arguments that differ from the kernel's defaults (each costs
the builtin's argument parser per call), and give SDPA's results bit for bit."""
import torch

from diffsynth_attention.backends import REGISTRY
from diffsynth_attention.backends.torch_sdpa import _binding, _without_trailing_defaults
from diffsynth_attention.problem import prepare

from support.helpers import qkv

aten = torch.ops.aten


def test_trailing_default_arguments_are_left_out():
    cpu_flash = aten._scaled_dot_product_flash_attention_for_cpu.default
    assert _without_trailing_defaults(cpu_flash, (0.0, False)) == ()
    assert _without_trailing_defaults(cpu_flash, (0.0, True)) == (0.0, True)
    efficient = aten._scaled_dot_product_efficient_attention.default
    assert _without_trailing_defaults(efficient, (None, False, 0.0, False)) == (None, False)
    assert _without_trailing_defaults(efficient, (None, True, 0.0, True)) == (None, True, 0.0, True)
    assert _without_trailing_defaults(efficient, (None, False, 0, False)) == (None, False, 0)  # an int is not the float default
    assert _without_trailing_defaults(object(), (1, 2)) == (1, 2)  # no schema: as it is


def test_bound_cpu_runners_match_sdpa_bit_for_bit():
    q, k, v = qkv(b=1, hq=2, sq=16, d=8)
    for causal in (False, True):
        call = prepare(q, k, v, "b n s d", "b n s d", "b n s d", "b n s d", None, None, None, causal, None, False)
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        for name in ("torch", "torch_flash"):
            run = REGISTRY[name].bind(call.problem, False, True)
            assert torch.equal(run(q, k, v, None, None), want), (name, causal)


def test_runners_call_the_c_builtin_and_fall_back_to_the_overload():
    """The bound runners call ``torch._C._VariableFunctions``' builtin (no Python frame of
    OpOverload.__call__); an operator without one keeps its resolved overload."""
    op = aten._scaled_dot_product_flash_attention_for_cpu
    assert _binding(op) is torch._C._VariableFunctions._scaled_dot_product_flash_attention_for_cpu
    assert _binding(aten._scaled_dot_product_efficient_attention) is torch._C._VariableFunctions._scaled_dot_product_efficient_attention

    class NoBuiltin:
        _qualified_op_name = "aten::not_an_operator_of_any_torch"
        default = object()

    assert _binding(NoBuiltin) is NoBuiltin.default
    q, k, v = qkv(b=1, hq=2, sq=16, d=8)
    call = prepare(q, k, v, "b n s d", "b n s d", "b n s d", "b n s d", None, None, None, False, None, False)
    run = REGISTRY["torch_flash"].bind(call.problem, False, True)
    assert torch.equal(run(q, k, v, None, None), op.default(q, k, v)[0])
