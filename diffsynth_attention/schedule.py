"""The common low-precision recipe as one helper: exact attention for the first and last denoising
steps, a low-precision tier in between (xDiT's hand-written rule), for DiffSynth-Studio's and
diffusers' pipelines without editing them.

Both call ``pipe.scheduler.set_timesteps(...)`` once per generation and
``pipe.scheduler.step(...)`` once per denoising step, after the transformer's forward(s) of that
step. :func:`step_schedule` wraps the two methods on that scheduler instance (nothing else),
counts the steps, and sets the quality scope (:func:`diffsynth_attention.tiers.quality`) for the
next step's forwards; on exit both methods and the scope are restored. The scope is per thread
and per task, so run the pipeline in the thread (or task) that opened the block, or in a copy of
its context (``asyncio.to_thread``); a step in another thread's own context sets no scope there.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
from typing import Iterator, Optional

from . import tiers

logger = logging.getLogger("diffsynth_attention")


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


def _order(scheduler) -> int:
    """How many ``step()`` calls (model evaluations) one denoising step takes: diffusers' ``order``
    (2 for Heun and KDPM2, whose ``timesteps`` repeat each but the first), else 1."""
    order = getattr(scheduler, "order", 1)
    return order if isinstance(order, int) and not isinstance(order, bool) and order >= 1 else 1


def _position(scheduler) -> Optional[int]:
    """Where the scheduler itself is in its ``timesteps`` (diffusers' ``step_index``: the next step's
    index), else None."""
    at = getattr(scheduler, "step_index", None)
    return at if isinstance(at, int) and not isinstance(at, bool) else None


def _located(scheduler, args: tuple, kwargs: dict) -> Optional[int]:
    """The index in ``scheduler.timesteps`` of the timestep a ``step(model_output, timestep, sample)``
    call was given, found as DiffSynth-Studio's stateless ``FlowMatchScheduler.step`` finds it (the
    nearest); None where there is no such timestep or no such list."""
    timestep = kwargs["timestep"] if "timestep" in kwargs else args[1] if len(args) > 1 else None
    timesteps = getattr(scheduler, "timesteps", None)
    if timestep is None or timesteps is None:
        return None
    import torch

    try:
        ts = torch.as_tensor(timesteps).detach().cpu().double().flatten()
        t = torch.as_tensor(timestep).detach().cpu().double().flatten()
        return int(torch.argmin((ts - t).abs())) if ts.numel() and t.numel() == 1 else None
    except (TypeError, ValueError, RuntimeError):  # not numbers: counted instead
        return None


_WRAPPED = ("step", "set_timesteps", "set_begin_index")
# the schedules open in this context: a step the scheduler takes in another thread's own context
# sets no scope there (the block's end could not reset it: it would outlive the block)
_open: contextvars.ContextVar = contextvars.ContextVar("diffsynth_attention_step_schedules", default=frozenset())


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

    Steps are denoising steps: a second-order scheduler (diffusers' Heun, ``order`` 2) calls the
    model twice a step, both calls at the step's tier. A scheduler call is located in the
    scheduler's ``timesteps`` by diffusers' ``step_index``, or,
    for a scheduler without one (DiffSynth-Studio's), the timestep ``step()`` was given, so that a
    second ``step()`` on the same timestep (LTX-2's and MOVA's audio latents after the video's) is
    the same step. A copy of the scheduler (diffusers' LTX-2 pipelines deep-copy it for their audio
    latents) is a plain scheduler: the wrappers are not copied.
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
    skipped = [0]  # leading timesteps the loop does not run (diffusers' img2img and video-to-video slice them off)
    stepped = [False]  # whether this generation has stepped yet
    warned: list = []

    def tier_for(i: int) -> str:  # i: the loop's scheduler call about to run
        order = _order(scheduler)  # model calls per denoising step (diffusers' Heun: 2, over t0 | t1 t1 | t2 t2 ...)
        first = (skipped[0] + order - 1) // order  # the denoising step the loop starts at
        at = (i + skipped[0] + order - 1) // order - first
        n = None if total_steps else _steps(scheduler)
        total = total_steps or (None if n is None else (n + order - 1) // order - first)
        state.total = total
        if at < exact_first or (total is not None and at >= total - exact_last):
            return tiers.EXACT
        return value

    def begin(i: int) -> None:
        state.step = i
        current = tier_for(i)
        if state in _open.get():  # the block's context (or a copy of it: asyncio.to_thread, a task)
            tiers.enter(current)  # reset to the token taken on entry when the block ends
        elif not warned:  # another thread's own context, which the block's end cannot reset: no scope set there
            warned.append(True)
            logger.warning("step_schedule: %s steps in another thread than the block's (a thread pool?); its "
                           "steps run unscheduled there (run the pipeline in the block's thread, or through "
                           "asyncio.to_thread or contextvars.copy_context().run)", type(pipe).__name__)
        if len(state.tiers) > i:  # the step's tier told again (its begin index came after set_timesteps)
            del state.tiers[i:]
        state.tiers.append(current)

    own = {name: scheduler.__dict__[name] for name in _WRAPPED + ("__reduce_ex__",) if name in scheduler.__dict__}
    inner_step = scheduler.step
    inner_set = getattr(scheduler, "set_timesteps", None)
    inner_begin = getattr(scheduler, "set_begin_index", None)

    def step(*args, **kwargs):
        out = inner_step(*args, **kwargs)
        at = _position(scheduler)
        if at is None:  # a stateless scheduler: where this step's timestep is
            found = _located(scheduler, args, kwargs)
            at = None if found is None else found + 1
            if at is not None and stepped[0] and at - skipped[0] == state.step:  # that step again (another latent)
                return out
        if at is not None and not stepped[0]:
            skipped[0] = max(0, at - 1)
        stepped[0] = True
        begin(state.step + 1 if at is None else max(at - skipped[0], state.step + 1))
        return out

    def set_timesteps(*args, **kwargs):
        out = inner_set(*args, **kwargs)
        state.tiers.clear()
        skipped[0] = 0
        stepped[0] = False
        begin(0)  # a new generation starts
        return out

    def set_begin_index(*args, **kwargs):  # diffusers' img2img: the loop starts at this index
        out = inner_begin(*args, **kwargs)
        at = getattr(scheduler, "begin_index", None)
        if not stepped[0] and isinstance(at, int) and not isinstance(at, bool):
            skipped[0] = at
            begin(0)  # the first step's tier, now that the number of steps the loop runs is known
        return out

    def reduce_ex(protocol):  # copy.copy, copy.deepcopy and pickle: the scheduler without the wrappers
        rv = type(scheduler).__reduce_ex__(scheduler, protocol)
        if isinstance(rv, tuple) and len(rv) > 2 and isinstance(rv[2], dict):
            plain = {n: v for n, v in rv[2].items() if n not in installed or n in own}
            plain.update({n: own[n] for n in installed if n in own})
            rv = rv[:2] + (plain,) + rv[3:]
        return rv

    # each wrapper has its method's name, text and signature (inspect.signature follows __wrapped__):
    # diffusers' retrieve_timesteps passes sigmas= or timesteps= only where set_timesteps names them
    installed = {"step": functools.wraps(inner_step)(step), "__reduce_ex__": reduce_ex}
    if inner_set is not None:
        installed["set_timesteps"] = functools.wraps(inner_set)(set_timesteps)
    if inner_begin is not None and callable(inner_begin):
        installed["set_begin_index"] = functools.wraps(inner_begin)(set_begin_index)
    token = tiers.enter(tiers.current())
    opened = _open.set(_open.get() | {state})
    for name, fn in installed.items():
        setattr(scheduler, name, fn)
    try:
        begin(0)
        yield state
    finally:
        for name in installed:
            if name in own:
                setattr(scheduler, name, own[name])
            else:
                scheduler.__dict__.pop(name, None)
        _open.reset(opened)
        tiers.leave(token)
        if pipe is not scheduler and getattr(pipe, "scheduler", scheduler) is not scheduler:
            logger.warning("step_schedule: %s replaced its scheduler inside the block (DiffSynth-Studio's LTX-2 does in its "
                           "distilled and two-stage modes); the new scheduler's steps were not scheduled",
                           type(pipe).__name__)


__all__ = ["StepState", "step_schedule"]
