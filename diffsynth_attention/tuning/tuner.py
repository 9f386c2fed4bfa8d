"""Tuning one key: a small pipeline of named steps over one :class:`~.trial.Trial`, by the rules
of a :class:`~.policy.TuningPolicy` (defaults in brackets).

1. **plan** - the cost models. Each backend predicts the memory one call allocates and a rough
   time. A candidate predicted to allocate more than the free device memory, or predicted more
   than ``skip_factor`` (4x) slower than the best prediction among the candidates still in the
   running (not rejected), is ``skipped`` with its prediction as the reason, and never run. The
   others go through the next two steps one at a time, fastest prediction first.
2. **gate** - the kernel package is imported now (a broken install makes the candidate
   unsupported, with the reason); one untimed call (compilation happens here: its time is
   ``first_call_ms``, counted as setup, never as a timing); its output is compared with the fp32
   reference on a slice (batch 0, at most two heads): a relative L1 error above the tolerance of
   the problem's dtype (docs/tuning.md), a NaN or an Inf rejects it; so do an exception, an
   out-of-memory error and a change to its input tensors.
3. **warm** - samples until two consecutive ones agree within ``warm_agree`` (10%), or
   ``warm_cap`` (6) samples: the calls after a JIT compilation, a cuDNN plan build or a lazy
   module load are not timings. The lower of the last two samples is the candidate's *warm
   probe*. Warm-up is setup, outside the budget, like compilation.
4. **probe** - which candidates join the interleaved rounds: those whose warm probe is within
   ``retime`` (1.5x) of the best warm probe. A second look at each of the others: it joins too
   if its prediction is within 1.5x of the best prediction, or if one more probe, taken now that
   every candidate is warm, is within 1.5x of the best; else it is ``slower``, with both probes.
5. **rounds** - each round samples each candidate once, in a new order (no candidate always
   behind the same one: a kernel's time depends on what ran before it); every candidate
   gets at least ``min_rounds`` (3) samples (a long call is one call per sample, so one outlier
   cannot decide), and the rounds go on while the budget has room (up to ``max_rounds``). When
   not even ``min_rounds`` rounds fit, the slowest candidates leave the rounds first.
6. **choose** - the medians of the rounds only. Candidates within the measured noise of the
   fastest (the interquartile spread of their samples over their median, at least ``tie_floor``
   2% and at most ``tie_cap`` 2.5%) are a tie, which goes to the preference order of
   :mod:`diffsynth_attention.backends`; the chosen candidate's reason says so.

7. **confirm** (:mod:`.confirm`) - each execution mode's pick (eager; compiled: host + device
   time; CUDA graphs: device time), and a paired re-time of every pick other than the default
   (``torch``) against it: kept only when faster by more than the noise, else the default; too
   noisy to decide: the decision is stored provisional (docs/tuning.md).

Candidates are timed as the hit path calls them: the runner from ``make_runner`` (the same one a
plan binds), called back to back with its arguments bound, host cost included.

**Budget.** Tuning time from the probe step on (second looks and rounds; setup before it, the
reference, kernel-package imports, first calls and warm-up, never counts) stays within
``max(budget floor, 15 x the fastest time measured)``; the floor is
``DIFFSYNTH_ATTENTION_TUNING_BUDGET`` (1.5 s) unless the policy sets one.

Candidates run on private copies of the caller's tensors (same strides), so the caller's
tensors are never modified, and only one candidate output is alive at a time. A call on random
stand-ins (a key first met while a graph is traced) is tuned on those stand-ins themselves: the
tuning holds one set of q, k and v, never a second copy (:mod:`.trial`). Every listener of
the policy hears of the decision: ``listener(key, decision, timings, cache_hit=False)``.
"""

from __future__ import annotations

import datetime
import functools
import logging
import statistics
from typing import Callable, Optional

import torch

from ..backends import PREFERENCE
from ..store.decision import ACCEPTED, CHOSEN, DEFAULT_BACKEND, EAGER, REJECTED, SKIPPED, SLOWER, UNSUPPORTED, Decision
from .policy import DEFAULT_POLICY, TuningPolicy
from .reference import gate_heads, relative_l1
from .confirm import choose, confirm, confirm_reserve_s, host_bound, mode_winners, relative_spread
from .timing import Timer, round_order
from .trial import Result, Run, Trial, copy_input, describe_exception, fingerprint, finite_inputs, free_memory, gib, recover
from .trial import same as _same  # noqa: F401 (tests use tuner._same)

