"""One consistent set of decisions across torch.distributed ranks.

Nothing collective ever happens inside ``attention_forward``: ranks that meet different
problems never wait on each other. Every rank calls :func:`sync_decisions` at a point they all
reach (after a warm-up step, or at the end of ``warm``); afterwards every rank holds rank 0's
decision for every key that rank 0 knows, and the lowest rank's for keys rank 0 does not know.
"""

from __future__ import annotations

import logging
from typing import Optional

from ..store.decision import Decision

logger = logging.getLogger("diffsynth_attention")


def merge_rank_entries(per_rank: list) -> dict:
    """{key_id: entry dict}: lower ranks win, so rank 0's decision is everyone's."""
    merged: dict = {}
    for entries in reversed(per_rank):
        merged.update(entries or {})
    return merged


def sync_decisions(group: Optional[object] = None) -> int:
    """Collective over an initialised process group: make every rank's decisions rank 0's.

    Every rank of ``group`` (default: the world) must call it. Uses ``all_gather_object``; with
    an NCCL group, set each rank's CUDA device first. Returns how many decisions every rank
    now holds; they are also saved to each rank's cache file.
    """
    import torch.distributed as dist

    from ..dispatch import default_dispatcher

    store = default_dispatcher().store

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("sync_decisions needs an initialised torch.distributed process group (call init_process_group first)")
    mine = {key_id: d.to_dict() for key_id, d in store.entries().items()}
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, mine, group=group)
    merged = merge_rank_entries(gathered)
    ours = store.entries()
    changed = [Decision.from_dict(k, e) for k, e in merged.items() if k not in ours or ours[k].to_dict() != e]
    if changed:
        store.put_many(changed, replace=True)
    logger.info("sync_decisions: %d decisions, %d changed on this rank", len(merged), len(changed))
    return len(merged)
