"""Issue 23, a drop-in for DiffSynth and PyTorch: masks of another float dtype, DiffSynth's
values of DIFFSYNTH_ATTENTION_IMPLEMENTATION, current_implementation() under a fallback."""

import logging

import pytest
import torch
import torch.nn.functional as F

import diffsynth_attention as da
from diffsynth_attention.backends import REGISTRY

from helpers import qkv, rel
from test_integration import _load_diffsynth_attention


def _bf16_with_fp32_mask(pattern="b n s d"):
    q, k, v = qkv(b=1, hq=2, sq=8, d=16, dtype=torch.bfloat16)
    mask = torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(3))
    if pattern != "b n s d":
        q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    return q, k, v, mask


@pytest.mark.parametrize("pattern", ["b n s d", "b s n d"])
def test_float32_mask_with_bf16_query_matches_diffsynth_and_sdpa(pattern):
    ds = _load_diffsynth_attention()
    q, k, v, mask = _bf16_with_fp32_mask(pattern)
    copies = [t.clone() for t in (q, k, v, mask)]
    theirs = ds.attention_forward(q, k, v, pattern, pattern, pattern, pattern, attn_mask=mask)
    tuned = da.attention_forward(q, k, v, pattern, pattern, pattern, pattern, attn_mask=mask)
    assert tuned.dtype == torch.bfloat16 and rel(tuned, theirs) < 1e-2  # the tuned backend: within tolerance
    with da.use_backend("torch"):  # DiffSynth's own path, SDPA: bit for bit, first call and hit
        for _ in range(2):
            ours = da.attention_forward(q, k, v, pattern, pattern, pattern, pattern, attn_mask=mask)
            assert ours.dtype == torch.bfloat16 and torch.equal(ours, theirs)
    for before, after in zip(copies, (q, k, v, mask)):
        assert torch.equal(before, after) and before.dtype == after.dtype
    info = da.explain(q, k, v, pattern, pattern, pattern, pattern, attn_mask=mask)
    assert info.key["problem"]["mask"] == "additive_float32"


def test_mask_dtypes_sdpa_refuses_are_refused_naming_attn_mask():
    q, k, v = qkv(b=1, hq=2, sq=8, d=16, dtype=torch.float16)
    bad = torch.zeros(8, 8, dtype=torch.float64)
    with pytest.raises(RuntimeError):
        F.scaled_dot_product_attention(q, k, v, attn_mask=bad)  # PyTorch refuses it too
    with pytest.raises(TypeError, match="attn_mask must be bool, float32 or of the query's dtype"):
        da.attention_forward(q, k, v, attn_mask=bad)


def test_patch_sdpa_routes_a_float32_mask_with_a_bf16_query():
    from diffsynth_attention.integrations import patching

    q, k, v, mask = _bf16_with_fp32_mask()
    expected = patching._ORIGINAL_SDPA(q, k, v, attn_mask=mask)
    before = da.stats()["tunings"]
    with da.patch_sdpa():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        with da.use_backend("torch"):
            exact = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert da.stats()["tunings"] == before + 1  # through the dispatcher, not around it
    assert out.dtype == torch.bfloat16 and rel(out, expected) < 1e-2  # the tuned backend
    assert torch.equal(exact, expected)


def test_current_implementation_reports_the_backend_actually_serving(monkeypatch):
    q, k, v = qkv(b=1, hq=2, sq=8, d=16)
    assert REGISTRY["flash_attention_4"].unavailable_reason() is not None  # no GPU / package here
    with da.use_backend("flash_attention_4"):
        da.attention_forward(q, k, v)
        assert da.current_implementation() == "torch"  # the calls run on torch
        assert da.explain(q, k, v).backend == "torch"
        monkeypatch.setenv("DIFFSYNTH_ATTENTION_STRICT", "1")  # strict: calls raise, nothing falls back
        assert da.current_implementation() == "flash_attention_4"
    monkeypatch.delenv("DIFFSYNTH_ATTENTION_STRICT")
    with da.use_backend("torch_math"):
        assert da.current_implementation() == "torch_math"
    monkeypatch.setenv("DIFFSYNTH_ATTENTION_IMPLEMENTATION", "flash_attention_4")
    assert da.current_implementation() == "torch"
    monkeypatch.setenv("DIFFSYNTH_ATTENTION_IMPLEMENTATION", "auto")
    assert da.current_implementation() == "auto"


