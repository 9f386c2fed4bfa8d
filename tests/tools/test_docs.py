"""The docs' tables are generated from the code, and a table that disagrees fails here."""
import enum
import re
from pathlib import Path

import pytest

from diffsynth_attention import config
from diffsynth_attention.tools import docs

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("rel", docs.files())
def test_every_generated_table_matches_the_code(rel):
    text = (ROOT / rel).read_text()
    assert docs.render(text) == text, f"{rel} is out of date: run python -m diffsynth_attention.tools.docs"


def test_every_table_is_in_the_docs():
    found = [name for rel in docs.files() for name in docs.blocks((ROOT / rel).read_text())]
    assert sorted(found) == sorted(docs.TABLES), found
    assert "env" in docs.blocks((ROOT / "README.md").read_text())


def test_a_stale_table_is_found_and_rewritten():
    text = "x\n<!-- generated: status -->\n| `chosen` | stale |\n<!-- end -->\ny\n"
    new = docs.render(text)
    assert new != text and new.startswith("x\n") and new.endswith("<!-- end -->\ny\n")
    assert all(f"| `{s}` |" in new for s in docs.status_values())
    assert docs.render(new) == new


def test_every_variable_and_status_has_a_meaning_and_no_meaning_is_orphaned():
    assert set(docs.ENV_MEANINGS) == set(config.READERS)
    assert set(docs.ENV_DEFAULTS) <= set(config.READERS)
    assert set(docs.STATUS_MEANINGS) == set(docs.status_values())


def test_the_statuses_are_the_schemas():
    import json

    schema = json.loads((ROOT / "diffsynth_attention" / "data" / "decisions.schema.json").read_text())
    found = re.search(r'"status": \{"enum": (\[[^]]*\])', json.dumps(schema))
    assert found and sorted(json.loads(found.group(1))) == sorted(docs.status_values())


def test_the_tables_follow_the_registry_and_the_readers():
    from diffsynth_attention.backends import PREFERENCE, REGISTRY

    table = docs.backend_table()
    assert [re.match(r"\| `(\w+)`", line).group(1) for line in table.splitlines()[2:]] == list(REGISTRY)
    assert " > ".join(f"`{n}`" for n in PREFERENCE) in docs.preference_list()
    env = docs.env_table()
    assert [re.match(r"\| `(\w+)`", line).group(1) for line in env.splitlines()[2:]] == list(config.READERS)
    assert "| `1.5` |" in env.splitlines()[2 + list(config.READERS).index(config.TUNING_BUDGET)]


def test_the_statuses_are_read_by_value_from_constants_or_a_str_enum():
    import types

    class Status(str, enum.Enum):
        CHOSEN = "chosen"
        ODD = "odd"

    assert docs.status_values(types.SimpleNamespace(Other=enum.Enum("Other", "A"), Status=Status)) == ["chosen", "odd"]
    assert docs.status_values(types.SimpleNamespace(CHOSEN="chosen", ODD="odd", NAME="x", lower="lower")) == ["chosen", "odd"]


def test_check_mode_writes_nothing_and_reports(tmp_path, monkeypatch, capsys):
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("<!-- generated: preference -->\nold\n<!-- end -->\n")
    monkeypatch.setattr(docs, "ROOT", tmp_path)
    assert docs.main(["--check"]) == 1
    assert "old" in (tmp_path / "README.md").read_text() and "out of date" in capsys.readouterr().out
    assert docs.main([]) == 0 and docs.main(["--check"]) == 0
