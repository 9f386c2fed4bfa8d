"""Dynamo's guards on a compiled module's forward: how many nodes the guard tree has, where they
read from, and how long one check of them takes (what every call of the compiled code pays first)."""

from __future__ import annotations

import statistics
import time


def _entry(module):
    from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list

    entries = _debug_get_cache_entry_list(type(module).forward.__code__)
    if not entries:
        return entries, None
    # torch 2.5 names the entry's guard manager check_fn (a GuardManagerWrapper, as guard_manager is)
    return entries, getattr(entries[0], "guard_manager", None) or getattr(entries[0], "check_fn", None)


def guard_us(module, args, calls: int = 20000, repeats: int = 7) -> tuple:
    """(median microseconds one guard check takes, cache entries) for a compiled module's forward."""
    entries, gm = _entry(module)
    if gm is None:
        return None, 0
    f_locals = {"self": module, "q": args[0], "k": args[1], "v": args[2]}
    if not gm.check(f_locals):
        return None, len(entries)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            gm.check(f_locals)
        ts.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(ts), len(entries)


def guard_sources(module) -> list:
    """The source of every node of the guard tree (``L['q']``, ``G['torch']``...), root first;
    each node holds the leaf guards checked on what it reads."""
    _, gm = _entry(module)
    root = getattr(gm, "root", gm)
    if root is None or not hasattr(root, "get_child_managers"):
        return []
    out, todo = [], [root]
    while todo:
        g = todo.pop()
        out.append(g.get_source())
        todo.extend(g.get_child_managers())
    return out


def leaf_count(module) -> int:
    """How many leaf guards (checks) the tree holds, over all its nodes."""
    _, gm = _entry(module)
    root = getattr(gm, "root", gm)
    if root is None or not hasattr(root, "get_leaf_guards"):
        return 0
    n, todo = 0, [root]
    while todo:
        g = todo.pop()
        n += len(g.get_leaf_guards())
        todo.extend(g.get_child_managers())
    return n


def cache_entries(module) -> int:
    """How many compiled entries (a graph and its guards each) the module's forward has now."""
    return len(_entry(module)[0] or ())
