"""Kernel packages are imported only when used: FlashAttention-4's compile cache is set up before
its import, a cached decision imports no package it does not use, the key's versions come from
package metadata, and a broken install is found at first use."""
import os
import sys

import pytest
import torch

import diffsynth_attention as da
from diffsynth_attention.backends import REGISTRY, candidates, loading, clear_compiled, device_info, fa4_compile_dir, flash_attention
from diffsynth_attention.backends.flash_attention import FA4_CACHE_DIR, FA4_CACHE_ENABLED, FlashAttention3, FlashAttention4
from diffsynth_attention.dispatch import Dispatcher
from diffsynth_attention.problem import prepare
from diffsynth_attention.store.cache import DecisionCache
from diffsynth_attention.store.key import make_key

from support.helpers import full_reference, qkv, rel
from support.store_helpers import decided_for


@pytest.fixture
def fa_env():
    saved = {n: os.environ.get(n) for n in (FA4_CACHE_ENABLED, FA4_CACHE_DIR)}
    for n in saved:
        os.environ.pop(n, None)
    yield
    for n, value in saved.items():
        os.environ.pop(n, None)
        if value is not None:
            os.environ[n] = value


def package(tmp_path, monkeypatch, name, files: dict):
    """An installed package ``name`` on sys.path: {relative path: source}."""
    for rel_path, text in files.items():
        path = tmp_path / "site" / name / rel_path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        monkeypatch.delitem(sys.modules, mod)


def cpu(cls):
    return type(cls.__name__, (cls,), {"devices": frozenset({"cpu", "cuda"}), "dtypes": cls.dtypes | {torch.float32}})()


FA3_SOURCE = '''
import builtins, math, torch
builtins._da_fa3_imports = getattr(builtins, "_da_fa3_imports", 0) + 1
def flash_attn_func(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1), **kw):
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                           is_causal=causal, scale=softmax_scale)
    return out.transpose(1, 2)
'''


# -- FlashAttention-4 compiles once per machine ----------------------------------------------
def test_fa4_turns_its_compile_cache_on_under_this_librarys_cache_folder_before_its_import(tmp_path, monkeypatch, fa_env):
    package(tmp_path, monkeypatch, "flash_attn", {
        "__init__.py": "",
        "cute/__init__.py": "import os\nSEEN = (os.environ.get('FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED'), "
                            "os.environ.get('FLASH_ATTENTION_CUTE_DSL_CACHE_DIR'))\ndef flash_attn_func(*a, **k):\n    pass\n",
    })
    monkeypatch.setattr(flash_attention, "package_version", lambda d: "4.0.0b36" if d == "flash-attn-4" else None)
    backend = FlashAttention4()
    assert backend.declared_reason() != "package flash-attn-4 is not installed" and not backend.is_loaded()
    backend.unavailable_reason()
    assert backend.is_loaded()
    folder = da.cache_dir() / "fa4-compile"
    assert fa4_compile_dir() == folder
    assert sys.modules["flash_attn.cute"].SEEN == ("1", str(folder))
    assert folder.is_dir()


def test_a_users_own_fa4_cache_settings_are_left_alone(monkeypatch, fa_env):
    os.environ[FA4_CACHE_DIR] = "/somewhere/else"
    assert flash_attention.enable_fa4_compile_cache() is None
    assert FA4_CACHE_ENABLED not in os.environ and os.environ[FA4_CACHE_DIR] == "/somewhere/else"
    del os.environ[FA4_CACHE_DIR]
    os.environ[FA4_CACHE_ENABLED] = "0"
    assert flash_attention.enable_fa4_compile_cache() is None and os.environ[FA4_CACHE_ENABLED] == "0"


def test_clearing_decisions_leaves_compilations_and_clear_compiled_removes_them(fa_env):
    folder = fa4_compile_dir()
    (folder / "sm90").mkdir(parents=True)
    (folder / "sm90" / "kernel.o").write_bytes(b"x")
    (folder / "index").write_text("1")
    q, k, v = qkv()
    da.explain(q, k, v)
    da.clear_cache()
    assert (folder / "sm90" / "kernel.o").exists()
    assert clear_compiled() == 2
    assert not folder.exists() and clear_compiled() == 0


# -- import only what is needed ------------------------------------------------------------------
@pytest.fixture
def fa3(tmp_path, monkeypatch):
    import builtins

    monkeypatch.setattr(builtins, "_da_fa3_imports", 0, raising=False)
    package(tmp_path, monkeypatch, "flash_attn_interface", {"__init__.py": FA3_SOURCE})
    monkeypatch.setattr(flash_attention, "package_version", lambda d: "3.0.0b1" if d == "flash_attn_3" else None)
    backend = cpu(FlashAttention3)
    monkeypatch.setitem(REGISTRY, "flash_attention_3", backend)
    return backend


def test_the_key_comes_from_package_metadata_without_importing(fa3):
    import builtins

    q, k, v = qkv(d=16)
    call = prepare(q, k, v, "b n s d", "b n s d", "b n s d", "b n s d", None, None, None, False, None, False)
    dev = device_info(q.device)
    usable, _ = candidates(call.problem, dev)
    assert fa3 in usable
    key = make_key(call.problem, dev, usable)
    assert key.fields["versions"][fa3.package] == "3.0.0b1"
    assert not fa3.is_loaded() and builtins._da_fa3_imports == 0 and "flash_attn_interface" not in sys.modules


