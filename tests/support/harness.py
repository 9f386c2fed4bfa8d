"""The benchmark harness (``scripts/harness/``, a development module that is not installed), for
the tests: ``scripts/`` goes on ``sys.path`` (last, so nothing there hides an installed package),
as it is first for a script run as ``python scripts/<name>.py``."""
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.append(str(SCRIPTS))

from harness import bench  # noqa: E402

__all__ = ["bench"]
