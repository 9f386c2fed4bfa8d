"""Run-time failures of a backend: what they say about the backend, and what they do not.

A failure changes the decision on disk (which every process of the user reads) only when it is
the backend's: the call failed, failed again on a retry with the same inputs, and failed on
:data:`FRESH_TRIALS` calls with fresh random inputs of the same shapes. A failure that passes
on fresh inputs is tied to the inputs (or to the moment) and drops the backend for its key in
this process only.

A CUDA error that poisons the context (an illegal address, a device-side assert, a launch
failure: "sticky" errors) says nothing about the backend: every later CUDA call of the process
fails the same way, whatever runs it. Then nothing is retried, no decision changes, and the
error is raised as PyTorch raised it, after one log line that says so.
"""

from __future__ import annotations

import dataclasses

import logging
from typing import Callable

import torch

from .. import config
from ..backends import REGISTRY
from ..callsite import keep_rng
from ..problem import prepare_request
from ..states import PlanSource
from ..store.decision import CHOSEN, REJECTED
from .plan import BackendNotSupportedError, Plan, _first_line
from .runners import make_runner

logger = logging.getLogger("diffsynth_attention")

FRESH_TRIALS = 2  # calls on fresh inputs that must fail too before a decision on disk changes

# The messages of CUDA's sticky errors (cudaError_t descriptions): after one of them the context
# is unusable and the process must exit (CUDA Runtime API, "Error Handling").
STICKY_CUDA_ERRORS = (
    "illegal memory access",
    "device-side assert",
    "unspecified launch failure",
    "misaligned address",
    "illegal instruction",
    "invalid program counter",
    "hardware stack error",
    "uncorrectable ecc error",
    "unrecoverable",
    "an illegal address",
    "cuda_error_illegal_address",
    "cuda_error_launch_failed",
    "context is destroyed",
)


def poisons_context(exc: BaseException) -> bool:
    """Whether ``exc`` is a CUDA error after which the CUDA context cannot be used (sticky)."""
    text = str(exc).lower()
    if "cuda" not in text and type(exc).__name__ != "AcceleratorError":
        return False
    return any(phrase in text for phrase in STICKY_CUDA_ERRORS)


def context_broken(device: torch.device) -> bool:
    """Whether CUDA on ``device`` still works: a sync and a one-element kernel. Catches sticky
    errors whose message :func:`poisons_context` does not know. Always False off CUDA."""
    if getattr(device, "type", None) != "cuda":
        return False
    try:
        torch.cuda.synchronize(device)
        torch.ones(1, device=device).add_(1).item()
    except Exception:
        return True
    return False


def report_poisoned(backend: str, exc: BaseException) -> None:
    logger.error(
        "backend %s raised a CUDA error that poisons this process's CUDA context (%s): every later CUDA "
        "call fails, whatever backend runs it, so the backend is not blamed and no decision is changed; "
        "the process must exit (as PyTorch would). Rerun with CUDA_LAUNCH_BLOCKING=1 to find the kernel.",
        backend, str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__,
    )


def _plain(t):
    """``t`` as a plain ``torch.Tensor`` (a tensor subclass's behaviour is the caller's input, never
    the backend's): a view of its data for a ``__torch_function__`` subclass, else a copy."""
    if t is None or type(t) is torch.Tensor:
        return t
    with torch._C.DisableTorchFunctionSubclass():
        view = t.as_subclass(torch.Tensor)
    if type(view) is torch.Tensor and not view.is_meta and view.untyped_storage().nbytes() > 0:
        return view
    out = torch.empty(t.shape, dtype=t.dtype, device=t.device)  # a wrapper subclass: its values copied
    with torch.no_grad():
        out.copy_(t)
    return out


def plain_call(call):
    """``call`` on plain views of its tensors where any is a ``__torch_function__`` subclass: what
    the tuner and the first real call's gate run on, so that a subclass's behaviour (the caller's
    input) never rejects a backend in a decision every process reads. A wrapper subclass (no
    storage of its own) is left as it is."""
    tensors = (call.q, call.k, call.v, call.mask)
    if call.synthetic or all(t is None or type(t) is torch.Tensor for t in tensors):
        return call
    views = []
    try:
        for t in tensors:
            if t is None or type(t) is torch.Tensor:
                views.append(t)
                continue
            with torch._C.DisableTorchFunctionSubclass():
                view = t.as_subclass(torch.Tensor)
            if type(view) is not torch.Tensor or view.is_meta or view.untyped_storage().nbytes() == 0:
                return call
            views.append(view)
    except Exception:  # a subclass that refuses to be viewed: as it is
        return call
    return call.on(*views, synthetic=False)


