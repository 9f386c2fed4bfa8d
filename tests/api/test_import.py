"""Importing the package has no side effect but the preload thread (issue 33, item 6): with bad
environment values, or with a read-only HOME, ``import diffsynth_attention`` and loading its
public functions exit 0, create no file or folder, register no exit handler or import hook and
make no dispatcher; a bad value raises at the first call, with the message the variable's
reader gives. Each case runs in a fresh interpreter."""
import json
import os
import stat
import subprocess
import sys

import pytest

from diffsynth_attention import config

from support.subprocesses import ROOT

BAD = {"DIFFSYNTH_ATTENTION_IMPLEMENTATION": "bogus", "DIFFSYNTH_ATTENTION_TUNING_BUDGET": "x",
       "DIFFSYNTH_ATTENTION_QUALITY": "bogus", "DIFFSYNTH_ATTENTION_TOLERANCE": "1e-300",
       "DIFFSYNTH_ATTENTION_PRELOAD": "maybe", "DIFFSYNTH_ATTENTION_CACHE_DIR": "~no-such-user-here/cache"}

def _script(calls: bool) -> str:
    return r"""
import atexit, json, os, sys, threading
import torch
exits, threads, hooks = atexit._ncallbacks(), set(threading.enumerate()), list(sys.meta_path)
import diffsynth_attention as da
new = set(threading.enumerate()) - threads
for t in new:
    t.join(30)
from diffsynth_attention import dispatch
out = {"new threads": sorted(t.name for t in new), "dispatcher": dispatch._default is not None}
from diffsynth_attention import attention_forward, explain, stats
out["exit handlers"] = atexit._ncallbacks() - exits
out["import hooks"] = len(sys.meta_path) - len(hooks)
errors = []
if %r:
    q = torch.randn(1, 2, 8, 8)
    os.environ["DIFFSYNTH_ATTENTION_TUNING"] = "0"  # the call after the last bad value writes nothing
    for _ in range(10):
        try:
            attention_forward(q, q, q)
            break
        except ValueError as exc:
            errors.append(str(exc))
            del os.environ[str(exc).split("=", 1)[0]]  # the message names the variable first
out["errors"] = errors
print(json.dumps(out))
""" % calls


def _env(home, extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DIFFSYNTH_ATTENTION_", "XDG_"))}
    env.update({"HOME": str(home), "DIFFSYNTH_ATTENTION_PRELOAD": "1", **extra})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return env


def _created(folder) -> list:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _expected_errors(monkeypatch) -> list:
    """The messages the readers give today, in the order the first calls meet them."""
    messages = []
    for name in config.READERS:
        if name in BAD:
            monkeypatch.setenv(name, BAD[name])
            with pytest.raises(ValueError) as info:
                config.READERS[name]()
            messages.append(str(info.value))
            monkeypatch.delenv(name)
    return messages


@pytest.mark.parametrize("case", ["bad values", "read-only home"])
def test_import_exits_0_creates_nothing_and_starts_only_the_preload(tmp_path, monkeypatch, case):
    home = tmp_path / "home"
    home.mkdir()
    home.chmod(stat.S_IRUSR | stat.S_IXUSR)  # read-only (root writes anyway: the check below is what counts)
    extra = BAD if case == "bad values" else {}
    try:
        out = subprocess.run([sys.executable, "-c", _script(case == "bad values")], env=_env(home, extra),
                             capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    finally:
        home.chmod(stat.S_IRWXU)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert _created(tmp_path) == ["home"] and _created(home) == []
    preload = [] if case == "bad values" else ["diffsynth-attention-preload"]  # a bad PRELOAD value: no preload
    assert set(got["new threads"]) <= set(preload)
    assert got["dispatcher"] is False  # the import made none; loading the public functions does
    assert got["exit handlers"] == 0 and got["import hooks"] == 0
    if case == "bad values":
        assert got["errors"] == _expected_errors(monkeypatch)
        assert len(got["errors"]) == len(BAD)
