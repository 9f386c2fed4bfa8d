"""A diffusers attention backend, ``diffsynth_auto``, served by this library's dispatcher.

After :func:`register` the name works wherever diffusers takes a backend name::

    from diffsynth_attention.integrations.diffusers import register
    register()                                    # before or after importing diffusers
    model.set_attention_backend("diffsynth_auto")
    with attention_backend("diffsynth_auto"): ...

``DIFFUSERS_ATTN_BACKEND=diffsynth_auto`` works too. diffusers reads that variable while its
``models/attention_dispatch.py`` is first imported, and refuses a name it does not know, so the
name must be registered by then: ``import diffsynth_attention`` (which, with the variable set,
calls :func:`register`) or call :func:`register` before importing diffusers. Called before
diffusers is imported, :func:`register` only installs an import hook (no diffusers import); the
hook registers the backend as soon as ``attention_dispatch`` is loaded.

diffusers keeps its registry private and keyed by an enum (``AttentionBackendName``): the name
is added as a member of that enum, the way other libraries (NVIDIA Model-Optimizer) add theirs.

Arguments map one to one: query, key and value stay in diffusers' ``b s n d`` layout (the
dispatcher's patterns are ``"b s n d"``, no transpose here); ``attn_mask`` is boolean or additive
as in ``native`` (a 2-d ``(batch, s_kv)`` mask is a key-padding mask, as ``native`` reads it);
``is_causal`` with PyTorch's top-left alignment; ``scale``; ``enable_gqa`` (grouped-query
attention needs it, as in ``native``); ``return_lse`` returns ``(out, lse)`` with the LSE as
``(b, s, n)`` float32 (:mod:`.lse`). ``dropout_p`` must be 0.

Context parallelism (``supports_context_parallel=True``): diffusers' templated Ulysses and ring
attention call this backend's forward and backward ops. Under Ulysses a rank's op sees the full
sequence and heads / N: that local problem is the key. Ring attention asks for the LSE: its key
is the LSE key (:mod:`.lse`), whose candidates are only the backends returning it.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import logging
import sys
import threading
from typing import Optional

from .. import process

logger = logging.getLogger("diffsynth_attention")

BACKEND_NAME = "diffsynth_auto"
_MEMBER_NAME = "DIFFSYNTH_AUTO"
_TARGET = "diffusers.models.attention_dispatch"
_lock = process.new_rlock()


class DiffusersNotSupportedError(RuntimeError):
    """The installed diffusers has no attention backend registry."""


def _diffusers_version() -> str:
    try:
        import importlib.metadata

        return importlib.metadata.version("diffusers")
    except Exception:
        return "unknown"


def _unsupported(detail: str) -> DiffusersNotSupportedError:
    return DiffusersNotSupportedError(
        f"diffusers {_diffusers_version()} has no attention backend registry ({detail}); the {BACKEND_NAME!r} backend "
        "needs a diffusers whose models/attention_dispatch.py has _AttentionBackendRegistry (upgrade: "
        "pip install -U diffusers). Without it, route diffusers' SDPA calls with diffsynth_attention.patch_sdpa()")


# -- the backend ----------------------------------------------------------------------------------
def _forward(query, key, value, attn_mask, is_causal, scale):
    from ..dispatch import default_dispatcher

    return default_dispatcher().forward(query, key, value, "b s n d", "b s n d", "b s n d", "b s n d", None, attn_mask,
                                        scale, is_causal)


def _native_mask(attn_mask, query, key):
    """``native``'s reading of a 2-d mask: ``(batch, s_kv)`` is a key-padding mask."""
    if attn_mask is not None and attn_mask.ndim == 2 and attn_mask.shape[0] == query.shape[0] \
            and attn_mask.shape[1] == key.shape[1]:
        return attn_mask[:, None, None, :]
    return attn_mask


def _check_args(query, key, value, attn_mask=None, dropout_p=0.0, enable_gqa=False, return_lse=False, **kwargs):
    """The backend's constraints (also run by diffusers when DIFFUSERS_ATTN_CHECKS is on)."""
    if dropout_p:
        raise ValueError(f"dropout_p={dropout_p}: the {BACKEND_NAME} attention backend has no dropout (use 'native')")
    if query.ndim != 4 or key.ndim != 4 or value.ndim != 4:
        raise ValueError(f"query, key and value must be 4-d (batch, seq, heads, head_dim); got {query.ndim}, "
                         f"{key.ndim} and {value.ndim} dims")
    if key.shape[2] != query.shape[2] and not enable_gqa:
        raise ValueError(f"query has {query.shape[2]} heads and key {key.shape[2]}: grouped-query attention needs "
                         "enable_gqa=True")
    if return_lse and attn_mask is not None:
        raise ValueError(f"return_lse=True with an attn_mask: the {BACKEND_NAME} backend returns the log-sum-exp "
                         "only for unmasked attention")


