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
