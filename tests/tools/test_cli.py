"""The ``diffsynth-attention`` command line: every subcommand as a subprocess, on CPU, with a temporary cache."""
import json
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]


def cli(env, *args, stdin=None):
    return subprocess.run([sys.executable, "-m", "diffsynth_attention", *args], env=env, capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL if stdin is None else stdin)


def test_backends_lists_all(subprocess_env):
    r = cli(subprocess_env, "backends", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    rows = {x["backend"]: x for x in doc["backends"]}
    from diffsynth_attention.backend_names import BACKEND_NAMES

    assert rows["torch"]["status"] == "usable" and len(rows) == len(BACKEND_NAMES) == 12
    settings = {x["variable"]: x for x in doc["configuration"]}
    assert settings["DIFFSYNTH_ATTENTION_TUNING_BUDGET"] == {"variable": "DIFFSYNTH_ATTENTION_TUNING_BUDGET", "value": 0.05, "source": "set"}
    assert settings["DIFFSYNTH_ATTENTION_IMPLEMENTATION"]["value"] == "auto"
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
    assert r.returncode == 2 and "--yes" in r.stderr and "Traceback" not in r.stderr
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
    assert r.returncode == 2 and "missing" in r.stderr and "Traceback" not in r.stderr
    r = cli(subprocess_env, "warm", "--preset", "nope")
    assert r.returncode == 2 and "unknown preset 'nope'" in r.stderr
    r = cli(subprocess_env, "warm", "--device", "cuda:7")
    assert r.returncode == 1 and "cuda" in r.stderr
    r = cli(subprocess_env, "warm", "--dtype", "int8", "--preset", "seed_example")
    assert r.returncode == 2 and "--dtype" in r.stderr


def test_explain_and_usage_errors(subprocess_env):
    r = cli(subprocess_env, "explain", "--heads", "2", "--seq-q", "32", "--seq-kv", "16", "--head-dim", "16", "--dtype", "float32", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["source"] == "tuned" and info["candidates"]["torch"]["error"] < 1e-5
    assert cli(subprocess_env, "explain", "--heads", "0", "--seq-q", "8", "--head-dim", "8").returncode == 2
    assert cli(subprocess_env, "frobnicate").returncode == 2
    r = cli(subprocess_env, "cache", "clear", "--backend", "bogus", "--yes")
    assert r.returncode == 2 and "not a backend" in r.stderr


def test_scripts_are_thin_entry_points(subprocess_env):
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "warm_cache.py"), "--preset", "seed_example", "--no-progress", "--json"],
                       env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "clear_cache.py"), "--yes"], env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "cleared 1" in r.stdout


# -- usage errors ---------------------------------------------------------------------------------
USAGE_ERRORS = [
    (("warm", "--dtype", "float99"), "--dtype 'float99'"),
    (("warm", "--device", "banana"), "--device 'banana'"),
    (("warm", "--layout", "q w e"), "--layout 'q w e' is not a layout"),
    (("explain", "--heads", "2", "--seq-q", "8", "--head-dim", "8", "--window", "-1"), "'-1' must be a whole number >= 0"),
    (("explain", "--heads", "2", "--seq-q", "8", "--head-dim", "8", "--layout", "x y z"), "--layout 'x y z'"),
    (("explain", "--heads", "3", "--heads-kv", "2", "--seq-q", "8", "--head-dim", "8"), "multiple of --heads-kv"),
    (("cache", "clear", "--backend", "nosuch", "--yes"), "'nosuch' is not a backend"),
]


