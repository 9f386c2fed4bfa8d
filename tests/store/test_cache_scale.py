"""The store at scale: whole-cache reads in one pass that change nothing, a neighbour
index per group, a migration that never blocks a call, the fast schema check, and the cache CLI."""
import json
import logging
import os
import subprocess
import sys
import threading

import pytest

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffsynth_attention.store import cache as cache_mod
from diffsynth_attention.store import codec, fs, migrate
from diffsynth_attention.store.cache import DecisionCache, render_document, render_entry
from diffsynth_attention.store.decision import key_id
from diffsynth_attention.store.neighbours import neighbour_group
from diffsynth_attention.tools import cli, cli_cache

from support.store_helpers import PREAMBLE, fake_key, make_decision

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _warnings(caplog, text):
    return [r for r in caplog.records if r.levelno >= logging.WARNING and text in r.getMessage()]


def _fill(folder, valid=10, bad=0, forged=0):
    v2 = folder / "v2"
    v2.mkdir(parents=True, mode=0o700, exist_ok=True)
    os.chmod(folder, 0o700)
    for i in range(valid):
        (v2 / f"{make_decision(i).key_id}.json").write_text(render_entry(make_decision(i)))
    for i in range(1000, 1000 + bad):
        (v2 / f"{make_decision(i).key_id}.json").write_text(render_entry(make_decision(i))[:40])
    for i in range(2000, 2000 + forged):  # a valid entry under an id that is not the hash of its key
        kid = key_id({"forged": i})
        (v2 / f"{kid}.json").write_text(render_entry(make_decision(i)).replace(make_decision(i).key_id, kid))
    return sorted(os.listdir(v2))


def test_a_whole_cache_read_changes_nothing_lists_once_and_warns_once(isolated, monkeypatch, caplog):
    before = _fill(isolated, valid=10, bad=30, forged=30)
    listings = []
    real = os.listdir
    monkeypatch.setattr(os, "listdir", lambda *a: listings.append(a) or real(*a))
    c = DecisionCache(isolated)
    assert set(c.entries()) == {make_decision(i).key_id for i in range(10)}
    assert sorted(real(isolated / "v2")) == before  # `show` deletes and renames nothing
    (summary,) = _warnings(caplog, "cannot be used")
    assert "60 entries" in summary.getMessage()
    assert not _warnings(caplog, "bad cache entry")
    assert len(listings) <= 3  # the load's sweep and one listing: never one per bad entry


def test_clear_removes_bad_entries_with_everything_and_a_filter_leaves_them(isolated, caplog):
    _fill(isolated, valid=6, bad=5, forged=5)
    c = DecisionCache(isolated)
    assert c.count() == 16
    assert c.clear(lambda d: d.key["problem"]["seq_q"] <= 3) == 3
    assert len(_warnings(caplog, "cannot be used")) == 1 and len(os.listdir(isolated / "v2")) == 13
    assert c.clear() == 13
    assert [n for n in os.listdir(isolated / "v2") if n.endswith(".json")] == []


def test_neighbours_come_from_an_index_kept_per_group(isolated, monkeypatch):
    c = DecisionCache(isolated)
    for i in range(6):
        c.put(make_decision(i))
    other = DecisionCache(isolated)  # a fresh process: builds its index once
    fields = fake_key(3)
    fields["problem"]["seq_q"] = 5
    group = neighbour_group(fields)
    assert {d.key_id for d in other.neighbours(group)} == {make_decision(i).key_id for i in range(1, 6)}  # 0: seq_q == seq_kv
    reads, grouped = [], []
    real_read, real_group = fs.read_secure, cache_mod.group_of
    monkeypatch.setattr(fs, "read_secure", lambda *a: reads.append(a[1]) or real_read(*a))
    monkeypatch.setattr(cache_mod, "group_of", lambda d: grouped.append(d) or real_group(d))
    other_fields = fake_key(3)
    other_fields["problem"]["head_dim"] = 16
    assert other.neighbours(neighbour_group(other_fields)) == []
    assert other.neighbours(group) and reads == [] and grouped == []  # nothing read or grouped again
    c.put(make_decision(7))  # written by another process: the next lookup reads that one file only
    assert make_decision(7).key_id in {d.key_id for d in other.neighbours(group)}
    assert reads == [f"{make_decision(7).key_id}.json"]


