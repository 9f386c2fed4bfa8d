"""``warm`` over a warm cache: a warm whose decisions are cached answers from the cache (no inputs, no
tuning, no kernel import), and torchrun ranks split problems by the kernel they compile."""
import pytest
import torch

import diffsynth_attention as da
from diffsynth_attention.dispatch import default_dispatcher
from diffsynth_attention.tools import warm as warm_module
from diffsynth_attention.tools.shapes import select_presets
from diffsynth_attention.tools.torchrun import specialisation, split

SHAPES = [
    {"name": "a", "batch": 1, "heads_q": 2, "heads_kv": 2, "seq_q": 24, "seq_kv": 16, "head_dim": 8, "dtype": "float32"},
    {"name": "b", "batch": 2, "heads_q": 4, "heads_kv": 2, "seq_q": 16, "seq_kv": 16, "head_dim": 8, "dtype": "float32",
     "causal": True},
    {"name": "c", "batch": 1, "heads_q": 2, "heads_kv": 2, "seq_q": 16, "seq_kv": 16, "head_dim": 16, "dtype": "float32",
     "window": 3},
]


@pytest.mark.parametrize("layout", ["b n s d", "b s (n d)"])
def test_a_second_warm_answers_from_the_cache_with_the_keys_a_call_uses(layout, monkeypatch):
    cpu = torch.device("cpu")
    first = warm_module.warm(SHAPES, cpu, layout=layout)
    assert [info.source for _, info in first] == ["tuned"] * 3
    assert all(warm_module.known(s, cpu, layout=layout) is not None for s in SHAPES)
    made = []
    real = warm_module.make_inputs
    monkeypatch.setattr(warm_module, "make_inputs", lambda s, device, *a, **k: made.append(str(device)) or real(s, device, *a, **k))
    before = da.stats()["tunings"]
    second = warm_module.warm(SHAPES, cpu, layout=layout)
    assert da.stats()["tunings"] == before and set(made) == {"meta"}  # no real inputs, no tuning
    for (_, a), (_, b) in zip(first, second):
        assert (b.source, b.key_id, b.backend, b.problem) == ("cache", a.key_id, a.backend, a.problem)
        assert b.decision.backend == a.backend and b.candidates == a.candidates


def test_a_packed_layout_is_warmed_as_diffsynth_studio_calls_it():
    """`warm --layout 'b s (n d)'` (and `explain`) gave the packed axes' lengths as dims={'d': head_dim},
    where DiffSynth-Studio's callers (the Wan DiT's flash_attention, patch_diffsynth's route of it)
    pass dims={'n': heads}: the layout is part of the key, so the warmed decision was never used."""
    cpu = torch.device("cpu")
    (shape, info), = warm_module.warm(SHAPES[:1], cpu, layout="b s (n d)")
    assert info.source == "tuned"
    q = torch.randn(1, 24, 2 * 8)
    k = torch.randn(1, 16, 2 * 8)
    pattern = "b s (n d)"
    before = da.stats()["tunings"]
    da.attention_forward(q, k, k, pattern, pattern, pattern, pattern, dims={"n": 2})
    assert da.stats()["tunings"] == before  # the warmed key
    assert da.explain(q, k, k, pattern, pattern, pattern, pattern, dims={"n": 2}).key_id == info.key_id
    # (grouped-query attention, whose k and v pack other head counts, keeps dims={'d': head_dim}: the
    # test above warms SHAPES[1] so)


def test_known_is_none_for_a_problem_without_a_usable_decision():
    cpu = torch.device("cpu")
    assert warm_module.known(SHAPES[0], cpu) is None
    (_, info), = warm_module.warm(SHAPES[:1], cpu)
    store = default_dispatcher().store
    decision = store.get(info.key_id)
    store.put(decision.replace(backend="flash_attention_3"))  # not usable on this machine: warm tunes again
    assert warm_module.known(SHAPES[0], cpu) is None


def test_ranks_split_problems_by_specialisation_and_cover_each_once():
    shapes = select_presets(["all"])
    for world in (1, 2, 3, 4):
        parts = split(shapes, world)
        assert len(parts) == world and sorted(s["name"] for p in parts for s in p) == sorted(s["name"] for s in shapes)
        for part in parts:  # each rank keeps the suite's order
            assert [s["name"] for s in part] == [s["name"] for s in shapes if s in part]
    two = split(shapes, 2)
    owners = {}
    for rank, part in enumerate(two):
        for s in part:
            owners.setdefault(specialisation(s), set()).add(rank)
    small = [spec for spec in owners if sum(specialisation(s) == spec for s in shapes) == 2]
    assert small and all(len(owners[spec]) == 1 for spec in small)  # a pair shares one compilation
    assert abs(len(two[0]) - len(two[1])) <= 1
