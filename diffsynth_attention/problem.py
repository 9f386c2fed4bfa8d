"""Validating a call and describing it as a :class:`Problem`.

Everything that can be wrong with a call is checked here, before any kernel runs, and raised
as a ``TypeError`` or ``ValueError`` that names the argument. The result, a :class:`Call`,
holds the problem (what backends and the key look at) and the layout conversions between the
caller's einops patterns and the canonical ``"b n s d"`` layout.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from einops import EinopsError
from einops.parsing import ParsedExpression

from .callsite import converter, dtype_name
from .describe import describe_problem
from .request import cublas_tf32, dims_length, finite_scale, scalar_scale, scale_number
from .states import MaskKind

CANONICAL = "b n s d"
_AXES = ("b", "n", "s", "d")
# An additive float32 mask with a query of another dtype: added to the scores as PyTorch's SDPA
# adds it (output in q's dtype). Its own mask kind, served only by backends that declare it.
ADDITIVE_FLOAT32 = MaskKind.ADDITIVE_FLOAT32
_FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Problem:
    """What a backend needs to know to say whether it can serve a call, and what the key holds."""

    batch: int
    heads_q: int
    heads_kv: int
    seq_q: int
    seq_kv: int
    head_dim: int
    head_dim_v: int
    dtype: torch.dtype
    device_type: str
    layout: str = CANONICAL
    mask: str = MaskKind.NONE  # a MaskKind: none, bool, additive or additive_float32 (a float32 bias, q of another dtype)
    mask_shape: Optional[tuple] = None  # the mask's shape, left-padded to 4 dims
    causal: bool = False
    window: Optional[int] = None
    requires_grad: bool = False
    # The memory order of q, k and v where any differs from what its pattern says (contiguous in the
    # pattern's order), e.g. "q=bnsd k=bsnd v=bsnd"; None in the common case (see memory_order).
    memory: Optional[str] = None
    tf32: bool = False  # float32 on CUDA with TF32 matmuls allowed (a looser tolerance, other timings)
    # Whether q, k and v (as b n s d views) have a unit last stride. Not part of the key: a plan
    # is bound to one signature, whose strides fix it, so a runner can skip the per-call check.
    dense_last: bool = field(default=False, compare=False)

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.dtype)

    @property
    def empty(self) -> bool:
        """A size 0 anywhere: PyTorch's SDPA serves it, with no key (dispatch/plan.py, empty_plan)."""
        return 0 in (self.batch, self.heads_q, self.heads_kv, self.seq_q, self.seq_kv, self.head_dim, self.head_dim_v)

    def fields(self) -> dict:
        """The problem as the key stores it (JSON types)."""
        return {
            "batch": self.batch, "heads_q": self.heads_q, "heads_kv": self.heads_kv, "seq_q": self.seq_q,
            "seq_kv": self.seq_kv, "head_dim": self.head_dim, "head_dim_v": self.head_dim_v, "dtype": self.dtype_name,
            "layout": self.layout, "mask": self.mask, "mask_shape": None if self.mask_shape is None else list(self.mask_shape),
            "causal": self.causal, "window": self.window, "requires_grad": self.requires_grad,
            # Only where set, so that every key made before these fields existed (contiguous
            # tensors, no TF32) is still the key of the same problem: existing entries need no
            # rewrite, and a call in another memory order or with TF32 gets a key of its own.
            **({"memory": self.memory} if self.memory is not None else {}),
            **({"tf32": True} if self.tf32 else {}),
        }

    def describe(self) -> str:
        return describe_problem(self.fields())


@dataclass(frozen=True)
class Layout:
    """Conversions from the caller's patterns to ``b n s d`` and back, compiled once per patterns."""

    q_pattern: str
    k_pattern: str
    v_pattern: str
    out_pattern: str
    dims: tuple  # sorted (axis, length) pairs
    to_canonical: tuple  # three callables: q, k, v -> b n s d view
    from_canonical: Callable  # b n s d output -> out_pattern
    identity: bool  # all four patterns are "b n s d": nothing to rearrange

    @property
    def text(self) -> str:
        text = f"{self.q_pattern}, {self.k_pattern}, {self.v_pattern} -> {self.out_pattern}"
        if self.dims:
            text += " " + ",".join(f"{a}={n}" for a, n in self.dims)
        return text


