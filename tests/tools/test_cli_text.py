"""The command line's text at 80 columns: ``print(explain(...))`` prints the table
``diffsynth-attention explain`` prints, install hints stay whole, and ``warm``'s last line counts
what was asked, tuned and cached."""
import pytest
import torch

import diffsynth_attention as da
from diffsynth_attention.backends import REGISTRY


def test_printing_an_explanation_prints_the_cli_table(monkeypatch, capsys):
    """print(da.explain(...)) prints the table `diffsynth-attention explain` prints, 80 columns
    wide, and the object keeps its fields."""
    from diffsynth_attention.tools import cli

    monkeypatch.setenv("COLUMNS", "80")
    assert cli.main(["explain", "--heads", "2", "--seq-q", "8", "--head-dim", "16", "--dtype", "float32",
                     "--device", "cpu"]) == 0
    printed = capsys.readouterr().out.rstrip("\n").splitlines()
    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    info = da.explain(q, k, v)  # the same problem: the CLI's decision, from the cache
    print(info)
    text = capsys.readouterr().out.rstrip("\n").splitlines()
    assert text[0].endswith(f": {info.backend} (cache)") and printed[0].endswith(f": {info.backend} (tuned)")
    assert text[1:] == printed[1:]  # the same table
    assert max(len(line) for line in text) <= 80 and len(text) >= 4
    for name in info.candidates:
        assert any(line.lstrip("│┃ ").startswith(name) or f"  {name}:" in line for line in text), name
    assert "Explanation(" not in "\n".join(text)
    assert info.backend in REGISTRY and info.candidates and info.key_id and info["source"] == "cache"
    assert len(repr(info)) < 300 and info.key_id in repr(info)


HINT = r"pip install (--[\w-]+ )*'diffsynth-attention\[[\w-]+\]'"


@pytest.mark.parametrize("argv", [["backends"], ["explain", "--heads", "2", "--seq-q", "8", "--head-dim", "16",
                                                  "--device", "cpu"]])
def test_install_hints_stay_whole_at_80_columns(monkeypatch, capsys, argv):
    import re

    from diffsynth_attention.tools import cli

    monkeypatch.setenv("COLUMNS", "80")
    assert cli.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in lines) <= 80
    missing = [b.extra for b in REGISTRY.values() if b.extra and b.declared_reason() and "not installed" in b.declared_reason()]
    assert missing  # this machine lacks some kernel packages: their hints are printed
    for extra in missing:
        whole = [line for line in lines if re.search(HINT, line) and f"[{extra}]'" in line]
        assert whole, f"no whole install command for [{extra}] in:\n" + "\n".join(lines)
    assert not any(line.rstrip().endswith(("pip", "install", "'diffsynth-attention[")) for line in lines)
    if argv == ["backends"]:
        assert any("--no-build-isolation 'diffsynth-attention[flash-attn-2]'" in line for line in lines)


def test_warm_last_line_counts_what_was_asked_tuned_and_cached(monkeypatch, capsys):
    from diffsynth_attention.tools import cli

    monkeypatch.setenv("COLUMNS", "80")
    argv = ["warm", "--preset", "seed_example,seed_example", "--no-progress", "--device", "cpu"]
    assert cli.main(argv) == 0
    lines = capsys.readouterr().out.rstrip("\n").splitlines()
    assert lines[-1] == "2 problems asked, 1 distinct: 1 tuned now, 0 already cached; 1 decision stored"
    assert max(len(line) for line in lines if not line.startswith("decisions in ")) <= 80
    assert lines[0].startswith("2 problems asked, 1 distinct")  # the table's title
    assert cli.main(argv[:2] + ["seed_example"] + argv[3:]) == 0
    last = capsys.readouterr().out.rstrip("\n").splitlines()[-1]
    assert last == "1 problem asked, 1 distinct: 0 tuned now, 1 already cached; 1 decision stored"


def test_backends_shows_what_unset_means_the_tolerance_per_dtype_and_the_cache_folder_in_use(monkeypatch, capsys):
    import json

    import platformdirs

    from diffsynth_attention.tools import cli

    monkeypatch.delenv("DIFFSYNTH_ATTENTION_TOLERANCE", raising=False)
    monkeypatch.delenv("DIFFSYNTH_ATTENTION_CACHE_DIR", raising=False)
    assert cli.main(["backends", "--json"]) == 0
    settings = {x["variable"]: x for x in json.loads(capsys.readouterr().out)["configuration"]}
    tolerance = settings["DIFFSYNTH_ATTENTION_TOLERANCE"]["value"]
    assert tolerance.startswith("per dtype: bfloat16 0.005, float16 0.002, float32 0.0001"), tolerance
    assert settings["DIFFSYNTH_ATTENTION_CACHE_DIR"]["value"] == platformdirs.user_cache_dir("diffsynth_attention")
    monkeypatch.setenv("DIFFSYNTH_ATTENTION_TOLERANCE", "0.01")
    assert cli.main(["backends", "--json"]) == 0
    settings = {x["variable"]: x for x in json.loads(capsys.readouterr().out)["configuration"]}
    assert settings["DIFFSYNTH_ATTENTION_TOLERANCE"] == {"variable": "DIFFSYNTH_ATTENTION_TOLERANCE", "value": 0.01,
                                                         "source": "set"}


def test_a_bad_tolerance_says_the_default_is_per_dtype(monkeypatch):
    from diffsynth_attention import config

    monkeypatch.setenv("DIFFSYNTH_ATTENTION_TOLERANCE", "abc")
    with pytest.raises(ValueError) as info:
        config.tolerance()
    assert "tolerance per dtype" in str(info.value) and "0.005" not in str(info.value)
