"""Recording the problems a pipeline calls (``da.record``, ``DIFFSYNTH_ATTENTION_RECORD``) and
warming another cache from the recording or from a ``cache export`` document: ``warm --shapes``
tunes the very keys the calls use. ``explain --mask/--grad`` on the command line."""
import json
import os
import subprocess
import sys

import pytest
import torch

import diffsynth_attention as da
from diffsynth_attention.dispatch import default_dispatcher

BSND = dict(q_pattern="b s n d", k_pattern="b s n d", v_pattern="b s n d", out_pattern="b s n d")


def cli(env, *args):
    return subprocess.run([sys.executable, "-m", "diffsynth_attention", *args], env=env, capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL)


def pipeline():
    """Three distinct problems, each called twice: b s n d with a bool mask, one needing
    gradients, one in b n s d memory seen as b s n d (a transposed view)."""
    keys = []
    q = torch.randn(1, 16, 2, 8)
    mask = torch.rand(1, 1, 16, 16) > 0.3
    mask[..., 0] = True
    g = torch.randn(1, 2, 12, 8, requires_grad=True)
    t = torch.randn(1, 2, 20, 8).transpose(1, 2)  # b s n d shape, b n s d memory
    for _ in range(2):
        da.attention_forward(q, q, q, attn_mask=mask, **BSND)
        da.attention_forward(g, g, g).sum().backward()
        da.attention_forward(t, t, t, **BSND)
    keys.append(da.explain(q, q, q, attn_mask=mask, **BSND).key_id)
    keys.append(da.explain(g, g, g).key_id)
    keys.append(da.explain(t, t, t, **BSND).key_id)
    return keys


def test_a_recording_warms_the_keys_the_calls_use(tmp_path, subprocess_env):
    path = tmp_path / "problems.json"
    q = torch.randn(1, 16, 2, 8)
    da.attention_forward(q, q, q, **BSND)  # planned before the scope: recorded all the same
    with da.record(path) as items:
        da.attention_forward(q, q, q, **BSND)
        keys = pipeline()
        assert not path.exists()  # written once, at the end of the scope
    doc = json.loads(path.read_text())
    assert len(items) == len(doc["shapes"]) == 4  # each problem once, whatever the number of calls
    kinds = {(s.get("mask", "none"), s.get("requires_grad", False), s.get("layout", "b n s d"), s.get("memory"))
             for s in doc["shapes"]}
    assert ("bool", False, "b s n d, b s n d, b s n d -> b s n d", None) in kinds
    assert ("none", True, "b n s d", None) in kinds
    assert any(m and "bnsd" in m for _, _, _, m in kinds)
    bsnd_key = da.explain(q, q, q, **BSND).key_id
    # another machine (here: another cache) warms from the file: the very keys the calls use
    env = dict(subprocess_env, DIFFSYNTH_ATTENTION_CACHE_DIR=str(tmp_path / "elsewhere"))
    r = cli(env, "warm", "--shapes", str(path), "--device", "cpu", "--full-size", "--json", "--no-progress")
    assert r.returncode == 0, r.stderr
    warmed = {row["key_id"] for row in json.loads(r.stdout)}
    assert warmed == set(keys) | {bsnd_key}, (warmed, keys)
    # a second recording adds to the file
    with da.record(path):
        x = torch.randn(1, 2, 24, 8)
        da.attention_forward(x, x, x)
    assert len(json.loads(path.read_text())["shapes"]) == 5


def test_an_export_document_warms_the_same_keys(tmp_path, subprocess_env):
    keys = pipeline()
    export = tmp_path / "export.json"
    r = cli(subprocess_env, "cache", "export", str(export))
    assert r.returncode == 0, r.stderr
    env = dict(subprocess_env, DIFFSYNTH_ATTENTION_CACHE_DIR=str(tmp_path / "elsewhere"))
    r = cli(env, "warm", "--shapes", str(export), "--device", "cpu", "--full-size", "--json", "--no-progress")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert {row["key_id"] for row in rows} == set(keys)
    assert all(row["source"] == "tuned" for row in rows)


