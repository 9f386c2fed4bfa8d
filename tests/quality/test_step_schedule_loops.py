"""The step schedule on the denoising loops that do more than one ``scheduler.step`` a step or
more than one scheduler: DiffSynth-Studio's audio-video pipelines (LTX-2, MOVA: the video and the
audio latents stepped on one stateless scheduler), diffusers' LTX-2 pipelines (the scheduler
deep-copied for the audio latents), and diffusers' img2img loops (``set_begin_index``)."""
import copy
import pickle

import torch

import diffsynth_attention as da

from support.schedulers import Pipe, diffsynth_scheduler, expected


def test_diffsynth_audio_video_loop_steps_twice_a_step():
    """DiffSynth-Studio's LTX-2 and MOVA pipelines step the video and then the audio latents on the
    same scheduler in each denoising step (pipelines/ltx2_audio_video.py, mova_audio_video.py):
    one step, not two."""
    pipe = Pipe(diffsynth_scheduler())
    with da.step_schedule(pipe, exact_first=2, exact_last=2) as state:
        pipe.scheduler.set_timesteps(8)
        video, audio = torch.randn(1, 4), torch.randn(1, 4)
        for progress_id, _ in enumerate(pipe.scheduler.timesteps):
            noise_pred = pipe.dit(video)
            video = pipe.scheduler.step(noise_pred, pipe.scheduler.timesteps[progress_id], video)
            audio = pipe.scheduler.step(noise_pred, pipe.scheduler.timesteps[progress_id], audio)
        assert state.tiers == expected(8, 2, 2) + ["exact"]  # after the last step: exact
    assert pipe.dit.seen == expected(8, 2, 2)


def ltx2_loop(scheduler, transformer, steps):
    """diffusers' LTX2Pipeline.__call__: the scheduler deep-copied for the audio latents, both set,
    both begin at 0, the video latents stepped, then the audio ones on the copy."""
    audio_scheduler = copy.deepcopy(scheduler)
    audio_scheduler.set_timesteps(steps)
    scheduler.set_timesteps(steps)
    scheduler.set_begin_index(0)
    audio_scheduler.set_begin_index(0)
    gen = torch.Generator().manual_seed(0)
    video, audio = torch.randn(1, 4, generator=gen), torch.randn(1, 4, generator=gen)
    for t in scheduler.timesteps:
        video = scheduler.step(transformer(video), t, video, return_dict=False)[0]
        audio = audio_scheduler.step(audio * 0.25, t, audio, return_dict=False)[0]
    return video, audio


def test_diffusers_ltx2_loop_with_a_copied_scheduler():
    """The copy is a plain scheduler of its own: its set_timesteps and step are its own (they were
    the original's, whose step index then ran ahead twice a step: wrong latents, then an IndexError)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    plain = Pipe(FlowMatchEulerDiscreteScheduler())
    want = ltx2_loop(plain.scheduler, plain.transformer, 6)
    pipe = Pipe(FlowMatchEulerDiscreteScheduler())
    with da.step_schedule(pipe, exact_first=1, exact_last=2) as state:
        got = ltx2_loop(pipe.scheduler, pipe.transformer, 6)
        assert state.total == 6
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert pipe.transformer.seen == expected(6, 1, 2)


def test_copies_and_pickles_of_a_scheduled_scheduler_are_plain():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler()
    with da.step_schedule(scheduler, exact_first=1, exact_last=1):
        before = len(scheduler.timesteps)
        for clone in (copy.copy(scheduler), copy.deepcopy(scheduler), pickle.loads(pickle.dumps(scheduler))):
            assert not {"step", "set_timesteps", "set_begin_index", "__reduce_ex__"} & set(vars(clone))
            clone.set_timesteps(4)
            assert len(clone.timesteps) == 4 and len(scheduler.timesteps) == before  # its own, not the original's
        assert {"step", "set_timesteps"} <= set(vars(scheduler))
    assert not {"step", "set_timesteps", "set_begin_index", "__reduce_ex__"} & set(vars(scheduler))


def img2img_loop(pipe, steps, t_start):
    """diffusers' img2img loops (e.g. StableDiffusion3Img2ImgPipeline.get_timesteps): the timesteps
    sliced by the strength, and the scheduler told where the loop begins."""
    pipe.scheduler.set_timesteps(steps)
    timesteps = pipe.scheduler.timesteps[t_start:]
    pipe.scheduler.set_begin_index(t_start)
    latents = torch.randn(1, 4)
    for t in timesteps:
        latents = pipe.scheduler.step(pipe.transformer(latents), t, latents, return_dict=False)[0]


def test_diffusers_img2img_first_step_knows_how_many_steps_run():
    """With a low strength only the last steps run: the first of them is one of the last
    ``exact_last``, exact, though no step has run yet to tell the scheduler's position."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = Pipe(FlowMatchEulerDiscreteScheduler())
    with da.step_schedule(pipe, exact_first=0, exact_last=2) as state:
        img2img_loop(pipe, 10, 8)  # strength 0.2: 2 steps
        assert state.total == 2
        img2img_loop(pipe, 10, 4)  # strength 0.6: 6 steps
    assert pipe.transformer.seen == expected(2, 0, 2) + expected(6, 0, 2)


