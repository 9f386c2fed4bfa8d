"""The first launch of a decided kernel happens on the loading thread, not the caller's (issue 31,
item 1). A fake FlashAttention-3 imports at once but its first launch blocks until the test opens
a gate (CUDA loading an extension's kernels lazily, 4 s on an H200): the caller's calls meanwhile
are served by the decision's best ready candidate and never wait; once the launch is done the
decided backend takes over."""
import builtins
import sys
import threading

import pytest
import torch

from diffsynth_attention.backends import REGISTRY, flash_attention, loading, warmup
from diffsynth_attention.backends.flash_attention import FlashAttention3
from diffsynth_attention.dispatch import Dispatcher
from diffsynth_attention.store.cache import DecisionCache

from support.helpers import full_reference, qkv, rel
from support.store_helpers import decided_for

# A fast import; the first launch waits for builtins._da_launch_gate; every launch records its thread.
LAZY_FA3 = '''
import builtins, threading, torch
def flash_attn_func(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1), **kw):
    builtins._da_launches.append(threading.current_thread().name)
    if len(builtins._da_launches) == 1:
        builtins._da_launch_gate.wait(30)
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                           is_causal=causal, scale=softmax_scale)
    return out.transpose(1, 2)
'''


def warm_fa3():
    cls = FlashAttention3
    return type(cls.__name__, (cls,), {"devices": frozenset({"cpu", "cuda"}), "dtypes": cls.dtypes | {torch.float32},
                                       "warm_devices": frozenset({"cpu", "cuda"})})()


@pytest.fixture
def lazy_fa3(tmp_path, monkeypatch):
    site = tmp_path / "site"
    (site / "flash_attn_interface").mkdir(parents=True)
    (site / "flash_attn_interface" / "__init__.py").write_text(LAZY_FA3)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, "flash_attn_interface", raising=False)
    monkeypatch.setattr(flash_attention, "package_version", lambda d: "3.0.0b1" if d == "flash_attn_3" else None)
    monkeypatch.setattr(builtins, "_da_launches", ["seed", "seed"], raising=False)  # the seeding process: no gate
    monkeypatch.setattr(builtins, "_da_launch_gate", threading.Event(), raising=False)
    builtins._da_launch_gate.set()
    monkeypatch.setitem(REGISTRY, "flash_attention_3", warm_fa3())
    folder = tmp_path / "seeded"
    q, k, v = qkv(d=16)
    previous = Dispatcher(DecisionCache(folder))
    decision = previous.store.get(previous.explain(q, k, v).key_id)
    previous.store.put(decided_for(decision, "flash_attention_3",
                                   time_ms=min(c.time_ms for c in decision.candidates.values() if c.time_ms) / 2))
    assert previous.store.flush()
    loading.wait(REGISTRY["flash_attention_3"], 30)
    # a new process: unimported, a fresh backend object, the first launch gated
    monkeypatch.delitem(sys.modules, "flash_attn_interface")
    monkeypatch.setattr(builtins, "_da_launches", [])
    monkeypatch.setattr(builtins, "_da_launch_gate", threading.Event())
    monkeypatch.setitem(REGISTRY, "flash_attention_3", warm_fa3())
    safety = threading.Timer(20, builtins._da_launch_gate.set)  # never leave a thread blocked for good
    safety.start()
    yield folder, q, k, v
    safety.cancel()
    builtins._da_launch_gate.set()
    loading.wait(REGISTRY["flash_attention_3"], 30)


