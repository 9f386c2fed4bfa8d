"""Neighbour keys: which keys differ only in sequence lengths that fall in the same bucket
(about four per octave), so that ``DIFFSYNTH_ATTENTION_NEW_SHAPES=nearest`` can serve a new
length from a known decision. Pure functions of a key's fields; no torch."""

from __future__ import annotations

import math
from typing import Optional

from .decision import key_id

BUCKETS_PER_OCTAVE = 4  # neighbours: sequence lengths within a factor of 2**(1/4) (~19%) share a bucket


def seq_bucket(length: int, per_octave: int = BUCKETS_PER_OCTAVE) -> int:
    """The bucket of a sequence length: ``round(per_octave * log2(length))``."""
    return int(round(per_octave * math.log2(max(int(length), 1))))


def neighbour_group(fields: dict) -> str:
    """A key's fields with the sequence lengths taken out (and the mask shape's sequence axes
    abstracted): two keys with the same group differ at most in seq_q and seq_kv."""
    problem = dict(fields["problem"])
    sq, skv = problem.pop("seq_q"), problem.pop("seq_kv")
    shape = problem.get("mask_shape")
    if shape is not None:
        shape = list(shape)
        shape[2] = "s_q" if shape[2] == sq and sq != 1 else shape[2]
        shape[3] = "s_kv" if shape[3] == skv and skv != 1 else shape[3]
        problem["mask_shape"] = shape
    problem["seq_q_is_seq_kv"] = sq == skv  # causal/window alignment depends on it
    return key_id({**fields, "problem": problem})


def neighbour_distance(a: dict, b: dict, per_octave: int = BUCKETS_PER_OCTAVE) -> Optional[float]:
    """For two keys' fields of one :func:`neighbour_group`: None unless both sequence lengths fall
    in the same bucket, else how far apart they are (sum of |log2| ratios)."""
    pa, pb = a["problem"], b["problem"]
    if seq_bucket(pa["seq_q"], per_octave) != seq_bucket(pb["seq_q"], per_octave):
        return None
    if seq_bucket(pa["seq_kv"], per_octave) != seq_bucket(pb["seq_kv"], per_octave):
        return None
    return abs(math.log2(pa["seq_q"] / pb["seq_q"])) + abs(math.log2(pa["seq_kv"] / pb["seq_kv"]))


def group_of(decision) -> Optional[str]:
    """The neighbour group of a decision's key, or None for a key of another shape (foreign entry)."""
    try:
        return neighbour_group(decision.key)
    except (KeyError, TypeError, ValueError, IndexError):
        return None


def cell(fields: dict) -> Optional[str]:
    """The persisted index's cell of a key: its neighbour group and the buckets of its sequence
    lengths (``<group>-<bucket of s_q>-<bucket of s_kv>``): a neighbour is always in the same cell."""
    try:
        problem = fields["problem"]
        return f"{neighbour_group(fields)}-{seq_bucket(problem['seq_q'])}-{seq_bucket(problem['seq_kv'])}"
    except (KeyError, TypeError, ValueError, IndexError):
        return None


def cell_of(decision) -> Optional[str]:
    return cell(decision.key) if isinstance(decision.key, dict) else None


def nearest(fields: dict, decisions, exclude: Optional[str] = None):
    """The decision among ``decisions`` (of ``fields``' group) nearest to ``fields``, or None."""
    found = []
    for d in decisions:
        if d.key_id == exclude:
            continue
        try:
            distance = neighbour_distance(fields, d.key)
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            continue
        if distance is not None:
            found.append((distance, d.key_id, d))
    return min(found, key=lambda f: (f[0], f[1]))[2] if found else None


def bucket_bounds(bucket: int, per_octave: int = BUCKETS_PER_OCTAVE) -> tuple:
    """The smallest and largest sequence length of a bucket (:func:`seq_bucket`)."""
    lo = max(1, int(math.floor(2 ** ((bucket - 0.5) / per_octave))))
    while lo > 1 and seq_bucket(lo - 1, per_octave) == bucket:
        lo -= 1
    while seq_bucket(lo, per_octave) < bucket:
        lo += 1
    hi = max(lo, int(math.ceil(2 ** ((bucket + 0.5) / per_octave))))
    while seq_bucket(hi, per_octave) > bucket:
        hi -= 1
    while seq_bucket(hi + 1, per_octave) == bucket:
        hi += 1
    return lo, hi
