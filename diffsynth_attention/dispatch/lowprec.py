"""Low-precision quality tiers in the dispatcher (docs/quality.md): the gate's bounds on the
caller's own activations, the evidence a decision records, and the sentinel that keeps
watching a low-precision decision and falls back to the best exact backend on drift.

Nothing here runs for the ``exact`` tier: its plans are bound as before, with no wrapper on the
hot path.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import math
import time
from typing import Optional

import torch

from .. import config, process, tiers
from ..callsite import in_graph
from ..backends import REGISTRY
from ..states import TIMED
from ..store.decision import ACCEPTED, CHOSEN, REJECTED, Decision
from ..tuning.reference import cosine, gate_heads, reference_slice, relative_l1
from .runners import make_runner

logger = logging.getLogger("diffsynth_attention")

SENTINEL_ROWS = 256  # query rows of each checked head (all rows for causal and windowed calls)


def tier_of_key(key) -> str:
    return key.fields.get("quality", tiers.EXACT)


from ..tolerance import with_tier as tolerance  # noqa: E402,F401 - the tier's tolerance (one rule)


GATE_ROWS = 1024  # query rows per head of the gate's all-heads check (every row when causal or windowed)


def head_errors(out_b0, qc, kc, vc, mask4, scale, causal: bool, window, rows: int = GATE_ROWS, batch: int = 0,
                heads: Optional[list] = None) -> list:
    """[(relative L1, cosine)] per query head of batch element ``batch`` (``heads``: those heads
    only; every head by default): ``out_b0`` (n, s_q, d_v), that element's output, against the fp32
    reference on ``rows`` query rows spread over the sequence (every row when causal or windowed,
    whose rows depend on their position). Rows are independent: a spread sample estimates each
    head's error without the full reference's cost."""
    n, s_q = out_b0.shape[0], out_b0.shape[1]
    heads = list(range(n)) if heads is None else heads
    with torch.no_grad():
        q0, k0, v0 = (t[batch:batch + 1] for t in (qc, kc, vc))
        m4 = mask4 if mask4 is None or mask4.shape[0] == 1 else mask4[batch:batch + 1]
        if not causal and window is None and s_q > rows:
            idx = torch.linspace(0, s_q - 1, rows, device=qc.device).round().long()
            q0, out_b0 = q0[:, :, idx], out_b0[:, idx]
            if m4 is not None and m4.shape[2] > 1:
                m4 = m4[:, :, idx]
        ref = reference_slice(q0, k0, v0, m4, scale, causal, window, heads)
        return [(relative_l1(out_b0[h], ref[i]), cosine(out_b0[h], ref[i])) for i, h in enumerate(heads)]


NOT_FINITE = ("the tuning call's q/k/v are not finite: a low-precision kernel is gated only on the caller's own "
              "activations")


def gate_checks(tier: str, usable: list, unsupported: dict, qkv: tuple, call=None, mask4=None) -> tuple:
    """(``bounds`` for :func:`tuning.tuner.tune`, the evidence dict they fill, the usable backends
    and the unsupported ones' reasons). A check passes a low-precision candidate when, on the
    caller's own q, k, v, the gate's slice (batch 0, the first and last heads, every row), every
    head of batch 0 and, in a batch of several, the first and last heads of the last element (a
    classifier-free-guidance batch's other half), on :data:`GATE_ROWS` spread rows, are all within
    the tier's bound.
    Where q, k, v are not finite (the tuner then gates on random stand-ins), the low-precision
    candidates are refused."""
    b = tiers.bound(tier)
    evidence, bounds, refused = {}, {}, {}
    if b is None:
        return bounds, evidence, usable, unsupported
    inputs_finite = all(bool(torch.isfinite(t.detach()).all()) for t in qkv)
    p = None if call is None else call.problem
    for backend in usable:
        if not backend.low_precision:
            continue
        if not inputs_finite:  # the tuner would gate on random stand-ins: never for a low-precision kernel
            refused[backend.name] = [NOT_FINITE]
            continue

        def check(out, ref, out_all=None, name=backend.name):
            rel, cos = relative_l1(out, ref), cosine(out, ref)
            ev = evidence[name] = {"rel_l1": rel if rel == rel and rel != float("inf") else None, "cosine": cos,
                                   "on": "the caller's q, k, v: batch 0, the first and last query heads, every row"}
            why = b.violation(rel, cos)
            if why is not None or out_all is None or p is None:
                return why
            per = [((0, h), e) for h, e in enumerate(head_errors(out_all[0], qkv[0], qkv[1], qkv[2], mask4, call.scale,
                                                                    p.causal, p.window))]
            last = out_all.shape[0] - 1
            if last > 0:
                heads = gate_heads(out_all.shape[1])
                per += list(zip(((last, h) for h in heads), head_errors(out_all[last], qkv[0], qkv[1], qkv[2], mask4, call.scale,
                                                                        p.causal, p.window, batch=last, heads=heads)))
            (wb, wh), worst = max(per, key=lambda x: (b.violation(*x[1]) is not None, x[1][0]))
            ev.update(worst_head=wh, worst_head_batch=wb, worst_head_rel_l1=worst[0], worst_head_cosine=worst[1])
            why = b.violation(*worst)
            return None if why is None else f"batch {wb} head {wh}: {why}" if last > 0 else f"head {wh}: {why}"
        bounds[backend.name] = check
    return bounds, evidence, [u for u in usable if u.name not in refused], {**unsupported, **refused}


def annotate(decision: Decision, tier: str, evidence: dict) -> Decision:
    """Record the tier, its bound and the gate's evidence in a decision of a low-precision tier. One
    whose low-precision candidates could not be gated (q, k or v not finite) is provisional: never final."""
    b = tiers.bound(tier)
    if b is None:
        return decision
    decision = dataclasses.replace(decision, quality={"tier": tier, "bound": b.as_dict(), "gate": dict(evidence), "fallback": None})
    blind = sorted(n for n, c in decision.candidates.items() if c.reason == NOT_FINITE)
    if blind:  # not gated at all: a later quiet process (or `cache verify --fix`) gates them on finite data
        note = f"provisional: {', '.join(blind)} not gated (the tuning call's q/k/v were not finite)"
        decision = dataclasses.replace(decision, provisional=True,
                                       confirmation=f"{decision.confirmation}; {note}" if decision.confirmation else note)
    return decision


# -- the sentinel -------------------------------------------------------------------------------
@dataclasses.dataclass
class Sentinel:
    """What one key's sentinel saw in this process. ``every``: the period in force (calls per
    check); ``next_check``: the call count at which the next check runs; ``last_batch`` and
    ``last_heads``: the slice the last check measured. ``checking``: held while a check runs, so
    that threads calling at once run one check, not one each (``calls`` is a count of this
    process's calls, approximate where threads call at once)."""

    every: int
    calls: int = 0
    checks: int = 0
    last_rel_l1: Optional[float] = None
    last_cosine: Optional[float] = None
    last_check_ms: Optional[float] = None
    fell_back: bool = False
    next_check: int = 0
    last_batch: Optional[int] = None
    last_heads: Optional[list] = None
    position: int = 0  # the slice the next check measures (check_slice): moves on past a skipped one too
    checking: object = dataclasses.field(default_factory=process.new_lock, repr=False, compare=False)

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "checking"}


# With DIFFSYNTH_ATTENTION_SENTINEL_EVERY unset, a check costs at most this share of the
# attention time of the calls between two checks: the period stretches after each check to
# max(default, check time / (share x the decision's time per call)).
SENTINEL_SHARE = 0.01


def _canonical_out(out, call) -> torch.Tensor:
    return call.out_canonical(out.detach())


def check_slice(check: int, batch: int, heads_q: int) -> tuple:
    """(batch element, query heads) that sentinel check number ``check`` measures: each batch
    element in turn (a classifier-free-guidance pair's unconditional half too), and for each, the
    gate's first and last heads, then the next pair of heads at each round, so that every head
    of every batch element is watched in turn. With batch 1: batch 0 and the heads' rotation."""
    b, pair = check % batch, check // batch
    heads = gate_heads(heads_q) if pair == 0 else sorted({(2 * pair) % heads_q, (2 * pair + 1) % heads_q})
    return b, heads


def measure(call, q, k, v, mask, scale, out, check: int = 0) -> Optional[tuple]:
    """(relative L1, cosine, batch element, heads) of ``out`` against the fp32 reference on one
    slice of this call (None where that batch element of q, k or v is not finite: every backend's
    output is then, no drift): the batch element and two query heads :func:`check_slice` names,
    up to SENTINEL_ROWS query rows spread over the sequence (every row when causal or windowed:
    those depend on the row's position)."""
    from ..problem import mask_4d

    p = call.problem
    bi, heads = check_slice(check, p.batch, p.heads_q)
    to_q, to_k, to_v = call.layout.to_canonical
    with torch.no_grad():
        qc, kc, vc = (t[bi:bi + 1] for t in (to_q(q.detach()), to_k(k.detach()), to_v(v.detach())))
        if not all(bool(torch.isfinite(t).all()) for t in (qc, kc, vc)):
            return None
        oc = _canonical_out(out, call)[bi:bi + 1]
        m4 = mask_4d(mask)
        if m4 is not None and m4.shape[0] > 1:
            m4 = m4[bi:bi + 1]
        if not p.causal and p.window is None and p.seq_q > SENTINEL_ROWS:
            rows = torch.linspace(0, p.seq_q - 1, SENTINEL_ROWS, device=qc.device).round().long()
            qc, oc = qc[:, :, rows], oc[:, :, rows]
            if m4 is not None and m4.shape[2] > 1:
                m4 = m4[:, :, rows]
        ref = reference_slice(qc, kc, vc, m4, scale if scale is not None else call.scale, p.causal, p.window, heads)
        got = oc[0, heads]
        return relative_l1(got, ref), cosine(got, ref), bi, heads


def best_exact(decision: Decision) -> str:
    """The fastest exact candidate that passed the gate in ``decision`` (``torch`` if none)."""
    timed = sorted((c.time_ms, n) for n, c in decision.candidates.items()
                   if n in REGISTRY and not REGISTRY[n].low_precision and c.status in TIMED
                   and c.time_ms is not None)
    return timed[0][1] if timed else "torch"


_fallback_lock = process.new_lock()


def fall_back(d, decision: Decision, state: Sentinel, rel: float, cos: float, why: str) -> Decision:
    """Store ``decision`` with the best exact backend chosen instead of its low-precision one, the
    measured error recorded; one warning. The store's listeners drop the key's plans."""
    low, exact = decision.backend, best_exact(decision)
    cands = dict(decision.candidates)
    tier = (decision.quality or {}).get("tier")
    cands[low] = dataclasses.replace(
        cands[low], status=REJECTED, reason=f"sentinel: {why} on the caller's data after {state.calls} calls; fell back to {exact}")
    if exact in cands:
        cands[exact] = dataclasses.replace(
            cands[exact], status=CHOSEN, reason=f"the best exact candidate: {low} drifted beyond the {tier} bound")
    record = dict(decision.quality or {})
    record["fallback"] = {"from": low, "to": exact, "rel_l1": rel if rel == rel and rel != float("inf") else None,
                          "cosine": cos, "after_calls": state.calls, "checks": state.checks,
                          "at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    # not provisional: a re-time would gate the drifted backend again (a fallback stays until the cache is cleared)
    new = dataclasses.replace(decision, backend=exact, candidates=cands, quality=record, modes={}, provisional=False)
    # one warning per fallback: per watched decision (its Sentinel), so the key's next fallback after
    # clear_cache() and a new low-precision pick is told too
    d.warn_once(("sentinel", decision.key_id, id(state)),
                "quality sentinel: %s drifted on key %s (%s after %d calls); falling back to %s for this key",
                low, decision.key_id, why, state.calls, exact)
    try:
        d.store.put(new)
    except Exception:  # a store that cannot write keeps the fallback in memory (put's memory step ran)
        logger.warning("quality sentinel: the fallback of key %s could not be saved", decision.key_id, exc_info=True)
    return new


def watched(d, run, decision: Decision, key, call, grad: bool):
    """``run`` of a low-precision decision with its sentinel: every Nth call measures one slice
    against the reference (DIFFSYNTH_ATTENTION_SENTINEL_EVERY when set; else 200, stretched so
    that checks cost at most 1% of the attention time); on drift beyond the tier's bound the key
    falls back to the best exact backend, and this call's output is the exact backend's. Other
    plans are never wrapped."""
    b = tiers.bound(tier_of_key(key))
    every = config.sentinel_every()
    adaptive = config._raw(config.SENTINEL_EVERY) is None
    chosen = decision.candidates.get(decision.backend)
    call_ms = chosen.time_ms if chosen is not None and chosen.time_ms else None
    state = d.sentinels.get(key.id)
    if state is None or state.fell_back or (not adaptive and state.every != every):  # fell back: a new decision since
        state = d.sentinels[key.id] = Sentinel(every, next_check=every)
    if b is None or every == 0:
        return run

    instead = []  # the best exact backend's runner, once this decision has fallen back

    def checked(q, k, v, mask, scale):
        if state.fell_back:  # a plan of the decision that fell back (one planned while it fell back, by another
            if not instead:  # thread, is stored after the fallback dropped the key's plans): the exact backend serves
                instead.append(make_runner(REGISTRY[best_exact(decision)], call, grad))
            d.invalidate(key.id)  # and the next call plans again, from the stored fallback
            return instead[0](q, k, v, mask, scale)
        out = run(q, k, v, mask, scale)
        state.calls += 1
        if state.calls < state.next_check:
            return out
        if in_graph(q.device.type):  # a CUDA graph being captured (or a trace): no synchronising there; the
            return out  # next call outside it checks (replays of a captured graph run no check: docs/quality.md)
        if not state.checking.acquire(blocking=False):  # another thread's check is running: that one counts
            return out
        try:
            if state.calls < state.next_check:  # that thread's check ran meanwhile
                return out
            t0 = time.perf_counter()
            got = measure(call, q, k, v, mask, scale, out, state.position)  # reads two floats: the device is synchronised
            state.position += 1  # a batch element that stays non-finite does not hide the others
            if got is None:  # the caller's data is not finite: checked again a period later, on the next slice
                state.next_check = state.calls + state.every
                return out
            rel, cos, state.last_batch, state.last_heads = got
            state.last_check_ms = (time.perf_counter() - t0) * 1e3
            state.checks += 1
            state.last_rel_l1, state.last_cosine = rel, cos
            if adaptive and call_ms:
                state.every = max(every, math.ceil(state.last_check_ms / (SENTINEL_SHARE * call_ms)))
            state.next_check = state.calls + state.every
        finally:
            state.checking.release()
        why = b.violation(rel, cos)
        if why is None:
            return out
        with _fallback_lock:
            if state.fell_back:
                return out
            state.fell_back = True
        new = fall_back(d, decision, state, rel, cos, why)
        return make_runner(REGISTRY[new.backend], call, grad)(q, k, v, mask, scale)
    return checked


def stand_in(d, run, name: str, decision: Decision, key, call, grad: bool):
    """``run`` of ``name``, standing in for ``decision``'s backend (dropped for the key in this
    process): a low-precision one of a quality tier is watched as its own decision would be (its
    sentinel's fallback stores it rejected, and the next plan demotes to an exact backend); every
    other one is bound as it is."""
    if not (REGISTRY[name].low_precision and "quality" in key.fields):
        return run
    cands = {n: dataclasses.replace(c, status=ACCEPTED) if c.status == CHOSEN else c for n, c in decision.candidates.items()}
    cands[name] = dataclasses.replace(cands[name], status=CHOSEN)
    return watched(d, run, decision.replace(backend=name, candidates=cands), key, call, grad)


def explain_quality(d, plan) -> Optional[dict]:
    """What ``explain`` shows of the tier: the tier, its bound, the gate's and the sentinel's
    last measured errors and the sentinel's counts (None in the exact tier)."""
    tier = tier_of_key(plan.key)
    b = tiers.bound(tier)
    if b is None:
        return None
    record = (plan.decision.quality if plan.decision is not None else None) or {}
    state = d.sentinels.get(plan.key.id)
    return {"tier": tier, "bound": b.as_dict(), "gate": record.get("gate", {}), "fallback": record.get("fallback"),
            "sentinel": None if state is None else state.as_dict()}
