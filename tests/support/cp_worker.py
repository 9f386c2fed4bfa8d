"""One rank of the 2-process gloo tests of context parallelism (tests/integrations/test_context_parallel.py).

Usage: python cp_worker.py MODE[,MODE...], with RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set.
MODE ``ops``: diffusers' templated Ulysses and ring attention over ``diffsynth_auto`` against
full attention, forward and backward. MODE ``wan``: a tiny Wan with ``enable_parallelism``
against the same model on one process. MODE ``states``: the ranks start from different cache
states (rank 0 knows every decision, rank 1 none) and run the same steps. Prints one JSON line.
"""
import json
import os
import sys
import time

import torch
import torch.distributed as dist

from diffsynth_attention.integrations.diffusers import register

register()

from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig  # noqa: E402
from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn  # noqa: E402

import diffsynth_attention as da  # noqa: E402

CUDA = os.environ.get("CP_DEVICE") == "cuda"  # the GPU variant: nccl, one GPU per rank, bfloat16 attention
DTYPE = torch.bfloat16 if CUDA else torch.float32


def device():
    return torch.device("cuda", torch.cuda.current_device()) if CUDA else torch.device("cpu")


def cp_config(ring: int, ulysses: int) -> ParallelConfig:
    from torch.distributed.device_mesh import init_device_mesh

    config = ParallelConfig(context_parallel_config=ContextParallelConfig(ring_degree=ring, ulysses_degree=ulysses))
    mesh = init_device_mesh(device().type, (ring, ulysses), mesh_dim_names=("ring", "ulysses"))
    config.setup(dist.get_rank(), dist.get_world_size(), device(), mesh=mesh)
    return config


def full_qkv(b=1, s=32, n=4, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, s, n, d, generator=g).to(device(), DTYPE) for _ in range(3)]


def check_ops(report: dict) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    q, k, v = full_qkv()
    g = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(device(), DTYPE)
    qf, kf, vf = (t.float().requires_grad_(True) for t in (q, k, v))  # the reference in float32
    ref = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (qf, kf, vf))).transpose(1, 2)
    ref_grads = torch.autograd.grad((ref * g).sum(), (qf, kf, vf))
    shard = slice(rank * q.shape[1] // world, (rank + 1) * q.shape[1] // world)
    for mode, (ring, ulysses) in {"ulysses": (1, world), "ring": (world, 1)}.items():
        config = cp_config(ring, ulysses)
        for backend in ("native", "diffsynth_auto"):
            if backend == "native" and mode == "ring":
                continue  # native cannot return the LSE: no ring
            ql, kl, vl = (t[:, shard].clone().requires_grad_(True) for t in (q, k, v))
            out = dispatch_attention_fn(ql, kl, vl, backend=AttentionBackendName(backend), parallel_config=config)
            grads = torch.autograd.grad((out * g[:, shard]).sum(), (ql, kl, vl))
            err = (out.float() - ref[:, shard]).abs().max().item()
            gerr = max((a.float() - b[:, shard]).abs().max().item() for a, b in zip(grads, ref_grads))
            report[f"{mode}/{backend}"] = {"out": err, "grad": gerr}
    report["tunings"] = da.stats()["tunings"]
    dist.barrier()
    report["decisions"] = {kid: _store().refresh(kid).backend for kid in sorted(_keys_on_disk())}  # no sync here
    report["lse_keys"] = sorted(d.key["problem"]["layout"] for d in _store().entries().values())
    report["local_heads"] = sorted({d.key["problem"]["heads_q"] for d in _store().entries().values()})


def _keys_on_disk() -> list:
    """Every key id with a decision file in the shared cache folder (written by either rank)."""
    from diffsynth_attention.store.cache import cache_dir

    return [p.stem for p in (cache_dir() / "v2").glob("*.json")]


def _store():
    from diffsynth_attention.dispatch import default_dispatcher

    return default_dispatcher().store


def check_wan(report: dict) -> None:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
    from support.diffusers_models import tiny_wan

    if not CUDA and hasattr(torch, "accelerator"):  # torch 2.6+
        torch.accelerator.device_count = lambda: 1  # diffusers maps ranks to accelerators; CPU has none
    import diffusers.hooks.context_parallel as hooks

    if not hasattr(hooks.logger, "warning_once"):  # diffusers 0.42.1 calls a method its logger lacks
        hooks.logger.warning_once = hooks.logger.warning
    model, inputs = tiny_wan(layers=2)
    model = model.to(device())
    inputs = {k: v.to(device()) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    with torch.no_grad():
        ref = model(**inputs)[0]
    model.set_attention_backend("diffsynth_auto")
    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=dist.get_world_size()))
    with torch.no_grad():
        out = model(**inputs)[0]
    report["wan"] = (out - ref).abs().max().item()


def check_states(report: dict) -> None:
    """The ranks start from different cache states, as on two nodes (each its own cache folder):
    rank 0 has decided every key of the step (torch_math, on purpose unlike what a tuning picks),
    rank 1 nothing. The step's collectives are the model's own, the same on both ranks: a hit
    issues none, a miss tunes locally. Then sync_decisions makes rank 1 take rank 0's."""
    rank = dist.get_rank()
    config = cp_config(1, dist.get_world_size())
    q, k, v = full_qkv(s=48)
    shard = slice(rank * 24, rank * 24 + 24)
    if rank == 0:
        from diffsynth_attention.integrations.lse import attention_with_lse

        local = [t.reshape(1, 48, 2, 2, 16)[:, :, 0] for t in (q, k, v)]  # the rank's local problem: heads / 2
        da.attention_forward(*local, "b s n d", "b s n d", "b s n d", "b s n d")
        attention_with_lse(*local)
        for d in list(_store().entries().values()):
            _store().put(d.replace(backend="torch_math"))
    before = da.stats()
    dist.barrier()
    started = time.perf_counter()
    for _ in range(3):
        ql, kl, vl = (t[:, shard] for t in (q, k, v))
        dispatch_attention_fn(ql, kl, vl, backend=AttentionBackendName("diffsynth_auto"), parallel_config=config)
    dist.barrier()
    report["seconds"] = time.perf_counter() - started
    after = da.stats()
    report["step"] = {n: after[n] - before[n] for n in ("hits", "tunings")}
    report["before_sync"] = {kid: d.backend for kid, d in sorted(_store().entries().items())}
    report["synced"] = da.sync_decisions()
    report["decisions"] = {kid: d.backend for kid, d in sorted(_store().entries().items())}


def main() -> None:
    modes = sys.argv[1].split(",")
    if CUDA:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if CUDA else "gloo", timeout=__import__("datetime").timedelta(seconds=120))
    report = {"rank": dist.get_rank(), "mode": sys.argv[1]}
    for mode in modes:
        {"ops": check_ops, "wan": check_wan, "states": check_states}[mode](report)
    dist.destroy_process_group()
    print(json.dumps(report), flush=True)
    # Skip the interpreter's teardown: on a loaded machine, gloo with diffusers' functional
    # collectives sometimes aborts in a C++ destructor at exit ("terminate called without an
    # active exception", SIGABRT) after all the work and its report are done.
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