def _fresh_like(t):
    """Random values in a plain ``torch.Tensor`` of ``t``'s shape, dtype, device and (dense) strides."""
    if t is None:
        return None
    with torch._C.DisableTorchFunctionSubclass():
        out = torch.empty_like(t.as_subclass(torch.Tensor) if type(t) is not torch.Tensor else t)
    if type(out) is not torch.Tensor:  # a wrapper subclass answered: a dense plain one
        out = torch.empty(t.shape, dtype=t.dtype, device=t.device)
    if out.is_floating_point():
        out.normal_()
    return out


def caller_modes() -> list:
    """The ``__torch_function__`` and ``__torch_dispatch__`` modes of the caller's own (a debug or
    filtering mode of the application or a third-party library) that the call runs under. PyTorch's
    own modes do not count: ``torch.device(...)``'s DeviceContext changes no result, and its
    compilation machinery (fake, functional, proxy tensors, AOT autograd's checks of custom ops at
    run time) passes operators through or traces them (``in_graph``). Like a tensor subclass, a
    caller's mode is the caller's context: a failure under it says nothing about the backend alone."""
    if not (torch._C._len_torch_function_stack() or torch._C._len_torch_dispatch_stack()):
        return []
    try:
        from torch.overrides import _get_current_function_mode_stack
        from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

        modes = list(_get_current_function_mode_stack()) + list(_get_current_dispatch_mode_stack())
    except Exception:  # another torch's internals: count the stacks, every mode the caller's
        return [None] * (torch._C._len_torch_function_stack() + torch._C._len_torch_dispatch_stack())
    return [m for m in modes if not (type(m).__module__ or "").startswith("torch.")]


def fails_on_fresh_inputs(run: Callable, q, k, v, mask, scale, trials: int = FRESH_TRIALS) -> bool:
    """Whether ``run`` fails on each of ``trials`` calls with fresh random q, k and v of the
    caller's shapes and layouts, plain ``torch.Tensor``s (the mask and scale kept: they were
    validated; the mask as a plain tensor too). Out-of-memory errors and poisoning CUDA errors
    count as passes: they are not the backend's. Never confirmed under a mode of the caller's
    (:func:`caller_modes`): its trials would run under it too. The caller's random stream is left
    as it was."""
    if caller_modes():
        return False
    with keep_rng(q.device):
        return _fails_on_fresh_inputs(run, q, k, v, mask, scale, trials)


def _fails_on_fresh_inputs(run: Callable, q, k, v, mask, scale, trials: int) -> bool:
    for _ in range(trials):
        try:
            fresh = [_fresh_like(t) for t in (q, k, v)]
            plain_mask = _plain(mask)
        except Exception:  # cannot make inputs (overlapping strides...): do not blame the backend
            return False
        try:
            with torch.no_grad():
                run(fresh[0], fresh[1], fresh[2], plain_mask, scale)
        except torch.cuda.OutOfMemoryError:
            return False
        except Exception as exc:
            if poisons_context(exc):
                return False
            continue
        return False
    return True


# -- what the dispatcher does after a run-time failure ---------------------------------------
def failed(d, plan, exc: Exception, req, impl_raw, grad: bool):
    """A backend raised at run time: an input error is raised as is, a context-poisoning CUDA error
    ends the process as PyTorch would, anything else goes to :func:`after_failure`."""
    if isinstance(exc, (torch.cuda.OutOfMemoryError, BackendNotSupportedError)):
        raise exc
    try:  # an input error is the caller's, never the backend's: raise it, change nothing
        prepare_request(req, grad)
    except (TypeError, ValueError) as bad:
        raise bad from None
    if poisons_context(exc) or context_broken(req.q.device):  # nothing can run after it
        report_poisoned(plan.backend, exc)
        raise exc
    if sdpa_fails_alike(plan, exc, req, grad):  # the caller's inputs, not the backend: change nothing
        raise exc
    return after_failure(d, plan, exc, req, impl_raw, grad)


