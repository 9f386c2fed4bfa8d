"""The short questions a call site asks, each answered in one place: is Dynamo tracing, is a CUDA
graph being captured, does this call need gradients, how does a tensor move from one einops
pattern to another, and what is a dtype's name.

They are one-liners, and they were written out at every call site that needed them; a rule that
changes (a torch without ``torch.compiler``, a mask whose gradient counts) now changes here.
``is_compiling`` is torch's own function, not a wrapper, so that Dynamo, which special-cases it,
still reads it as a constant while tracing, and the hot path pays no extra frame.
"""

from __future__ import annotations

import contextlib
import functools
import operator
import threading
from typing import Callable

import torch
from einops import rearrange

is_compiling: Callable[[], bool] = getattr(getattr(torch, "compiler", None), "is_compiling", None) or (lambda: False)
# Whether Dynamo traces the calling code (folded to True there, False anywhere else). Where a scope
# or a patch opens inside a traced function, is_compiling() will not do: on torch 2.13 it is a
# process-wide flag held for a whole compile session, so it is True in every thread while any one
# compiles, and an eager use_backend or patch_sdpa there took the traced-block path.
dynamo_tracing: Callable[[], bool] = getattr(getattr(torch, "compiler", None), "is_dynamo_compiling", None) or is_compiling
_grad_enabled = torch.is_grad_enabled
_capturing = torch.cuda.is_current_stream_capturing


def capturing(device_type: str) -> bool:
    """Whether a CUDA graph is being captured on the current stream (never on another device type)."""
    return device_type == "cuda" and _capturing()


# torch.export's trace (strict and non-strict: in the non-strict one Dynamo does not trace the code)
is_exporting: Callable[[], bool] = getattr(getattr(torch, "compiler", None), "is_exporting", None) or (lambda: False)
_building = threading.local()  # .depth: how many building_graph() blocks this thread is in


def tracing() -> bool:
    """Whether the calling code is being traced into a graph: by Dynamo, or by torch.export."""
    return dynamo_tracing() or is_exporting()


@contextlib.contextmanager
def building_graph():
    """Marks this thread as planning for a graph being built: the trace-time bakes
    (dispatch/baked.py, integrations/lse.py), which Dynamo runs for real (assume_constant_result),
    so that dynamo_tracing() is False inside them. Per thread: another thread's eager calls meanwhile
    are eager (is_compiling() would say otherwise on torch 2.13, process-wide)."""
    _building.depth = getattr(_building, "depth", 0) + 1
    try:
        yield
    finally:
        _building.depth -= 1


def in_graph(device_type: str) -> bool:
    """Whether the code runs inside a graph being built, in this thread: traced by Dynamo or by
    torch.export, planned by a trace-time bake (:func:`building_graph`), or captured into a CUDA
    graph. Nothing may tune, wait for a kernel package or synchronise there. Not is_compiling():
    on torch 2.13 a process-wide flag held for a whole compile session, so while any thread
    compiled, every other thread's eager calls neither tuned nor served a loading stand-in."""
    return dynamo_tracing() or is_exporting() or getattr(_building, "depth", 0) > 0 or capturing(device_type)


_interpreters = getattr(getattr(torch._C, "_functorch", None), "peek_interpreter_stack", None)


def transforming() -> bool:
    """Whether a ``torch.func`` transform (grad, vmap, jacrev, functional_call's grad...) is running
    in this thread: its tensors are wrapped, and it forbids what tuning does (``requires_grad_``, a
    tensor's value in Python). A call there runs its decision or, undecided, PyTorch's SDPA (which
    every transform takes); the first call outside a transform tunes."""
    return _interpreters is not None and _interpreters() is not None


def keep_rng(device: torch.device):
    """A block whose random draws (a tuning's gradient of the output, random stand-ins for a
    non-finite call or a trace, a failure's fresh inputs) leave the caller's random stream as it
    was: the CPU generator's state, and ``device``'s where it is a CUDA device, restored after it.
    PyTorch's SDPA draws nothing (no dropout), so a pipeline's later draws (noise, dropout) must not
    depend on whether this call tuned, i.e. on whether the cache was warm."""
    devices = [device] if getattr(device, "type", None) == "cuda" else []
    return torch.random.fork_rng(devices=devices)


def needs_grad(q, k, v, mask=None) -> bool:
    """Whether a call needs gradients: grad mode is on and q, k or v requires them, or ``mask`` does
    (a learned additive bias; callers that differentiate q, k and v only pass no mask)."""
    return _grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad
                                or mask is not None and mask.requires_grad)


# One C call, False unless some torch.autocast region is open (Dynamo folds it to a constant)
any_autocast: Callable[[], bool] = getattr(torch._C, "_is_any_autocast_enabled", None) or (lambda: False)


