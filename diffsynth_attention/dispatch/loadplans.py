"""The plans of a dispatcher while a decided kernel package loads, as a mixin of the
:class:`~.dispatcher.Dispatcher` (``self``): the stand-in plan served meanwhile, the import a
trace or a capture waits for until its deadline, and the re-plan when a background load ends
(docs/backends.md, docs/tuning.md)."""

from __future__ import annotations

import logging
from typing import Optional

from ..backends import REGISTRY, loading
from ..callsite import in_graph
from ..states import TIMED, PlanSource
from ..store.decision import Decision
from .plan import Plan
from .runners import make_runner

logger = logging.getLogger("diffsynth_attention")


class LoadPlans:
    """The loading rules of a dispatcher (``self`` is the :class:`~.dispatcher.Dispatcher`)."""

    def _loaded_or_dropped(self, name: str, key) -> Optional[bool]:
        """Import a decided backend's package (first use: on a background thread, waited for until its deadline:
        a hung import hangs no trace or capture); a broken install drops it for this key in this process, with
        the reason, as a run-time failure would. None: still importing past the deadline (nothing dropped)."""
        why = loading.reasons([REGISTRY[name]])[name]
        if why is not None and loading.state(REGISTRY[name]) != loading.LOADING:  # the import ended since its answer
            why = REGISTRY[name].unavailable_reason()  # (a late one): what it says now, not 'still running'
        if why is None or loading.state(REGISTRY[name]) == loading.LOADING:
            return None if why else True
        with self._lock:
            self.dropped.setdefault(key.id, {})[name] = why
        self.warn_once(("unavailable", name, why), "backend %s is unavailable (%s); using another backend", name, why)
        return False

    def _loading_plan(self, decision: Decision, key, call, grad, usable_names: set, source: PlanSource = PlanSource.CACHE,
                      waited: Optional[str] = None) -> Optional[Plan]:
        """While ``decision``'s package loads on a background thread (started here if need be), a plan on the
        decision's fastest candidate usable now (else ``torch``), source "loading". None when the package is
        loaded (or failed: the caller drops it), and while tracing or capturing, where the load is waited for
        instead (``waited``: the backend waited for past its deadline: its stand-in then, never baked)."""
        decided = REGISTRY[waited or decision.backend]
        if not loading.needs_loading(decided) or loading.done(decided) or in_graph(call.problem.device_type) and not waited:
            return None
        pending = loading.start_loading(decided, [decision.key])  # import, then first launches (off this thread)
        if pending not in loading.PENDING:
            return None
        order = sorted((c.time_ms, n) for n, c in decision.candidates.items()
                       if n != decided.name and n in usable_names and n in REGISTRY and c.time_ms is not None
                       and c.status in TIMED and loading.is_ready(REGISTRY[n]))
        name = order[0][1] if order else "torch"
        chosen = decision.candidates.get(decided.name)
        ms = f", {chosen.time_ms:.4g} ms" if chosen is not None and chosen.time_ms is not None else ""
        reason = (f"{decided.name} ({source}{ms}) " + ("is loading on a background thread; " if pending == loading.LOADING
                  else "is not loaded (background loading deferred in this process); ") + name + (
                  f" ({order[0][0]:.4g} ms), the fastest usable candidate of the decision," if order else ",")
                  + " serves the calls until it is ready")
        inner = make_runner(REGISTRY[name], call, grad)
        invalidate, key_id = self.invalidate, key.id

        def run(q, k, v, mask, scale):
            if loading.done(decided):  # the load ended: the next call plans again (on the decided backend)
                invalidate(key_id)
            return inner(q, k, v, mask, scale)
        return Plan(run, name, PlanSource.LOADING, key, call, grad, decision, counts_hit=True, reasons=[reason])

    def _backend_loaded(self, name: str, state: str) -> None:
        """A background load ended: the keys served provisionally while ``name`` loaded plan again, and
        so do those whose decision is provisional and not re-timed in this process yet: their re-time
        waits for a moment when no package loads (:meth:`~.modes.ModePlans._retime_now`), and a plan
        kept for the whole process would never ask again (the preload at import loads while the first
        calls are planned)."""
        with self._lock:
            keys = {p.key.id for p in self.plans.values() if p.decision is not None and (
                p.source == PlanSource.LOADING or p.decision.provisional and p.key.id not in self.retimed)}
        for key_id in keys:  # (any loading plan: a trace's stand-in may be for the decision's compiled backend)
            self.invalidate(key_id)
