"""The docs' tables, generated from the code: ``python -m diffsynth_attention.tools.docs``.

Each table lies in a Markdown file between ``<!-- generated: NAME -->`` and ``<!-- end -->``:

- ``env``: every variable :data:`diffsynth_attention.config.READERS` reads, its default (the
  reader's value with the variable unset) and what is allowed (the reader's own error text);
- ``backends``: :data:`diffsynth_attention.backends.REGISTRY`, the capabilities each backend
  class declares;
- ``preference``: :data:`~diffsynth_attention.backends.PREFERENCE` and DiffSynth's fixed order;
- ``status``: the candidate statuses of :mod:`diffsynth_attention.store.decision`.

Only the meaning of each variable and status is written here by hand, keyed by its value: a test
(``tests/tools/test_docs.py``) fails when a value has no meaning, a meaning no value, or a file's table
differs from what this module renders. ``--check`` exits 1 instead of writing.
"""

from __future__ import annotations

import enum
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FILES = ("README.md",)  # and every docs/*.md
_BLOCK = re.compile(r"(<!-- generated: (\w+) -->\n)(.*?)(<!-- end -->)", re.S)

ENV_MEANINGS = {
    "DIFFSYNTH_ATTENTION_IMPLEMENTATION": "`auto` or a backend, case-insensitive, read on every call; `use_backend` wins over "
                                          "it; `warm` ignores it (it always tunes) and says so. Shared with DiffSynth-Studio "
                                          "(see below)",
    "DIFFSYNTH_ATTENTION_STRICT": "on: a forced backend that cannot serve a call raises (with every reason) instead of "
                                  "warning once and using `torch`",
    "DIFFSYNTH_ATTENTION_TOLERANCE": "relative L1 error allowed against fp32, for every dtype; unset: a tolerance per "
                                     "dtype ([docs/tuning.md](docs/tuning.md#the-numeric-gate-one-tolerance-per-dtype))",
    "DIFFSYNTH_ATTENTION_TUNING": "off: never time anything; known decisions are used, otherwise `torch`. `warm` "
                                  "refuses to run",
    "DIFFSYNTH_ATTENTION_TUNING_BUDGET": "floor of the timing budget per key in seconds: timing stays within max(this, "
                                         "15x the fastest time), compilation and warm-up excluded",
    "DIFFSYNTH_ATTENTION_CACHE_DIR": "cache folder (default `platformdirs.user_cache_dir(\"diffsynth_attention\")`); a "
                                     "relative path is taken from the working directory when first read, and stays there",
    "DIFFSYNTH_ATTENTION_TUNE_WAIT": "seconds a process waits for another one tuning the same key; a tuner that is "
                                     "stopped or hung (no heartbeat for 5 s) or dead ends the wait at once",
    "DIFFSYNTH_ATTENTION_LOAD_WAIT": "seconds, counted from the start of a kernel package's import, that tuning a new "
                                     "key (or a trace) waits for it; after that the backend is left out of that tuning "
                                     "(its candidate's reason says so) and the key is tuned without it. Never waited "
                                     "under a key's lease; the next process imports it again",
    "DIFFSYNTH_ATTENTION_NEW_SHAPES": "`tune`: every new problem is tuned. `nearest`: a problem that differs from a known "
                                      "decision only in sequence lengths in the same bucket (4 per octave of s_q and of "
                                      "s_kv) uses that decision at once (`explain`: source `neighbour`, `neighbour_of`)",
    "DIFFSYNTH_ATTENTION_PRELOAD": "off: do not start loading, at `import diffsynth_attention`, the kernel packages this "
                                   "machine's cached decisions name (only once torch is imported, by the caller or by the "
                                   "first public name used); the first call that needs one then starts its load",
    "DIFFSYNTH_ATTENTION_RETIME": "off: a provisional decision (timings too noisy to confirm it, e.g. on a loaded host) "
                                  "is served as it is until `cache verify --fix`; on: the first eager call of a process "
                                  "that finds the host quiet re-times it, once per process "
                                  "([docs/tuning.md](docs/tuning.md#confirmed-before-stored-priced-per-mode-re-checked-when-in-doubt))",
    "DIFFSYNTH_ATTENTION_QUALITY": "quality tier: `exact` (today's kernels only), `balanced` or `fast` (8-bit/FP8 "
                                   "kernels admitted where their error on the caller's own q, k, v is within the tier's "
                                   "bound); `quality(...)` scopes win over it ([docs/quality.md](docs/quality.md))",
    "DIFFSYNTH_ATTENTION_SENTINEL_EVERY": "every how many calls a low-precision decision re-checks a slice against the "
                                          "fp32 reference (0: never); drift beyond the tier's bound falls back to the "
                                          "best exact backend",
    "DIFFSYNTH_ATTENTION_THIN_CALLS": "on: FlashAttention-3 and -4 calls go straight to the kernel the package compiled "
                                      "(its operator, its compiled-kernel cache), bit for bit the package's output, for "
                                      "the package versions this was checked against; off: always through the "
                                      "package's Python interface ([docs/backends.md](docs/backends.md#thin-kernel-calls))",
}
# Shown instead of the reader's value where unset means something the reader cannot return.
ENV_DEFAULTS = {"DIFFSYNTH_ATTENTION_TOLERANCE": "per dtype", "DIFFSYNTH_ATTENTION_CACHE_DIR": "per user"}

