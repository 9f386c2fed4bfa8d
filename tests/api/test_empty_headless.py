"""Empty calls where q or k has no head: PyTorch's CPU SDPA dies of SIGFPE on some of them (torch
2.11: no head anywhere with s_q, s_kv > 0 and q's head dim equal to v's; torch 2.5 and 2.11: no key
head where q has some; diffsynth_attention/backends/headless.py), so every path that could reach
it runs in a child process of its own here: a crash is this test's failure, not the end of the
run. Each child checks SDPA's meaning (an empty output where q has no head, zeros where k has
none, of q's dtype and device; gradients of zeros of each input's shape, a float mask's included)
on the eager ``attention_forward`` (no key, no tuning, nothing written), ``patch_sdpa``'s
replacement (routed, and passing a call through unrouted), and compiled calls with fullgraph."""
import subprocess
import sys

import pytest

CHILD = r'''
import sys
import torch
import torch.nn.functional as F
import diffsynth_attention as da

# (name, b, hq, hk, s_q, s_kv, d, dv)
SHAPES = [("heads", 2, 0, 0, 8, 8, 16, 16), ("heads_head_dim_0", 2, 0, 0, 8, 8, 0, 0), ("heads_batch_0", 0, 0, 0, 8, 8, 16, 16),
          ("heads_other_dv", 2, 0, 0, 8, 8, 16, 8), ("key_heads", 2, 4, 0, 8, 8, 16, 16),
          ("key_heads_s_kv_0", 2, 4, 0, 8, 0, 16, 16), ("key_heads_s_q_0", 2, 4, 0, 0, 8, 16, 16),
          ("query_heads", 2, 0, 2, 8, 8, 16, 16)]
KWS = {"plain": {}, "causal": {"is_causal": True}, "scale": {"scale": 0.3}, "bool_mask": {"mask": "bool"},
       "float_mask": {"mask": "float"}}


def tensors(b, hq, hk, sq, skv, d, dv, dtype, grad, kind=None):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*s, generator=g).to(dtype).requires_grad_(grad)
               for s in ((b, hq, sq, d), (b, hk, skv, d), (b, hk, skv, dv)))
    mask = None
    if kind == "bool":
        mask = torch.rand(sq, skv, generator=g) > 0.3
    elif kind == "float":
        mask = torch.randn(sq, skv, generator=g).to(dtype).requires_grad_(grad)
    return q, k, v, mask


def check(out, q, k, v, mask, grad, what):
    b, hq, sq, dv = q.shape[0], q.shape[1], q.shape[2], v.shape[3]
    assert out.shape == (b, hq, sq, dv) and out.dtype == q.dtype and out.device == q.device, (what, out.shape, out.dtype)
    assert not out.any(), (what, "not zeros")
    if grad:
        out.float().sum().backward()
        for name, t in (("q", q), ("k", k), ("v", v), ("mask", mask)):
            if t is not None and t.requires_grad:
                assert t.grad is not None and t.grad.shape == t.shape and not t.grad.any(), (what, name, t.grad)


def cases():
    for name, *shape in SHAPES:
        for kw_name, kw in KWS.items():
            for dtype in (torch.float32, torch.bfloat16):
                for grad in (False, True):
                    yield f"{name}/{kw_name}/{dtype}/grad={grad}", shape, dict(kw), dtype, grad


def eager():
    for what, shape, kw, dtype, grad in cases():
        q, k, v, mask = tensors(*shape, dtype, grad, kw.pop("mask", None))
        for _ in range(2):  # the first call plans, the second is served by the plan
            for t in (q, k, v, mask):
                if t is not None:
                    t.grad = None
            check(da.attention_forward(q, k, v, attn_mask=mask, **kw), q, k, v, mask, grad, what)
        assert da.explain(q, k, v, attn_mask=mask, **kw).source == "empty", what
        if shape[1] == shape[2]:  # in a packed layout and windowed, as a non-empty call takes them
            bsnd = tuple(t.transpose(1, 2) for t in (q, k, v))
            out = da.attention_forward(*bsnd, "b s n d", "b s n d", "b s n d", "b s n d", attn_mask=mask, **kw)
            check(out.transpose(1, 2), q, k, v, None, False, what + "/bsnd")
            if mask is None and "is_causal" not in kw:
                check(da.attention_forward(q, k, v, window_size=1, **kw), q, k, v, None, False, what + "/window")
    assert da.stats()["tunings"] == 0


def patched():
    handle = da.patch_sdpa()  # process-wide: every SDPA call below goes through its replacement
    try:
        for what, shape, kw, dtype, grad in cases():
            q, k, v, mask = tensors(*shape, dtype, grad, kw.pop("mask", None))
            gqa = q.shape[1] != k.shape[1]
            check(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa, **kw), q, k, v, mask, grad, what)
            # dropout is never routed: the replacement passes such a call on, and must not to a kernel that dies
            q, k, v, mask = tensors(*shape, dtype, False, None)
            check(F.scaled_dot_product_attention(q, k, v, dropout_p=0.5, enable_gqa=gqa), q, k, v, None, False, what + "/dropout")
    finally:
        handle.undo()


def compiled():
    bsnd = ("b s n d",) * 4
    for name, *shape in SHAPES:
        if name not in ("heads", "key_heads", "query_heads"):
            continue
        for window in (None, 1) if shape[1] == shape[2] else (None,):
            torch._dynamo.reset()
            q, k, v, _ = tensors(*shape, torch.float32, False)
            fn = torch.compile(lambda a, b, c: da.attention_forward(a, b, c, *bsnd, window_size=window), fullgraph=True)
            with torch.no_grad():
                out = fn(*(t.transpose(1, 2) for t in (q, k, v)))
            check(out.transpose(1, 2), q, k, v, None, False, f"{name}/compiled/window={window}")
        torch._dynamo.reset()
        q, k, v, _ = tensors(*shape, torch.float32, False)
        gqa = q.shape[1] != k.shape[1]
        with da.patch_sdpa():
            fn = torch.compile(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, enable_gqa=gqa), fullgraph=True)
            with torch.no_grad():
                check(fn(q, k, v), q, k, v, None, False, f"{name}/compiled patch_sdpa")
    assert da.stats()["tunings"] == 0


{"eager": eager, "patch_sdpa": patched, "compiled": compiled}[sys.argv[1]]()
print("ok")
'''


@pytest.mark.parametrize("path", ["eager", "patch_sdpa", "compiled"])
def test_a_call_with_no_head_is_served_without_the_kernel_that_dies_on_it(path, subprocess_env, isolated, tmp_path):
    env = {**subprocess_env, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}  # no graph another version compiled
    r = subprocess.run([sys.executable, "-c", CHILD, path], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), \
        f"the child died or failed (rc {r.returncode}; -8 is SIGFPE):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    assert not isolated.exists() or not any(p.is_file() for p in isolated.rglob("*")), "an empty call wrote to the cache"
