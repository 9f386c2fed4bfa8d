"""Fresh-process runs shared by the tests of one module, run two at a time.

A test that needs a fresh interpreter (a first compile, a whole compiled model) spends most of its
time in that child. :func:`run_selected` runs the children the selected tests need, at most
``workers`` at once (each with its own cache folder), before the first of them; each test then
asserts on its own child's result. A child's exception is raised in the test that reads it."""
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent

# Cleared for every test and every child (conftest.isolated): a caller's setting must not leak in.
ENV = ("DIFFSYNTH_ATTENTION_IMPLEMENTATION", "DIFFSYNTH_ATTENTION_STRICT", "DIFFSYNTH_ATTENTION_TUNING",
       "DIFFSYNTH_ATTENTION_TOLERANCE", "DIFFSYNTH_ATTENTION_TUNE_WAIT",
       "DIFFSYNTH_ATTENTION_NEW_SHAPES", "DIFFSYNTH_FLASH_ATTN_KERNEL_REPO_ID", "DIFFSYNTH_FLASH_ATTN_KERNEL_VERSION")


def child_env(cache_dir) -> dict:
    """The environment of a child process: as a test's own (conftest's ``isolated`` and
    ``subprocess_env``), with ``cache_dir`` as its cache folder and the package first on its path."""
    env = {k: v for k, v in os.environ.items() if k not in ENV}
    env["DIFFSYNTH_ATTENTION_CACHE_DIR"] = str(cache_dir)
    env["DIFFSYNTH_ATTENTION_TUNING_BUDGET"] = "0.05"
    env.setdefault("DIFFSYNTH_ATTENTION_PRELOAD", "0")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return env


class Outcome:
    def __init__(self, value=None, error=None):
        self.value, self.error = value, error

    def get(self):
        if self.error is not None:
            raise self.error
        return self.value


def run_selected(request, key, jobs: dict, workers: int = 2) -> dict:
    """Run ``jobs[k]()`` for every key k that the selected tests of ``request``'s module use (``key``:
    an item -> its k), ``workers`` at a time; {k: Outcome}."""
    wanted = []
    for item in request.session.items:
        if item.module is request.module and hasattr(item, "callspec"):
            k = key(item)
            if k in jobs and k not in wanted:
                wanted.append(k)

    def one(k):
        try:
            return Outcome(jobs[k]())
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test that reads it
            return Outcome(error=exc)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(zip(wanted, pool.map(one, wanted)))
