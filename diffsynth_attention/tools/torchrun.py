"""``warm`` under torchrun: the rank's place, its GPU, and the process group."""

from __future__ import annotations

import os
from typing import Optional


def distributed_context() -> Optional[tuple]:
    """(rank, world_size, local_rank) under torchrun (WORLD_SIZE > 1), else None."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if world <= 1:
            return None
        return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise ValueError("WORLD_SIZE, RANK and LOCAL_RANK must be whole numbers (as torchrun sets them)") from None


def rank_device(device_arg: Optional[str], local_rank: int):
    """The rank's device: its own GPU (by LOCAL_RANK), unless ``device_arg`` names one."""
    import torch

    from .devices import resolve_device

    if device_arg is None and torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    else:
        device = resolve_device(device_arg)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def warm_distributed(shapes: list, device_arg: Optional[str], dtype=None, layout: str = "b n s d", on_done=None) -> list:
    """Split problems across ranks, tune each on the rank's own device, then ``sync_decisions``
    so every rank (and cache) holds rank 0's decisions. Rank 0 returns every problem's result."""
    import torch.distributed as dist

    from ..integrations.distributed import sync_decisions
    from .warm import warm

    rank, world, local_rank = distributed_context()
    device = rank_device(device_arg, local_rank)
    created = False
    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")
        created = True
    try:
        results = warm(shapes[rank::world], device, dtype, layout, on_done)
        sync_decisions()
        if rank == 0:  # every problem is now a cache hit: collect the whole table
            results = warm(shapes, device, dtype, layout)
        return results
    finally:
        if created:
            dist.destroy_process_group()
