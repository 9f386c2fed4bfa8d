"""The on-disk cache (one file per decision): its place, its format, a hit without I/O, export,
import and migration. Concurrency and crashes: test_cache_concurrency.py; bad files and
unusable places: test_cache_places.py."""
import dataclasses
import json
import os
import re
import stat
import subprocess
import sys
import time

import jsonschema
import pytest

import diffsynth_attention as da
from diffsynth_attention.dispatch import default_dispatcher
from diffsynth_attention.store import cache as cache_mod
from diffsynth_attention.store import codec
from diffsynth_attention.store.cache import CacheFileError, DecisionCache, parse_document, render_document
from diffsynth_attention.store.key import key_id

from support.helpers import qkv
from support.store_helpers import make_decision
from support.cache_files import ROOT, run_py
from support.cache_files import entries as _entries, only_entry as _only_entry, warnings_with as _warnings



store = default_dispatcher().store

TUNE_SCRIPT = r"""
import json, sys, torch
import diffsynth_attention as da
for s in json.loads(sys.argv[1]):
    q = torch.randn(1, 1, s, 8)
    da.attention_forward(q, q, q)
print(json.dumps(da.stats()))
"""



def test_location_modes_and_no_leftovers(isolated):
    q, k, v = qkv()
    info = da.explain(q, k, v)
    assert da.cache_dir() == isolated
    assert stat.S_IMODE(os.stat(isolated).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(isolated / "v2").st_mode) == 0o700
    entry = _only_entry(isolated)
    assert entry.name == f"{info.key_id}.json"
    assert stat.S_IMODE(os.stat(entry).st_mode) == 0o600
    names = os.listdir(isolated / "v2")
    assert not [n for n in names if n.startswith(".tmp")]
    assert not os.listdir(isolated / "v2" / "locks")  # the tuning lock file is removed on release


def test_default_location_is_platformdirs(monkeypatch):
    import platformdirs

    monkeypatch.delenv("DIFFSYNTH_ATTENTION_CACHE_DIR")
    assert str(da.cache_dir()) == platformdirs.user_cache_dir("diffsynth_attention")


def test_entry_file_matches_schema_and_keeps_every_field(isolated):
    q, k, v = qkv()
    da.explain(q, k, v)
    doc = json.loads(_only_entry(isolated).read_text())
    jsonschema.Draft202012Validator(json.loads(codec.SCHEMA_FILE.read_text())).validate(doc)
    assert doc["schema_version"] == 3 and doc["id"] == key_id(doc["entry"]["key"])
    entry = doc["entry"]
    assert set(entry) >= {"key", "backend", "candidates", "tolerance", "created", "tuning_seconds"}
    assert entry["candidates"]["torch"]["error"] is not None
    assert entry["candidates"]["torch_cudnn"]["reason"]


def test_second_process_reuses_decisions_without_tuning(subprocess_env):
    first = run_py(TUNE_SCRIPT, subprocess_env, "[17, 23]")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout.splitlines()[-1])["tunings"] == 2
    second = run_py(TUNE_SCRIPT, subprocess_env, "[17, 23]")
    assert second.returncode == 0, second.stderr
    stats = json.loads(second.stdout.splitlines()[-1])
    assert stats["tunings"] == 0 and stats["hits"] == 2


def test_a_hit_does_no_file_io_and_a_miss_opens_one_file(isolated, monkeypatch):
    q, k, v = qkv()
    da.attention_forward(q, k, v)
    opened = []
    real_open, real_os_open = open, os.open

    def spy(*a, **kw):
        opened.append(a[0])
        return real_open(*a, **kw)

    def os_spy(*a, **kw):
        opened.append(a[0])
        return real_os_open(*a, **kw)

    monkeypatch.setattr("builtins.open", spy)
    monkeypatch.setattr(os, "open", os_spy)
    for _ in range(5):
        da.attention_forward(q, k, v)
    assert opened == []
    kid = make_decision(5).key_id
    assert store.get(kid) is None
    assert [n for n in opened if isinstance(n, str) and n.endswith(".json")] == [f"{kid}.json"]


def _v1_document(entries: dict) -> str:
    doc = json.loads(render_document(entries))
    doc["schema_version"] = 1
    return json.dumps(doc)


def test_v1_file_is_migrated_once_without_loss(isolated, caplog):
    decisions = {d.key_id: d for d in (make_decision(i) for i in range(30))}
    doc = json.loads(_v1_document(decisions))
    doc["entries"]["f" * 24] = {"backend": "nope"}  # one invalid entry: skipped, kept in the old file
    newer = make_decision(0, backend="torch_math")
    isolated.mkdir(mode=0o700)
    (isolated / "decisions.json").write_text(json.dumps(doc))
    (isolated / "decisions.json.lock").write_text("")
    (isolated / "v2").mkdir(mode=0o700)
    (isolated / "v2" / f"{newer.key_id}.json").write_text(cache_mod.render_entry(newer))  # v2 wins over v1
    c = DecisionCache(isolated)
    have = c.entries()
    assert set(have) == set(decisions)
    assert have[newer.key_id].backend == "torch_math"
    assert not (isolated / "decisions.json").exists() and not (isolated / "decisions.json.lock").exists()
    assert (isolated / "decisions.json.v1-migrated").exists()
    assert len(_warnings(caplog, "failed validation and were not migrated")) == 1
    (isolated / "v2" / f"{make_decision(1).key_id}.json").unlink()
    assert make_decision(1).key_id not in DecisionCache(isolated).entries()  # once: never migrated again


