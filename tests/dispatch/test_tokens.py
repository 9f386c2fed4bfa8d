"""How compiled graphs name a dispatcher (issue 30, item 2): tokens from a counter, never id()."""
import gc
import weakref

import pytest

from diffsynth_attention.dispatch import Dispatcher, default_dispatcher
from diffsynth_attention.dispatch.tokens import DispatcherGoneError, lookup_dispatcher
from diffsynth_attention.store.cache import DecisionCache


def test_a_collected_dispatchers_token_is_never_handed_to_a_new_one(tmp_path):
    """id() of a collected dispatcher is reused by the next one allocated in its memory (2 in 50
    in the issue; nearly every time here): a graph compiled against one store would read another's."""
    seen = set()
    for i in range(12):  # the memory is reused nearly every time: 12 find it (each gc.collect() costs ~0.4 s here)
        d = Dispatcher(DecisionCache(tmp_path / f"c{i}"))
        assert d.trace_token not in seen, i
        seen.add(d.trace_token)
        assert lookup_dispatcher(d.trace_token) is d
        gone = weakref.ref(d)
        del d
        gc.collect()
        assert gone() is None  # collected: its memory free for the next one
    assert default_dispatcher().trace_token == 0  # made first: the same token in every process


def test_a_graph_naming_a_collected_dispatcher_raises_instead_of_using_another(tmp_path):
    d = Dispatcher(DecisionCache(tmp_path / "c"))
    token = d.trace_token
    del d
    gc.collect()
    with pytest.raises(DispatcherGoneError, match="garbage-collected"):
        lookup_dispatcher(token)
