"""One-line integration: route DiffSynth-Studio's and PyTorch's attention through this library.

- :func:`patch_diffsynth` replaces ``diffsynth.core.attention.attention_forward`` (and every
  imported DiffSynth module's reference to it) and the Wan DiT's own ``flash_attention``
  helper.
- :func:`patch_sdpa` routes ``torch.nn.functional.scaled_dot_product_attention`` calls. As a
  context manager it routes only in its own thread / async task (a contextvar), so one
  model's switch never leaks into another's; called plainly it is a process-wide switch.

Both return a handle whose ``undo()`` restores what was there.
"""

from __future__ import annotations

import contextvars
import functools
import importlib
import logging
import sys
from typing import Optional

import torch
import torch.nn.functional as F

from .. import config, process
from ..backends import headless
from ..callsite import dynamo_tracing as _dynamo_tracing
from ..dispatch import default_dispatcher
from ..request import FLOAT_MAX

logger = logging.getLogger("diffsynth_attention")


# --------------------------------------------------------------------------------------------
# SDPA
# --------------------------------------------------------------------------------------------
_ORIGINAL_SDPA = F.scaled_dot_product_attention
_route_scope: contextvars.ContextVar = contextvars.ContextVar("diffsynth_attention_sdpa", default=False)
_state_lock = process.new_lock()
_forward = default_dispatcher().forward


class _Routing:
    """Who routes SDPA now, as plain counters that Dynamo can read and guard on (it cannot read
    a contextvar or take a lock): ``process`` handles, ``scoped`` open ``with`` blocks (the
    contextvar says which thread/task each belongs to), ``traced`` ``with`` blocks open inside
    the function being traced, and how many users need the wrapper ``installed``."""

    def __init__(self) -> None:
        self.process = 0
        self.scoped = 0
        self.traced = 0
        self.installed = 0


_ROUTE = _Routing()


def math_only() -> bool:
    """Whether SDPA is restricted to its math kernel (``sdpa_kernel(SDPBackend.MATH)``, or its fused
    kernels switched off): a request for what only that kernel gives (double backward, forward-mode
    AD, its exact arithmetic), so such calls stay PyTorch's. One C call in the common case."""
    return not _flash_sdp() and not _efficient_sdp() and not _cudnn_sdp() and _math_sdp()


_flash_sdp, _efficient_sdp, _cudnn_sdp, _math_sdp = (
    getattr(torch._C, f"_get_{name}_sdp_enabled", lambda: True) for name in ("flash", "mem_efficient", "cudnn", "math"))


def routable(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> bool:
    """Whether :func:`patch_sdpa` routes an SDPA call with these arguments to the dispatcher (the
    rest go to PyTorch's own SDPA unchanged)."""
    if dropout_p != 0.0 or math_only():
        return False
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (query, key, value)):
        return False
    if query.shape[1] != key.shape[1] and not enable_gqa:
        return False  # SDPA itself raises for this; let it
    # SDPA broadcasts batch sizes and value heads of 1 and returns an empty output for an empty
    # input, where attention_forward (DiffSynth's meaning) refuses them: SDPA's own calls
    if query.shape[0] != key.shape[0] or key.shape[0] != value.shape[0] or key.shape[1] != value.shape[1] \
            or query.numel() == 0 or key.numel() == 0 or value.numel() == 0:
        return False
    if attn_mask is not None and (not isinstance(attn_mask, torch.Tensor) or attn_mask.dim() < 2
                                  or attn_mask.dtype not in (torch.bool, query.dtype, torch.float32)):
        return False  # SDPA's own error for a mask of 0 or 1 dims (an IndexError)
    # SDPA runs meta tensors (shape inference: an output with no data), which attention_forward refuses
    if query.is_meta or key.is_meta or value.is_meta or attn_mask is not None and attn_mask.is_meta:
        return False
    if attn_mask is not None and is_causal:
        return False  # SDPA rejects this combination; keep its error
    if not isinstance(is_causal, bool):
        return False
    # SDPA reads scale=True as 1.0 and runs a NaN or infinite scale (its output NaN), where
    # attention_forward refuses both
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not -FLOAT_MAX <= scale <= FLOAT_MAX):
        return False
    return True


