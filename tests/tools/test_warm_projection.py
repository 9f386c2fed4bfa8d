"""scripts/warm_projection.py: a one-GPU warm log's per-problem seconds projected over ranks."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import warm_projection  # noqa: E402
from support.harness import bench  # noqa: E402


def _log(seconds, wall=60.0) -> str:
    lines = [f"== 1 GPU: {wall} s, rc 0", "2026-11-30 12:38:52,589 pid 1 WARNING xformers: noise"]
    lines += [f"2026-11-30 12:39:0{i % 10},000 pid 1 INFO diffsynth_attention: tuned problem {i} ({s:.3f}s)"
              for i, s in enumerate(seconds)]
    lines += ["== 2 GPUs: 50.0 s, rc 0", "2026-11-30 12:40:00,000 pid 2 INFO diffsynth_attention: tuned other (9.000s)"]
    return "\n".join(lines) + "\n"


def test_projection_splits_the_measured_seconds_as_warm_assigns_ranks(tmp_path):
    problems = bench.shapes(["all"])
    seconds = [1.0 + i for i in range(len(problems))]
    log = tmp_path / "X-2026-11-30-parallel-warm.log"
    log.write_text(_log(seconds))
    assert warm_projection.main([str(log), "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "X-2026-11-30-warm-projection.json").read_text())
    startup = 60.0 - sum(seconds)
    assert result["tuning_s"] == seconds and result["startup_s"] == pytest.approx(startup)
    rows = {r["gpus"]: r for r in result["rows"]}
    assert rows[1]["projected_wall_s"] == pytest.approx(60.0) and rows[1]["projected_speedup"] == pytest.approx(1.0)
    for world, row in rows.items():
        assert sorted(n for rank in row["rank_problems"] for n in rank) == sorted(p["name"] for p in problems)
        assert row["projected_wall_s"] == pytest.approx(startup + max(row["rank_loads_s"]))
        assert sum(row["rank_loads_s"]) == pytest.approx(sum(seconds))
    assert rows[2]["projected_wall_s"] < rows[1]["projected_wall_s"] and result["measured"] == {"1": 60.0, "2": 50.0}
    assert "| 2 |" in (tmp_path / "X-2026-11-30-warm-projection.md").read_text()


def test_a_log_without_one_line_per_problem_is_refused(tmp_path, capsys):
    log = tmp_path / "short-parallel-warm.log"
    log.write_text(_log([1.0, 2.0]))
    with pytest.raises(SystemExit) as exit_:
        warm_projection.main([str(log), "--out", str(tmp_path)])
    assert exit_.value.code == 2 and "one 'tuned' line per problem" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.json"))
