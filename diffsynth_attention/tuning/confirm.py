"""Step 7 of tuning (:mod:`.tuner`): one pick per execution mode, and the confirmation of every
non-default winner against the default in a separate paired re-time (docs/tuning.md, "Confirmed
before stored; priced per mode; re-checked when in doubt")."""

from __future__ import annotations

import dataclasses
import math
import statistics

from ..backends import PREFERENCE, SAME_OP_IN_GRAPH
from ..store.decision import COMPILED, CUDAGRAPH, DEFAULT_BACKEND, EAGER, REJECTED, mode_cost
from .timing import round_order
from .policy import DEFAULT_POLICY, TuningPolicy
from .trial import Trial, describe_exception, recover


def choose(medians: dict, noise: dict, policy: TuningPolicy = DEFAULT_POLICY, order: tuple = PREFERENCE,
           host_bound: frozenset = frozenset()) -> tuple:
    """(winner, fastest, tie) among ``medians`` {name: ms}: the fastest, unless another is within
    the tie threshold of it and comes first in the preference ``order`` (the device's:
    ``Trial.order``, :func:`~diffsynth_attention.backends.preference_on`). A tied candidate in
    ``host_bound`` (:func:`host_bound`) loses the tie to one that is not, whatever the order."""

    def _order(name: str) -> int:
        return order.index(name) if name in order else len(order)

    fastest = min(medians, key=lambda n: (medians[n], _order(n)))
    tied = {}
    for name, ms in medians.items():
        tie = policy.tie_threshold(noise.get(fastest), noise.get(name))
        if ms <= medians[fastest] * (1 + tie):
            tied[name] = tie
    winner = min(tied, key=lambda n: (n in host_bound, _order(n), medians[n]))
    return winner, fastest, tied.get(winner, policy.tie_floor)


def host_bound(runs: dict, names, policy: TuningPolicy) -> frozenset:
    """Those of ``names`` whose eager time follows the host: host time per call over
    ``policy.host_bound_share`` of device time (GPU rounds only). The host's speed changes from
    process to process, the device's does not: on an H100, FlashAttention-3 on a grouped-query
    causal call (host ~ device) tied with -4 (host ~0.6 of device) in the rounds, took the tie by
    order in 3 of 5 processes, and ran 1.15-1.3x slower than -4 in another process."""
    out = set()
    for name in names:
        run = runs[name]
        if run.host and run.device:
            device = statistics.median(run.device)
            if device > 0 and statistics.median(run.host) > policy.host_bound_share * device:
                out.add(name)
    return frozenset(out)


def faster_host_ratio(runs: dict, name: str, policy: TuningPolicy, against: str = DEFAULT_BACKEND):
    """``runs[name]``'s eager cost over ``against``'s (the default; or the eager winner a rival would
    replace, :func:`_settle_rival`) on a host ``policy.host_swing`` times faster than this process's,
    each modelled as max(device, host / swing) from the rounds' medians; None without a host/device
    split (a CPU). Over 1: the lead is this host's speed, which changes from process to process
    where the device's does not (docs/tuning.md: sdxl_1024_cross, H100 s10). Asked only of a
    host-bound ``against`` and a device-bound ``name`` (:func:`host_bound`): where both are
    host-bound the lead is the lower host cost, which a faster host keeps."""
    base, run = runs[against], runs[name]
    if not (base.host and base.device and run.host and run.device):
        return None
    if host_bound(runs, [against, name], policy) != {against}:
        return None  # only a host-bound one kept against a device-bound one: two host-bound calls scale alike
    med = statistics.median
    fast_base = max(med(base.device), med(base.host) / policy.host_swing)
    fast_run = max(med(run.device), med(run.host) / policy.host_swing)
    return fast_run / fast_base if fast_base > 0 else None


def _range_spread(samples: list) -> float:
    """(max - min) / median of 2-3 samples, where an interquartile range needs 4 (0 for fewer than 2)."""
    if len(samples) < 2:
        return 0.0
    med = statistics.median(samples)
    return (max(samples) - min(samples)) / med if med > 0 else 0.0


def _spread(samples: list) -> float:
    """The interquartile spread of ``samples`` over their median; their range where there are too few (2-3)."""
    spread = relative_spread(samples)
    return _range_spread(samples) if spread is None else spread


def relative_spread(samples: list):
    """The interquartile range of ``samples`` over their median (None with fewer than 4)."""
    if len(samples) < 4:
        return None
    q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    med = statistics.median(samples)
    return (q3 - q1) / med if med > 0 else None