def test_the_environment_variable_records_a_whole_process(tmp_path, subprocess_env):
    path = tmp_path / "run.json"
    code = ("import torch, diffsynth_attention as da\n"
            "m = torch.zeros(1, 1, 8, 8)\n"
            "for _ in range(3):\n"
            "    q = torch.randn(1, 2, 8, 4); da.attention_forward(q, q, q, attn_mask=m)\n"
            "import os; assert not os.path.exists(os.environ['DIFFSYNTH_ATTENTION_RECORD'])\n")
    r = subprocess.run([sys.executable, "-c", code], env=dict(subprocess_env, DIFFSYNTH_ATTENTION_RECORD=str(path)),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (shape,) = json.loads(path.read_text())["shapes"]  # written at exit, once
    assert shape["mask"] == "additive" and shape["mask_shape"] == [1, 1, 8, 8] and shape["seq_q"] == 8


def test_the_environment_variable_naming_a_missing_folder_stops_the_first_call(tmp_path, monkeypatch):
    """DIFFSYNTH_ATTENTION_RECORD=/missing/run.json ran the whole process and only at its exit
    logged that the recording could not be written; a bad value is refused at the first call."""
    monkeypatch.setenv("DIFFSYNTH_ATTENTION_RECORD", str(tmp_path / "missing" / "run.json"))
    q = torch.randn(1, 2, 8, 4)
    before = da.stats()["tunings"]
    with pytest.raises(ValueError, match="DIFFSYNTH_ATTENTION_RECORD=.*missing"):
        da.attention_forward(q, q, q)
    assert da.stats()["tunings"] == before
    (tmp_path / "missing").mkdir()
    da.attention_forward(q, q, q)  # the folder made: it records


def test_recording_does_no_io_on_the_hit_path(tmp_path, monkeypatch):
    q = torch.randn(1, 2, 8, 4)
    opened = []
    with da.record(tmp_path / "p.json"):
        da.attention_forward(q, q, q)  # planned (and recorded) here
        real_open, real_os_open = open, os.open
        monkeypatch.setattr("builtins.open", lambda *a, **kw: opened.append(a[0]) or real_open(*a, **kw))
        monkeypatch.setattr(os, "open", lambda *a, **kw: opened.append(a[0]) or real_os_open(*a, **kw))
        for _ in range(5):
            da.attention_forward(q, q, q)
        monkeypatch.undo()
    assert opened == []
    assert default_dispatcher().stats()["hits"] >= 5


def test_a_file_that_is_not_a_recording_is_refused_before_the_scope_runs(tmp_path):
    path = tmp_path / "shapes.json"
    path.write_text(json.dumps({"shapes": []}))
    ran = []
    with pytest.raises(ValueError, match="not a recording"):
        with da.record(path):
            ran.append(1)
    assert ran == [] and json.loads(path.read_text()) == {"shapes": []}


def test_a_recording_that_cannot_be_written_is_refused_before_the_scope_runs(tmp_path):
    """A missing folder, or a path that is not a str/PathLike, stopped nothing at entry: the whole
    pipeline ran, and the write at the scope's end raised (FileNotFoundError), losing its result."""
    ran = []
    with pytest.raises(ValueError, match=r"record\(path\).*missing.*no such folder"):
        with da.record(tmp_path / "missing" / "p.json"):
            ran.append(1)
    with pytest.raises(TypeError, match=r"record\(path\) must be"):
        with da.record(123):
            ran.append(1)
    assert ran == []


def test_a_pipeline_error_is_not_hidden_by_a_recording_that_cannot_be_written(tmp_path, caplog):
    folder = tmp_path / "out"
    folder.mkdir()
    with pytest.raises(KeyError, match="the pipeline's own error"):
        with da.record(folder / "p.json"):
            da.attention_forward(*(torch.randn(1, 2, 8, 4),) * 3)
            folder.rmdir()  # the folder goes away during the run
            raise KeyError("the pipeline's own error")
    assert "could not be written" in caplog.text


def test_explain_takes_the_mask_kind_and_gradients(subprocess_env):
    r = cli(subprocess_env, "explain", "--heads", "2", "--seq-q", "8", "--head-dim", "4", "--dtype", "float32",
            "--mask", "bool", "--grad", "--json")
    assert r.returncode == 0, r.stderr
    problem = json.loads(r.stdout)["key"]["problem"]
    assert problem["mask"] == "bool" and problem["requires_grad"] is True and problem["mask_shape"] == [1, 1, 8, 8]
    q = torch.randn(1, 2, 8, 4, requires_grad=True)
    mask = torch.ones(1, 1, 8, 8, dtype=torch.bool)
    assert da.explain(q, q, q, attn_mask=mask).key["problem"] == problem  # the key of such a call
    r = cli(subprocess_env, "explain", "--heads", "2", "--seq-q", "8", "--head-dim", "4", "--mask", "bool",
            "--window", "2")
    assert r.returncode == 2 and "--mask and --window" in r.stderr


def test_explain_shows_a_recorded_problems_own_decision(tmp_path, capsys):
    """`explain` took only --heads/--seq-q/... with a (batch, 1, s_q, s_kv) mask and contiguous
    tensors: a recorded key-padding mask (diffusers' Qwen-Image, LTX) or memory order (UNet-era
    processors under patch_sdpa) has another key, so explain tuned a new problem instead of showing
    the pipeline's decision. `explain --shapes FILE --name NAME` explains a recorded problem."""
    from diffsynth_attention.tools.cli import main

    path = tmp_path / "p.json"
    q = torch.randn(1, 16, 2, 8)
    mask = torch.ones(1, 1, 1, 16, dtype=torch.bool)
    mask[..., -3:] = False
    t = torch.randn(1, 2, 12, 8).transpose(1, 2)  # b s n d shape, b n s d memory
    with da.record(path):
        da.attention_forward(q, q, q, attn_mask=mask, **BSND)
        da.attention_forward(t, t, t, **BSND)
    keys = {da.explain(q, q, q, attn_mask=mask, **BSND).key_id, da.explain(t, t, t, **BSND).key_id}
    names = [s["name"] for s in json.loads(path.read_text())["shapes"]]
    tunings = da.stats()["tunings"]
    got = set()
    for name in names:
        assert main(["explain", "--shapes", str(path), "--name", name, "--device", "cpu", "--json"]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert doc["source"] == "cache"
        got.add(doc["key_id"])
    assert got == keys and da.stats()["tunings"] == tunings
    for argv in (["--shapes", str(path)],  # two problems: which one?
                 ["--shapes", str(path), "--name", "nope"],
                 ["--shapes", str(path), "--name", names[0], "--heads", "2"],  # one problem or the other
                 []):  # neither
        assert main(["explain", "--device", "cpu", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1
