"""The common low-precision recipe as one helper: exact attention for the first and last denoising
steps, a low-precision tier in between (xDiT's hand-written rule), for DiffSynth-Studio's and
diffusers' pipelines without editing them.

Both call ``pipe.scheduler.set_timesteps(...)`` once per generation and
``pipe.scheduler.step(...)`` once per denoising step, after the transformer's forward(s) of that
step. :func:`step_schedule` wraps the two methods on that scheduler instance (nothing else),
counts the steps, and sets the quality scope (:func:`diffsynth_attention.tiers.quality`) for the
next step's forwards; on exit both methods and the scope are restored. The scope is per thread
and per task, so run the pipeline in the thread (or task) that opened the block.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

from . import tiers


class StepState:
    """Where the schedule is: ``step`` (0-based, the step about to run), ``total`` (the steps of
    this generation, from the scheduler's ``timesteps``, or the one given), and ``tiers``, the
    tier each step ran at so far."""

    def __init__(self) -> None:
        self.step = 0
        self.total: Optional[int] = None
        self.tiers: list = []


def _steps(scheduler) -> Optional[int]:
    timesteps = getattr(scheduler, "timesteps", None)
    try:
        return len(timesteps) if timesteps is not None else None
    except TypeError:
        return None


def _position(scheduler) -> Optional[int]:
    """Where the scheduler itself is in its ``timesteps`` (diffusers' ``step_index``: the next step's
    index), else None."""
    at = getattr(scheduler, "step_index", None)
    return at if isinstance(at, int) and not isinstance(at, bool) else None


@contextlib.contextmanager
def step_schedule(pipe: object, exact_first: int = 2, exact_last: int = 2, tier: str = tiers.FAST,
                  total_steps: Optional[int] = None) -> Iterator[StepState]:
    """Within the block, every generation of ``pipe`` (a pipeline with a ``scheduler``, or the
    scheduler itself) runs its first ``exact_first`` and last ``exact_last`` denoising steps at the
    ``exact`` tier and the steps in between at ``tier``. ``total_steps``: the number of steps,
    where the scheduler does not tell (default: ``len(scheduler.timesteps)`` after
    ``set_timesteps``). Yields a :class:`StepState`.

        with da.step_schedule(pipe, exact_first=3, exact_last=2, tier="fast"):
            video = pipe(prompt, num_inference_steps=50)
    """
    value = tiers.check_tier(tier, "step_schedule(tier)")
    for name, n in (("exact_first", exact_first), ("exact_last", exact_last)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"step_schedule({name}={n!r}): a whole number of steps >= 0")
    if total_steps is not None and (isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1):
        raise ValueError(f"step_schedule(total_steps={total_steps!r}): a whole number of steps >= 1, or None")
    scheduler = getattr(pipe, "scheduler", pipe)
    if not callable(getattr(scheduler, "step", None)):
        raise TypeError(f"step_schedule: {type(pipe).__name__} has no scheduler with a step() method")
    state = StepState()
    skipped = [0]  # leading timesteps the loop does not run (diffusers' video-to-video slices them off)

    def tier_for(i: int) -> str:
        total = total_steps or _steps(scheduler)
        if total is not None and total_steps is None:
            total -= skipped[0]
        state.total = total
        if i < exact_first or (total is not None and i >= total - exact_last):
            return tiers.EXACT
        return value

    def begin(i: int) -> None:
        state.step = i
        current = tier_for(i)
        tiers.enter(current)  # reset to the token taken on entry when the block ends
        state.tiers.append(current)

    own = {name: scheduler.__dict__[name] for name in ("step", "set_timesteps") if name in scheduler.__dict__}
    inner_step = scheduler.step
    inner_set = getattr(scheduler, "set_timesteps", None)

    def step(*args, **kwargs):
        out = inner_step(*args, **kwargs)
        at = _position(scheduler)
        if at is not None:
            skipped[0] = max(0, at - (state.step + 1))
        begin(state.step + 1)
        return out

    def set_timesteps(*args, **kwargs):
        out = inner_set(*args, **kwargs)
        state.tiers.clear()
        skipped[0] = 0
        begin(0)  # a new generation starts
        return out

    token = tiers.enter(tiers.current())
    scheduler.step = step
    if inner_set is not None:
        scheduler.set_timesteps = set_timesteps
    try:
        begin(0)
        yield state
    finally:
        for name in ("step", "set_timesteps"):
            if name in own:
                setattr(scheduler, name, own[name])
            else:
                scheduler.__dict__.pop(name, None)
        tiers.leave(token)


__all__ = ["StepState", "step_schedule"]
