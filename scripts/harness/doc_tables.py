"""The docs' tables that come from the code (``scripts/gen_docs.py`` writes them; the tables
from committed result files are in ``scripts/harness/doc_results.py``).

Each table lies in a Markdown file between ``<!-- generated: NAME -->`` and ``<!-- end -->``:

- ``env``: every variable :data:`diffsynth_attention.config.READERS` reads, its default (the
  reader's value with the variable unset) and what is allowed (the reader's own error text);
- ``backends``: :data:`diffsynth_attention.backends.REGISTRY`, the capabilities each backend
  class declares;
- ``preference``: :data:`~diffsynth_attention.backends.PREFERENCE` and DiffSynth's fixed order;
- ``status``: the candidate statuses of :mod:`diffsynth_attention.store.decision`;
- ``sources``: the plan sources, :class:`diffsynth_attention.states.PlanSource`;
- ``extras``: the kernel packages' extras, from the backends and ``pyproject.toml``;
- ``cli``: the command line's commands and flags, from its parser.

Only the meaning of each variable, status, source, extra and command is written here by hand,
keyed by its value: a test (``tests/tools/test_docs.py``) fails when a value has no meaning, a
meaning no value, or a file's table differs from what is rendered.
"""

from __future__ import annotations

import enum
import os
import re
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

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
    "DIFFSYNTH_ATTENTION_RECORD": "a file: the problems this process calls (shapes, dtype, layout and memory order, "
                                  "mask, causal/window, gradients), written at its exit, merged with a recording "
                                  "already there; `warm --shapes FILE` tunes them elsewhere. `with da.record(FILE):` "
                                  "records one scope",
}
# Shown instead of the reader's value where unset means something the reader cannot return.
ENV_DEFAULTS = {"DIFFSYNTH_ATTENTION_TOLERANCE": "per dtype", "DIFFSYNTH_ATTENTION_CACHE_DIR": "per user",
                "DIFFSYNTH_ATTENTION_RECORD": "unset"}

