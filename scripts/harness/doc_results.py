"""The docs' figures that come from committed result files (``scripts/gen_docs.py`` writes them):

- ``headline`` (README.md): the eager speed-ups over the shape suite;
- ``measured`` (docs/measurements.md): the same run's environment, per-problem table and
  geometric means.

Both read :data:`HEADLINE`, one ``scripts/benchmark.py`` result file under
``benchmarks/results/``; a newer run is adopted by changing that one name.
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HEADLINE = "benchmarks/results/H100-80GB-HBM3-2026-12-08-s11-eager.json"


def result(rel: str = HEADLINE) -> dict:
    return json.loads((ROOT / rel).read_text())


def _x(value: float, digits: int = 2) -> str:
    return f"{value:.{digits}f}x"


def headline(rel: str = HEADLINE) -> str:
    doc = result(rel)
    env, summary = doc["environment"], doc["summary"]
    md = rel.replace(".json", ".md")
    return (f"- Measured on an {env['device']} (eager, the suite's {len(doc['problems'])} problems, {env['date'][:10]}, "
            f"[`{md}`]({md})): {_x(summary['geomean_speedup_vs_fixed'])} faster than DiffSynth's fixed rule and "
            f"{_x(summary['geomean_speedup_vs_sdpa'])} faster than SDPA (geometric means), "
            f"{_x(summary['geomean_auto_vs_best'], 3)} the per-problem best; every target met or missed: "
            f"[docs/measurements.md](docs/measurements.md) and [benchmarks/results/NOTES.md](benchmarks/results/NOTES.md).\n")


def _ms(value: float) -> str:
    return f"{value:.4f}" if value < 1 else f"{value:.3f}"


def measured(rel: str = HEADLINE) -> str:
    doc = result(rel)
    env, summary = doc["environment"], doc["summary"]
    packages = ", ".join(f"{name} {version}" for name, version in env["packages"].items() if version)
    rows = [f"{env['device']}, {env['date'][:10]}, torch {env['torch']}, {packages} "
            f"([`{Path(rel).name}`](../{rel}), `scripts/benchmark.py`). Eager, caller layout `{doc['layout']}`, "
            f"ms per call, median of {doc['samples']} interleaved samples:", "",
            "| problem | auto (decision) | best backend | SDPA default | DiffSynth fixed | auto/best |",
            "|---|---|---|---|---|---|"]
    for p in doc["problems"]:
        rows.append(f"| {p['name']} | {_ms(p['auto_ms'])} ({p['decision']}) | {_ms(p['best_ms'])} ({p['best']}) | "
                    f"{_ms(p['sdpa_default_ms'])} | {_ms(p['diffsynth_fixed_ms'])} ({p['diffsynth_fixed']}) | "
                    f"{p['auto_vs_best']:.3f} |")
    rows += ["", f"Over the {len(doc['problems'])} problems (geometric means): {_x(summary['geomean_speedup_vs_fixed'])} "
                 f"faster than DiffSynth's fixed rule, {_x(summary['geomean_speedup_vs_sdpa'])} faster than SDPA, "
                 f"{_x(summary['geomean_auto_vs_best'], 3)} the per-problem best."]
    return "\n".join(rows) + "\n"