def test_usage_errors_exit_2_with_one_line_before_any_work(subprocess_env, isolated):
    """Each is refused in the user's terms, on one line, before the progress bar or any tuning
    (so the cache folder is never even created)."""
    from diffsynth_attention.tools.cli import main

    for args, text in USAGE_ERRORS:
        r = cli(subprocess_env, *args) if args[0] == "warm" and args[1] == "--layout" else None
        if r is not None:
            assert r.returncode == 2 and r.stderr.count("\n") == 1 and text in r.stderr and "tuning" not in r.stderr, r.stderr
    import contextlib
    import io

    for args, text in USAGE_ERRORS:
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(list(args))
        assert code == 2 and text in err.getvalue() and err.getvalue().count("\n") == 1, (args, err.getvalue())
        assert "problem 0" not in err.getvalue()
    assert not isolated.exists()


def test_bad_environment_variables_exit_2_before_work(subprocess_env):
    for name, value, text in [("DIFFSYNTH_ATTENTION_TUNING", "maybe", "not a boolean"),
                              ("DIFFSYNTH_ATTENTION_TUNING_BUDGET", "1e308", "out of range"),
                              ("DIFFSYNTH_ATTENTION_TUNE_WAIT", "abc", "not a number")]:
        r = cli({**subprocess_env, name: value}, "cache", "path")
        assert r.returncode == 2 and f"{name}={value!r}" in r.stderr and text in r.stderr, r.stderr


