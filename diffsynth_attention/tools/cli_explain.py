"""``diffsynth-attention explain``: the decision for one problem, given by its sizes on the command
line or as one problem of a shape file (a recording of a pipeline's calls, whose mask shape, layout
and memory order the flags cannot all say)."""

from __future__ import annotations

import argparse
import json

from ..states import CandidateStatus, MaskKind
from .cli_cache import tie_note
from .cli_common import Usage, _console

# the flags that say the problem (the rest, --device, --layout and --json, say how to explain it)
PROBLEM_FLAGS = ("batch", "heads", "heads_kv", "seq_q", "seq_kv", "head_dim", "dtype", "causal", "window", "mask",
                 "grad")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a whole number > 0")
    return value


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a whole number >= 0")
    return value


def add_parser(sub) -> None:
    p = sub.add_parser("explain", help="the decision, times and errors for one problem")
    p.add_argument("--batch", type=_positive, help="batch size (default 1)")
    p.add_argument("--heads", type=_positive, help="query heads")
    p.add_argument("--heads-kv", type=_positive, help="key/value heads (default: --heads)")
    p.add_argument("--seq-q", type=_positive, help="query length")
    p.add_argument("--seq-kv", type=_positive, help="key/value length (default: --seq-q)")
    p.add_argument("--head-dim", type=_positive, help="head dim")
    p.add_argument("--dtype", help="default bfloat16")
    p.add_argument("--causal", action="store_true", default=None, help="causal (top-left aligned, as PyTorch)")
    p.add_argument("--window", type=_non_negative, help="sliding window: query i attends to keys with |i - j| <= W")
    p.add_argument("--mask", choices=[m.value for m in MaskKind],
                   help="the mask kind of the call: bool (True attends), additive (in the dtype), additive_float32 "
                        "(a float32 bias with a 16-bit q); shape (batch, 1, seq-q, seq-kv) (default none)")
    p.add_argument("--grad", action="store_true", default=None,
                   help="the call needs gradients (its backward is tuned with it)")
    p.add_argument("--shapes", help="instead of the flags above: a JSON file of problems (a recording of da.record or "
                                    "DIFFSYNTH_ATTENTION_RECORD, the shape suite's format, a cache export document), "
                                    "of which one is explained as it was called (its mask shape, layout and memory order)")
    p.add_argument("--name", help="with --shapes: the problem's name in the file (needed where it holds several)")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--layout", default="b n s d", help="the layout of q, k, v and the output (default 'b n s d'; a "
                                                       "problem's recorded layout wins)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_explain)


def _from_file(args) -> dict:
    from .shapes import load_shapes_file

    given = [f"--{f.replace('_', '-')}" for f in PROBLEM_FLAGS if getattr(args, f) is not None]
    if given:
        raise Usage(f"--shapes names the problem; {', '.join(given)} cannot be combined with it")
    shapes = load_shapes_file(args.shapes)
    if args.name is None:
        if len(shapes) > 1:
            raise Usage(f"{args.shapes} holds {len(shapes)} problems: name one with --name (e.g. {shapes[0]['name']})")
        return shapes[0]
    named = [s for s in shapes if s["name"] == args.name]
    if not named:
        raise Usage(f"{args.shapes} has no problem named {args.name!r} (e.g. {shapes[0]['name']})")
    return named[0]


def check_explain(args) -> dict:
    """Every usage check of ``explain``, before any work; returns the problem."""
    from .devices import check_device
    from .shapes import check_layout, dtype_name, parse_shapes

    check_layout(args.layout)
    check_device(args.device)
    if args.shapes is not None:
        return _from_file(args)
    if args.name is not None:
        raise Usage("--name names a problem of the --shapes file")
    missing = [flag for flag, value in (("--heads", args.heads), ("--seq-q", args.seq_q), ("--head-dim", args.head_dim))
               if value is None]
    if missing:
        raise Usage(f"explain needs {', '.join(missing)} (or --shapes FILE)")
    dtype = args.dtype or "bfloat16"
    dtype_name(dtype, "--dtype")
    heads_kv = args.heads_kv or args.heads
    if args.heads % heads_kv:
        raise Usage(f"--heads {args.heads} must be a multiple of --heads-kv {heads_kv}")
    if args.causal and args.window is not None:
        raise Usage("--causal and --window cannot be combined")
    if args.mask not in (None, "none") and args.window is not None:
        raise Usage("--mask and --window cannot be combined")
    return parse_shapes([{
        "name": "explain", "batch": args.batch or 1, "heads_q": args.heads, "heads_kv": heads_kv,
        "seq_q": args.seq_q, "seq_kv": args.seq_kv or args.seq_q, "head_dim": args.head_dim, "dtype": dtype,
        "causal": bool(args.causal), **({"window": args.window} if args.window is not None else {}),
        **({"mask": args.mask} if args.mask not in (None, "none") else {}), "requires_grad": bool(args.grad),
    }], "command line")[0]


def cmd_explain(args) -> int:
    shape = check_explain(args)
    import torch

    from ..api import explain
    from ..backends import loading
    from ..tiers import EXACT, quality
    from .devices import resolve_device
    from .inputs import make_inputs

    device = resolve_device(args.device)
    q, k, v, kwargs = make_inputs(shape, device, None, args.layout)
    grad = bool(shape.get("requires_grad"))
    previous = loading.defer()  # a cached decision is reported without importing its package
    try:  # the exact tier, whatever is in force: random inputs never gate a low-precision candidate
        with torch.set_grad_enabled(grad), quality(EXACT):  # --grad: the key of a call that needs gradients
            info = explain(q, k, v, **kwargs)
    finally:
        loading.defer(previous)
    chosen_reason = tie_note(info.decision) if info.decision is not None else None
    if args.json:
        doc = info.as_dict()
        chosen = doc["candidates"].get(info.backend)
        if chosen is not None and chosen.get("status") == CandidateStatus.CHOSEN and not chosen.get("reason"):
            chosen["reason"] = chosen_reason
        print(json.dumps(doc, indent=1))
        return 0
    from ..explain_text import render_explanation

    render_explanation(info, _console(), chosen_reason)
    return 0
