"""``python -m diffsynth_attention`` / ``diffsynth-attention``: backends, cache, warm, explain.

Exit codes: 0 success; 2 usage error (a bad argument or environment variable), one line on
stderr, checked before any work starts; 1 failure with a one-line reason on stderr. An
expected error never prints a traceback.

``--help``, ``cache path``, ``cache show`` and ``cache clear`` import no torch (they answer in
a fraction of a second); ``backends``, ``warm``, ``explain``, ``cache export`` and ``cache
import`` import what they need inside their command.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from typing import Optional

from .._version import __version__
from ..states import PlanSource

from .cli_common import EXPECTED, PROG, Failure, Usage, _console, _device_text, _escape, _key_prefix, _table  # noqa: F401
from .verify import cmd_cache_verify
from .cli_explain import add_parser as add_explain_parser
from .cli_cache import (_store, cmd_cache_clear, cmd_cache_export, cmd_cache_import, cmd_cache_migrate, cmd_cache_path,
                        cmd_cache_show, decision_row, decisions_table)


# -- backends ---------------------------------------------------------------------------------
def _in_force(name: str, value, source: str):
    """What a variable means now where unset says less than the reader's value: the tolerance per
    dtype, and the cache folder in use."""
    from .. import config

    if source != "default":
        return value
    if name == config.TOLERANCE:
        from ..tolerance import DEFAULT_TOLERANCES, TF32_TOLERANCE

        per = ", ".join(f"{dtype} {tol:g}" for dtype, tol in DEFAULT_TOLERANCES.items())
        return f"per dtype: {per} (float32 {TF32_TOLERANCE:g} on CUDA with TF32 on)"
    if name == config.CACHE_DIR:
        from ..store.paths import cache_dir

        return str(cache_dir())
    return value


def cmd_backends(args) -> int:
    from .. import config
    from ..backends import REGISTRY

    from ..backends import available_backends

    rows, why = [], available_backends()  # a hung import: its reason, after its deadline
    for name, backend in REGISTRY.items():
        reason = why[name]
        row = {"backend": name, "package": backend.package or "torch", "version": backend.version(),
               "status": "usable" if reason is None else reason}
        summary = getattr(backend, "build_summary", None)
        if callable(summary) and summary():
            row["build"] = summary()
            row["status"] += f" [build: {row['build']}]"
        rows.append(row)
    settings = [{"variable": n, "value": _in_force(n, v, s), "source": s} for n, v, s in config.describe()]
    if args.json:
        print(json.dumps({"backends": rows, "configuration": settings}, indent=1))
        return 0
    from ..explain_text import split_hint, wrap_keeping_hints

    table = _table(f"{PROG} {__version__}: backends on this machine", ("backend", "package", "version", "status"))
    hints = []
    for r in rows:
        status, hint = split_hint(r["status"])  # install commands go below the table, whole
        if hint:
            hints.append(f"{r['backend']}: {hint}")
        table.add_row(*(_escape(x) for x in (r["backend"], r["package"], r["version"] or "-", status)))
    console = _console()
    console.print(table)
    if hints:
        console.print("to install:")
        for text in hints:
            for line in wrap_keeping_hints(text, min(console.width, 80)):
                console.print(_escape(line), soft_wrap=True)
    table = _table("configuration in force", ("variable", "value", "from"))
    for s in settings:
        table.add_row(_escape(s["variable"].replace("DIFFSYNTH_ATTENTION_", "…_")),
                      _escape("-" if s["value"] is None else s["value"]), s["source"])
    console.print(table)
    return 0


# -- warm -------------------------------------------------------------------------------------
def _count(n: int, noun: str) -> str:
    """``1 problem``, ``2 problems``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def check_warm(args) -> list:
    """Every usage check of ``warm``, before any work; returns the problem list."""
    from .devices import check_device
    from .shapes import check_layout, dtype_name, load_shapes_file, select_presets

    check_layout(args.layout)
    check_device(args.device)
    if args.dtype is not None:
        dtype_name(args.dtype, "--dtype")
    shapes = []
    if args.shapes:
        shapes += load_shapes_file(args.shapes)
    if args.preset or not args.shapes:
        shapes += select_presets(args.preset or ["all"])
    return shapes