def diffsynth_auto_attention(query, key, value, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False,
                             scale: Optional[float] = None, enable_gqa: bool = False, return_lse: bool = False,
                             _parallel_config=None):
    """diffusers' backend function: q, k, v in ``b s n d``; the output in ``b s n d`` (and the
    LSE, ``b s n`` float32, with ``return_lse``)."""
    _check_args(query, key, value, attn_mask, dropout_p, enable_gqa, return_lse)
    attn_mask = _native_mask(attn_mask, query, key)
    if _parallel_config is not None:
        from diffusers.models.attention_dispatch import _templated_context_parallel_attention

        return _templated_context_parallel_attention(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                                     enable_gqa, return_lse, forward_op=_forward_op,
                                                     backward_op=_backward_op, _parallel_config=_parallel_config)
    if return_lse:
        from .lse import attention_with_lse

        return attention_with_lse(query, key, value, scale, is_causal)
    if query.is_meta or key.is_meta or value.is_meta:  # native's answer: SDPA runs meta tensors (shape
        return _meta_sdpa(query, key, value, attn_mask, is_causal, scale, enable_gqa)  # inference), attention_forward refuses them
    return _forward(query, key, value, attn_mask, is_causal, scale)


def _meta_sdpa(query, key, value, attn_mask, is_causal, scale, enable_gqa):
    """``native``'s call on meta tensors: PyTorch's own SDPA (never a patched one) in ``b n s d``."""
    from ..backends.torch_sdpa import _SDPA

    out = _SDPA(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask, is_causal=is_causal,
                scale=scale, enable_gqa=enable_gqa)
    return out.transpose(1, 2)


def _forward_op(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
                return_lse=False, _save_ctx=True, _parallel_config=None):
    """The forward op of diffusers' templated context parallelism, on a rank's local problem."""
    _check_args(query, key, value, attn_mask, dropout_p, enable_gqa, return_lse)
    if return_lse:
        from .lse import attention_with_lse

        out, lse = attention_with_lse(query, key, value, scale, is_causal)
    else:
        out, lse = _forward(query, key, value, _native_mask(attn_mask, query, key), is_causal, scale), None
    if _save_ctx:
        ctx.save_for_backward(query, key, value, *(() if lse is None else (out, lse)))  # out and LSE: ring only
        ctx.ds_mask, ctx.ds_causal, ctx.ds_scale = attn_mask, is_causal, scale
    return (out, lse) if return_lse else out


def _backward_op(ctx, grad_out, *args, query=None, key=None, value=None, out=None, lse=None, **kwargs):
    """Gradients of the local problem. Ring attention passes each key chunk with the merged
    output and LSE: exact gradients from them (:func:`.lse.lse_backward`). Ulysses passes nothing:
    the forward is recomputed through the dispatcher with autograd (its backward-capable choice)."""
    import torch

    saved = ctx.saved_tensors
    query = saved[0] if query is None else query
    key = saved[1] if key is None else key
    value = saved[2] if value is None else value
    if lse is None and len(saved) > 3:
        lse = saved[4]
    if lse is not None:
        from .lse import lse_backward

        out = saved[3] if out is None else out
        return lse_backward(grad_out, query, key, value, out, lse, ctx.ds_scale, ctx.ds_causal)
    q, k, v = (x.detach().requires_grad_(True) for x in (query, key, value))
    with torch.enable_grad():
        res = _forward(q, k, v, _native_mask(ctx.ds_mask, q, k), ctx.ds_causal, ctx.ds_scale)
        return torch.autograd.grad(res, (q, k, v), grad_out)


# -- registration ---------------------------------------------------------------------------------
def _add_member(enum_cls, name: str):
    """``enum_cls(name)``: an existing member, or a new one added to the (str) enum."""
    try:
        return enum_cls(name)
    except ValueError:
        pass
    member = str.__new__(enum_cls, name)
    member._name_ = _MEMBER_NAME
    member._value_ = name
    member._sort_order_ = len(enum_cls._member_names_)
    member.__objclass__ = enum_cls
    type.__setattr__(enum_cls, _MEMBER_NAME, member)
    enum_cls._member_map_[_MEMBER_NAME] = member
    enum_cls._value2member_map_[name] = member
    enum_cls._member_names_.append(_MEMBER_NAME)
    return member


def _register_into(module, activate: bool = False):
    from ..dispatch import default_dispatcher

    default_dispatcher()  # made now, before a compiled model's trace reaches the backend
    registry = getattr(module, "_AttentionBackendRegistry", None)
    names = getattr(module, "AttentionBackendName", None)
    if registry is None or names is None or not hasattr(registry, "register"):
        raise _unsupported("models/attention_dispatch.py has no _AttentionBackendRegistry")
    import inspect

    member = _add_member(names, BACKEND_NAME)
    constraints = [_check_args]
    for check in ("_check_device", "_check_shape"):  # native's own checks, where this version has them
        if callable(getattr(module, check, None)):
            constraints.insert(0, getattr(module, check))
    options = {"constraints": constraints}
    if "supports_context_parallel" in inspect.signature(registry.register).parameters:
        options["supports_context_parallel"] = True
    else:
        logger.info("diffusers %s has no context parallelism: %s registered without it", _diffusers_version(),
                    BACKEND_NAME)
    if registry._backends.get(member) is not diffsynth_auto_attention:
        registry.register(member, **options)(diffsynth_auto_attention)
    if activate:
        registry.set_active_backend(member)
    return member


