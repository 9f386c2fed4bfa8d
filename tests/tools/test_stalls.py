"""scripts/harness/stalls.py: the distribution of the first seconds of calls (issue 31, item 1)."""
import gc

from support.harness import bench  # noqa: F401  (scripts/ on sys.path)
from harness import stalls  # noqa: E402


def test_summary_counts_slow_calls_by_factor_margin_phase_and_time():
    times = [1.0] * 20 + [6.0, 30.0, 1.0, 200.0]
    starts = [i * 0.1 for i in range(len(times))]
    gcs = [(2.31, 2.36, 2)]  # within the call that started at 2.3 s (200 ms long)
    w = stalls.summarize(times, starts, loading_until=22, gcs=gcs, window_s=3.0)
    assert w["median_ms"] == 1.0 and w["stalls"] == 3 and w["stall_calls"] == [(22, 6.0), (23, 30.0), (25, 200.0)]
    assert w["over_factor"] == {"2x": 3, "5x": 3, "10x": 2, "100x": 1}
    assert w["over_margin_ms"] == {"+0.1": 3, "+1": 3, "+10": 2}
    assert (w["stalls_while_loading"], w["stalls_after_load"], w["load_done_call"]) == (2, 1, 24)
    assert (w["first_stall_s"], w["last_stall_s"]) == (2.0, 2.3) and w["stalls_per_second"] == {2: 3}
    assert w["gc"]["collections"]["2"] == 1 and w["gc"]["stalls_overlapping"] == 1 and w["gc"]["max_ms"] == 50.0
    assert w["stall_excess_ms"] == round(5.0 + 29.0 + 199.0, 2)
    assert (w["percentiles_ms"]["p90"], w["percentiles_ms"]["p99"]) == (6.0, 200.0)


def test_call_window_records_the_load_phase_and_garbage_collections():
    calls = []

    def call():
        calls.append(1)
        if len(calls) == 3:
            gc.collect()

    state = {"n": 0}

    def loaded():
        state["n"] += 1
        return state["n"] >= 4

    w = stalls.call_window(call, lambda: None, 3.0, loaded)  # 3 s: a full gc.collect() in the suite's heap took most of 1 s under load
    assert w["calls"] == len(calls) >= 4 and w["load_done_call"] == 4 + 2
    assert w["gc"]["collections"]["2"] >= 1 and w["switch_interval_s"] > 0
    assert gc.callbacks.count is not None and all(getattr(cb, "__name__", "") != "on_gc" for cb in gc.callbacks)


def test_distribution_table_has_a_line_per_process_window():
    w = stalls.summarize([1.0, 1.0, 9.0], [0.0, 0.1, 0.2], None, [], 1.0)
    lines = stalls.distribution_md([("fa3", "dispatcher", w), ("fa3", "sdpa", None)])
    assert len(lines) == 3 and lines[2].startswith("| fa3 | dispatcher | 1.0 |")


def test_slow_calls_sample_where_the_loading_threads_are():
    import threading
    import time

    release = threading.Event()

    def fake_import():
        release.wait(30)

    loader = threading.Thread(target=fake_import, name=stalls.LOADER_PREFIX + "fake", daemon=True)
    other = threading.Thread(target=release.wait, args=(30,), name="not-a-loader", daemon=True)
    loader.start(), other.start()
    try:
        w = stalls.call_window(lambda: time.sleep(stalls.SLOW_MS / 1e3 * 1.5), lambda: None, 0.05)
    finally:
        release.set()
    places = dict(w["loader_at_stall"])
    assert sum(places.values()) == w["calls"]  # one sample a slow call, from the one loading thread only
    assert all("threading.py:wait:" in place for place in places), places  # blocked in fake_import's wait
    lines = stalls.loader_md([("row", "dispatcher", w)])
    assert lines[0].startswith("Where the loading thread was") and "**row / dispatcher**" in lines[2]
    assert stalls.loader_md([("row", "sdpa", {"calls": 3})]) == []