def _warm_preflight(store) -> Optional[str]:
    """Why ``warm`` would store nothing (exit 1), else None; and a note on the override."""
    from .. import config

    if not config.tuning_enabled():
        raise Failure(f"{config.TUNING}={config._raw(config.TUNING)!r} turns tuning off, and warm's only job is to tune; "
                      f"unset it (or set it to on) to warm the cache")
    if not store.writable():
        raise Failure(f"the cache at {store.directory} cannot be written (see the warning above); nothing would be stored")
    impl = config.implementation()
    if impl != "auto":
        return (f"note: {config.IMPLEMENTATION}={impl} is set; warm tunes regardless (auto), and calls made with it set "
                f"still use {impl}")
    return None


def cmd_warm(args) -> int:
    shapes = check_warm(args)  # usage errors first (exit 2), before anything is imported or run
    from .torchrun import distributed_context

    store = _store()
    note = _warm_preflight(store)
    console = _console(sys.stderr)
    if note:
        print(note, file=sys.stderr)
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from ..store.key import key_id as hash_key
    from .devices import on_cpu, resolve_device
    from .inputs import torch_dtype
    from .shapes import distinct, scale_for_cpu, DTYPE_NAMES
    from .torchrun import split, warm_distributed
    from .warm import warm

    dtype = torch_dtype(args.dtype) if args.dtype else None
    dist_ctx = distributed_context()
    device = None if dist_ctx else resolve_device(args.device)
    if not args.full_size and on_cpu(args.device if dist_ctx else str(device)):
        shapes = [scale_for_cpu(s) for s in shapes]
    asked = len(shapes)  # what was asked, before problems that are one at this size are merged
    shapes = distinct(shapes, DTYPE_NAMES[args.dtype] if args.dtype else None)
    mine = shapes if not dist_ctx else split(shapes, dist_ctx[1])[dist_ctx[0]]
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, disable=args.no_progress) as progress:
        task = progress.add_task("tuning", total=len(mine))

        def done(shape, info):
            progress.update(task, advance=1, description=f"{shape['name']}: {info.backend}")

        if dist_ctx:
            results = warm_distributed(shapes, args.device, dtype, args.layout, done)
        else:
            results = warm(shapes, device, dtype, args.layout, done)
    if dist_ctx and dist_ctx[0] != 0:
        return 0
    from ..dispatch import default_dispatcher

    default_dispatcher().store.flush()  # what is still pending after a failed write
    on_disk = _store().entries()  # read back: only what reached the file counts as stored
    rows, stored, tuned = [], set(), 0
    for shape, info in results:
        kid = info.key_id or hash_key(info.key)
        d = on_disk.get(kid)
        if d is not None:
            stored.add(kid)
        tuned += info.source == PlanSource.TUNED
        row = decision_row(kid, d) if d is not None else {
            "key_id": kid, "problem": info.problem, "device": info.key["device"]["name"], "backend": info.backend,
            "time_ms": None, "speedup_vs_torch": None, "runner_up": None, "reason": None}
        names = [shape["name"]] + shape.get("also", [])
        row["problem"] = f"{' = '.join(names)}: {row['problem']}"
        row["source"] = info.source
        rows.append(row)
    cached = sum(info.source == PlanSource.CACHE for _, info in results)
    other = len(results) - tuned - cached  # neighbour or fallback: served, not tuned
    if dist_ctx:
        done_text = f"split over {dist_ctx[1]} ranks, synced"
    else:
        done_text = f"{tuned} tuned now, {cached} already cached" + (f", {other} not tuned" if other else "")
    summary = (f"{_count(asked, 'problem')} asked, {len(results)} distinct: {done_text}; "
               f"{_count(len(stored), 'decision')} stored")
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        _console().print(decisions_table(rows, f"{_count(asked, 'problem')} asked, {len(rows)} distinct"))
    out = sys.stderr if args.json else sys.stdout
    print(f"decisions in {store.path}", file=out)
    import shutil
    import textwrap

    width = min(80, shutil.get_terminal_size((80, 24)).columns)
    print("\n".join(textwrap.wrap(summary, width=width, break_long_words=False, break_on_hyphens=False)), file=out)
    wanted = {r["key_id"] for r in rows}
    if len(stored) < len(wanted):
        raise Failure(f"only {len(stored)} of {len(wanted)} decision(s) reached {store.path}; see the warnings above")
    return 0


