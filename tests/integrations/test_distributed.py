"""Tuning across processes (CPU): 4 gloo processes; one tuning per key per node; sync_decisions."""
import json
import socket
import subprocess
import sys

WORKER = r"""
import json, os, sys, torch, torch.distributed as dist
import diffsynth_attention as da
from diffsynth_attention.dispatch import default_dispatcher

store = default_dispatcher().store
dist.init_process_group("gloo")
rank = dist.get_rank()
q = torch.randn(1, 2, 33, 8)
da.attention_forward(q, q, q)              # the same key on every rank: tuned once per node
dist.barrier()
own = torch.randn(1, 2, 40 + rank, 8)
da.attention_forward(own, own, own)         # different keys per rank: no collective, no deadlock
if rank == 1:                               # diverge on purpose
    d = store.get(next(iter(store.entries())))
    store.put(d.replace(backend="torch_math"), save=False)
n = da.sync_decisions()
dec = {k: v.backend for k, v in sorted(store.entries().items())}
print(json.dumps({"rank": rank, "stats": da.stats(), "n": n, "decisions": dec}))
dist.destroy_process_group()
"""


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_four_ranks_tune_once_and_sync(subprocess_env, isolated):
    port = _port()
    procs = []
    for rank in range(4):
        env = dict(subprocess_env, RANK=str(rank), WORLD_SIZE="4", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank))
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    # the shared key was tuned by exactly one process; each own key once
    assert sum(r["stats"]["tunings"] for r in results) == 1 + 4
    decisions = [r["decisions"] for r in results]
    assert all(d == decisions[0] for d in decisions) and len(decisions[0]) == 5
    from diffsynth_attention.store.cache import DecisionCache

    on_disk = DecisionCache(isolated).entries()  # a fresh reader: what the files hold
    assert {k: v.backend for k, v in on_disk.items()} == decisions[0]
