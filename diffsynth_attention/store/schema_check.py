"""The cache schema compiled to Python (:func:`compile_check`), as fastjsonschema does: straight-line
checks equal to validating against the schema for the keywords it uses, a few microseconds an
entry where ``jsonschema`` takes about 0.6 ms. A whole-cache read (60,000 entries) checks every
entry, so the generated code avoids what costs there: a type established once is not tested
again (the dict guards of ``required``/``properties`` after ``type: object``), a number's type
and bound are one test, and small definitions (``ms``, ``backend``, ``candidate``) are inlined
instead of called. A keyword the compiler does not know raises :class:`Unknown` (the caller then
uses ``jsonschema`` for everything); a property test checks that the two agree."""

from __future__ import annotations

import re
from typing import Callable

ANNOTATIONS = {"$schema", "$id", "$defs", "title", "description", "format"}  # format: not asserted (no checker)


class Unknown(Exception):
    """A schema keyword the compiler does not know: use jsonschema for everything."""


def is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def json_equal(a, b) -> bool:
    """Equality as JSON Schema means it: booleans are not numbers, 1 == 1.0."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, str) or isinstance(b, str):
        return isinstance(a, str) and isinstance(b, str) and a == b
    if is_number(a) and is_number(b):
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    return a is None and b is None


# Exact JSON types first (what json.loads gives: one cheap test), isinstance for subclasses.
TYPE_EXPR = {
    "object": "isinstance({v}, dict)",
    "array": "isinstance({v}, list)",
    "string": "isinstance({v}, str)",
    "boolean": "isinstance({v}, bool)",
    "null": "{v} is None",
    "number": "(type({v}) is float or type({v}) is int or (isinstance({v}, (int, float)) and not isinstance({v}, bool)))",
    "integer": "(type({v}) is int or (isinstance({v}, int) and not isinstance({v}, bool)) "
               "or (isinstance({v}, float) and {v}.is_integer()))",
}
_NUMERIC = {"number", "integer", "null"}
_INLINE_DEPTH = 4  # definitions referenced deeper than this (or recursively) are called, not inlined


class Compiler:
    """One function per ``$defs`` entry that is called; the others are inlined where used."""

    def __init__(self, defs: dict):
        self.defs, self.consts, self.lines, self.done, self.todo, self.n = defs, [], [], set(), [], 0

    def const(self, value) -> str:
        self.consts.append(value)
        return f"C[{len(self.consts) - 1}]"

    def var(self) -> str:
        self.n += 1
        return f"x{self.n}"

    def _def(self, arg) -> str:
        if not isinstance(arg, str) or not arg.startswith("#/$defs/") or arg[8:] not in self.defs:
            raise Unknown(repr(arg))
        return arg[8:]

    def ref(self, arg) -> str:
        name = self._def(arg)
        if name not in self.done:
            self.done.add(name)
            self.todo.append(name)
        return f"d_{re.sub(r'[^0-9A-Za-z_]', '_', name)}"

    def body(self, node, v: str, ind: str, stack: tuple = ()) -> list:
        """Lines that ``return False`` unless ``v`` matches ``node`` (``stack``: the definitions being inlined)."""
        if node is True:
            return []
        if node is False:
            return [f"{ind}return False"]
        if not isinstance(node, dict):
            raise Unknown(repr(node))
        words = {w: a for w, a in node.items() if w not in ANNOTATIONS}
        out, known = [], None
        if "type" in words:
            arg = words.pop("type")
            names = [arg] if isinstance(arg, str) else list(arg)
            if any(t not in TYPE_EXPR for t in names):
                raise Unknown(f"type {arg}")
            bound = [(w, words.pop(w)) for w in ("minimum", "exclusiveMinimum") if w in words] if set(names) <= _NUMERIC else []
            numbers = [TYPE_EXPR[t].format(v=v) for t in names if t != "null"]
            if bound and numbers:  # the type and the bound in one test (a bound only applies to a number)
                cond = f"({' or '.join(numbers)})" + "".join(
                    f" and {v} {'>=' if w == 'minimum' else '>'} {a!r}" for w, a in bound)
                cond = f"{v} is None or ({cond})" if "null" in names else cond
                out.append(f"{ind}if not ({cond}): return False")
            else:
                for w, a in bound:
                    words[w] = a
                out.append(f"{ind}if not ({' or '.join(TYPE_EXPR[t].format(v=v) for t in names)}): return False")
            known = names[0] if len(names) == 1 else None
        guard = {"object": f"isinstance({v}, dict)", "array": f"isinstance({v}, list)"}
        for word, arg in words.items():
            if word == "$ref":
                name = self._def(arg)
                if name in stack or len(stack) >= _INLINE_DEPTH:
                    out.append(f"{ind}if not {self.ref(arg)}({v}): return False")
                else:
                    out += self.body(self.defs[name], v, ind, stack + (name,))
            elif word == "enum" and all(isinstance(a, str) for a in arg):
                out.append(f"{ind}if not (isinstance({v}, str) and {v} in {self.const(frozenset(arg))}): return False")
            elif word in ("enum", "const"):
                options = self.const(list(arg) if word == "enum" else [arg])
                out.append(f"{ind}if not any(_eq({v}, a) for a in {options}): return False")
            elif word == "pattern":
                out.append(f"{ind}if isinstance({v}, str) and {self.const(re.compile(arg))}.search({v}) is None: return False")
            elif word in ("minimum", "exclusiveMinimum"):
                op = ">=" if word == "minimum" else ">"
                out.append(f"{ind}if isinstance({v}, (int, float)) and not isinstance({v}, bool) and not {v} {op} {arg!r}: return False")
            elif word in ("minItems", "maxItems"):
                op = ">=" if word == "minItems" else "<="
                test = "" if known == "array" else f"{guard['array']} and "
                out.append(f"{ind}if {test}not len({v}) {op} {int(arg)}: return False")
            elif word == "items":
                item = self.var()
                inner = self.body(arg, item, ind + "    " * (1 if known == "array" else 2), stack)
                if inner and known == "array":
                    out += [f"{ind}for {item} in {v}:"] + inner
                elif inner:
                    out += [f"{ind}if {guard['array']}:", f"{ind}    for {item} in {v}:"] + inner
            elif word in ("required", "properties", "additionalProperties", "propertyNames"):
                lines = self._object(word, arg, node, v, ind if known == "object" else ind + "    ", stack)
                if lines and known != "object":
                    lines = [f"{ind}if {guard['object']}:"] + lines
                out += lines
            else:
                raise Unknown(word)
        return out

    def _object(self, word: str, arg, node: dict, v: str, ind: str, stack: tuple) -> list:
        """The lines of one object keyword, for a ``v`` known to be a dict."""
        if word == "required":
            return [f"{ind}if not {self.const(frozenset(arg))} <= {v}.keys(): return False"]
        if word == "properties":
            out = []
            for name, sub in arg.items():
                item = self.var()
                inner = self.body(sub, item, ind + "    ", stack)
                if inner:
                    out += [f"{ind}if {name!r} in {v}:", f"{ind}    {item} = {v}[{name!r}]"] + inner
            return out
        if word == "additionalProperties":
            known = self.const(frozenset(node.get("properties", {})))
            if arg is False:
                return [f"{ind}if not {v}.keys() <= {known}: return False"]
            k, item = self.var(), self.var()
            inner = self.body(arg, item, ind + "        ", stack)
            if not inner:
                return []
            if not node.get("properties"):
                inner = self.body(arg, item, ind + "    ", stack)
                return [f"{ind}for {item} in {v}.values():"] + inner
            return [f"{ind}for {k}, {item} in {v}.items():", f"{ind}    if {k} not in {known}:"] + inner
        k = self.var()  # propertyNames
        inner = self.body(arg, k, ind + "    ", stack)
        return [f"{ind}for {k} in {v}:"] + inner if inner else []

    def compile(self, part: str) -> Callable:
        entry = self.ref(f"#/$defs/{part}")
        while self.todo:
            name = self.todo.pop()
            self.lines += [f"def {self.ref('#/$defs/' + name)}(x0):"] + self.body(
                self.defs[name], "x0", "    ", (name,)) + ["    return True"]
        namespace = {"C": self.consts, "_eq": json_equal}
        exec(compile("\n".join(self.lines), f"<schema check of {part}>", "exec"), namespace)  # noqa: S102 - our own schema
        return namespace[entry]


def compile_check(defs: dict, part: str) -> Callable:
    """The compiled check of ``defs[part]``: ``check(value) -> bool``. Raises :class:`Unknown`."""
    return Compiler(defs).compile(part)
