"""The on-disk cache with bad files and unusable places: bad or unreadable entries, untrusted
or unusable folders (each warning names its fix), full or read-only disks."""
import errno
import json
import os
import re
import stat
import subprocess
import sys
import threading

import pytest
import torch

import diffsynth_attention as da
from diffsynth_attention.dispatch import default_dispatcher
from diffsynth_attention.store import cache as cache_mod
from diffsynth_attention.store import fs as fs_mod
from diffsynth_attention.store.cache import DecisionCache

from support.helpers import qkv
from support.store_helpers import PREAMBLE, make_decision
from support.cache_files import entries as _entries, warnings_with as _warnings



store = default_dispatcher().store


def _bad_text(case, good: str, kid: str):
    doc = json.loads(good)
    if case == "unparsable":
        return b"{not json"
    if case == "truncated":
        return good[: len(good) // 2].encode()
    if case == "non_utf8":
        return good.encode().replace(b'"torch"', b'"t\xff\xferch"', 1)
    if case == "nan":  # NaN where the schema's "minimum" would let it through
        return re.sub(r'"error": [0-9.e+-]+', '"error": NaN', good, count=1).encode()
    if case == "wrong_version":
        doc["schema_version"] = 1
    elif case == "wrong_type":
        doc["entry"]["key"] = 3
    elif case == "unknown_backend":
        doc["entry"]["backend"] = "flash_attention_9"
    elif case == "id_not_hash":
        doc["entry"]["key"]["problem"]["seq_q"] += 1  # the file name is no longer the hash of its key
    elif case == "too_big":
        doc["entry"]["candidates"]["torch"]["reason"] = "x" * (cache_mod.MAX_ENTRY_BYTES + 1)
    return json.dumps(doc).encode()


BAD = ["unparsable", "truncated", "non_utf8", "nan", "wrong_version", "wrong_type", "unknown_backend", "id_not_hash", "too_big"]


@pytest.mark.parametrize("case", BAD)
def test_a_bad_entry_is_a_miss_for_that_key_alone(case, isolated, caplog):
    q, k, v = qkv()
    info = da.explain(q, k, v)
    other = make_decision(9)
    store.put(other)
    path = isolated / "v2" / f"{info.key_id}.json"
    bad = _bad_text(case, path.read_text(), info.key_id)
    path.write_bytes(bad)
    store.forget_memory()
    default_dispatcher().reset()
    assert store.get(other.key_id).backend == "torch"  # the good entry is still read
    again = da.explain(q, k, v)
    assert again.source == "tuned"  # a miss, not a crash
    assert len(_warnings(caplog, "bad cache entry")) == 1
    aside = list((isolated / "v2").glob(f"{info.key_id}.json.bad-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == bad
    fresh = DecisionCache(isolated)
    assert set(fresh.entries()) == {info.key_id, other.key_id}  # a valid entry again


UNREADABLE = ["fifo", "directory", "mode_0200", "symlink", "other_owner"]


@pytest.mark.parametrize("case", UNREADABLE)
def test_an_unreadable_entry_is_a_miss_and_never_overwritten(case, isolated, tmp_path, caplog):
    q, k, v = qkv()
    info = da.explain(q, k, v)
    path = isolated / "v2" / f"{info.key_id}.json"
    text = path.read_text()
    path.unlink()
    if case == "fifo":
        os.mkfifo(path, 0o600)
    elif case == "directory":
        path.mkdir(mode=0o700)
    elif case == "mode_0200":
        path.write_text(text)
        os.chmod(path, 0o200)
    elif case == "symlink":
        target = tmp_path / "elsewhere.json"
        target.write_text(text)
        os.symlink(target, path)
    else:
        if os.getuid() != 0:
            pytest.skip("chown to another user needs root")
        path.write_text(text)
        os.chown(path, 12345, 12345)
    before = os.lstat(path)
    store.forget_memory()
    default_dispatcher().reset()
    done = {}
    t = threading.Thread(target=lambda: done.update(info=da.explain(q, k, v)), daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), "the call hung"
    assert done["info"].source == "tuned"
    da.attention_forward(q, k, v)
    assert da.stats()["tunings"] == 1 and da.stats()["hits"] == 1  # kept in memory
    after = os.lstat(path)
    assert (after.st_ino, stat.S_IFMT(after.st_mode), after.st_mtime_ns) == (before.st_ino, stat.S_IFMT(before.st_mode), before.st_mtime_ns)
    assert len(_warnings(caplog, "never overwritten")) == 1
    if case == "symlink":
        assert (tmp_path / "elsewhere.json").read_text() == text


def test_a_directory_or_symlink_in_place_of_locks_still_tunes(isolated, tmp_path, caplog):
    q, k, v = qkv()
    kid = da.explain(q, k, v).key_id
    (isolated / "v2" / f"{kid}.json").unlink()
    (isolated / "v2" / "locks" / f"{kid}.lock").mkdir()  # a directory in place of the lock file
    store.forget_memory()
    default_dispatcher().reset()
    assert da.explain(q, k, v).source == "tuned"
    assert len(_warnings(caplog, "tuning lock")) == 1
    assert (isolated / "v2" / f"{kid}.json").exists()
    # a symbolic link in place of locks/: not followed
    os.rmdir(isolated / "v2" / "locks" / f"{kid}.lock")
    os.rmdir(isolated / "v2" / "locks")
    target = tmp_path / "attacker-locks"
    target.mkdir()
    os.symlink(target, isolated / "v2" / "locks")
    q2, k2, v2 = qkv(sq=40)
    assert da.explain(q2, k2, v2).source == "tuned"
    assert os.listdir(target) == []
    assert len(_warnings(caplog, "tuning lock")) == 2


@pytest.mark.parametrize("why", ["group_writable", "symlink", "other_owner", "under_a_file", "v2_symlink", "v2_group_writable"])
def test_untrusted_or_unusable_places_keep_decisions_in_memory(why, isolated, tmp_path, monkeypatch, caplog):
    target = isolated
    if why == "group_writable":
        isolated.mkdir(mode=0o700)
        os.chmod(isolated, 0o770)
    elif why == "symlink":
        target = tmp_path / "real"
        target.mkdir(mode=0o700)
        os.symlink(target, isolated)
    elif why == "other_owner":
        if os.getuid() != 0:
            pytest.skip("chown to another user needs root")
        isolated.mkdir(mode=0o700)
        os.chown(isolated, 12345, 12345)
    elif why == "under_a_file":
        (tmp_path / "afile").write_text("x")
        target = tmp_path / "afile" / "sub"
        monkeypatch.setenv("DIFFSYNTH_ATTENTION_CACHE_DIR", str(target))
    elif why == "v2_symlink":
        isolated.mkdir(mode=0o700)
        (tmp_path / "real-v2").mkdir(mode=0o700)
        os.symlink(tmp_path / "real-v2", isolated / "v2")
    else:
        (isolated / "v2").mkdir(mode=0o700, parents=True)
        os.chmod(isolated / "v2", 0o775)
    q, k, v = qkv()
    da.explain(q, k, v)
    da.attention_forward(q, k, v)
    assert da.stats()["tunings"] == 1  # remembered in memory
    assert not store.persistent
    (warning,) = _warnings(caplog, "decisions stay in memory")
    fixes = {"group_writable": f"fix: chmod 700 {isolated}, or set DIFFSYNTH_ATTENTION_CACHE_DIR",
             "v2_group_writable": f"fix: chmod 700 {isolated / 'v2'}, or set DIFFSYNTH_ATTENTION_CACHE_DIR",
             "symlink": "fix: set DIFFSYNTH_ATTENTION_CACHE_DIR to a folder of your own, mode 700",
             "v2_symlink": "fix: set DIFFSYNTH_ATTENTION_CACHE_DIR to a folder of your own, mode 700",
             "other_owner": "fix: set DIFFSYNTH_ATTENTION_CACHE_DIR to a folder of your own, mode 700"}
    if why in fixes:  # the warning says what to do: chmod where only the mode is wrong, else another folder
        assert fixes[why] in warning.getMessage(), warning.getMessage()
    assert not list(tmp_path.rglob("*.json"))
    store.flush()
    assert len(_warnings(caplog, "1 decision(s) could not be written")) == 1  # never dropped silently


def test_untraversable_parent_keeps_decisions_in_memory(store_env, tmp_path, monkeypatch, caplog):
    parent = tmp_path / "locked"
    parent.mkdir()
    os.chmod(parent, 0)
    if os.getuid() == 0:  # root traverses anything: the kernel's answer to anyone else, simulated
        real = {name: getattr(os, name) for name in ("open", "mkdir", "stat", "lstat")}

        def deny(name):
            def fn(path, *a, **kw):
                if str(path).startswith(str(parent) + os.sep):
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
                return real[name](path, *a, **kw)
            return fn

        for name in real:
            monkeypatch.setattr(os, name, deny(name))
        c = DecisionCache(parent / "cache")
        d = make_decision(1)
        c.put(d)
        assert c.get(d.key_id) is d and not c.persistent
        assert len(_warnings(caplog, "decisions stay in memory")) == 1
        return
    code = PREAMBLE + r"""
import logging; logging.basicConfig(level=logging.WARNING)
c = DecisionCache(sys.argv[1])
d = make_decision(1)
c.put(d)
assert c.get(d.key_id) is d and not c.persistent
print("ok")
"""
    try:
        r = subprocess.run([sys.executable, "-c", code, str(parent / "cache")], env=store_env, capture_output=True, text=True, timeout=120)
    finally:
        os.chmod(parent, 0o700)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
    assert "decisions stay in memory" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOSPC, errno.EACCES, errno.EFBIG])
def test_a_disk_that_refuses_writes_keeps_decisions_in_memory_and_says_how_many(code, isolated, monkeypatch, caplog):
    def refuse(*a, **kw):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fs_mod, "open_temp", refuse)
    q, k, v = qkv()
    out = da.attention_forward(q, k, v)
    assert out.shape == q.shape
    for s in (20, 24):
        qq = torch.randn(1, 2, s, 8)
        da.attention_forward(qq, qq, qq)
    assert da.stats()["tunings"] == 3
    refused = _warnings(caplog, "cannot write")
    assert len(refused) == 1 and "1 not on disk" in refused[0].getMessage()
    da.attention_forward(q, k, v)
    assert da.stats()["hits"] == 1
    assert not store.flush()
    assert len(_warnings(caplog, "3 decision(s) could not be written")) == 1
    assert not _entries(isolated)


