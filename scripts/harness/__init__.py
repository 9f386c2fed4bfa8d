"""The benchmark harness of ``scripts/`` (a development module: not part of the installed package).

A script runs with ``scripts/`` first on ``sys.path`` (``python scripts/<name>.py``), so it imports
the harness as ``from harness import bench`` or ``from harness.bench import ...``; the tests put
``scripts/`` on their path through ``tests/support/harness.py``."""
