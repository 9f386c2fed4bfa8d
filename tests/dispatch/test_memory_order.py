"""Memory order and TF32 are part of a problem (issue 33, item 4): a ``b n s d`` view of ``b s n d``
memory is another key than contiguous ``b n s d`` tensors, and a float32 call with TF32 allowed is
another key than one without. Keys of contiguous calls without TF32 are those made before the
fields existed, so existing entries are served without a rewrite."""

import torch

from diffsynth_attention.dispatch import Dispatcher
from diffsynth_attention.problem import Problem, memory_order
from diffsynth_attention.request import Request
from diffsynth_attention.store.cache import DecisionCache
from diffsynth_attention.store.key import key_id
from diffsynth_attention.tuning.policy import DEFAULT_TOLERANCES, TF32_TOLERANCE, tolerance_for

from support.helpers import full_reference, qkv, rel

OLD_FIELDS = ("batch", "heads_q", "heads_kv", "seq_q", "seq_kv", "head_dim", "head_dim_v", "dtype", "layout",
              "mask", "mask_shape", "causal", "window", "requires_grad")


def _bsnd_views():
    q, k, v = qkv(b=1, hq=2, sq=16, d=8)
    return q, k, v, tuple(t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))


def test_contiguous_calls_keep_the_keys_made_before_the_fields(tmp_path):
    disp = Dispatcher(DecisionCache(tmp_path))
    q, k, v = qkv(b=1, hq=2, sq=16, d=8)
    info = disp.explain(q, k, v)
    assert set(info.key["problem"]) == set(OLD_FIELDS)
    qs, ks, vs = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # b s n d memory, b s n d patterns
    info2 = disp.explain(qs, ks, vs, "b s n d", "b s n d", "b s n d", "b s n d")
    assert set(info2.key["problem"]) == set(OLD_FIELDS)
    # an entry stored under the old fields (no memory, no tf32) is this call's decision: no new tuning
    before = disp.stats()["tunings"]
    fresh = Dispatcher(DecisionCache(tmp_path))
    fresh.forward(q, k, v)
    assert fresh.stats()["tunings"] == 0 and disp.stats()["tunings"] == before


def test_another_memory_order_is_another_key_and_is_served_correctly(tmp_path):
    disp = Dispatcher(DecisionCache(tmp_path))
    q, k, v, (qv, kv, vv) = _bsnd_views()
    assert not qv.is_contiguous() and torch.equal(qv, q)
    a = disp.explain(q, k, v)
    b = disp.explain(qv, kv, vv)
    assert b.key["problem"]["memory"] == "q=bsnd k=bsnd v=bsnd"
    assert a.key_id != b.key_id and b.key_id == key_id(b.key)
    assert disp.stats()["tunings"] == 2
    out = disp.forward(qv, kv, vv)
    assert rel(out, full_reference(q, k, v)) < 1e-4
    # the entry with its memory field passes the schema: a new process reads it back
    reread = DecisionCache(tmp_path).get(b.key_id, tolerance_for(_problem(b)))
    assert reread is not None and reread.key["problem"]["memory"] == "q=bsnd k=bsnd v=bsnd"


def _problem(info):
    return Problem(batch=1, heads_q=2, heads_kv=2, seq_q=16, seq_kv=16, head_dim=8, head_dim_v=8,
                   dtype=torch.float32, device_type="cpu")


def test_memory_order_names_each_tensor_against_its_pattern():
    q, k, v, (qv, kv, vv) = _bsnd_views()
    pats = ("b n s d",) * 3
    assert memory_order(pats, (q, k, v)) is None
    assert memory_order(pats, (q, kv, vv)) == "q=bnsd k=bsnd v=bsnd"
    one_head = q[:, :1]  # one head: both orders are the same memory
    assert memory_order(pats, (one_head, k[:, :1], v[:, :1])) is None


def test_hot_path_signature_follows_strides_and_tf32():
    q, k, v, (qv, kv, vv) = _bsnd_views()
    sig = Request(q, k, v).signature(None, None, False)
    assert Request(qv, kv, vv).signature(None, None, False) != sig
    was = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = not was
        assert Request(q, k, v).signature(None, None, False) != sig  # float32: TF32 is part of it
        h = tuple(t.half() for t in (q, k, v))
        h_sig = Request(*h).signature(None, None, False)
        torch.backends.cuda.matmul.allow_tf32 = was
        assert Request(*h).signature(None, None, False) == h_sig  # float16: it is not
    finally:
        torch.backends.cuda.matmul.allow_tf32 = was


def test_tf32_is_a_key_field_with_its_own_tolerance():
    base = dict(batch=1, heads_q=2, heads_kv=2, seq_q=16, seq_kv=16, head_dim=8, head_dim_v=8,
                dtype=torch.float32, device_type="cuda")
    plain, tf32 = Problem(**base), Problem(**base, tf32=True)
    assert "tf32" not in plain.fields() and tf32.fields()["tf32"] is True
    assert tolerance_for(plain) == DEFAULT_TOLERANCES["float32"] and tolerance_for(tf32) == TF32_TOLERANCE


def test_runner_skips_the_contiguity_check_only_for_dense_last_dims(tmp_path):
    """The plan's signature fixes the strides, so an ATen kernel's runner checks the last dim's
    stride per call only where the call's tensors are not dense in it."""
    import diffsynth_attention as da
    from diffsynth_attention.problem import prepare

    q, k, v = qkv(b=1, hq=2, sq=16, d=16)
    wide = [torch.stack([t, t], dim=-1)[..., 0] for t in (q, k, v)]  # last stride 2, same values
    assert all(t.stride(-1) == 2 and torch.equal(t, s) for t, s in zip(wide, (q, k, v)))
    args = ("b n s d",) * 4 + (None, None, None, False, None, False)
    assert prepare(q, k, v, *args).problem.dense_last
    assert not prepare(*wide, *args).problem.dense_last
    disp = Dispatcher(DecisionCache(tmp_path))
    with da.use_backend("torch_flash"):
        for inputs in ((q, k, v), wide, (q, k, v), wide):
            assert rel(disp.forward(*inputs), full_reference(q, k, v)) < 1e-4