def test_leftovers_are_removed_and_bounded(isolated, caplog):
    c = DecisionCache(isolated)
    assert c.persistent
    v2 = isolated / "v2"
    v2.mkdir(parents=True, mode=0o700)  # (loading creates no folder: the first write does)
    old, new = v2 / ".tmp-old", v2 / ".tmp-new"
    for p in (old, new):
        p.write_text("x")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    (v2 / "locks").mkdir(exist_ok=True)
    abandoned = v2 / "locks" / ("a" * 24 + ".lock")
    abandoned.write_text("")
    os.utime(abandoned, (time.time() - 7200, time.time() - 7200))
    for i in range(8):  # 8 bad entries: the last 5 copies are kept
        (v2 / f"{make_decision(i).key_id}.json").write_text("{bad")
    c = DecisionCache(isolated)
    assert c.persistent  # loading sweeps
    assert not old.exists() and new.exists() and not abandoned.exists()
    for i in range(8):
        assert c.get(make_decision(i).key_id) is None
    assert len(list(v2.glob("*.bad-*"))) == cache_mod.BAD_KEPT
    assert len(_warnings(caplog, "bad cache entry")) == 8


def test_clear_cache_removes_from_memory_and_disk(isolated):
    for s in (16, 20):
        q, k, v = qkv(sq=s)
        da.explain(q, k, v)
    assert da.clear_cache(backend="flash_attention_4") == 0
    assert len(_entries(isolated)) == 2
    assert da.clear_cache() == 2
    assert not _entries(isolated) and DecisionCache(isolated).entries() == {}
    q, k, v = qkv(sq=16)
    assert da.explain(q, k, v).source == "tuned"


def test_clear_cache_refuses_a_gpu_filter_that_is_not_text_or_is_blank_before_removing_anything(isolated):
    """clear_cache(gpu=0) (a device index where part of a name is asked) raised AttributeError
    ('int' object has no attribute 'lower'), naming neither the function nor the argument."""
    q, k, v = qkv(sq=16)
    da.explain(q, k, v)
    with pytest.raises(TypeError, match=r"clear_cache\(gpu\) must be a str"):
        da.clear_cache(gpu=0)
    with pytest.raises(TypeError, match=r"clear_cache\(backend\) must be a backend name string"):
        da.clear_cache(backend=3)
    # blank text is in every device name: clear_cache(gpu=os.environ.get("GPU", "")) cleared every decision
    # (the command line's --gpu refuses it)
    for blank in ("", "  "):
        with pytest.raises(ValueError, match=r"clear_cache\(gpu\)=.* blank"):
            da.clear_cache(gpu=blank)
    assert len(_entries(isolated)) == 1


def test_documents_refuse_bad_ids_nan_and_oversize():
    d = make_decision(3)
    good = json.loads(render_document({d.key_id: d}))
    assert set(parse_document(json.dumps(good))) == {d.key_id}
    for bad_id in ("../../etc/passwd", make_decision(4).key_id, "A" * 24):
        doc = {"schema_version": 2, "entries": {bad_id: good["entries"][d.key_id]}}
        with pytest.raises(CacheFileError):
            parse_document(json.dumps(doc))
    with pytest.raises(CacheFileError, match="JSON"):
        parse_document(json.dumps(good).replace('"tolerance": 0.005', '"tolerance": NaN'))
    with pytest.raises(CacheFileError, match="cap"):
        parse_document(" " * (cache_mod.MAX_DOCUMENT_BYTES + 1))
    nan = make_decision(5)
    nan = nan.replace(candidates={**nan.candidates, "torch": dataclasses.replace(nan.candidates["torch"], error=float("nan"))})
    # written as null, never as NaN
    assert "NaN" not in cache_mod.render_entry(nan)


def test_one_schema_and_its_documentation_agree():
    schema = json.loads(codec.SCHEMA_FILE.read_text())["$defs"]
    doc = (ROOT / "cache_schema" / "README.md").read_text()
    documented = set(re.findall(r"`entry\.([a-z_]+)", doc))
    assert documented | {"compile_seconds"} == set(schema["entry"]["properties"]) and "`compile_seconds`" in doc
    statuses = re.search(r"`status` \(([a-z, ]+)\)", doc).group(1).split(", ")
    assert statuses == schema["candidate"]["properties"]["status"]["enum"]
    for field in schema["candidate"]["properties"]:
        assert f"`{field}`" in doc, field
    for field in schema["key"]["properties"]["problem"]["required"]:
        assert field in doc, field


def test_cache_import_refuses_oversize_and_forged_entries(subprocess_env, tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "diffsynth_attention", *args], env=subprocess_env, capture_output=True,
                              text=True, timeout=300, stdin=subprocess.DEVNULL)

    big = tmp_path / "big.json"
    with open(big, "wb") as fh:
        fh.truncate(cache_mod.MAX_DOCUMENT_BYTES + 1)
    d = make_decision(2)
    doc = json.loads(render_document({d.key_id: d}))
    forged = tmp_path / "forged.json"
    forged.write_text(json.dumps({"schema_version": 2, "entries": {"../../etc/passwd": doc["entries"][d.key_id]}}))
    for path, why in ((big, "cap"), (forged, "not a key id")):
        r = cli("cache", "import", str(path))
        assert r.returncode == 1 and r.stderr.startswith("error: refused") and why in r.stderr, r.stderr
