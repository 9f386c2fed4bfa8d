"""The first seconds of calls of a process, as a distribution (issue 31, item 1; part of the
benchmark harness, not installed): what ``scripts/bench_first_result.py`` reports after the first
result, so that one GPU run tells where slow calls come from.

:func:`call_window` calls (synchronised) for a number of seconds and returns, besides the median
and the calls above ``STALL_FACTOR`` x the median (the target: none), the percentiles, counts
above several factors and above fixed margins (a tiny median makes "5x" a few microseconds of
host jitter: the margins tell), when the slow calls happened (per second since the window
started), how many came while the decided backend was still loading and how many after
(``loaded``), and Python's garbage collections during the window (pauses, and the slow calls that
overlapped one), and where the loading threads were when a slow call got the GIL back
(``loader_at_stall``: the frame a background import had reached right after the hold that
stalled the caller, counted by place). :func:`load_done` makes ``loaded`` for a backend name;
:func:`distribution_md` renders the rows' distributions as a markdown table.
"""

from __future__ import annotations

import gc
import statistics
import sys
import threading
import time
from typing import Callable, Optional

STALL_FACTOR = 5.0  # target: in the first window of calls, none after the first above 5x the median
FACTORS = (2.0, 5.0, 10.0, 100.0)
MARGINS_MS = (0.1, 1.0, 10.0)  # calls above the median plus these


def load_done(name: str) -> Callable[[], bool]:
    """``() -> bool``: whether backend ``name``'s load (import and first launches) has ended
    (always True for a backend with nothing to load); a dict lookup per call."""
    from diffsynth_attention.backends import REGISTRY, loading

    backend = REGISTRY[name]
    if not loading.needs_loading(backend):
        return lambda: True
    return lambda: loading.done(backend)


