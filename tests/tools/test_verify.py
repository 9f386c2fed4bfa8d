"""`cache verify` (issue 29): stored decisions re-timed against the default and the runner-up; the
ones that no longer hold are listed, and --fix tunes them again; `cache clear --key` removes one."""
import json
import subprocess
import sys

import torch

import diffsynth_attention as da
from diffsynth_attention.store.cache import DecisionCache
from diffsynth_attention.tools.verify import verify

from support.helpers import qkv
from support.store_helpers import decided_for
from support.virtual import VirtualClock, only, virtual_policy


def test_a_decision_that_no_longer_holds_is_listed_and_fixed(isolated, monkeypatch):
    clock = VirtualClock()
    made = only(monkeypatch, clock, torch={"cost": 1.0}, torch_math={"cost": 3.0})
    disp = da.Dispatcher(DecisionCache(isolated), policy=virtual_policy(clock))
    q, k, v = qkv(sq=16)
    good = disp.explain(q, k, v).decision
    assert good.backend == "torch"
    rows = verify(disp, [good], torch.device("cpu"), clock=clock.perf_counter)
    assert rows[0]["holds"] is True and rows[0]["verdict"] == "holds" and set(rows[0]["times"]) == {"torch", "torch_math"}

    stale = decided_for(good, "torch_math")  # stored when torch_math looked faster (a loaded host, say)
    disp.store.put(stale)
    rows = verify(disp, [stale], torch.device("cpu"), clock=clock.perf_counter)
    assert rows[0]["holds"] is False and "torch 3.00x faster" in rows[0]["verdict"], rows
    assert disp.store.get(good.key_id, tolerance=1.0).backend == "torch_math"  # listed, not changed
    rows = verify(disp, [stale], torch.device("cpu"), fix=True, clock=clock.perf_counter)
    assert rows[0]["fixed"] == "torch" and DecisionCache(isolated).get(good.key_id, tolerance=1.0).backend == "torch"
    assert made["torch"].calls > 0


def test_verify_skips_what_it_cannot_rebuild_here(isolated):
    q, k, v = qkv(sq=16)
    disp = da.Dispatcher(DecisionCache(isolated))
    d = disp.explain(q, k, v).decision
    elsewhere = d.replace(key={**d.key, "device": {"type": "cuda", "name": "NVIDIA H200"}})
    masked = d.replace(key={**d.key, "problem": {**d.key["problem"], "mask": "bool"}})
    rows = verify(disp, [elsewhere, masked], torch.device("cpu"))
    assert rows[0]["verdict"].startswith("skipped: tuned on NVIDIA H200") and rows[0]["holds"] is None
    assert rows[1]["verdict"].startswith("skipped: masked") and rows[1]["holds"] is None


def test_every_verify_row_names_its_problem_as_cache_show_does(isolated):
    """A skipped row had no problem text (`<key id> : torch: skipped: ...`), and a re-timed one
    'BxNxSQxSKV dD dtype', the same text for a windowed, causal or gradient-needing problem as for
    the plain one: rows of a recording's problems could not be told apart."""
    from diffsynth_attention.tools.cli_cache import entry_row

    q, k, v = qkv(sq=16)
    disp = da.Dispatcher(DecisionCache(isolated))
    plain = disp.explain(q, k, v).decision
    windowed = disp.explain(q, k, v, window_size=2).decision
    masked = plain.replace(key={**plain.key, "problem": {**plain.key["problem"], "mask": "bool"}})
    rows = verify(disp, [plain, windowed, masked], torch.device("cpu"), samples=3)
    texts = [r["problem"] for r in rows]
    assert texts == [entry_row(d.key_id, d.to_dict())["problem"] for d in (plain, windowed, masked)]
    assert "window=2" in texts[1] and "bool mask" in texts[2] and rows[2]["verdict"].startswith("skipped")


def test_cache_clear_key_removes_one_decision_and_verify_names_a_bad_key(isolated, subprocess_env):
    disp = da.Dispatcher(DecisionCache(isolated))
    ids = [disp.explain(*qkv(sq=s)).key_id for s in (16, 24)]
    disp.store.flush()
    env = dict(subprocess_env, DIFFSYNTH_ATTENTION_CACHE_DIR=str(isolated))
    cli = [sys.executable, "-m", "diffsynth_attention"]
    r = subprocess.run(cli + ["cache", "clear", "--key", ids[0][:8], "--yes"], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and "cleared 1 decision" in r.stdout, r.stderr
    assert set(DecisionCache(isolated).entries()) == {ids[1]}
    r = subprocess.run(cli + ["cache", "verify", "--key", "xyz"], env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "--key" in r.stderr and "not a key id" in r.stderr
    r = subprocess.run(cli + ["cache", "verify", "--key", ids[1][:10], "--json"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(r.stdout)
    assert row["key_id"] == ids[1] and row["holds"] in (True, False) and "1 decision(s) verified" in r.stderr


def test_a_decision_whose_backend_cannot_run_here_does_not_hold(isolated, monkeypatch):
    clock = VirtualClock()
    only(monkeypatch, clock, torch={"cost": 1.0}, torch_math={"cost": 3.0})  # every other backend is unavailable
    disp = da.Dispatcher(DecisionCache(isolated), policy=virtual_policy(clock))
    q, k, v = qkv(sq=16)
    good = disp.explain(q, k, v).decision
    gone = decided_for(good, "xformers", time_ms=0.5, error=0.0, reps=3)  # tuned where xformers was installed
    disp.store.put(gone)
    rows = verify(disp, [gone], torch.device("cpu"), clock=clock.perf_counter)
    assert rows[0]["holds"] is False and "xformers cannot" in rows[0]["verdict"], rows  # never timed as torch under its name
    rows = verify(disp, [gone], torch.device("cpu"), fix=True, clock=clock.perf_counter)
    assert rows[0]["fixed"] == "torch" and DecisionCache(isolated).get(good.key_id, tolerance=1.0).backend == "torch"


def test_a_key_prefix_of_several_decisions_is_refused(isolated, capsys):
    """`cache clear --key K` removes one problem and `cache verify --key K` verifies one: a prefix
    that starts several key ids is a usage error (it cleared, or fixed, every one of them)."""
    from diffsynth_attention.tools.cli import main

    from diffsynth_attention.store.key import key_id

    store = DecisionCache(isolated)
    d = da.Dispatcher(store).explain(*qkv(sq=16)).decision
    seen, twins = {}, None
    for n in range(17, 100000):  # two problems whose key ids start with the same 6 hex digits
        key = {**d.key, "problem": {**d.key["problem"], "seq_q": n, "seq_kv": n}}
        twin = seen.setdefault(key_id(key)[:6], key)
        if twin is not key:
            twins = [twin, key]
            break
    ids = [key_id(key) for key in twins]
    for key in twins:
        store.put(d.replace(key=key, key_id=key_id(key)))
    store.flush()
    assert main(["cache", "clear", "--key", ids[0][:6], "--yes"]) == 2
    assert "start of 2 key ids" in capsys.readouterr().err
    assert main(["cache", "verify", "--key", ids[0][:5], "--json"]) == 2
    assert set(ids) <= set(DecisionCache(isolated).entries())
    assert main(["cache", "clear", "--key", ids[0], "--yes"]) == 0
    assert set(DecisionCache(isolated).entries()) == {d.key_id, ids[1]}
