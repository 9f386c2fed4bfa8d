"""The step schedule (exact for the first and last N steps, a low-precision tier between) on the
real schedulers of DiffSynth-Studio and diffusers, driven the way their pipelines drive them;
and the per-module tier for diffusers models."""
import pytest
import torch

import diffsynth_attention as da
from diffsynth_attention.integrations.diffusers import set_quality

from support.schedulers import Pipe, Transformer, diffsynth_scheduler, expected


def run_diffsynth(pipe, steps, cfg=True):
    """DiffSynth-Studio's denoising loop (pipelines/wan_video.py with BasePipeline.step)."""
    pipe.scheduler.set_timesteps(steps)
    latents = torch.randn(1, 4)
    for progress_id, timestep in enumerate(pipe.scheduler.timesteps):
        noise_pred = pipe.dit(latents)
        if cfg:  # classifier-free guidance: a second forward in the same step
            noise_pred = noise_pred + (noise_pred - pipe.dit(latents))
        latents = pipe.scheduler.step(noise_pred, pipe.scheduler.timesteps[progress_id], latents)
    return latents


def run_diffusers(pipe, steps):
    """diffusers' loop (e.g. WanPipeline.__call__)."""
    pipe.scheduler.set_timesteps(steps)
    latents = torch.randn(1, 4)
    for t in pipe.scheduler.timesteps:
        noise_pred = pipe.transformer(latents)
        latents = pipe.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
    return latents


def test_diffsynth_pipeline_schedule():
    pipe = Pipe(diffsynth_scheduler())
    with da.step_schedule(pipe, exact_first=2, exact_last=3) as state:
        run_diffsynth(pipe, 10)
        assert state.total == 10
        run_diffsynth(pipe, 8)  # a second generation starts over at set_timesteps
    per_step = pipe.dit.seen[::2]  # two forwards a step (CFG)
    assert per_step == expected(10, 2, 3) + expected(8, 2, 3)
    assert pipe.dit.seen[1::2] == per_step
    assert da.current_quality() == "exact"
    assert "step" not in vars(pipe.scheduler) and "set_timesteps" not in vars(pipe.scheduler)  # restored


def test_diffusers_pipeline_schedule():
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = Pipe(FlowMatchEulerDiscreteScheduler())
    with da.quality("balanced"):
        with da.step_schedule(pipe, exact_first=1, exact_last=1, tier="fast"):
            run_diffusers(pipe, 6)
        assert da.current_quality() == "balanced"  # the enclosing scope comes back
    assert pipe.transformer.seen == expected(6, 1, 1)



def test_diffusers_video_to_video_schedule_ends_exact():
    """diffusers' video-to-video loop (WanVideoToVideoPipeline.get_timesteps) runs only the last
    steps of ``scheduler.timesteps``: its last ``exact_last`` steps are still exact."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = Pipe(FlowMatchEulerDiscreteScheduler())
    with da.step_schedule(pipe, exact_first=1, exact_last=2, tier="fast") as state:
        pipe.scheduler.set_timesteps(10)
        latents = torch.randn(1, 4)
        for t in pipe.scheduler.timesteps[4:]:  # strength 0.6: t_start = 4
            latents = pipe.scheduler.step(pipe.transformer(latents), t, latents, return_dict=False)[0]
        assert state.total == 6
    assert pipe.transformer.seen == expected(6, 1, 2)

def test_schedule_restores_on_error_and_checks_its_arguments():
    pipe = Pipe(diffsynth_scheduler())
    with pytest.raises(RuntimeError):
        with da.step_schedule(pipe, exact_first=0, exact_last=1):
            pipe.scheduler.set_timesteps(4)
            assert da.current_quality() == "fast"
            raise RuntimeError("boom")
    assert da.current_quality() == "exact" and "step" not in vars(pipe.scheduler)
    with pytest.raises(ValueError, match="exact_first"):
        with da.step_schedule(pipe, exact_first=-1):
            pass
    with pytest.raises(ValueError, match="tier"):
        with da.step_schedule(pipe, tier="fastest"):
            pass
    with pytest.raises(TypeError, match="scheduler"):
        with da.step_schedule(object()):
            pass


def test_set_quality_per_module():
    outer, inner = Transformer(), Transformer()
    model = torch.nn.Sequential(outer, inner)
    set_quality(inner, "fast")
    model(torch.ones(2))
    assert (outer.seen, inner.seen) == (["exact"], ["fast"])
    set_quality(inner, None)
    set_quality(model, "balanced")
    model(torch.ones(2))
    assert (outer.seen[-1], inner.seen[-1]) == ("balanced", "balanced")
    assert da.current_quality() == "exact"
    with pytest.raises(ValueError):
        set_quality(model, "quick")


def test_a_refused_set_quality_leaves_the_modules_setting_as_it_was():
    """A bad tier raised only after the module's earlier setting was taken off (its calls then ran
    exact), and a module that is not one raised AttributeError, naming nothing."""
    outer, inner = Transformer(), Transformer()
    model = torch.nn.Sequential(outer, inner)
    set_quality(inner, "fast")
    with pytest.raises(ValueError, match=r"set_quality\(tier\)"):
        set_quality(inner, "quick")
    with pytest.raises(TypeError, match=r"set_quality\(tier\)"):
        set_quality(inner, 3)
    model(torch.ones(2))
    assert (outer.seen, inner.seen) == (["exact"], ["fast"])
    with pytest.raises(TypeError, match=r"set_quality\(module\) must be a torch.nn.Module, got str"):
        set_quality("transformer", "fast")


def test_set_quality_with_threads_running_the_module_at_once():
    """Thread A enters the module, then thread B, then A leaves first: each closes its own scope
    (a token of one thread's context is never reset in the other's)."""
    import threading

    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()

    class Waits(torch.nn.Module):
        def forward(self, x, who):
            if who == "a":
                a_in.set()
                b_in.wait(10)
            else:
                b_in.set()
                a_out.wait(10)
            return x, da.current_quality()

    model = set_quality(Waits(), "fast")
    got, errors = {}, []

    def worker(who):
        try:
            got[who] = (model(torch.ones(1), who)[1], da.current_quality())
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            if who == "a":
                a_out.set()
    a = threading.Thread(target=worker, args=("a",))
    a.start()
    a_in.wait(10)
    b = threading.Thread(target=worker, args=("b",))
    b.start()
    for t in (a, b):
        t.join()
    assert errors == [] and got == {"a": ("fast", "exact"), "b": ("fast", "exact")}
