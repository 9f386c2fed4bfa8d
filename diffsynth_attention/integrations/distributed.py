"""One consistent set of decisions across torch.distributed ranks.

Nothing collective ever happens inside ``attention_forward`` (nor in the diffusers backend or
the USP route): a cache hit never waits on another rank, and ranks that hit and ranks that tune
issue the same collectives, their model's own. Ranks on one node share the cache (one tunes a
key, the others read it). Across nodes, every rank calls :func:`sync_decisions` at a point they
all reach (after a warm-up step, or at the end of ``warm``). Afterwards every rank holds the same
decision for every key any rank knows:

- ``reduce="rank0"`` (default): rank 0's decision where rank 0 has one, else the lowest rank's.
- ``reduce="max"``: each candidate's time is the *slowest* rank's (the slowest rank paces
  every collective), and the fastest candidate by that time wins; a candidate counts only if
  every rank that knows the key accepted it. Keys known by one rank keep that rank's decision.
"""

from __future__ import annotations

import logging
from typing import Optional

from ..states import TIMED
from ..store.decision import ACCEPTED, CHOSEN, Decision

logger = logging.getLogger("diffsynth_attention")


def merge_rank_entries(per_rank: list) -> dict:
    """{key_id: entry dict}: lower ranks win, so rank 0's decision is everyone's."""
    merged: dict = {}
    for entries in reversed(per_rank):
        merged.update(entries or {})
    return merged


def _capability(entry: dict):
    """(major, minor) of the CUDA device an entry's key names ("9.0" in the key), else None."""
    text = ((entry.get("key") or {}).get("device") or {}).get("capability")
    try:
        major, minor = str(text).split(".")
        return int(major), int(minor)
    except ValueError:
        return None


def merge_rank_entries_max(per_rank: list) -> dict:
    """{key_id: entry dict}: per key, candidate times reduced with MAX over the ranks that know
    it, the fastest of those wins (ties: the lowest rank's choice); the entry is the lowest
    rank's, with the reduced times and statuses; equal times go to the device's tie order."""
    from ..backends import preference_on

    merged = merge_rank_entries(per_rank)
    for kid in list(merged):
        entries = [e[kid] for e in per_rank if e and kid in e]
        if len(entries) < 2:
            continue
        names = set.intersection(*(set(e["candidates"]) for e in entries))
        times = {}
        for name in names:
            cands = [e["candidates"][name] for e in entries]
            if all(c["status"] in TIMED and c["time_ms"] is not None for c in cands):
                times[name] = max(c["time_ms"] for c in cands)
        if not times:
            continue
        first = entries[0]
        best = min(times.values())
        order = preference_on(_capability(first))
        winner = first["backend"] if times.get(first["backend"]) == best else \
            min((n for n, t in times.items() if t == best), key=lambda n: order.index(n) if n in order else 99)
        entry = dict(first, candidates={n: dict(c) for n, c in first["candidates"].items()}, backend=winner)
        for name, t in times.items():
            cand = entry["candidates"][name]
            cand["time_ms"] = t
            cand["status"] = CHOSEN if name == winner else (ACCEPTED if cand["status"] == CHOSEN else cand["status"])
            cand["reason"] = (f"sync_decisions: fastest by the slowest rank's time over {len(entries)} ranks"
                              if name == winner else (None if cand["status"] == ACCEPTED else cand["reason"]))
        merged[kid] = entry
    return merged


def sync_decisions(group: Optional[object] = None, reduce: str = "rank0") -> int:
    """Collective over an initialised process group: give every rank the same decisions.

    Every rank of ``group`` (default: the world) must call it. Uses ``all_gather_object``; with
    an NCCL group, set each rank's CUDA device first. ``reduce``: ``"rank0"`` (rank 0's decisions
    win) or ``"max"`` (candidate times reduced with MAX over the ranks; see the module). Returns
    how many decisions every rank now holds; they are also saved to each rank's cache.
    """
    if reduce not in ("rank0", "max"):
        raise ValueError(f"reduce={reduce!r}: expected 'rank0' or 'max'")
    import torch.distributed as dist

    from ..dispatch import default_dispatcher

    store = default_dispatcher().store

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("sync_decisions needs an initialised torch.distributed process group (call init_process_group first)")
    mine = {key_id: d.to_dict() for key_id, d in store.entries().items()}
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, mine, group=group)
    merged = merge_rank_entries(gathered) if reduce == "rank0" else merge_rank_entries_max(gathered)
    ours = store.entries()
    changed = [Decision.from_dict(k, e) for k, e in merged.items() if k not in ours or ours[k].to_dict() != e]
    if changed:
        store.put_many(changed, replace=True)
    logger.info("sync_decisions: %d decisions, %d changed on this rank", len(merged), len(changed))
    return len(merged)