@functools.wraps(_ORIGINAL_SDPA)
def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None,
                                 enable_gqa=False):
    """``torch.nn.functional.scaled_dot_product_attention`` with the same signature (``scale`` and
    ``enable_gqa`` keyword-only, as there) and meaning; routed through ``attention_forward`` where patched, else PyTorch's own."""
    # Under torch.compile routing follows the process-wide counters (a graph traced inside a
    # `with patch_sdpa():` block around the call, or inside the traced function, routes; Dynamo
    # guards on the counters, so such a graph is not used once routing is off).
    if _dynamo_tracing():
        routed = _ROUTE.process > 0 or _ROUTE.scoped > 0 or _ROUTE.traced > 0
    else:
        routed = _ROUTE.process > 0 or (_ROUTE.scoped > 0 and _route_scope.get())
    if routed and routable(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
        return _forward(query, key, value, attn_mask=attn_mask, scale=scale, is_causal=is_causal)
    if headless.serves(query, key, value, attn_mask, is_causal, enable_gqa):  # SDPA's kernels die of SIGFPE on some
        return headless.attend(query, key, value, attn_mask)
    return _ORIGINAL_SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)


def _install() -> None:
    with _state_lock:
        _ROUTE.installed += 1
        F.scaled_dot_product_attention = scaled_dot_product_attention


def _uninstall() -> None:
    with _state_lock:
        _ROUTE.installed = max(0, _ROUTE.installed - 1)
        if _ROUTE.installed == 0 and F.scaled_dot_product_attention is scaled_dot_product_attention:
            F.scaled_dot_product_attention = _ORIGINAL_SDPA


class SDPAPatch:
    """Returned by :func:`patch_sdpa`: already active process-wide, or scoped with ``with``.

    Inside a function being compiled, ``with patch_sdpa():`` routes the SDPA calls of its block
    in that graph (no lock, no contextvar: Dynamo traces it); the wrapper it puts in front of
    ``F.scaled_dot_product_attention`` stays there for the process (it passes unrouted calls
    to PyTorch's own)."""

    def __init__(self) -> None:
        self._global = False
        self._tokens: list = []
        self._traced = 0

    def _enable_global(self) -> "SDPAPatch":
        _install()
        with _state_lock:
            _ROUTE.process += 1
        self._global = True
        return self

    def undo(self) -> None:
        """Switch this handle's routing off (and take the wrapper out once nothing routes)."""
        if self._global:
            self._global = False
            with _state_lock:
                _ROUTE.process -= 1
            _uninstall()

    def __enter__(self) -> "SDPAPatch":
        if _dynamo_tracing():
            F.scaled_dot_product_attention = scaled_dot_product_attention
            _ROUTE.traced += 1
            self._traced += 1
            return self
        # A `with patch_sdpa():` block is scoped: drop the process-wide switch just taken.
        self.undo()
        _install()
        with _state_lock:
            _ROUTE.scoped += 1
        self._tokens.append(_route_scope.set(True))
        return self

    def __exit__(self, *exc) -> None:
        if _dynamo_tracing():
            _ROUTE.traced -= 1
            self._traced -= 1
            return
        _route_scope.reset(self._tokens.pop())
        with _state_lock:
            _ROUTE.scoped -= 1
        _uninstall()

    @property
    def active(self) -> bool:
        return self._global or bool(self._tokens) or self._traced > 0


def patch_sdpa() -> SDPAPatch:
    """Route ``torch.nn.functional.scaled_dot_product_attention`` through the dispatcher.

    ``handle = patch_sdpa()`` switches it on for the process until ``handle.undo()``;
    ``with patch_sdpa():`` switches it on for the block, in this thread / task only (around a
    compiled call, or inside a compiled function: there, for the graph). Calls with dropout, or
    arguments the dispatcher does not handle, go to PyTorch unchanged.
    """
    if _dynamo_tracing():  # inside a traced function: only the `with` form routes (see SDPAPatch)
        return SDPAPatch()
    config.validate_all()
    return SDPAPatch()._enable_global()


