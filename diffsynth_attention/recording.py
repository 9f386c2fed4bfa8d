"""Recording the problems a pipeline really calls, to warm the cache for them elsewhere
(``diffsynth-attention warm --shapes FILE``), as PyTorch's TunableOp records its untuned GEMMs.

- ``with da.record("problems.json"):`` around a pipeline: every problem planned while the scope is
  open (in any thread) is written to the file when the scope ends. Entering the scope drops the
  dispatcher's plans, so that problems planned before it are planned, and recorded, again (from
  the decisions in memory: no tuning, no file read).
- ``DIFFSYNTH_ATTENTION_RECORD=path``: every problem this process plans, written at its exit.

What is recorded is the problem as its key holds it (shapes, dtype, layout and memory order, mask
kind and shape, causal, window, gradients), once per problem: a set in memory, filled where a plan
is built (once per call signature), never on the hit path; the file is written once, at the end.
A file that already holds a recording is merged with, so several runs add up. The file is a shape
file (the suite's format, :mod:`diffsynth_attention.tools.shapes`, with the problem fields that
format leaves optional), so ``warm --shapes`` reads it as it is.

torch-free: the fields are plain JSON values.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Callable, Iterator, Optional

from . import process

logger = logging.getLogger("diffsynth_attention")

FORMAT = "diffsynth_attention recording"  # the document's "format"
# The key's problem fields a shape file names as they are; the rest are renamed or derived.
_SAME = ("batch", "heads_q", "heads_kv", "seq_q", "seq_kv", "head_dim", "dtype", "causal", "window", "requires_grad")

_lock = process.new_lock()  # a forked child finds it unlocked
_scopes: list = []  # the open record() scopes' sets of problems
_env: dict = {}  # path -> the set of problems DIFFSYNTH_ATTENTION_RECORD collects for it


def shape_from_fields(fields: dict, name: Optional[str] = None) -> dict:
    """A problem of a key (``key["problem"]``) as a shape-file problem."""
    from .describe import describe_problem

    shape = {"name": name or describe_problem(fields, layout=True)}
    shape.update({f: fields[f] for f in _SAME if f in fields})
    if fields.get("head_dim_v", fields["head_dim"]) != fields["head_dim"]:
        shape["head_dim_v"] = fields["head_dim_v"]
    if fields.get("mask", "none") != "none":
        shape["mask"] = fields["mask"]
        shape["mask_shape"] = fields.get("mask_shape")
    if fields.get("layout") and fields["layout"] != "b n s d, b n s d, b n s d -> b n s d":
        shape["layout"] = fields["layout"]
    if fields.get("memory"):
        shape["memory"] = fields["memory"]
    return shape


def _frozen(fields: dict) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in fields.items()))


def note(problem) -> None:
    """Record ``problem`` (a :class:`~diffsynth_attention.problem.Problem`) in every open scope and
    for ``DIFFSYNTH_ATTENTION_RECORD``. Called where a plan is built; costs a lookup when nothing
    records."""
    from . import config

    path = config.record_path()
    if not _scopes and path is None:
        return
    item = _frozen(problem.fields())
    with _lock:
        for scope in _scopes:
            scope.add(item)
        if path is not None:
            if path not in _env:
                _env[path] = set()
                if len(_env) == 1:
                    atexit.register(_write_env)
            _env[path].add(item)


def _write_env() -> None:
    with _lock:
        pending = {path: set(items) for path, items in _env.items()}
    for path, items in pending.items():
        try:
            write(path, items)
        except Exception as exc:  # at exit: say it, never raise
            logger.warning("diffsynth_attention: the recording to %s could not be written (%s)", path, exc)


def _read_existing(path: Path) -> list:
    """The problems of a recording already at ``path`` (to merge with); [] if there is none."""
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} exists and is not a recording this library can add to ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"{path} exists and is not a recording (its 'format' is not {FORMAT!r}); name another file")
    return [p for p in doc.get("problems", []) if isinstance(p, dict)]


def write(path, items) -> int:
    """Write the problems ``items`` (frozen key fields) to ``path``, merged with the recording
    already there; returns how many problems the file holds."""
    path = Path(path)
    problems = {_frozen(p): p for p in _read_existing(path)}
    for item in items:
        problems.setdefault(item, dict((k, list(v) if isinstance(v, tuple) else v) for k, v in item))
    ordered = sorted(problems.values(), key=lambda p: json.dumps(p, sort_keys=True))
    doc = {"format": FORMAT, "problems": ordered,
           "shapes": [shape_from_fields(p, f"recorded_{i + 1}") for i, p in enumerate(ordered)]}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)
    return len(ordered)


@contextlib.contextmanager
def scope(path, on_enter: Optional[Callable[[], None]] = None) -> Iterator[set]:
    """Record the problems planned while the scope is open (any thread) and write them to
    ``path`` when it ends (merged with a recording already there). ``on_enter`` runs once the
    scope records (``da.record`` drops the dispatcher's plans there). Yields the set being filled
    (frozen key fields)."""
    target = checked_target(path)
    items: set = set()
    with _lock:
        _scopes.append(items)
    failed = False
    try:
        if on_enter is not None:
            on_enter()
        yield items
    except BaseException:
        failed = True
        raise
    finally:
        with _lock:
            _scopes.remove(items)
        try:
            count = write(target, items)
            logger.info("recorded %d problem(s) to %s (%d in the file)", len(items), target, count)
        except Exception as exc:
            if not failed:
                raise
            # the pipeline's own error goes on; this one is said, not raised over it
            logger.warning("diffsynth_attention: the recording to %s could not be written (%s)", target, exc)


def checked_target(path) -> Path:
    """``path`` as a Path, once it is one a recording can be written to: a TypeError or a
    ValueError naming ``record(path)`` otherwise, before the pipeline runs (not at the scope's
    end, after it)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"record(path) must be a str or os.PathLike file path, got {type(path).__name__}")
    target = Path(path).expanduser()
    folder = target.parent
    if not folder.is_dir():
        raise ValueError(f"record(path)={str(path)!r}: its folder {str(folder)!r} is missing (no such folder); "
                         "create it first or name a file in an existing folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"record(path)={str(path)!r}: its folder {str(folder)!r} is not writable")
    if target.exists():
        _read_existing(target)  # a file that is not a recording: refused now, before the pipeline runs
    return target
