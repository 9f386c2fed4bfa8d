"""Problem lists for ``warm`` and the benchmarks: the shape-file format, the presets, and the
cut-down versions for a CPU. No torch here: the command line checks its arguments with it
before any work starts.

A problem is a dict with the fields of ``data/diffsynth_shapes.json`` (a copy of the shape
suite of attention problems that DiffSynth-Studio pipelines issue): ``name``, ``batch``,
``heads_q``, ``heads_kv``, ``seq_q``, ``seq_kv``, ``head_dim``, and optionally ``causal``
(default false), ``dtype`` (default bfloat16), ``window`` and ``model``; and, as a recording
(:mod:`diffsynth_attention.recording`) writes them, ``head_dim_v``, ``mask`` (a mask kind),
``mask_shape``, ``requires_grad``, ``layout`` (the key's layout text, or one pattern for q, k, v
and the output: it wins over ``--layout``) and ``memory``. A shape file may also be an export
document (``cache export``): its decisions' problems.

Presets: ``all`` is the whole suite at its real size; ``cpu`` is the suite cut down to CPU
size (:func:`scale_for_cpu`), without repeats; any other preset is one problem of the suite
by name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

SHAPES_FILE = Path(__file__).resolve().parent.parent / "data" / "diffsynth_shapes.json"
REQUIRED = ("name", "batch", "heads_q", "heads_kv", "seq_q", "seq_kv", "head_dim")
# accepted spelling -> torch dtype name
DTYPE_NAMES = {"float16": "float16", "bfloat16": "bfloat16", "float32": "float32", "float64": "float64",
               "fp16": "float16", "bf16": "bfloat16", "fp32": "float32", "half": "float16"}
CPU_MAX_SEQ = 512
CPU_MAX_HEADS = 8
AXES = ("b", "n", "s", "d")


class ShapeFileError(ValueError):
    pass


def dtype_name(text: str, what: str = "dtype") -> str:
    """The torch dtype name for an accepted spelling; a ValueError naming ``what`` otherwise."""
    if text not in DTYPE_NAMES:
        raise ShapeFileError(f"{what} {text!r} is not one of {', '.join(sorted(DTYPE_NAMES))}")
    return DTYPE_NAMES[text]


def check_layout(layout: str, what: str = "--layout") -> str:
    """``layout`` if it is an einops pattern over the axes b, n, s, d (each once; ``(n d)`` may
    be packed), else a ValueError in the user's terms."""
    from einops import EinopsError
    from einops.parsing import ParsedExpression

    rule = (f"{what} {layout!r} is not a layout: name the axes b (batch), n (heads), s (sequence) and d (head dim) "
            "once each, e.g. 'b s n d' or 'b s (n d)'")
    try:
        parsed = ParsedExpression(layout)
    except EinopsError:
        raise ShapeFileError(rule) from None
    names = [a for group in parsed.composition for a in group] if not parsed.has_ellipsis else []
    if sorted(names) != sorted(AXES):
        raise ShapeFileError(rule)
    for group in parsed.composition:
        if len(group) > 1 and sorted(group) != ["d", "n"]:
            raise ShapeFileError(f"{what} {layout!r}: only the heads and head dim can be packed, as '(n d)'")
    return layout


def parse_shapes(doc, source: str) -> list:
    """Validate a shapes document ({"shapes": [...]} or a list); return the problem dicts."""
    shapes = doc.get("shapes") if isinstance(doc, dict) else doc
    if not isinstance(shapes, list) or not shapes:
        raise ShapeFileError(f"{source}: expected a non-empty list of problems under 'shapes'")
    out = []
    for i, s in enumerate(shapes):
        named = isinstance(s, dict) and isinstance(s.get("name"), str) and s.get("name")
        where = f"{source}: problem {s['name']!r}" if named else f"{source}: the problem at position {i + 1}"
        if not isinstance(s, dict):
            raise ShapeFileError(f"{where}: not an object")
        missing = [f for f in REQUIRED if f not in s]
        if missing:
            raise ShapeFileError(f"{where}: missing {', '.join(missing)}")
        for f in REQUIRED[1:]:
            if isinstance(s[f], bool) or not isinstance(s[f], int) or s[f] <= 0:
                raise ShapeFileError(f"{where}: {f}={s[f]!r} must be a positive whole number")
        if s["heads_q"] % s["heads_kv"]:
            raise ShapeFileError(f"{where}: heads_q ({s['heads_q']}) must be a multiple of heads_kv ({s['heads_kv']})")
        window = s.get("window")
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 0):
            raise ShapeFileError(f"{where}: window={window!r} must be a whole number >= 0")
        causal = s.get("causal", False)
        if not isinstance(causal, bool):
            raise ShapeFileError(f"{where}: causal={causal!r} must be true or false")
        if causal and window is not None:
            raise ShapeFileError(f"{where}: causal and window cannot be combined")
        dtype = s.get("dtype", "bfloat16")
        if not isinstance(dtype, str):
            raise ShapeFileError(f"{where}: dtype {dtype!r} is not one of {', '.join(sorted(DTYPE_NAMES))}")
        dtype_name(dtype, f"{where}: dtype")
        _check_recorded_fields(s, where)
        out.append({**s, "dtype": dtype, "causal": causal})
    return out