# --------------------------------------------------------------------------------------------
# DiffSynth-Studio
# --------------------------------------------------------------------------------------------
def _make_diffsynth_attention_forward(original):
    attention_forward = default_dispatcher().forward

    @functools.wraps(original)
    def diffsynth_attention_forward(q, k, v, q_pattern="b n s d", k_pattern="b n s d", v_pattern="b n s d", out_pattern="b n s d",
                                    dims=None, attn_mask=None, scale=None, is_causal=False, compatibility_mode=False,
                                    window_size=None, use_flex=False, score_mod=None):
        if use_flex or score_mod is not None:  # DiffSynth's meaning: PyTorch's flex attention
            from .. import flex

            return flex.flex_attention_forward(q, k, v, q_pattern, k_pattern, v_pattern, out_pattern, dims,
                                               attn_mask=attn_mask, scale=scale, is_causal=is_causal,
                                               window_size=window_size, score_mod=score_mod)
        return attention_forward(q, k, v, q_pattern, k_pattern, v_pattern, out_pattern, dims, attn_mask, scale,
                                 is_causal, compatibility_mode, window_size)

    diffsynth_attention_forward.__diffsynth_attention_original__ = original
    return diffsynth_attention_forward


def _make_wan_flash_attention(original):
    attention_forward = default_dispatcher().forward

    @functools.wraps(original)
    def flash_attention(q, k, v, num_heads: int, compatibility_mode=False):
        pattern = "b s (n d)"
        return attention_forward(q, k, v, pattern, pattern, pattern, pattern, dims={"n": num_heads},
                                 compatibility_mode=compatibility_mode)

    flash_attention.__diffsynth_attention_original__ = original
    return flash_attention


def _holders(value, prefix: str) -> list:
    """(module, attribute) for every attribute of a loaded ``prefix`` module that is ``value``."""
    found = []
    for name, module in list(sys.modules.items()):
        if module is None or not (name == prefix or name.startswith(prefix + ".")):
            continue
        found.extend((module, attr) for attr, v in list(vars(module).items()) if v is value)
    return found


class DiffSynthPatch:
    """Returned by :func:`patch_diffsynth`; ``undo()`` restores every replaced attribute."""

    def __init__(self) -> None:
        self.replaced: list = []  # (module, attribute, original)
        self.swaps: list = []  # (original, replacement, prefix): each swap, for modules imported after it
        self.usp: Optional[str] = None  # "routed", or why DiffSynth's USP attention is not

    def _swap_everywhere(self, original, replacement, prefix: str = "diffsynth") -> None:
        self.swaps.append((original, replacement, prefix))
        for module, attr in _holders(original, prefix):
            setattr(module, attr, replacement)
            self.replaced.append((module, attr, original))

    def undo(self) -> None:
        for module, attr, original in reversed(self.replaced):
            setattr(module, attr, original)
        self.replaced.clear()
        # a module imported after the patch (DiffSynth imports a model's module as a pipeline loads
        # it) took the replacement with `from ... import attention_forward`: it gets the original too
        for original, replacement, prefix in reversed(self.swaps):
            for module, attr in _holders(replacement, prefix):
                setattr(module, attr, original)
        self.swaps.clear()

    def __enter__(self) -> "DiffSynthPatch":
        return self

    def __exit__(self, *exc) -> None:
        self.undo()


# torch's companion packages, each built for one torch release (its wheel pins ``torch==X``).
_TORCH_BUILDS = ("torchvision", "torchaudio")


