import logging
import os

import pytest

# No background preload of kernel packages in the test process (it would read the user's cache);
# tests/test_loading.py turns it on in its own subprocesses.
os.environ.setdefault("DIFFSYNTH_ATTENTION_PRELOAD", "0")

from diffsynth_attention.dispatch import Dispatcher, default_dispatcher  # noqa: E402
from diffsynth_attention.store.cache import DecisionCache  # noqa: E402

from support import subprocesses  # noqa: E402  (tests/ is on sys.path: this file's folder)
from support.subprocesses import ENV  # noqa: E402


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Every test gets its own cache folder and a clean environment. The default dispatcher
    (behind the public functions) follows DIFFSYNTH_ATTENTION_CACHE_DIR to the new folder and is
    reset through its public ``reset()``; tests of the dispatcher itself use ``disp``."""
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    cache = tmp_path / "cache"
    monkeypatch.setenv("DIFFSYNTH_ATTENTION_CACHE_DIR", str(cache))
    monkeypatch.setenv("DIFFSYNTH_ATTENTION_TUNING_BUDGET", "0.05")
    # a decision tuned here may be provisional (a loaded machine); whether a later dispatcher
    # re-times it would then depend on the load average: only tests that ask for it re-time
    monkeypatch.setenv("DIFFSYNTH_ATTENTION_RETIME", "off")
    default = default_dispatcher()
    default.store.forget_memory()
    default.reset()
    logging.getLogger("diffsynth_attention").setLevel(logging.INFO)
    yield cache
    default.store.forget_memory()
    default.reset()


@pytest.fixture
def disp(tmp_path):
    """A dispatcher of the test's own, over a cache folder of its own."""
    return Dispatcher(DecisionCache(tmp_path / "own-cache"))


@pytest.fixture
def subprocess_env(isolated):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(os.path.dirname(__file__)), env.get("PYTHONPATH")]))
    return env


def pytest_collection_finish(session):
    """Start, in the background, the fresh processes that the selected tests share (one at a time:
    the other core runs the tests meanwhile). None for a run that runs no test (--collect-only,
    --setup-plan): nothing would read them, and the session would wait for the one under way."""
    if session.config.option.collectonly or getattr(session.config.option, "setupplan", False):
        return
    subprocesses.start(session.items)


def pytest_sessionfinish(session):
    subprocesses.stop()