def _check_recorded_fields(s: dict, where: str) -> None:
    """The optional fields a recording or an export adds: a mask kind and its shape, gradients,
    a layout, a value head dim."""
    from ..states import MaskKind

    kinds = [m.value for m in MaskKind]
    mask = s.get("mask", MaskKind.NONE)
    if mask not in kinds:
        raise ShapeFileError(f"{where}: mask={mask!r} is not one of {', '.join(kinds)}")
    if mask != MaskKind.NONE and s.get("window") is not None:
        raise ShapeFileError(f"{where}: a mask and a window cannot be combined")
    shape = s.get("mask_shape")
    if shape is not None:
        target = (s["batch"], s["heads_q"], s["seq_q"], s["seq_kv"])
        if mask == MaskKind.NONE or not isinstance(shape, list) or len(shape) != 4 or any(
                isinstance(n, bool) or not isinstance(n, int) or n not in (1, t) for n, t in zip(shape, target)):
            raise ShapeFileError(f"{where}: mask_shape={shape!r} must be 4 whole numbers, each 1 or the problem's "
                                 f"(batch, heads_q, seq_q, seq_kv) = {list(target)}, with a mask")
    if not isinstance(s.get("requires_grad", False), bool):
        raise ShapeFileError(f"{where}: requires_grad={s['requires_grad']!r} must be true or false")
    head_dim_v = s.get("head_dim_v", s["head_dim"])
    if isinstance(head_dim_v, bool) or not isinstance(head_dim_v, int) or head_dim_v <= 0:
        raise ShapeFileError(f"{where}: head_dim_v={head_dim_v!r} must be a positive whole number")
    if "layout" in s:
        layout_patterns(s["layout"], f"{where}: layout")


def layout_patterns(text, what: str = "layout") -> tuple:
    """(q, k, v, out patterns, dims) of a layout: one pattern for all four, or the key's text
    ``"q, k, v -> out"`` with packed lengths after it (``"... -> b s (n d) d=64"``)."""
    if not isinstance(text, str):
        raise ShapeFileError(f"{what} {text!r} is not a layout")
    if "->" not in text:
        return (check_layout(text, what),) * 4 + ({},)
    inputs, _, rest = text.partition("->")
    dims = {}
    out = rest.strip()
    if "=" in out:
        out, _, spec = out.rpartition(" ")
        for item in spec.split(","):
            axis, _, n = item.partition("=")
            if axis not in AXES or not n.isdigit():
                raise ShapeFileError(f"{what} {text!r}: {item!r} is not a packed length such as d=64")
            dims[axis] = int(n)
    patterns = [p.strip() for p in inputs.split(",")]
    if len(patterns) != 3:
        raise ShapeFileError(f"{what} {text!r}: expected 'q, k, v -> out'")
    return tuple(check_layout(p, what) for p in (*patterns, out.strip())) + (dims,)


def shapes_from_export(doc: dict, source: str) -> list:
    """The problems of an export document's decisions (``cache export``), one per distinct problem."""
    from ..recording import shape_from_fields

    entries = doc.get("entries")
    if not isinstance(entries, dict) or not entries:
        raise ShapeFileError(f"{source}: an export document with no entries")
    shapes = []
    for kid, entry in sorted(entries.items()):
        problem = entry.get("key", {}).get("problem") if isinstance(entry, dict) else None
        if not isinstance(problem, dict):
            raise ShapeFileError(f"{source}: entry {str(kid)[:24]!r} has no key.problem")
        try:
            shapes.append(shape_from_fields(problem, f"{str(kid)[:8]}"))
        except (KeyError, TypeError):
            raise ShapeFileError(f"{source}: entry {str(kid)[:24]!r}: its key.problem is not a problem") from None
    return shapes


