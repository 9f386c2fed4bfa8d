"""Each execution mode serves its own pick of one decision (issue 29): a compiled graph bakes the
decision's compiled backend, eager calls its eager one; a provisional decision is re-timed once by
a later process at a quiet moment, and served as it is otherwise."""
import torch

import diffsynth_attention as da
from diffsynth_attention.store.cache import DecisionCache
from diffsynth_attention.tuning.policy import TuningPolicy

from support.compile_helpers import Recorder, fresh_dynamo, requires_bake  # noqa: F401  (an autouse fixture)
from support.helpers import full_reference, qkv, rel


def test_a_compiled_graph_bakes_the_backend_its_mode_picked(isolated):
    requires_bake()
    q, k, v = qkv(sq=24)
    disp = da.Dispatcher(DecisionCache(isolated))
    eager = disp.explain(q, k, v)
    other = "torch_math" if eager.backend != "torch_math" else "torch"
    disp.store.put(eager.decision.replace(modes={"compiled": other}))  # as if host + device time picked it
    assert disp.explain(q, k, v).backend == eager.backend  # eager calls keep the eager choice

    out = torch.compile(lambda a, b, c: disp.forward(a, b, c), backend=Recorder(), fullgraph=True)(q, k, v)
    assert rel(out, full_reference(q, k, v)) < 1e-4
    traced = [p for sig, p in disp.plans.items() if sig and sig[0] == "compiled"]
    assert [p.backend for p in traced] == [other]
    assert disp.explain(q, k, v).backend == eager.backend  # the traced plan did not replace the eager one


def _provisional(folder, q, k, v):
    disp = da.Dispatcher(DecisionCache(folder))
    decision = disp.explain(q, k, v).decision
    disp.store.put(decision.replace(provisional=True, confirmation="too noisy"))
    disp.store.flush()
    return decision.key_id


def test_a_provisional_decision_is_re_timed_once_by_a_later_process_on_a_quiet_host(isolated, monkeypatch):
    q, k, v = qkv(sq=20)
    key_id = _provisional(isolated, q, k, v)
    off = da.Dispatcher(DecisionCache(isolated), policy=TuningPolicy(quiet=lambda: True))
    assert off.explain(q, k, v).source == "cache" and off.stats()["tunings"] == 0  # DIFFSYNTH_ATTENTION_RETIME=off
    monkeypatch.setenv("DIFFSYNTH_ATTENTION_RETIME", "on")
    busy = da.Dispatcher(DecisionCache(isolated), policy=TuningPolicy(quiet=lambda: False))
    assert busy.explain(q, k, v).source == "cache" and busy.stats()["tunings"] == 0  # served as it is

    quiet = da.Dispatcher(DecisionCache(isolated), policy=TuningPolicy(quiet=lambda: True))
    info = quiet.explain(q, k, v)
    assert info.source == "tuned" and quiet.stats()["tunings"] == 1
    assert DecisionCache(isolated).get(key_id, tolerance=1.0).confirmation != "too noisy"  # replaced on disk
    quiet.store.put(info.decision.replace(provisional=True))  # provisional again: not re-timed twice in one process
    assert quiet.explain(q, k, v).source == "cache" and quiet.stats()["tunings"] == 1


def test_a_provisional_decision_waits_for_background_loads_before_its_re_time(isolated, monkeypatch):
    # a package loading now would skew the re-time as it skewed the tuning: served as it is until none loads
    q, k, v = qkv(sq=21)
    _provisional(isolated, q, k, v)
    monkeypatch.setenv("DIFFSYNTH_ATTENTION_RETIME", "on")
    loading = da.Dispatcher(DecisionCache(isolated), policy=TuningPolicy(quiet=lambda: True,
                                                                        loading=lambda: ("flash_attention_4",)))
    assert loading.explain(q, k, v).source == "cache" and loading.stats()["tunings"] == 0
    done = da.Dispatcher(DecisionCache(isolated), policy=TuningPolicy(quiet=lambda: True, loading=lambda: ()))
    assert done.explain(q, k, v).source == "tuned" and done.stats()["tunings"] == 1


def test_a_provisional_decision_served_while_a_package_loads_is_re_timed_once_the_load_ends(isolated, monkeypatch):
    """The first call found a package loading (a preload at import, the usual case on a GPU host): it
    was served from the cache and its plan kept for the whole process, so the re-time that was to
    wait for the load never came. The load's end now re-plans the provisional decision's calls."""
    from diffsynth_attention.backends import loading

    q, k, v = qkv(sq=22)
    _provisional(isolated, q, k, v)
    monkeypatch.setenv("DIFFSYNTH_ATTENTION_RETIME", "on")
    busy = ["flash_attention_4"]
    disp = da.Dispatcher(DecisionCache(isolated), policy=TuningPolicy(quiet=lambda: True, loading=lambda: tuple(busy)))
    assert disp.explain(q, k, v).source == "cache" and disp.stats()["tunings"] == 0
    busy.clear()
    loading._notify("flash_attention_4", loading.READY)  # what the loading thread does last
    assert disp.explain(q, k, v).source == "tuned" and disp.stats()["tunings"] == 1
    assert disp.explain(q, k, v).source == "cache" and disp.stats()["tunings"] == 1  # once a process
