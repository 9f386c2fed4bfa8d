"""Environment variables, validated like a call's arguments: checked up front, strictly, with the
variable, the value and what is allowed; an empty value means the default."""
import os

import pytest

from diffsynth_attention import config
from diffsynth_attention.backend_names import BACKEND_NAMES

from support.subprocesses import prespawn, python_c, results

BAD = [
    ("DIFFSYNTH_ATTENTION_TOLERANCE", "abc", "not a number"),
    ("DIFFSYNTH_ATTENTION_TOLERANCE", "1e-300", "out of range"),
    ("DIFFSYNTH_ATTENTION_TUNING", "maybe", "not a boolean"),
    ("DIFFSYNTH_ATTENTION_TUNING_BUDGET", "-1", "out of range"),
    ("DIFFSYNTH_ATTENTION_TUNING_BUDGET", "1e308", "out of range"),
    ("DIFFSYNTH_ATTENTION_TUNING_BUDGET", "nan", "out of range"),
    ("DIFFSYNTH_ATTENTION_TUNE_WAIT", "abc", "not a number"),
    ("DIFFSYNTH_ATTENTION_TUNE_WAIT", "inf", "out of range"),
    ("DIFFSYNTH_ATTENTION_LOAD_WAIT", "soon", "not a number"),
    ("DIFFSYNTH_ATTENTION_LOAD_WAIT", "-1", "out of range"),
    ("DIFFSYNTH_ATTENTION_STRICT", "2", "not a boolean"),
    ("DIFFSYNTH_ATTENTION_IMPLEMENTATION", "flash9", "not a backend"),
]


@pytest.mark.parametrize("name,value,text", BAD)
def test_validate_all_names_variable_value_and_what_is_allowed(monkeypatch, name, value, text):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError) as info:
        config.validate_all()
    message = str(info.value)
    assert f"{name}={value!r}" in message and text in message and "allowed" in message


FACE = "import torch, diffsynth_attention as da\nda.attention_forward\nprint('imported', flush=True)\n" \
       "da.attention_forward(*[torch.randn(1, 2, 8, 8)] * 3)\n"


def test_a_bad_value_stops_the_program_at_its_first_call_not_at_import(children):
    r = children["bad budget"].get()
    assert r.stdout == "imported\n"  # loading the public functions does not raise (issue 33: no side effect at import)
    assert r.returncode != 0 and "ValueError: DIFFSYNTH_ATTENTION_TUNING_BUDGET='1e308'" in r.stderr
    r = children["good budget"].get()
    assert r.returncode == 0, r.stderr


def test_empty_values_mean_the_default(monkeypatch):
    for name in config.READERS:
        monkeypatch.setenv(name, "")
    values = config.validate_all()
    assert values[config.TUNING] is True and values[config.IMPLEMENTATION] == "auto"
    assert values[config.TOLERANCE] == config.DEFAULT_TOLERANCE and values[config.CACHE_DIR] is None
    assert all(source == "default" for _, _, source in config.describe())


def test_empty_implementation_means_auto_on_every_call(monkeypatch):
    import diffsynth_attention as da
    from support.helpers import qkv

    monkeypatch.setenv("DIFFSYNTH_ATTENTION_IMPLEMENTATION", "")
    q, k, v = qkv()
    da.attention_forward(q, k, v)
    assert da.explain(q, k, v).source in ("tuned", "cache") and da.current_implementation() == "auto"


def test_relative_cache_dir_is_made_absolute_once(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DIFFSYNTH_ATTENTION_CACHE_DIR", "rel-cache")
    first = config.cache_dir_override()
    assert os.path.isabs(first) and first == str(tmp_path / "rel-cache")
    monkeypatch.chdir(tmp_path.parent)
    assert config.cache_dir_override() == first  # a later chdir does not move the cache
    from diffsynth_attention.store.cache import cache_dir

    assert str(cache_dir()) == first


def test_backend_names_without_torch_match_the_registry():
    # REGISTRY is keyed by BACKEND_NAMES: what can differ is the name each backend object gives
    # itself (its decisions, reasons and `backends` rows) and the schema's list of backends
    from diffsynth_attention.backends import REGISTRY
    from diffsynth_attention.store import codec

    assert [backend.name for backend in REGISTRY.values()] == list(BACKEND_NAMES)
    assert codec.schema()["$defs"]["backend"]["enum"] == list(BACKEND_NAMES)


LAZY_FACE = ("import sys, diffsynth_attention as da\n"
             "assert 'torch' not in sys.modules\n"
             "for name in da.__all__:\n    getattr(da, name)\n"
             "from diffsynth_attention import attention_forward, patch_diffsynth, DecisionCache\n"
             "assert da.attention_forward is attention_forward and 'torch' in sys.modules\n"
             "assert set(da.__all__) <= set(dir(da))\n")


def test_the_package_face_is_lazy_and_complete(children):
    r = children["lazy face"].get()
    assert r.returncode == 0, r.stderr


def test_patching_checks_the_environment_first(monkeypatch):
    import diffsynth_attention as da

    monkeypatch.setenv("DIFFSYNTH_ATTENTION_TOLERANCE", "abc")
    with pytest.raises(ValueError, match="DIFFSYNTH_ATTENTION_TOLERANCE='abc'"):
        da.patch_sdpa()
    with pytest.raises(ValueError, match="DIFFSYNTH_ATTENTION_TOLERANCE='abc'"):
        da.patch_diffsynth()


# Fresh processes with a cache folder each, started in the background when collection ends.
_USES = {"test_a_bad_value_stops_the_program_at_its_first_call_not_at_import": ("bad budget", "good budget"),
         "test_the_package_face_is_lazy_and_complete": ("lazy face",)}
prespawn(__name__, lambda item: list(_USES.get(item.name, ())), {
    "bad budget": python_c(FACE, timeout=120, DIFFSYNTH_ATTENTION_TUNING_BUDGET="1e308"),
    "good budget": python_c(FACE, timeout=120),
    "lazy face": python_c(LAZY_FACE, timeout=120),
})


@pytest.fixture(scope="module")
def children():
    return results(__name__)
