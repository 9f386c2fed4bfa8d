"""Issue 6: every subcommand as a subprocess, on CPU, with a temporary cache."""
import json
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent


def cli(env, *args, stdin=None):
    return subprocess.run([sys.executable, "-m", "diffsynth_attention", *args], env=env, capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL if stdin is None else stdin)


def test_backends_lists_all(subprocess_env):
    r = cli(subprocess_env, "backends", "--json")
    assert r.returncode == 0, r.stderr
    rows = {x["backend"]: x for x in json.loads(r.stdout)}
    assert rows["torch"]["status"] == "usable" and len(rows) == 10
    assert "flash-attn-4" in rows["flash_attention_4"]["status"] or rows["flash_attention_4"]["status"] == "usable"


def test_warm_show_export_import_clear(subprocess_env, isolated, tmp_path):
    r = cli(subprocess_env, "warm", "--preset", "seed_example,sdxl_1024_cross", "--no-progress", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [x["problem"].split(":")[0] for x in rows] == ["seed_example@cpu", "sdxl_1024_cross@cpu"]
    r = cli(subprocess_env, "cache", "path")
    assert str(isolated) in r.stdout
    r = cli(subprocess_env, "cache", "show", "--json")
    shown = json.loads(r.stdout)
    assert len(shown) == 2 and all(x["backend"] for x in shown) and all("speedup_vs_torch" in x for x in shown)
    assert "decisions" in cli(subprocess_env, "cache", "show").stdout
    out = tmp_path / "export.json"
    assert cli(subprocess_env, "cache", "export", str(out)).returncode == 0
    r = cli(subprocess_env, "cache", "clear")  # no terminal, no --yes: refuses
    assert r.returncode == 1 and "--yes" in r.stderr and "Traceback" not in r.stderr
    r = cli(subprocess_env, "cache", "clear", "--yes")
    assert r.returncode == 0 and "cleared 2" in r.stdout
    assert json.loads(cli(subprocess_env, "cache", "show", "--json").stdout) == []
    r = cli(subprocess_env, "cache", "import", str(out))
    assert r.returncode == 0 and "imported 2 of 2" in r.stdout
    assert len(json.loads(cli(subprocess_env, "cache", "show", "--json").stdout)) == 2
    r = cli(subprocess_env, "cache", "clear", "--backend", "flash_attention_4", "--yes")
    assert r.returncode == 0 and "cleared 0" in r.stdout


def test_import_refuses_invalid_files(subprocess_env, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema_version": 1, "entries": {"0" * 24: {"backend": "nope"}}}))
    r = cli(subprocess_env, "cache", "import", str(bad))
    assert r.returncode == 1 and r.stderr.startswith("error: refused") and "Traceback" not in r.stderr
    r = cli(subprocess_env, "cache", "import", str(tmp_path / "missing.json"))
    assert r.returncode == 1 and "cannot read" in r.stderr


def test_warm_from_shapes_file_and_bad_inputs(subprocess_env, tmp_path):
    shapes = tmp_path / "s.json"
    shapes.write_text(json.dumps({"shapes": [{"name": "mine", "batch": 1, "heads_q": 2, "heads_kv": 1, "seq_q": 24, "seq_kv": 24,
                                              "head_dim": 16, "causal": True, "dtype": "float32"}]}))
    r = cli(subprocess_env, "warm", "--shapes", str(shapes), "--no-progress", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)[0]["problem"].startswith("mine")
    shapes.write_text(json.dumps({"shapes": [{"name": "x", "batch": 0}]}))
    r = cli(subprocess_env, "warm", "--shapes", str(shapes))
    assert r.returncode == 1 and "missing" in r.stderr and "Traceback" not in r.stderr
    r = cli(subprocess_env, "warm", "--preset", "nope")
    assert r.returncode == 1 and "unknown preset 'nope'" in r.stderr
    r = cli(subprocess_env, "warm", "--device", "cuda:7")
    assert r.returncode == 1 and "cuda" in r.stderr
    r = cli(subprocess_env, "warm", "--dtype", "int8", "--preset", "seed_example")
    assert r.returncode == 1 and "--dtype" in r.stderr


def test_explain_and_usage_errors(subprocess_env):
    r = cli(subprocess_env, "explain", "--heads", "2", "--seq-q", "32", "--seq-kv", "16", "--head-dim", "16", "--dtype", "float32", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["source"] == "tuned" and info["candidates"]["torch"]["error"] < 1e-5
    assert cli(subprocess_env, "explain", "--heads", "0", "--seq-q", "8", "--head-dim", "8").returncode == 2
    assert cli(subprocess_env, "frobnicate").returncode == 2
    r = cli(subprocess_env, "cache", "clear", "--backend", "bogus", "--yes")
    assert r.returncode == 1 and "not a backend" in r.stderr


def test_scripts_are_thin_entry_points(subprocess_env):
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "warm_cache.py"), "--preset", "seed_example", "--no-progress", "--json"],
                       env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "clear_cache.py"), "--yes"], env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "cleared 1" in r.stdout
