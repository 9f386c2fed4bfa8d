"""Decision <-> entry: the one boundary of the cache format.

- The schema is ONE packaged file, ``diffsynth_attention/data/decisions.schema.json``
  (``cache_schema/`` documents it; a test checks the two agree).
- Validation is the schema's: a small compiler (:mod:`.schema_check`) turns the keywords the schema uses into a fast
  check (tens of microseconds an entry, where ``jsonschema`` takes about 0.6 ms), and
  ``jsonschema`` itself words the error of an entry that fails. A schema keyword the compiler does
  not know makes every check go through ``jsonschema``; a property test checks the two agree.
- Version 1 (one ``decisions.json`` of every entry) is read entry by entry by :class:`Legacy`.
Imports no torch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import sys
import threading
from pathlib import Path
from typing import Callable, Optional

from . import schema_check
from .decision import CHOSEN, Decision, key_id as hash_key

logger = logging.getLogger("diffsynth_attention")

SCHEMA_VERSION = 3  # written; READS holds every version an entry file may carry
READS = (2, 3)  # version 2: no host/device costs, modes or confirmation (an eager-only measurement)
MAX_ENTRY_BYTES = 64 * 1024  # an entry file over this is rejected unread
MAX_DOCUMENT_BYTES = 256 * 1024 * 1024  # an export/import document (60,000 entries export to ~118 MB)
MAX_LEGACY_BYTES = 512 * 1024 * 1024  # a v1 file being migrated
SCHEMA_FILE = Path(__file__).resolve().parent.parent / "data" / "decisions.schema.json"
ID = re.compile(r"^[0-9a-f]{24}$")


class CacheFileError(ValueError):
    """A cache file (or document) that cannot be used, with the path and the reason."""

    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


# -- the schema, compiled --------------------------------------------------------------------
_schema_doc: dict = {}
_validators: dict = {}
_fast: dict = {}
_unworded = threading.local()  # .on: this thread does not import jsonschema to word an error


def schema() -> dict:
    if not _schema_doc:
        from ..backend_names import BACKEND_NAMES

        _schema_doc.update(json.loads(SCHEMA_FILE.read_text()))
        _schema_doc["$defs"]["backend"] = {"enum": list(BACKEND_NAMES)}  # the catalogue is the one list
    return _schema_doc


def schema_validator(part: str = "entry"):
    """jsonschema's validator for one part of the schema (``$defs/<part>``)."""
    if part not in _validators:
        import jsonschema

        doc = schema()
        _validators[part] = jsonschema.Draft202012Validator(
            {"$schema": doc["$schema"], "$defs": doc["$defs"], "$ref": f"#/$defs/{part}"})
    return _validators[part]


def fast_check(part: str = "entry") -> Optional[Callable]:
    """The compiled check of ``$defs/<part>``, or None if the schema uses a keyword it does not know."""
    if part not in _fast:
        try:
            _fast[part] = schema_check.compile_check(schema()["$defs"], part)
        except (schema_check.Unknown, KeyError, TypeError, ValueError, re.error, SyntaxError) as exc:
            logger.debug("schema check not compiled (%s): using jsonschema", exc)
            _fast[part] = None
    return _fast[part]


class _Unworded:
    """An error the compiled check found where jsonschema, not imported, would have worded it."""

    absolute_path = ()
    message = "the compiled schema check refuses it (worded where the entry is read again)"


@contextlib.contextmanager
def unworded():
    """On this thread, a refused entry is not worded by jsonschema unless jsonschema is imported
    already: the preload thread reads the cache while the caller imports (an import of jsonschema,
    130 ms on a 2-core CPU, would hold up the caller's first result and risk the import locks)."""
    previous = getattr(_unworded, "on", False)
    _unworded.on = True
    try:
        yield
    finally:
        _unworded.on = previous


def schema_errors(entry, part: str = "entry") -> list:
    """The schema's errors for ``entry`` (empty if valid): the fast check, worded by jsonschema."""
    check = fast_check(part)
    try:
        if check is not None and check(entry):
            return []
    except RecursionError:
        raise
    except Exception:  # an odd value the compiled check did not expect: let jsonschema decide
        pass
    if check is not None and getattr(_unworded, "on", False) and "jsonschema" not in sys.modules:
        return [_Unworded()]
    return sorted(schema_validator(part).iter_errors(entry), key=lambda e: [str(p) for p in e.absolute_path])