def _build_mismatch(exc: BaseException) -> Optional[str]:
    """Why importing DiffSynth failed where the cause is a torchvision (or torchaudio) built for
    another torch (e.g. ``operator torchvision::nms does not exist``), else None."""
    import importlib.metadata
    import re
    import traceback

    where = str(exc) + "".join(f.filename for f in traceback.extract_tb(exc.__traceback__))
    for dist in _TORCH_BUILDS:
        if dist not in where:
            continue
        try:
            version = importlib.metadata.version(dist)
            pins = [re.match(r"torch\s*==\s*([\w.+]+)", r) for r in importlib.metadata.requires(dist) or []]
        except importlib.metadata.PackageNotFoundError:
            continue
        built_for = next((m.group(1) for m in pins if m), None)
        here = torch.__version__
        if built_for is not None and built_for.split("+")[0] != here.split("+")[0]:
            return (f"{dist} {version} was built for torch {built_for}, but torch {here} is installed: the builds do "
                    f"not match; install the {dist} built for torch {here.split('+')[0]}, from the index torch came "
                    f"from (e.g. pip install {dist} --index-url <that index>)")
        if built_for is None and re.search(r"operator \w+::\w+ does not exist|undefined symbol", str(exc)):
            return (f"{dist} {version} does not match torch {here} (its compiled operators failed to load: "
                    f"{str(exc).strip().splitlines()[0]}): the builds do not match; install the {dist} built for "
                    f"this torch, from the index torch came from")
    return None


def _import_failure(exc: BaseException) -> str:
    """What went wrong importing DiffSynth-Studio, in the user's terms: DiffSynth itself missing,
    one of its own dependencies (e.g. torchvision after a ``--no-deps`` install), or a torchvision
    built for another torch."""
    import importlib.util

    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    mismatch = _build_mismatch(exc)
    if mismatch is not None:
        return f"DiffSynth-Studio is installed, but importing it failed: {mismatch}"
    missing = getattr(exc, "name", None) if isinstance(exc, ModuleNotFoundError) else None
    if missing is not None and missing.split(".")[0] == "diffsynth" and importlib.util.find_spec("diffsynth") is None:
        return "patch_diffsynth needs DiffSynth-Studio, which is not installed (pip install diffsynth)"
    if missing is not None and missing.split(".")[0] != "diffsynth":
        return (f"DiffSynth-Studio is installed, but importing it failed: its dependency {missing.split('.')[0]!r} "
                f"is missing ({type(exc).__name__}: {first}); install it, e.g. pip install {missing.split('.')[0]}")
    return f"DiffSynth-Studio is installed, but importing it failed with {type(exc).__name__}: {first}"


def patch_diffsynth(wan: bool = True, usp: bool = True) -> DiffSynthPatch:
    """Route DiffSynth-Studio's ``attention_forward`` (and, with ``wan``, the Wan DiT's
    ``flash_attention`` helper) through this library's dispatcher. Needs DiffSynth-Studio.
    With ``usp``, the local attention of DiffSynth's USP path too, when xfuser and yunchang are
    installed (:mod:`.usp`); the handle's ``usp`` says ``"routed"`` or why not."""
    config.validate_all()  # a bad environment variable stops the pipeline here, not at its first call
    try:
        module = importlib.import_module("diffsynth.core.attention.attention")
    except Exception as exc:
        raise ImportError(_import_failure(exc)) from exc
    patch = DiffSynthPatch()
    original = getattr(module.attention_forward, "__diffsynth_attention_original__", None)
    if original is None:
        original = module.attention_forward
        patch._swap_everywhere(original, _make_diffsynth_attention_forward(original))
    if wan:
        wan_module: Optional[object] = sys.modules.get("diffsynth.models.wan_video_dit")
        if wan_module is None:
            try:
                wan_module = importlib.import_module("diffsynth.models.wan_video_dit")
            except Exception as exc:
                logger.info("patch_diffsynth: Wan DiT not patched (import failed: %s)", exc)
        helper = getattr(wan_module, "flash_attention", None) if wan_module is not None else None
        if helper is not None and not hasattr(helper, "__diffsynth_attention_original__"):
            patch._swap_everywhere(helper, _make_wan_flash_attention(helper))
    if usp:
        from .usp import patch_usp

        patch.usp = patch_usp(patch)
    return patch
