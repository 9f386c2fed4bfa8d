"""Tuning one key: skip what cannot fit or cannot win, gate the rest against an fp32 reference,
time the survivors in interleaved rounds, pick one.

0. **Cost models.** Each backend predicts the memory one call allocates and a rough time
   (:meth:`~diffsynth_attention.backends.base.Backend.predicted_ms`). A candidate predicted to
   allocate more than the free device memory, or predicted more than ``SKIP_FACTOR`` (4x) slower
   than the best prediction among the candidates that pass the gate, is recorded as ``skipped``
   with its prediction as the reason, and never run. The models are generous on purpose.
1. **First pass**, fastest prediction first: the kernel package is imported now (a broken
   install makes the candidate unsupported, with the reason); one untimed call (compilation
   happens here; its time is ``first_call_ms``, counted as compile time); its output is compared
   with the fp32 reference on a slice (batch 0, at most two heads): relative L1 error above the
   tolerance, a NaN or an Inf rejects it; so does an exception, an out-of-memory error and a
   change to its input tensors. Then one probe sample of back-to-back calls. For a long call
   (one call is a sample), the untimed call is an upper bound of its time: within 1.5x of the
   best it needs no probe; more than 1.5x the best, with a prediction more than 2.5x the best
   prediction, it is not probed either (``slower``).
2. **Interleaved rounds.** Every candidate within ``RETIME`` (1.5x) of the best first-pass time
   is re-timed in the same rounds (each round samples each of them once, the order rotating).
   The decision compares only the medians of those rounds. The others keep their first-pass
   time, with status ``slower``.
3. **Ties.** Candidates within the measured noise of the fastest (the interquartile spread of
   their round samples relative to their median, at least ``TIE`` = 2% and at most ``TIE_CAP`` =
   3%) go to the preference order of :mod:`diffsynth_attention.backends`; the chosen
   candidate's reason says so. So a decision never prefers a candidate more than 3% slower than
   another in the same rounds, and fresh processes choose alike.

Candidates are timed as the hit path calls them: the runner from ``make_runner`` (the same one a
plan binds), called back to back with its arguments bound, host cost included.

**Budget.** Tuning time excluding compilation (each candidate's first, untimed call) stays
within ``max(DIFFSYNTH_ATTENTION_TUNING_BUDGET, 15 x the fastest time measured)``: the rounds
are as many as fit in 90% of what is left (up to ``MAX_ROUNDS``), the slowest candidates leave
the rounds when not even one round fits, and a candidate whose probe does not fit is recorded as
not timed.

Candidates run on private copies of the caller's tensors (same strides), so the caller's
tensors are never modified, and only one candidate output is alive at a time.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import logging
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from einops import rearrange

from .. import config
from ..backends import PREFERENCE
from ..store.decision import ACCEPTED, CHOSEN, REJECTED, SKIPPED, SLOWER, UNSUPPORTED, Candidate, Decision
from .reference import gate_heads, reference_slice, relative_l1
from .timing import Timer

logger = logging.getLogger("diffsynth_attention")

TIE = 0.02  # the floor of the tie threshold: candidates within 2% are a tie, broken by preference order
TIE_CAP = 0.03  # the most the measured noise may widen it: never prefer one more than 3% slower
RETIME = 1.5  # candidates within 1.5x of the best first-pass time are re-timed in the interleaved rounds
SKIP_FACTOR = 4.0  # a prediction more than 4x the best prediction is skipped without running
OUT_OF_ROUNDS = 2.5  # a long call predicted 2.5x the best and measured (first call) 1.5x the best is not probed
EARLY_SKIP = True  # False: run every candidate (the measurement scripts compare skips with this)
BUDGET_WINNER_FACTOR = 15.0  # the budget is max(DIFFSYNTH_ATTENTION_TUNING_BUDGET, 15x the winner)
MIN_ROUNDS = 3  # rounds a noise estimate needs (with fewer, the tie threshold is its 2% floor)
MAX_ROUNDS = 21
BUDGET_MARGIN = 0.9  # the rounds aim at 90% of the budget: the rest covers what they do not time
SAMPLE_MS = 2.0  # a sample is about this long: enough back-to-back calls to hide event overhead


@dataclass
class TuneInputs:
    """What the tuner needs about the call that triggered it."""

    q: torch.Tensor  # the caller's tensors, in the caller's layout
    k: torch.Tensor
    v: torch.Tensor
    mask: Optional[torch.Tensor]  # the caller's attn_mask
    mask4: Optional[torch.Tensor]  # the same, viewed with 4 dims
    canonical: tuple  # (q, k, v) as b n s d views of the caller's tensors
    scale: Optional[float]
    causal: bool
    window: Optional[int]
    out_pattern: str
    heads_q: int
    head_dim_v: int
    requires_grad: bool
    to_canonical: Optional[tuple] = None  # three callables: caller layout -> b n s d (to gate on random inputs)


def _copy(t: torch.Tensor, grad: bool) -> torch.Tensor:
    c = t.detach().clone()  # preserve_format: a dense tensor keeps the caller's strides
    return c.requires_grad_(grad and t.requires_grad)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``torch.equal`` with NaN equal to NaN (a candidate that leaves a NaN input alone did not modify it)."""
    if torch.equal(a, b):
        return True
    if a.shape != b.shape or a.dtype != b.dtype or not (a.is_floating_point() or a.is_complex()):
        return False
    na, nb = torch.isnan(a), torch.isnan(b)
    return torch.equal(na, nb) and torch.equal(a[~na], b[~nb])


