"""The modules the compiled benchmarks compile: one attention call each, as a user would write it."""

from __future__ import annotations

import torch


class AttnModule(torch.nn.Module):
    def __init__(self, kw):
        super().__init__()
        self.kw = kw

    def forward(self, q, k, v):
        import diffsynth_attention as da

        return da.attention_forward(q, k, v, **self.kw)


class SDPAModule(torch.nn.Module):
    def __init__(self, layout: str, causal: bool, gqa: bool = False):
        super().__init__()
        self.bsnd = layout == "b s n d"
        self.causal = causal
        self.gqa = gqa

    def forward(self, q, k, v):
        if self.bsnd:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.gqa:
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=self.causal, enable_gqa=True)
        else:
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return out.transpose(1, 2) if self.bsnd else out


class BackendModule(torch.nn.Module):
    """One backend called directly, as a user who hand-picked it would (its ``forward``)."""

    def __init__(self, name: str, layout: str, causal: bool, window):
        super().__init__()
        self.name, self.bsnd, self.causal, self.window = name, layout == "b s n d", causal, window

    def forward(self, q, k, v):
        from harness.bench import REGISTRY

        if self.bsnd:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        out = REGISTRY[self.name].forward(q, k, v, None, None, self.causal, self.window, False)
        return out.transpose(1, 2) if self.bsnd else out