logger = logging.getLogger("diffsynth_attention")

__all__ = ["TuningPolicy", "tune", "choose", "plan_skips", "relative_spread"]


def plan_skips(backends: list, problem, dev, free_bytes: Optional[int]) -> tuple:
    """({name: reason} skipped for memory, {name: predicted ms}) from the backends' cost models."""
    memory, predictions = {}, {}
    for backend in backends:
        need = backend.predicted_bytes(problem)
        if free_bytes is not None and need > free_bytes:
            memory[backend.name] = (f"skipped: predicted to allocate {gib(need)}, more than the {gib(free_bytes)} "
                                    "free on the device; not run")
        ms = backend.predicted_ms(problem, dev)
        if ms is not None:
            predictions[backend.name] = ms
    return memory, predictions


# -- the steps ------------------------------------------------------------------------------------------------
def plan(trial: Trial, backends: list) -> list:
    """Step 1: memory skips and predictions; the candidates to run, fastest prediction first."""
    free = free_memory(trial.device) if trial.policy.early_skip else None
    trial.memory_skips, trial.predictions = plan_skips(backends, trial.problem, trial.dev, free)
    for backend in backends:
        if backend.name in trial.memory_skips:
            trial.results[backend.name] = Result(SKIPPED, reason=trial.memory_skips[backend.name],
                                                    predicted_ms=trial.predictions.get(backend.name))
    pending = [b for b in backends if b.name not in trial.memory_skips]
    pending.sort(key=lambda b: trial.predictions.get(b.name, 0.0))  # stable: preference order among equals
    return pending


def _alive_predictions(trial: Trial) -> dict:
    """Predictions of the candidates still in the running (not memory-skipped, rejected or unsupported)."""
    return {n: ms for n, ms in trial.predictions.items() if n not in trial.memory_skips
            and trial.results.get(n, Result(ACCEPTED)).status not in (REJECTED, UNSUPPORTED)}


def time_skips(trial: Trial) -> dict:
    """{name: (best name, best prediction)} for candidates predicted more than ``skip_factor`` x the
    best prediction among those still in the running; recomputed as the first pass goes."""
    alive = _alive_predictions(trial)
    if not trial.policy.early_skip or not alive:
        return {}
    best_name = min(alive, key=alive.get)
    best = alive[best_name]
    return {n: (best_name, best) for n, ms in alive.items() if ms > trial.policy.skip_factor * best}


def gate(trial: Trial, backend) -> Optional[Run]:
    """Step 2: import, one untimed call (setup), the numeric gate and the input check."""
    name, call, clock = backend.name, trial.call, trial.policy.clock
    cand = Result(REJECTED, predicted_ms=trial.predictions.get(name))
    trial.results[name] = cand
    t_import = clock()
    why = backend.unavailable_reason()  # the kernel package is imported here, at first use: setup
    trial.setup_s += clock() - t_import
    if why is not None:
        cand.status, cand.reason = UNSUPPORTED, why
        return None
    run = trial.make_runner(backend)
    copies, mask, scale = trial.copies, call.mask, call.scale
    try:
        trial.timer.sync()
        t0 = clock()
        out = run(copies[0], copies[1], copies[2], mask, scale)
        trial.timer.sync()
        cand.first_call_ms = (clock() - t0) * 1e3
        trial.setup_s += cand.first_call_ms / 1e3
        out_c = call.out_canonical(out.detach())
        cand.error = relative_l1(out_c[0, trial.heads], trial.ref)
        check = trial.bounds.get(name)  # a low-precision candidate: its tier's bound instead of the tolerance
        beyond = check(out_c[0, trial.heads], trial.ref, out_c) if check is not None else None
        del out, out_c
    except Exception as exc:  # a failing candidate is rejected; the others go on
        cand.reason = describe_exception(exc)
        recover(trial.device)
        trial.restore()
        return None
    changed = trial.changed()
    if changed:
        cand.reason = f"modified its input tensor(s) {', '.join(changed)} in place"
        trial.restore()
        return None
    if cand.error != cand.error or cand.error == float("inf"):
        cand.reason = "output has NaN or Inf"
        return None
    if check is not None and beyond is not None:
        cand.reason = beyond
        return None
    if check is None and cand.error > trial.tolerance:
        cand.reason = f"error {cand.error:.3g} above tolerance {trial.tolerance:g}"
        return None
    cand.reps = 1
    if not trial.grad:
        return Run(backend, cand, functools.partial(run, copies[0], copies[1], copies[2], mask, scale))  # what a hit runs
    grad_out = []

    def call():
        with torch.enable_grad():
            out = run(copies[0], copies[1], copies[2], mask, scale)
            if not grad_out:
                grad_out.append(torch.randn_like(out))
            out.backward(grad_out[0])
        for c in copies:
            c.grad = None
    try:  # a backward pass compiles too: setup, kept out of the timings
        t0 = clock()
        call()
        trial.timer.sync()
        trial.setup_s += clock() - t0
        cand.reps += 1
    except Exception as exc:
        cand.reason = describe_exception(exc)
        recover(trial.device)
        return None
    return Run(backend, cand, call)


