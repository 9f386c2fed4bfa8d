"""What ran beside a timed sample (part of the benchmark harness, not installed).

A kernel package that loads on a background thread (``diffsynth_attention.backends.loading``:
the preload, a decided backend's import, its first launches; FlashAttention-4's import runs 6-8 s
of Python) takes the GIL from the caller's thread: a host-bound call timed meanwhile is not the
caller's. While such a load runs the library also lowers the interpreter's switch interval and
pauses the garbage collector. :class:`Watch` is the ``watch`` of the timer
(``diffsynth_attention.tuning.timing.interleaved``): before each sample it waits, bounded, until
no load runs (:func:`loads_running`, the library's ``loading.busy()``), and it records around each
sample the loads still running, the threads alive (with where each one was), Python's garbage
collections (per generation, and their pause) and the collector's and switch interval's state.
:meth:`Watch.summary` is what a result row keeps; :func:`summary_md` renders rows of them.
"""

from __future__ import annotations

import gc
import sys
import threading
import time
from typing import Optional

LOAD_WAIT_S = 30.0  # the most a Watch waits for background loads, over all its samples
_POLL_S = 0.01


def loads_running() -> tuple:
    """The backends whose kernel package loads on a background thread now (sorted names)."""
    from diffsynth_attention.backends import loading

    return loading.busy()


def wait_for_loads(max_wait_s: float) -> tuple:
    """Wait until no background load runs, at most ``max_wait_s``; (seconds waited, loads still running)."""
    t0 = time.perf_counter()
    running = loads_running()
    while running and time.perf_counter() - t0 < max_wait_s:
        time.sleep(_POLL_S)
        running = loads_running()
    return time.perf_counter() - t0, running


def _where(frame) -> str:
    return f"{'/'.join(frame.f_code.co_filename.split('/')[-2:])}:{frame.f_code.co_name}:{frame.f_lineno}"


def threads_now() -> dict:
    """{name: {"daemon": bool, "at": innermost frame}} of the threads alive, this one left out."""
    me = threading.get_ident()
    frames = sys._current_frames()
    out = {}
    for t in threading.enumerate():
        if t.ident == me:
            continue
        frame = frames.get(t.ident)
        out[t.name] = {"daemon": t.daemon, "at": None if frame is None else _where(frame)}
    return out


class Watch:
    """Around each sample of the timer: a bounded wait for background loads, then a record of what
    ran beside the sample (module docstring). ``max_wait_s`` bounds all the waits together: a
    hung load costs it once, then samples are only recorded."""

    def __init__(self, max_wait_s: float = LOAD_WAIT_S):
        self.wait_left = max_wait_s
        self.waited_s = 0.0
        self.samples = 0
        self.loads: dict = {}  # backend name -> samples it loaded beside (at their start or end)
        self.threads: dict = {}  # thread name -> {"daemon", "at", "samples"}
        self.gc_enabled_off = 0  # samples that ran with the collector off
        self.switch_intervals: set = set()
        self.per_method: dict = {}  # name -> {"samples", "gc": [g0, g1, g2], "gc_ms", "with_load"}
        self._gen: dict = {}
        self._gc_ms = 0.0
        self._gc_t0: Optional[float] = None
        self._start: Optional[tuple] = None

    def _on_gc(self, phase, info) -> None:
        if phase == "start":
            self._gc_t0 = time.perf_counter()
            gen = info.get("generation", 0)
            self._gen[gen] = self._gen.get(gen, 0) + 1
        elif self._gc_t0 is not None:
            self._gc_ms += (time.perf_counter() - self._gc_t0) * 1e3
            self._gc_t0 = None

    def before(self, name: str) -> None:
        if self.wait_left > 0:
            waited, _ = wait_for_loads(self.wait_left)
            self.wait_left -= waited
            self.waited_s += waited
        self._start = (loads_running(), threads_now())
        self._gen, self._gc_ms, self._gc_t0 = {}, 0.0, None
        gc.callbacks.append(self._on_gc)

    def after(self, name: str) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)
        loads_start, threads_start = self._start or ((), {})
        loads = sorted(set(loads_start) | set(loads_running()))
        self.samples += 1
        for n in loads:
            self.loads[n] = self.loads.get(n, 0) + 1
        for tname, info in {**threads_start, **threads_now()}.items():
            seen = self.threads.setdefault(tname, {"daemon": info["daemon"], "at": info["at"], "samples": 0})
            seen["samples"] += 1
            seen["at"] = info["at"] or seen["at"]
        if not gc.isenabled():
            self.gc_enabled_off += 1
        self.switch_intervals.add(sys.getswitchinterval())
        m = self.per_method.setdefault(name, {"samples": 0, "gc": [0, 0, 0], "gc_ms": 0.0, "with_load": 0})
        m["samples"] += 1
        for gen, n in self._gen.items():
            m["gc"][min(int(gen), 2)] += n
        m["gc_ms"] = round(m["gc_ms"] + self._gc_ms, 3)
        m["with_load"] += bool(loads)

    def summary(self) -> dict:
        """What a result row keeps: loads beside samples, threads (non-daemon and daemon, with
        where each was last seen), garbage collections per generation (all samples, and per
        method), the collector's and switch interval's state, and the time waited for loads."""
        gcs = [sum(m["gc"][g] for m in self.per_method.values()) for g in range(3)]
        return {"samples": self.samples, "waited_for_loads_s": round(self.waited_s, 3),
                "load_running": bool(self.loads), "loads": dict(self.loads),
                "samples_with_load": sum(m["with_load"] for m in self.per_method.values()),
                "threads": {"non_daemon": sorted(n for n, t in self.threads.items() if not t["daemon"]),
                            "daemon": sorted(n for n, t in self.threads.items() if t["daemon"]),
                            "where": {n: t["at"] for n, t in sorted(self.threads.items())}},
                "gc": {"collections": gcs, "ms": round(sum(m["gc_ms"] for m in self.per_method.values()), 3),
                       "samples_with_collector_off": self.gc_enabled_off},
                "switch_interval_s": sorted(self.switch_intervals),
                "per_method": self.per_method}


def summary_md(rows: list) -> list:
    """Markdown lines: one table row per (label, summary) of :meth:`Watch.summary`."""
    lines = ["| row | samples | loads beside samples (waited s) | non-daemon threads | daemon threads | GC gen0/1/2 (ms) "
             "| collector off | switch interval s | GC per method (gen0/1/2) |", "|---|---|---|---|---|---|---|---|---|"]
    for label, h in rows:
        if not h:
            continue
        loads = ", ".join(f"{n} x{c}" for n, c in h["loads"].items()) or "none"
        g = h["gc"]
        per = "; ".join(f"{n} {'/'.join(map(str, m['gc']))}" for n, m in h["per_method"].items() if any(m["gc"])) or "-"
        lines.append(f"| {label} | {h['samples']} | {loads} ({h['waited_for_loads_s']}) | "
                     f"{', '.join(h['threads']['non_daemon']) or '-'} | {', '.join(h['threads']['daemon']) or '-'} | "
                     f"{'/'.join(map(str, g['collections']))} ({g['ms']}) | {g['samples_with_collector_off']} | "
                     f"{', '.join(f'{x:g}' for x in h['switch_interval_s'])} | {per} |")
    return lines
