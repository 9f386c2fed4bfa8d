"""The warm loop: tune a list of problems ahead of time, whatever the caller's override says.

The problem lists are :mod:`.shapes`, the inputs :mod:`.inputs`, the device :mod:`.devices`
and the torchrun set-up :mod:`.torchrun`.

A problem whose decision is already cached costs its key and one cache lookup: it is keyed on
meta tensors (no input is allocated, nothing runs) and no kernel package is imported for it, so a
second ``warm`` costs about the process's start-up. Before the first problem that needs tuning,
the kernel packages that can serve the problems to tune start loading on background threads
(:mod:`..backends.loading`), overlapping their imports with the device's start-up and the
inputs; tuning waits for them before it times anything.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

from ..overrides import use_backend
from .inputs import make_inputs

logger = logging.getLogger("diffsynth_attention")


def _problem(shape: dict, device: torch.device, dtype, layout: str):
    """(problem, device info) of ``shape``'s calls on ``device``, validated on meta tensors."""
    import dataclasses

    from ..backends import device_info
    from ..problem import prepare

    q, k, v, kw = make_inputs(shape, "meta", dtype, layout)
    pats = [kw.get(f"{x}_pattern", "b n s d") for x in ("q", "k", "v", "out")]
    call = prepare(q, k, v, *pats, kw.get("dims"), kw.get("attn_mask"), None, kw["is_causal"], kw.get("window_size"),
                   bool(shape.get("requires_grad")), allow_meta=True)
    return dataclasses.replace(call.problem, device_type=device.type), device_info(device)


def known(shape: dict, device: torch.device, dtype=None, layout: str = "b n s d"):
    """The :class:`~diffsynth_attention.dispatch.Explanation` of ``shape``'s cached decision
    (source "cache"), found without inputs or kernel imports; None when the problem would be
    tuned (no decision, all candidates rejected, or its backend not usable here)."""
    from ..backends import candidates
    from ..dispatch import Explanation, default_dispatcher
    from ..dispatch.plan import candidate_rows
    from ..states import PlanSource
    from ..store.key import make_key
    from ..tuning.policy import tolerance_for

    problem, dev = _problem(shape, device, dtype, layout)
    usable, _ = candidates(problem, dev)
    key = make_key(problem, dev, usable)
    dispatcher = default_dispatcher()
    tolerance = tolerance_for(problem, dispatcher.policy)  # the tolerance the call's own lookup uses
    decision = dispatcher.store.get(key.id, tolerance=tolerance)
    if decision is None or not decision.usable(tolerance, {b.name for b in usable}):
        return None
    return Explanation(decision.backend, PlanSource.CACHE, key.fields, candidate_rows(decision), problem.describe(), key.id,
                       decision)


def _retimes_provisional() -> bool:
    """Whether a provisional decision met now is re-timed (tuning on, re-timing on, the host
    quiet): a known one is then not answered from the cache."""
    from .. import config
    from ..dispatch import default_dispatcher
    from ..tuning.policy import DEFAULT_POLICY

    return config.tuning_enabled() and config.retime() and (default_dispatcher().policy or DEFAULT_POLICY).quiet()


def _start_loads(shapes: list, device: torch.device, dtype, layout: str) -> None:
    """Start the background loads of the kernel packages that could serve ``shapes`` (as
    declared: nothing is imported here)."""
    from ..backends import candidates, loading

    for shape in shapes:
        for backend in candidates(*_problem(shape, device, dtype, layout))[0]:
            if loading.needs_loading(backend):
                loading.start_loading(backend)


def _settle_loads(shape: dict, device: torch.device, dtype, layout: str) -> None:
    """Wait for the loads of the kernel packages that could serve ``shape`` (:func:`~..backends.loading.settle`:
    each until its deadline): a provisional decision is re-timed only once none loads (dispatch/modes.py)."""
    from ..backends import candidates, loading

    loading.settle(candidates(*_problem(shape, device, dtype, layout))[0])


def warm(shapes: list, device: torch.device, dtype=None, layout: str = "b n s d", on_done: Optional[Callable] = None) -> list:
    """Tune every problem on ``device``; return [(shape, Explanation)]. Decisions go to the cache.

    Runs under ``use_backend("auto")``: ``DIFFSYNTH_ATTENTION_IMPLEMENTATION`` (and any scope of
    the caller) does not stop it from tuning. A problem already decided is answered from the
    cache (:func:`known`), unless it is provisional and the host quiet: then it is re-timed, as a
    pipeline's first call would re-time it. Always at the ``exact`` quality tier, whatever
    ``DIFFSYNTH_ATTENTION_QUALITY`` or the caller's scope says: its inputs are random, and a
    low-precision tier gates its candidates only on a pipeline's own activations (docs/quality.md)."""
    from ..api import explain
    from ..tiers import EXACT, quality

    results, loads_started = [], False
    g = None
    with use_backend("auto"), quality(EXACT):
        for shape in shapes:
            info = known(shape, device, dtype, layout)
            retime = info is not None and info.decision.provisional and _retimes_provisional()
            if retime:
                info = None  # this quiet moment re-times it (the dispatcher's rule: docs/tuning.md)
            if info is None:
                if not loads_started:  # the packages load while the inputs are made
                    loads_started = True
                    _start_loads(shapes, device, dtype, layout)
                if retime:  # the re-time waits for its candidates' imports (each until its deadline), as a tuning does
                    _settle_loads(shape, device, dtype, layout)
                if g is None:
                    g = torch.Generator(device=device).manual_seed(0)
                q, k, v, kwargs = make_inputs(shape, device, dtype, layout, g)
                with torch.set_grad_enabled(bool(shape.get("requires_grad"))):  # a recorded backward is tuned with it
                    info = explain(q, k, v, **kwargs)
                del q, k, v
            results.append((shape, info))
            if on_done is not None:
                on_done(shape, info)
    return results
