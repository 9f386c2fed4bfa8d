"""scripts/guard_cost.py on the CPU: a record per run, appended, and the report over all of them."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import guard_cost  # noqa: E402


def test_guard_cost_appends_a_record_a_run_and_reports_every_label(tmp_path):
    out, md = tmp_path / "g.jsonl", tmp_path / "g.md"
    for label in ("a", "b"):
        assert guard_cost.main(["--label", label, "--out", str(out), "--rounds", "2", "--calls", "50", "--report", str(md)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["label"] for r in records] == ["a", "b"]
    for r in records:
        if r["auto"]["nodes"] == 0:
            pytest.skip("this torch exposes no guard tree")
        assert r["auto"]["nodes"] > r["sdpa"]["nodes"] > 0  # attention_forward's trace reads more than SDPA's
        assert r["auto"]["min_us"] > 0 and r["extra_min_us"] == pytest.approx(r["auto"]["min_us"] - r["sdpa"]["min_us"])
    text = md.read_text()
    assert "| a |" in text and "| b |" in text and "a " in text.splitlines()[-1] and "(1 processes)" in text