def test_printing_an_explanation_prints_the_cli_table(monkeypatch, capsys):
    """print(da.explain(...)) prints the table `diffsynth-attention explain` prints, 80 columns
    wide, and the object keeps its fields."""
    from diffsynth_attention.tools import cli

    monkeypatch.setenv("COLUMNS", "80")
    assert cli.main(["explain", "--heads", "2", "--seq-q", "8", "--head-dim", "16", "--dtype", "float32",
                     "--device", "cpu"]) == 0
    printed = capsys.readouterr().out.rstrip("\n").splitlines()
    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    info = da.explain(q, k, v)  # the same problem: the CLI's decision, from the cache
    print(info)
    text = capsys.readouterr().out.rstrip("\n").splitlines()
    assert text[0].endswith(f": {info.backend} (cache)") and printed[0].endswith(f": {info.backend} (tuned)")
    assert text[1:] == printed[1:]  # the same table
    assert max(len(line) for line in text) <= 80 and len(text) >= 4
    for name in info.candidates:
        assert any(line.lstrip("│┃ ").startswith(name) or f"  {name}:" in line for line in text), name
    assert "Explanation(" not in "\n".join(text)
    assert info.backend in REGISTRY and info.candidates and info.key_id and info["source"] == "cache"
    assert len(repr(info)) < 300 and info.key_id in repr(info)


HINT = r"pip install (--[\w-]+ )*'diffsynth-attention\[[\w-]+\]'"


@pytest.mark.parametrize("argv", [["backends"], ["explain", "--heads", "2", "--seq-q", "8", "--head-dim", "16",
                                                  "--device", "cpu"]])
def test_install_hints_stay_whole_at_80_columns(monkeypatch, capsys, argv):
    import re

    from diffsynth_attention.tools import cli

    monkeypatch.setenv("COLUMNS", "80")
    assert cli.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in lines) <= 80
    missing = [b.extra for b in REGISTRY.values() if b.extra and b.declared_reason() and "not installed" in b.declared_reason()]
    assert missing  # this machine lacks some kernel packages: their hints are printed
    for extra in missing:
        whole = [line for line in lines if re.search(HINT, line) and f"[{extra}]'" in line]
        assert whole, f"no whole install command for [{extra}] in:\n" + "\n".join(lines)
    assert not any(line.rstrip().endswith(("pip", "install", "'diffsynth-attention[")) for line in lines)
    if argv == ["backends"]:
        assert any("--no-build-isolation 'diffsynth-attention[flash-attn-2]'" in line for line in lines)


def test_warm_last_line_counts_what_was_asked_tuned_and_cached(monkeypatch, capsys):
    from diffsynth_attention.tools import cli

    monkeypatch.setenv("COLUMNS", "80")
    argv = ["warm", "--preset", "seed_example,seed_example", "--no-progress", "--device", "cpu"]
    assert cli.main(argv) == 0
    lines = capsys.readouterr().out.rstrip("\n").splitlines()
    assert lines[-1] == "2 problems asked, 1 distinct: 1 tuned now, 0 already cached; 1 decision stored"
    assert max(len(line) for line in lines if not line.startswith("decisions in ")) <= 80
    assert lines[0].startswith("2 problems asked, 1 distinct")  # the table's title
    assert cli.main(argv[:2] + ["seed_example"] + argv[3:]) == 0
    last = capsys.readouterr().out.rstrip("\n").splitlines()[-1]
    assert last == "1 problem asked, 1 distinct: 0 tuned now, 1 already cached; 1 decision stored"
