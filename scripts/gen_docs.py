"""Write what the docs take from the code and from committed results: ``python scripts/gen_docs.py``
(``--check``: write nothing, exit 1 if anything is out of date).

- Every Markdown block between ``<!-- generated: NAME -->`` and ``<!-- end -->`` in README.md and
  docs/*.md: the tables of :mod:`doc_tables` (from the code) and the figures of
  :mod:`doc_results` (from ``benchmarks/results/``).
- ``cache_schema/decisions.schema.json``: the package's schema with the backend names filled in
  from the catalogue, so that a JSON Schema validator alone gives the answer ``cache import``
  gives on the schema's part.

A development tool (its tables in ``scripts/harness/``), not part of the installed package.
``tests/tools/test_docs.py`` fails when a file differs from what this renders.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from harness import doc_results, doc_tables

ROOT = Path(__file__).resolve().parents[1]
FILES = ("README.md",)  # and every docs/*.md
SCHEMA = "cache_schema/decisions.schema.json"
schema_text = doc_tables.schema_text  # the standalone schema's text
_BLOCK = re.compile(r"(<!-- generated: (\w+) -->\n)(.*?)(<!-- end -->)", re.S)

TABLES = {"env": doc_tables.env_table, "backends": doc_tables.backend_table, "preference": doc_tables.preference_list,
          "status": doc_tables.status_table, "sources": doc_tables.source_table, "extras": doc_tables.extras_table,
          "cli": doc_tables.cli_table, "headline": doc_results.headline, "measured": doc_results.measured}


def render(text: str) -> str:
    """``text`` with every generated block replaced by what the code and results say now."""
    return _BLOCK.sub(lambda m: m.group(1) + TABLES[m.group(2)]() + m.group(4), text)


def blocks(text: str) -> list:
    return [m.group(2) for m in _BLOCK.finditer(text)]


def files() -> list:
    """The documents that may hold generated blocks, relative to the repository root."""
    return list(FILES) + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))


def outputs() -> dict:
    """{path relative to the root: its text as generated} for every generated file."""
    out = {}
    for rel in files():
        out[rel] = render((ROOT / rel).read_text())
    out[SCHEMA] = doc_tables.schema_text()
    return out


def main(argv=None) -> int:
    check = "--check" in (argv if argv is not None else sys.argv[1:])
    stale = []
    for rel, new in outputs().items():
        path = ROOT / rel
        if not path.exists() or path.read_text() != new:
            stale.append(rel)
            if not check:
                path.write_text(new)
    for rel in stale:
        print(f"{rel}: {'out of date' if check else 'updated'}")
    return 1 if check and stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
