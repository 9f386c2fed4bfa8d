"""Diffusers' context parallelism through ``diffsynth_auto``, and one
decision on every rank without a hang: 2 processes over gloo on the CPU (tests/support/cp_worker.py)."""
import json
import os
import socket
import subprocess
import sys

import pytest

pytest.importorskip("diffusers.models.attention_dispatch")
torch_dist = pytest.importorskip("torch.distributed")
if not torch_dist.is_available():
    pytest.skip("torch.distributed is not available in this torch build", allow_module_level=True)

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(TESTS, "support", "cp_worker.py")
TIMEOUT = 240  # a hang fails the test instead of stalling the suite


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(mode: str, env: dict, caches=None, cuda=False) -> list:
    port = _port()
    procs = []
    for rank in range(2):
        e = dict(env, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        if cuda:
            e["CP_DEVICE"] = "cuda"
        if caches is not None:
            e["DIFFSYNTH_ATTENTION_CACHE_DIR"] = str(caches[rank])
        procs.append(subprocess.Popen([sys.executable, WORKER, mode], env=e, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=TIMEOUT)
            assert p.returncode == 0, err[-3000:]
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return sorted(results, key=lambda r: r["rank"])


def test_ulysses_and_ring_forward_and_backward_and_wan_with_enable_parallelism(subprocess_env):
    results = run_ranks("ops,wan", subprocess_env)
    # one node, one shared cache: every key tuned by exactly one rank, the same decisions on both without a sync
    assert results[0]["decisions"] == results[1]["decisions"] and results[0]["decisions"]
    assert results[0]["tunings"] + results[1]["tunings"] == len(results[0]["decisions"])
    for r in results:
        for mode in ("ulysses/native", "ulysses/diffsynth_auto", "ring/diffsynth_auto"):
            assert r[mode]["out"] < 1e-5 and r[mode]["grad"] < 1e-5, (mode, r[mode])
        assert any(layout.endswith("+ lse") for layout in r["lse_keys"])  # ring: its own key, needing the LSE
        assert 2 in r["local_heads"]  # Ulysses: the rank's local problem, 4 heads / 2 ranks
        assert r["wan"] < 1e-5  # a tiny Wan, Ulysses over 2 ranks, against the same model on one process


def test_ranks_with_different_cache_states_do_not_hang_and_end_equal(subprocess_env, tmp_path):
    r0, r1 = run_ranks("states", subprocess_env, caches=[tmp_path / "node0", tmp_path / "node1"])
    assert r0["step"]["tunings"] == 0 and r1["step"]["tunings"] >= 1  # a hit on one rank, misses on the other
    assert r0["before_sync"] != r1["before_sync"]
    assert r0["decisions"] == r1["decisions"] and set(r0["decisions"].values()) == {"torch_math"}  # rank 0's


def test_benchmark_script_cpu_path(subprocess_env, tmp_path):
    """scripts/bench_cp.py --tiny: the 2-GPU benchmark's code path on the CPU over gloo."""
    script = os.path.join(os.path.dirname(TESTS), "scripts", "bench_cp.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script, "--tiny",
           "--no-compile", "--rounds", "2", "--out", str(tmp_path), "--tag", "tiny"]
    res = subprocess.run(cmd, env=dict(subprocess_env, DIFFSYNTH_ATTENTION_CACHE_DIR=str(tmp_path / "cache")),
                         capture_output=True, text=True, timeout=TIMEOUT)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads((tmp_path / "tiny.json").read_text())
    assert result["decisions"]["agree"] and len(result["decisions"]["per_rank"]) == 2
    assert result["output_difference"]["max_abs"] < 1e-4
    assert set(result["eager_attention_ms"]) == {"native", "diffsynth_auto"} and result["eager_attention_speedup"] > 0
    assert result["local_problem"]["key"]["problem"]["heads_q"] == 2  # 4 heads over 2 ranks
    assert "Decisions agree across ranks" in (tmp_path / "tiny.md").read_text()


@pytest.mark.skipif(not (__import__("torch").cuda.device_count() >= 2), reason="needs 2 CUDA GPUs (nccl)")
def test_on_two_gpus_ulysses_ring_and_wan(subprocess_env):
    for r in run_ranks("ops,wan", subprocess_env, cuda=True):
        for mode in ("ulysses/native", "ulysses/diffsynth_auto", "ring/diffsynth_auto"):
            assert r[mode]["out"] < 3e-2 and r[mode]["grad"] < 6e-2, (mode, r[mode])  # bfloat16 against float32
        assert 2 in r["local_heads"] and r["wan"] < 1e-3