def warm(trial: Trial, run: Run) -> bool:
    """Step 3: samples until two consecutive ones agree (or the cap); False if it raised (rejected)."""
    policy, cand = trial.policy, run.cand
    t0 = policy.clock()
    calls = 1  # the first sample is one call; each next one is sized from the last (about sample_ms)
    try:
        while True:
            run.warm.append(trial.timer.sample(run.call, calls, warm=False))
            cand.reps += calls
            if len(run.warm) >= 2 and policy.agree(run.warm[-2], run.warm[-1]):
                run.settled = True
                break
            if len(run.warm) >= policy.warm_cap:
                break
            calls = Timer.calls_for(run.warm[-1], policy.sample_ms)
    except Exception as exc:
        cand.status, cand.reason = REJECTED, describe_exception(exc)
        recover(trial.device)
        return False
    finally:
        trial.setup_s += policy.clock() - t0
    run.probe_ms = min(run.warm[-2:])
    run.calls = Timer.calls_for(run.probe_ms, policy.sample_ms)
    cand.status, cand.time_ms = ACCEPTED, run.probe_ms
    if not run.settled:
        logger.info("%s did not settle in %d warm-up samples (%s ms); its probe is the lower of the last two",
                    run.name, policy.warm_cap, ", ".join(f"{s:.4g}" for s in run.warm))
    return True


def probe(trial: Trial) -> list:
    """Step 4: the candidates that join the rounds, fastest warm probe first (with a second look
    at the others)."""
    policy = trial.policy
    runs = trial.runs
    trial.timing_from = policy.clock()  # the budget starts now: everything before was setup
    if not runs:
        return []
    best = trial.best_probe()
    near = [n for n, r in runs.items() if r.probe_ms <= policy.retime * best]
    preds = {n: trial.predictions[n] for n in runs if n in trial.predictions}
    best_pred = min(preds.values(), default=None)
    for name, run in runs.items():
        if name in near:
            continue
        pred = preds.get(name)
        if pred is not None and pred <= policy.retime * best_pred:
            near.append(name)
            continue
        look = ", no room in the budget for a second look"
        if trial.spent() + run.sample_cost_s() <= policy.budget_margin * trial.limit(best):
            try:
                run.second_look.append(trial.timer.sample(run.call, run.calls, warm=run.calls > 1))
                run.cand.reps += run.calls + (1 if run.calls > 1 else 0)
            except Exception as exc:
                run.cand.status, run.cand.reason, run.cand.time_ms = REJECTED, f"in the second look: {describe_exception(exc)}", None
                recover(trial.device)
                continue
            if run.second_look[-1] <= policy.retime * best:
                near.append(name)
                continue
            look = f", second look {run.second_look[-1]:.4g} ms"
        run.cand.status = SLOWER
        run.cand.reason = (f"warm probe {run.probe_ms:.4g} ms{look} is more than {policy.retime:g}x the best "
                           f"({best:.4g} ms)" + (f" and its prediction {pred:.4g} ms more than {policy.retime:g}x the best "
                                                 f"prediction" if pred is not None else "") + ": not re-timed")
    return sorted(near, key=lambda n: runs[n].probe_ms)


