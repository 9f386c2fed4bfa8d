"""Compiled graphs carry their decision, so inductor's FX/AOT caches key on it (issue 30, item 1).

Each case runs in fresh processes with inductor's caches on (the default), in a cache folder of
their own. A decision changed by any route (the variable, ``use_backend``, ``clear_cache`` plus a
new tuning, the tolerance) and ``torch.compiler.reset()`` give a graph that runs the new decision;
a second fresh process compiling against the same decisions hits both caches."""
import json
import os
import subprocess
import sys

import pytest

from support.compile_helpers import requires_bake
from support.subprocesses import prespawn, results

PRELUDE = """
import json, os
import torch
import torch._inductor.config as inductor_config
from torch._dynamo.utils import counters
import diffsynth_attention as da

# inductor's attention pattern would rewrite torch_math's matmuls into the fused kernel: off, so
# the operators a graph runs tell which backend it holds
inductor_config.pattern_matcher = False
BSND = ("b s n d",) * 4
torch.manual_seed(0)
q, k, v = (torch.randn(1, 64, 2, 16) for _ in range(3))

def f(q, k, v):
    return da.attention_forward(q, k, v, *BSND)

def compiled_ops():
    '''Compile f afresh (inductor, caches on); the aten operators its graph runs, and the caches' counters.'''
    torch.compiler.reset()
    counters.clear()
    fn = torch.compile(f, fullgraph=True)
    with torch.no_grad():
        fn(q, k, v)
        with torch.profiler.profile() as prof:
            fn(q, k, v)
    names = {e.name for e in prof.events()}
    flash = "aten::_scaled_dot_product_flash_attention_for_cpu" in names
    math = "aten::bmm" in names or "aten::mm" in names or "aten::baddbmm" in names
    return {"backend": "torch_flash" if flash and not math else "torch_math" if math and not flash else sorted(names),
            "aot_hit": counters["aot_autograd"]["autograd_cache_hit"],
            "fx_hit": counters["inductor"]["fxgraph_cache_hit"]}
"""

SWITCH = """
out = {}
os.environ["DIFFSYNTH_ATTENTION_IMPLEMENTATION"] = "torch_math"
out["math"] = compiled_ops()
os.environ["DIFFSYNTH_ATTENTION_IMPLEMENTATION"] = "torch_flash"
out["flash"] = compiled_ops()
os.environ["DIFFSYNTH_ATTENTION_IMPLEMENTATION"] = "torch_math"
out["math_again"] = compiled_ops()
del os.environ["DIFFSYNTH_ATTENTION_IMPLEMENTATION"]
with da.use_backend("torch_flash"):
    out["scoped"] = compiled_ops()
out["auto"] = compiled_ops()  # tuned at trace time
da.clear_cache()
with torch.no_grad():
    da.attention_forward(q, k, v, *BSND)  # a new tuning of the same key: a new decision
out["retuned"] = compiled_ops()
os.environ["DIFFSYNTH_ATTENTION_TOLERANCE"] = "0.004"
out["tolerance"] = compiled_ops()
print(json.dumps(out))
"""

CROSS = """
out = compiled_ops()
out["tunings"] = da.stats()["tunings"]
print(json.dumps(out))
"""


def child(code: str, env: dict) -> dict:
    r = subprocess.run([sys.executable, "-c", PRELUDE + code], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def with_inductor_cache(env: dict) -> dict:
    """The child's environment with inductor's caches in a folder of its own (next to its decisions)."""
    return {**env, "TORCHINDUCTOR_CACHE_DIR": os.path.join(os.path.dirname(env["DIFFSYNTH_ATTENTION_CACHE_DIR"]), "inductor")}


def switch(env):
    return child(SWITCH, with_inductor_cache(env))


def cross(env):
    env = with_inductor_cache(env)
    return [child(CROSS, env), child(CROSS, env)]


@pytest.fixture(scope="module")
def children():
    return results(__name__)


def test_a_recompile_after_reset_runs_the_new_decision_with_the_caches_on(children):
    requires_bake()
    got = children["switch"].get()
    assert got["math"]["backend"] == "torch_math", got
    assert got["flash"]["backend"] == "torch_flash", got  # not torch_math's graph replayed from the caches
    assert got["math_again"]["backend"] == "torch_math", got
    assert got["math_again"]["aot_hit"] == 1, got  # an unchanged decision still hits
    assert got["scoped"]["backend"] == "torch_flash", got
    # clear_cache plus a new tuning, then a tolerance change: each a new decision, a new graph
    assert got["retuned"]["aot_hit"] == 0, got
    assert got["tolerance"]["aot_hit"] == 0, got


def test_a_second_fresh_process_hits_the_compile_caches(children):
    requires_bake()
    first, second = children["cross"].get()
    assert first["tunings"] == 1 and second["tunings"] == 0, (first, second)  # the decision was read from disk
    assert first["aot_hit"] == 0 and first["fx_hit"] == 0, first
    assert second["backend"] == first["backend"], (first, second)
    assert second["aot_hit"] == 1 and second["fx_hit"] == 1, second  # no per-process integer in the graph


prespawn(__name__, lambda item: {"test_a_recompile_after_reset_runs_the_new_decision_with_the_caches_on": "switch",
                                 "test_a_second_fresh_process_hits_the_compile_caches": "cross"}[item.name],
         {"switch": switch, "cross": cross})
