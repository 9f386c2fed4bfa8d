"""Fuzzed cache entries: no cache entry, whatever its bytes or JSON structure, makes a call raise, hang, or
use a decision that fails validation."""
import json
import signal
from contextlib import contextmanager

import jsonschema
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import diffsynth_attention as da
from diffsynth_attention.dispatch import default_dispatcher
from diffsynth_attention.store import cache as cache_mod
from diffsynth_attention.store import codec
from diffsynth_attention.store.cache import DecisionCache
from diffsynth_attention.store.decision import key_id

from support.helpers import qkv
from support.store_helpers import make_decision

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)


@contextmanager
def no_hang(seconds=20):
    def boom(*_):
        raise TimeoutError("the call hung")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


_SCHEMA = json.loads(codec.SCHEMA_FILE.read_text())
_ENTRY = jsonschema.Draft202012Validator({"$schema": _SCHEMA["$schema"], "$defs": _SCHEMA["$defs"], "$ref": "#/$defs/entry"})


def _valid_entry(d):
    """Checked here independently of the store's own validation: schema, id = hash of the key, no NaN."""
    entry = d.to_dict()
    json.dumps(entry, allow_nan=False)
    _ENTRY.validate(entry)
    assert key_id(entry["key"]) == d.key_id


def _check_read(folder, kid, data: bytes):
    (folder / "v2").mkdir(parents=True, exist_ok=True, mode=0o700)
    (folder / "v2" / f"{kid}.json").write_bytes(data)
    c = DecisionCache(folder)
    with no_hang():
        got = c.get(kid)
        c.entries()
    if got is not None:
        assert got.key_id == kid
        _valid_entry(got)


def _mutate(doc, path, value):
    node = doc
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value


def _paths(doc, prefix=()):
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, prefix + (k,))


GOOD = make_decision(11)
GOOD_DOC = json.loads(cache_mod.render_entry(GOOD))
PATHS = [p for p in _paths(GOOD_DOC) if p]


@FUZZ
@given(data=st.binary(max_size=2048))
def test_arbitrary_bytes(tmp_path_factory, data):
    _check_read(tmp_path_factory.mktemp("c"), GOOD.key_id, data)


@FUZZ
@given(cut=st.integers(min_value=0, max_value=4000), flip=st.integers(min_value=0, max_value=4000), byte=st.integers(0, 255))
def test_corrupted_valid_entries(tmp_path_factory, cut, flip, byte):
    data = bytearray(cache_mod.render_entry(GOOD).encode())
    if flip < len(data):
        data[flip] = byte
    _check_read(tmp_path_factory.mktemp("c"), GOOD.key_id, bytes(data[: max(cut, 1)] if cut < len(data) else data))


@FUZZ
@given(where=st.sampled_from(PATHS), value=json_values)
def test_json_structure(tmp_path_factory, where, value):
    doc = json.loads(json.dumps(GOOD_DOC))
    _mutate(doc, where, value)
    _check_read(tmp_path_factory.mktemp("c"), GOOD.key_id, json.dumps(doc).encode())


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(where=st.sampled_from(PATHS), value=json_values)
def test_calls_never_raise_on_a_fuzzed_entry(isolated, where, value):
    q, k, v = qkv(sq=12, d=8, hq=2, b=1)
    store = default_dispatcher().store
    info = da.explain(q, k, v)
    doc = json.loads(cache_mod.render_entry(info.decision))
    _mutate(doc, where, value)
    (isolated / "v2" / f"{info.key_id}.json").write_text(json.dumps(doc))
    store.forget_memory()
    default_dispatcher().reset()
    with no_hang(60):
        again = da.explain(q, k, v)
        da.attention_forward(q, k, v)
    _valid_entry(again.decision)
