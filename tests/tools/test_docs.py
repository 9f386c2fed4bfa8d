"""The docs' tables and figures are generated from the code and the committed results
(``scripts/gen_docs.py``), and one that disagrees fails here."""
import enum
import json
import re
import sys
from pathlib import Path

import pytest

from diffsynth_attention import config

ROOT = Path(__file__).resolve().parents[2]
import support.harness  # noqa: E402,F401  (scripts/ on the path)
import gen_docs as docs  # noqa: E402
from harness import doc_results, doc_tables  # noqa: E402


@pytest.mark.parametrize("rel", docs.files())
def test_every_generated_table_matches_the_code(rel):
    text = (ROOT / rel).read_text()
    assert docs.render(text) == text, f"{rel} is out of date: run python scripts/gen_docs.py"


def test_every_table_is_in_the_docs():
    found = [name for rel in docs.files() for name in docs.blocks((ROOT / rel).read_text())]
    assert sorted(found) == sorted(docs.TABLES), found
    assert {"env", "extras", "cli", "headline"} <= set(docs.blocks((ROOT / "README.md").read_text()))


def test_a_stale_table_is_found_and_rewritten():
    text = "x\n<!-- generated: status -->\n| `chosen` | stale |\n<!-- end -->\ny\n"
    new = docs.render(text)
    assert new != text and new.startswith("x\n") and new.endswith("<!-- end -->\ny\n")
    assert all(f"| `{s}` |" in new for s in doc_tables.status_values())
    assert docs.render(new) == new


def test_every_variable_and_status_has_a_meaning_and_no_meaning_is_orphaned():
    assert set(doc_tables.ENV_MEANINGS) == set(config.READERS)
    assert set(doc_tables.ENV_DEFAULTS) <= set(config.READERS)
    assert set(doc_tables.STATUS_MEANINGS) == set(doc_tables.status_values())


def test_the_statuses_are_the_schemas():
    import json

    schema = json.loads((ROOT / "diffsynth_attention" / "data" / "decisions.schema.json").read_text())
    found = re.search(r'"status": \{"enum": (\[[^]]*\])', json.dumps(schema))
    assert found and sorted(json.loads(found.group(1))) == sorted(doc_tables.status_values())


def test_the_tables_follow_the_registry_and_the_readers():
    from diffsynth_attention.backends import PREFERENCE, REGISTRY

    table = doc_tables.backend_table()
    assert [re.match(r"\| `(\w+)`", line).group(1) for line in table.splitlines()[2:]] == list(REGISTRY)
    assert " > ".join(f"`{n}`" for n in PREFERENCE) in doc_tables.preference_list()
    env = doc_tables.env_table()
    assert [re.match(r"\| `(\w+)`", line).group(1) for line in env.splitlines()[2:]] == list(config.READERS)
    assert "| `1.5` |" in env.splitlines()[2 + list(config.READERS).index(config.TUNING_BUDGET)]
    # the default column is a value, never the meaning again (THIN_CALLS once showed its meaning twice)
    for line in env.splitlines()[2:]:
        default = line.split(" | ")[1]
        assert len(default) <= 12, line[:80]


def test_the_statuses_are_read_by_value_from_constants_or_a_str_enum():
    import types

    class Status(str, enum.Enum):
        CHOSEN = "chosen"
        ODD = "odd"

    assert doc_tables.status_values(types.SimpleNamespace(Other=enum.Enum("Other", "A"), Status=Status)) == ["chosen", "odd"]
    assert doc_tables.status_values(types.SimpleNamespace(CHOSEN="chosen", ODD="odd", NAME="x", lower="lower")) == ["chosen", "odd"]


def test_check_mode_writes_nothing_and_reports(tmp_path, monkeypatch, capsys):
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("<!-- generated: preference -->\nold\n<!-- end -->\n")
    monkeypatch.setattr(docs, "ROOT", tmp_path)
    assert docs.main(["--check"]) == 1
    assert "old" in (tmp_path / "README.md").read_text() and "out of date" in capsys.readouterr().out
    assert not (tmp_path / docs.SCHEMA).exists()
    (tmp_path / "cache_schema").mkdir()
    assert docs.main([]) == 0 and docs.main(["--check"]) == 0
    assert json.loads((tmp_path / docs.SCHEMA).read_text())["$defs"]["backend"]["enum"]


def test_the_schema_file_is_up_to_date():
    assert (ROOT / docs.SCHEMA).read_text() == docs.schema_text(), "run python scripts/gen_docs.py"


def test_every_source_extra_and_command_has_a_meaning_and_no_meaning_is_orphaned():
    from diffsynth_attention.states import PlanSource

    assert set(doc_tables.SOURCE_MEANINGS) == {s.value for s in PlanSource}
    assert "neighbour" in doc_tables.source_table()
    assert set(doc_tables.EXTRA_NOTES) == set(doc_tables.backend_extras())
    assert set(doc_tables.backend_extras()) <= set(doc_tables.pyproject_extras())  # each backend's extra exists
    commands = [c for c, _, _ in doc_tables.cli_commands()]
    assert set(doc_tables.CLI_MEANINGS) == set(commands) and "cache clear" in commands


def test_the_cli_table_lists_every_flag_of_every_command():
    table = doc_tables.cli_table()
    from diffsynth_attention.tools.cli import build_parser

    text = build_parser().format_help()
    for command, _, flags in doc_tables.cli_commands():
        row = next(line for line in table.splitlines() if line.startswith(f"| `{command}"))
        assert all(flag.split(":")[0] in row for flag in flags), command
    assert "cache" in text and "--key KEY`: only the decision" in table


def test_the_headline_figures_are_the_result_files():
    doc = doc_results.result()
    line = doc_results.headline()
    assert f"{doc['summary']['geomean_speedup_vs_fixed']:.2f}x faster than DiffSynth" in line
    assert f"{doc['summary']['geomean_speedup_vs_sdpa']:.2f}x faster than SDPA" in line
    table = doc_results.measured()
    assert all(f"| {p['name']} |" in table for p in doc["problems"])
    readme, measurements = (ROOT / "README.md").read_text(), (ROOT / "docs" / "measurements.md").read_text()
    assert line in readme  # the README's figures are those of the page it links
    assert f"{doc['summary']['geomean_speedup_vs_fixed']:.2f}x faster than DiffSynth" in measurements


def test_the_readme_says_how_many_suite_problems_are_one_at_cpu_size():
    from diffsynth_attention.tools.shapes import distinct, scale_for_cpu, builtin_shapes

    kept = [s for s in distinct([scale_for_cpu(s) for s in builtin_shapes()]) if s.get("also")]
    assert len(kept) == 1 and len(kept[0]["also"]) == 3  # today's suite: four problems are one at CPU size
    assert doc_tables.merged_at_cpu_size() == "four"
    assert "(e.g. four suite problems at CPU size)" in (ROOT / "README.md").read_text()
