"""Issue 23, small things: the benchmark scripts' usage errors and help."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
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
