"""Tuning one key: gate every candidate against an fp32 reference, time the survivors, pick one.

For each candidate, in preference order:

1. one untimed call (just-in-time compilation happens here; its time is reported as
   ``first_call_ms`` and counted in the tuning cost, not in the candidate's time);
2. its output is compared with the fp32 reference on a slice (batch 0, at most two heads):
   relative L1 error above the tolerance, a NaN or an Inf rejects it; so does an exception or
   an out-of-memory error (the others go on) and a change to its input tensors;
3. it is timed with :class:`~diffsynth_attention.timing.Timer` (CUDA events on a GPU,
   ``time.perf_counter`` on a CPU): samples of back-to-back calls, the median within its share
   of the budget. A candidate whose probe sample is more than 2x the best so far is dropped
   early.

The two fastest are then re-timed interleaved. Within 2% of each other, the preference order
of :mod:`diffsynth_attention.backends` decides, so fresh processes choose alike.

Candidates run on private copies of the caller's tensors (same strides), so the caller's
tensors are never modified, and only one candidate output is alive at a time.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from einops import rearrange

from .. import config
from ..backends import PREFERENCE
from ..store.decision import ACCEPTED, CHOSEN, REJECTED, SLOWER, UNSUPPORTED, Candidate, Decision
from .reference import gate_heads, reference_slice, relative_l1
from .timing import Timer

logger = logging.getLogger("diffsynth_attention")

TIE = 0.02  # two candidates within 2% are a tie, broken by preference order
DROP_FACTOR = 2.0  # a candidate more than 2x the best so far is dropped early
MIN_SAMPLES = 3
MAX_SAMPLES = 15
SAMPLE_MS = 1.0  # a sample is about this long: enough back-to-back calls to hide event overhead


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


def tune(
    inputs: TuneInputs,
    backends: list,
    unsupported: dict,
    key,
    make_runner: Callable,
) -> Decision:
    """Tune one key. ``make_runner(backend)`` gives ``fn(q, k, v, mask) -> output`` in the
    caller's out_pattern, conversions included: what the caller pays."""
    started = time.perf_counter()
    inputs = _finite_inputs(inputs)
    tolerance = config.tolerance()
    budget = config.tuning_budget()
    device = inputs.q.device
    clock = Timer(device)
    grad = inputs.requires_grad
    results: dict = {}
    for name, reasons in unsupported.items():
        results[name] = Candidate(UNSUPPORTED, reason="; ".join(reasons))

    heads = gate_heads(inputs.heads_q)
    qc, kc, vc = inputs.canonical
    with torch.no_grad():
        ref = reference_slice(qc, kc, vc, inputs.mask4, inputs.scale, inputs.causal, inputs.window, heads)

    copies = [_copy(t, grad) for t in (inputs.q, inputs.k, inputs.v)]
    mask = inputs.mask
    share = budget / (len(backends) + 1)
    best = float("inf")
    compile_s = 0.0
    timed: dict = {}  # name -> (callable, times)

    for backend in backends:
        name = backend.name
        run = make_runner(backend)
        if grad:
            grad_out = None

            def call(run=run):
                nonlocal grad_out
                with torch.enable_grad():
                    out = run(copies[0], copies[1], copies[2], mask)
                    if grad_out is None:
                        grad_out = torch.randn_like(out)
                    out.backward(grad_out)
                for c in copies:
                    c.grad = None
        else:

            def call(run=run):
                with torch.no_grad():
                    run(copies[0], copies[1], copies[2], mask)

        cand = Candidate(REJECTED)
        results[name] = cand
        # 1 + 2: one untimed call (compilation), its output checked against the reference.
        try:
            clock.sync()
            t0 = time.perf_counter()
            with torch.no_grad():
                out = run(copies[0], copies[1], copies[2], mask)
            clock.sync()
            cand.first_call_ms = (time.perf_counter() - t0) * 1e3
            compile_s += cand.first_call_ms / 1e3
            out_c = rearrange(out, f"{inputs.out_pattern} -> b n s d", n=inputs.heads_q, d=inputs.head_dim_v)
            cand.error = relative_l1(out_c[0, heads], ref)
            del out, out_c
        except Exception as exc:  # a failing candidate is rejected; the others go on
            cand.reason = _describe_exception(exc)
            _recover(device)
            _restore(copies, inputs)
            continue
        changed = [n for n, c, t in zip("qkv", copies, (inputs.q, inputs.k, inputs.v)) if not _same(c.detach(), t.detach())]
        if changed:
            cand.reason = f"modified its input tensor(s) {', '.join(changed)} in place"
            _restore(copies, inputs)
            continue
        if cand.error != cand.error or cand.error == float("inf"):
            cand.reason = "output has NaN or Inf"
            continue
        if cand.error > tolerance:
            cand.reason = f"error {cand.error:.3g} above tolerance {tolerance:g}"
            continue
        # 3: timing. A probe call first (the gate run warmed it): more than 2x the best so far
        # drops the candidate early. Then samples of back-to-back calls within its budget share.
        try:
            if grad:
                call()  # a backward pass compiles too; keep it out of the timings
            probe = clock.sample(call, 1)
            n = Timer.calls_for(probe, SAMPLE_MS)
            if n > 1:  # a short call: one call's time is mostly launch latency; probe with a real sample
                probe = min(probe, clock.sample(call, n))
            if probe > DROP_FACTOR * best:
                cand.status, cand.time_ms, cand.reps = SLOWER, probe, 1
                cand.reason = f"dropped early: {probe:.4g} ms is more than {DROP_FACTOR:g}x the best so far ({best:.4g} ms)"
                continue
            n = Timer.calls_for(probe, SAMPLE_MS)
            samples, spent = [], (n + 2) * probe / 1e3
            while len(samples) < MAX_SAMPLES and (len(samples) < MIN_SAMPLES or spent < share):
                samples.append(clock.sample(call, n))
                spent += samples[-1] * (n + 1) / 1e3
        except Exception as exc:
            cand.status, cand.reason = REJECTED, _describe_exception(exc)
            _recover(device)
            continue
        cand.status, cand.time_ms, cand.reps = ACCEPTED, statistics.median(samples), 1 + n * len(samples)
        best = min(best, cand.time_ms)
        timed[name] = (call, n)

    ranked = sorted((c.time_ms, n) for n, c in results.items() if c.status == ACCEPTED)
    if not ranked:
        winner = "torch"
        logger.warning(
            "no backend passed the numeric gate for %s; using torch. Candidates: %s",
            key.fields["problem"], {n: c.reason for n, c in results.items()},
        )
    else:
        winner = ranked[0][1]
        if len(ranked) > 1:
            winner = _interleaved(ranked[0][1], ranked[1][1], timed, results, clock, budget, started)
        results[winner].status = CHOSEN
        results[winner].reason = None
    total = time.perf_counter() - started
    return Decision(
        key_id=key.id,
        key=key.fields,
        backend=winner,
        candidates={n: results[n] for n in PREFERENCE if n in results},
        tolerance=tolerance,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        tuning_seconds=round(total, 6),
        compile_seconds=round(compile_s, 6),
    )


def _interleaved(a: str, b: str, timed: dict, results: dict, clock: Timer, budget: float, started: float) -> str:
    """Re-time the two fastest in alternating samples; a tie (within 2%) goes to the preferred one."""
    (fa, na), (fb, nb) = timed[a], timed[b]
    per_round = ((na + 1) * results[a].time_ms + (nb + 1) * results[b].time_ms) / 1e3
    left = max(budget - (time.perf_counter() - started), 0.0)
    rounds = max(MIN_SAMPLES, min(10, int(left / max(per_round, 1e-6))))
    ta, tb = [], []
    for i in range(rounds):
        first, second = ((fa, na, ta), (fb, nb, tb)) if i % 2 == 0 else ((fb, nb, tb), (fa, na, ta))
        first[2].append(clock.sample(first[0], first[1]))
        second[2].append(clock.sample(second[0], second[1]))
    ma, mb = statistics.median(ta), statistics.median(tb)
    results[a].time_ms, results[b].time_ms = ma, mb
    results[a].reps += rounds * na
    results[b].reps += rounds * nb
    if abs(ma - mb) <= TIE * min(ma, mb):
        return a if PREFERENCE.index(a) < PREFERENCE.index(b) else b
    return a if ma < mb else b


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
