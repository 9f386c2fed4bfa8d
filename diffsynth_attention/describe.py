"""One description of a problem (and the text of a decision's tie and of a device), from a key's problem dict (``Problem.fields``):
``Problem.describe``, ``explain``, the logs and the command line's tables all use it. No torch
here: ``cache show`` describes decisions without importing it."""

from __future__ import annotations

import re
from typing import Optional

from .states import CandidateStatus, MaskKind

CANONICAL_LAYOUT = "b n s d, b n s d, b n s d -> b n s d"


def describe_problem(p: dict, layout: bool = False) -> str:
    """E.g. ``b=2 n=8/2 s=4096x77 d=64 float16 causal grad``; with ``layout``, a layout other
    than ``b n s d`` is appended in brackets."""
    head_dim_v = p.get("head_dim_v", p["head_dim"])
    parts = [
        f"b={p['batch']}",
        f"n={p['heads_q']}" + (f"/{p['heads_kv']}" if p["heads_kv"] != p["heads_q"] else ""),
        f"s={p['seq_q']}" + (f"x{p['seq_kv']}" if p["seq_kv"] != p["seq_q"] else ""),
        f"d={p['head_dim']}" + (f"/{head_dim_v}" if head_dim_v != p["head_dim"] else ""),
        p["dtype"],
    ]
    if p.get("causal"):
        parts.append("causal")
    if p.get("window") is not None:
        parts.append(f"window={p['window']}")
    if p.get("mask", MaskKind.NONE) != MaskKind.NONE:
        shape = p.get("mask_shape")
        parts.append(f"{p['mask']} mask" + (f" {list(shape)}" if shape is not None else ""))
    if p.get("requires_grad"):
        parts.append("grad")
    if layout and p.get("layout", CANONICAL_LAYOUT) != CANONICAL_LAYOUT:
        parts.append(f"[{p['layout']}]")
    return " ".join(parts)


def describe_key(key: dict) -> str:
    """A decision's problem as ``cache show`` and ``cache verify`` name it: :func:`describe_problem`
    with its layout, and a quality tier other than ``exact`` (it is in the key too) as ``quality=TIER``."""
    return describe_problem(key["problem"], layout=True) + (f" quality={key['quality']}" if key.get("quality") else "")


def tie_note(d) -> Optional[str]:
    """The chosen candidate's reason: the tuner's, else (for decisions saved before the tuner
    recorded it) the tie rule, when the chosen one is not the fastest of those timed."""
    return entry_tie_note(d.backend, {n: c.to_dict() for n, c in d.candidates.items()})


_TIMED_LOSERS = (CandidateStatus.ACCEPTED, CandidateStatus.SLOWER)


def entry_tie_note(backend: str, candidates: dict) -> Optional[str]:
    """:func:`tie_note` of an entry's ``backend`` and ``candidates`` (JSON objects)."""
    chosen = candidates.get(backend)
    if chosen is None:
        return None
    if chosen.get("reason"):
        return chosen["reason"]
    mine = chosen.get("time_ms")
    faster = [(c.get("time_ms"), n) for n, c in candidates.items()
              if n != backend and c.get("status") in _TIMED_LOSERS and c.get("time_ms") is not None
              and mine is not None and c.get("time_ms") < mine]
    if not faster:
        return None
    time_ms, name = min(faster)
    return (f"tie: within 2% of {name} ({time_ms:.4g} ms); a tie goes to the backend earlier in the preference order")


def short_device(name: str) -> str:
    """A device name without vendor marks and clock text, for narrow tables."""
    text = re.sub(r"\((R|TM|tm|r)\)", "", name)
    text = re.sub(r"\s+(CPU\s+)?@\s*[\d.]+\s*GHz", "", text)
    text = re.sub(r"\b(NVIDIA|Intel|AMD|Processor|CPU)\s+", "", text)
    text = re.sub(r"\s+(\d+-Core|Processor)\b", "", text)
    return re.sub(r"\s+", " ", text).strip()


def rich_table(title: Optional[str] = None, columns=()):
    """A rich table in the command line's style (rich is imported here, not at import)."""
    from rich.table import Table

    table = Table(title=title, title_justify="left", expand=False)
    for col in columns:
        table.add_column(col, overflow="fold")
    return table


def rich_escape(text) -> str:
    """``text`` with rich's markup escaped."""
    from rich.markup import escape

    return escape(str(text))