def test_a_pipeline_that_replaces_its_scheduler_is_told(caplog):
    """DiffSynth-Studio's LTX-2 replaces ``pipe.scheduler`` inside its call (distilled, two-stage):
    the new one's steps are not scheduled, and a warning says so."""
    pipe = Pipe(diffsynth_scheduler())
    with da.step_schedule(pipe, exact_first=1, exact_last=1):
        pipe.scheduler = diffsynth_scheduler()
    assert "replaced its scheduler" in caplog.text


def run_steps(pipe, steps, stop_at=None):
    """diffsynth's loop, stopped by an error at step ``stop_at`` (an interrupted generation)."""
    pipe.scheduler.set_timesteps(steps)
    latents = torch.randn(1, 4)
    for i, t in enumerate(pipe.scheduler.timesteps):
        if i == stop_at:
            raise KeyboardInterrupt("stopped")
        latents = pipe.scheduler.step(pipe.dit(latents), t, latents)


def test_a_pipeline_run_in_a_pool_thread_leaves_no_scope_there(caplog):
    """A thread pool's thread has a context of its own, which the block's end cannot reset: the
    steps taken there set no scope (a generation stopped mid-way left the fast tier in force in that
    thread, for every later call it ran, long after the block), and a warning says why."""
    from concurrent.futures import ThreadPoolExecutor

    pipe = Pipe(diffsynth_scheduler())
    with ThreadPoolExecutor(1) as pool:
        with da.step_schedule(pipe, exact_first=1, exact_last=1):
            stopped = pool.submit(run_steps, pipe, 6, 3).exception()
        assert isinstance(stopped, KeyboardInterrupt)
        assert pool.submit(da.current_quality).result() == "exact"
    assert "another thread" in caplog.text


def test_a_pipeline_run_through_asyncio_to_thread_is_scheduled():
    """asyncio.to_thread runs the pipeline in a copy of the block's context: scheduled, and the
    copy's scopes end with it."""
    import asyncio

    pipe = Pipe(diffsynth_scheduler())

    async def main():
        with da.step_schedule(pipe, exact_first=1, exact_last=1):
            await asyncio.to_thread(run_steps, pipe, 5)
        return da.current_quality()
    assert asyncio.run(main()) == "exact"
    assert pipe.dit.seen == expected(5, 1, 1)


def test_diffusers_retrieve_timesteps_with_custom_sigmas():
    """diffusers' pipelines that pass their own sigmas (HunyuanVideo, Flux, LTX-2, QwenImage...) set
    them through retrieve_timesteps, which asks inspect.signature(scheduler.set_timesteps) whether
    it takes ``sigmas``: the wrapper has the method's signature (it had (*args, **kwargs): a
    ValueError, "does not support custom sigmas schedules")."""
    import inspect

    import numpy as np
    import pytest
    from diffusers import FlowMatchEulerDiscreteScheduler

    retrieve = pytest.importorskip("diffusers.pipelines.kandinsky6.pipeline_kandinsky6_sr").retrieve_timesteps
    pipe = Pipe(FlowMatchEulerDiscreteScheduler())
    want = [inspect.signature(getattr(pipe.scheduler, n)) for n in ("set_timesteps", "step")]
    with da.step_schedule(pipe, exact_first=1, exact_last=1) as state:
        # (prepare_extra_step_kwargs passes eta= and generator= only where step names them)
        assert [inspect.signature(getattr(pipe.scheduler, n)) for n in ("set_timesteps", "step")] == want
        timesteps, steps = retrieve(pipe.scheduler, 5, "cpu", sigmas=np.linspace(1.0, 0.2, 5))
        latents = torch.randn(1, 4)
        for t in timesteps:
            latents = pipe.scheduler.step(pipe.transformer(latents), t, latents, return_dict=False)[0]
        assert steps == 5 and state.total == 5
    assert pipe.transformer.seen == expected(5, 1, 1)


def test_a_second_order_scheduler_runs_both_calls_of_a_step_at_its_tier():
    """diffusers' HeunDiscreteScheduler (``order`` 2) calls the model twice a denoising step over
    ``timesteps`` t0 | t1 t1 | t2 t2 ...: exact_first=2 is the first two steps, all three calls
    (before, two calls; the second step's corrector ran fast, its predictor exact)."""
    from diffusers import HeunDiscreteScheduler

    pipe = Pipe(HeunDiscreteScheduler())
    with da.step_schedule(pipe, exact_first=2, exact_last=3) as state:
        pipe.scheduler.set_timesteps(7)
        latents = torch.randn(1, 4)
        for t in pipe.scheduler.timesteps:
            latents = pipe.scheduler.step(pipe.transformer(latents), t, latents, return_dict=False)[0]
        assert state.total == 7
    per_step = expected(7, 2, 3)
    assert pipe.transformer.seen == [per_step[(p + 1) // 2] for p in range(13)]