@dataclass(frozen=True)
class Call:
    """One validated call: the one value that goes from :func:`prepare` to a plan and to the tuner.

    Its problem, layout, scale and mask rank describe every call of its signature; its tensors
    are this call's (the caller's q, k, v and attn_mask, or random stand-ins of a trace's shapes),
    with ``canonical``, q, k and v as ``b n s d`` views. A plan keeps :meth:`bare` (no tensors:
    a plan outlives its first call). ``synthetic``: the tensors were made for this call (random
    stand-ins), so the tuner works on them directly, with no second copy."""

    problem: Problem
    layout: Layout
    scale: Optional[float]
    mask_ndim: int = 0  # the caller's attn_mask.dim() (0: no mask)
    q: Optional[torch.Tensor] = field(default=None, compare=False, repr=False)  # in the caller's layout
    k: Optional[torch.Tensor] = field(default=None, compare=False, repr=False)
    v: Optional[torch.Tensor] = field(default=None, compare=False, repr=False)
    mask: Optional[torch.Tensor] = field(default=None, compare=False, repr=False)  # the caller's attn_mask
    canonical: tuple = field(default=(), compare=False, repr=False)  # q, k, v as b n s d views
    synthetic: bool = field(default=False, compare=False)

    @property
    def grad(self) -> bool:
        """Whether the call needs gradients (part of its problem)."""
        return self.problem.requires_grad

    @property
    def mask4(self) -> Optional[torch.Tensor]:
        return mask_4d(self.mask)

    def bare(self) -> "Call":
        """The call without its tensors: what a plan keeps."""
        if self.q is None and self.mask is None:
            return self
        return dataclasses.replace(self, q=None, k=None, v=None, mask=None, canonical=(), synthetic=False)

    def on(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None,
           synthetic: bool = True) -> "Call":
        """The same call on other tensors of the same shapes, strides, dtype and device (random
        stand-ins: ``synthetic``), without validating it again."""
        to_q, to_k, to_v = self.layout.to_canonical
        return dataclasses.replace(self, q=q, k=k, v=v, mask=mask, canonical=(to_q(q), to_k(k), to_v(v)),
                                   synthetic=synthetic)

    def out_canonical(self, out: torch.Tensor) -> torch.Tensor:
        """An output of this call (in its ``out_pattern``) as a ``b n s d`` view."""
        p = self.problem
        lengths = (("b", p.batch), ("d", p.head_dim_v), ("n", p.heads_q), ("s", p.seq_q))
        return converter(self.layout.out_pattern, CANONICAL, lengths)(out)


def _parse_pattern(arg: str, pattern) -> list:
    if not isinstance(pattern, str):
        raise TypeError(f"{arg} must be an einops pattern string such as 'b n s d', got {type(pattern).__name__}")
    try:
        parsed = ParsedExpression(pattern)
    except EinopsError as exc:
        raise ValueError(f"{arg}={pattern!r} is not a valid einops pattern: {exc}") from None
    if parsed.has_ellipsis:
        raise ValueError(f"{arg}={pattern!r}: '...' is not supported; name the axes b, n, s and d")
    names = [a for group in parsed.composition for a in group]
    missing = [a for a in _AXES if a not in names]
    extra = sorted(set(names) - set(_AXES))
    if missing or extra:
        problems = []
        if missing:
            problems.append("lacks " + ", ".join(repr(a) for a in missing))
        if extra:
            problems.append("has unknown axes " + ", ".join(repr(a) for a in extra))
        raise ValueError(
            f"{arg}={pattern!r} {' and '.join(problems)}: a pattern uses exactly the axes "
            "b (batch), n (heads), s (sequence) and d (head dim), e.g. 'b s n d' or 'b s (n d)'"
        )
    return parsed.composition


def _converter(arg: str, pattern: str, dims: dict, to_canonical: bool) -> Callable:
    composition = _parse_pattern(arg, pattern)
    for group in composition:
        if len(group) > 1:
            unknown = [a for a in group if a not in dims]
            if to_canonical and len(unknown) > 1:
                raise ValueError(
                    f"{arg}={pattern!r} packs ({' '.join(group)}) but dims gives the length of none of "
                    f"{', '.join(repr(a) for a in unknown)}; pass e.g. dims={{{unknown[0]!r}: ...}}"
                )
    used = tuple(sorted((a, n) for a, n in dims.items() if a in _AXES))
    return converter(pattern, CANONICAL, used) if to_canonical else converter(CANONICAL, pattern, used)


