import torch

from diffsynth_attention.tuning.reference import reference_slice, relative_l1


def qkv(b=2, hq=4, hk=None, sq=32, skv=None, d=16, dv=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hk = hk or hq
    skv = skv or sq
    dv = dv or d
    q = torch.randn(b, hq, sq, d, generator=g).to(dtype)
    k = torch.randn(b, hk, skv, d, generator=g).to(dtype)
    v = torch.randn(b, hk, skv, dv, generator=g).to(dtype)
    return q, k, v


def full_reference(q, k, v, mask=None, scale=None, causal=False, window=None):
    """fp32 reference for every batch and head: (b, n, s_q, d_v)."""
    outs = []
    for bi in range(q.shape[0]):
        m = None if mask is None else mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
        if m is not None:
            m = m[bi:bi + 1] if m.shape[0] > 1 else m
        outs.append(reference_slice(q[bi:bi + 1], k[bi:bi + 1], v[bi:bi + 1], m, scale, causal, window, list(range(q.shape[1]))))
    return torch.stack(outs)


def rel(a, b):
    return relative_l1(a, b)


def broken_package(tmp_path, monkeypatch, name, statement):
    """An installed package whose import runs ``statement`` (e.g. raises), first on sys.path."""
    import sys

    pkg = tmp_path / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text(statement + "\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)


def call_variants():
    """attention_forward keyword arguments that each have a signature of their own (the base call first)."""
    q, k, v = qkv(b=1, hq=2, sq=8, d=8)
    base = dict(q=q, k=k, v=v)
    yield base
    yield {**base, "out_pattern": "b s n d"}
    qs, ks, vs = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    yield dict(q=qs, k=ks, v=vs, q_pattern="b s n d", k_pattern="b s n d", v_pattern="b s n d", out_pattern="b s n d")
    qp = qs.reshape(1, 8, 16)
    yield dict(q=qp, k=ks.reshape(1, 8, 16), v=vs.reshape(1, 8, 16), q_pattern="b s (n d)", k_pattern="b s (n d)",
               v_pattern="b s (n d)", out_pattern="b s (n d)", dims={"n": 2})
    yield {**base, "attn_mask": torch.ones(8, 8, dtype=torch.bool)}
    yield {**base, "attn_mask": torch.zeros(1, 1, 8, 8)}
    yield {**base, "scale": 0.5}
    yield {**base, "scale": 2}  # an int scale: another type, another signature
    yield {**base, "is_causal": 1}  # valid, and not True's signature (1.0 would equal both)
    yield {**base, "is_causal": True}
    yield {**base, "window_size": 2}
    yield {**base, "compatibility_mode": True}
    yield dict(q=q.double(), k=k.double(), v=v.double())
    yield dict(q=qs.transpose(1, 2), k=ks.transpose(1, 2), v=vs.transpose(1, 2))  # b n s d views of b s n d memory
    yield dict(q=q.clone().requires_grad_(), k=k, v=v)
    yield {**base, "attn_mask": torch.zeros(1, 1, 8, 8).requires_grad_()}  # a learned bias: its gradient is needed