# -- entries -------------------------------------------------------------------------------
def _refuse_constant(name):
    raise ValueError(f"{name} is not JSON")


def loads(text, where, allow_nan: bool = False):
    try:
        return json.loads(text, parse_constant=(lambda _: None) if allow_nan else _refuse_constant)
    except (ValueError, RecursionError) as exc:
        raise CacheFileError(where, f"not valid JSON ({str(exc)[:200]})") from None


def decode(data, where) -> str:
    if isinstance(data, str):
        return data
    try:
        return bytes(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CacheFileError(where, f"not UTF-8 ({exc.reason} at byte {exc.start})") from None


def check_entry(kid, entry, where, imported: bool = False) -> Decision:
    """A validated entry as a Decision (:func:`validate_entry`)."""
    validate_entry(kid, entry, where, imported)
    return Decision.from_dict(kid, entry)


def validate_entry(kid, entry, where, imported: bool = False) -> None:
    """Raise CacheFileError unless ``entry`` matches the schema and ``kid`` is a key id and the
    hash of the entry's key; for an ``imported`` entry, also unless its backend is the one
    candidate marked chosen (where one is marked)."""
    if not isinstance(kid, str) or not ID.match(kid):
        raise CacheFileError(where, f"{str(kid)[:40]!r} is not a key id (24 hex digits)")
    try:
        errors = schema_errors(entry)
    except RecursionError:
        raise CacheFileError(where, f"entry {kid} is nested too deeply") from None
    if errors:
        err = errors[0]
        at = "/".join([kid] + [str(p) for p in err.absolute_path])
        raise CacheFileError(where, f"does not match the schema at {at}: {err.message[:300]}")
    try:
        actual = hash_key(entry["key"])
    except (ValueError, TypeError) as exc:
        raise CacheFileError(where, f"entry {kid} has a key that is not JSON data ({exc})") from None
    if actual != kid:
        raise CacheFileError(where, f"entry {kid} is not the hash of its key ({actual})")
    chosen = [n for n, c in entry["candidates"].items() if c["status"] == CHOSEN] if imported else []
    if chosen and chosen != [entry["backend"]]:
        raise CacheFileError(where, f"entry {kid} says backend {entry['backend']!r} but marks "
                                    f"{', '.join(map(repr, chosen))} as chosen")


def finite(value):
    """``value`` with every NaN or infinity replaced by None (JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


def all_rejected(decision: Decision) -> bool:
    """True if no candidate of ``decision`` passed the numeric gate (:meth:`Decision.all_rejected`)."""
    return decision.all_rejected()


def render_entry(decision: Decision) -> str:
    """The text of one entry file. Raise CacheFileError if the decision does not validate."""
    entry = finite(decision.to_dict())
    validate_entry(decision.key_id, entry, f"decision {decision.key_id}")
    return json.dumps({"schema_version": SCHEMA_VERSION, "id": decision.key_id, "entry": entry},
                      indent=1, sort_keys=True, allow_nan=False) + "\n"


def parse_entry(data, kid: str, where="<entry>") -> Decision:
    """Parse and validate one entry file's bytes for key ``kid``. Raise CacheFileError."""
    return Decision.from_dict(kid, parse_entry_raw(data, kid, where))


def parse_entry_raw(data, kid: str, where="<entry>") -> dict:
    """One entry file's validated ``entry`` object (for documents: no Decision round trip). CacheFileError."""
    return parse_entry_text(data, kid, where, compact=False)[0]


# An entry file as render_entry writes it: the entry first, then the id and the version.
_HEAD = '{\n "entry": '
_TAIL = re.compile(r',\n "id": "([0-9a-f]{24})",\n "schema_version": (0|[1-9][0-9]{0,8})\n}\n?\Z')
_INDENT = re.compile(r"\n *")
_ENTRY_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)


