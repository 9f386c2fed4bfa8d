"""Importing the package, and everything up to the first write (reads, the background preload),
creates no folder: the cache folder appears with the first decision written (issue 31, item 7).
Each case runs in a fresh interpreter whose HOME (or DIFFSYNTH_ATTENTION_CACHE_DIR) is a temporary folder."""
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Reads everything a process reads before its first write: the import (with torch first, so the
# background preload runs and reads the cache), a miss, the whole-cache reads, the neighbour index.
READS = r"""
import threading, torch
import diffsynth_attention
for t in threading.enumerate():
    if t.name == "diffsynth-attention-preload":
        t.join(30)
from diffsynth_attention import DecisionCache
c = DecisionCache()
assert c.get("0" * 24) is None
assert c.entries() == {} and c.count() == 0
assert c.neighbours("g") == []
from diffsynth_attention.dispatch import default_dispatcher
default_dispatcher().store.get("1" * 24)
"""

WRITE = r"""
import sys
sys.path.insert(0, sys.argv[1])
from support.store_helpers import make_decision
c.put(make_decision(0))
print(c.path)
"""


def _env(home, cache_dir=None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DIFFSYNTH_ATTENTION_", "XDG_"))}
    env["HOME"] = str(home)
    env["DIFFSYNTH_ATTENTION_PRELOAD"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    if cache_dir is not None:
        env["DIFFSYNTH_ATTENTION_CACHE_DIR"] = str(cache_dir)
    return env


def _run(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, str(ROOT / "tests")], env=env, capture_output=True, text=True,
                          timeout=300, cwd=str(ROOT))


def _created(folder: Path) -> list:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_reads_under_home_create_nothing_until_the_first_write(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    out = _run(READS, _env(home))
    assert out.returncode == 0, out.stderr
    assert _created(home) == []
    out = _run(READS + WRITE, _env(home))  # the first write makes the folder (the same code, so the reads above ran)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).is_dir() and str(home) in out.stdout


def test_reads_with_a_cache_dir_create_nothing(tmp_path):
    cache = tmp_path / "nested" / "cache"
    out = _run(READS, _env(tmp_path / "home", cache))
    assert out.returncode == 0, out.stderr
    assert _created(tmp_path) == []


@pytest.mark.parametrize("where", ["read-only", "impossible"])
def test_import_with_an_unwritable_home_exits_0_and_creates_nothing(tmp_path, where):
    if where == "read-only":
        home = tmp_path / "home"
        home.mkdir()
        home.chmod(stat.S_IRUSR | stat.S_IXUSR)
    else:  # as root a read-only mode is no barrier: a HOME under /proc can never be written
        home = Path("/proc/self/no-such-home")
    try:
        out = _run(READS, _env(home))
        assert out.returncode == 0, out.stderr
        if where == "read-only":
            assert _created(home) == []
    finally:
        if where == "read-only":
            home.chmod(stat.S_IRWXU)


IMPORT_ONLY = r"""
import sys, threading, time, torch
import diffsynth_attention
for t in threading.enumerate():
    if t.name == "diffsynth-attention-preload":
        t.join(60)
time.sleep(1)  # a migration or a journal's replay would run on threads of their own
"""


def test_the_preload_at_import_writes_nothing_to_an_existing_cache(tmp_path):
    """The preload only reads: a version-1 file is not migrated, a journal of a process that is gone
    is not replayed and an old temporary file is not swept by the import (the first call does it)."""
    import json

    from diffsynth_attention.store.codec import render_document, render_entry

    sys.path.insert(0, str(ROOT / "tests"))
    from support.store_helpers import make_decision

    cache = tmp_path / "cache"
    (cache / "v2").mkdir(parents=True, mode=0o700)
    cache.chmod(0o700)
    decided = make_decision(1)
    (cache / "v2" / f"{decided.key_id}.json").write_text(render_entry(decided))
    doc = json.loads(render_document({d.key_id: d for d in (make_decision(i) for i in range(3, 6))}))
    doc["schema_version"] = 1
    (cache / "decisions.json").write_text(json.dumps(doc))
    old_tmp = cache / "v2" / ".tmp-0123456789abcdef01234567.json-1-abcd"
    old_tmp.write_text("x")
    os.utime(old_tmp, (1, 1))
    before = {p: p.stat().st_mtime_ns for p in cache.rglob("*")}
    out = _run(IMPORT_ONLY, _env(tmp_path / "home", cache))
    assert out.returncode == 0, out.stderr
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*")} == before
