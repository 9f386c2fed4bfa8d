"""The background fresh-process children (tests/support/subprocesses.py) start only for a run that runs tests."""
import os
import subprocess
import sys

from support.subprocesses import ROOT, TESTS

CODE = """
import sys
import pytest
pytest.main(["-q", "-p", "no:cacheprovider", "--collect-only", sys.argv[1]])
from support import subprocesses
print("STARTED", sorted(subprocesses._STARTED))
"""


def test_collect_only_starts_no_child():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", CODE, str(TESTS / "dispatch" / "test_compile_fresh.py")], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert "STARTED []" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
