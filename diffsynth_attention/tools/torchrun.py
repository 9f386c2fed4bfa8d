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


# Split costs, in seconds on an H200: tuning one problem (the budget floor dominates), and the
# first compilation of a FlashAttention-4 specialisation by a rank (later ones load it from the
# shared compile cache on disk).
_TUNE_S = 1.5
_COMPILE_S = 2.0


def specialisation(shape: dict) -> tuple:
    """What a kernel compiles per (FlashAttention-4's CuTe DSL): head dims, dtype, causal,
    window, grouped-query. Problems that share it share one compilation."""
    return (shape["head_dim"], shape.get("head_dim_v", shape["head_dim"]), shape.get("dtype", "bfloat16"),
            bool(shape.get("causal", False)), shape.get("window") is not None, shape["heads_q"] != shape["heads_kv"])


def split(shapes: list, world: int) -> list:
    """``shapes`` split over ``world`` ranks: [[shape, ...] per rank], the same on every rank.

    A specialisation's problems go to one rank where that balances (its compilation is paid
    once: ranks share FlashAttention-4's compile cache, but two ranks compiling the same kernel
    at the same time both pay); greedy on the estimated cost, largest groups first. Within a rank,
    problems keep their order in ``shapes``."""
    groups: dict = {}
    for index, shape in enumerate(shapes):
        groups.setdefault(specialisation(shape), []).append(index)
    load = [0.0] * world
    owner = [0] * len(shapes)
    for spec, members in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[1][0])):
        cost = _COMPILE_S + _TUNE_S * len(members)
        rank = min(range(world), key=lambda r: (load[r], r))
        if len(members) > 1 and load[rank] + cost > min(load) + (sum(load) + cost) / world + _COMPILE_S:
            # too big for one rank: spread its problems (each rank pays one compilation)
            paid: set = set()
            for index in members:
                rank = min(range(world), key=lambda r: (load[r] + (0 if r in paid else _COMPILE_S), r))
                owner[index] = rank
                load[rank] += _TUNE_S + (0 if rank in paid else _COMPILE_S)
                paid.add(rank)
            continue
        for index in members:
            owner[index] = rank
        load[rank] += cost
    return [[s for i, s in enumerate(shapes) if owner[i] == r] for r in range(world)]


def warm_distributed(shapes: list, device_arg: Optional[str], dtype=None, layout: str = "b n s d", on_done=None) -> list:
    """Split problems across ranks (:func:`split`), tune each on the rank's own device, then ``sync_decisions``
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
        results = warm(split(shapes, world)[rank], device, dtype, layout, on_done)
        sync_decisions()
        if rank == 0:  # every problem is now a cache hit: collect the whole table
            results = warm(shapes, device, dtype, layout)
        return results
    finally:
        if created:
            dist.destroy_process_group()
