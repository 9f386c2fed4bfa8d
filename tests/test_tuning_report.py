"""scripts/tuning_report.py on CPU with tiny problems: every sub-command runs and writes its
JSON and markdown (the GPU runs use the same code)."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import tuning_report  # noqa: E402

TINY = ["--device", "cpu", "--max-seq", "24", "--max-heads", "1", "--only", "seed_example,sdxl_1024_cross"]


@pytest.fixture
def out(tmp_path, monkeypatch, subprocess_env):
    monkeypatch.setenv("DIFFSYNTH_ATTENTION_TUNING_BUDGET", "0.05")
    monkeypatch.setenv("PYTHONPATH", subprocess_env["PYTHONPATH"])
    return tmp_path / "results"


def result(out, kind):
    files = sorted(out.glob(f"*-tuning-{kind}.json"))
    assert len(files) == 1 and files[0].with_suffix(".md").exists()
    return json.loads(files[0].read_text())


def test_cost_reports_budget_predictions_and_skip_checks(out):
    tuning_report.main(["cost", *TINY, "--out", str(out)])
    r = result(out, "cost")
    assert [p["name"] for p in r["problems"]] == ["seed_example@cpu", "sdxl_1024_cross@cpu"]
    for p in r["problems"]:
        assert p["limit_s"] >= 0.05 and "no_skip" in p and "skip_checks" in p
        assert p["decision"]["backend"] in p["decision"]["candidates"]
    assert r["wrong_skips"] == []


def test_repeat_tunes_in_fresh_processes_and_times_the_decisions(out):
    tuning_report.main(["repeat", *TINY, "--n", "2", "--samples", "3", "--out", str(out)])
    r = result(out, "repeat")
    for p in r["problems"]:
        assert len(p["decisions"]) == 2 and 1 <= p["agree"] <= 2 and p["worst_vs_best"] >= 1.0
        assert set(p["decisions"]) <= set(p["times_ms"])


def test_first_call_and_neighbours(out):
    tuning_report.main(["first-call", *TINY, "--out", str(out)])
    r = result(out, "first-call")
    assert len(r["problems"]) == 2 and r["first_result"]["source"] == "cache"
    assert r["first_result"]["kernel_modules_imported"] == [] and r["warm_again"]["returncode"] == 0
    assert all(p["source_warm"] == "cache" for p in r["problems"])
    tuning_report.main(["neighbours", *TINY, "--offsets=-0.05,0.4", "--out", str(out)])
    r = result(out, "neighbours")
    assert len(r["rows"]) == 4 and set(r["summary"]) == {"-5%", "+40%"}
    assert not any(row["in_bucket"] for row in r["rows"] if row["offset"] == 0.4)
