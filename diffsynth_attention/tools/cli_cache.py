"""The ``cache`` commands of the command line (path, show, clear, migrate, export, import): none
imports torch."""

from __future__ import annotations

import json
import sys
from ..describe import _TIMED_LOSERS, entry_tie_note, short_device, tie_note  # noqa: F401 - text of decisions, shared with explain's
from .cli_common import Failure, Usage, _console, _escape, _table


def _store():
    from ..store.cache import DecisionCache

    return DecisionCache()


def cmd_cache_path(args) -> int:
    store = _store()
    print(f"directory: {store.directory}")
    print(f"entries: {store.path}")
    return 0


def decision_row(key_id: str, d) -> dict:
    return entry_row(key_id, d.to_dict())


def entry_row(key_id: str, entry: dict) -> dict:
    """One decision's row of ``cache show`` from its entry (``Decision.to_dict``'s form; no Decision is built)."""
    from ..describe import describe_key

    candidates, backend = entry["candidates"], entry["backend"]
    chosen = candidates.get(backend)
    torch_c = candidates.get("torch")
    time_ms = chosen.get("time_ms") if chosen else None
    speedup = None
    if time_ms and torch_c is not None and torch_c.get("time_ms"):
        speedup = torch_c["time_ms"] / time_ms
    eager = (entry.get("modes") or {}).get("eager", backend)  # Decision.runner_up(): the eager choice's runner-up
    timed = [(c.get("time_ms"), n) for n, c in candidates.items()
             if n != eager and c.get("status") in _TIMED_LOSERS and c.get("time_ms") is not None]
    return {
        "key_id": key_id,
        "problem": describe_key(entry["key"]),
        "device": entry["key"]["device"]["name"],
        "backend": backend,
        "time_ms": time_ms,
        "speedup_vs_torch": speedup,
        "runner_up": min(timed)[1] if timed else None,
        "reason": entry_tie_note(backend, candidates),
        "created": entry["created"],
    }


def decisions_table(rows: list, title: str):
    """One row per decision. One device for every row goes into the title, not a column, so
    the table stays readable at 80 columns."""
    devices = sorted({r["device"] for r in rows})
    one_device = len(devices) <= 1
    if one_device and devices:
        title += f" on {short_device(devices[0])}"
    columns = ["problem"] + ([] if one_device else ["device"]) + ["backend", "ms", "vs torch", "runner-up"]
    table = _table(title, columns)
    for r in rows:
        backend = r["backend"] + (" (tie)" if r.get("reason", "") and str(r.get("reason")).startswith("tie") else "")
        cells = [r["problem"]] + ([] if one_device else [short_device(r["device"])]) + [
            backend,
            "-" if r["time_ms"] is None else f"{r['time_ms']:.4g}",
            "-" if r["speedup_vs_torch"] is None else f"{r['speedup_vs_torch']:.2f}x",
            r["runner_up"] or "-",
        ]
        table.add_row(*(_escape(x) for x in cells))
    return table


PLAIN_ROWS = 2000  # above this many decisions, ``cache show`` prints plain columns (a rich table of 60,000 rows takes minutes)


def plain_decisions(rows: list, title: str) -> str:
    """The columns of :func:`decisions_table` as plain text, one line per decision (long problems cut with '…')."""
    devices = sorted({r["device"] for r in rows})
    one_device = len(devices) <= 1
    if one_device and devices:
        title += f" on {short_device(devices[0])}"
    header = ["problem"] + ([] if one_device else ["device"]) + ["backend", "ms", "vs torch", "runner-up"]
    cells = []
    for r in rows:
        tie = " (tie)" if str(r.get("reason") or "").startswith("tie") else ""
        cells.append([r["problem"]] + ([] if one_device else [short_device(r["device"])]) + [
            r["backend"] + tie, "-" if r["time_ms"] is None else f"{r['time_ms']:.4g}",
            "-" if r["speedup_vs_torch"] is None else f"{r['speedup_vs_torch']:.2f}x", r["runner_up"] or "-"])
    caps = [34] + ([] if one_device else [14]) + [22, 8, 8, 18]
    widths = [min(cap, max([len(h)] + [len(c[i]) for c in cells])) for i, (h, cap) in enumerate(zip(header, caps))]

    def line(values):
        return " ".join((v if len(v) <= w else v[: w - 1] + "…").ljust(w) for v, w in zip(values, widths)).rstrip()
    return "\n".join([title, line(header), line(["-" * w for w in widths])] + [line(c) for c in cells])


