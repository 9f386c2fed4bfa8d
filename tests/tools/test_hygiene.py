"""Benchmark hygiene (scripts/harness/hygiene.py): before each timed sample a bounded wait until no kernel
package loads in the background, and a record of what ran beside the sample (loads, threads, garbage
collections), through the timer's ``watch``; bench_compiled.py and benchmark.py list it per row."""
import gc
import sys
import threading
from pathlib import Path

import pytest
import torch

from support.harness import bench  # noqa: F401  (scripts/ on sys.path)
from harness import hygiene  # noqa: E402
from diffsynth_attention.backends import loading  # noqa: E402
from diffsynth_attention.tuning.timing import interleaved  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def fake_load():
    """A background 'load' that runs until released: listed by loading.busy() meanwhile."""
    release = threading.Event()
    thread = threading.Thread(target=release.wait, name="diffsynth-attention-load-fake", daemon=True)
    thread.start()
    loading._threads["fake"] = thread
    yield release
    release.set()
    thread.join(5)
    loading._threads.pop("fake", None)


def test_a_watch_waits_for_a_background_load_before_the_sample(fake_load):
    threading.Timer(0.2, fake_load.set).start()
    w = hygiene.Watch(max_wait_s=10)
    w.before("a")
    waited = w.waited_s
    w.after("a")
    s = w.summary()
    assert waited >= 0.1 and s["load_running"] is False and s["loads"] == {} and s["samples_with_load"] == 0


def test_a_watch_out_of_wait_records_the_load_beside_the_sample_and_the_threads(fake_load):
    w = hygiene.Watch(max_wait_s=0.05)  # the bound: spent on the first sample, then only recorded
    for name in ("a", "b"):
        w.before(name)
        w.after(name)
    s = w.summary()
    assert s["load_running"] is True and s["loads"] == {"fake": 2} and s["samples_with_load"] == 2
    assert s["waited_for_loads_s"] < 1.0
    assert "diffsynth-attention-load-fake" in s["threads"]["daemon"]
    assert ":wait:" in s["threads"]["where"]["diffsynth-attention-load-fake"]  # where it was: waiting
    assert threading.main_thread().name not in s["threads"]["non_daemon"]  # this thread is left out


def test_a_watch_counts_garbage_collections_during_a_sample_per_method():
    w = hygiene.Watch()
    w.before("collects")
    gc.collect()
    w.after("collects")
    w.before("quiet")
    w.after("quiet")
    s = w.summary()
    assert s["gc"]["collections"][2] >= 1 and s["per_method"]["collects"]["gc"][2] >= 1
    assert s["per_method"]["quiet"]["gc"] == [0, 0, 0] and s["switch_interval_s"] == [sys.getswitchinterval()]
    assert w._on_gc not in gc.callbacks  # removed after each sample
    lines = hygiene.summary_md([("row", s), ("empty", None)])
    assert len(lines) == 3 and lines[2].startswith("| row | 2 | none (") and "collects " in lines[2]


def test_the_timer_calls_the_watch_around_every_sample_the_sizing_one_included():
    seen = []

    class Recorder:
        def before(self, name):
            seen.append(("before", name))

        def after(self, name):
            seen.append(("after", name))

    clock = iter(range(10**6)).__next__
    got = interleaved({"a": lambda: None, "b": lambda: None}, torch.device("cpu"), samples=3, clock=lambda: float(clock()),
                      watch=Recorder())
    assert set(got) == {"a", "b"} and len(seen) == 2 * (2 + 2 * 3)
    assert all(seen[i][0] == "before" and seen[i + 1] == ("after", seen[i][1]) for i in range(0, len(seen), 2))


def test_the_harness_timer_keeps_a_record_when_given_a_watch():
    w = hygiene.Watch()
    bench.interleaved({"a": lambda: None, "b": lambda: None}, torch.device("cpu"), samples=2, watch=w)
    assert w.samples == 2 * (1 + 2) and set(w.summary()["per_method"]) == {"a", "b"}


def test_bench_compiled_lists_what_ran_beside_each_rows_samples(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_compiled

    w = hygiene.Watch()
    w.before("auto_compiled")
    w.after("auto_compiled")
    row = {"name": "p", "layout": "b n s d", "decision": "torch", "best_backend": "torch", "times_ms": {}, "errors": {},
           "hygiene": w.summary()}
    result = {"environment": {"device": "cpu", "date": "d", "torch": "t", "cuda": None}, "samples": 1, "rows": [row],
              "hit_overhead": [], "operator_overhead": [], "cpu_small_module": None, "summary": {}}
    bench_compiled.write_markdown(result, tmp_path / "r.md")
    md = (tmp_path / "r.md").read_text()
    assert "What ran beside the timed samples" in md and "| p [b n s d] | 1 | none (" in md