STATUS_MEANINGS = {
    "chosen": "the backend used",
    "accepted": "passed the gate, timed in the interleaved rounds, lost",
    "slower": "passed the gate, warm probe (and second look) more than {retime:g}x the best, or no room in the budget "
              "for {min_rounds} rounds with it: not re-timed",
    "skipped": "not run: its cost model predicts it cannot fit in free memory, or more than {skip_factor:g}x the best "
               "prediction (the reason holds the prediction)",
    "rejected": "error above tolerance, NaN/Inf, an exception, or it modified its inputs",
    "unsupported": "not installed here, or its declared capabilities exclude the problem",
}


@contextmanager
def _unset(name: str):
    old = os.environ.pop(name, None)
    try:
        yield
    finally:
        if old is not None:
            os.environ[name] = old


def _allowed(name: str, reader) -> str:
    """What the reader allows, in its own words (the text of its error for a bad value)."""
    os.environ[name] = "\x01not-a-value"
    try:
        reader()
    except ValueError as exc:
        text = str(exc).split("allowed: ", 1)[-1]
        return re.sub(r"\s*\([^)]*(?:default|empty)[^)]*\)", "", text).strip(" ;,")
    finally:
        del os.environ[name]
    return "a path"


def _cell(value) -> str:
    return f"`{value}`" if not isinstance(value, bool) else ("`on`" if value else "`off`")


def env_table() -> str:
    from .. import config

    rows = ["| variable | default | allowed | meaning |", "|---|---|---|---|"]
    for name, reader in config.READERS.items():
        with _unset(name):
            default = ENV_DEFAULTS.get(name) or _cell(reader())
            allowed = _allowed(name, reader)
        rows.append(f"| `{name}` | {default} | {allowed} | {ENV_MEANINGS[name]} |")
    return "\n".join(rows) + "\n"


def _names(values) -> str:
    return ", ".join(sorted(str(v).replace("torch.", "") for v in values)) or "-"


def backend_table() -> str:
    from ..backends import REGISTRY

    rows = ["| name | package | extra | devices | dtypes | masks | causal | GQA | window | backward |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    yes = {True: "yes", False: "no"}
    for name, backend in REGISTRY.items():
        cls = type(backend)  # the class's declaration, not what an installed build configured
        causal = yes[cls.causal] + ("" if cls.causal_any_lengths or not cls.causal else " (s_q == s_kv)")
        window = yes[cls.window] + ("" if cls.window_any_lengths or not cls.window else " (s_q == s_kv)")
        rows.append(f"| `{name}` | {cls.package or '(torch)'} | {cls.extra or '-'} | {_names(cls.devices)} | "
                    f"{_names(cls.dtypes)} | {_names(cls.masks)} | {causal} | {yes[cls.gqa]} | {window} | "
                    f"{yes[cls.backward]} |")
    return "\n".join(rows) + "\n"


def preference_list() -> str:
    from ..backends import DIFFSYNTH_PRIORITY, PREFERENCE

    return (f"Tie-break preference (earlier wins a tie): {' > '.join(f'`{n}`' for n in PREFERENCE)}.\n\n"
            f"DiffSynth-Studio's fixed rule (first installed wins): {' > '.join(f'`{n}`' for n in DIFFSYNTH_PRIORITY)}.\n")


def status_values(module=None) -> list:
    """The candidate statuses, by value: a str enum holding ``chosen`` in ``module`` (default
    :mod:`..store.decision`), else its constants whose value is their own name in lower case."""
    if module is None:
        from ..store import decision as module

    for obj in vars(module).values():
        if isinstance(obj, type) and issubclass(obj, enum.Enum) and "chosen" in {m.value for m in obj}:
            return [str(m.value) for m in obj]
    return [str(v) for k, v in vars(module).items() if k.isupper() and isinstance(v, str) and v == k.lower()]


def status_table() -> str:
    from ..tuning.policy import DEFAULT_POLICY as p

    rows = ["| status | meaning |", "|---|---|"]
    for value in status_values():
        meaning = STATUS_MEANINGS[value].format(retime=p.retime, min_rounds=p.min_rounds, skip_factor=p.skip_factor)
        rows.append(f"| `{value}` | {meaning} |")
    return "\n".join(rows) + "\n"


TABLES = {"env": env_table, "backends": backend_table, "preference": preference_list, "status": status_table}


def render(text: str) -> str:
    """``text`` with every generated block replaced by what the code says now."""
    return _BLOCK.sub(lambda m: m.group(1) + TABLES[m.group(2)]() + m.group(4), text)


def blocks(text: str) -> list:
    return [m.group(2) for m in _BLOCK.finditer(text)]


def files() -> list:
    """The documents that may hold generated blocks, relative to the repository root."""
    return list(FILES) + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))


def main(argv=None) -> int:
    check = "--check" in (argv if argv is not None else sys.argv[1:])
    stale = []
    for rel in files():
        path = ROOT / rel
        text = path.read_text()
        new = render(text)
        if new != text:
            stale.append(rel)
            if not check:
                path.write_text(new)
    for rel in stale:
        print(f"{rel}: {'out of date' if check else 'updated'}")
    return 1 if check and stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
