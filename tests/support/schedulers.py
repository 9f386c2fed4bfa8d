"""A denoiser that records the quality tier of each forward, DiffSynth-Studio's real scheduler, and
a pipeline of the two: what the step schedule's tests drive the way the pipelines do."""
import importlib.metadata
import importlib.util
from pathlib import Path

import pytest
import torch

import diffsynth_attention as da


class Transformer(torch.nn.Module):
    """A denoiser whose forward records the tier its attention calls run at."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(da.current_quality())
        return x * 0.5


def diffsynth_scheduler():
    """DiffSynth-Studio's FlowMatchScheduler, loaded from its installed file (the package's import
    needs its heavy dependencies; other tests may have put a stand-in ``diffsynth`` in sys.modules)."""
    try:
        path = Path(importlib.metadata.distribution("diffsynth").locate_file("diffsynth/diffusion/flow_match.py"))
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("DiffSynth-Studio is not installed (pip install --no-deps diffsynth==2.1.12)")
    if not path.is_file():
        pytest.skip(f"DiffSynth-Studio has no {path}")
    mod_spec = importlib.util.spec_from_file_location("_diffsynth_flow_match", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module.FlowMatchScheduler("Wan")


class Pipe:
    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.dit = self.transformer = Transformer()


def expected(steps, first, last, tier="fast"):
    return ["exact" if i < first or i >= steps - last else tier for i in range(steps)]
