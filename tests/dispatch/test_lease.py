"""The dispatcher tunes a new key through DecisionCache.get_or_tune (get -> lease -> read
again -> tune -> put). Another process is a second DecisionCache over the same folder: its lease
is the same flock, taken through another open file."""
import dataclasses
import logging
import threading
import time

import pytest

from diffsynth_attention import config
from diffsynth_attention.dispatch import Dispatcher
from diffsynth_attention.store.cache import DecisionCache
from diffsynth_attention.store.leases import Outcome, TuneResult
from diffsynth_attention.tuning.policy import DEFAULT_POLICY

from support.helpers import qkv
from support.store_helpers import make_decision


@pytest.fixture
def decided(tmp_path):
    """(q, k, v, the decision a scout dispatcher tuned for them): what "another process" stores."""
    q, k, v = qkv(sq=24)
    info = Dispatcher(DecisionCache(tmp_path / "scout")).explain(q, k, v)
    return q, k, v, info.decision


def _served_while_held(isolated, q, k, v, kid, stored=None, hold=False):
    """Explain (q, k, v) on a dispatcher of its own while another process holds the key's lease;
    that process stores ``stored`` (if any) once the call waits on the lease, then releases it
    (``hold``: only after the call returned)."""
    mine, other = Dispatcher(DecisionCache(isolated)), DecisionCache(isolated)
    taken, go, waiting, result = threading.Event(), threading.Event(), threading.Event(), {}

    def holder():
        with other.tuning_lock(kid) as held:
            assert held
            taken.set()
            go.wait(60)
            if stored is not None:
                other.put(stored)

    real_lock = mine.store.tuning_lock

    def tuning_lock(key_id):  # the call read the key and missed: now it waits on the lease
        waiting.set()
        return real_lock(key_id)

    mine.store.tuning_lock = tuning_lock
    t = threading.Thread(target=holder)
    t.start()
    assert taken.wait(60)
    caller = threading.Thread(target=lambda: result.update(info=mine.explain(q, k, v)))
    caller.start()
    assert waiting.wait(60)
    time.sleep(0.3)  # in the wait for the flock
    if hold:
        caller.join(120)
    go.set()
    t.join(60)
    caller.join(120)
    return result["info"], mine


def test_a_call_waiting_on_the_lease_serves_the_other_process_decision_without_tuning(isolated, decided):
    q, k, v, decision = decided
    info, mine = _served_while_held(isolated, q, k, v, decision.key_id, decision)
    assert info.source == "cache" and info.backend == decision.backend  # the re-read under the lease found it
    assert info.decision.created == decision.created
    assert mine.stats()["tunings"] == 0


def test_the_re_read_under_the_lease_uses_the_problem_tolerance_in_force(isolated, decided):
    q, k, v, decision = decided
    in_force = DEFAULT_POLICY.tolerance("float32")
    loose = 10 * in_force
    assert loose < config.tolerance()  # passes the global default, not this fp32 problem's tolerance
    chosen = dataclasses.replace(decision.candidates[decision.backend], error=loose)
    decision = decision.replace(candidates={**decision.candidates, decision.backend: chosen}, tolerance=config.tolerance())
    info, mine = _served_while_held(isolated, q, k, v, decision.key_id, decision)
    assert info.source == "tuned" and mine.stats()["tunings"] == 1  # gated again, not served
    again = DecisionCache(isolated).get(info.key_id, tolerance=in_force)
    assert again is not None and again.tolerance == in_force


def test_a_lease_waited_out_tunes_without_it(isolated, decided, monkeypatch, caplog):
    monkeypatch.setenv("DIFFSYNTH_ATTENTION_TUNE_WAIT", "0.2")
    q, k, v, decision = decided
    t0 = time.monotonic()
    info, mine = _served_while_held(isolated, q, k, v, decision.key_id, hold=True)
    assert info.source == "tuned" and mine.stats()["tunings"] == 1
    assert time.monotonic() - t0 < 60
    assert [r for r in caplog.records if r.levelno == logging.WARNING and "DIFFSYNTH_ATTENTION_TUNE_WAIT" in r.getMessage()]


def test_two_processes_asking_for_one_new_key_tune_it_once(isolated):
    q, k, v = qkv(sq=24)
    dispatchers = [Dispatcher(DecisionCache(isolated)) for _ in range(2)]
    start, infos = threading.Barrier(2), {}

    def ask(i):
        start.wait(60)
        infos[i] = dispatchers[i].explain(q, k, v)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sum(d.stats()["tunings"] for d in dispatchers) == 1
    assert sorted(info.source for info in infos.values()) == ["cache", "tuned"]
    assert infos[0].backend == infos[1].backend


def test_get_or_tune_says_where_its_decision_came_from(isolated):
    c, other = DecisionCache(isolated), DecisionCache(isolated)
    d, e = make_decision(1), make_decision(2)
    first = c.get_or_tune(d.key_id, lambda: d)
    assert isinstance(first, TuneResult) and first.outcome is Outcome.TUNED and first.tuned and first.lease
    assert tuple(c.get_or_tune(d.key_id, lambda: pytest.fail("tuned a known key"))) == (d, False)
    assert c.get_or_tune(d.key_id, lambda: pytest.fail("tuned")).outcome is Outcome.FOUND
    other.put(e)  # another process decides it after this one's read
    reread = c.get_or_tune(e.key_id, lambda: pytest.fail("tuned"), read_first=False)
    assert reread.outcome is Outcome.REREAD and reread.decision.key_id == e.key_id
    retuned = c.get_or_tune(d.key_id, lambda: make_decision(1, "torch_math"), accept=lambda x: x.backend != "torch")
    assert retuned.outcome is Outcome.TUNED and c.get(d.key_id).backend == "torch_math"
    nothing = c.get_or_tune(make_decision(3).key_id, lambda: None)
    assert nothing.outcome is Outcome.NOT_STORED and nothing.tuned and nothing.decision is None
