"""``python -m diffsynth_attention`` / ``diffsynth-attention``: backends, cache, warm, explain.

Exit codes: 0 success, 2 usage error (argparse), 1 failure with a one-line reason on stderr.
An expected error never prints a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Optional

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .._version import __version__

EXPECTED = (ValueError, TypeError, OSError, RuntimeError, TimeoutError, KeyError)


class Failure(Exception):
    """A failure with a one-line reason (exit code 1)."""


def _console(stream=None) -> Console:
    return Console(file=stream or sys.stdout, soft_wrap=True, highlight=False)


# -- backends ---------------------------------------------------------------------------------
def cmd_backends(args) -> int:
    from ..backends import REGISTRY

    rows = []
    for name, backend in REGISTRY.items():
        reason = backend.unavailable_reason()
        rows.append({"backend": name, "package": backend.package or "torch", "version": backend.version(),
                     "status": "usable" if reason is None else reason})
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    table = Table(title=f"diffsynth-attention {__version__}: backends on this machine")
    for col in ("backend", "package", "version", "status"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(*(escape(x) for x in (r["backend"], r["package"], r["version"] or "-", r["status"])))
    _console().print(table)
    return 0


# -- cache ------------------------------------------------------------------------------------
def _store():
    from ..dispatch import default_dispatcher

    return default_dispatcher().store


def cmd_cache_path(args) -> int:
    store = _store()
    print(f"directory: {store.directory}")
    print(f"entries: {store.path}")
    return 0


def _problem_text(problem: dict) -> str:
    p = problem
    text = f"{p['batch']}x{p['heads_q']}" + (f"/{p['heads_kv']}" if p["heads_kv"] != p["heads_q"] else "")
    text += f" s={p['seq_q']}" + (f"x{p['seq_kv']}" if p["seq_kv"] != p["seq_q"] else "")
    text += f" d={p['head_dim']} {p['dtype']}"
    if p["causal"]:
        text += " causal"
    if p["window"] is not None:
        text += f" window={p['window']}"
    if p["mask"] != "none":
        text += f" {p['mask']}-mask"
    if p["requires_grad"]:
        text += " grad"
    if p["layout"] != "b n s d, b n s d, b n s d -> b n s d":
        text += f" [{p['layout']}]"
    return text


def decision_row(key_id: str, d) -> dict:
    chosen = d.candidates.get(d.backend)
    torch_c = d.candidates.get("torch")
    time_ms = chosen.time_ms if chosen else None
    speedup = None
    if time_ms and torch_c is not None and torch_c.time_ms:
        speedup = torch_c.time_ms / time_ms
    return {
        "key_id": key_id,
        "problem": _problem_text(d.key["problem"]),
        "device": d.key["device"]["name"],
        "backend": d.backend,
        "time_ms": time_ms,
        "speedup_vs_torch": speedup,
        "runner_up": d.runner_up(),
        "created": d.created,
    }


def decisions_table(rows: list, title: str) -> Table:
    table = Table(title=title)
    for col in ("problem", "device", "backend", "time ms", "vs torch", "runner-up"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(*(escape(x) for x in (
            r["problem"], r["device"], r["backend"],
            "-" if r["time_ms"] is None else f"{r['time_ms']:.4g}",
            "-" if r["speedup_vs_torch"] is None else f"{r['speedup_vs_torch']:.2f}x",
            r["runner_up"] or "-",
        )))
    return table


def cmd_cache_show(args) -> int:
    store = _store()
    rows = [decision_row(k, d) for k, d in sorted(store.entries().items(), key=lambda kv: kv[1].created)]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    _console().print(decisions_table(rows, f"{len(rows)} decisions in {store.path}"))
    return 0


def cmd_cache_clear(args) -> int:
    from ..api import clear_cache
    from ..backends import REGISTRY

    if args.backend is not None and args.backend not in REGISTRY:
        raise Failure(f"--backend {args.backend!r} is not a backend; valid names: {', '.join(REGISTRY)}")
    store = _store()

    def match(d):
        return (args.backend is None or d.backend == args.backend) and (args.gpu is None or args.gpu.lower() in d.key["device"]["name"].lower())

    count = sum(1 for d in store.entries().values() if match(d))
    if not args.yes:
        if not sys.stdin.isatty():
            raise Failure(f"would clear {count} decision(s) from {store.path}; pass --yes to confirm (no terminal to ask)")
        answer = input(f"Clear {count} decision(s) from {store.path}? [y/N] ").strip().lower()
        if answer not in ("y", "yes"):
            print("nothing cleared")
            return 0
    removed = clear_cache(backend=args.backend, gpu=args.gpu)
    print(f"cleared {removed} decision(s) from {store.path}")
    return 0


def cmd_cache_export(args) -> int:
    from ..store.cache import render_document

    store = _store()
    entries = store.entries()
    Path(args.file).write_text(render_document(entries))
    print(f"exported {len(entries)} decision(s) to {args.file}")
    return 0


def cmd_cache_import(args) -> int:
    from ..store.cache import MAX_DOCUMENT_BYTES, CacheFileError, parse_document

    try:
        with open(args.file, "rb") as fh:
            text = fh.read(MAX_DOCUMENT_BYTES + 1)  # over the cap: refused below, never read whole
    except OSError as exc:
        raise Failure(f"cannot read {args.file}: {exc.strerror or exc}") from None
    try:
        entries = parse_document(text, args.file)
    except CacheFileError as exc:
        raise Failure(f"refused {args.file}: {exc.reason}") from None
    store = _store()
    count = store.put_many(entries.values(), replace=not args.keep_existing)
    if not store.persistent:
        raise Failure(f"imported {count} decision(s) in memory only: the cache at {store.directory} cannot be written")
    print(f"imported {count} of {len(entries)} decision(s) into {store.path}")
    return 0


# -- warm -------------------------------------------------------------------------------------
def _dtype(name: Optional[str]):
    from .warm import DTYPES

    if name is None:
        return None
    if name not in DTYPES:
        raise Failure(f"--dtype {name!r} is not one of {', '.join(sorted(DTYPES))}")
    return DTYPES[name]


def cmd_warm(args) -> int:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from .warm import distributed_context, load_shapes_file, resolve_device, scale_for_cpu, select_presets, warm, warm_distributed

    shapes = []
    if args.shapes:
        shapes += load_shapes_file(args.shapes)
    if args.preset or not args.shapes:
        shapes += select_presets(args.preset or ["all"])
    dtype = _dtype(args.dtype)
    dist_ctx = distributed_context()
    device = None if dist_ctx else resolve_device(args.device)
    if not args.full_size and (device is not None and device.type == "cpu" or dist_ctx and not _cuda()):
        shapes = [s if s["name"].endswith("@cpu") else scale_for_cpu(s) for s in shapes]
    console = _console(sys.stderr)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, disable=args.no_progress) as progress:
        task = progress.add_task("tuning", total=len(shapes) if not dist_ctx else len(shapes[dist_ctx[0]::dist_ctx[1]]))

        def done(shape, info):
            progress.update(task, advance=1, description=f"{shape['name']}: {info.backend}")

        if dist_ctx:
            results = warm_distributed(shapes, args.device, dtype, args.layout, done)
        else:
            results = warm(shapes, device, dtype, args.layout, done)
    if dist_ctx and dist_ctx[0] != 0:
        return 0
    store = _store()
    rows = []
    for shape, info in results:
        d = store.get(_key_id(info))
        row = decision_row(_key_id(info), d) if d is not None else {
            "problem": info.problem, "device": info.key["device"]["name"], "backend": info.backend,
            "time_ms": None, "speedup_vs_torch": None, "runner_up": None}
        row["problem"] = f"{shape['name']}: {row['problem']}"
        row["source"] = info.source
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        _console().print(decisions_table(rows, f"{len(rows)} problems warmed into {store.path}"))
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _key_id(info) -> str:
    from ..store.key import key_id

    return key_id(info.key)


# -- explain ----------------------------------------------------------------------------------
def cmd_explain(args) -> int:
    from ..api import explain
    from .warm import make_inputs, parse_shapes, resolve_device

    shape = parse_shapes([{
        "name": "explain", "batch": args.batch, "heads_q": args.heads, "heads_kv": args.heads_kv or args.heads,
        "seq_q": args.seq_q, "seq_kv": args.seq_kv or args.seq_q, "head_dim": args.head_dim, "dtype": args.dtype,
        "causal": args.causal, **({"window": args.window} if args.window is not None else {}),
    }], "command line")[0]
    device = resolve_device(args.device)
    q, k, v, kwargs = make_inputs(shape, device, None, args.layout)
    import torch

    with torch.no_grad():
        info = explain(q, k, v, **kwargs)
    if args.json:
        print(json.dumps(info.as_dict(), indent=1))
        return 0
    console = _console()
    console.print(escape(f"{info.problem} on {info.key['device']['name']}: {info.backend} ({info.source})"))
    table = Table()
    for col in ("backend", "status", "time ms", "error", "reason"):
        table.add_column(col, overflow="fold")
    for name, c in info.candidates.items():
        table.add_row(*(escape(x) for x in (name, c.get("status") or "-", "-" if c["time_ms"] is None else f"{c['time_ms']:.4g}",
                                             "-" if c["error"] is None else f"{c['error']:.2e}", c["reason"] or "")))
    console.print(table)
    return 0


# -- parser -----------------------------------------------------------------------------------
def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffsynth-attention", description="Autotuned attention for diffusion pipelines: backends, decision cache, warm-up.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the library does")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("backends", help="every backend: version, and usable or why not")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_backends)

    cache = sub.add_parser("cache", help="inspect and manage the decision cache")
    csub = cache.add_subparsers(dest="cache_command", required=True)
    p = csub.add_parser("path", help="the cache directory and file")
    p.set_defaults(func=cmd_cache_path)
    p = csub.add_parser("show", help="one row per decision")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_cache_show)
    p = csub.add_parser("clear", help="remove decisions (all, or by --gpu / --backend)")
    p.add_argument("--gpu", help="only decisions for GPUs whose name contains this text")
    p.add_argument("--backend", help="only decisions that chose this backend")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p.set_defaults(func=cmd_cache_clear)
    p = csub.add_parser("export", help="write every decision to FILE")
    p.add_argument("file")
    p.set_defaults(func=cmd_cache_export)
    p = csub.add_parser("import", help="validate FILE against the schema and merge it")
    p.add_argument("file")
    p.add_argument("--keep-existing", action="store_true", help="keep this cache's decision where both have one")
    p.set_defaults(func=cmd_cache_import)

    p = sub.add_parser("warm", help="tune a list of problems ahead of time")
    p.add_argument("--preset", action="append", help="'all', 'cpu', or a problem name of the shape suite (repeatable, comma-separated)")
    p.add_argument("--shapes", help="a JSON file of problems in the shape suite's format")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--dtype", help="override the problems' dtypes")
    p.add_argument("--layout", default="b n s d", help="the layout pipelines call with, e.g. 'b s n d' (default 'b n s d')")
    p.add_argument("--full-size", action="store_true", help="on a CPU, do not scale problems down to CPU size")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_warm)

    p = sub.add_parser("explain", help="the decision, times and errors for one problem")
    p.add_argument("--batch", type=_positive, default=1)
    p.add_argument("--heads", type=_positive, required=True)
    p.add_argument("--heads-kv", type=_positive)
    p.add_argument("--seq-q", type=_positive, required=True)
    p.add_argument("--seq-kv", type=_positive)
    p.add_argument("--head-dim", type=_positive, required=True)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--window", type=int)
    p.add_argument("--device")
    p.add_argument("--layout", default="b n s d")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_explain)
    return parser


def main(argv: Optional[list] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s pid %(process)d %(levelname)s %(name)s: %(message)s" if args.verbose else "%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args) or 0
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