def sdpa_fails_alike(plan, exc: Exception, req, grad: bool) -> bool:
    """Whether PyTorch's SDPA (the ``torch`` backend) fails the call's own inputs with the same error
    (type and first line): then the failure is the inputs' (an inference-mode tensor in a call that
    needs gradients: autograd's error, whatever op saves it), which PyTorch refuses too, and no
    backend is dropped for the process. (A retry runs without gradients and passed: the failure
    read as the backend's, and one such call dropped the decided backend for the process.)"""
    if plan.backend == "torch":
        return False  # after_failure raises its error as it is
    try:
        make_runner(REGISTRY["torch"], plan.call, grad)(req.q, req.k, req.v, req.attn_mask, req.scale)
    except Exception as other:  # noqa: BLE001 - compared, not handled
        return type(other) is type(exc) and _first_line(other) == _first_line(exc)
    return False

def after_failure(d, plan, exc: Exception, req, impl_raw, grad: bool):
    """A backend raised at run time. It is dropped for this key in this process, and the
    call is served by the next best backend. The on-disk decision changes only when the
    failure is the backend's: the call fails again on a retry with the same inputs, and on
    ``FRESH_TRIALS`` calls with fresh inputs of the same shapes."""
    if plan.backend == "torch":
        raise exc
    if plan.source == PlanSource.OVERRIDE:
        if config.strict():
            raise exc
        reason = f"failed at run time: {_first_line(exc)}"
        d.warn_once(("runtime", plan.backend, reason), "%s %s; using torch instead", plan.backend, reason)
        fallback = Plan(make_runner(REGISTRY["torch"], plan.call, grad), "torch", PlanSource.FALLBACK, plan.key, plan.call, grad,
                        reasons=[reason], requested=plan.backend)
        with d._lock:
            for sig, p in list(d.plans.items()):
                if p is plan:
                    d.plans[sig] = fallback
        return fallback.run(req.q, req.k, req.v, req.attn_mask, req.scale)

    try:  # a retry tells a transient failure from a deterministic one
        with torch.no_grad():
            plan.run(req.q, req.k, req.v, req.attn_mask, req.scale)
        deterministic = False
    except torch.cuda.OutOfMemoryError:
        deterministic = False
    except Exception as again:
        if poisons_context(again):  # the retry poisoned the context: stop here
            report_poisoned(plan.backend, again)
            raise again
        deterministic = True
    if not deterministic:
        how = "once; a retry passed"
    elif caller_modes():
        how, deterministic = "again on a retry, under a torch function or dispatch mode of the caller's", False
    elif fails_on_fresh_inputs(plan.run, req.q, req.k, req.v, req.attn_mask, req.scale) \
            and not context_broken(req.q.device):
        how = f"again on a retry and on {FRESH_TRIALS} calls with fresh inputs"
    else:
        how, deterministic = "again on a retry, but not on fresh inputs of the same shapes", False
    reason = f"failed at run time ({how}): {_first_line(exc)}"
    key_id = plan.key.id
    with d._lock:
        d.dropped.setdefault(key_id, {})[plan.backend] = reason
    decision = plan.decision
    if decision is not None and decision.key_id != key_id:  # a neighbour's decision: not this key's to change
        decision = None
    if decision is not None and deterministic:
        demoted = d._demoted_plan(decision, plan.key, plan.call, grad, d.dropped[key_id]).backend
        candidates = dict(decision.candidates)
        if plan.backend in candidates:
            candidates[plan.backend] = dataclasses.replace(candidates[plan.backend], status=REJECTED, reason=reason)
        if demoted in candidates:
            candidates[demoted] = dataclasses.replace(candidates[demoted], status=CHOSEN, reason=None)
        replacement = decision.replace(backend=demoted, candidates=candidates,
                                       modes={m: b for m, b in decision.modes.items() if b != plan.backend})
        logger.warning("backend %s %s; using %s for %s from now on", plan.backend, reason, demoted,
                       plan.problem.describe())
        d.store.put(replacement)  # a new value: plans and readers holding the old one never see it change
    else:
        logger.warning("backend %s %s; using another backend for %s in this process", plan.backend, reason,
                       plan.problem.describe())
        d.invalidate(key_id)
    new_plan = d.plan_for(req, impl_raw, grad)
    return new_plan.run(req.q, req.k, req.v, req.attn_mask, req.scale)
