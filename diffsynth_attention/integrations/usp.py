"""DiffSynth-Studio's USP (xDiT's unified sequence parallelism) through this library's dispatcher.

DiffSynth's multi-GPU path (``diffsynth/utils/xfuser/xdit_context_parallel.py``,
``usp_attn_forward``) builds ``xFuserLongContextAttention(attn_type=AttnType.FA, ...)``:
FlashAttention-2, hard-coded. xfuser does the Ulysses all-to-all and the ring loop; the local
attention of each ring step is a function yunchang's ``select_flash_attn_impl`` returns. Its hook
is the ``attn_processor``: for an attention type it does not know, it returns the processor. So
:func:`patch_usp` replaces the name ``xFuserLongContextAttention`` in DiffSynth's module with a
factory that builds xfuser's layer with :func:`usp_local_attention` as its processor (the NPU
type is left alone). The collectives stay xfuser's; only the local kernel changes.

The local call gets ``b s n d`` tensors (the full sequence and heads / ulysses degree, or one
ring chunk) and returns ``(out, lse)``, the LSE as ``(b, n, s)``. With a ring degree of 1,
xfuser stores the LSE of its single step but never uses it: any backend can serve the call (the
ordinary key), and the LSE returned is not computed. With a ring, the call needs the LSE
(:mod:`.lse`). This path is for inference (DiffSynth runs USP for inference); xfuser's own
backward would call its FlashAttention backward.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import sys
from typing import Optional

logger = logging.getLogger("diffsynth_attention")

USP_MODULE = "diffsynth.utils.xfuser.xdit_context_parallel"
ROUTED_ATTN_TYPE = "diffsynth_attention"  # not an AttnType: yunchang falls through to the processor


def usp_local_attention(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                        alibi_slopes=None, return_softmax=False, *, needs_lse: bool = True, **_unused):
    """yunchang's ``fwd-only`` kernel signature on ``b s n d`` tensors: ``(out, lse (b, n, s))``."""
    import torch

    if dropout_p:
        raise ValueError(f"dropout_p={dropout_p}: DiffSynth's USP through diffsynth_attention has no dropout")
    if alibi_slopes is not None or softcap:
        raise ValueError("alibi_slopes and softcap are not supported by diffsynth_attention's USP route")
    if window_size is not None and tuple(window_size) != (-1, -1):
        raise ValueError(f"window_size={tuple(window_size)}: only (-1, -1) (no window) on diffsynth_attention's USP route")
    if needs_lse:
        from .lse import attention_with_lse

        out, lse = attention_with_lse(q, k, v, softmax_scale, causal)
        return out, lse.transpose(1, 2)
    from ..dispatch import default_dispatcher

    out = default_dispatcher().forward(q, k, v, "b s n d", "b s n d", "b s n d", "b s n d", None, None, softmax_scale,
                                       causal)
    # A single ring step: xfuser keeps this LSE for a merge that never happens. Not computed.
    return out, torch.zeros(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32, device=q.device)


def _ring_size(layer) -> int:
    group = getattr(layer, "ring_pg", None)
    try:
        import torch.distributed as dist

        return dist.get_world_size(group) if group is not None and dist.is_initialized() else 1
    except Exception:
        return 2  # unknown: keep the LSE exact


def _routed_factory(original):
    @functools.wraps(original)
    def xFuserLongContextAttention(*args, **kwargs):  # noqa: N802 - the name it replaces
        layer = original(*args, **kwargs)
        attn_type = getattr(layer, "attn_type", None)
        if getattr(attn_type, "value", None) == "npu":  # DiffSynth's NPU kernel: left alone
            return layer
        layer.attn_processor = functools.partial(usp_local_attention, needs_lse=_ring_size(layer) > 1)
        layer.attn_type = ROUTED_ATTN_TYPE
        return layer
    xFuserLongContextAttention.__diffsynth_attention_original__ = original
    return xFuserLongContextAttention


def usp_unavailable_reason() -> Optional[str]:
    """None when DiffSynth's USP module can be patched, else why not (nothing imported when not)."""
    if USP_MODULE in sys.modules:
        return None
    missing = [name for name in ("xfuser", "yunchang") if importlib.util.find_spec(name) is None]
    if missing:
        return (f"DiffSynth's USP path needs {' and '.join(missing)} (pip install xfuser yunchang), not installed: "
                "its attention is not routed")
    return None


def patch_usp(patch=None) -> str:
    """Route DiffSynth's USP local attention to the dispatcher. Returns ``"routed"``, or the reason
    it could not (also logged). ``patch``: a :class:`~.patching.DiffSynthPatch` whose ``undo()``
    restores xfuser's class."""
    why = usp_unavailable_reason()
    module = sys.modules.get(USP_MODULE)
    if why is None and module is None:
        try:
            module = importlib.import_module(USP_MODULE)
        except Exception as exc:
            text = str(exc).strip().splitlines()
            why = f"DiffSynth's USP module failed to import ({type(exc).__name__}: {text[0] if text else ''})"
    if why is None:
        original = getattr(module, "xFuserLongContextAttention", None)
        if original is None:
            why = f"{USP_MODULE} has no xFuserLongContextAttention (another DiffSynth version)"
        elif not hasattr(original, "__diffsynth_attention_original__"):
            setattr(module, "xFuserLongContextAttention", _routed_factory(original))
            if patch is not None:
                patch.replaced.append((module, "xFuserLongContextAttention", original))
    if why is not None:
        logger.info("patch_diffsynth: %s", why)
        return why
    return "routed"
