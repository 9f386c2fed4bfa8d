"""scripts/bench_first_result.py on CPU: the baseline row runs in fresh processes and
writes its JSON and markdown; the package rows say why they were skipped (the GPU runs use the
same code)."""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import bench_first_result  # noqa: E402


def test_the_baseline_row_measures_fresh_processes_and_the_package_rows_are_skipped(tmp_path, monkeypatch, subprocess_env):
    monkeypatch.setenv("PYTHONPATH", subprocess_env["PYTHONPATH"])
    out = tmp_path / "results"
    assert bench_first_result.main(["--out", str(out), "--runs", "1", "--device", "cpu",
                                    "--only", "baseline,flash_attention_3", "--no-warm", "--window-seconds", "0.5"]) == 0
    files = sorted(out.glob("*-first-result.json"))
    assert len(files) == 1 and files[0].with_suffix(".md").exists()
    rows = {r["row"]: r for r in json.loads(files[0].read_text())["rows"]}
    assert set(rows) == {"baseline", "flash_attention_3"} and "no GPU" in rows["flash_attention_3"]["skipped"]
    base = rows["baseline"]
    assert base["seed"]["decided"] == base["seed"]["tuned"]
    for variant in ("sdpa", "dispatcher", "dispatcher_no_preload"):
        (sample,) = base["samples"][variant]
        assert "error" not in sample, sample
        assert 0 < sample["torch_imported_s"] <= sample["first_s"]
    assert base["dispatcher_takeover_call"]["median"] == 1 and base["dispatcher_served_first_by"] == [
        f"{base['seed']['decided']} (cache)"]
    for variant in ("sdpa", "dispatcher", "dispatcher_no_preload"):  # the first seconds of calls, each timed
        window = base["samples"][variant][0]["window"]
        assert window["calls"] >= 1 and window["median_ms"] > 0 and len(window["stall_calls"]) == min(window["stalls"], 20)
        assert base["window"][variant]["stalls_max"] == window["stalls"]
    assert "| baseline |" in files[0].with_suffix(".md").read_text()
    assert "worst call / median" in files[0].with_suffix(".md").read_text()


def test_the_import_breakdown_reads_the_modules_between_the_markers():
    err = "\n".join([
        "import time: self [us] | cumulative | imported package",
        "import time:       100 |    9000000 | torch",
        "@@import-start",
        "import time:       200 |     300000 |   cutlass.base",
        "import time:       500 |    2500000 | flash_attn.cute",
        "@@import-end",
        "import time:       100 |    8000000 | later",
    ])
    rows = bench_first_result.import_breakdown(err)
    assert [r["module"] for r in rows] == ["flash_attn.cute", "cutlass.base"] and rows[0]["cumulative_s"] == 2.5