def _paired_cost_s(trial: Trial, names: list) -> float:
    """Seconds one paired re-time round of ``names`` takes (two bursts a sample on a GPU: Run.sample_cost_s)."""
    return sum(trial.runs[n].sample_cost_s(trial.timer.cuda) for n in names)


def confirm_reserve_s(trial: Trial, names: list) -> float:
    """The budget the rounds leave for the confirmation (step 7): ``confirm_min`` paired rounds of
    the default and the slowest other candidate of ``names`` (whichever wins, its re-time fits)."""
    default = trial.runs.get(DEFAULT_BACKEND)
    others = [n for n in names if n != DEFAULT_BACKEND]
    if default is None or default.cand.status == REJECTED or not others:
        return 0.0
    worst = max(others, key=lambda n: trial.runs[n].sample_cost_s(trial.timer.cuda))
    return trial.policy.confirm_min * _paired_cost_s(trial, [DEFAULT_BACKEND, worst])


def mode_winners(trial: Trial, timed: list) -> dict:
    """{mode: backend} for the compiled and CUDA-graph modes, from the round medians of host and
    device time (:func:`~diffsynth_attention.store.decision.mode_cost`), by the same tie rule as
    eager. Empty where the rounds have no host/device split (a CPU) or fewer than two candidates.

    The compiled price is a model: the host time measured is the eager call's, and inside a graph
    another op runs in its place (``torch`` becomes whatever inductor lowers SDPA to, a kernel
    package goes through a custom operator). Measured on an H100, the model was off by more than
    the gaps it ranked: seed_example's ``torch``, 6% ahead of ``torch_efficient`` in the model, ran
    1.26-1.3x slower baked (inductor lowered it to cuDNN's operator); Wan's 1,560-token
    self-attention on FlashAttention-3, level with ``torch`` in the model, ran 1.28x slower baked.
    What does hold: a PyTorch sub-backend (``torch_efficient``, ``torch_flash``, ...) is one ATen
    operator, the same one in a graph as in an eager call. So the compiled pick is the PyTorch
    backend the eager rounds rank first (:func:`inlined_pick`), and a host-heavy kernel package
    (host time over ``policy.compiled_host_share`` of its device time: both misrankings above) replaces
    it only where the model puts that package more than ``policy.compiled_margin`` ahead. A
    device-bound package needs only the tie rule's lead: on hd256, sd15_512_self and flux_1024
    (host 5-16% of device) a package 6-9% ahead in the model ran 1-10% faster baked than compiled
    SDPA on an H200 (s6) and an H100 (s7), where the margin had kept ``torch``.
    CUDA-graph prices are device time, measured as such: no margin there, and a tie only within
    ``policy.device_tie_floor`` (0.5%) or the device times' own spread (their range under 4 rounds): on an H100 the 2% floor of
    eager ties gave sd3_1024_self's graphs FlashAttention-3 in 4 of 5 processes, 3.3% behind -4 (s10)."""
    runs, policy = trial.runs, trial.policy
    if len(timed) < 2 or not all(runs[n].host and runs[n].device for n in timed):
        return {}
    noise = {n: relative_spread(runs[n].rounds) for n in timed}
    out = {}
    for mode in (COMPILED, CUDAGRAPH):
        costs = {n: _rounds_cost(runs[n], mode) for n in timed}
        if mode == CUDAGRAPH:  # device time, from CUDA events: its own spread, and ties as narrow as that allows
            pick = choose(costs, {n: _spread(runs[n].device) for n in timed},
                          dataclasses.replace(policy, tie_floor=min(policy.tie_floor, policy.device_tie_floor)), trial.order)[0]
            out[mode] = pick
            continue
        pick = choose(costs, noise, policy, trial.order)[0]
        if mode == COMPILED:
            inlined = inlined_pick(trial, timed, noise)
            margin = policy.compiled_margin if _host_heavy(runs[pick], policy) else 0.0
            if inlined is not None and (pick in SAME_OP_IN_GRAPH or costs[inlined] <= costs[pick] * (1 + margin)):
                pick = inlined
        out[mode] = pick
    return out


def inlined_pick(trial: Trial, timed: list, noise: dict):
    """The PyTorch backend whose graph runs its eager operator (:data:`SAME_OP_IN_GRAPH`: not the
    math kernel, which inductor decomposes) that the eager rounds rank first among ``timed``, by
    the same tie rule; None where none was timed."""
    family = [n for n in timed if n in SAME_OP_IN_GRAPH]
    if not family:
        return None
    return choose({n: _rounds_cost(trial.runs[n], EAGER) for n in family}, noise, trial.policy, trial.order)[0]


