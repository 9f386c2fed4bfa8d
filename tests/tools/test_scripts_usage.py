"""The benchmark scripts' usage errors and help."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import benchmark  # noqa: E402
import tuning_report  # noqa: E402


@pytest.mark.parametrize("argv,named", [
    (["--only", "nosuch,seed_example"], "unknown problem name(s) nosuch"),
    (["--only", ","], "(none given)"),
    (["--preset", "nope"], "unknown preset 'nope'"),
])
def test_benchmark_names_an_unknown_problem_without_a_traceback(argv, named, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        benchmark.main([*argv, "--device", "cpu", "--out", str(tmp_path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())  # no work started, nothing written


def test_tuning_report_help_lists_only_public_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_:
        tuning_report.main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "repeat" in text and "neighbours" in text
    assert "_tune" not in text and "_first" not in text


def test_gpu_fault_check_degrades_gracefully_without_cuda(tmp_path):
    import subprocess

    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA machine runs the real check")
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_faults_gpu.py"), "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=120, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    (doc,) = tmp_path.glob("cpu-*-faults.json")
    import json

    result = json.loads(doc.read_text())
    assert result["device"] == "cpu" and "no CUDA device" in result["note"] and result["results"] == []
    assert doc.with_suffix(".md").exists()


def test_gpu_fault_check_expectations_flag_violations():
    import check_faults_gpu as check

    good = {"scenario": "device_assert", "raised": "AcceleratorError: CUDA error: device-side assert triggered",
            "dropped": {}, "disk_unchanged": True, "log": ["ERROR: backend torch raised a CUDA error that poisons ..."]}
    assert check.expectations(good) == []
    assert len(check.expectations({**good, "dropped": {"k": {"torch": "x"}}, "disk_unchanged": False})) == 2
    assert check.expectations({"scenario": "launch_error", "raised": None, "dropped": {"k": {"torch": "x"}}}) == []
