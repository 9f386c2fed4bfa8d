"""scripts/bench_thin_calls.py on the CPU: the measurement of one backend (a fake FlashAttention-4
with the real internals' shape), the interleaving of the timed blocks, and the markdown table."""
import sys
from pathlib import Path

import torch

import diffsynth_attention as da

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import bench_thin_calls  # noqa: E402
from support.fake_thin import install_fa4  # noqa: E402


def test_blocks_are_interleaved_and_timed_per_call():
    order = []
    fns = {name: (lambda name=name: order.append(name)) for name in "abc"}
    syncs = []
    times = bench_thin_calls.time_variants(fns, calls=3, rounds=2, sync=lambda: syncs.append(1), warmup=1)
    assert order[:3] == ["a", "b", "c"]  # warm-up
    assert order[3:] == ["a"] * 3 + ["b"] * 3 + ["c"] * 3 + ["c"] * 3 + ["b"] * 3 + ["a"] * 3
    assert all(len(t["issue"]) == 2 and all(w >= i for w, i in zip(t["wall"], t["issue"])) for t in times.values())
    assert len(syncs) == 1 + 2 * 3 * 2  # after the warm-up, and around every block


def test_measure_reports_each_variant_and_the_numerics(monkeypatch, tmp_path):
    fa4, interface = install_fa4(monkeypatch)
    row = bench_thin_calls.measure("flash_attention_4", (1, 16, 2, 16), calls=4, rounds=2, torch=torch, da=da,
                                   device="cpu", warmup=1)
    assert "skipped" not in row, row
    assert set(row["us"]) == {"package", "thin", "adapter", "dispatcher", "sdpa"}
    assert row["thin_served"] and row["bit_equal"] and row["adapter_equal"] and row["thin_reason"] is None
    assert row["ratio_issue_to_sdpa"]["sdpa"] == 1.0 and "target_met" in row
    result = {"environment": {"device": "Fake GPU 80GB", "torch": torch.__version__, "cuda": None, "date": "today"},
              "calls": 4, "rounds": 2, "rows": [row, {"backend": "flash_attention_3", "shape": [1, 16, 2, 16],
                                                        "skipped": "unavailable: not installed"}]}
    out = tmp_path / "thin.md"
    bench_thin_calls.write_md(result, out)
    text = out.read_text()
    assert "Fake GPU 80GB" in text and "| flash_attention_4 | 4.0.0b36 | 1x16x2x16 | thin |" in text
    assert "skipped: unavailable: not installed" in text
