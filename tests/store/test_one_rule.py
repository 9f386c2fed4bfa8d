"""One trust rule for every store read (issue 33, item 1): a read given no tolerance derives it
from the decision's own key (dtype, device type, TF32, quality tier) with the function the tuner
gates by; there is no global 5e-3 fallback."""

import dataclasses

from diffsynth_attention import tiers
from diffsynth_attention.dispatch import Dispatcher
from diffsynth_attention.store.cache import DecisionCache
from diffsynth_attention.tolerance import DEFAULT_TOLERANCES, TF32_TOLERANCE, for_key, tolerance

from support.helpers import qkv


def _with_error(decision, error):
    chosen = dataclasses.replace(decision.candidates[decision.backend], error=error)
    return decision.replace(candidates={**decision.candidates, decision.backend: chosen})


def test_a_read_without_tolerance_uses_the_key_own_rule(tmp_path):
    q, k, v = qkv(sq=24)  # float32 on the CPU: 1e-4
    decision = Dispatcher(DecisionCache(tmp_path / "scout")).explain(q, k, v).decision
    assert for_key(decision.key) == DEFAULT_TOLERANCES["float32"]
    store = DecisionCache(tmp_path / "store")
    loose = _with_error(decision, 1e-3)  # would pass a global 5e-3, not float32's 1e-4
    store.put(loose)
    assert store.get(loose.key_id) is None
    assert DecisionCache(tmp_path / "store").get(loose.key_id) is None  # read back from its file: the same
    assert store.get(loose.key_id, tolerance=2e-3) is not None  # an explicit tolerance still rules
    tight = _with_error(decision, 5e-5)
    store.put(tight)
    assert store.get(tight.key_id) is not None
    group_of = __import__("diffsynth_attention.store.neighbours", fromlist=["group_of"]).group_of
    assert [d.key_id for d in store.neighbours(group_of(tight))] == [tight.key_id]
    store.put(loose)
    assert store.neighbours(group_of(loose)) == []


def test_for_key_reads_tf32_and_the_tier():
    fields = {"problem": {"dtype": "float32"}, "device": {"type": "cuda"}}
    assert for_key(fields) == tolerance("float32", "cuda", False) == DEFAULT_TOLERANCES["float32"]
    assert for_key({**fields, "problem": {"dtype": "float32", "tf32": True}}) == TF32_TOLERANCE
    fast = {"problem": {"dtype": "bfloat16"}, "device": {"type": "cuda"}, "quality": "fast"}
    assert for_key(fast) == max(DEFAULT_TOLERANCES["bfloat16"], tiers.bound("fast").rel_l1)
    assert for_key({"problem": {}}) is None  # a foreign entry: no rule, never trusted