def rounds(trial: Trial, near: list) -> list:
    """Step 5: interleaved rounds over ``near``; returns the names that have round samples."""
    policy, runs = trial.policy, trial.runs
    best = runs[near[0]].probe_ms if near else None

    def room(names, count, fastest_ms) -> bool:
        reserve = confirm_reserve_s(trial, names)
        return (trial.spent() + count * sum(runs[n].sample_cost_s(trial.timer.cuda) for n in names) + reserve
                <= policy.budget_margin * trial.limit(fastest_ms))

    while len(near) > 1 and not room(near, policy.min_rounds, best):
        dropped = near.pop()  # the slowest first: the budget has no room for its rounds
        runs[dropped].cand.status = SLOWER
        runs[dropped].cand.reason = (f"warm probe {runs[dropped].probe_ms:.4g} ms; not re-timed: the budget "
                                     f"({trial.limit(best):.3g} s) had no room for {policy.min_rounds} rounds with it")
    if len(near) < 2:
        return []
    alive = list(near)
    fastest_ms = best
    for i in range(policy.max_rounds):
        if i >= policy.min_rounds and not room(alive, 1, fastest_ms):
            break
        for name in round_order(alive, i):
            run = runs[name]
            try:
                fastest_ms = min(fastest_ms, run.take(trial.timer.measure(run.call, run.calls, warm=run.calls > 1)))
                run.cand.reps += run.calls + (1 if run.calls > 1 else 0)
            except Exception as exc:
                run.cand.status, run.cand.time_ms = REJECTED, None
                run.cand.reason = f"in the interleaved rounds: {describe_exception(exc)}"
                alive.remove(name)
                recover(trial.device)
        if not alive:
            break
    return alive


def choose_winner(trial: Trial, near: list, timed: list) -> tuple:
    """Step 6: (winner or None, the winner's reason) from the round medians and the tie rule."""
    runs, policy = trial.runs, trial.policy
    if not timed:  # one candidate left (no rounds needed), or every one in the rounds raised: the fastest probe left
        survivors = sorted((n for n in runs if runs[n].cand.status != REJECTED), key=lambda n: (n not in near, runs[n].probe_ms))
        return (survivors[0] if survivors else None), None
    medians = {n: statistics.median(runs[n].rounds) for n in timed}
    noise = {n: relative_spread(runs[n].rounds) for n in timed}
    for name in timed:
        runs[name].cand.time_ms = medians[name]
    if len(timed) == 1:
        return timed[0], None
    fragile = host_bound(runs, timed, policy)
    winner, fastest, tie = choose(medians, noise, policy, trial.order, fragile)
    count = min(len(runs[n].rounds) for n in timed)
    for name, ms in medians.items():
        if name == winner:
            continue
        t = policy.tie_threshold(noise.get(fastest), noise.get(name))
        if ms <= medians[fastest] * (1 + t):
            other = winner if name == fastest else fastest
            why = (f" ({name} is host-bound: its eager time follows the host's)" if name in fragile and winner not in fragile
                   else " by order")
            runs[name].cand.reason = f"tie with {other} (within {t * 100:.1f}% noise): {winner} is preferred{why}"
        else:
            runs[name].cand.reason = f"{(ms / medians[winner] - 1) * 100:.1f}% slower than {winner} in {count} interleaved rounds"
    if winner != fastest:
        by = "not host-bound" if fastest in fragile and winner not in fragile else "by order"
        return winner, (f"tie with {fastest} (within {tie * 100:.1f}% noise): preferred {by} "
                        f"({(medians[winner] / medians[fastest] - 1) * 100:.1f}% apart in {count} interleaved rounds)")
    return winner, None