def test_fast_commands_do_not_import_torch(subprocess_env, isolated):
    """--help, cache path/show/clear answer without importing torch (the 0.5 s budget)."""
    code = ("import sys, runpy; sys.argv = ['diffsynth-attention'] + sys.argv[1:]\n"
            "try:\n    runpy.run_module('diffsynth_attention', run_name='__main__')\n"
            "except SystemExit as e:\n    assert e.code in (0, None), e.code\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    for args in (["--help"], ["cache", "path"], ["cache", "show"], ["cache", "clear", "--yes"]):
        r = subprocess.run([sys.executable, "-c", code, *args], env=subprocess_env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, (args, r.stderr)


def test_warm_refuses_when_nothing_would_be_stored(subprocess_env, tmp_path):
    r = cli({**subprocess_env, "DIFFSYNTH_ATTENTION_TUNING": "off"}, "warm", "--preset", "seed_example", "--no-progress")
    assert r.returncode == 1 and "tuning off" in r.stderr and "asked" not in r.stdout
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    r = cli({**subprocess_env, "DIFFSYNTH_ATTENTION_CACHE_DIR": str(blocker)}, "warm", "--preset", "seed_example", "--no-progress")
    assert r.returncode == 1 and "cannot be written" in r.stderr and "asked" not in r.stdout


def test_warm_tunes_despite_the_override_and_counts_what_it_stored(subprocess_env):
    env = {**subprocess_env, "DIFFSYNTH_ATTENTION_IMPLEMENTATION": "torch_math"}
    r = cli(env, "warm", "--preset", "seed_example", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "warm tunes regardless" in r.stderr and "1 decision stored" in r.stdout
    assert len(json.loads(cli(env, "cache", "show", "--json").stdout)) == 1


def test_cpu_presets_keep_cross_attention_and_have_no_repeats():
    from diffsynth_attention.tools.shapes import distinct, identity, scale_for_cpu, select_presets

    full = select_presets(["all"])
    cpu = distinct([scale_for_cpu(s) for s in full])
    assert len({identity(s) for s in cpu}) == len(cpu) < len(full)
    for s in full:
        small = scale_for_cpu(s)
        assert (small["seq_q"] == small["seq_kv"]) == (s["seq_q"] == s["seq_kv"]), s["name"]
        assert max(small["seq_q"], small["seq_kv"]) <= 512 and small["heads_q"] <= 8
    merged = [s for s in cpu if s.get("also")]
    assert merged and all(name.endswith("@cpu") for s in merged for name in s["also"])


def test_cache_show_fits_80_columns_and_shows_ties():
    from rich.console import Console

    from diffsynth_attention.store.decision import Candidate, Decision
    from diffsynth_attention.tools.cli_cache import decision_row, decisions_table

    problem = {"batch": 1, "heads_q": 8, "heads_kv": 8, "seq_q": 512, "seq_kv": 77, "head_dim": 64, "head_dim_v": 64,
               "dtype": "float16", "layout": "b s n d, b s n d, b s n d -> b s n d", "mask": "none", "mask_shape": None,
               "causal": False, "window": None, "requires_grad": False}
    d = Decision("k" * 24, {"problem": problem, "device": {"type": "cpu", "name": "Intel(R) Xeon(R) Platinum 8480+ CPU @ 2.00GHz (16 threads)"}},
                 "torch", {"torch": Candidate("chosen", 1.01), "torch_flash": Candidate("accepted", 1.0),
                           "torch_math": Candidate("slower", 3.0)})
    row = decision_row(d.key_id, d)
    assert row["reason"].startswith("tie: within 2% of torch_flash")
    assert row["problem"] == "b=1 n=8 s=512x77 d=64 float16 [b s n d, b s n d, b s n d -> b s n d]"
    console = Console(width=80, record=True, file=open("/dev/null", "w"))
    console.print(decisions_table([row, row], "2 decisions in /somewhere/decisions.json"))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "Xeon Platinum 8480+" in text.splitlines()[0] and "torch (tie)" in text


def test_cache_show_tells_a_quality_tiers_decision_from_the_exact_one():
    """A problem served in the exact tier and under set_quality(block, "balanced") has two decisions
    (the tier is in the key): cache show printed two identical rows."""
    from diffsynth_attention.store.decision import Candidate, Decision
    from diffsynth_attention.tools.cli_cache import decision_row

    problem = {"batch": 1, "heads_q": 2, "heads_kv": 2, "seq_q": 32, "seq_kv": 32, "head_dim": 12, "dtype": "float32"}
    device = {"type": "cpu", "name": "EPYC (2 threads)"}
    rows = [decision_row(kid, Decision(kid, key, "torch", {"torch": Candidate("chosen", 1.0)}))
            for kid, key in (("a" * 24, {"problem": problem, "device": device}),
                             ("b" * 24, {"problem": problem, "device": device, "quality": "balanced"}))]
    assert rows[0]["problem"] == "b=1 n=2 s=32 d=12 float32"
    assert rows[1]["problem"] == "b=1 n=2 s=32 d=12 float32 quality=balanced"


def test_warm_on_cpu_tunes_each_problem_once_and_keeps_cross_attention(subprocess_env):
    r = cli(subprocess_env, "warm", "--preset", "flux_1024,flux_2048,wan13b_480p_cross", "--no-progress", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [x["problem"].split(":")[0] for x in rows] == ["flux_1024@cpu = flux_2048@cpu", "wan13b_480p_cross@cpu"]
    assert "s=512x128" in rows[1]["problem"] and len({x["key_id"] for x in rows}) == 2
    assert "3 problems asked, 2 distinct: 2 tuned now, 0 already cached; 2 decisions stored" in r.stderr


def test_one_description_of_a_problem():
    """explain, Problem.describe and the CLI's tables describe a key's problem the same way."""
    import torch

    import diffsynth_attention as da
    from diffsynth_attention.describe import describe_problem
    from diffsynth_attention.tools.cli_cache import decision_row

    q = torch.randn(1, 4, 16, 8)
    k = v = torch.randn(1, 2, 8, 8)
    info = da.explain(q, k, v, is_causal=True)
    assert info.problem == describe_problem(info.key["problem"]) == "b=1 n=4/2 s=16x8 d=8 float32 causal"
    assert decision_row(info.key_id, info.decision)["problem"] == info.problem


def test_explain_stays_readable_at_80_columns(monkeypatch, capsys):
    from diffsynth_attention.tools.cli import main

    monkeypatch.setenv("COLUMNS", "80")
    assert main(["explain", "--heads", "2", "--seq-q", "16", "--seq-kv", "8", "--head-dim", "8", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("b=1 n=2 s=16x8 d=8 float32 on ") and max(len(line) for line in lines) <= 80
    table = lines[:lines.index("unsupported here:")]
    assert any("chosen" in line for line in table) and not any("unsupported" in line for line in table)
    assert any(line.startswith("  torch_cudnn: needs a CUDA GPU") for line in lines)


def test_warm_under_torchrun_splits_and_syncs(subprocess_env, isolated):
    import socket

    with socket.socket() as sock:  # a free port: a fixed one collides with other runs on a shared machine
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
                        "-m", "diffsynth_attention", "warm", "--preset", "seed_example,sdxl_1024_cross,flux_1024,flux_2048",
                        "--no-progress", "--json"], env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(r.stdout)
    assert len(rows) == 3 and "3 decisions stored" in " ".join(r.stderr.split()) and "2 ranks" in r.stderr
    assert len(json.loads(cli(subprocess_env, "cache", "show", "--json").stdout)) == 3


def test_cache_clear_leaves_the_fa4_compile_cache_unless_asked(subprocess_env, isolated):
    compiled = isolated / "fa4-compile"
    compiled.mkdir(parents=True)
    (compiled / "kernel.o").write_bytes(b"x")
    r = cli(subprocess_env, "cache", "clear", "--yes")
    assert r.returncode == 0, r.stderr
    assert (compiled / "kernel.o").exists()
    r = cli(subprocess_env, "cache", "clear", "--yes", "--compiled")
    assert r.returncode == 0, r.stderr
    assert not compiled.exists() and "1 compiled kernel file(s)" in r.stdout


def test_cache_clear_says_when_a_key_is_there_but_its_other_filters_leave_it(isolated, capsys):
    """``--key K --backend B`` where K's decision chose another backend said "no decision has a key
    id starting with it", though `cache show` lists one: the other filters left it out."""
    from diffsynth_attention.store.cache import DecisionCache
    from diffsynth_attention.tools.cli import main

    from support.store_helpers import make_decision

    store = DecisionCache(isolated)
    kept = make_decision(0)
    store.put_many([kept])
    assert store.flush()
    other = next(b for b in ("torch_math", "torch_flash") if b != kept.backend)
    assert main(["cache", "clear", "--key", kept.key_id[:8], "--backend", other, "--yes"]) == 1
    err = capsys.readouterr().err
    assert f"--key {kept.key_id[:8]}" in err and f"--backend {other}" in err and "no decision has a key id" not in err
    assert err.count("\n") == 1 and len(DecisionCache(isolated).entries()) == 1


def test_cache_clear_refuses_a_blank_gpu_and_a_key_that_names_no_decision(isolated, capsys):
    """``--gpu ""`` (an unset shell variable) is in every device name: it would clear every decision.
    A ``--key`` that names no decision is a mistake, as ``cache verify`` says, not "cleared 0"."""
    from diffsynth_attention.store.cache import DecisionCache
    from diffsynth_attention.tools.cli import main

    from support.store_helpers import make_decision

    store = DecisionCache(isolated)
    kept = [make_decision(i) for i in range(3)]
    store.put_many(kept)
    assert store.flush()
    for gpu in ("", "  "):
        assert main(["cache", "clear", "--gpu", gpu, "--yes"]) == 2
        assert "--gpu" in capsys.readouterr().err
    absent = next(p for p in ("ffff", "0000", "1234") if not any(d.key_id.startswith(p) for d in kept))
    assert main(["cache", "clear", "--key", absent, "--yes"]) == 1
    err = capsys.readouterr().err
    assert "--key" in err and absent in err and err.count("\n") == 1
    assert {d.key_id for d in DecisionCache(isolated).entries().values()} == {d.key_id for d in kept}
    assert main(["cache", "clear", "--key", kept[0].key_id, "--yes"]) == 0 and "cleared 1" in capsys.readouterr().out
