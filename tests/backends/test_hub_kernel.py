"""DiffSynth-Studio's values of DIFFSYNTH_ATTENTION_IMPLEMENTATION, and its seventh
backend, a FlashAttention kernel loaded through Hugging Face's ``kernels`` package
(``customized_fa_kernel``), tested with a local kernel folder."""

import json
import logging
import re
from pathlib import Path

import pytest
import torch

import diffsynth_attention as da
from diffsynth_attention.backends import REGISTRY
from diffsynth_attention.backends.hub_kernel import REPO_ID, VERSION

from support.helpers import full_reference, qkv, rel
from support.diffsynth import load_diffsynth_attention

KERNEL = '''
import torch

calls = []


def flash_attn_func(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1)):
    """b s n d in and out, as FlashAttention's API (equal lengths only in these tests)."""
    calls.append((tuple(q.shape), causal, window_size))
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=softmax_scale, is_causal=causal,
        enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2), None
'''


def diffsynth_values() -> set:
    """Every value of DIFFSYNTH_ATTENTION_IMPLEMENTATION that DiffSynth-Studio's attention module
    reads, from its source (2.1.12)."""
    text = Path(load_diffsynth_attention().__file__).read_text()  # skips when DiffSynth is not installed
    values = set(re.findall(r'ATTENTION_IMPLEMENTATION == "([a-z0-9_]+)"', text))
    values |= set(re.findall(r'return "([a-z0-9_]+)"', text[text.index("def initialize_attention_priority"):]))
    assert "customized_fa_kernel" in values and "torch" in values
    return values


def test_every_diffsynth_value_is_accepted(monkeypatch, caplog):
    q, k, v = qkv(b=1, hq=2, sq=8, d=16)
    ref = full_reference(q, k, v)
    for value in sorted(diffsynth_values()):
        for spelled in (value, value.upper()):  # DiffSynth lower-cases the value
            monkeypatch.setenv("DIFFSYNTH_ATTENTION_IMPLEMENTATION", spelled)
            usable = REGISTRY[value].unavailable_reason() is None
            assert da.current_implementation() == (value if usable else "torch")
            with caplog.at_level(logging.WARNING, logger="diffsynth_attention"):
                caplog.clear()
                for _ in range(3):
                    out = da.attention_forward(q, k, v)
                assert rel(out, ref) < 1e-5
                # Where the value cannot serve here (no package, no GPU), one warning says so
                assert len([r for r in caplog.records if value in r.getMessage()]) <= 1


def _local_kernel(tmp_path, monkeypatch, name="me/fake-fa"):
    pytest.importorskip("kernels")
    # torch-universal: a pure-Python kernel for any torch build (kernels picks the cuda backend for a
    # CUDA build of torch even without a GPU, and a torch-cpu variant is then no match)
    variant = tmp_path / "kernel" / "build" / "torch-universal"
    package = variant / "fake_fa"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(KERNEL)
    (variant / "metadata.json").write_text(json.dumps(
        {"id": "fake-fa", "name": "fake-fa", "version": 1, "license": "Apache-2.0", "python-depends": [],
         "backend": {"type": "cpu"}}))
    monkeypatch.setenv("LOCAL_KERNELS", f"{name}={tmp_path / 'kernel'}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv(REPO_ID, name)
    monkeypatch.setenv(VERSION, "1")
    return REGISTRY["customized_fa_kernel"]


def test_unset_variables_make_it_unavailable_without_importing_kernels(monkeypatch):
    monkeypatch.delenv(REPO_ID, raising=False)
    reason = da.available_backends()["customized_fa_kernel"]
    assert reason is not None and REPO_ID in reason
    monkeypatch.setenv(REPO_ID, "me/fake-fa")
    monkeypatch.setenv(VERSION, "one")
    assert VERSION in da.available_backends()["customized_fa_kernel"]


def test_without_kernels_installed_the_reason_names_the_package_and_its_extra(monkeypatch):
    from diffsynth_attention.backends import hub_kernel
    from diffsynth_attention.explain_text import split_hint

    monkeypatch.setattr(hub_kernel, "package_version", lambda name: None)
    monkeypatch.setattr(hub_kernel, "module_present", lambda name: False)
    monkeypatch.delenv(REPO_ID, raising=False)
    backend = REGISTRY["customized_fa_kernel"]
    backend._settings = None  # forget what was declared
    reason = backend.unavailable_reason()
    assert "package kernels is not installed" in reason and REPO_ID in reason  # both things to do
    assert split_hint(reason)[1] == "pip install 'diffsynth-attention[hf-kernels]'"  # listed under "to install"
    backend._settings = None


def test_local_kernel_serves_forced_and_is_tuned_like_the_others(tmp_path, monkeypatch):
    backend = _local_kernel(tmp_path, monkeypatch)
    assert da.available_backends()["customized_fa_kernel"] is None
    q, k, v = qkv(b=1, hq=4, hk=2, sq=16, d=16, dtype=torch.bfloat16)
    ref = full_reference(q, k, v)
    with da.use_backend("customized_fa_kernel"):
        out = da.attention_forward(q, k, v)
        assert da.current_implementation() == "customized_fa_kernel"
    assert backend._func.__module__ and len(__import__("sys").modules[backend._func.__module__].calls) == 1
    assert rel(out, ref) < 1e-2
    info = da.explain(q, k, v)  # auto: a candidate, timed and gated
    cand = info.candidates["customized_fa_kernel"]
    assert cand["status"] in ("chosen", "accepted", "slower") and cand["error"] < 1e-2
    assert "me/fake-fa v1" in info.key["versions"]["kernels"]  # another kernel is another key


def test_a_kernel_that_cannot_load_is_unavailable_with_the_reason(tmp_path, monkeypatch, caplog):
    pytest.importorskip("kernels")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no access to the Hub
    monkeypatch.setenv(REPO_ID, "nobody/no-such-kernel")
    monkeypatch.setenv(VERSION, "1")
    reason = da.available_backends()["customized_fa_kernel"]
    assert reason is not None and "nobody/no-such-kernel" in reason
    q, k, v = qkv(b=1, hq=2, sq=8, d=16, dtype=torch.bfloat16)
    info = da.explain(q, k, v)  # auto: tuning goes on without it
    assert info.backend != "customized_fa_kernel"
    assert "nobody/no-such-kernel" in (info.candidates["customized_fa_kernel"]["reason"] or "")
    with caplog.at_level(logging.WARNING, logger="diffsynth_attention"):
        with da.use_backend("customized_fa_kernel"):
            out = da.attention_forward(q, k, v)
            assert da.current_implementation() == "torch"  # the backend actually serving
    assert rel(out, full_reference(q, k, v)) < 1e-2
    assert any("nobody/no-such-kernel" in r.getMessage() for r in caplog.records)