# -- the pipeline -----------------------------------------------------------------------------------------------
def tune(
    call,
    backends: list,
    unsupported: dict,
    key,
    make_runner: Callable,
    dev,
    tolerance: float,
    policy: Optional[TuningPolicy] = None,
    bounds: Optional[dict] = None,
) -> Decision:
    """Tune one key on ``call`` (a :class:`~diffsynth_attention.problem.Call` with its tensors).
    ``make_runner(backend)`` gives the runner a plan would bind, ``run(q, k, v, mask, scale) ->
    output`` in the caller's out_pattern, conversions included: what the caller pays. ``dev``
    feeds the cost models; ``tolerance``: the gate's, the one trust rule (the dispatcher's,
    never recomputed here). ``bounds``: name -> check for the low-precision candidates of a
    quality tier (Trial.bounds)."""
    policy = policy or DEFAULT_POLICY
    started = policy.clock()
    loads = set(policy.loading())  # a background load now (one left out late among them) makes it provisional
    call = finite_inputs(call)
    device = call.q.device
    if call.synthetic:  # random stand-ins made for this tuning: the candidates run on them, no second copy
        copies = [t.detach().requires_grad_(call.grad and t.requires_grad) for t in (call.q, call.k, call.v)]
    else:
        copies = [copy_input(t, call.grad) for t in (call.q, call.k, call.v)]
    trial = Trial(call=call, key=key, policy=policy, make_runner=make_runner, timer=Timer(device, policy.clock),
                  started=started, tolerance=tolerance, floor_s=policy.budget_floor(), ref=None,
                  heads=gate_heads(call.problem.heads_q), copies=copies, dev=dev, bounds=dict(bounds or {}))
    if call.synthetic:
        trial.fingerprints = [fingerprint(c) for c in copies]
    trial.ref = trial.reference()
    for name, reasons in unsupported.items():
        trial.results[name] = Result(UNSUPPORTED, reason="; ".join(reasons))

    with torch.set_grad_enabled(trial.grad):
        pending = plan(trial, backends)
        done = set()
        while True:  # a skip holds only while the prediction that justified it is still in the running
            skips = time_skips(trial)
            todo = [b for b in pending if b.name not in done and b.name not in skips]
            if not todo:
                break
            done.add(todo[0].name)
            run = gate(trial, todo[0])
            if run is not None and warm(trial, run):
                trial.runs[run.name] = run
        for backend in pending:
            if backend.name not in done:
                best_name, best = skips[backend.name]
                pred = trial.predictions[backend.name]
                trial.results[backend.name] = Result(
                    SKIPPED, predicted_ms=pred,
                    reason=(f"skipped: predicted {pred:.4g} ms, more than {policy.skip_factor:g}x the best prediction "
                            f"({best:.4g} ms, {best_name}); not run"))
        near = probe(trial)
        timed = rounds(trial, near)
        winner, note = choose_winner(trial, near, timed)
        modes, provisional, confirmation = {}, False, None
        if winner is not None:
            for name in timed:
                run = trial.runs[name]
                if run.host and run.device:
                    run.cand.host_ms, run.cand.device_ms = statistics.median(run.host), statistics.median(run.device)
            modes = {EAGER: winner, **mode_winners(trial, timed)}
            default = trial.runs.get(DEFAULT_BACKEND)
            reps = default.cand.reps if default is not None else None
            modes, provisional, confirmation = confirm(trial, modes)
            if default is not None and default.cand.status == SLOWER and default.cand.reps > reps:  # left out of the
                default.cand.reason = default.cand.reason.replace("; not re-timed: ", "; not in the interleaved rounds: ") \
                    + "; re-timed in the confirmation (its text)"  # rounds, then re-timed against the winners there
            loads |= set(policy.loading())
            if loads:  # timed beside a load holding the GIL (H100, s11: torch 10x its time), or without its backend
                provisional = True
                confirmation = (f"{confirmation}; " if confirmation else "") + f"provisional: timed while {', '.join(sorted(loads))} loaded on a " \
                               f"background thread (a later quiet process re-times it)"
            if modes[EAGER] != winner:
                if trial.results[winner].status != REJECTED:  # one that raised in the re-time stays rejected, with why
                    trial.results[winner].status = ACCEPTED
                    trial.results[winner].reason = confirmation
                # its own reason: without one, explain's fallback called it a tie by order with the rounds' pick
                winner, note = modes[EAGER], f"chosen by the confirmation re-time over {winner}, the rounds' pick"

    if winner is None:
        winner = "torch"
        logger.warning("no backend passed the numeric gate for %s; using torch. Candidates: %s",
                       key.fields["problem"], {n: c.reason for n, c in trial.results.items()})
    else:
        trial.results[winner].status = CHOSEN
        trial.results[winner].reason = note
    decision = Decision(
        key_id=key.id,
        key=key.fields,
        backend=winner,
        candidates={n: trial.results[n].freeze() for n in PREFERENCE if n in trial.results},
        tolerance=trial.tolerance,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        tuning_seconds=round(policy.clock() - started, 6),
        compile_seconds=round(trial.setup_s, 6),
        modes={m: b for m, b in modes.items() if m != EAGER},
        provisional=provisional,
        confirmation=confirmation,
    )
    policy.notify(key, decision, trial.timings(), False)
    return decision