def test_the_first_launch_runs_on_the_loading_thread_while_calls_are_served(lazy_fa3):
    folder, q, k, v = lazy_fa3
    fa3 = REGISTRY["flash_attention_3"]
    disp = Dispatcher(DecisionCache(folder))
    outs = [disp.forward(q, k, v)]
    done = threading.Event()

    def caller():  # the caller's calls while the first launch is under way: none of them waits
        for _ in range(5):
            outs.append(disp.forward(q, k, v))
        done.set()
    t = threading.Thread(target=caller)
    t.start()
    assert done.wait(15), "a caller's call waited for the first launch"
    assert builtins._da_launches and builtins._da_launches[0].startswith("diffsynth-attention-load-")
    assert loading.state(fa3) == loading.LOADING and fa3.is_loaded()  # imported, still launching
    info = disp.explain(q, k, v)
    assert info.source == "loading" and info.backend != "flash_attention_3"
    builtins._da_launch_gate.set()
    assert loading.wait(fa3, 30) == loading.READY
    outs.append(disp.forward(q, k, v))
    info = disp.explain(q, k, v)
    assert (info.source, info.backend) == ("cache", "flash_attention_3")
    assert builtins._da_launches[1:] and builtins._da_launches[-1] == threading.current_thread().name
    expected = full_reference(q, k, v)
    assert all(rel(out, expected) < 1e-5 for out in outs)


def test_variants_are_one_per_kernel_variant_and_skip_masked_problems():
    base = {"batch": 1, "heads_q": 4, "heads_kv": 4, "seq_q": 64, "seq_kv": 64, "head_dim": 128, "head_dim_v": 128,
            "dtype": "bfloat16", "layout": "b n s d", "mask": "none", "mask_shape": None, "causal": False,
            "window": None, "requires_grad": False}
    keys = [{"problem": dict(base, seq_q=s, seq_kv=s), "device": {"type": "cuda"}} for s in (64, 128, 4096)]
    keys.append({"problem": dict(base, causal=True), "device": {"type": "cuda"}})
    keys.append({"problem": dict(base, mask="bool"), "device": {"type": "cuda"}})
    keys.append({"problem": "foreign"})
    got = warmup.variants(keys)
    assert [(p["seq_q"], p["causal"]) for p in got] == [(64, False), (64, True)]


def test_no_launch_before_the_caller_starts_cuda(monkeypatch):
    """The loading thread never initialises CUDA: it waits for the caller, and gives up."""
    monkeypatch.setattr(warmup, "CUDA_WAIT_S", 0.1)
    launched = []
    monkeypatch.setattr(warmup, "_launch", lambda backend, p, torch: launched.append(p))
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    key = {"problem": {"batch": 1, "heads_q": 1, "heads_kv": 1, "seq_q": 8, "seq_kv": 8, "head_dim": 64,
                       "head_dim_v": 64, "dtype": "bfloat16", "mask": "none", "causal": False, "window": None},
           "device": {"type": "cuda"}}
    assert warmup.warm(warm_fa3(), [key]) == 0 and launched == []


def test_first_launches_leave_the_callers_random_numbers_alone():
    """A seeded pipeline gets the same random numbers whether or not the loading thread ran."""
    backend = warm_fa3()
    backend._func = lambda q, k, v, **kw: q.clone()
    key = {"problem": {"batch": 1, "heads_q": 2, "heads_kv": 2, "seq_q": 8, "seq_kv": 8, "head_dim": 16,
                       "head_dim_v": 16, "dtype": "float32", "mask": "none", "causal": False, "window": None},
           "device": {"type": "cpu"}}
    torch.manual_seed(5)
    expected = torch.rand(4)
    torch.manual_seed(5)
    assert warmup.warm(backend, [key]) == 1
    assert torch.equal(torch.rand(4), expected)


def test_first_launches_go_to_the_devices_the_process_uses_not_gpu_0():
    """The loading thread's current device is device 0 in every rank of a node (the current device
    is per thread): the launches go to the devices with a primary context instead."""
    from types import SimpleNamespace

    from diffsynth_attention.backends.warmup import cuda_devices

    contexts = {3}
    fake = SimpleNamespace(_C=SimpleNamespace(_cuda_hasPrimaryContext=lambda i: i in contexts),
                           cuda=SimpleNamespace(device_count=lambda: 8, current_device=lambda: 0))
    assert cuda_devices(fake) == [3]
    contexts.clear()
    assert cuda_devices(fake) == []  # none yet: nothing is warmed (no context made on GPU 0)
    no_api = SimpleNamespace(_C=SimpleNamespace(), cuda=SimpleNamespace(device_count=lambda: 8, current_device=lambda: 5))
    assert cuda_devices(no_api) == [5]
