"""A torch.compile backend for tests: counts compiles and compiled runs, keeps AOTAutograd's
forward graphs (where diffsynth_attention::attention has been decomposed into what it runs)."""
import pytest
import torch
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func


class Recorder:
    def __init__(self):
        self.compiles = 0  # Dynamo frames compiled (one graph each under fullgraph=True)
        self.runs = 0  # calls served by a compiled graph
        self.forward_graphs = []

    def __call__(self, gm, example_inputs):
        self.compiles += 1

        def fw(g, _inputs):
            self.forward_graphs.append(g)
            return make_boxed_func(g.forward)

        def bw(g, _inputs):
            return make_boxed_func(g.forward)

        inner = aot_autograd(fw_compiler=fw, bw_compiler=bw)(gm, example_inputs)

        def run(*args):
            self.runs += 1
            return inner(*args)
        return run

    def targets(self, index=-1) -> list:
        return [str(n.target) for n in self.forward_graphs[index].graph.nodes if n.op == "call_function"]


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
