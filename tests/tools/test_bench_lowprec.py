"""scripts/bench_lowprec.py on CPU: its usage errors, and its fuzz part over the emulations."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import bench_lowprec  # noqa: E402


def test_unknown_problem_or_part_is_a_usage_error(tmp_path, capsys):
    for argv, named in ((["--only", "nosuch"], "unknown problem name(s) nosuch"), (["--parts", "x"], "unknown part(s)")):
        with pytest.raises(SystemExit) as exit_:
            bench_lowprec.main([*argv, "--out", str(tmp_path)])
        assert exit_.value.code == 2 and named in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_fuzz_part_on_cpu_with_the_emulations(tmp_path):
    assert bench_lowprec.main(["--device", "cpu", "--emulate", "--fuzz-seq", "64", "--out", str(tmp_path), "--tag", "t"]) == 0
    result = json.loads((tmp_path / "t.json").read_text())
    share = result["fuzz"]["share"]
    assert set(share) == {"balanced", "fast"} and "speed" not in result  # no CUDA: the GPU parts are skipped
    exact, fp8 = share["fast"]["exact bf16 (emulated)"], share["balanced"]["fa3_fp8 (emulated)"]
    assert exact["admitted"] == exact["cases"] == 18 and fp8["admitted"] == 0
    assert 0 < share["fast"]["fa3_fp8 (emulated)"]["admitted"] < 18  # benign cases in, hazardous ones out
    assert "| fast" in (tmp_path / "t.md").read_text()
