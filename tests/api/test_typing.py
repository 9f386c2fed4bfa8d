"""Type hints on the public API, and ``py.typed`` in the built package (PEP 561)."""

import inspect
import shutil
import subprocess
import sys
import typing
import zipfile
from pathlib import Path

import pytest

import diffsynth_attention as da
from diffsynth_attention.dispatch import Dispatcher

ROOT = Path(__file__).resolve().parents[2]


def _public_functions():
    for name in da.__all__:
        obj = getattr(da, name)
        if inspect.ismethod(obj):  # a bound method of the default dispatcher (explain)
            yield name, obj.__func__
        elif inspect.isfunction(obj) or (callable(obj) and not inspect.isclass(obj) and hasattr(obj, "__wrapped__")):
            yield name, getattr(obj, "__wrapped__", obj)
    yield "Dispatcher.explain", Dispatcher.explain
    yield "Dispatcher.clear_cache", Dispatcher.clear_cache
    yield "Dispatcher.stats", Dispatcher.stats


@pytest.mark.parametrize("name,func", list(_public_functions()), ids=[n for n, _ in _public_functions()])
def test_public_functions_are_fully_annotated(name, func):
    hints = typing.get_type_hints(func)  # every annotation resolves
    params = [p for p in inspect.signature(func).parameters.values() if p.name != "self"]
    missing = [p.name for p in params if p.name not in hints]
    assert not missing, f"{name}: parameters without a type hint: {missing}"
    assert "return" in hints, f"{name}: no return type"


def test_every_public_function_is_checked():
    names = {n for n, _ in _public_functions()}
    assert {"attention_forward", "explain", "use_backend", "current_implementation", "available_backends",
            "clear_cache", "stats", "patch_sdpa", "patch_diffsynth", "sync_decisions", "cache_dir"} <= names


def test_wheel_ships_py_typed(tmp_path):
    assert (ROOT / "diffsynth_attention" / "py.typed").is_file()
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "diffsynth_attention", src / "diffsynth_attention",
                    ignore=shutil.ignore_patterns("__pycache__"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    if r.returncode != 0 and "No module named" in r.stderr:
        pytest.skip(f"cannot build a wheel here: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0, r.stderr
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "diffsynth_attention/py.typed" in names
    assert "diffsynth_attention/data/decisions.schema.json" in names
