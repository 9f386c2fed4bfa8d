"""The first real call of a key whose decision was gated at trace time (issue 30, item 4).

A key first met while a graph is traced is tuned on random tensors of the call's shapes: sound
for timing, weaker for the numeric gate, which eager calls pass on the caller's own data (an
outlier-heavy K can put a quantized kernel's error several times above its error on ``randn``).
Such a decision records ``evidence="synthetic"``. The first real eager call of that key, in any
process, gates its backend again on the call's own slice (one fp32 reference slice, as the
tuner's gate, and the call itself): within the tolerance, the decision is stored as gated on
real data; beyond it, the backend is stored as rejected for the key, the key is tuned again on
this call, and the dispatcher's ``regate_epoch`` moves on, so compiled graphs that baked the old
backend trace again at their next call (Dynamo guards on it)."""

from __future__ import annotations

import dataclasses
import logging

import torch

from ..store.decision import REJECTED
from ..tuning.reference import gate_heads, reference_slice, relative_l1
from .plan import Plan

logger = logging.getLogger("diffsynth_attention")


def regate(d, plan: Plan, call, key, usable, unsupported, usable_names, dev, mode) -> Plan:
    """``plan`` (a stored decision gated on synthetic inputs) checked on ``call``'s own data (the
    :class:`~diffsynth_attention.problem.Call` with the caller's tensors); the plan to serve it with."""
    decision, name, problem = plan.decision, plan.backend, call.problem
    heads = gate_heads(problem.heads_q)
    tolerance = d.tolerance(problem)
    with torch.no_grad():
        ref = reference_slice(*call.canonical, call.mask4, call.scale, problem.causal, problem.window, heads)
        out = plan.run(call.q, call.k, call.v, call.mask, call.scale)
        out_c = call.out_canonical(out)
        error = relative_l1(out_c[0, heads], ref)
    del out, out_c, ref
    chosen = decision.candidates.get(name)
    if error <= tolerance:
        kept = chosen if chosen is None else dataclasses.replace(chosen, error=max(chosen.error or 0.0, error))
        real = decision.replace(evidence=None, candidates={**decision.candidates, **({name: kept} if kept else {})})
        d.store.put(real)
        logger.info("%s: %s passed the numeric gate on the first real call (error %.3g), as on random inputs",
                    problem.describe(), name, error)
        return Plan(plan.run, plan.backend, plan.source, plan.key, plan.call, plan.grad, real, counts_hit=plan.counts_hit,
                    reasons=plan.reasons, requested=plan.requested)
    why = (f"failed the numeric gate on the first real call: error {error:.3g} > tolerance {tolerance:.3g} "
           "(it passed on random inputs at trace time)")
    failed = dataclasses.replace(chosen, status=REJECTED, error=error, reason=why) if chosen is not None else None
    d.store.put(decision.replace(candidates={**decision.candidates, **({name: failed} if failed else {})}))
    d.regate_epoch = str(int(d.regate_epoch) + 1)  # graphs that baked it: traced again at their next call
    d.warn_once(("regate", key.id, name), "%s: %s %s; tuning the key again on this call", problem.describe(), name, why)
    return d.tune_key(call, key, usable, unsupported, usable_names - {name}, dev, mode=mode)