def _v1(folder, n):
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    decisions = {d.key_id: d for d in (make_decision(i) for i in range(n))}
    doc = json.loads(render_document(decisions))
    doc["schema_version"] = 1
    (folder / "decisions.json").write_text(json.dumps(doc))
    return decisions


def test_a_migration_runs_in_the_background_and_the_old_file_is_served_meanwhile(isolated, monkeypatch, subprocess_env):
    decisions = _v1(isolated, 20)
    release, writing = threading.Event(), threading.Event()
    real = fs.write_new

    def held_write(*a, **kw):  # the migration's writes stall, as on a slow disk with 100,000 entries
        if threading.current_thread().name.endswith("v1-migration"):
            writing.set()
            release.wait(60)
        return real(*a, **kw)

    monkeypatch.setattr(fs, "write_new", held_write)
    monkeypatch.setattr(migrate, "LAZY_WAIT_S", 30.0)  # the parse of 20 entries ends long before: no timing here
    got = {}
    caller = threading.Thread(target=lambda: got.update(c=DecisionCache(isolated)) or got.update(
        hit=got["c"].get(next(iter(decisions))), miss=got["c"].get("0" * 24)), daemon=True)
    caller.start()
    caller.join(30)
    try:
        assert not caller.is_alive(), "an attention call waited for the migration"
        assert got["hit"] is not None and got["miss"] is None  # served from the old file
        assert writing.wait(30) and not release.is_set()  # while the migration's writes were held
        assert (isolated / "decisions.json").exists()
    finally:
        release.set()
    assert got["c"].migrate() == (20, 0)
    assert set(DecisionCache(isolated).entries()) == set(decisions)
    assert (isolated / "decisions.json.v1-migrated").exists() and not (isolated / "decisions.json").exists()


