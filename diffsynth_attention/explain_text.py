"""The text of an :class:`~diffsynth_attention.dispatch.Explanation`: one header line and a rich
table of the candidates, then the backends that cannot serve the problem with their reasons.

``diffsynth-attention explain`` prints it, and so does ``print(da.explain(...))`` (at 80
columns), so the two always agree.
"""

from __future__ import annotations

import io
import re
import textwrap
from typing import Optional

from .states import CandidateStatus, PlanSource

WIDTH = 80
_HINT = re.compile(r"pip install (?:--[\w-]+ )*'[^']*'")
_GLUE = "\x00"


def split_hint(text: str) -> tuple:
    """(``text`` without its ``(pip install '...')`` hint, the hint or None)."""
    match = re.search(r"\s*\((pip install (?:--[\w-]+ )*'[^']*'[^)]*)\)", text)
    if match is None:
        return text, None
    return (text[:match.start()] + text[match.end():]).strip(), match.group(1)


def wrap_keeping_hints(text: str, width: int = WIDTH, indent: str = "  ", hanging: str = "    ") -> list:
    """``text`` wrapped to ``width`` columns, never inside a ``pip install '...'`` command (so
    it can be copied whole) nor inside a word. The lines go to a console with soft wrapping."""
    glued = _HINT.sub(lambda m: m.group(0).replace(" ", _GLUE), text)
    lines = textwrap.wrap(glued, width=width, initial_indent=indent, subsequent_indent=hanging,
                          break_long_words=False, break_on_hyphens=False)
    return [line.replace(_GLUE, " ") for line in lines] or [indent]


def render_explanation(info, console, chosen_reason: Optional[str] = None) -> None:
    """Print ``info`` on a rich ``console``."""
    from .describe import rich_escape as _escape, rich_table as _table, short_device, tie_note

    if chosen_reason is None and info.decision is not None:
        chosen_reason = tie_note(info.decision)
    device = info.key.get("device", {}).get("name", "?") if isinstance(info.key, dict) else "?"
    head = f"{info.problem} on {short_device(device)}: "
    if info.source == PlanSource.LOADING and info.decision is not None:  # the decision, not this process's stand-in
        console.print(_escape(head + f"{info.decision.backend} (cache)"))
        console.print(_escape(f"until {info.decision.backend} has loaded, a process serves these calls with {info.backend}"))
    else:
        console.print(_escape(head + f"{info.backend} ({info.source})"))
    if info.neighbour_of:
        console.print(_escape(f"decision of the neighbour key {info.neighbour_of}"))
    for line in quality_lines(getattr(info, "quality", None)):
        console.print(_escape(line))
    decision = info.decision
    if decision is not None:
        if decision.modes:  # the modes that picked another backend than eager calls
            picked = "; ".join(f"{m}: {b}" for m, b in sorted(decision.modes.items()))
            console.print(_escape(f"eager: {decision.backend}; {picked} (host + device time for compiled graphs, "
                                  "device time for CUDA graphs)"))
        if decision.confirmation:
            for line in wrap_keeping_hints(("PROVISIONAL (re-timed when the host is quiet, or by `cache verify`): "
                                            if decision.provisional else "") + decision.confirmation,
                                           min(console.width, WIDTH), indent="", hanging="  "):
                console.print(_escape(line), soft_wrap=True)
    split = _split(info)
    table = _table(None, ("backend", "status", "ms", "host/dev", "error", "reason") if split else
                   ("backend", "status", "ms", "error", "reason"))
    unsupported = []
    for name, c in info.candidates.items():
        if c.get("status") == CandidateStatus.UNSUPPORTED:  # long reasons: listed below the table, not folded into it
            unsupported.append((name, c.get("reason") or ""))
            continue
        reason = c.get("reason") or (chosen_reason if name == info.backend and c.get("status") == CandidateStatus.CHOSEN else None) or ""
        time_ms, error = c.get("time_ms"), c.get("error")
        cells = [name, c.get("status") or "-", "-" if time_ms is None else f"{time_ms:.4g}"]
        if split:
            host, device = c.get("host_ms"), c.get("device_ms")
            cells.append("-" if host is None or device is None else f"{host:.3g}/{device:.3g}")
        table.add_row(*(_escape(x) for x in cells + ["-" if error is None else f"{error:.2e}", reason]))
    console.print(table)
    if unsupported:
        console.print("unsupported here:")
        for name, reason in unsupported:
            for line in wrap_keeping_hints(f"{name}: {reason}", min(console.width, WIDTH)):
                console.print(_escape(line), soft_wrap=True)
    for name, why in (info.dropped or {}).items():
        if name not in info.candidates:
            console.print(_escape(f"dropped in this process: {name}: {why}"))


def _split(info) -> bool:
    """Whether any candidate carries host and device time (a GPU tuning of schema version 3)."""
    return any(c.get("host_ms") is not None for c in info.candidates.values())


def _num(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def quality_lines(q: Optional[dict]) -> list:
    """The quality tier's lines of an explanation: the tier and its bound, the gate's and the
    sentinel's last measured errors, the sentinel's count and a fallback (none for ``exact``)."""
    if not q:
        return []
    b = q.get("bound") or {}
    lines = [f"quality {q.get('tier')}: low precision within rel-L1 {_num(b.get('rel_l1'), 'g')}, "
             f"cosine {_num(b.get('cosine'), 'g')}"]
    for name, ev in (q.get("gate") or {}).items():
        at = f"batch {ev['worst_head_batch']} head" if ev.get("worst_head_batch") else "head"
        worst = (f"; worst {at} {ev['worst_head']}: {_num(ev.get('worst_head_rel_l1'), '.3g')}, "
                 f"{_num(ev.get('worst_head_cosine'), '.6f')}") if ev.get("worst_head") is not None else ""
        lines.append(f"gate {name}: rel-L1 {_num(ev.get('rel_l1'), '.3g')}, cosine {_num(ev.get('cosine'), '.6f')}{worst}")
    s = q.get("sentinel")
    if s:
        lines.append(f"sentinel: {s.get('checks')} checks in {s.get('calls')} calls (every {s.get('every')}), last "
                     f"rel-L1 {_num(s.get('last_rel_l1'), '.3g')}, cosine {_num(s.get('last_cosine'), '.6f')}")
    f = q.get("fallback")
    if f:
        lines.append(f"fell back from {f.get('from')} to {f.get('to')} after {f.get('after_calls')} calls: rel-L1 "
                     f"{_num(f.get('rel_l1'), '.3g')}, cosine {_num(f.get('cosine'), '.6f')}")
    return lines


def explanation_text(info, width: int = WIDTH) -> str:
    """``info`` as the command line prints it, at ``width`` columns, without colour."""
    from rich.console import Console

    buffer = io.StringIO()
    console = Console(file=buffer, width=width, soft_wrap=False, highlight=False, color_system=None,
                      force_terminal=False, legacy_windows=False)
    render_explanation(info, console)
    return buffer.getvalue().rstrip("\n")
