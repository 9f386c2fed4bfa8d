"""The one trust rule: which relative-L1 error against the fp32 reference a decision must pass.

One function, :func:`tolerance`, of a problem's dtype, device type and TF32 setting (and the
quality tier, for low-precision keys). The tuner gates with it (through
:func:`diffsynth_attention.tuning.policy.tolerance_for`), the dispatcher reads the store with it,
and a store read that is not given a tolerance derives it from the decision's own key
(:func:`for_key`): there is no other default. No torch at import.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Mapping, Optional

from . import config, tiers

# Relative L1 error allowed against the fp32 reference, by the problem's dtype. About 2-3x what
# an exact kernel of that dtype shows (CPU SDPA against the reference: bf16 2.2e-3, fp16 2.8e-4,
# fp32 4e-7), so a kernel that computes in a narrower type than the caller's fails: an fp32
# problem is not served by a bf16 kernel, nor an fp16 one by an 8-bit one.
DEFAULT_TOLERANCES = MappingProxyType({
    "bfloat16": 5e-3,
    "float16": 2e-3,
    "float32": 1e-4,
    "float64": 1e-5,  # the reference is fp32: an fp64 kernel is held to what fp32 can tell
})
# fp32 on a CUDA device where the process lets matmuls use TF32 (``torch.backends.cuda.matmul.
# allow_tf32``, or ``torch.set_float32_matmul_precision("high")``): TF32 keeps fp16's 10-bit
# mantissa (4.2e-4 measured in simulation), so the caller has asked for that precision.
TF32_TOLERANCE = 1e-3


def tf32_allowed(device_type: str) -> bool:
    """Whether fp32 matmuls on this device may run in TF32 in this process."""
    if device_type != "cuda":
        return False
    try:
        import torch

        return bool(torch.backends.cuda.matmul.allow_tf32)
    except Exception:  # an unusual build: assume the strict rule
        return False


def tolerance(dtype_name: str, device_type: str = "cpu", tf32: Optional[bool] = None,
              tolerances: Optional[Mapping[str, float]] = None) -> float:
    """The gate's tolerance for an exact decision of this dtype on this device type: ``tolerances``
    (a policy's own table) where given, else ``DIFFSYNTH_ATTENTION_TOLERANCE`` for every dtype
    where set, else the table above (TF32's for float32 with TF32 allowed; ``tf32=None``: read
    the process's setting now)."""
    if tolerances is not None:
        return tolerances.get(dtype_name, DEFAULT_TOLERANCES["bfloat16"])
    if config._raw(config.TOLERANCE) is not None:
        return config.tolerance()  # the user's one value, for every dtype
    if dtype_name == "float32" and (tf32_allowed(device_type) if tf32 is None else tf32):
        return TF32_TOLERANCE
    return DEFAULT_TOLERANCES.get(dtype_name, DEFAULT_TOLERANCES["bfloat16"])


def with_tier(base: float, tier: str) -> float:
    """The tolerance a stored decision of quality ``tier`` is trusted under: the tier's relative-L1
    bound for a low-precision choice (exact candidates pass it too: theirs is below ``base``)."""
    b = tiers.bound(tier)
    return base if b is None else max(base, b.rel_l1)


def for_key(fields: Mapping) -> Optional[float]:
    """The tolerance of the problem a key describes (its dtype, device type, TF32 field and
    quality tier); None for a key of another shape (a foreign entry)."""
    try:
        problem = fields["problem"]
        base = tolerance(problem["dtype"], fields["device"]["type"], bool(problem.get("tf32", False)))
        return with_tier(base, fields.get("quality", tiers.EXACT))
    except (KeyError, TypeError, AttributeError):
        return None