def test_a_cached_decision_never_imports_the_kernel_packages_it_does_not_use(fa3, tmp_path, monkeypatch):
    import builtins

    q, k, v = qkv(d=16)
    info = da.explain(q, k, v)  # tuning imports every candidate
    assert builtins._da_fa3_imports == 1 and info.candidates["flash_attention_3"]["error"] < 1e-5
    store = da.Dispatcher().store
    decision = store.get(info.key_id).replace(backend="torch")
    store.put(decision)
    # a new process: a fresh backend object, a fresh dispatcher, the module not imported
    monkeypatch.delitem(sys.modules, "flash_attn_interface")
    fresh = cpu(FlashAttention3)
    monkeypatch.setitem(REGISTRY, "flash_attention_3", fresh)
    disp = Dispatcher(DecisionCache(da.cache_dir()))
    out = disp.forward(q, k, v)
    assert disp.explain(q, k, v).source == "cache"
    assert not fresh.is_loaded() and builtins._da_fa3_imports == 1
    assert rel(out, full_reference(q, k, v)) < 1e-5
    # the decided backend is imported on first use
    disp.store.put(decision.replace(backend="flash_attention_3"))
    disp.forward(q, k, v)  # served while the package loads on a background thread (test_loading.py)
    assert loading.wait(fresh, 30) == loading.READY
    assert fresh.is_loaded() and builtins._da_fa3_imports == 2


def test_a_broken_install_is_found_at_first_use_with_the_reason_and_the_call_falls_back(tmp_path, monkeypatch):
    package(tmp_path, monkeypatch, "flash_attn_interface",
            {"__init__.py": "raise ImportError('flash_attn_3_cuda.so: undefined symbol: _ZN3c104cuda9SetDeviceEi')"})
    monkeypatch.setattr(flash_attention, "package_version", lambda d: "3.0.0b1" if d == "flash_attn_3" else None)
    backend = cpu(FlashAttention3)
    monkeypatch.setitem(REGISTRY, "flash_attention_3", backend)
    q, k, v = qkv(d=16)
    info = da.explain(q, k, v)
    c = info.candidates["flash_attention_3"]
    assert c["status"] == "unsupported" and c["reason"].startswith("installed but unusable") and "undefined symbol" in c["reason"]
    assert info.key["versions"][backend.package] == "3.0.0b1"
    call = prepare(q, k, v, "b n s d", "b n s d", "b n s d", "b n s d", None, None, None, False, None, False)
    dev = device_info(q.device)
    assert make_key(call.problem, dev, candidates(call.problem, dev)[0]).id == info.key_id  # same key as other processes
    # a decision for it, made where it worked, falls back here with the reason
    store = da.Dispatcher().store
    decision = decided_for(store.get(info.key_id), "flash_attention_3", time_ms=0.001, error=0.0)  # it passed the gate there
    store.put(decision)
    fresh = cpu(FlashAttention3)
    monkeypatch.setitem(REGISTRY, "flash_attention_3", fresh)
    disp = Dispatcher(DecisionCache(da.cache_dir()))
    out = disp.forward(q, k, v)
    assert rel(out, full_reference(q, k, v)) < 1e-5
    assert loading.wait(fresh, 30) == loading.FAILED  # the load runs on a background thread (test_loading.py)
    after = disp.explain(q, k, v)
    assert after.backend != "flash_attention_3" and "undefined symbol" in after.dropped["flash_attention_3"]


@pytest.mark.parametrize("raised", ["SystemExit(3)", "type('Odd', (BaseException,), {})('odd failure')"])
def test_an_import_that_raises_a_base_exception_makes_the_backend_unavailable_not_the_call_fail(raised, tmp_path, monkeypatch):
    """A package whose import calls ``sys.exit()`` or raises its own BaseException is a broken
    install like any other: the call is served, the candidate says why (issue 31's hostile imports)."""
    package(tmp_path, monkeypatch, "flash_attn_interface", {"__init__.py": f"raise {raised}\n"})
    monkeypatch.setattr(flash_attention, "package_version", lambda d: "3.0.0b1" if d == "flash_attn_3" else None)
    backend = cpu(FlashAttention3)
    monkeypatch.setitem(REGISTRY, "flash_attention_3", backend)
    q, k, v = qkv(d=16)
    out = da.attention_forward(q, k, v)
    assert rel(out, full_reference(q, k, v)) < 1e-5
    c = da.explain(q, k, v).candidates["flash_attention_3"]
    assert c["status"] == "unsupported" and c["reason"].startswith("installed but unusable")
    assert backend.unavailable_reason() == c["reason"] and loading.state(backend) == loading.FAILED


def test_a_keyboard_interrupt_raised_by_an_import_off_the_main_thread_is_a_failure(tmp_path, monkeypatch):
    """Ctrl-C reaches the main thread only: on another thread a KeyboardInterrupt is the package's."""
    import threading

    package(tmp_path, monkeypatch, "flash_attn_interface", {"__init__.py": "raise KeyboardInterrupt\n"})
    monkeypatch.setattr(flash_attention, "package_version", lambda d: "3.0.0b1" if d == "flash_attn_3" else None)
    backend = cpu(FlashAttention3)
    got = []
    worker = threading.Thread(target=lambda: got.append(backend.unavailable_reason()))
    worker.start()
    worker.join(60)
    assert got and "KeyboardInterrupt" in got[0] and backend.is_loaded()