# -- parser -----------------------------------------------------------------------------------
class Parser(argparse.ArgumentParser):
    """argparse with a one-line usage error (exit 2)."""

    def error(self, message):  # noqa: D401 - argparse's hook
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _backend_name(text: str) -> str:
    from ..backend_names import check_backend

    try:
        return check_backend(text, "--backend")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).replace("--backend=", "")) from None


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog=PROG, description="Autotuned attention for diffusion pipelines: backends, decision cache, warm-up.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the library does")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = sub.add_parser("backends", help="every backend (version, usable or why not) and the configuration in force")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=cmd_backends)

    cache = sub.add_parser("cache", help="inspect and manage the decision cache")
    csub = cache.add_subparsers(dest="cache_command", required=True, parser_class=Parser)
    p = csub.add_parser("path", help="the cache folder and the folder of its entries")
    p.set_defaults(func=cmd_cache_path)
    p = csub.add_parser("show", help="one row per decision")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_cache_show)
    p = csub.add_parser("clear", help="remove decisions (all, or by --gpu / --backend)")
    p.add_argument("--gpu", type=_device_text, help="only decisions for devices whose name contains this text (case-insensitive)")
    p.add_argument("--backend", type=_backend_name, help="only decisions that chose this backend")
    p.add_argument("--key", type=_key_prefix, help="only the decision whose key id starts with this (e.g. from cache show --json)")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p.add_argument("--compiled", action="store_true",
                   help="also remove FlashAttention-4's compile cache kept under the cache folder (left alone otherwise)")
    p.set_defaults(func=cmd_cache_clear)
    p = csub.add_parser("verify", help="re-time stored decisions against the default and the runner-up; --fix tunes "
                                       "those that no longer hold (and provisional ones) again")
    p.add_argument("--key", type=_key_prefix, help="only the decision whose key id starts with this")
    p.add_argument("--shapes", help="only the decisions of the problems in this JSON file (the shape suite's format)")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--fix", action="store_true", help="tune again what no longer holds or is provisional")
    p.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    p.set_defaults(func=cmd_cache_verify)
    p = csub.add_parser("migrate", help="migrate a version-1 decisions.json now (otherwise done in the background)")
    p.set_defaults(func=cmd_cache_migrate)
    p = csub.add_parser("export", help="write every decision to FILE")
    p.add_argument("file")
    p.set_defaults(func=cmd_cache_export)
    p = csub.add_parser("import", help="validate FILE against the schema and merge it")
    p.add_argument("file")
    p.add_argument("--keep-existing", action="store_true", help="keep this cache's decision where both have one")
    p.set_defaults(func=cmd_cache_import)

    p = sub.add_parser("warm", help="tune a list of problems ahead of time")
    p.add_argument("--preset", action="append",
                   help="'all' (the suite at full size; cut to CPU size on a CPU), 'cpu' (the suite cut to CPU size), "
                        "or a problem name of the suite; repeatable, comma-separated")
    p.add_argument("--shapes", help="a JSON file of problems: the shape suite's format, a recording (da.record, "
                                    "DIFFSYNTH_ATTENTION_RECORD) or a cache export document")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--dtype", help="override the problems' dtypes (float16, bfloat16, float32, float64, fp16, bf16, ...)")
    p.add_argument("--layout", default="b n s d", help="the layout pipelines call with, e.g. 'b s n d' (default 'b n s d')")
    p.add_argument("--full-size", action="store_true", help="on a CPU, do not cut problems down to CPU size")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    p.set_defaults(func=cmd_warm)

    add_explain_parser(sub)
    return parser


def main(argv: Optional[list] = None) -> int:
    rc = _main(argv)
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and argv is None:
        _exit_rank(rc)
    return rc


def _exit_rank(rc: int) -> None:
    """A torchrun rank ends here once its work and its output are done: flush the decisions and
    standard streams, then skip the interpreter's teardown, where gloo's threads sometimes abort
    the process (SIGABRT, "terminate called without an active exception") on a loaded machine."""
    dispatch = sys.modules.get("diffsynth_attention.dispatch")
    if dispatch is not None:
        with contextlib.suppress(Exception):
            dispatch.default_dispatcher().store.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


def _main(argv: Optional[list] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s pid %(process)d %(levelname)s %(name)s: %(message)s" if args.verbose
                        else "%(levelname)s %(name)s: %(message)s")
    from .. import config
    from .devices import DeviceError
    from .shapes import ShapeFileError

    try:
        config.validate_all()  # a bad environment variable is a usage error, found before any work
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        return args.func(args) or 0
    except (Usage, ShapeFileError, DeviceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Failure as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 1
    except EXPECTED as exc:
        text = str(exc).strip().splitlines()
        print(f"error: {text[0] if text else type(exc).__name__}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
