"""The compile matrix (scripts/compile_matrix.py), a representative subset: each model,
each compile mode and each patch_sdpa form at least once, every variant in a fresh subprocess
with a fresh cache, fullgraph=True as the first thing the process does. The full 27 variants:
``PYTHONPATH=$PWD python scripts/compile_matrix.py``."""
import importlib.util
import os

import pytest

pytest.importorskip("diffusers")

from support.compile_helpers import dynamo_can  # noqa: E402
from support.subprocesses import prespawn, results  # noqa: E402

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "scripts", "compile_matrix.py")
_spec = importlib.util.spec_from_file_location("compile_matrix", SCRIPT)
matrix = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(matrix)

# (model, mode, form, compiles of the same model calling PyTorch's SDPA, from the full matrix:
# the plain baseline is not rerun here, to keep each subprocess short)
SUBSET = [
    ("flux", "static", "global", 2),
    ("flux", "default", "around", 2),
    ("wan", "default", "inside", 2),
    ("wan", "dynamic", "global", 3),
    ("unet", "dynamic", "around", 2),
    ("unet", "static", "inside", 2),
]


# Every variant in a fresh process (spawn gives each a fresh cache), started when collection ends.
prespawn(__name__, lambda item: tuple(item.callspec.params[n] for n in ("model", "mode", "form")),
         {v[:3]: (lambda env, v=v: matrix.spawn(*v[:3], timeout=300, env=env, plain=False)) for v in SUBSET})


@pytest.fixture(scope="module")
def variants():
    return results(__name__)


@pytest.mark.parametrize("model,mode,form,plain_compiles", SUBSET)
def test_compiled_diffusers_model_routes_stays_compiled_and_matches(model, mode, form, plain_compiles, variants):
    r = variants[model, mode, form].get()
    verdicts = matrix.verdict(r, plain_compiles)
    bakes = dynamo_can("bake")
    if not bakes:  # torch 2.5: every graph holds the run-time operator (docs/compile.md)
        verdicts = [v for v in verdicts if not v.endswith("holds the run-time operator")]
    assert not verdicts, (verdicts, r)
    assert r["runs"] == r["calls"] == 5, r  # every call compiled
    assert r["stats"]["tunings"] > 0, r  # routed through the dispatcher
    if mode == "static" and bakes:  # concrete sizes: the decision is baked, no run-time operator
        assert not any(r["dispatch_ops"]), r
