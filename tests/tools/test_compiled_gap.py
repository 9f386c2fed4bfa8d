"""scripts/compiled_gap.py: compiled attention_forward against compiled SDPA, where the time goes
(times, kernels, Dynamo's graphs, breaks and guards, the baked decision, what ran beside), on the CPU."""
import json
import sys
from pathlib import Path

import pytest
import torch

from support.harness import bench  # noqa: F401  (scripts/ on sys.path)

ROOT = Path(__file__).resolve().parents[2]


def test_compiled_gap_names_an_unknown_problem(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    import compiled_gap

    with pytest.raises(SystemExit, match="unknown problem name.*nosuch"):
        compiled_gap.main(["--device", "cpu", "--only", "nosuch", "--out", str(tmp_path)])
    assert not list(tmp_path.iterdir())


def test_compiled_gap_on_the_cpu_writes_what_each_graph_holds_and_costs(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFSYNTH_ATTENTION_CACHE_DIR", str(tmp_path / "cache"))
    sys.path.insert(0, str(ROOT / "scripts"))
    import compiled_gap

    threads = torch.get_num_threads()
    try:
        shapes = tmp_path / "tiny.json"  # a host-bound problem of its own (--shapes): quick on any CPU
        shapes.write_text(json.dumps([{"name": "tiny", "batch": 1, "heads_q": 2, "heads_kv": 2, "seq_q": 16, "seq_kv": 16,
                                       "head_dim": 64, "causal": False, "dtype": "float32"}]))
        assert compiled_gap.main(["--device", "cpu", "--shapes", str(shapes), "--only", "tiny", "--samples", "1", "--threads", "1",
                                  "--neighbours", "eager", "--out", str(tmp_path), "--tag", "gap"]) == 0
    finally:
        torch.set_num_threads(threads)
    result = json.loads((tmp_path / "gap.json").read_text())
    (row,) = result["rows"]
    assert row["name"] == "tiny" and row["decision"] == "torch"
    auto, sdpa = row["graph"]["auto"], row["graph"]["sdpa"]
    assert auto["baked"].startswith("torch|") and auto["custom_ops"] == ["diffsynth_attention.attention.default"]
    assert auto["graph_breaks"] == sdpa["graph_breaks"] == 0 and row["same_lowered_ops"] is True
    assert row["guards"]["auto"]["leaf_guards"] > 0 and row["guards"]["sdpa"]["cache_entries"] == 1
    assert row["while_timed"].get("frames", {}).get("total", 0) == 0  # nothing recompiled while timed
    assert row["while_timed"]["cache_entries_after"] == {"auto": 1, "sdpa": 1}
    for name in ("auto", "sdpa"):
        t = row["times"][name]
        assert t["wall_ms"] > 0 and t["ms"] > 0 and t["host_ms"] == t["ms"] and t["device_ms"] is None
        assert row["profile"][name]["host_ops"] and "kernels" not in row["profile"][name]
    assert set(row["with_neighbours"]["times"]) == {"auto", "sdpa", "auto_eager", "sdpa_eager"}
    assert row["hygiene"]["samples"] == 2 * (1 + 1) and row["hygiene"]["load_running"] is False
    md = (tmp_path / "gap.md").read_text()
    assert "where the time goes" in md and "baked decision `torch|" in md and "What ran beside the timed samples" in md