def autocast_inputs(q, k, v, mask):
    """Inside a ``torch.autocast`` region on q's device type: ``(device_type, q, k, v, mask)`` cast as
    autocast casts the arguments of PyTorch's SDPA (which it runs in lower precision): each floating
    tensor on that device type that is not float64 to the region's dtype, a bool mask as it is. The
    call then runs in that dtype, with autocast off (as autocast runs SDPA's kernel), so that its
    result is in the dtype SDPA's, and DiffSynth-Studio's, is, whichever backend serves it. None
    where autocast is off there, or where q is no tensor (validation says what is wrong)."""
    if not isinstance(q, torch.Tensor):
        return None
    device_type = q.device.type
    try:
        if not torch.is_autocast_enabled(device_type):
            return None
        low = torch.get_autocast_dtype(device_type)
    except RuntimeError:  # a device type autocast does not know (meta)
        return None

    def cast(t):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64 \
                and t.device.type == device_type:
            return t.to(low)
        return t
    return device_type, cast(q), cast(k), cast(v), cast(mask)


def dtype_name(dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``: how keys, tolerances and messages name a dtype."""
    return str(dtype).replace("torch.", "")


def _identity(x):
    return x


def _converter(source: str, target: str, dims: tuple = ()) -> Callable:
    """A function taking a tensor laid out as einops pattern ``source`` to a view (or, for packed
    axes that cannot be viewed, a copy) laid out as ``target``: itself when the patterns agree, a
    ``permute`` when neither packs axes (``"b s n d" -> "b n s d"``), else what einops'
    ``rearrange`` does with the axis lengths of ``dims`` (``(axis, length)`` pairs, as
    ``"b s (n d)"`` needs), as ``unflatten``, ``permute`` and ``flatten`` calls decided here once
    (:func:`_regrouper`: DiffSynth-Studio's ``"b s (n d)"`` calls paid ~5.6 us a tensor in
    ``rearrange`` on every hit, ~3 us this way on the same CPU). Patterns are not validated here
    (:mod:`diffsynth_attention.problem` does that, naming the argument)."""
    if source.split() == target.split():
        return _identity
    if "(" not in source and "(" not in target:
        src = source.split()
        return _reorder(tuple(src.index(a) for a in target.split()))
    expr, lengths = f"{source} -> {target}", dict(dims)
    return _regrouper(source, target, lengths) or (lambda x: rearrange(x, expr, **lengths))


def _reorder(perm: tuple) -> Callable:
    """``x.permute(perm)``, as ``x.transpose(i, j)`` where ``perm`` swaps two axes (``b s n d`` to
    ``b n s d``): ``transpose`` costs ~0.5 us less a tensor than ``permute`` on the 2-core CPU
    (1.30 against 1.86 us)."""
    moved = [i for i, p in enumerate(perm) if p != i]
    if len(moved) == 2:
        i, j, n = moved[0], moved[1], len(perm)
        # permute refuses a tensor of another rank; transpose would not: that tensor takes permute's error
        return lambda x: x.transpose(i, j) if x.dim() == n else x.permute(perm)
    return operator.methodcaller("permute", perm)


def _regrouper(source: str, target: str, lengths: dict):
    """``rearrange(x, f"{source} -> {target}", **lengths)`` for patterns whose axes each appear
    once on both sides (groups split by ``unflatten``, reordered by ``permute``, packed by
    ``flatten``: views where ``rearrange``'s reshape gives views, copies where it copies); None
    for anything else (einops then does it, and raises its own errors)."""
    try:
        from einops.parsing import ParsedExpression

        src = [tuple(g) for g in ParsedExpression(source).composition]
        tgt = [tuple(g) for g in ParsedExpression(target).composition]
    except Exception:  # noqa: BLE001 - einops' errors for a bad pattern: rearrange raises them
        return None
    src_axes = [a for g in src for a in g]
    tgt_axes = [a for g in tgt for a in g]
    if not all(isinstance(a, str) for a in src_axes + tgt_axes) or sorted(src_axes) != sorted(tgt_axes) \
            or len(set(src_axes)) != len(src_axes) or any(len(g) == 0 for g in src + tgt):
        return None
    splits = [(i, tuple(int(lengths.get(a, -1)) for a in g)) for i, g in enumerate(src) if len(g) > 1]
    if any(sizes.count(-1) > 1 for _, sizes in splits):
        return None
    splits.reverse()  # the last group first: the dims before it keep their index
    perm = tuple(src_axes.index(a) for a in tgt_axes)
    reorder = None if perm == tuple(range(len(perm))) else _reorder(perm)
    merges, start = [], 0
    for g in tgt:
        if len(g) > 1:
            merges.append((start, start + len(g) - 1))
        start += len(g)
    merges.reverse()

    def regroup(x):
        for i, sizes in splits:
            x = x.unflatten(i, sizes)
        if reorder is not None:
            x = reorder(x)
        for first, last in merges:
            x = x.flatten(first, last)
        return x
    return regroup


converter = functools.lru_cache(maxsize=512)(_converter)  # built once per patterns (plans, layouts)


def convert(x, source: str, target: str, dims=None):
    """``x`` from pattern ``source`` to ``target`` (:func:`converter`, not cached: Dynamo traces
    it plainly); ``dims``: a dict of axis lengths."""
    return _converter(source, target, tuple(dims.items()) if dims else ())(x)
