"""A torch.compile backend for tests: counts compiles and compiled runs, keeps AOTAutograd's
forward graphs (where diffsynth_attention::attention has been decomposed into what it runs)."""
import pytest
import torch

from support.harness import bench

CompileRecorder = bench.CompileRecorder


Recorder = CompileRecorder  # counts compiles and compiled runs, keeps AOTAutograd's forward graphs


def recompile_limit(n: int):
    """Set Dynamo's per-frame recompile limit (its name changed across torch versions)."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    old = getattr(config, name)
    setattr(config, name, n)
    return name, old


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test compiles from scratch (imported by the compile test modules)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