def _priced_as(mode: str, name: str) -> str:
    """The mode whose cost confirms ``name``'s pick for ``mode``: a PyTorch backend picked for
    compiled graphs is confirmed on its eager time (its operator's own, see :func:`mode_winners`)."""
    return EAGER if mode == COMPILED and name in SAME_OP_IN_GRAPH else mode


def _host_heavy(run, policy: TuningPolicy) -> bool:
    """Whether ``run``'s host time per call is over ``policy.compiled_host_share`` of its device
    time: there the compiled model misranked (module text of :func:`mode_winners`)."""
    if not run.host or not run.device:
        return True
    device = statistics.median(run.device)
    return device <= 0 or statistics.median(run.host) > policy.compiled_host_share * device


def _rounds_cost(run, mode: str) -> float:
    """``run``'s price in ``mode`` from the medians of its round samples (eager, host, device)."""
    med = lambda xs: statistics.median(xs) if xs else None  # noqa: E731
    return mode_cost(med(run.rounds), med(run.host), med(run.device), mode)


def _cost(sample, mode: str) -> float:
    return mode_cost(sample.ms, sample.host_ms, sample.device_ms, mode)


def median_lower_bound(ratios: list, alpha: float) -> float:
    """A distribution-free lower confidence bound of the median of ``ratios`` (the sign test): their
    k-th smallest, k the largest with P(Binomial(n, 1/2) <= k - 1) <= ``alpha``, so the median lies
    below it with probability at most ``alpha``; the smallest where no k qualifies (n < 5 at 5%).
    Unlike the spread of the ratios, it tightens as the re-time gets longer."""
    ordered = sorted(ratios)
    n, k, below = len(ordered), 1, 0.0
    for j in range(n):
        below += math.comb(n, j) / 2 ** n  # P(at most j of n ratios fall below the median)
        if below > alpha:
            break
        k = j + 1
    return ordered[k - 1]


def _verdict(ratios: list, policy: TuningPolicy) -> tuple:
    """(median, spread, lower bound, 'confirmed' | 'refused' | 'undecided') of a re-time's ratios."""
    med = statistics.median(ratios)
    spread = relative_spread(ratios) or 0.0
    low = median_lower_bound(ratios, policy.confirm_alpha)
    if med <= 1 + policy.tie_floor:
        return med, spread, low, "refused"
    # Too few rounds for the sign test to bound the median at alpha (2^-n > alpha: n < 5 at 5%,
    # where the bound is the smallest ratio and a tie would pass 1 in 2^n times): every round must
    # then clear the tie floor, not just 1.
    floor = 1 + policy.tie_floor if 0.5 ** len(ratios) > policy.confirm_alpha else 1
    return med, spread, low, ("confirmed" if low > floor else "undecided")


