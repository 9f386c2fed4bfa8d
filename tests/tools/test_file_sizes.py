"""No Python file of the package, the scripts (their harness included) or the tests is over 450
lines: a longer one is split by concern (the project's rule)."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LIMIT = 450


def long_files(root: Path = ROOT, limit: int = LIMIT) -> list:
    found = []
    for folder in ("diffsynth_attention", "scripts", "tests"):
        for path in sorted((root / folder).rglob("*.py")):
            lines = len(path.read_text().splitlines())
            if lines > limit:
                found.append(f"{path.relative_to(root)}: {lines} lines")
    return found


def test_no_file_is_over_450_lines():
    assert long_files() == [], "split by concern: " + "; ".join(long_files())


def test_a_long_file_is_found(tmp_path):
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "long.py").write_text("x = 1\n" * (LIMIT + 1))
    (tmp_path / "scripts" / "short.py").write_text("x = 1\n" * LIMIT)
    assert long_files(tmp_path) == [f"scripts/long.py: {LIMIT + 1} lines"]