def parse_entry_text(data, kid: str, where="<entry>", compact: bool = True) -> tuple:
    """(entry, text): :func:`parse_entry_raw`'s validated ``entry`` object, and (``compact``) its
    JSON text without whitespace, cut from the file where it is laid out as :func:`render_entry`
    writes it and holds no escape (so ``": "`` and line breaks occur nowhere but between
    tokens), else None (the caller encodes the object). Where render_entry wrote the file, the
    text is what ``json.dumps(entry, sort_keys=True, separators=(",", ":"))`` gives, with no
    float formatted again (an export of 60,000 entries). CacheFileError."""
    text = decode(data, where)
    doc, span = None, None
    if text.startswith(_HEAD):  # one decode of the entry, its end found by the decoder
        try:
            entry, end = _ENTRY_DECODER.raw_decode(text, len(_HEAD))
        except (ValueError, RecursionError):
            entry, end = None, 0  # json.loads below words the error
        tail = _TAIL.match(text, end) if isinstance(entry, dict) else None
        if tail is not None:
            doc, span = {"entry": entry, "id": tail.group(1), "schema_version": int(tail.group(2))}, (len(_HEAD), end)
    if doc is None:
        doc = loads(text, where)
    if not isinstance(doc, dict):
        raise CacheFileError(where, "not a JSON object")
    if doc.get("schema_version") not in READS or isinstance(doc.get("schema_version"), bool):
        raise CacheFileError(where, f"schema_version {str(doc.get('schema_version'))[:20]!r}, this library reads "
                                    f"{', '.join(map(str, READS))}")
    if set(doc) != {"schema_version", "id", "entry"}:
        raise CacheFileError(where, f"fields {sorted(map(str, doc))[:5]}, expected schema_version, id, entry")
    if doc["id"] != kid:
        raise CacheFileError(where, f"id {str(doc['id'])[:40]!r} does not match the file name {kid}")
    validate_entry(kid, doc["entry"], where)
    out = None
    if compact and span is not None and "\\" not in text:
        out = _INDENT.sub("", text[span[0]:span[1]]).replace('": ', '":')
    return doc["entry"], out


def parse_document(text, path="<data>") -> dict:
    """Parse and validate an export document (version 2, or a version-1 ``decisions.json``);
    return {key_id: Decision}. Raise CacheFileError on the first problem."""
    if len(text) > MAX_DOCUMENT_BYTES:
        raise CacheFileError(path, f"{len(text)} bytes, over the {MAX_DOCUMENT_BYTES}-byte cap")
    doc = loads(decode(text, path), path)
    if not isinstance(doc, dict):
        raise CacheFileError(path, "not a JSON object")
    version = doc.get("schema_version")
    if version not in (1,) + READS or isinstance(version, bool):
        raise CacheFileError(path, f"schema_version {str(version)[:20]!r}, this library reads 1, "
                                   f"{', '.join(map(str, READS))}")
    if set(doc) != {"schema_version", "entries"} or not isinstance(doc["entries"], dict):
        raise CacheFileError(path, "expected exactly schema_version and an object of entries")
    return {kid: check_entry(kid, entry, path, imported=True) for kid, entry in doc["entries"].items()}


DOCUMENT_HEAD = '{"entries":{'  # an export document, as json.dumps(sort_keys=True, separators=(",", ":")) writes it
DOCUMENT_TAIL = '},"schema_version":%d}\n' % SCHEMA_VERSION


