"""cache_schema/decisions.schema.json, the standalone schema (backend names filled in from the
catalogue): equal to what the codec validates with, and a JSON Schema validator given it alone
accepts and refuses the entry files that ``cache import`` accepts and refuses on the schema's part."""
import copy
import json
from pathlib import Path

import jsonschema
import pytest

from diffsynth_attention.backend_names import BACKEND_NAMES
from diffsynth_attention.store import codec
from diffsynth_attention.store.cache import CacheFileError

from support.store_helpers import make_decision

ROOT = Path(__file__).resolve().parents[2]
STANDALONE = ROOT / "cache_schema" / "decisions.schema.json"


def standalone() -> dict:
    return json.loads(STANDALONE.read_text())


def test_the_written_schema_is_the_packaged_one_with_the_catalogue_filled_in():
    written, packaged = standalone(), json.loads(codec.SCHEMA_FILE.read_text())
    assert written["$defs"]["backend"]["enum"] == list(BACKEND_NAMES)  # run python scripts/gen_docs.py if not
    assert "enum" not in packaged["$defs"]["backend"]  # the package's copy names no backend
    for doc in (written, packaged):
        doc["$defs"].pop("backend")
    assert written == packaged


def _entry_file(mutate=None) -> tuple:
    d = make_decision(3)
    doc = json.loads(codec.render_entry(d))
    if mutate:
        mutate(doc["entry"])
    return d.key_id, doc


def _other_backend(entry):
    entry["backend"] = "flash_attention_9"
    entry["candidates"] = {"flash_attention_9": entry["candidates"].pop("torch")}


VARIANTS = {
    "valid": None,
    "another catalogue backend": lambda e: e.update(backend="xformers", candidates={"xformers": e["candidates"]["torch"]}),
    "a backend not in the catalogue": _other_backend,
    "a bad status": lambda e: e["candidates"]["torch"].update(status="won"),
    "a string time": lambda e: e["candidates"]["torch"].update(time_ms="fast"),
    "an unknown field": lambda e: e.update(colour="blue"),
    "no key": lambda e: e.pop("key"),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_a_validator_with_the_file_alone_agrees_with_the_cache(name):
    kid, doc = _entry_file(VARIANTS[name])
    try:
        jsonschema.validate(doc, standalone(), cls=jsonschema.Draft202012Validator)
        alone = True
    except jsonschema.ValidationError:
        alone = False
    try:
        codec.parse_entry(json.dumps(doc).encode(), kid)
        cache = True
    except CacheFileError:
        cache = False
    assert alone == cache, (name, alone, cache)
    assert alone == (name in ("valid", "another catalogue backend"))


def test_an_export_document_validates_against_the_documents_definition():
    d = make_decision(4)
    doc = json.loads(codec.render_document({d.key_id: d}))
    schema = standalone()
    document = {"$schema": schema["$schema"], "$defs": schema["$defs"], "$ref": "#/$defs/document"}
    jsonschema.validate(doc, document)
    bad = copy.deepcopy(doc)
    bad["entries"][d.key_id]["backend"] = "flash_attention_9"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, document)