@functools.lru_cache(maxsize=256)
def compile_layout(q_pattern: str, k_pattern: str, v_pattern: str, out_pattern: str, dims: tuple) -> Layout:
    dims_d = dict(dims)
    to = tuple(
        _converter(arg, pattern, dims_d, True)
        for arg, pattern in (("q_pattern", q_pattern), ("k_pattern", k_pattern), ("v_pattern", v_pattern))
    )
    back = _converter("out_pattern", out_pattern, dims_d, False)
    identity = all(p == CANONICAL for p in (q_pattern, k_pattern, v_pattern, out_pattern))
    return Layout(q_pattern, k_pattern, v_pattern, out_pattern, dims, to, back, identity)


def check_layout(tensors: tuple, q_pattern: str, k_pattern: str, v_pattern: str, out_pattern: str, dims) -> tuple:
    """q, k and v in ``b n s d``, raising what :func:`prepare` raises for bad patterns, dims, or
    tensors whose rank or sizes do not fit their patterns (each error names the argument), for
    entry points that do not prepare a call (flex attention)."""
    layout = compile_layout(q_pattern, k_pattern, v_pattern, out_pattern, _dims_tuple(dims))
    return tuple(_to_canonical(arg, pattern, to, t)
                 for arg, pattern, to, t in zip(("q", "k", "v"), (q_pattern, k_pattern, v_pattern), layout.to_canonical, tensors))


def _dims_tuple(dims) -> tuple:
    if dims is None:
        return ()
    if not isinstance(dims, Mapping):  # what einops' rearrange(**dims) takes, as DiffSynth-Studio calls it
        raise TypeError(f"dims must be a dict of axis lengths such as {{'n': 24}} (or another mapping), got {type(dims).__name__}")
    pairs = []
    for axis, length in dims.items():
        if not isinstance(axis, str):
            raise TypeError(f"dims keys must be axis names, got {axis!r}")
        if axis not in _AXES:
            raise ValueError(f"dims has an unknown axis {axis!r}; dims gives lengths of the axes b, n, s and d")
        n = dims_length(length)  # a NumPy integer as its int
        if n is None or n <= 0:
            raise ValueError(f"dims[{axis!r}]={length!r} must be a positive int")
        pairs.append((axis, n))
    return tuple(sorted(pairs))