def _percentile(ordered: list, q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarize(times: list, starts: list, loading_until: Optional[int], gcs: list, window_s: float) -> dict:
    """The distribution of ``times`` (ms per call; ``starts``: seconds since the window began)."""
    if not times:
        return {"seconds": window_s, "calls": 0}
    median = statistics.median(times)
    ordered = sorted(times)
    slow = [i for i, ms in enumerate(times) if ms > STALL_FACTOR * median]
    out = {"seconds": window_s, "calls": len(times), "median_ms": round(median, 4), "mean_ms": round(statistics.fmean(times), 4),
           "max_ms": round(ordered[-1], 3), "max_over_median": round(ordered[-1] / median, 2) if median else None,
           "percentiles_ms": {p: round(_percentile(ordered, q), 4) for p, q in
                              (("p90", 0.9), ("p99", 0.99), ("p99.9", 0.999))},
           "over_factor": {f"{f:g}x": sum(ms > f * median for ms in times) for f in FACTORS},
           "over_margin_ms": {f"+{m:g}": sum(ms > median + m for ms in times) for m in MARGINS_MS},
           "stalls": len(slow), "stall_calls": [(i + 2, round(times[i], 2)) for i in slow[:20]],
           "stall_excess_ms": round(sum(times[i] - median for i in slow), 2)}
    if slow:
        out["first_stall_s"], out["last_stall_s"] = round(starts[slow[0]], 3), round(starts[slow[-1]], 3)
        per_second: dict = {}
        for i in slow:
            per_second[int(starts[i])] = per_second.get(int(starts[i]), 0) + 1
        out["stalls_per_second"] = per_second
    if loading_until is not None:  # calls [0, loading_until) ran while the decided backend loaded
        out["load_done_call"] = loading_until + 2
        out["load_done_s"] = round(starts[loading_until], 3) if loading_until < len(starts) else None
        out["stalls_while_loading"] = sum(i < loading_until for i in slow)
        out["stalls_after_load"] = len(slow) - out["stalls_while_loading"]
    pauses = [(t0, t1) for t0, t1, _ in gcs]
    out["gc"] = {"collections": {str(g): sum(1 for *_, gen in gcs if gen == g) for g in (0, 1, 2)},
                 "total_ms": round(sum(t1 - t0 for t0, t1 in pauses) * 1e3, 2),
                 "max_ms": round(max((t1 - t0 for t0, t1 in pauses), default=0.0) * 1e3, 2),
                 "stalls_overlapping": sum(1 for i in slow if any(t0 < starts[i] + times[i] / 1e3 and t1 > starts[i]
                                                                  for t0, t1 in pauses))}
    return out


LOADER_PREFIX = "diffsynth-attention-load-"
SLOW_MS = 2.0  # a call this long (absolute) has the loaders' frames sampled right after it


def _loader_frames() -> list:
    """For each background-load thread: its innermost frame and the innermost one inside a
    kernel package or torch (``file:function:line``), as one string."""
    names = {t.ident: t.name for t in threading.enumerate() if t.name.startswith(LOADER_PREFIX)}
    if not names:
        return []
    out = []
    for ident, frame in sys._current_frames().items():
        if ident not in names:
            continue
        inner, package = frame, None
        f = frame
        while f is not None and package is None:
            path = f.f_code.co_filename
            if "importlib" not in path and "<frozen" not in path:
                package = f
            f = f.f_back
        fmt = lambda fr: f"{'/'.join(fr.f_code.co_filename.split('/')[-2:])}:{fr.f_code.co_name}:{fr.f_lineno}"  # noqa: E731
        out.append(fmt(inner) + ("" if package is None or package is inner else " <- " + fmt(package)))
    return out


def call_window(call: Callable, sync: Callable, window_s: float, loaded: Optional[Callable[[], bool]] = None) -> dict:
    """Call ``call()`` then ``sync()`` for ``window_s`` seconds; :func:`summarize` of the calls.
    ``loaded()`` is asked after each call until it says True (the load-phase split)."""
    gcs: list = []
    base = time.perf_counter()
    pending: dict = {}

    def on_gc(phase, info):
        now = time.perf_counter() - base
        if phase == "start":
            pending["t"] = now
        elif "t" in pending:
            gcs.append((pending.pop("t"), now, info.get("generation")))

    out_env = {"switch_interval_s": sys.getswitchinterval(), "threads_at_start": threading.active_count()}
    times, starts, loading_until, at_stall = [], [], None, []
    gc.callbacks.append(on_gc)
    try:
        end = base + window_s
        while True:
            t0 = time.perf_counter()
            if t0 >= end:
                break
            call()
            sync()
            times.append((time.perf_counter() - t0) * 1e3)
            starts.append(t0 - base)
            if times[-1] > SLOW_MS and len(at_stall) < 5000:
                at_stall.extend(_loader_frames())
            if loading_until is None and loaded is not None and loaded():
                loading_until = len(times)
    finally:
        gc.callbacks.remove(on_gc)
    if loaded is not None and loading_until is None:
        loading_until = len(times)  # still loading at the end
    out = summarize(times, starts, loading_until, gcs, window_s)
    out.update(out_env, threads_at_end=threading.active_count())
    if at_stall:
        counts: dict = {}
        for place in at_stall:
            counts[place] = counts.get(place, 0) + 1
        out["loader_at_stall"] = sorted(counts.items(), key=lambda kv: -kv[1])[:15]
    return out


def distribution_md(rows: list) -> list:
    """Markdown lines: one row per (row, variant, process) with a window."""
    lines = ["| row | variant | median ms | p99 ms | p99.9 ms | max ms | >2x / >5x / >10x | > median +1 ms / +10 ms "
             "| stalls loading / after (load done s) | first-last stall s | GC count, max ms, stalls in one |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row, variant, w in rows:
        if not w or not w.get("calls"):
            continue
        f, m, p = w.get("over_factor", {}), w.get("over_margin_ms", {}), w.get("percentiles_ms", {})
        load = "-" if "load_done_call" not in w else (
            f"{w['stalls_while_loading']} / {w['stalls_after_load']} ({w.get('load_done_s')})")
        when = "-" if "first_stall_s" not in w else f"{w['first_stall_s']:.2f}-{w['last_stall_s']:.2f}"
        g = w.get("gc", {})
        lines.append(f"| {row} | {variant} | {w['median_ms']} | {p.get('p99')} | {p.get('p99.9')} | {w['max_ms']} | "
                     f"{f.get('2x')} / {f.get('5x')} / {f.get('10x')} | {m.get('+1')} / {m.get('+10')} | {load} | {when} | "
                     f"{sum(g.get('collections', {}).values())}, {g.get('max_ms')}, {g.get('stalls_overlapping')} |")
    return lines


def loader_md(rows: list) -> list:
    """Markdown lines: per (row, variant) with samples, where the loading threads were after slow calls."""
    lines = []
    for row, variant, w in rows:
        places = (w or {}).get("loader_at_stall")
        if places:
            lines.append(f"- **{row} / {variant}**: " + "; ".join(f"`{place}` {n}" for place, n in places[:8]))
    return (["Where the loading thread was when a call over %g ms got the GIL back (most frequent places):" % SLOW_MS, ""]
            + lines + [""]) if lines else []
