"""The tuner's rules as one value: :class:`TuningPolicy`.

Everything the tuner decides by (the numeric tolerance per dtype, the re-time, skip and tie
factors, the budget, the warm-up rule, the clock it reads and who hears of its decisions) is a
field of a frozen dataclass. The defaults are the documented behaviour; tests and scripts pass
a policy of their own (``tune(..., policy=)``, ``Dispatcher(store, policy=)``) instead of
changing module globals.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

from .. import config

logger = logging.getLogger("diffsynth_attention")

# The rule's tables and function live in diffsynth_attention/tolerance.py (the store reads with
# them too); re-exported here for the tuner's callers.
from ..tolerance import DEFAULT_TOLERANCES, TF32_TOLERANCE, tf32_allowed  # noqa: E402,F401
from ..tolerance import tolerance as _rule  # noqa: E402


def host_quiet() -> bool:
    """A quiet host: the 1-minute load average below half the cores (other work would skew a re-time)."""
    try:
        return os.getloadavg()[0] < 0.5 * (os.cpu_count() or 1)
    except OSError:  # no load average on this platform: never re-time on our own (`cache verify` does)
        return False


def loading_now() -> tuple:
    """The backends whose kernel package loads on a background thread now (importing, or launching
    its kernels for the first time; backends/loading.py). Such a load holds the GIL for long
    stretches and may launch on the GPU: timings taken meanwhile are not the caller's, and a
    backend left out because its load ran past the deadline is missing from the decision."""
    from ..backends import loading

    return loading.busy()


@dataclass(frozen=True)
class TuningPolicy:
    """How one key is tuned. See :mod:`diffsynth_attention.tuning.tuner` for the steps."""

    tolerances: Optional[Mapping[str, float]] = None  # dtype name -> tolerance; None: DIFFSYNTH_ATTENTION_TOLERANCE
    # for every dtype when set, else DEFAULT_TOLERANCES (and TF32_TOLERANCE for fp32 with TF32 on)
    retime: float = 1.5  # a warm probe (or prediction) within this factor of the best joins the interleaved rounds
    skip_factor: float = 4.0  # a prediction more than this factor of the best prediction is skipped, never run
    early_skip: bool = True  # False: no skips from the cost models (every candidate runs)
    tie_floor: float = 0.02  # medians within this fraction are a tie, broken by preference order ...
    tie_cap: float = 0.025  # ... widened by the measured noise up to this, never more: below the 3% a
    # decision may lose (issue 29), by the 0.5-1% two processes' timings of one pair differ (H100, repeat s5)
    budget_s: Optional[float] = None  # floor of the timing budget per key; None: DIFFSYNTH_ATTENTION_TUNING_BUDGET
    budget_winner_factor: float = 15.0  # the budget is max(floor, this x the fastest time measured)
    budget_margin: float = 0.9  # the rounds aim at this share of what is left of the budget
    min_rounds: int = 3  # every candidate in the rounds gets at least this many samples (else it leaves them)
    max_rounds: int = 21
    warm_agree: float = 0.10  # warm-up ends when two consecutive samples agree within this fraction ...
    warm_cap: int = 6  # ... or after this many samples
    sample_ms: float = 2.0  # a sample is about this long: enough back-to-back calls to hide event overhead
    confirm_rounds: int = 9  # paired re-times of a non-default winner against the default (step 7) ...
    confirm_min: int = 3  # ... at least this many, fewer than confirm_rounds where the budget has no room
    confirm_max: int = 25  # an undecided re-time (median ahead, its lower bound not) goes on to this many, budget allowing
    confirm_alpha: float = 0.05  # the re-time's lower bound of the median ratio holds with this error (a sign test)
    noise_cap: float = 0.10  # re-time (or rounds) noise above this: the decision is stored provisional
    compiled_margin: float = 0.10  # the compiled pick leaves torch (plain compile's) for a host-heavy package only where modelled this far ahead (confirm.py)
    compiled_host_share: float = 0.2  # ... host-heavy: host time per call over this share of its device time
    host_bound_share: float = 0.8  # eager: a candidate whose host time per call is over this share of its device
    # time runs at the host's speed, which changes between processes: it loses ties to one that does not
    rival_re_time: bool = True  # the eager winner's tied rivals join the confirmation's paired re-time (confirm.py)
    rival_floor: float = 0.005  # ... and taken where the re-time puts its median lead over this, its lower bound over 1
    device_tie_floor: float = 0.005  # CUDA-graph picks (device time) tie within this or their spread (confirm.mode_winners)
    host_swing: float = 1.9  # how much faster another process's host may run (H100: one call 17.7-33.6 us between processes)
    quiet: Callable[[], bool] = host_quiet  # whether now is a quiet moment to re-time a provisional decision
    loading: Callable[[], tuple] = loading_now  # the packages loading in the background now: a tuning they overlap is provisional
    clock: Callable[[], float] = time.perf_counter  # seconds; the budget and the CPU timer read it
    listeners: tuple = ()  # listener(key, decision, timings, cache_hit) after every decision

    def __post_init__(self):
        checks = {"retime": self.retime >= 1, "skip_factor": self.skip_factor >= 1,
                  "tie_floor": 0 <= self.tie_floor, "tie_cap": 0 <= self.tie_cap,
                  "budget_winner_factor": self.budget_winner_factor >= 0, "budget_margin": 0 < self.budget_margin <= 1,
                  "min_rounds": self.min_rounds >= 1, "max_rounds": self.max_rounds >= self.min_rounds,
                  "warm_agree": self.warm_agree > 0, "confirm_min": self.confirm_min >= 1,
                  "confirm_rounds": self.confirm_rounds >= self.confirm_min,
                  "confirm_max": self.confirm_max >= self.confirm_rounds, "confirm_alpha": 0 < self.confirm_alpha < 0.5, "noise_cap": self.noise_cap > 0, "compiled_margin": self.compiled_margin >= 0, "compiled_host_share": self.compiled_host_share >= 0, "host_bound_share": self.host_bound_share > 0, "rival_floor": self.rival_floor >= 0, "device_tie_floor": self.device_tie_floor >= 0, "host_swing": self.host_swing >= 1, "warm_cap": self.warm_cap >= 2, "sample_ms": self.sample_ms > 0,
                  "budget_s": self.budget_s is None or (math.isfinite(self.budget_s) and self.budget_s >= 0)}
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"TuningPolicy {name}={getattr(self, name)!r} is out of range")
        if self.tolerances is not None:
            for dtype, tol in self.tolerances.items():
                if not (isinstance(tol, (int, float)) and 0 < tol <= 1):
                    raise ValueError(f"TuningPolicy tolerances[{dtype!r}]={tol!r} is not in (0, 1]")
        if not callable(self.quiet):
            raise TypeError("TuningPolicy quiet must be a callable quiet() -> bool")
        if not callable(self.loading):
            raise TypeError("TuningPolicy loading must be a callable loading() -> tuple of backend names")
        if not all(callable(f) for f in self.listeners):
            raise TypeError("TuningPolicy listeners must be callables listener(key, decision, timings, cache_hit)")

    def replace(self, **changes) -> "TuningPolicy":
        return dataclasses.replace(self, **changes)

    # -- the rules ------------------------------------------------------------------------
    def tolerance(self, dtype_name: str, device_type: str = "cpu", tf32: Optional[bool] = None) -> float:
        """The gate's tolerance for a problem of this dtype on this device type (``tf32``: whether
        TF32 matmuls are allowed for it; None: read the process's setting now)."""
        return _rule(dtype_name, device_type, tf32, self.tolerances)

    def budget_floor(self) -> float:
        return config.tuning_budget() if self.budget_s is None else self.budget_s

    def limit(self, floor_s: float, fastest_ms: Optional[float]) -> float:
        """The budget in seconds, setup excluded: max(floor, budget_winner_factor x the fastest)."""
        if fastest_ms is None or fastest_ms != fastest_ms:
            return floor_s
        return max(floor_s, self.budget_winner_factor * fastest_ms / 1e3)

    def tie_threshold(self, noise_a: Optional[float], noise_b: Optional[float]) -> float:
        """Two medians within this fraction are a tie: the measured noise, in [floor, max(floor, cap)]."""
        noise = max(n for n in (noise_a, noise_b, 0.0) if n is not None)
        return max(self.tie_floor, min(noise, self.tie_cap))

    def agree(self, a: float, b: float) -> bool:
        """Two consecutive warm-up samples agree: within ``warm_agree`` of the smaller."""
        return abs(a - b) <= self.warm_agree * min(a, b)

    def notify(self, key, decision, timings: dict, cache_hit: bool) -> None:
        """Tell every listener of a decision. A failing listener is logged, never raised: it
        must not break the pipeline it observes."""
        for listener in self.listeners:
            try:
                listener(key, decision, timings, cache_hit)
            except Exception:
                logger.warning("tuning listener %r raised; ignored", listener, exc_info=True)


DEFAULT_POLICY = TuningPolicy()


def tolerance_for(problem, policy: Optional[TuningPolicy] = None) -> float:
    """The one trust rule: the gate's tolerance for ``problem`` (its dtype and device type) under
    ``policy`` (default: the documented one). Every store read of a decision for a problem, and
    the tuner, use this value."""
    return (policy or DEFAULT_POLICY).tolerance(problem.dtype_name, problem.device_type, getattr(problem, "tf32", None))