def _check_tensor(arg: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{arg} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOATING:
        raise TypeError(f"{arg} has dtype {t.dtype}; attention needs a floating tensor (float16, bfloat16, float32 or float64)")


def _check_dense(arg: str, t: torch.Tensor, allow_meta: bool = False) -> None:
    if t.is_meta and not allow_meta:
        raise TypeError(f"{arg} is a meta tensor (it has no data); attention needs a tensor on a real device")
    if t.layout != torch.strided:
        raise TypeError(f"{arg} has layout {t.layout}; attention needs a dense (strided) tensor, e.g. {arg}.to_dense()")


def _to_canonical(arg: str, pattern: str, convert: Callable, t: torch.Tensor) -> torch.Tensor:
    groups = len(_parse_pattern(f"{arg[0]}_pattern", pattern))
    if t.dim() != groups:
        raise ValueError(f"{arg[0]}_pattern={pattern!r} has {groups} axes but {arg} has {t.dim()} dims (shape {tuple(t.shape)})")
    try:
        return convert(t)
    except (EinopsError, RuntimeError) as exc:
        message = str(exc).strip().splitlines()
        raise ValueError(
            f"{arg[0]}_pattern={pattern!r} does not fit {arg} of shape {tuple(t.shape)}: {message[-1] if message else exc}"
        ) from None


def _order(t: torch.Tensor) -> Optional[str]:
    """The memory order of a ``b n s d`` view: "bsnd" where heads are inner to the sequence
    (FlashAttention's native layout), "bnsd" where the sequence is inner; None where one of
    the two axes has length 1 (both orders are the same memory)."""
    if t.shape[1] == 1 or t.shape[2] == 1:
        return None
    return "bsnd" if t.stride(1) < t.stride(2) else "bnsd"


def _pattern_order(pattern: str) -> str:
    """The memory order a pattern implies for a contiguous tensor: "bsnd" where s comes before n."""
    flat = pattern.replace("(", " ").replace(")", " ").split()
    return "bsnd" if flat.index("s") < flat.index("n") else "bnsd"


def memory_order(patterns: tuple, views: tuple) -> Optional[str]:
    """The problem's ``memory`` field: None where every tensor lies in its pattern's own order
    (the common case, and every key made before the field existed), else each tensor's order."""
    orders = [_order(t) for t in views]
    if all(o is None or o == _pattern_order(p) for o, p in zip(orders, patterns)):
        return None
    return " ".join(f"{name}={o or _pattern_order(p)}" for name, o, p in zip("qkv", orders, patterns))


def _broadcasts(shape: tuple, target: tuple) -> bool:
    if len(shape) > len(target):
        return False
    for have, want in zip(reversed(shape), reversed(target)):
        if have != 1 and have != want:
            return False
    return True


def check_flag(value, name: str) -> bool:
    """``value`` as a bool where it is one, or the int 0 or 1 (what PyTorch's SDPA accepts for
    ``is_causal``); else a TypeError naming the argument. The one rule for eager and traced calls.
    (A bool first: under Dynamo a symbolic bool passes ``isinstance(value, bool)`` but not ``in (0, 1)``.)"""
    if isinstance(value, bool):
        return value
    if not isinstance(value, int) or value not in (0, 1):
        # a plain value as written; another object by its type (a tensor's repr is long, and a
        # fullgraph trace cannot make it, so the error would not name the argument); a NumPy type
        # with its module (np.True_'s type is named "bool"). No str methods: Dynamo traces this.
        t = type(value)
        got = repr(value) if value is None or isinstance(value, (str, int, float)) else \
            f"a numpy.{t.__name__}" if t.__module__ == "numpy" else f"a {t.__name__}"
        raise TypeError(f"{name} must be a bool, got {got}")
    return bool(value)

def prepare(
    q, k, v, q_pattern, k_pattern, v_pattern, out_pattern, dims, attn_mask, scale, is_causal, window_size, requires_grad,
    compatibility_mode=False, allow_meta: bool = False,
) -> Call:
    """Validate a call; return its :class:`Call` (with q, k, v as ``b n s d`` views).
    (``allow_meta``: the trace-time check under torch.compile validates meta stand-ins.)"""
    check_flag(compatibility_mode, "compatibility_mode")
    _check_tensor("q", q)
    _check_tensor("k", k)
    _check_tensor("v", v)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share a dtype; got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device; got q on {q.device}, k on {k.device}, v on {v.device}")
    for arg, t in (("q", q), ("k", k), ("v", v)):
        _check_dense(arg, t, allow_meta)
    layout = compile_layout(q_pattern, k_pattern, v_pattern, out_pattern, _dims_tuple(dims))
    qc = _to_canonical("q", q_pattern, layout.to_canonical[0], q)
    kc = _to_canonical("k", k_pattern, layout.to_canonical[1], k)
    vc = _to_canonical("v", v_pattern, layout.to_canonical[2], v)
    b, hq, sq, d = qc.shape
    bk, hk, skv, dk = kc.shape
    bv, hv, sv, dv = vc.shape
    if bk != b or bv != b:
        raise ValueError(f"batch sizes differ: q has {b}, k has {bk}, v has {bv}")
    if d != dk:
        raise ValueError(f"q and k must have the same head dim; q has {d}, k has {dk}")
    if hk != hv:
        raise ValueError(f"k and v must have the same number of heads; k has {hk}, v has {hv}")
    if skv != sv:
        raise ValueError(f"k and v must have the same sequence length; k has {skv}, v has {sv}")
    if hk and hq % hk != 0:  # no key heads: SDPA gives zeros for every query head
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hk}) for grouped-query attention")
    scale = scalar_scale(scale)  # a 0-dim tensor: its float, as SDPA reads it
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)):
        raise TypeError(f"scale must be a number or None, got {type(scale).__name__}")
    if scale is not None and not scale_number(scale):
        # a Real that PyTorch's argument parser refuses (fractions.Fraction): every backend would raise
        raise TypeError(f"scale must be a float, an int or a NumPy number, got {type(scale).__name__}")
    if scale is not None and not finite_scale(scale):
        raise ValueError(f"scale={scale!r} must be a finite number")
    for axis, length in _dims_tuple(dims):
        have = {"b": (b,), "n": (hq, hk), "s": (sq, skv), "d": (d, dv)}[axis]
        if length not in have:
            raise ValueError(f"dims[{axis!r}]={length} contradicts the tensors, whose {axis} is "
                             + " or ".join(str(x) for x in sorted(set(have))))
    check_flag(is_causal, "is_causal")
    if window_size is not None:
        if isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 0:
            raise ValueError(f"window_size={window_size!r} must be a non-negative int (a query attends to keys with |i - j| <= window_size)")
        if is_causal:
            raise ValueError("window_size cannot be combined with is_causal=True")
        if attn_mask is not None:
            raise ValueError("window_size cannot be combined with attn_mask")
        window_size = effective_window(window_size, sq, skv)
    mask_kind, mask_shape = MaskKind.NONE, None
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
        _check_dense("attn_mask", attn_mask, allow_meta)
        if attn_mask.dtype == torch.bool:
            mask_kind = MaskKind.BOOL
        elif attn_mask.dtype == q.dtype:
            mask_kind = MaskKind.ADDITIVE
        elif attn_mask.dtype == torch.float32:  # PyTorch's SDPA takes a float32 bias with any query dtype
            mask_kind = ADDITIVE_FLOAT32
        else:
            raise TypeError(f"attn_mask must be bool, float32 or of the query's dtype ({q.dtype}), as "
                            f"torch.nn.functional.scaled_dot_product_attention takes it; got {attn_mask.dtype}")
        if attn_mask.device != q.device:
            raise ValueError(f"attn_mask is on {attn_mask.device} but q is on {q.device}")
        target = (b, hq, sq, skv)
        if attn_mask.dim() < 2:  # PyTorch's SDPA (DiffSynth-Studio's torch path) refuses it (an IndexError)
            raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} has {attn_mask.dim()} dims; a mask has at least 2 "
                             f"(s_q, s_kv), as torch.nn.functional.scaled_dot_product_attention takes it")
        if not _broadcasts(tuple(attn_mask.shape), target):
            raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to (b, n, s_q, s_kv) = {target}")
        mask_shape = (1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)
    layout_text = layout.text
    memory = memory_order((q_pattern, k_pattern, v_pattern), (qc, kc, vc))
    tf32 = q.dtype == torch.float32 and q.device.type == "cuda" and bool(cublas_tf32())
    problem = Problem(
        batch=b, heads_q=hq, heads_kv=hk, seq_q=sq, seq_kv=skv, head_dim=d, head_dim_v=dv,
        dtype=q.dtype, device_type=q.device.type, layout=layout_text, mask=mask_kind, mask_shape=mask_shape,
        causal=bool(is_causal), window=window_size, requires_grad=bool(requires_grad), memory=memory, tf32=tf32,
        dense_last=qc.stride(-1) == 1 and kc.stride(-1) == 1 and vc.stride(-1) == 1,
    )
    return Call(problem, layout, None if scale is None else float(scale), 0 if attn_mask is None else attn_mask.dim(),
                q, k, v, attn_mask, (qc, kc, vc))