def document_member(kid: str, entry: dict, first: bool, text: Optional[str] = None) -> str:
    """One ``"<key id>":<entry>`` member of a document's entries (after :data:`DOCUMENT_HEAD`);
    ``text``: the entry's compact JSON text where known (:func:`parse_entry_text`)."""
    if text is None:  # compact: tens of thousands of entries are written by the C encoder (indent is pure Python)
        text = json.dumps(entry, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return ("" if first else ",") + json.dumps(kid) + ":" + text


def exportable(kid: str, decision: Decision, invalid: list) -> Optional[dict]:
    """``decision``'s entry for a document, or None (``"<kid>: <reason>"`` added to ``invalid``) if it does not validate."""
    entry = finite(decision.to_dict())
    try:
        validate_entry(kid, entry, "export")
    except CacheFileError as exc:
        invalid.append(f"{kid}: {exc.reason}")
        return None
    return entry


def warn_left_out(invalid: list) -> None:
    if invalid:
        logger.warning("diffsynth_attention cache: left %d decision(s) out of the export (first: %s)", len(invalid), invalid[0])


def render_document(entries: dict, raw: Optional[dict] = None) -> str:
    """An export document of ``entries`` ({key_id: Decision}) and ``raw`` ({key_id: entry} already
    validated, as :func:`parse_entry_raw` gives them); decisions that do not validate are left
    out (one warning with the count and the first reason)."""
    out, invalid = dict(raw or {}), []
    for kid, d in sorted(entries.items()):
        entry = exportable(kid, d, invalid)
        if entry is not None:
            out[kid] = entry
    warn_left_out(invalid)
    parts = [DOCUMENT_HEAD] + [document_member(kid, out[kid], first=i == 0) for i, kid in enumerate(sorted(out))]
    return "".join(parts + [DOCUMENT_TAIL])


_WS = re.compile(r"[ \t\n\r]*")
_LEGACY_DECODER = json.JSONDecoder(parse_constant=lambda _: None)  # v1 files may hold NaN: read as null


class Legacy:
    """A version-1 ``decisions.json`` (``{"schema_version": 1, "entries": {id: entry}}``), indexed
    entry by entry: one small ``raw_decode`` at a time, so a 200 MB file never holds the GIL (an
    attention call's thread runs between entries) and never lives in memory as one object. An
    entry is decoded again when it is used (:meth:`entry`)."""

    def __init__(self, data, where):
        self.where = where
        self.text = decode(data, where)
        try:
            self.members = self._index()
        except (ValueError, IndexError, RecursionError) as exc:
            raise CacheFileError(where, f"not a version-1 cache file ({str(exc)[:200]})") from None

    def _expect(self, i: int, char: str) -> int:
        i = _WS.match(self.text, i).end()
        if self.text[i:i + 1] != char:
            raise ValueError(f"expected {char!r} at {i}")
        return _WS.match(self.text, i + 1).end()

    def _key(self, i: int):
        if self.text[i:i + 1] != '"':
            raise ValueError(f"expected a name at {i}")
        key, i = json.decoder.scanstring(self.text, i + 1)
        return key, self._expect(i, ":")

    def _after(self, i: int):
        """Past a member: (index, True) after a comma, (index, False) after the closing brace."""
        i = _WS.match(self.text, i).end()
        if self.text[i:i + 1] == ",":
            return _WS.match(self.text, i + 1).end(), True
        if self.text[i:i + 1] == "}":
            return i + 1, False
        raise ValueError(f"expected ',' or '}}' at {i}")

    def _index(self) -> dict:
        members, version, found = {}, None, False
        i = self._expect(0, "{")
        more = self.text[i:i + 1] != "}"
        while more:
            name, i = self._key(i)
            if name == "entries":
                found = True
                i = self._expect(i, "{")
                inner = self.text[i:i + 1] != "}"
                if not inner:
                    i += 1
                while inner:
                    kid, i = self._key(i)
                    _, end = _LEGACY_DECODER.raw_decode(self.text, i)
                    members[kid] = i
                    i, inner = self._after(end)
            else:
                value, i = _LEGACY_DECODER.raw_decode(self.text, i)
                version = value if name == "schema_version" else version
            i, more = self._after(i)
        if version != 1 or isinstance(version, bool) or not found:
            raise ValueError("no schema_version 1 and entries")
        return members

    def entry(self, kid: str) -> Decision:
        """The version-1 entry ``kid``, validated as version 2 (non-finite numbers as null). CacheFileError."""
        try:
            value, _ = _LEGACY_DECODER.raw_decode(self.text, self.members[kid])
        except (ValueError, RecursionError) as exc:
            raise CacheFileError(self.where, f"entry {kid}: {str(exc)[:200]}") from None
        return check_entry(kid, finite(value), self.where)
