"""Fresh-process runs that the tests of a module share, started in the background.

A test that needs a fresh interpreter (a first compile, a whole compiled model) spends most of its
time waiting for that child, one CPU core busy while the other idles. A module registers its
children at import with :func:`prespawn` (one job per key; a test's key is read from its item).
When collection ends, ``conftest.py`` calls :func:`start`: the children that the *selected* tests
need run one at a time on a background thread, each with a cache folder of its own, while the
other tests run. A test then asserts on its own child's result (:func:`results`, waiting for it if
need be, and running the next queued children meanwhile); a child's exception is raised in the
test that reads it."""
import os
import shutil
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent

# Cleared for every test and every child (conftest.isolated): a caller's setting must not leak in.
ENV = ("DIFFSYNTH_ATTENTION_IMPLEMENTATION", "DIFFSYNTH_ATTENTION_STRICT", "DIFFSYNTH_ATTENTION_TUNING",
       "DIFFSYNTH_ATTENTION_TOLERANCE", "DIFFSYNTH_ATTENTION_TUNE_WAIT",
       "DIFFSYNTH_ATTENTION_LOAD_WAIT",
       "DIFFSYNTH_ATTENTION_NEW_SHAPES", "DIFFSYNTH_FLASH_ATTN_KERNEL_REPO_ID", "DIFFSYNTH_FLASH_ATTN_KERNEL_VERSION",
       "DIFFSYNTH_ATTENTION_QUALITY", "DIFFSYNTH_ATTENTION_SENTINEL_EVERY", "DIFFSYNTH_ATTENTION_RETIME",
       "DIFFSYNTH_ATTENTION_RECORD", "DIFFSYNTH_ATTENTION_THIN_CALLS")

_REGISTERED: dict = {}  # module name -> (key of an item, {key: job(env)})
_STARTED: dict = {}  # module name -> {key: Future}
_STATE = {"pool": None, "dirs": []}


def child_env(cache_dir) -> dict:
    """The environment of a child process: as a test's own (conftest's ``isolated`` and
    ``subprocess_env``), with ``cache_dir`` as its cache folder and the package first on its path."""
    env = {k: v for k, v in os.environ.items() if k not in ENV}
    env["DIFFSYNTH_ATTENTION_CACHE_DIR"] = str(cache_dir)
    env["DIFFSYNTH_ATTENTION_TUNING_BUDGET"] = "0.05"
    env.setdefault("DIFFSYNTH_ATTENTION_PRELOAD", "0")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return env


def prespawn(module: str, key, jobs: dict) -> None:
    """Register ``module``'s children: ``jobs[k](env)`` for each key k a selected test's item maps
    to through ``key`` (a list: each of its keys)."""
    _REGISTERED[module] = (key, jobs)


def _wanted(items) -> dict:
    wanted = {}
    for item in items:
        name = getattr(item.module, "__name__", None)
        if name in _REGISTERED:
            keys = _REGISTERED[name][0](item)
            for k in keys if isinstance(keys, list) else [keys]:  # a list: several children (a tuple is one key)
                if k in _REGISTERED[name][1] and k not in wanted.setdefault(name, []):
                    wanted[name].append(k)
    return wanted


def start(items, workers: int = 1) -> None:
    """Start the children the selected ``items`` need (conftest: when collection ends). The
    environments are built here, on the main thread, before any test changes ``os.environ``."""
    wanted = _wanted(items)
    if not wanted:
        return
    pool = _STATE["pool"] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="prespawn")
    for module, keys in wanted.items():
        for k in keys:
            folder = tempfile.mkdtemp(prefix="da-child-")
            _STATE["dirs"].append(folder)
            job = (_REGISTERED[module][1][k], child_env(os.path.join(folder, "cache")))
            _JOBS[module, k] = job
            _ORDER.append((module, k))
            _STARTED.setdefault(module, {})[k] = pool.submit(*job)


_JOBS: dict = {}  # (module, key) -> (job, env)
_ORDER: list = []  # (module, key), in the order they were queued (the order the tests need them)


def stop() -> None:
    """Cancel what has not started, wait for what has, remove the children's folders."""
    if _STATE["pool"] is not None:
        _STATE["pool"].shutdown(wait=True, cancel_futures=True)
    for folder in _STATE["dirs"]:
        shutil.rmtree(folder, ignore_errors=True)


def _inline(module, k) -> None:
    """Run a child that no worker has started, here (its future replaced by a finished one)."""
    job, env = _JOBS[module, k]
    f = Future()
    try:
        f.set_result(job(env))
    except BaseException as exc:  # noqa: BLE001 - raised in the test that reads it
        f.set_exception(exc)
    _STARTED[module][k] = f


class Outcome:
    """A child's result. While a test waits for its own child, the waiting thread runs the children
    queued next (the second core stays busy); a child not yet started is run by the test itself."""

    def __init__(self, module, k):
        self.module, self.k = module, k

    def get(self):
        if _STARTED[self.module][self.k].cancel():
            _inline(self.module, self.k)
        for other in _ORDER:
            if _STARTED[self.module][self.k].done():
                break
            if _STARTED[other[0]][other[1]].cancel():
                _inline(*other)
        return _STARTED[self.module][self.k].result()


def results(module: str) -> dict:
    """{key: Outcome} of ``module``'s children (run on this thread if nothing started them)."""
    if module not in _STARTED:
        class Lazy(dict):
            def __missing__(self, k):
                folder = tempfile.mkdtemp(prefix="da-child-")
                _STATE["dirs"].append(folder)
                _JOBS[module, k] = (_REGISTERED[module][1][k], child_env(os.path.join(folder, "cache")))
                _STARTED.setdefault(module, {})[k] = Future()
                _inline(module, k)
                self[k] = Outcome(module, k)
                return self[k]

        return Lazy()
    return {k: Outcome(module, k) for k in _STARTED[module]}


def python_c(code: str, timeout: float = 300, **extra_env):
    """A job: ``python -c code`` in the child environment (plus ``extra_env``); its CompletedProcess."""
    import subprocess
    import sys

    def job(env):
        return subprocess.run([sys.executable, "-c", code], env={**env, **extra_env}, capture_output=True, text=True,
                              timeout=timeout)

    return job


def by_name(item) -> str:
    """The key of a test that is not parametrized: its name."""
    return item.name
