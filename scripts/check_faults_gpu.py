"""A real CUDA fault against the dispatcher's failure handling (issue 23).

For each scenario, a fresh child process tunes one small problem on the GPU (its own cache
folder), replaces the plan's runner by one that raises a real CUDA error, calls
``attention_forward`` again and reports what happened: the exception, whether the library
recognised a poisoned context (by its text and by probing), what it logged, and whether the
decision on disk changed. Scenarios:

- ``device_assert``: an out-of-bounds index on the device (a sticky device-side assert: the
  context is poisoned; nothing may be demoted and the error must be raised);
- ``launch_error``: a kernel launch with an invalid configuration (not sticky: the backend is
  dropped in the process; the decision on disk changes only if fresh inputs fail too, which
  they do here).

Usage: ``PYTHONPATH=$PWD python scripts/check_faults_gpu.py --out <dir>``; writes
``<dir>/<device>-<date>-faults.json`` and ``.md``. Without CUDA it writes the same files saying
so (nothing to check on a CPU: the CPU tests fake these errors).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SCENARIOS = ("device_assert", "launch_error")


def _disk_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.glob("v2/*.json")):
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def child(scenario: str) -> dict:
    import logging

    import torch

    import diffsynth_attention as da
    from harness.bench import context_broken, default_dispatcher, poisons_context

    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(f"{record.levelname}: {record.getMessage()}")

    logging.getLogger("diffsynth_attention").addHandler(Keep())
    folder = Path(os.environ["DIFFSYNTH_ATTENTION_CACHE_DIR"])
    q, k, v = (torch.randn(1, 8, 256, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    before_backend = da.explain(q, k, v).backend
    da.attention_forward(q, k, v)
    torch.cuda.synchronize()
    before = _disk_digest(folder)
    plan = next(iter(default_dispatcher().plans.values()))

    def poisoned(q, k, v, mask, scale):
        index = torch.tensor([10**6], device=q.device)
        q.reshape(-1)[index].sum().item()  # out of bounds on the device: a device-side assert
        return q

    def bad_launch(q, k, v, mask, scale):
        torch.cuda.synchronize()
        raise RuntimeError("CUDA error: invalid configuration argument")  # a non-sticky launch error

    plan.run = poisoned if scenario == "device_assert" else bad_launch
    result = {"scenario": scenario, "backend_before": before_backend}
    try:
        da.attention_forward(q, k, v)
        result["raised"] = None
    except Exception as exc:
        result["raised"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        result["recognised_by_text"] = poisons_context(exc)
    result["context_broken"] = context_broken(q.device)
    result["dropped"] = {k_: dict(v_) for k_, v_ in default_dispatcher().dropped.items()}
    result["disk_unchanged"] = _disk_digest(folder) == before
    result["log"] = records[-5:]
    return result


def run_scenario(scenario: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="da-faults-") as folder:
        env = {**os.environ, "DIFFSYNTH_ATTENTION_CACHE_DIR": folder, "DIFFSYNTH_ATTENTION_TUNING_BUDGET": "0.2"}
        r = subprocess.run([sys.executable, __file__, "--child", scenario], env=env, capture_output=True, text=True,
                           timeout=600)
        lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
        result = json.loads(lines[-1]) if lines else {"scenario": scenario, "error": r.stderr[-2000:]}
        result["exit_code"] = r.returncode
        return result


def expectations(result: dict) -> list:
    """What went against the contract (empty when it held)."""
    bad = []
    if "error" in result:
        return [f"the child failed: {result['error'][-300:]}"]
    if result["scenario"] == "device_assert":
        if not result.get("raised"):
            bad.append("a poisoned context was not raised")
        if result.get("dropped"):
            bad.append(f"a backend was dropped: {result['dropped']}")
        if not result.get("disk_unchanged"):
            bad.append("the decision on disk changed")
        if not any("poisons" in line for line in result.get("log", [])):
            bad.append("no log line says the context is poisoned")
    else:
        if result.get("raised"):
            bad.append(f"a non-sticky error was raised instead of falling back: {result['raised']}")
        if not result.get("dropped"):
            bad.append("the failing backend was not dropped in the process")
    return bad


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=False, default=str(Path(__file__).resolve().parent.parent / "benchmarks" / "results"))
    parser.add_argument("--child", choices=SCENARIOS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child), default=str))
        return 0
    import torch

    date = datetime.date.today().isoformat()
    if not torch.cuda.is_available():
        device, results = "cpu", []
        note = "no CUDA device: nothing to check (the CPU tests fake these errors: tests/dispatch/test_faults.py)"
    else:
        device = torch.cuda.get_device_name(0).replace(" ", "-")
        results = [run_scenario(s) for s in SCENARIOS]
        for r in results:
            r["violations"] = expectations(r)
        note = "all held" if not any(r["violations"] for r in results) else "VIOLATIONS: see below"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{device}-{date}-faults"
    doc = {"device": device, "date": date, "torch": torch.__version__, "note": note, "results": results}
    Path(f"{stem}.json").write_text(json.dumps(doc, indent=1, default=str))
    lines = [f"# CUDA faults on {device} ({date}, torch {torch.__version__})", "", note, ""]
    for r in results:
        lines += [f"## {r['scenario']}", "", "```", json.dumps(r, indent=1, default=str), "```", ""]
    Path(f"{stem}.md").write_text("\n".join(lines))
    print(f"{note}; wrote {stem}.json and .md")
    return 0 if not any(r.get("violations") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
