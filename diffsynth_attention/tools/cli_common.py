"""What every command of the command line shares: its exceptions (exit codes) and rich output."""

from __future__ import annotations

import argparse
import re
import sys

from ..describe import rich_escape, rich_table

EXPECTED = (ValueError, TypeError, OSError, RuntimeError, TimeoutError, KeyError)
PROG = "diffsynth-attention"


class Failure(Exception):
    """A failure with a one-line reason (exit code 1)."""


class Usage(Exception):
    """A usage error with a one-line message (exit code 2)."""


def _console(stream=None):
    from rich.console import Console

    return Console(file=stream or sys.stdout, soft_wrap=False, highlight=False)


_table = rich_table  # one definition each, in describe.py (explain's text uses them too)
_escape = rich_escape


def _key_prefix(text: str) -> str:
    if not re.fullmatch(r"[0-9a-f]{4,24}", text or ""):
        raise argparse.ArgumentTypeError(f"{text!r} is not a key id (4 to 24 hex digits of one, from `cache show --json`)")
    return text


def _device_text(text: str) -> str:
    """``--gpu``: text a device name contains. Blank is refused: it is in every name, so ``cache clear
    --gpu "$GPU"`` with the variable unset would clear every decision."""
    if not (text or "").strip():
        raise argparse.ArgumentTypeError(f"{text!r} is empty: give text that the device names of the decisions "
                                         "to clear contain, e.g. H100 (or leave --gpu out to clear every device's)")
    return text