def prepare_request(req, grad: bool) -> Call:
    """:func:`prepare` of a :class:`~diffsynth_attention.request.Request` (``grad``: whether it needs gradients)."""
    return prepare(req.q, req.k, req.v, req.q_pattern, req.k_pattern, req.v_pattern, req.out_pattern, req.dims,
                   req.attn_mask, req.scale, req.is_causal, req.window_size, grad, compatibility_mode=req.compatibility_mode)


def effective_window(window: Optional[int], seq_q: int, seq_kv: int) -> Optional[int]:
    """``window`` as the problem holds it: None where every ``|i - j|`` is within it (no window,
    and no overflow downstream)."""
    return None if window is None or window >= max(seq_q, seq_kv) - 1 else window


def mask_4d(attn_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A mask viewed with 4 dims (broadcast dims of size 1 in front)."""
    if attn_mask is None or attn_mask.dim() == 4:
        return attn_mask
    return attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))


def readable_mask(attn_mask: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """The mask as every kernel reads it right for a query of ``dtype``: a float32 additive mask of
    a float64 query upcast (exact), since PyTorch's CPU flash kernel (SDPA's own choice) misreads
    it (relative error ~1 on torch 2.13); any other mask as it is."""
    if attn_mask is not None and attn_mask.dtype == torch.float32 and dtype == torch.float64:
        return attn_mask.to(torch.float64)
    return attn_mask


def additive_mask(attn_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True = attend) as an additive bias, the way SDPA converts it."""
    if attn_mask.dtype != torch.bool:
        return attn_mask
    return torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device).masked_fill_(~attn_mask, float("-inf"))