def confirm(trial: Trial, winners: dict) -> tuple:
    """Step 7: a winner other than the default (PyTorch SDPA's own choice, ``torch``) is kept for
    a mode only if a separate interleaved re-time, paired round by round with the default, shows
    it faster by more than the measured noise: the median of the per-round ratios (default /
    winner) above ``1 + tie_floor`` (a smaller lead is a tie: the default), and their lower
    confidence bound (:func:`median_lower_bound`) above 1 (the lead is not noise). A re-time whose
    median is ahead but whose bound is not goes on (to ``confirm_max`` rounds, as the budget
    allows): a steady 4% lead is confirmed by a longer look, a lead that is noise is not.
    Returns (winners after confirmation, provisional, the confirmation's text). ``provisional``:
    the noise (the spread of the ratios, or of the rounds where nothing was re-timed) is above
    ``noise_cap``, or the rounds put a winner the re-time refuses more than ``noise_cap`` further
    ahead than the re-time found (the machine changed between them: on an H100, one of five
    processes stored ``torch`` for wan13b_480p_self, 1.23x slower than FlashAttention-4 in its own
    rounds): too noisy to decide."""
    policy, runs = trial.policy, trial.runs
    deciding = [runs[n] for n in set(winners.values()) | {DEFAULT_BACKEND} if n in runs]
    rounds_noise = max(((relative_spread(r.rounds) or 0.0) for r in deciding), default=0.0)

    def unconfirmed(text: str) -> tuple:  # nothing re-timed to a verdict: the rounds' noise says whether to trust them
        noisy = rounds_noise > policy.noise_cap
        return winners, noisy, text + (
            f"; provisional: the rounds' noise {rounds_noise * 100:.0f}% is above {policy.noise_cap * 100:.0f}%" if noisy else "")

    contenders = sorted({n for n in winners.values() if n != DEFAULT_BACKEND})
    rival = eager_rival(trial, winners[EAGER])
    if not contenders and rival is None:
        return unconfirmed(f"the default ({DEFAULT_BACKEND}) won")
    default = runs.get(DEFAULT_BACKEND)
    if default is None or default.cand.status == REJECTED:
        return unconfirmed(f"not re-timed: the default ({DEFAULT_BACKEND}) did not pass the gate")
    names = [DEFAULT_BACKEND] + contenders + ([rival] if rival is not None and rival not in contenders else [])
    paired = max(_paired_cost_s(trial, names), 1e-9)

    def affordable() -> int:
        left = policy.budget_margin * trial.limit(trial.best_probe()) - trial.spent()
        return int(max(0, left // paired))

    samples = {n: [] for n in names}
    count = int(max(policy.confirm_min, min(policy.confirm_rounds, affordable())))
    done, texts = 0, []
    while True:
        for i in range(done, done + count):
            for name in round_order(names, i, seed="confirm"):
                run = runs[name]
                try:
                    samples[name].append(trial.timer.measure(run.call, run.calls, warm=run.calls > 1))
                except Exception as exc:  # the one that fails now loses: a contender is not confirmed; a failing default is not kept
                    recover(trial.device)
                    run.cand.status, run.cand.time_ms = REJECTED, None
                    run.cand.reason = f"in the confirmation re-time: {describe_exception(exc)}"
                    if name == DEFAULT_BACKEND:
                        return unconfirmed(f"not re-timed: the default ({DEFAULT_BACKEND}) raised in the re-time")
                    # It leaves the re-time; the modes it won go to the default, and the others' re-time
                    # goes on to its verdict (it returned here, storing them unconfirmed).
                    names.remove(name)
                    samples.pop(name)
                    if name == rival:
                        rival = None
                    if name in contenders:
                        contenders.remove(name)
                        winners = {m: (DEFAULT_BACKEND if b == name else b) for m, b in winners.items()}
                        texts.append(f"not confirmed: {name} raised in the re-time; {DEFAULT_BACKEND} kept")
                    else:
                        texts.append(f"rival {name}: raised in the re-time, {winners[EAGER]} kept")
                    if not contenders and rival is None:  # only the default is left: nothing to re-time
                        return unconfirmed("; ".join(texts))
                    continue
                run.cand.reps += run.calls + (1 if run.calls > 1 else 0)
        done += count
        ratios = {mode: _ratios(samples, name, _priced_as(mode, name)) for mode, name in winners.items() if name != DEFAULT_BACKEND}
        verdicts = {mode: _verdict(r, policy) for mode, r in ratios.items() if r}
        pending = [v[3] for v in verdicts.values()]
        if rival is not None:
            pending.append(_rival_verdict(samples, winners[EAGER], rival, policy)[3])
            if pending[-1] == "confirmed" and winners[EAGER] != DEFAULT_BACKEND \
                    and _host_refusal(runs, winners[EAGER], rival, policy) is None:  # it would take the pick: its verdict
                pending.append(_verdict(_ratios(samples, rival, EAGER), policy)[3])  # over the default decides then
        count = min(policy.confirm_max - done, max(policy.confirm_min, done // 2), affordable())
        if count <= 0 or "undecided" not in pending:
            break
    if rival is not None:
        previous, before = winners[EAGER], verdicts.get(EAGER)
        winners, text = _settle_rival(samples, winners, rival, policy, runs)
        if winners[EAGER] != previous and before is not None and before[3] == "confirmed" \
                and _verdict(_ratios(samples, rival, EAGER), policy)[3] != "confirmed":
            # faster than the winner, but not confirmed over the default, which the winner is: the winner stays
            winners = {**winners, EAGER: previous}
            text = text.rsplit(": taken for eager calls", 1)[0] + f": not confirmed over {DEFAULT_BACKEND}, {previous} kept"
        if not contenders and winners[EAGER] == DEFAULT_BACKEND:  # the default won, as without the rival
            return unconfirmed("; ".join(texts + [f"the default ({DEFAULT_BACKEND}) won", text]))
        texts.append(text)
        name = winners[EAGER]
        if name != DEFAULT_BACKEND:
            ratios[EAGER] = _ratios(samples, name, EAGER)
            verdicts[EAGER] = _verdict(ratios[EAGER], policy)
    out, provisional = dict(winners), False
    for mode, name in winners.items():
        if name == DEFAULT_BACKEND:
            continue
        if mode not in verdicts:
            out[mode] = DEFAULT_BACKEND
            continue
        med, spread, low, verdict = verdicts[mode]
        if len(ratios[mode]) < 4:  # too few re-times for an interquartile spread (it read 0): their range instead
            spread = max(spread, _range_spread(ratios[mode]))
        swing = faster_host_ratio(runs, name, policy) if _priced_as(mode, name) == EAGER else None
        if verdict == "confirmed" and swing is not None and swing > 1 + policy.tie_floor:
            out[mode] = DEFAULT_BACKEND
            noisy = spread > policy.noise_cap  # a verdict of a re-time too noisy to decide, like any other
            provisional = provisional or noisy
            texts.append(f"{mode}: {name} {med:.3f}x the speed of {DEFAULT_BACKEND} here, but {swing:.3f}x slower on a host "
                         f"{policy.host_swing:g}x faster (its device time is the default's host-bound call's floor): "
                         f"{DEFAULT_BACKEND} kept" + ("; provisional: too noisy" if noisy else ""))
            continue
        lead = _rounds_ratio(runs, name, _priced_as(mode, name))
        drift = verdict != "confirmed" and lead is not None and lead > (1 + policy.noise_cap) * med
        noisy = spread > policy.noise_cap or drift
        provisional = provisional or noisy
        what = (f"{mode}: {name} {med:.3f}x the speed of {DEFAULT_BACKEND} in {len(ratios[mode])} paired re-times "
                f"(noise {spread * 100:.1f}%, lower bound {low:.3f}x)")
        why = ""
        if drift:  # the machine changed between the rounds and the re-time: neither number can be trusted alone
            why = f"; provisional: the rounds put it {lead:.3f}x ahead, the re-time did not"
        elif noisy:
            why = "; provisional: too noisy"
        if verdict == "confirmed":
            texts.append(f"{what}: confirmed{why}")
        else:
            out[mode] = DEFAULT_BACKEND
            texts.append(f"{what}: not confirmed, {DEFAULT_BACKEND} kept{why}")
    texts += _graph_gives_way(samples, out, policy)
    return out, provisional, "; ".join(texts)


def _graph_gives_way(samples: dict, out: dict, policy: TuningPolicy) -> list:
    """Where the CUDA-graph pick (confirmed over the default) is another kernel than the eager winner, both
    re-timed in the same paired rounds: the graphs take the eager winner where its device times there are
    confirmed faster (tie floor ``device_tie_floor``): the rounds' device spread can tie what the re-time
    tells apart (H100, s11: sd3_1024_self's graphs -3 in 4 of 5 processes, 3.4% behind -4, the eager pick)."""
    graph, eager = out.get(CUDAGRAPH), out.get(EAGER)
    if graph in (None, eager, DEFAULT_BACKEND) or eager in (None, DEFAULT_BACKEND) or graph not in samples \
            or eager not in samples:
        return []
    ratios = [_cost(g, CUDAGRAPH) / _cost(e, CUDAGRAPH) for g, e in zip(samples[graph], samples[eager])
              if _cost(g, CUDAGRAPH) and _cost(e, CUDAGRAPH)]
    if not ratios:
        return []
    med, _, low, verdict = _verdict(ratios, dataclasses.replace(policy, tie_floor=min(policy.tie_floor, policy.device_tie_floor)))
    if verdict != "confirmed":
        return []
    out[CUDAGRAPH] = eager
    return [f"cudagraph: {eager} {med:.3f}x the device speed of {graph} in {len(ratios)} paired re-times "
            f"(lower bound {low:.3f}x): taken for CUDA graphs"]


def eager_rival(trial: Trial, winner: str):
    """The candidate the eager ``winner`` beat by the least, or that beat it inside the tie band (the
    rounds' medians within ``tie_cap`` of the winner's): it joins the confirmation's paired re-time
    (:func:`_settle_rival`). None where there is none, the default is it (the re-time pairs the
    default already), or it is host-bound where the winner is not (its lead there is this process's
    host speed, :func:`host_bound`). The rounds resolve ~2.5%; the paired re-time, round by round,
    ~0.2-1.3% (H100): on an H100, ties by order cost sd3_1024_self 3.2% (FlashAttention-3 over -4)
    and rounds 6% off cost one of five processes 3.3% on Wan 2.2 5B 720p."""
    policy, runs = trial.policy, trial.runs
    if not policy.rival_re_time or winner not in runs or not runs[winner].rounds:
        return None
    best = statistics.median(runs[winner].rounds)
    near = {n: statistics.median(r.rounds) for n, r in runs.items()
            if n not in (winner, DEFAULT_BACKEND) and r.rounds and r.cand.status != REJECTED}
    near = {n: ms for n, ms in near.items() if ms <= best * (1 + policy.tie_cap)}
    fragile = host_bound(runs, list(near) + [winner], policy)
    near = {n: ms for n, ms in near.items() if not (n in fragile and winner not in fragile)}
    return min(near, key=near.get) if near else None


def _settle_rival(samples: dict, winners: dict, rival: str, policy: TuningPolicy, runs: dict) -> tuple:
    """(winners, text): the eager winner gives way to ``rival`` where the paired re-time shows the
    rival faster by more than the tie floor, with its lower confidence bound above 1 (the verdict
    that confirms a winner over the default, :func:`_verdict`), unless its lead reverses on a faster
    host (:func:`_host_refusal`); else it stays."""
    winner = winners[EAGER]
    med, spread, low, verdict, n = _rival_verdict(samples, winner, rival, policy)
    if not n:
        return winners, f"rival {rival}: not re-timed"
    what = (f"rival {rival}: {med:.3f}x the speed of {winner} in {n} paired re-times "
            f"(noise {spread * 100:.1f}%, lower bound {low:.3f}x)")
    swing = _host_refusal(runs, winner, rival, policy) if verdict == "confirmed" else None
    if swing is not None:
        return winners, (f"{what}, but {swing:.3f}x slower than {winner} on a host {policy.host_swing:g}x faster "
                         f"({winner} is host-bound, {rival} is not: its lead is this host's speed): {winner} kept")
    if verdict == "confirmed":
        return {**winners, EAGER: rival}, f"{what}: taken for eager calls"
    return winners, f"{what}: {winner} kept"


def _host_refusal(runs: dict, winner: str, rival: str, policy: TuningPolicy):
    """How much slower than the host-bound eager ``winner`` (not the default: its own rule is in
    :func:`confirm`) a device-bound ``rival`` would be on a host ``policy.host_swing`` times faster
    (:func:`faster_host_ratio`), where that is more than the rival floor; else None. Host-bound
    problems of 15-70 us went to one kernel or another by process on an H100 (s11: flux_512,
    FlashAttention-3 or -4), the kernels' host costs differing."""
    if winner == DEFAULT_BACKEND:
        return None
    swing = faster_host_ratio(runs, rival, policy, against=winner)
    return swing if swing is not None and swing > 1 + min(policy.tie_floor, policy.rival_floor) else None


def _rival_verdict(samples: dict, winner: str, rival: str, policy: TuningPolicy) -> tuple:
    """(median, spread, lower bound, verdict, rounds) of ``rival`` over ``winner`` per paired round: the
    confirmation's verdict (:func:`_verdict`) with ``policy.rival_floor`` for the tie floor; where ``winner``
    is the default, its 2% ``tie_floor`` (between two kernels the re-time's resolution decides: docs/tuning.md)."""
    ratios = [_cost(w, EAGER) / _cost(r, EAGER) for w, r in zip(samples[winner], samples[rival]) if _cost(r, EAGER)]
    if not ratios:
        return None, None, None, "refused", 0
    if winner == DEFAULT_BACKEND:  # a rival of the default is a winner over it: the default keeps its tie floor
        return (*_verdict(ratios, policy), len(ratios))
    return (*_verdict(ratios, dataclasses.replace(policy, tie_floor=min(policy.tie_floor, policy.rival_floor))), len(ratios))


def _rounds_ratio(runs: dict, name: str, mode: str):
    """The default's median cost over ``name``'s in the interleaved rounds (None without rounds)."""
    if not (runs[DEFAULT_BACKEND].rounds and runs[name].rounds):
        return None
    default, winner = _rounds_cost(runs[DEFAULT_BACKEND], mode), _rounds_cost(runs[name], mode)
    return default / winner if default and winner else None


def _ratios(samples: dict, name: str, mode: str) -> list:
    """Per paired round, the default's cost over ``name``'s in ``mode``."""
    return [_cost(d, mode) / _cost(w, mode) for d, w in zip(samples[DEFAULT_BACKEND], samples[name])
            if _cost(w, mode) and _cost(w, mode) > 0]
