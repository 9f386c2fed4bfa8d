"""Every test docs/reliability.md cites as showing a guarantee exists, at the path it gives under
``tests/`` (``<component>/test_<name>.py::test_<name>``; ``::test_<name>`` alone: the same file)."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _cited() -> list:
    text = (ROOT / "docs" / "reliability.md").read_text()
    cited, current = [], None
    for match in re.finditer(r"`(?:((?:\w+/)*test_\w+\.py))?::(test_\w+)`", text):
        current = match.group(1) or current
        cited.append((current, match.group(2)))
    return cited


def test_every_cited_test_exists():
    cited = _cited()
    assert len(cited) >= 10
    for module, name in cited:
        assert module is not None, name
        tree = ast.parse((ROOT / "tests" / module).read_text())
        names = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        assert name in names, f"docs/reliability.md cites {module}::{name}, which does not exist"