def _random_like(t: torch.Tensor) -> torch.Tensor:
    """Random values of ``t``'s shape, dtype, device and strides."""
    try:
        r = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
        r.normal_()
    except RuntimeError:  # overlapping strides (an expanded tensor): a dense one
        r = torch.randn(t.shape, dtype=t.dtype, device=t.device)
    return r.requires_grad_(t.requires_grad)


def _finite_inputs(inputs: TuneInputs) -> TuneInputs:
    """The inputs to gate on: the caller's if finite; else random ones of the same shape, dtype
    and layout (a NaN or Inf in the caller's data would reject every candidate)."""
    if inputs.to_canonical is None or all(bool(torch.isfinite(t.detach()).all()) for t in (inputs.q, inputs.k, inputs.v)):
        return inputs
    logger.info("the tuning call's q/k/v are not finite: gating the candidates on random inputs of the same layout")
    q, k, v = (_random_like(t) for t in (inputs.q, inputs.k, inputs.v))
    canonical = tuple(f(t) for f, t in zip(inputs.to_canonical, (q, k, v)))
    return dataclasses.replace(inputs, q=q, k=k, v=v, canonical=canonical)


def _describe_exception(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    if len(text) > 300:
        text = text[:297] + "..."
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return f"out of memory: {text}"
    return f"raised {type(exc).__name__}: {text}"


def _gib(n: float) -> str:
    return f"{n / 2**30:.3g} GiB"


def free_memory(device: torch.device) -> Optional[int]:
    """Bytes a new allocation can still get on ``device``: the driver's free memory plus what
    PyTorch's caching allocator holds unused (None where unknown)."""
    try:
        if device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(device)
            return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
        if device.type == "cpu":
            with open("/proc/meminfo") as fh:
                for line in fh:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
    except Exception:  # no driver, no /proc: no memory skip
        return None
    return None


def tuning_limit(floor_s: float, winner_ms: Optional[float]) -> float:
    """The documented budget, in seconds, excluding compilation: max(floor, 15x the winner)."""
    if winner_ms is None or winner_ms != winner_ms:
        return floor_s
    return max(floor_s, BUDGET_WINNER_FACTOR * winner_ms / 1e3)


def tie_threshold(noise_a: Optional[float], noise_b: Optional[float]) -> float:
    """Two medians within this fraction are a tie: the measured noise, in [TIE, max(TIE, TIE_CAP)]."""
    noise = max(n for n in (noise_a, noise_b, 0.0) if n is not None)
    return max(TIE, min(noise, TIE_CAP))


def relative_spread(samples: list) -> Optional[float]:
    """The interquartile range of ``samples`` over their median (None with fewer than 4)."""
    if len(samples) < 4:
        return None
    q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    med = statistics.median(samples)
    return (q3 - q1) / med if med > 0 else None


def choose(medians: dict, noise: dict) -> tuple:
    """(winner, fastest, tie) among ``medians`` {name: ms}: the fastest, unless another is within
    the tie threshold of it and comes first in the preference order."""
    fastest = min(medians, key=lambda n: (medians[n], PREFERENCE.index(n) if n in PREFERENCE else len(PREFERENCE)))
    tied = {}
    for name, ms in medians.items():
        tie = tie_threshold(noise.get(fastest), noise.get(name))
        if ms <= medians[fastest] * (1 + tie):
            tied[name] = tie
    order = {n: (PREFERENCE.index(n) if n in PREFERENCE else len(PREFERENCE)) for n in tied}
    winner = min(tied, key=lambda n: (order[n], medians[n]))
    return winner, fastest, tied.get(winner, TIE)


def plan_skips(backends: list, problem, dev, free_bytes: Optional[int]) -> tuple:
    """({name: reason} skipped for memory, {name: predicted ms}) from the backends' cost models."""
    memory, predictions = {}, {}
    for backend in backends:
        need = backend.predicted_bytes(problem)
        if free_bytes is not None and need > free_bytes:
            memory[backend.name] = (f"skipped: predicted to allocate {_gib(need)}, more than the {_gib(free_bytes)} "
                                    "free on the device; not run")
        ms = backend.predicted_ms(problem, dev)
        if ms is not None:
            predictions[backend.name] = ms
    return memory, predictions


def tune(
    inputs: TuneInputs,
    backends: list,
    unsupported: dict,
    key,
    make_runner: Callable,
    problem=None,
    dev=None,
) -> Decision:
    """Tune one key. ``make_runner(backend)`` gives the runner a plan would bind,
    ``run(q, k, v, mask, scale) -> output`` in the caller's out_pattern, conversions included:
    what the caller pays. ``problem`` and ``dev`` feed the cost models (no skipping without them)."""
    started = time.perf_counter()
    inputs = _finite_inputs(inputs)
    tolerance = config.tolerance()
    floor_s = config.tuning_budget()
    device = inputs.q.device
    clock = Timer(device)
    grad = inputs.requires_grad
    results: dict = {}
    for name, reasons in unsupported.items():
        results[name] = Candidate(UNSUPPORTED, reason="; ".join(reasons))

    # 0: the cost models: skip what cannot fit now; order the rest by predicted time.
    memory_skips, predictions = {}, {}
    if problem is not None:
        memory_skips, predictions = plan_skips(backends, problem, dev, free_memory(device) if EARLY_SKIP else None)
    for backend in backends:
        if backend.name in memory_skips:
            results[backend.name] = Candidate(SKIPPED, reason=memory_skips[backend.name],
                                              predicted_ms=predictions.get(backend.name))
    pending = [b for b in backends if b.name not in memory_skips]
    pending.sort(key=lambda b: predictions.get(b.name, 0.0))  # stable: preference order among equals

    heads = gate_heads(inputs.heads_q)
    qc, kc, vc = inputs.canonical
    with torch.no_grad():
        ref = reference_slice(qc, kc, vc, inputs.mask4, inputs.scale, inputs.causal, inputs.window, heads)

    copies = [_copy(t, grad) for t in (inputs.q, inputs.k, inputs.v)]
    mask, scale = inputs.mask, inputs.scale
    state = {"compile_s": 0.0}
    first: dict = {}  # name -> (call, calls per sample, first-pass ms)

    def spent() -> float:
        return time.perf_counter() - started - state["compile_s"]

    def best_first() -> Optional[float]:
        return min((t for _, _, t in first.values()), default=None)

    def first_pass(backend) -> None:
        name = backend.name
        cand = Candidate(REJECTED, predicted_ms=predictions.get(name))
        results[name] = cand
        why = backend.unavailable_reason()  # the kernel package is imported here, at first use
        if why is not None:
            cand.status, cand.reason = UNSUPPORTED, why
            return
        run = make_runner(backend)
        if grad:
            grad_out = None

            def call(run=run):
                nonlocal grad_out
                with torch.enable_grad():
                    out = run(copies[0], copies[1], copies[2], mask, scale)
                    if grad_out is None:
                        grad_out = torch.randn_like(out)
                    out.backward(grad_out)
                for c in copies:
                    c.grad = None
        else:
            call = functools.partial(run, copies[0], copies[1], copies[2], mask, scale)  # what a hit runs

        # 1: one untimed call (compilation), its output checked against the reference.
        try:
            clock.sync()
            t0 = time.perf_counter()
            out = run(copies[0], copies[1], copies[2], mask, scale)
            clock.sync()
            cand.first_call_ms = (time.perf_counter() - t0) * 1e3
            state["compile_s"] += cand.first_call_ms / 1e3
            out_c = rearrange(out.detach(), f"{inputs.out_pattern} -> b n s d", n=inputs.heads_q, d=inputs.head_dim_v)
            cand.error = relative_l1(out_c[0, heads], ref)
            del out, out_c
        except Exception as exc:  # a failing candidate is rejected; the others go on
            cand.reason = _describe_exception(exc)
            _recover(device)
            _restore(copies, inputs)
            return
        changed = [n for n, c, t in zip("qkv", copies, (inputs.q, inputs.k, inputs.v)) if not _same(c.detach(), t.detach())]
        if changed:
            cand.reason = f"modified its input tensor(s) {', '.join(changed)} in place"
            _restore(copies, inputs)
            return
        if cand.error != cand.error or cand.error == float("inf"):
            cand.reason = "output has NaN or Inf"
            return
        if cand.error > tolerance:
            cand.reason = f"error {cand.error:.3g} above tolerance {tolerance:g}"
            return
        # The probe: one call, then (short calls) a sample of ~SAMPLE_MS back to back.
        try:
            if grad:
                t0 = time.perf_counter()
                call()  # a backward pass compiles too: counted as compilation, kept out of the timings
                clock.sync()
                state["compile_s"] += time.perf_counter() - t0
            best = best_first()
            estimate = cand.first_call_ms / 1e3
            if best is not None and spent() + estimate > tuning_limit(floor_s, best):
                cand.status, cand.time_ms = SLOWER, None
                cand.reason = (f"not timed: the budget ({tuning_limit(floor_s, best):.3g} s) has no room for it "
                               f"(its first call took {cand.first_call_ms:.4g} ms)")
                return
            gate_ms = cand.first_call_ms
            long_call = not grad and Timer.calls_for(gate_ms, SAMPLE_MS) == 1  # the gate call is one call of it
            pred, pred_best = predictions.get(name), best_prediction()
            if long_call and best is not None and gate_ms <= RETIME * best:
                probe, n, probed = gate_ms, 1, 0  # an upper bound, within 1.5x: it goes to the rounds; no probe
            elif (long_call and best is not None and pred is not None and pred_best is not None
                  and pred > OUT_OF_ROUNDS * pred_best):
                cand.status, cand.time_ms, cand.reps = SLOWER, gate_ms, 1  # an upper bound; not worth a probe
                cand.reason = (f"first call {gate_ms:.4g} ms is more than {RETIME:g}x the best ({best:.4g} ms) and its "
                               f"prediction {pred:.4g} ms is more than {OUT_OF_ROUNDS:g}x the best prediction: not re-timed")
                return
            else:
                probe = clock.sample(call, 1, warm=False)
                n = Timer.calls_for(probe, SAMPLE_MS)
                probed = 1 + (n if n > 1 else 0)
                if n > 1:  # a short call: one call's time is mostly launch latency; probe with a real sample
                    probe = min(probe, clock.sample(call, n))
                elif not grad:
                    probe = min(probe, gate_ms)  # two calls of it: one outlier does not keep it out of the rounds
        except Exception as exc:
            cand.status, cand.reason = REJECTED, _describe_exception(exc)
            _recover(device)
            return
        cand.status, cand.time_ms, cand.reps = ACCEPTED, probe, 1 + probed
        first[name] = (call, n, probe)

    def alive_predictions() -> list:
        return [n for n in predictions if n not in memory_skips and results.get(n, Candidate(ACCEPTED)).status
                not in (REJECTED, UNSUPPORTED)]

    def best_prediction() -> Optional[float]:
        return min((predictions[n] for n in alive_predictions()), default=None)

    def time_skips() -> dict:
        """Candidates predicted more than SKIP_FACTOR x the best prediction among the candidates
        still in the running (not rejected); recomputed as the first pass goes."""
        if not EARLY_SKIP:
            return {}
        alive = alive_predictions()
        if not alive:
            return {}
        best_name = min(alive, key=lambda n: predictions[n])
        best = predictions[best_name]
        return {n: (best_name, best) for n in alive if predictions[n] > SKIP_FACTOR * best}

    with torch.set_grad_enabled(grad):
        done = set()
        while True:  # a skip holds only while the prediction that justified it is still in the running
            skips = time_skips()
            todo = [b for b in pending if b.name not in done and b.name not in skips]
            if not todo:
                break
            backend = todo[0]
            done.add(backend.name)
            first_pass(backend)
        for backend in pending:
            if backend.name not in done:
                best_name, best = skips[backend.name]
                pred = predictions[backend.name]
                results[backend.name] = Candidate(
                    SKIPPED, predicted_ms=pred,
                    reason=(f"skipped: predicted {pred:.4g} ms, more than {SKIP_FACTOR:g}x the best prediction "
                            f"({best:.4g} ms, {best_name}); not run"))

        winner, note = _decide(first, results, clock, floor_s, spent)

    if winner is None:
        winner = "torch"
        logger.warning(
            "no backend passed the numeric gate for %s; using torch. Candidates: %s",
            key.fields["problem"], {n: c.reason for n, c in results.items()},
        )
    else:
        results[winner].status = CHOSEN
        results[winner].reason = note
    total = time.perf_counter() - started
    return Decision(
        key_id=key.id,
        key=key.fields,
        backend=winner,
        candidates={n: results[n] for n in PREFERENCE if n in results},
        tolerance=tolerance,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        tuning_seconds=round(total, 6),
        compile_seconds=round(state["compile_s"], 6),
    )


def _decide(first: dict, results: dict, clock: Timer, floor_s: float, spent: Callable) -> tuple:
    """(winner or None, the winner's reason): the interleaved rounds and the tie rule."""
    if not first:
        return None, None
    best = min(t for _, _, t in first.values())
    near = sorted((n for n, (_, _, t) in first.items() if t <= RETIME * best), key=lambda n: first[n][2])
    for name, (_, _, t) in first.items():
        if name not in near:
            results[name].status = SLOWER
            results[name].reason = (f"first pass {t:.4g} ms is more than {RETIME:g}x the best ({best:.4g} ms): "
                                    "not re-timed")
    if len(near) == 1:
        return near[0], None

    def cost(name) -> float:  # seconds one sample of it takes in a round (a warm call when short)
        _, n, t = first[name]
        return (n + (1 if n > 1 else 0)) * t / 1e3

    def target(fastest_ms: float) -> float:  # a margin for what the rounds do not time (Python, syncs)
        return BUDGET_MARGIN * tuning_limit(floor_s, fastest_ms)

    while len(near) > 1 and spent() + sum(cost(n) for n in near) > target(best):
        dropped = near.pop()  # the slowest first: the budget has no room for a round with it
        results[dropped].status = SLOWER
        results[dropped].reason = (f"first pass {first[dropped][2]:.4g} ms; not re-timed: the budget "
                                   f"({tuning_limit(floor_s, best):.3g} s) had no room for a round with it")
    if len(near) == 1:
        return near[0], None
    samples = {n: [] for n in near}
    alive = list(near)
    fastest_ms = best
    for i in range(MAX_ROUNDS):
        if spent() + sum(cost(n) for n in alive) > target(fastest_ms):
            break
        order = alive[i % len(alive):] + alive[:i % len(alive)]
        for name in order:
            call, n, _ = first[name]
            try:
                samples[name].append(clock.sample(call, n, warm=n > 1))
                fastest_ms = min(fastest_ms, samples[name][-1])
            except Exception as exc:
                results[name].status, results[name].reason = REJECTED, f"in the interleaved rounds: {_describe_exception(exc)}"
                results[name].time_ms = None
                alive.remove(name)
                samples.pop(name)
                _recover(torch.device("cuda") if clock.cuda else torch.device("cpu"))
        if not alive:
            return None, None
    medians = {n: statistics.median(s) for n, s in samples.items() if s}
    if not medians:
        return near[0], (f"decided on first-pass times: the budget ({tuning_limit(floor_s, best):.3g} s) left no room "
                         "for interleaved rounds")
    noise = {n: relative_spread(s) for n, s in samples.items() if s}
    for name, s in samples.items():
        results[name].time_ms = medians[name]
        results[name].reps += len(s) * first[name][1]
    if len(medians) == 1:
        return next(iter(medians)), None
    winner, fastest, tie = choose(medians, noise)
    count = len(next(iter(samples.values())))
    for name, ms in medians.items():
        if name == winner:
            continue
        results[name].status = ACCEPTED
        t = tie_threshold(noise.get(fastest), noise.get(name))
        if ms <= medians[fastest] * (1 + t):
            other = winner if name == fastest else fastest
            results[name].reason = f"tie with {other} (within {t * 100:.1f}% noise): {winner} is preferred by order"
        else:
            results[name].reason = f"{(ms / medians[winner] - 1) * 100:.1f}% slower than {winner} in {count} interleaved rounds"
    if winner != fastest:
        return winner, (f"tie with {fastest} (within {tie * 100:.1f}% noise): preferred by order "
                        f"({(medians[winner] / medians[fastest] - 1) * 100:.1f}% apart in {count} interleaved rounds)")
    return winner, None


def _restore(copies: list, inputs: TuneInputs) -> None:
    with torch.no_grad():
        for c, t in zip(copies, (inputs.q, inputs.k, inputs.v)):
            if not _same(c, t):
                c.copy_(t)


def _recover(device: torch.device) -> None:
    if device.type == "cuda":
        try:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        except Exception:  # pragma: no cover - a sticky CUDA error; nothing more to do here
            pass
