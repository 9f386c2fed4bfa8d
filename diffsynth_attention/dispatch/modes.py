"""Each execution mode's pick of one decision (issue 29), as a mixin of the
:class:`~.dispatcher.Dispatcher`: the eager plan of a decision (with a capture-aware runner where
CUDA graphs picked another backend), the re-time of a provisional decision at a quiet moment,
and the plan a compiled graph bakes (:meth:`ModePlans.trace_plan`, the compiled or CUDA-graph
pick, kept apart from eager plans)."""

from __future__ import annotations

import logging
from typing import Optional

import torch

from .. import config, overrides, tiers
from ..backends import REGISTRY, loading
from ..callsite import building_graph, in_graph, transforming
from ..request import Request
from ..states import PlanSource
from ..store.decision import COMPILED, CUDAGRAPH, EAGER, Decision
from ..tuning.policy import DEFAULT_POLICY
from ..tuning.trial import random_like
from .plan import Plan

logger = logging.getLogger("diffsynth_attention")


def _trace_mode() -> str:
    """The mode a graph being traced now will run in: ``cudagraph`` under inductor's CUDA graphs
    (``mode="reduce-overhead"``), else ``compiled``."""
    import sys

    inductor = sys.modules.get("torch._inductor.config")
    try:
        return CUDAGRAPH if inductor is not None and inductor.triton.cudagraphs else COMPILED
    except AttributeError:  # another torch's config layout: the compiled price
        return COMPILED


def _unloaded(usable_names) -> list:
    """The candidates of ``usable_names`` whose kernel package has not ended its load, each not started
    yet started now on a background thread (unless loads are deferred: the command line's ``explain``).
    A re-time that imported them itself (as a tuning does, waiting until the deadline) would time
    beside an import that runs past it, and be provisional again, in every process; a hung import
    would cost each process its wait. The end of a load plans the calls of a provisional decision
    again (:meth:`~.loadplans.LoadPlans._backend_loaded`): the re-time comes then."""
    pending = []
    for name in sorted(usable_names):
        backend = REGISTRY.get(name)
        if backend is None or not loading.needs_loading(backend):
            continue
        state = loading.state(backend)
        if state == loading.UNLOADED:
            state = loading.start_loading(backend)
        if state in loading.PENDING:
            pending.append(name)
    return pending


class ModePlans:
    """The mode rules of a dispatcher (``self`` is the :class:`~.dispatcher.Dispatcher`)."""

    def _decided_plan(self, decision: Decision, mode: str, key, call, grad, source=PlanSource.CACHE) -> Plan:
        """A plan on ``decision``'s backend for ``mode``. An eager plan whose decision picked another
        backend for CUDA graphs checks, per call, whether a graph is being captured and runs that
        one then (one C call; plans whose modes agree pay nothing)."""
        name = decision.backend_for(mode)
        run = self._decided_runner(name, decision, key, call, grad)
        graph_name = decision.backend_for(CUDAGRAPH)
        if mode == EAGER and graph_name != name and call.problem.device_type == "cuda" and \
                REGISTRY[graph_name].unavailable_reason() is None:
            eager_run, graph_run = run, self._decided_runner(graph_name, decision, key, call, grad)
            capturing = torch.cuda.is_current_stream_capturing

            def run(q, k, v, mask, scale):
                return (graph_run if capturing() else eager_run)(q, k, v, mask, scale)
        return Plan(run, name, source, key, call, grad, decision, counts_hit=True)

    def _retime_now(self, decision: Decision, key, mode: str, call, usable_names=()) -> bool:
        """Whether a provisional ``decision`` is re-timed by this call: eager, tuning allowed, not
        yet re-timed in this process, the host quiet (the policy's ``quiet``), no kernel package
        loading in the background (its ``loading``) and every candidate's package (``usable_names``)
        loaded (or failed): those not loaded yet start loading now, and the re-time waits for their
        end (:func:`_unloaded`)."""
        if not decision.provisional or mode != EAGER or key.id in self.retimed or not config.tuning_enabled() \
                or not config.retime() or in_graph(call.problem.device_type) or transforming():
            return False
        policy = self.policy or DEFAULT_POLICY
        if not policy.quiet() or policy.loading():  # a package loading now would skew the re-time again
            return False
        pending = _unloaded(usable_names)
        if pending:
            logger.info("the re-time of the provisional decision for %s waits for %s to load", key.id, ", ".join(pending))
            return False
        self.retimed[key.id] = decision
        logger.info("re-timing the provisional decision for %s (%s) now that the host is quiet", key.id, decision.backend)
        return True

    def trace_plan(self, req: Request, grad: bool, mode: Optional[str] = None) -> Optional[Plan]:
        """The plan a compiled graph bakes for a call whose sizes are concrete, taken while the
        graph is traced (``req`` holds fake tensors): :meth:`resolve`, and for a key with no
        decision a tuning on random tensors of the call's shapes (not for masked calls, whose
        mask values matter: None then, and the graph dispatches at run time). Validation errors
        raise here, at trace time. The decision's backend for the graph's mode (``compiled``, or
        ``cudagraph`` under inductor's CUDA graphs); these plans are kept apart from eager ones.
        In a low-precision quality tier: None (the run-time operator), so the first real call gates
        the low-precision candidates on its own q, k, v, and the sentinel watches the decision;
        nothing is tuned on random data."""
        tier_read = (tiers.scope_get(), tiers.raw())  # read once: the signature's and the plan's tier
        if tiers.tier_of(*tier_read) != tiers.EXACT:
            return None
        impl_raw = overrides.implementation_raw()
        mode = mode or _trace_mode()  # given by a caller that knows it (dispatch/baked.py: the compile's own mode)
        try:
            sig = (mode, req.signature(overrides.scope_get(), impl_raw, grad, *tier_read))
            plan = self.plans.get(sig)
        except (AttributeError, TypeError):
            sig, plan = None, None
        if plan is not None and plan.source != PlanSource.LOADING:  # an eager stand-in is not baked: the trace waits
            return plan

        def tune_on():  # random stand-ins of the fake tensors' shapes, strides, dtype, device and requires_grad
            if req.attn_mask is not None:
                return None
            return req._replace(q=random_like(req.q), k=random_like(req.k), v=random_like(req.v))

        # this thread builds a graph (in_graph()): a loading package is waited for, not stood in for,
        # and no synthetic decision is re-gated on the fakes; another thread's eager calls meanwhile are eager
        with building_graph():
            plan = self.build_plan(req, impl_raw, grad, may_tune=config.tuning_enabled(), tune_on=tune_on, mode=mode,
                                   tier_read=tier_read)
        if plan is None:
            return None
        if plan.source == PlanSource.TUNED:
            plan = Plan(plan.run, plan.backend, PlanSource.CACHE, plan.key, plan.call, plan.grad, plan.decision, counts_hit=True)
        if sig is not None and plan.source not in (PlanSource.FALLBACK, PlanSource.LOADING):  # a later trace asks again
            self._store_plan(sig, plan)
        return plan