def test_cache_migrate_command(isolated, subprocess_env):
    _v1(isolated, 5)
    r = subprocess.run([sys.executable, "-m", "diffsynth_attention", "cache", "migrate"], env=subprocess_env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "migrated 5 decision(s)" in r.stdout, r.stderr
    r = subprocess.run([sys.executable, "-m", "diffsynth_attention", "cache", "migrate"], env=subprocess_env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "nothing to migrate" in r.stdout


def test_import_refuses_a_backend_that_is_not_the_chosen_candidate(isolated, subprocess_env, tmp_path):
    d = make_decision(4)
    doc = json.loads(render_document({d.key_id: d}))
    doc["entries"][d.key_id]["backend"] = "torch_math"  # chosen: torch
    path = tmp_path / "doc.json"
    path.write_text(json.dumps(doc))
    r = subprocess.run([sys.executable, "-m", "diffsynth_attention", "cache", "import", str(path)], env=subprocess_env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "torch_math" in r.stderr and "chosen" in r.stderr, r.stderr
    assert DecisionCache(isolated).entries() == {}


def test_cache_clear_without_yes_and_without_a_terminal_is_a_usage_error(isolated, subprocess_env):
    DecisionCache(isolated).put(make_decision(1))
    r = subprocess.run([sys.executable, "-m", "diffsynth_attention", "cache", "clear"], env=subprocess_env,
                       capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == 2 and "--yes" in r.stderr and "Traceback" not in r.stderr
    assert len(DecisionCache(isolated).entries()) == 1


def test_a_long_show_prints_plain_columns_within_80(isolated, monkeypatch, capsys):
    c = DecisionCache(isolated)
    for i in range(5):
        c.put(make_decision(i, backend="torch_math" if i % 2 else "torch"))
    monkeypatch.setattr(cli_cache, "PLAIN_ROWS", 3)
    assert cli.main(["cache", "show"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 + 5 and lines[0].startswith("5 decisions") and all(len(x) <= 80 for x in lines[1:])
    assert sum("torch_math" in x for x in lines[3:]) == 2


def test_export_of_entries_on_disk_round_trips(isolated):
    _fill(isolated, valid=5, bad=2)
    text, count = DecisionCache(isolated).export_document()
    assert count == 5 and set(codec.parse_document(text)) == {make_decision(i).key_id for i in range(5)}


_GOOD = json.loads(render_entry(make_decision(11)))["entry"]
values = st.recursive(st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=False) | st.text(max_size=6)
                      | st.sampled_from(["torch", "chosen", "9.0", "bfloat16", "none"]),
                      lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                      max_leaves=10)


def _paths(doc, prefix=()):
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, prefix + (k,))


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(where=st.sampled_from([p for p in _paths(_GOOD) if p]), value=values, drop=st.booleans())
def test_the_compiled_schema_check_agrees_with_jsonschema(where, value, drop):
    entry = json.loads(json.dumps(_GOOD))
    node = entry
    for p in where[:-1]:
        node = node[p]
    if drop:
        node.pop(where[-1])
    else:
        node[where[-1]] = value
    assert codec.fast_check()(entry) == codec.schema_validator().is_valid(entry)


MIGRATE_ONE = PREAMBLE + r"""
c = DecisionCache(sys.argv[1])
print(len(c.entries()))
"""


def test_a_v1_file_migrated_by_8_processes_at_once_loses_nothing(isolated, subprocess_env):
    decisions = _v1(isolated, 40)
    env = dict(subprocess_env, DA_ROOT=str(ROOT))
    procs = [subprocess.Popen([sys.executable, "-c", MIGRATE_ONE, str(isolated)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(8)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0 and "Traceback" not in err, err[-2000:]
        assert int(out.split()[-1]) == 40
    assert set(DecisionCache(isolated).entries()) == set(decisions)
    assert (isolated / "decisions.json.v1-migrated").exists()


def test_a_garbage_or_directory_v1_file_is_no_crash(isolated, caplog):
    isolated.mkdir(mode=0o700)
    (isolated / "decisions.json").write_text('{"schema_version": 1, "entries": {"a": ')
    c = DecisionCache(isolated)
    assert c.entries() == {} and c.get(make_decision(1).key_id) is None
    assert [n for n in os.listdir(isolated) if n.startswith("decisions.json.bad-")]
    assert len(_warnings(caplog, "bad version-1 file")) == 1
    (isolated / "decisions.json").mkdir()
    c = DecisionCache(isolated)
    c.put(make_decision(2))
    assert set(c.entries()) == {make_decision(2).key_id} and c.migrate() == (0, 0)
    assert len(_warnings(caplog, "not migrated")) == 2


def test_a_thread_that_must_not_import_jsonschema_gets_an_unworded_refusal(monkeypatch):
    """The preload thread reads the cache while the caller imports: there an entry the compiled
    check refuses is refused without importing jsonschema to word it; elsewhere it is worded."""
    import sys

    bad = {"schema_version": 3, "backend": 5}
    worded = codec.schema_errors(bad)
    assert worded and "is a required property" in worded[0].message  # jsonschema's words
    monkeypatch.delitem(sys.modules, "jsonschema")  # as in a process that never imported it
    with codec.unworded():
        errors = codec.schema_errors(bad)
        assert len(errors) == 1 and "compiled schema check refuses it" in errors[0].message
        assert codec.schema_errors(dict(make_decision(1).to_dict())) == []  # a valid entry passes
        with pytest.raises(codec.CacheFileError, match="does not match the schema"):
            codec.validate_entry("ab" * 12, bad, "<test>")
    assert "jsonschema" not in sys.modules