def test_efbig_for_real(store_env, isolated):
    code = PREAMBLE + r"""
import logging, resource
logging.basicConfig(level=logging.WARNING)
c = DecisionCache(sys.argv[1])
assert c.persistent
resource.setrlimit(resource.RLIMIT_FSIZE, (200, 200))   # an entry is bigger than this
ds = [make_decision(i) for i in range(3)]
for d in ds:
    c.put(d)
assert all(c.get(d.key_id) is d for d in ds) and not c.persistent
assert not c.flush()
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code, str(isolated)], env=store_env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
    assert r.stderr.count("cannot write") == 1 and "File too large" in r.stderr
    assert "3 decision(s) could not be written" in r.stderr
    assert not _entries(isolated) and not [n for n in os.listdir(isolated / "v2") if n.startswith(".tmp")]


def test_folder_swapped_after_load_is_not_obeyed(isolated, tmp_path, caplog):
    q, k, v = qkv()
    da.explain(q, k, v)
    q2, k2, v2 = qkv(sq=40)
    planted_kid = da.explain(q2, k2, v2).key_id
    planted = (isolated / "v2" / f"{planted_kid}.json").read_text().replace('"backend": "torch"', '"backend": "torch_math"')
    default_dispatcher().reset()
    store._entries.pop(planted_kid)
    os.rename(isolated, tmp_path / "moved")
    swapped = isolated / "v2"
    swapped.mkdir(parents=True, mode=0o700)
    (swapped / f"{planted_kid}.json").write_text(planted)
    os.chmod(isolated, 0o777)  # attacker-writable
    info = da.explain(q2, k2, v2)
    assert info.source == "tuned" and not store.persistent
    assert len(_warnings(caplog, "not trusted")) == 1
    assert not (swapped / "locks").exists()
    assert (swapped / f"{planted_kid}.json").read_text() == planted


@pytest.mark.parametrize("args", [{}, {"backend": "torch"}, {"key": make_decision(0).key_id[:6]}])
def test_cache_clear_on_a_disk_that_refuses_removals_fails(args, isolated, monkeypatch):
    import argparse

    from diffsynth_attention.tools.cli_cache import cmd_cache_clear
    from diffsynth_attention.tools.cli_common import Failure

    writer = DecisionCache(isolated)
    for i in range(2):
        writer.put(make_decision(i))
    real = os.unlink

    def read_only(name, *a, **kw):
        if str(name).endswith(".json"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real(name, *a, **kw)

    monkeypatch.setattr(os, "unlink", read_only)
    ns = argparse.Namespace(**{"backend": None, "gpu": None, "key": None, "yes": True, "compiled": False, **args})
    with pytest.raises(Failure, match="cannot be written"):
        cmd_cache_clear(ns)  # never "cleared 0 decision(s)", exit 0, with the entries still there
    assert len(_entries(isolated)) == 2