class _Loader(importlib.abc.Loader):
    """Wraps attention_dispatch's loader: diffusers reads DIFFUSERS_ATTN_BACKEND while the module
    runs and rejects an unknown name, so it reads ``native`` then, and the backend is registered
    and made active right after."""

    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        constants = importlib.import_module("diffusers.utils.constants")
        wanted = getattr(constants, "DIFFUSERS_ATTN_BACKEND", None)
        ours = isinstance(wanted, str) and wanted == BACKEND_NAME
        if ours:
            constants.DIFFUSERS_ATTN_BACKEND = "native"
        try:
            self.inner.exec_module(module)
        finally:
            if ours:
                constants.DIFFUSERS_ATTN_BACKEND = wanted
        try:
            _register_into(module, activate=ours or _pending["activate"])
        except DiffusersNotSupportedError as exc:
            logger.warning("%s", exc)

    def __getattr__(self, name):
        return getattr(self.inner, name)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        _remove_hook()
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


_hook: Optional[_Finder] = None
_pending = {"activate": False}


def _has_dispatch_file(diffusers_paths) -> bool:
    import os

    return any(os.path.isfile(os.path.join(p, "models", "attention_dispatch.py")) for p in diffusers_paths)


def _remove_hook() -> None:
    global _hook
    with _lock:
        if _hook is not None and _hook in sys.meta_path:
            sys.meta_path.remove(_hook)
        _hook = None


def register(activate: bool = False) -> str:
    """Register ``diffsynth_auto`` as a diffusers attention backend; returns the name.

    diffusers already imported: registered now (``activate=True`` also makes it the active
    backend, as ``DIFFUSERS_ATTN_BACKEND`` would). Not imported yet: an import hook registers it
    when diffusers loads its attention dispatcher, honouring ``DIFFUSERS_ATTN_BACKEND``. Raises
    :class:`DiffusersNotSupportedError`, naming the version, when the installed diffusers has no
    attention backend registry. Idempotent."""
    global _hook
    with _lock:
        module = sys.modules.get(_TARGET)
        if module is not None:
            _register_into(module, activate=activate)
            return BACKEND_NAME
        import importlib.util

        try:
            spec = sys.modules["diffusers"].__spec__ if "diffusers" in sys.modules else importlib.util.find_spec("diffusers")
        except (ImportError, ValueError, AttributeError):
            spec = None
        if spec is None:
            raise DiffusersNotSupportedError(f"diffusers is not installed (pip install diffusers); the {BACKEND_NAME!r} "
                                             "backend registers into diffusers' attention dispatcher")
        if not _has_dispatch_file(spec.submodule_search_locations or ()):
            raise _unsupported(f"no {_TARGET}")
        if _hook is None:  # attention_dispatch not loaded yet: register when it is (it reads DIFFUSERS_ATTN_BACKEND then)
            _hook = _Finder()
            sys.meta_path.insert(0, _hook)
        if activate:
            _pending["activate"] = True
        return BACKEND_NAME


def register_from_environment() -> bool:
    """``import diffsynth_attention`` calls this: with DIFFUSERS_ATTN_BACKEND=diffsynth_auto and
    diffusers installed, registers the backend (an import hook when diffusers is not imported yet)."""
    import os

    if os.environ.get("DIFFUSERS_ATTN_BACKEND", "") != BACKEND_NAME:
        return False
    try:
        register()
    except DiffusersNotSupportedError as exc:
        logger.warning("DIFFUSERS_ATTN_BACKEND=%s: %s", BACKEND_NAME, exc)
        return False
    return True


__all__ = ["BACKEND_NAME", "DiffusersNotSupportedError", "diffsynth_auto_attention", "register"]


def set_quality(module, tier: Optional[str]):
    """Serve every attention call made inside ``module``'s forward (a diffusers ``Attention``, a
    transformer block, a whole model) at quality ``tier`` (``exact``, ``balanced``, ``fast``; None
    removes an earlier setting). A forward pre-hook opens the :func:`~diffsynth_attention.tiers.quality`
    scope and a forward hook closes it, on this module only. Returns the module. Eager forwards
    (a ``torch.compile``d model: open ``quality(...)`` around the compiled call instead)."""
    import torch

    from .. import tiers

    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"set_quality(module) must be a torch.nn.Module, got {type(module).__name__}")
    value = None if tier is None else tiers.check_tier(tier, "set_quality(tier)")  # before the old setting goes
    old = getattr(module, "_diffsynth_quality_hooks", None)
    if old is not None:
        for handle in old:
            handle.remove()
        module._diffsynth_quality_hooks = None
    if value is None:
        return module
    local = threading.local()  # each thread's own tokens: threads may run the module's forward at once

    def pre(_module, _args):
        local.__dict__.setdefault("tokens", []).append(tiers.enter(value))

    def post(_module, _args, _out):
        tokens = local.__dict__.get("tokens")
        if tokens:
            tiers.leave(tokens.pop())
    module._diffsynth_quality_hooks = (module.register_forward_pre_hook(pre),
                                       module.register_forward_hook(post, always_call=True))
    return module
