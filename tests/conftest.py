import logging
import os

import pytest

import diffsynth_attention.dispatch as dispatch

ENV = ("DIFFSYNTH_ATTENTION_IMPLEMENTATION", "DIFFSYNTH_ATTENTION_STRICT", "DIFFSYNTH_ATTENTION_TUNING",
       "DIFFSYNTH_ATTENTION_TOLERANCE", "DIFFSYNTH_ATTENTION_LOCK_TIMEOUT", "DIFFSYNTH_ATTENTION_TUNE_WAIT")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Every test gets its own cache folder, a clean environment and fresh process state."""
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    cache = tmp_path / "cache"
    monkeypatch.setenv("DIFFSYNTH_ATTENTION_CACHE_DIR", str(cache))
    monkeypatch.setenv("DIFFSYNTH_ATTENTION_TUNING_BUDGET", "0.05")
    dispatch.store.forget_memory()
    dispatch.reset_stats()
    dispatch._warned.clear()
    dispatch._invalidate_plans()
    logging.getLogger("diffsynth_attention").setLevel(logging.INFO)
    yield cache
    dispatch.store.forget_memory()
    dispatch._invalidate_plans()


@pytest.fixture
def subprocess_env(isolated):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(os.path.dirname(__file__)), env.get("PYTHONPATH")]))
    return env
