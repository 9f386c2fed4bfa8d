"""The :class:`Dispatcher`: plans, the decision store, counters and warnings of one dispatcher.

A call is looked up by its *signature* (:mod:`diffsynth_attention.request`) in a table of
*plans*. A plan is built once per signature: that is where the call is validated, the backend
chosen (override, cached decision, or tuning) and bound to the call (:mod:`.runners`). A hit
costs the signature tuple, one dict lookup and the runner: no validation, no key, no file I/O.
Plans are invalidated per key: a new decision for a key drops only the signatures planned for it.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Optional

import torch

from .. import config, overrides, process, recording, tiers
from ..backends import REGISTRY, candidates, device_info, for_tier, loading
from ..callsite import autocast_inputs, in_graph, keep_rng, needs_grad, transforming
from ..problem import prepare_request
from ..request import Request, scalar_scale
from ..store.cache import DecisionCache
from ..states import TIMED, PlanSource
from ..store.decision import EAGER, SYNTHETIC, Decision, check_filters, decision_filter
from ..store.leases import Outcome
from ..store.key import make_key, neighbour_distance, neighbour_group
from ..tuning.policy import TuningPolicy, tolerance_for
from ..tuning.trial import decision_timings
from ..tuning.tuner import tune
from . import faults, lowprec, tokens
from .counters import Counters
from .hot import make_forward
from .loadplans import LoadPlans
from .modes import ModePlans
from .plan import BackendNotSupportedError, Explanation, Plan, PlanTable, empty_plan, explanation  # noqa: F401 (re-exported)
from .runners import make_runner

logger = logging.getLogger("diffsynth_attention")


class Dispatcher(ModePlans, LoadPlans):
    """One plan table over one :class:`DecisionCache`. ``Dispatcher(DecisionCache(path))`` is a
    dispatcher of its own (tests build one each); the public functions use a default instance."""

    def __init__(self, store: Optional[DecisionCache] = None, policy: Optional[TuningPolicy] = None, *,
                 token: Optional[int] = None):  # token: tokens.DEFAULT for the default dispatcher only
        self.store, self.policy = store if store is not None else DecisionCache(), policy  # policy: tuning/policy.py
        self._lock = process.new_rlock()
        self.plans: dict = PlanTable(self._lock)  # signature -> Plan; never rebound (the hot path holds its .get)
        self._provisional: dict = {}  # signature -> Plan used while tuning is impossible
        self._sigs_by_key: dict = {}  # key id -> {signature}
        self.counters = Counters()  # safe across threads (dispatch/counters.py)
        self.warned: set = set()
        self.dropped: dict = {}  # key id -> {backend: reason}: run-time failures in this process
        self.retimed: dict = {}  # key id -> the provisional decision this process re-times (once a key)
        self.sentinels: dict = {}  # key id -> lowprec.Sentinel: low-precision decisions watched in this process
        self.store.listeners.append(self.invalidate)
        self.trace_token = tokens.new_token(self, token)  # how compiled graphs name this dispatcher (never reused)
        self.trace_key = str(self.trace_token)  # what Dynamo reads: a str is never made symbolic (dynamic=True)
        self.regate_epoch = "0"  # moves on when a trace-time decision fails on real data (dispatch/regate.py)
        loading.add_listener(self._backend_loaded)  # held weakly
        self.forward = make_forward(self)

    # -- bookkeeping -----------------------------------------------------------------------
    def invalidate(self, key_id: Optional[str] = None) -> None:
        """Drop the plans of ``key_id`` (all plans if None): the next call plans again. Compiled
        graphs are left alone: they hold their backend, and a new decision recompiles none."""
        with self._lock:
            if key_id is None:
                self.plans.clear()
                self._provisional.clear()
                self._sigs_by_key.clear()
                return
            for sig in self._sigs_by_key.pop(key_id, ()):
                self.plans.pop(sig, None)
                self._provisional.pop(sig, None)

    def reset(self) -> None:
        """Forget plans, counters, warnings and dropped backends (the store is left as it is)."""
        self.invalidate()
        self.counters.reset()
        self.warned.clear()
        self.dropped.clear()
        self.retimed.clear()
        self.sentinels.clear()

    def stats(self) -> dict:
        """This dispatcher's counters: ``hits`` (calls served by a known decision), ``tunings``,
        ``tuning_seconds``."""
        return self.counters.snapshot()

    def warn_once(self, tag, message, *args) -> None:
        if tag not in self.warned:
            self.warned.add(tag)
            logger.warning(message, *args)

    def clear_cache(self, backend: Optional[str] = None, gpu: Optional[str] = None) -> int:
        """Remove decisions (all, or those choosing ``backend`` / tuned on a GPU whose name
        contains ``gpu``). Returns how many were removed."""
        check_filters(backend, gpu, "clear_cache")  # TypeError/ValueError naming the argument
        return self.store.clear(decision_filter(backend, gpu))

    # -- planning --------------------------------------------------------------------------
    def _store_plan(self, sig, plan: Plan) -> None:
        with self._lock:
            self.plans[sig] = plan
            self._sigs_by_key.setdefault(plan.key.id, set()).add(sig)
            if plan.decision is not None and plan.decision.key_id != plan.key.id:  # a neighbour's decision
                self._sigs_by_key.setdefault(plan.decision.key_id, set()).add(sig)

    def tolerance(self, problem) -> float:
        """The gate's tolerance in force for ``problem`` (per dtype: tuning/policy.py): a stored
        decision serves only where its chosen backend's error passes it."""
        return tolerance_for(problem, self.policy)

    def _decided_runner(self, name: str, decision: Optional[Decision], key, call, grad):
        """The runner of a decided backend: a low-precision one of a quality tier is watched by its
        sentinel (dispatch/lowprec.py); every other one is bound as it is (no added cost)."""
        run = make_runner(REGISTRY[name], call, grad)
        if decision is not None and REGISTRY[name].low_precision and "quality" in key.fields:
            return lowprec.watched(self, run, decision, key, call, grad)
        return run

    def _neighbour(self, key, usable_names: set, tolerance: Optional[float] = None) -> Optional[Decision]:
        """The known decision nearest to ``key`` that differs from it only in sequence lengths
        falling in the same buckets (store/key.py), and whose backend can serve this call."""
        group = neighbour_group(key.fields)
        found = []
        for key_id, decision in ((d.key_id, d) for d in self.store.neighbours(group, tolerance, key.fields)):  # its cell
            if key_id == key.id or decision.backend not in usable_names:
                continue
            try:
                distance = neighbour_distance(key.fields, decision.key) if neighbour_group(decision.key) == group else None
            except (KeyError, TypeError, ValueError, ZeroDivisionError):  # a foreign entry: not a neighbour
                continue
            if distance is not None:
                found.append((distance, key_id, decision))
        return min(found, key=lambda f: (f[0], f[1]))[2] if found else None

    def _override_plan(self, requested, source_name, call, grad, key, dev) -> Plan:
        backend = REGISTRY[requested]
        why = loading.reasons([backend])[requested]  # an import that hangs: bounded by its deadline
        problem = call.problem
        reasons = [why] if why else backend.not_supported_reasons(problem, dev)
        if not reasons:
            return Plan(make_runner(backend, call, grad), requested, PlanSource.OVERRIDE, key, call, grad)
        message = f"{source_name} asks for {requested!r}, which cannot serve {problem.describe()}: " + "; ".join(reasons)
        if config.strict():
            raise BackendNotSupportedError(message)
        for reason in reasons:  # an unavailable package's reason already names what to install
            self.warn_once(("fallback", requested, reason), "%s=%r cannot serve this call: %s; using torch instead",
                           source_name, requested, reason)
        torch_run = make_runner(REGISTRY["torch"], call, grad)

        def run(q, k, v, mask, scale):  # strict mode may be switched on later: checked per call here only
            if config.strict():
                raise BackendNotSupportedError(message)
            return torch_run(q, k, v, mask, scale)
        return Plan(run, "torch", PlanSource.FALLBACK, key, call, grad, reasons=reasons, requested=requested)

    def resolve(self, call, grad: bool, key, usable_names: set, dev, requested: str, source_name,
                provisional: bool = True, mode: str = EAGER) -> Optional[Plan]:
        """The one rule mapping a validated call to a backend, for eager plans and compiled graphs alike: the override,
        else the cached decision (its backend for ``mode``), else (that dropped in this process) the decision's next
        best, else (``NEW_SHAPES=nearest``) a neighbour's decision. None: the key needs tuning (or, where tuning
        cannot run, the fallback, which the caller picks), or its provisional decision is re-timed now."""
        if requested != "auto":
            return self._override_plan(requested, source_name, call, grad, key, dev)
        dropped = self.dropped.get(key.id, {})
        tier = lowprec.tier_of_key(key)
        tolerance = lowprec.tolerance(self.tolerance(call.problem), tier)
        decision = self.store.get(key.id, tolerance=tolerance)
        if decision is not None and decision.all_rejected():  # never trusted: tune again
            decision = None
        if decision is not None and self._retime_now(decision, key, mode, call, usable_names):
            return None
        if decision is not None and decision.backend_for(mode) in usable_names:
            waiting = provisional and self._loading_plan(decision, key, call, grad, usable_names)
            if waiting:  # its kernel package still loads (eager calls only; a trace waits for it)
                return waiting
            name = decision.backend_for(mode)
            ready = self._loaded_or_dropped(name, key)
            if ready is None:  # still loading past its deadline (a trace or a capture waited for it): a stand-in
                late = self._loading_plan(decision, key, call, grad, usable_names, waited=name)
                if late:
                    return late
                ready = loading.is_ready(REGISTRY[name])  # (its load ended in between)
            if ready:
                return self._decided_plan(decision, mode, key, call, grad)
            dropped = self.dropped.get(key.id, {})
        if decision is not None and decision.backend_for(mode) in dropped:  # failed here at run time: the next best
            return self._demoted_plan(decision, key, call, grad, dropped)
        if decision is None and config.new_shapes() == "nearest" and tier == tiers.EXACT:  # a tier gates on its own data
            near = self._neighbour(key, usable_names, tolerance)
            waiting = provisional and near and self._loading_plan(near, key, call, grad, usable_names, PlanSource.NEIGHBOUR)
            if waiting:
                return waiting
            if near is not None and self._loaded_or_dropped(near.backend, key):
                logger.info("serving %s with the decision of neighbour key %s: %s", call.problem.describe(), near.key_id,
                            near.backend)
                return Plan(make_runner(REGISTRY[near.backend], call, grad), near.backend, PlanSource.NEIGHBOUR, key, call, grad,
                            near, counts_hit=True)
        return None

    def build_plan(self, req: Request, impl_raw, grad: bool, may_tune: Optional[bool] = None,
                   tune_on: Optional[Callable] = None, mode: str = EAGER, tier_read: Optional[tuple] = None) -> Optional[Plan]:
        """Validate ``req`` and choose its backend (:meth:`resolve`, then tuning if the key is new).

        ``may_tune``: whether tuning may run (default: not while capturing a CUDA graph or
        tracing). ``tune_on``: where the call's tensors are not real (a trace), a function that
        returns a :class:`Request` of real tensors to tune on, or None, in which case an
        undecided key returns None. ``tier_read``: (quality scope, DIFFSYNTH_ATTENTION_QUALITY's raw
        value) as the caller's signature read them (default: read here), so that the plan is of the
        tier of the signature it is stored under, even where another thread sets the variable meanwhile."""
        config.validate_all()  # a bad environment variable raises at the first call, naming it
        call = prepare_request(req, grad)  # the call's one value, from here to the tuner
        plain = call.bare()  # what plans keep: no tensors
        if call.problem.empty:  # SDPA's own answer: no key, no tuning, not recorded
            return empty_plan(plain, grad)
        requested, source_name = overrides.requested(impl_raw, req.compatibility_mode)
        problem = call.problem
        recording.note(problem)  # where a plan is built: once per call signature, never on the hit path
        dev = device_info(call.q.device)
        # the scope's or the variable's, as the call's signature read them
        tier = tiers.current() if tier_read is None else tiers.tier_of(*tier_read)
        usable, unsupported = candidates(problem, dev)
        key = make_key(problem, dev, usable, tier)  # over every backend declared able, whatever the tier
        usable, unsupported = for_tier(usable, unsupported, tier)
        dropped = self.dropped.get(key.id, {})
        usable = [b for b in usable if b.name not in dropped]
        usable_names = {b.name for b in usable}
        plan = self.resolve(plain, grad, key, usable_names, dev, requested, source_name, provisional=tune_on is None,
                            mode=mode)
        if plan is not None and tune_on is None and plan.source == PlanSource.CACHE and plan.decision is not None \
                and plan.decision.evidence == SYNTHETIC and self._can_tune(call.q):  # gated on random inputs: check real ones
            from .regate import regate

            return regate(self, plan, faults.plain_call(call), key, usable, unsupported, usable_names, dev, mode)
        if plan is not None:
            return plan
        if may_tune is None:
            may_tune = self._can_tune(call.q)
        if not may_tune:
            return Plan(make_runner(REGISTRY["torch"], plain, grad), "torch", PlanSource.FALLBACK, key, plain, grad)
        if tune_on is None:  # (a subclass's behaviour is the caller's input: tuned on plain views of its data)
            return self.tune_key(faults.plain_call(call), key, usable, unsupported, usable_names, dev, mode=mode)
        from torch.utils._python_dispatch import _disable_current_modes

        with _disable_current_modes(), keep_rng(call.q.device):  # a trace: tune outside its fake modes, on random
            real = tune_on()  # tensors of the call's shapes
            if real is None:
                return None
            return self.tune_key(call.on(real.q, real.k, real.v, real.attn_mask), key, usable, unsupported, usable_names,
                                 dev, mode=mode)

    def tune_key(self, call, key, usable, unsupported, usable_names, dev, make: Optional[Callable] = None,
                 mode: str = EAGER) -> Plan:
        """Tune ``key`` on ``call`` (its tensors: the caller's, or random stand-ins) through
        :meth:`DecisionCache.get_or_tune` (under the key's lease; a decision another thread or
        process stored meanwhile, trusted under this problem's tolerance and with a backend usable
        here, is served instead: a hit). ``make(backend)``: the runner timed (default: the one a
        plan binds; the LSE path times its own). A synthetic call's decision records
        ``evidence="synthetic"`` (gated on random inputs: its first real call gates it again)."""
        problem, grad = call.problem, call.grad
        usable, unsupported = loading.settle_candidates(usable, unsupported, problem.describe())  # before the lease
        mask = call.mask
        if grad and mask is not None and mask.requires_grad:  # a learned mask: the timed backwards fill a
            call = dataclasses.replace(call, mask=mask.detach().requires_grad_())  # leaf of the tuner's own, never the caller's .grad
        tier = lowprec.tier_of_key(key)
        bounds, evidence, usable, unsupported = lowprec.gate_checks(tier, usable, unsupported, call.canonical, call,
                                                                    call.mask4)
        plain = call.bare()

        def run_tuner() -> Decision:
            def bound(backend):  # the runner a plan binds: timed as the hit path calls it
                return make_runner(backend, plain, grad)

            decision = tune(call, usable, unsupported, key, make or bound, dev, self.tolerance(problem), policy=self.policy,
                            bounds=bounds)  # the one trust rule, not recomputed
            decision = lowprec.annotate(decision, tier, evidence)
            if call.synthetic:
                decision = decision.replace(evidence=SYNTHETIC)
            self.counters.tuned(decision.tuning_seconds)
            logger.info("tuned %s: %s (%.3fs)", problem.describe(), decision.backend, decision.tuning_seconds)
            return decision

        stale = self.retimed.get(key.id)  # a provisional decision being re-timed is not served again

        def accept(found: Decision) -> bool:
            return found.backend in usable_names and not (stale is not None and found.provisional and found == stale)

        with keep_rng(call.q.device):  # the caller's random stream is not the tuning's
            got = self.store.get_or_tune(key.id, run_tuner, lowprec.tolerance(self.tolerance(problem), tier),
                                         accept=accept, read_first=False)  # resolve() has just read the key
        # NOT_STORED: every candidate rejected, never persisted: used for this call only, the next one tunes again
        source = {Outcome.REREAD: PlanSource.CACHE, Outcome.TUNED: PlanSource.TUNED}.get(got.outcome, PlanSource.FALLBACK)
        plan = self._decided_plan(got.decision, mode, key, plain, grad, source)
        plan.counts_hit = source == PlanSource.CACHE
        return plan

    def _demoted_plan(self, decision: Decision, key, call, grad, dropped: dict) -> Plan:
        order = sorted(
            (c.time_ms, n) for n, c in decision.candidates.items()
            if c.status in TIMED and c.time_ms is not None and n not in dropped
            and REGISTRY[n].unavailable_reason() is None
        )
        name = order[0][1] if order else "torch"
        run = lowprec.stand_in(self, make_runner(REGISTRY[name], call, grad), name, decision, key, call, grad)
        return Plan(run, name, PlanSource.FALLBACK, key, call, grad, decision)

    def plan_for(self, req: Request, impl_raw, grad: bool) -> Plan:
        """The plan for a call: from the table, else built (and stored, unless provisional)."""
        tier_read = (tiers.scope_get(), tiers.raw())  # read once: the signature's and the plan's tier
        try:
            sig = req.signature(overrides.scope_get(), impl_raw, grad, *tier_read)
            plan = self.plans.get(sig)
            if plan is None:
                plan = self._provisional.get(sig)
                if plan is not None and self._can_tune(req.q):
                    plan = None
        except Exception:  # not tensors, unhashable dims, an incomparable scale...: validation explains
            sig, plan = None, None
        if plan is not None:
            return plan
        plan = self.build_plan(req, impl_raw, grad, tier_read=tier_read)
        if plan.counts_hit and plan.decision is not None and self.policy is not None:  # a known decision planned
            self.policy.notify(plan.key, plan.decision, decision_timings(plan.decision), True)
        if sig is not None:
            if plan.source == PlanSource.FALLBACK and plan.requested is None and (plan.decision is None or plan.decision.all_rejected()):
                with self._lock:  # no decision yet (tuning off, capture, tracing): plan again when tuning can run
                    self._provisional[sig] = plan
                    self._sigs_by_key.setdefault(plan.key.id, set()).add(sig)
            elif plan.source == PlanSource.TUNED:  # later calls are served by a known decision: hits
                self._store_plan(sig, Plan(plan.run, plan.backend, PlanSource.CACHE, plan.key, plan.call, plan.grad, plan.decision, counts_hit=True))
            else:
                self._store_plan(sig, plan)
        return plan

    @staticmethod
    def _can_tune(q) -> bool:
        # not inside a torch.func transform (its wrapped tensors) nor under a caller's torch function or dispatch
        # mode (debug, fake-tensor, selective checkpointing: its behaviour would be timed and stored): served as SDPA
        return config.tuning_enabled() and not in_graph(q.device.type) and not transforming() and not faults.caller_modes()

    # -- the slow path ----------------------------------------------------------------------
    def call(self, req: Request, impl_raw, grad: bool):
        """A call whose signature has no plan yet (or whose plan is provisional)."""
        if isinstance(req.scale, torch.Tensor):  # every such call comes here: its signature is never planned
            req = _float_scale(req)
        plan = self.plan_for(req, impl_raw, grad)
        if plan.counts_hit:
            self.counters.hit()
        return self.run(plan, req, impl_raw, grad)

    def run(self, plan: Plan, req: Request, impl_raw, grad: bool):
        try:
            return plan.run(req.q, req.k, req.v, req.attn_mask, req.scale)
        except Exception as exc:
            return self.failed(plan, exc, req, impl_raw, grad)

    def failed(self, plan: Plan, exc: Exception, req: Request, impl_raw, grad: bool):
        """A backend raised at run time (:func:`.faults.failed`)."""
        return faults.failed(self, plan, exc, req, impl_raw, grad)

    def after_failure(self, plan: Plan, exc: Exception, req: Request, impl_raw, grad: bool):
        """A backend failed a call that is valid (:func:`.faults.after_failure`)."""
        return faults.after_failure(self, plan, exc, req, impl_raw, grad)

    # -- explain ----------------------------------------------------------------------------
    def explain(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pattern: str = "b n s d",
                k_pattern: str = "b n s d", v_pattern: str = "b n s d", out_pattern: str = "b n s d",
                dims: Optional[dict] = None, attn_mask: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                is_causal: bool = False, compatibility_mode: bool = False,
                window_size: Optional[int] = None) -> Explanation:
        """The decision ``attention_forward`` takes for this call (backend, source, key and key id,
        the decision with every candidate's time/error/reason); tunes if the key is new, as the call
        would. ``print()`` it for the table ``diffsynth-attention explain`` prints."""
        cast = autocast_inputs(q, k, v, attn_mask)  # in a torch.autocast region: the call it makes (hot.py)
        if cast is not None:
            _, q, k, v, attn_mask = cast
        req = Request(q, k, v, q_pattern, k_pattern, v_pattern, out_pattern, dims, attn_mask, scale, is_causal,
                      compatibility_mode, window_size)
        req = _float_scale(req) if isinstance(scale, torch.Tensor) else req
        impl_raw = overrides.implementation_raw()
        try:
            grad = needs_grad(q, k, v, attn_mask)
        except AttributeError:  # not tensors: validation explains
            grad = False
        return explanation(self, self.plan_for(req, impl_raw, grad))


def _float_scale(req: Request) -> Request:
    """``req`` with a 0-dim tensor scale as its float (request.scalar_scale): the float call's plan
    serves it. A tensor no float stands for is left for validation, which raises in its order."""
    try:
        return req._replace(scale=scalar_scale(req.scale))
    except TypeError:
        return req
