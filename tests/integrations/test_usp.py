"""DiffSynth's USP (xfuser / yunchang) local attention through the dispatcher.

xfuser and yunchang are not installed here: one test checks the reason given; the others put a
stand-in for DiffSynth's USP module in ``sys.modules`` (its ``xFuserLongContextAttention`` keeps
what it is given, as xfuser's does) and drive the processor the way xfuser's ring loop does,
merging with yunchang's update_out_and_lse formula."""
import importlib.util
import sys
import types
from enum import Enum

import pytest
import torch
import torch.nn.functional as F

from diffsynth_attention.integrations import usp
from diffsynth_attention.integrations.patching import DiffSynthPatch


class AttnType(Enum):
    FA = "fa"
    NPU = "npu"


class FakeLongContextAttention:
    def __init__(self, scatter_idx=2, gather_idx=1, ring_impl_type="basic", attn_type=None, attn_processor=None):
        self.attn_type = AttnType.FA if attn_type is None else attn_type
        self.attn_processor = attn_processor
        self.ring_pg = None  # no process group: a ring of one


@pytest.fixture
def fake_usp_module(monkeypatch):
    module = types.ModuleType(usp.USP_MODULE)
    module.xFuserLongContextAttention = FakeLongContextAttention
    monkeypatch.setitem(sys.modules, usp.USP_MODULE, module)
    return module


def bsnd(s=40, n=4, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, s, n, d, generator=g) for _ in range(3)]


def reference(q, k, v):
    return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)


@pytest.mark.skipif(importlib.util.find_spec("xfuser") is not None and importlib.util.find_spec("yunchang") is not None,
                    reason="xfuser and yunchang are installed here")
def test_without_xfuser_it_says_why(monkeypatch):
    monkeypatch.delitem(sys.modules, usp.USP_MODULE, raising=False)
    why = usp.patch_usp()
    assert "pip install xfuser yunchang" in why and "not installed" in why


def test_patch_routes_new_layers_and_undo_restores(fake_usp_module):
    patch = DiffSynthPatch()
    assert usp.patch_usp(patch) == "routed"
    layer = fake_usp_module.xFuserLongContextAttention(attn_type=AttnType.FA, ring_impl_type="basic")
    assert layer.attn_type == usp.ROUTED_ATTN_TYPE and not isinstance(layer.attn_type, AttnType)
    assert layer.attn_processor.func is usp.usp_local_attention
    assert layer.attn_processor.keywords == {"needs_lse": False}  # a ring of one: any backend, no LSE
    npu = fake_usp_module.xFuserLongContextAttention(attn_type=AttnType.NPU)
    assert npu.attn_type is AttnType.NPU and npu.attn_processor is None  # DiffSynth's NPU kernel: untouched
    assert usp.patch_usp(patch) == "routed" and len(patch.replaced) == 1  # idempotent
    patch.undo()
    assert fake_usp_module.xFuserLongContextAttention is FakeLongContextAttention


def test_single_step_output_matches(fake_usp_module):
    usp.patch_usp()
    layer = fake_usp_module.xFuserLongContextAttention(attn_type=AttnType.FA)
    q, k, v = bsnd()
    out, lse = layer.attn_processor(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                                    softcap=0.0, alibi_slopes=None, return_softmax=False)
    torch.testing.assert_close(out, reference(q, k, v), atol=1e-5, rtol=1e-5)
    assert lse.shape == (1, 4, 40)


def test_ring_steps_merge_to_full_attention_with_yunchang_formula():
    q, k, v = bsnd()
    out = lse = None
    for chunk in (slice(0, 16), slice(16, 40)):  # two ring steps over key chunks
        block_out, block_lse = usp.usp_local_attention(q, k[:, chunk], v[:, chunk], needs_lse=True)
        assert block_lse.shape == (1, 4, 40) and block_lse.dtype == torch.float32
        if out is None:  # yunchang.ring.utils.update_out_and_lse
            out, lse = block_out.float(), block_lse.transpose(-2, -1).unsqueeze(-1)
        else:
            block_lse = block_lse.transpose(-2, -1).unsqueeze(-1)
            out = out - torch.sigmoid(block_lse - lse) * (out - block_out.float())
            lse = lse - F.logsigmoid(lse - block_lse)
    torch.testing.assert_close(out, reference(q, k, v), atol=1e-5, rtol=1e-5)


def test_unsupported_arguments_are_named():
    q, k, v = bsnd()
    with pytest.raises(ValueError, match="dropout_p"):
        usp.usp_local_attention(q, k, v, dropout_p=0.1)
    with pytest.raises(ValueError, match="window_size"):
        usp.usp_local_attention(q, k, v, window_size=(4, 4))
