"""Whole-cache commands at 60,000 entries (issue 31, item 4): ``show``, ``export`` and ``clear``
work on each entry's validated JSON object and build no Decision; ``export`` streams and copies an
entry's text instead of formatting it again; ``clear --key`` reads only the entries of that prefix.
Their results are those of the Decision path (the same rows, the same document)."""
import json
import os

import pytest

from diffsynth_attention.store import codec, fs
from diffsynth_attention.store.cache import DecisionCache, render_document, render_entry
from diffsynth_attention.store.decision import Candidate, Decision, decision_filter, key_id
from diffsynth_attention.tools import cli, cli_cache

from support.store_helpers import fake_key, make_decision


def _rich(i: int, reason=None) -> Decision:
    """A decision with several timed candidates (a runner-up, a tie note), on a named GPU."""
    key = fake_key(i)
    key["device"] = {"type": "cuda", "name": "NVIDIA H100 80GB HBM3" if i % 2 else "NVIDIA L40S", "capability": "9.0"}
    cands = {"torch": Candidate("accepted", 1.0 + i / 100, 0.001, None, 3.0, reps=5),
             "torch_flash": Candidate("chosen", 1.01 + i / 100, 0.002, reason, 4.0, reps=5),
             "torch_efficient": Candidate("slower", 2.0, 0.001, None, 5.0, reps=2),
             "torch_math": Candidate("rejected", None, 0.3, "error 0.3 above tolerance 0.005", 9.0)}
    return Decision(key_id(key), key, "torch_flash", cands, created=f"2026-01-0{1 + i % 3}T00:00:00+00:00",
                    tuning_seconds=0.5)


def _write(folder, decisions):
    v2 = folder / "v2"
    v2.mkdir(parents=True, mode=0o700, exist_ok=True)
    os.chmod(folder, 0o700)
    for d in decisions:
        (v2 / f"{d.key_id}.json").write_text(render_entry(d))


@pytest.fixture
def no_decisions(monkeypatch):
    """Building a Decision from an entry fails: the test proves a path builds none."""
    def refuse(cls, *a, **kw):
        raise AssertionError("a Decision was built")
    monkeypatch.setattr(Decision, "from_dict", classmethod(refuse))


def test_show_rows_come_from_entries_and_equal_the_decision_rows(isolated, no_decisions):
    decisions = [_rich(i, reason="tie: within 2% of torch" if i == 3 else None) for i in range(6)]
    _write(isolated, decisions)
    rows = sorted(DecisionCache(isolated).map_entries(cli_cache.entry_row), key=lambda r: (r["created"], r["key_id"]))
    want = sorted((cli_cache.decision_row(d.key_id, d) for d in decisions), key=lambda r: (r["created"], r["key_id"]))
    assert rows == want
    assert {r["runner_up"] for r in rows} == {"torch"} and rows[0]["reason"].startswith("tie")


def test_cache_show_json_builds_no_decision(isolated, no_decisions, capsys):
    _write(isolated, [_rich(i) for i in range(4)])
    assert cli.main(["cache", "show", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["key_id"] for r in rows] == [r["key_id"] for r in sorted(rows, key=lambda r: (r["created"], r["key_id"]))]
    assert len(rows) == 4 and all(r["backend"] == "torch_flash" and r["runner_up"] == "torch" for r in rows)


def test_export_copies_each_entry_text_and_equals_the_rendered_document(isolated, monkeypatch):
    decisions = {d.key_id: d for d in (_rich(i) for i in range(5))}
    _write(isolated, decisions.values())
    want = render_document(decisions)  # (from our Decisions, before the patches below)
    monkeypatch.setattr(Decision, "from_dict", classmethod(lambda *a, **k: (_ for _ in ()).throw(AssertionError)))
    encoded = []
    real_dumps = json.dumps
    monkeypatch.setattr(codec.json, "dumps", lambda *a, **k: encoded.append(a[0]) or real_dumps(*a, **k))
    text, count = DecisionCache(isolated).export_document()
    assert count == 5 and text == want  # byte for byte the document render_document writes
    assert not [e for e in encoded if isinstance(e, dict) and "candidates" in e]  # no entry formatted again


def test_export_of_an_entry_in_another_layout_or_with_escapes_is_encoded_and_round_trips(isolated):
    plain, escaped = _rich(1), _rich(2, reason='said "x": y\\z')
    _write(isolated, [plain, escaped])
    other = make_decision(9)  # hand-written: compact, keys in another order
    doc = json.loads(render_entry(other))
    (isolated / "v2" / f"{other.key_id}.json").write_text(json.dumps({"id": doc["id"], "schema_version": 3,
                                                                      "entry": doc["entry"]}))
    text, count = DecisionCache(isolated).export_document()
    assert count == 3 and json.loads(text) == json.loads(render_document({d.key_id: d for d in (plain, escaped, other)}))
    assert codec.parse_document(text)[escaped.key_id].candidates["torch_flash"].reason == 'said "x": y\\z'


def test_an_entry_of_the_written_layout_with_trailing_data_is_bad(isolated, caplog):
    d = _rich(1)
    _write(isolated, [d])
    path = isolated / "v2" / f"{d.key_id}.json"
    path.write_text(render_entry(d) + '{"more": 1}\n')
    text, count = DecisionCache(isolated).export_document()
    assert count == 0 and "cannot be used" in caplog.text and "not valid JSON" in caplog.text


def test_clear_with_a_filter_builds_no_decision_and_reads_only_its_key_prefix(isolated, no_decisions, monkeypatch):
    decisions = [_rich(i) for i in range(8)]
    _write(isolated, decisions)
    c = DecisionCache(isolated)
    assert c.count(decision_filter(gpu="h100")) == 4
    assert c.clear(decision_filter(gpu="h100")) == 4
    left = {p.stem for p in (isolated / "v2").glob("*.json")}
    assert left == {d.key_id for i, d in enumerate(decisions) if i % 2 == 0}
    target = sorted(left)[0]
    reads = []
    real = fs.read_secure
    monkeypatch.setattr(fs, "read_secure", lambda *a: reads.append(a[1]) or real(*a))
    assert c.clear(decision_filter(key=target[:10])) == 1
    assert reads == [f"{target}.json"]  # the other entries' files were not opened
    assert c.clear(decision_filter(backend="torch")) == 0 and len(list((isolated / "v2").glob("*.json"))) == 3


def test_a_filter_tests_an_entry_as_it_tests_its_decision():
    d = _rich(3)
    entry = d.to_dict()
    for args in [("torch_flash", None, None), ("torch", None, None), (None, "H100", None), (None, "l40", None),
                 (None, None, d.key_id[:5]), (None, None, "ffff"), ("torch_flash", "h100", d.key_id[:3])]:
        match = decision_filter(*args)
        assert match(d) == match.on_entry(d.key_id, entry), args
