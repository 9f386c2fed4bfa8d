"""Neighbours for new sequence lengths: buckets of about four per octave, the
``DIFFSYNTH_ATTENTION_NEW_SHAPES`` reader, ``nearest`` serving a new length from a decision in the
same bucket, and neighbour groups that ignore only sequence lengths."""
import pytest

import diffsynth_attention as da
from diffsynth_attention import config
from diffsynth_attention.store.key import neighbour_group, seq_bucket

from support.helpers import full_reference, qkv, rel


def test_buckets_are_about_four_per_octave():
    assert seq_bucket(64) == 24 and seq_bucket(68) == 24 and seq_bucket(58) == 23 and seq_bucket(128) == 28
    assert len({seq_bucket(s) for s in range(1024, 2048)}) in (4, 5)


def test_new_shapes_reader(monkeypatch):
    assert config.new_shapes() == "tune"
    monkeypatch.setenv("DIFFSYNTH_ATTENTION_NEW_SHAPES", " Nearest ")
    assert config.new_shapes() == "nearest"
    monkeypatch.setenv("DIFFSYNTH_ATTENTION_NEW_SHAPES", "guess")
    with pytest.raises(ValueError, match="DIFFSYNTH_ATTENTION_NEW_SHAPES='guess'"):
        config.new_shapes()


def test_nearest_serves_a_new_length_in_the_same_bucket_from_its_neighbour(monkeypatch):
    q, k, v = qkv(sq=64)
    known = da.explain(q, k, v)
    assert known.source == "tuned"
    monkeypatch.setenv("DIFFSYNTH_ATTENTION_NEW_SHAPES", "nearest")
    q2, k2, v2 = qkv(sq=68, seed=1)
    out = da.attention_forward(q2, k2, v2)
    assert rel(out, full_reference(q2, k2, v2)) < 1e-5
    info = da.explain(q2, k2, v2)
    assert info.source == "neighbour" and info.neighbour_of == known.key_id and info.as_dict()["neighbour_of"] == known.key_id
    assert info.backend == known.backend and info.key_id != known.key_id and info["key"]["problem"]["seq_q"] == 68
    assert da.stats()["tunings"] == 1
    # out of the bucket, or another head count: tuned
    assert da.explain(*qkv(sq=100)).source == "tuned"
    assert da.explain(*qkv(sq=64, hq=2)).source == "tuned"
    assert da.stats()["tunings"] == 3


def test_tune_mode_tunes_every_new_length():
    da.explain(*qkv(sq=64))
    assert da.explain(*qkv(sq=68)).source == "tuned"
    assert da.stats()["tunings"] == 2


def test_neighbour_groups_ignore_only_sequence_lengths():
    def fields(sq, skv, mask_shape=None, heads=4):
        problem = {"batch": 1, "heads_q": heads, "heads_kv": heads, "seq_q": sq, "seq_kv": skv, "head_dim": 64,
                   "head_dim_v": 64, "dtype": "float16", "layout": "b n s d", "mask": "none" if mask_shape is None else "bool",
                   "mask_shape": mask_shape, "causal": True, "window": None, "requires_grad": False}
        return {"problem": problem, "device": {"type": "cpu", "name": "x"}, "versions": {"torch": "2"}}

    assert neighbour_group(fields(100, 100)) == neighbour_group(fields(110, 110))
    assert neighbour_group(fields(100, 100)) != neighbour_group(fields(100, 110))  # s_q == s_kv matters (causal)
    assert neighbour_group(fields(100, 100, heads=8)) != neighbour_group(fields(110, 110))
    assert neighbour_group(fields(100, 90, [1, 1, 100, 90])) == neighbour_group(fields(110, 95, [1, 1, 110, 95]))
    assert neighbour_group(fields(100, 90, [1, 1, 1, 90])) != neighbour_group(fields(110, 95, [1, 1, 110, 95]))
