"""Helpers shared by the tests of the on-disk cache (tests/store/test_cache*.py)."""
import logging
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_py(code, env, *args, timeout=300):
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=timeout)


def entries(cache):
    return sorted((cache / "v2").glob("*.json"))


def only_entry(cache):
    (path,) = entries(cache)
    return path


def warnings_with(caplog, text):
    return [r for r in caplog.records if r.levelno >= logging.WARNING and text in r.getMessage()]