def cmd_cache_show(args) -> int:
    store = _store()
    rows = sorted(store.map_entries(entry_row), key=lambda r: (r["created"], r["key_id"]))  # no Decision built
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    title = f"{len(rows)} decisions in {store.path}"
    if len(rows) > PLAIN_ROWS:
        print(plain_decisions(rows, title))
    else:
        _console().print(decisions_table(rows, title))
    return 0


def _no_key(store, args) -> str:
    """Why ``--key`` cleared nothing: no such key id, or the other filters leave its decision out."""
    from ..store.decision import decision_filter

    others = [f"--{name} {value}" for name, value in (("backend", args.backend), ("gpu", args.gpu)) if value]
    if others and store.count(decision_filter(key=args.key)):
        return (f"--key {args.key}: its decision is not one {' and '.join(others)} select (see `cache show --json`); "
                "nothing cleared")
    return f"--key {args.key}: no decision has a key id starting with it (see `cache show --json`); nothing cleared"


def cmd_cache_clear(args) -> int:
    store = _store()
    from ..store.decision import decision_filter

    match = decision_filter(args.backend, args.gpu, getattr(args, "key", None))
    if not args.yes and not sys.stdin.isatty():  # a missing flag: a usage error, before any work
        raise Usage("cache clear needs --yes when there is no terminal to ask for confirmation")
    if getattr(args, "key", None):  # one problem: a prefix of several ids is ambiguous, not all of them
        found = store.count(match)
        if found > 1:
            raise Usage(f"--key {args.key} is the start of {found} key ids: give more of the one to clear "
                        "(cache show --json lists them)")
    if not args.yes:
        count = store.count(match)
        if not count and getattr(args, "key", None):
            raise Failure(_no_key(store, args))
        answer = input(f"Clear {count} decision(s) from {store.path}? [y/N] ").strip().lower()
        if answer not in ("y", "yes"):
            print("nothing cleared")
            return 0
    removed = store.clear(match)
    if not store.persistent:
        raise Failure(f"removed {removed} decision(s) in memory only: the cache at {store.directory} cannot be written")
    if not removed and getattr(args, "key", None):  # as verify: a key id that names no decision is a mistake
        raise Failure(_no_key(store, args))
    print(f"cleared {removed} decision(s) from {store.path}")
    if args.compiled:  # FlashAttention-4's compile cache: only when asked (it takes seconds to minutes to refill)
        from ..backends.flash_attention import clear_compiled, fa4_compile_dir

        print(f"cleared {clear_compiled()} compiled kernel file(s) from {fa4_compile_dir()}")
    return 0


def cmd_cache_migrate(args) -> int:
    store = _store()
    done = store.migrate()
    if done is None:
        print(f"no version-1 file in {store.directory}: nothing to migrate")
        return 0
    moved, skipped = done
    print(f"migrated {moved} decision(s) into {store.path}" + (f"; {skipped} failed validation (see the warning)" if skipped else ""))
    return 0


def cmd_cache_export(args) -> int:
    store = _store()
    try:
        with open(args.file, "w") as fh:  # streamed: 60,000 entries never sit in memory as one document
            count = store.export_to(fh.write)
    except OSError as exc:
        raise Failure(f"cannot write {args.file}: {exc.strerror or exc}") from None
    print(f"exported {count} decision(s) to {args.file}")
    return 0


def cmd_cache_import(args) -> int:
    from ..store.cache import MAX_DOCUMENT_BYTES, CacheFileError, parse_document

    try:
        with open(args.file, "rb") as fh:
            text = fh.read(MAX_DOCUMENT_BYTES + 1)  # over the cap: refused below, never read whole
    except OSError as exc:
        raise Failure(f"cannot read {args.file}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise Failure(f"refused {args.file}: not UTF-8 text") from None
    try:
        entries = parse_document(text, args.file)
    except CacheFileError as exc:
        raise Failure(f"refused {args.file}: {exc.reason}") from None
    store = _store()
    count = store.put_many(entries.values(), replace=not args.keep_existing)
    store.flush()
    if not store.persistent:
        raise Failure(f"imported {count} decision(s) in memory only: the cache at {store.directory} cannot be written")
    print(f"imported {count} of {len(entries)} decision(s) into {store.path}")
    return 0