STATUS_MEANINGS = {
    "chosen": "the backend used",
    "accepted": "passed the gate, timed in the interleaved rounds, lost",
    "slower": "passed the gate, warm probe (and second look) more than {retime:g}x the best, or no room in the budget "
              "for {min_rounds} rounds with it: not in the rounds (the default is re-timed in the confirmation even so)",
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
    from diffsynth_attention import config

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
    from diffsynth_attention.backends import REGISTRY

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
    from diffsynth_attention.backends import DIFFSYNTH_PRIORITY, PREFERENCE

    return (f"Tie-break preference (earlier wins a tie): {' > '.join(f'`{n}`' for n in PREFERENCE)}.\n\n"
            f"DiffSynth-Studio's fixed rule (first installed wins): {' > '.join(f'`{n}`' for n in DIFFSYNTH_PRIORITY)}.\n")


def status_values(module=None) -> list:
    """The candidate statuses, by value: a str enum holding ``chosen`` in ``module`` (default
    :mod:`..store.decision`), else its constants whose value is their own name in lower case."""
    if module is None:
        from diffsynth_attention.store import decision as module

    for obj in vars(module).values():
        if isinstance(obj, type) and issubclass(obj, enum.Enum) and "chosen" in {m.value for m in obj}:
            return [str(m.value) for m in obj]
    return [str(v) for k, v in vars(module).items() if k.isupper() and isinstance(v, str) and v == k.lower()]


def status_table() -> str:
    from diffsynth_attention.tuning.policy import DEFAULT_POLICY as p

    rows = ["| status | meaning |", "|---|---|"]
    for value in status_values():
        meaning = STATUS_MEANINGS[value].format(retime=p.retime, min_rounds=p.min_rounds, skip_factor=p.skip_factor)
        rows.append(f"| `{value}` | {meaning} |")
    return "\n".join(rows) + "\n"


SOURCE_MEANINGS = {
    "override": "`use_backend` or `DIFFSYNTH_ATTENTION_IMPLEMENTATION` named the backend",
    "cache": "a decision known before (this process or the cache on disk)",
    "tuned": "tuned by this call",
    "neighbour": "with `DIFFSYNTH_ATTENTION_NEW_SHAPES=nearest`: the decision of a known problem that differs only "
                 "in sequence lengths in the same bucket; `explain` names it under `neighbour_of`",
    "fallback": "`torch` (or the best timed candidate): tuning is off, the call is being captured or compiled, or a "
                "forced backend cannot serve it",
    "loading": "the decided kernel package is still loading: another candidate of the decision serves the call, the "
               "second line says which",
    "empty": "a size is 0 (batch, heads, a sequence or a head dim): PyTorch's SDPA serves it as it is, in the "
             "caller's layout; no key is made, nothing is tuned or stored",
}


def source_table() -> str:
    from diffsynth_attention.states import PlanSource

    rows = ["| source | meaning |", "|---|---|"]
    rows += [f"| `{s.value}` | {SOURCE_MEANINGS[s.value]} |" for s in PlanSource]
    return "\n".join(rows) + "\n"


EXTRA_NOTES = {
    "flash-attn-4": "only pre-releases exist, so the extra pins one exactly (pip skips pre-releases otherwise)",
    "flash-attn-3": "there is no `flash-attn-3` distribution; `tokenspeed-fa3` is a FlashAttention-3 build for Hopper, "
                    "forward only, without the head-dim-96 kernel (its `flash_attn_config.py` says so, and the adapter "
                    "reads it)",
    "flash-attn-2": "builds from source unless a wheel matches your torch and CUDA; its build imports torch, which pip's "
                    "build isolation hides (`No module named 'torch'`), hence `--no-build-isolation` (it needs "
                    "`packaging`, `ninja` and `wheel` installed first)",
    "sageattention": "8-bit: a candidate only in the `balanced` and `fast` quality tiers ([docs/quality.md](docs/quality.md))",
    "xformers": "its wheels are built for one torch version each",
    "hf-kernels": "DiffSynth-Studio's `customized_fa_kernel`: a FlashAttention kernel from the Hugging Face Hub, used "
                  "only when `DIFFSYNTH_FLASH_ATTN_KERNEL_REPO_ID` and `_VERSION` name one",
}


def pyproject_extras() -> dict:
    import tomllib

    with open(ROOT / "pyproject.toml", "rb") as fh:
        return tomllib.load(fh)["project"]["optional-dependencies"]


def backend_extras() -> dict:
    """{extra: [backend classes]} of every registered backend that has a package extra."""
    from diffsynth_attention.backends import REGISTRY

    out: dict = {}
    for backend in REGISTRY.values():
        if type(backend).extra:
            out.setdefault(type(backend).extra, []).append(backend)
    return out


def extras_table() -> str:
    """One row per kernel extra: the install command (the flags the backend's own hint uses, from
    a checkout), what pyproject.toml installs, the backends it serves, the notes."""
    declared = pyproject_extras()
    rows = ["| extra | installs | backends | notes |", "|---|---|---|---|"]
    for extra, backends in backend_extras().items():
        hint = backends[0]._install_hint().split(";")[0]
        flags = "".join(f"{f} " for f in re.findall(r"--[\w-]+", hint))
        installs = ", ".join(f"`{r}`" for r in declared[extra])
        names = ", ".join(f"`{b.name}`" for b in backends)
        rows.append(f"| `pip install {flags}-e \".[{extra}]\"` | {installs} | {names} | {EXTRA_NOTES[extra]} |")
    return "\n".join(rows) + "\n"


CLI_MEANINGS = {
    "backends": "every backend with its package, version and \"usable\" or why not (a FlashAttention-3 build's flags "
                "too), the install command of each missing one (whole, on its own line), then the configuration in "
                "force (an unset tolerance shows the tolerance per dtype, an unset cache folder the folder in use)",
    "cache path": "the cache folder and the folder of its entries",
    "cache show": "one row per decision (columns: [docs/tuning.md](docs/tuning.md#reading-explain-and-cache-show); over "
                  "2,000 decisions, plain columns); `--json` adds the key id, the chosen candidate's reason and the "
                  "creation time",
    "cache clear": "remove decisions: all, or those the filters select (without a terminal, `--yes` is required: exit 2)",
    "cache verify": "re-time stored decisions against the default (`torch`) and the runner-up, interleaved, and list "
                    "those that no longer hold (anything re-timed more than 3% faster) "
                    "([docs/tuning.md](docs/tuning.md#confirmed-before-stored-priced-per-mode-re-checked-when-in-doubt))",
    "cache migrate": "migrate a version-1 `decisions.json` now (otherwise done in the background)",
    "cache export": "every decision to FILE (an export document: `$defs/document` of the schema)",
    "cache import": "validate FILE against the schema ([`cache_schema/decisions.schema.json`](cache_schema/decisions.schema.json), "
                    "the same checks a third party's JSON Schema validator makes) and that each entry's id is its key's "
                    "hash and its `backend` the candidate marked `chosen`; then merge it",
    "warm": "tune a list of problems ahead of time, whatever `DIFFSYNTH_ATTENTION_IMPLEMENTATION` says (it notes that "
            "the variable still applies to calls); refuses (exit 1) when tuning is off or the cache cannot be written. "
            "Problems that are one problem (e.g. {merged} suite problems at CPU size) are tuned once; a problem already decided costs its cache "
            "lookup only. Under `torchrun` it splits the problems across ranks and syncs the decisions. It ends with "
            "`decisions in <cache folder>` and one line (80 columns at most), e.g. `11 problems asked, 8 distinct: "
            "8 tuned now, 0 already cached; 8 decisions stored`",
    "explain": "the decision for one problem, tuning it if new",
}


def _flag(action) -> str:
    name = "/".join(f"`{o}`" for o in action.option_strings if o.startswith("--")) or f"`{action.dest.upper()}`"
    metavar = "" if action.nargs == 0 else f" {action.metavar or action.dest.upper()}"
    name = name[:-1] + metavar + "`"
    return f"{name}: {action.help}" if action.help else name


def cli_commands() -> list:
    """[(command, [flag texts])] of ``diffsynth-attention``'s parser, in its order."""
    import argparse

    from diffsynth_attention.tools.cli import build_parser

    def walk(parser, prefix):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(sub, f"{prefix} {name}".strip())
                return
        positional = [a.dest.upper() for a in parser._actions if not a.option_strings]
        flags = [_flag(a) for a in parser._actions if a.option_strings and a.help != argparse.SUPPRESS
                 and "--help" not in a.option_strings]
        yield prefix, positional, flags

    return [(c, p, f) for c, p, f in walk(build_parser(), "") if c]


def merged_at_cpu_size() -> str:
    """How many suite problems are one problem at CPU size (the most ``warm`` merges), in words."""
    from diffsynth_attention.tools.shapes import builtin_shapes, distinct, scale_for_cpu

    most = max(1 + len(s.get("also", [])) for s in distinct([scale_for_cpu(s) for s in builtin_shapes()]))
    return {2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}.get(most, str(most))


def cli_table() -> str:
    rows = ["| command | what it does; flags (from `--help`) |", "|---|---|"]
    for command, positional, flags in cli_commands():
        head = " ".join([command, *positional])
        text = CLI_MEANINGS[command].format(merged=merged_at_cpu_size()) + (". " + "; ".join(flags) if flags else "")
        rows.append(f"| `{head}` | {text.replace('|', chr(92) + '|')} |")
    return "\n".join(rows) + "\n"


def schema_text() -> str:
    """The standalone schema: the package's, with ``$defs/backend`` the catalogue's names."""
    import json

    from diffsynth_attention.store import codec

    doc = json.loads(json.dumps(codec.schema()))
    doc["$defs"]["backend"] = {"description": "A backend name: diffsynth_attention.backend_names.BackendName "
                                              "(written by scripts/gen_docs.py from the catalogue).",
                               **doc["$defs"]["backend"]}
    return json.dumps(doc, indent=1) + "\n"
