"""Store-only helpers (no torch): valid decisions for fake keys, and the import preamble that
subprocesses use to load the store without the package face (which imports torch)."""
import dataclasses

from diffsynth_attention.store.decision import Candidate, Decision, key_id


def fake_key(i: int) -> dict:
    return {"problem": {"batch": 1, "heads_q": 1, "heads_kv": 1, "seq_q": i + 1, "seq_kv": 1, "head_dim": 8,
                        "head_dim_v": 8, "dtype": "float32", "layout": "b n s d, b n s d, b n s d -> b n s d",
                        "mask": "none", "mask_shape": None, "causal": False, "window": None, "requires_grad": False},
            "device": {"type": "cpu", "name": "fake"}, "versions": {"torch": "t", "diffsynth_attention": "0"}}


def make_decision(i: int, backend: str = "torch") -> Decision:
    key = fake_key(i)
    return Decision(key_id(key), key, backend, {backend: Candidate("chosen", 1.0, 0.0, reps=3)},
                    created="2026-01-01T00:00:00+00:00", tuning_seconds=0.01)


def with_chosen(decision: Decision, **changes) -> Decision:
    """``decision`` with its chosen candidate's fields changed (decisions are frozen: a new one);
    ``tolerance=`` changes the decision's own."""
    tolerance = changes.pop("tolerance", decision.tolerance)
    chosen = dataclasses.replace(decision.candidates[decision.backend], **changes)
    return decision.replace(candidates={**decision.candidates, decision.backend: chosen}, tolerance=tolerance)


def decided_for(decision: Decision, backend: str, **changes) -> Decision:
    """``decision`` as if ``backend`` had won it: the chosen candidate marked accepted, ``backend``'s
    chosen (its fields changed by ``changes``), ``backend`` the decision's backend."""
    candidates = {n: dataclasses.replace(c, status="accepted") if c.status == "chosen" else c
                  for n, c in decision.candidates.items()}
    if backend in candidates:
        candidates[backend] = dataclasses.replace(candidates[backend], status="chosen", **changes)
    return decision.replace(backend=backend, candidates=candidates)


# Exec'd first by subprocess scripts: import the store as the package's submodules without
# running diffsynth_attention/__init__.py (torch); then prove torch was not imported.
PREAMBLE = r"""
import os, sys, types
_root = os.environ["DA_ROOT"]
for _name, _sub in (("diffsynth_attention", ""), ("diffsynth_attention.store", "store")):
    _m = types.ModuleType(_name)
    _m.__path__ = [os.path.join(_root, "diffsynth_attention", _sub)]
    sys.modules[_name] = _m
sys.path.insert(0, os.path.join(_root, "tests"))
from diffsynth_attention.store.cache import DecisionCache
from diffsynth_attention.store import cache as cache_mod
from support.store_helpers import make_decision
assert "torch" not in sys.modules, "the store imported torch"
"""
