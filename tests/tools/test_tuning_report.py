"""scripts/tuning_report.py on CPU with tiny problems: every sub-command runs and writes its
JSON and markdown (the GPU runs use the same code)."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
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


def test_repeat_tunes_in_fresh_processes_and_times_every_backend_directly(out):
    assert len(tuning_report.REPEAT_EXTRA) >= 6
    only = "seed_example,issue21_cpu,hd96_4096,gqa_causal_qwen7b"
    tuning_report.main(["repeat", "--device", "cpu", "--max-seq", "24", "--max-heads", "2", "--only", only, "--n", "2",
                        "--samples", "3", "--out", str(out)])
    r = result(out, "repeat")
    assert [p["name"] for p in r["problems"]] == ["seed_example@cpu", "issue21_cpu", "hd96_4096@cpu", "gqa_causal_qwen7b@cpu"]
    for p in r["problems"]:
        assert len(p["decisions"]) == 2 and 1 <= p["agree"] <= 2 and p["worst_vs_best"] >= 1.0
        assert set(p["times_ms"]) == {"torch", "torch_flash", "torch_math"}  # every CPU backend, not only the decided
        assert "cuda" in p["not_timed"]["torch_cudnn"].lower()
        assert len(p["own_vs_best"]) == 2 and all(x >= 1.0 for x in p["own_vs_best"])  # timed in each tuning process
    assert r["problems"][1]["problem"]["dtype"] == "float32"
    md = next(out.glob("*-tuning-repeat.md")).read_text()
    assert "| issue21_cpu + |" in md and "Every backend timed directly" in md and "worst in its own process" in md


def test_repeat_given_its_runs_file_again_tunes_only_the_processes_still_missing(out, monkeypatch):
    calls = []
    real = tuning_report.run_child
    monkeypatch.setattr(tuning_report, "run_child", lambda *a, **kw: calls.append(a) or real(*a, **kw))
    args = ["repeat", "--device", "cpu", "--max-seq", "16", "--max-heads", "1", "--only", "seed_example", "--samples", "2",
            "--own-samples", "0", "--out", str(out), "--runs", str(out / "runs.json")]
    tuning_report.main([*args, "--n", "1"])  # a run cut short after its first process
    tuning_report.main([*args, "--n", "2"])
    assert len(calls) == 2  # one process, then the one still missing: the first was read back
    assert len(json.loads((out / "runs.json").read_text())["runs"]) == 2
    assert len(result(out, "repeat")["problems"][0]["decisions"]) == 2
    tuning_report.main([*args, "--n", "2", "--max-heads", "2"])  # other problems: the kept runs are not theirs
    assert len(calls) == 4
    (out / "runs.json").write_text(json.dumps([{"problems": [{"name": "seed_example@cpu"}]}]))  # the first format: a list
    tuning_report.main([*args, "--n", "1"])
    assert len(calls) == 5


def test_the_extra_problems_cover_what_the_suite_lacks():
    from diffsynth_attention.tools.shapes import builtin_shapes

    suite, extra = builtin_shapes(), tuning_report.REPEAT_EXTRA
    assert not {s["name"] for s in extra} & {s["name"] for s in suite}
    assert {80, 96} <= {s["head_dim"] for s in extra} - {s["head_dim"] for s in suite}
    assert any(s["seq_q"] % 2 for s in extra) and any(s["dtype"] == "float16" and s["head_dim"] == 128 for s in extra)
    assert any(s["causal"] and s["heads_kv"] < s["heads_q"] for s in extra)
    assert any(s["batch"] >= 64 and s["seq_q"] <= 512 for s in extra)


def test_the_new_problems_are_new_and_cover_what_the_issue_asks():
    """Issue 29: at least 8 new problems: self and cross, fp16 and bf16, head dims 64/80/96/128, long video."""
    from diffsynth_attention.tools.shapes import builtin_shapes

    new = tuning_report.REPEAT_NEW
    known = {s["name"] for s in builtin_shapes() + tuning_report.REPEAT_EXTRA}
    assert len(new) >= 8 and not {s["name"] for s in new} & known
    assert any(s["seq_q"] == s["seq_kv"] for s in new) and any(s["seq_kv"] < s["seq_q"] for s in new)
    assert {"float16", "bfloat16"} <= {s["dtype"] for s in new}
    assert {64, 80, 96, 128} <= {s["head_dim"] for s in new}
    assert any(s["seq_q"] >= 27000 for s in new)
    from types import SimpleNamespace

    args = SimpleNamespace(cmd="repeat", device="cpu", preset=None, shapes=None, only=None, max_seq=None, max_heads=None,
                           no_extra=True, new=True, extra=False)
    got = {s["name"].split("@")[0]: s for s in tuning_report.problems(args)}
    assert {s["name"] for s in new} <= set(got)
    assert got["wan22_5b_720p_self"]["seq_q"] < 27280  # cut to CPU size on a CPU
    without = tuning_report.problems(SimpleNamespace(**{**vars(args), "new": False}))
    assert not {s["name"] for s in new} & {s["name"].split("@")[0] for s in without}


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
