"""SDPA's answer to a call where q or k has no head, computed without SDPA's kernels.

PyTorch's SDPA accepts such calls (an empty output where q has no head; zeros where q has heads
and k none: there is no key at all), but its CPU kernels can divide by a head count of 0 and kill
the process with SIGFPE. Probed one call a subprocess on the CPU (b, heads, s_q, s_kv, head dims
each 0 or not, GQA included; plain, causal, masked and scaled; float32 and bfloat16; with and
without backward), torch 2.11 dies on exactly these, whatever the flags, dtype or backward:

- k and v with no head where q has some (its GQA path divides q's heads by k's 0, as torch
  2.5's did), whatever the other sizes;
- q, k and v with no head where s_q > 0, s_kv > 0 and q's head dim equals v's (its flash kernel
  splits its work by heads), whatever the batch.

torch 2.13 returns on every one (an empty output, or zeros for no key head), and both return the
same for every other empty call (a batch, a sequence or a head dim of 0, or q with no head where k
has some), which stays SDPA's own call (``TorchSDPA``). A call with no head on either side is
served here on every torch: one rule, wider than the crashes, that no version's kernel choice can
get around. Its output is the arithmetic of SDPA's math kernel on those empty tensors (no score
exists), so gradients flow: zeros, or empty, of each input's shape.
"""

from __future__ import annotations

import torch


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None) -> torch.Tensor:
    """Attention of ``b n s d`` q, k and v where one of q and k has no head: (b, n_q, s_q, d_v) of
    q's dtype, an empty tensor where q has no head and zeros where k has none (no key at all, as
    SDPA answers a call with s_kv = 0). Scale and causality change nothing (no score exists); a
    mask takes part where it is additive, so that its gradient (zeros) flows too. The reshapes and
    slices of these empty tensors keep the autograd graph."""
    b, h = q.shape[0], q.shape[1]
    if k.shape[1] == 0:  # no key head: k and v as q's heads over 0 keys (and the mask over 0 keys)
        k, v = k.reshape(b, h, 0, k.shape[3]), v.reshape(b, h, 0, v.shape[3])
        mask = None if mask is None else mask[..., :0]
    else:  # no query head: k and v as q's 0 heads
        k, v = k[:, :0], v[:, :0]
    scores = q @ k.transpose(-2, -1)  # (b, h, s_q, s_kv'), no element: either h or s_kv' is 0
    if mask is not None and mask.dtype != torch.bool:
        scores = (scores + mask).to(q.dtype)
    return scores.softmax(-1) @ v


def serves(query, key, value, attn_mask, is_causal, enable_gqa) -> bool:
    """Whether a call of PyTorch's SDPA signature is one :func:`attend` serves in its stead (for
    ``patch_sdpa``'s replacement, routed or not): ``b n s d`` tensors of one batch size, dtype and
    device, k and v of one head count and length, q and k of one head dim, q or k without a head,
    heads SDPA accepts, and a mask of 2 dims or more, not with ``is_causal``. Any other call
    (including each that SDPA refuses, with its error) stays SDPA's own."""
    if not (isinstance(query, torch.Tensor) and isinstance(key, torch.Tensor) and isinstance(value, torch.Tensor)) \
            or query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return False
    hq, hk = query.shape[1], key.shape[1]
    if hq and hk:  # the common call: SDPA's
        return False
    if value.shape[1] != hk or not query.shape[0] == key.shape[0] == value.shape[0] or query.shape[3] != key.shape[3] \
            or key.shape[2] != value.shape[2] or not query.dtype == key.dtype == value.dtype \
            or not query.device == key.device == value.device:
        return False
    if hq != hk and not (enable_gqa and (hk == 0 or hq % hk == 0)):
        return False
    return attn_mask is None or isinstance(attn_mask, torch.Tensor) and attn_mask.dim() >= 2 and is_causal is False