def load_shapes_file(path) -> list:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ShapeFileError(f"cannot read shapes file {path}: {exc.strerror or exc}") from None
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise ShapeFileError(f"{path}: not valid JSON ({exc})") from None
    if isinstance(doc, dict) and "entries" in doc and "schema_version" in doc:  # a cache export
        return parse_shapes(shapes_from_export(doc, str(path)), str(path))
    return parse_shapes(doc, str(path))


def builtin_shapes() -> list:
    return load_shapes_file(SHAPES_FILE)


def preset_names() -> list:
    return ["all", "cpu"] + [s["name"] for s in builtin_shapes()]


def scale_for_cpu(shape: dict) -> dict:
    """A problem cut down to CPU size: batch 1, at most 8 heads and 512 tokens per side.

    Cross-attention stays cross: when both sides would be cut to the same length, the shorter
    side of the original gets a quarter of the longer one's."""
    if shape["name"].endswith("@cpu"):
        return shape
    heads_q = min(shape["heads_q"], CPU_MAX_HEADS)
    groups = shape["heads_q"] // shape["heads_kv"]
    heads_kv = max(1, heads_q // groups) if heads_q % groups == 0 else heads_q
    seq_q, seq_kv = min(shape["seq_q"], CPU_MAX_SEQ), min(shape["seq_kv"], CPU_MAX_SEQ)
    if shape["seq_q"] != shape["seq_kv"] and seq_q == seq_kv:
        if shape["seq_kv"] < shape["seq_q"]:
            seq_kv = max(1, seq_q // 4)
        else:
            seq_q = max(1, seq_kv // 4)
    out = {**shape, "name": shape["name"] + "@cpu", "batch": 1, "heads_q": heads_q, "heads_kv": heads_kv,
           "seq_q": seq_q, "seq_kv": seq_kv}
    if shape.get("mask_shape") is not None:  # the dims that were the problem's follow it
        out["mask_shape"] = [1 if n == 1 else new for n, new in zip(shape["mask_shape"], (1, heads_q, seq_q, seq_kv))]
    return out


def identity(shape: dict, dtype=None) -> tuple:
    """What makes two problems the same problem (everything but the name and description)."""
    mask_shape = shape.get("mask_shape")
    return (shape["batch"], shape["heads_q"], shape["heads_kv"], shape["seq_q"], shape["seq_kv"], shape["head_dim"],
            bool(shape.get("causal", False)), shape.get("window"), dtype or DTYPE_NAMES[shape["dtype"]],
            shape.get("head_dim_v"), shape.get("mask", "none"), None if mask_shape is None else tuple(mask_shape),
            bool(shape.get("requires_grad", False)), shape.get("layout"), shape.get("memory"))


def distinct(shapes: list, dtype=None) -> list:
    """``shapes`` without repeats of one problem; a kept problem lists the names it stands for
    under ``also`` (e.g. four suite problems that are one problem at CPU size)."""
    out, seen = [], {}
    for s in shapes:
        ident = identity(s, dtype)
        if ident in seen:
            kept = seen[ident]
            if s["name"] != kept["name"] and s["name"] not in kept.setdefault("also", []):
                kept["also"].append(s["name"])
            continue
        s = dict(s)
        seen[ident] = s
        out.append(s)
    return out


def select_presets(names: Iterable[str]) -> list:
    """The problems of presets ``names`` (each may be comma-separated), in order."""
    shapes = builtin_shapes()
    by_name = {s["name"]: s for s in shapes}
    out = []
    for name in names:
        for part in [p.strip() for p in name.split(",") if p.strip()]:
            if part == "all":
                out += shapes
            elif part == "cpu":
                out += [scale_for_cpu(s) for s in shapes]
            elif part in by_name:
                out.append(by_name[part])
            else:
                raise ShapeFileError(f"unknown preset {part!r}; presets: {', '.join(preset_names())}")
    return out
