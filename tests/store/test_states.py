"""The named states are string enums whose values are the decision schema's enums and the
texts the library always wrote (the on-disk format is unchanged)."""

import json

from diffsynth_attention.problem import ADDITIVE_FLOAT32
from diffsynth_attention.states import TIMED, CandidateStatus, LoadState, MaskKind, PlanSource
from diffsynth_attention.store import codec
from diffsynth_attention.store.decision import ACCEPTED, CHOSEN, REJECTED, SKIPPED, SLOWER, UNSUPPORTED, Candidate


def _defs():
    return json.loads(codec.SCHEMA_FILE.read_text())["$defs"]


def test_statuses_and_mask_kinds_are_the_schemas_enums():
    defs = _defs()
    assert [s.value for s in CandidateStatus] == defs["candidate"]["properties"]["status"]["enum"]
    assert [m.value for m in MaskKind] == defs["key"]["properties"]["problem"]["properties"]["mask"]["enum"]
    assert (CHOSEN, ACCEPTED, SLOWER, SKIPPED, REJECTED, UNSUPPORTED) == tuple(CandidateStatus)
    assert ADDITIVE_FLOAT32 is MaskKind.ADDITIVE_FLOAT32


def test_plan_sources():
    assert [s.value for s in PlanSource] == ["override", "cache", "tuned", "neighbour", "fallback", "loading", "empty"]


def test_members_behave_as_their_text():
    for member in (*CandidateStatus, *PlanSource, *MaskKind, *LoadState):
        text = member.value
        assert member == text and hash(member) == hash(text) and str(member) == f"{member}" == text
        assert repr(member) == repr(text) and json.dumps(member) == json.dumps(text)
        assert type(member).__call__(text) is member
    cand = Candidate(CandidateStatus.CHOSEN, 1.0, 0.001, None, 2.0, 5)
    assert json.dumps(cand.to_dict()) == json.dumps(Candidate("chosen", 1.0, 0.001, None, 2.0, 5).to_dict())


def test_candidates_read_from_an_entry_hold_the_enum():
    """``Candidate.status`` is a CandidateStatus, also when read from a file's dict."""
    cand = Candidate.from_dict({"status": "slower", "time_ms": 2.0})
    assert cand.status is CandidateStatus.SLOWER and cand.status in TIMED
    assert Candidate.from_dict({"status": "skipped"}).status not in TIMED


def test_load_states_are_the_enum():
    from diffsynth_attention.backends import REGISTRY, loading

    assert [s.value for s in LoadState] == ["ready", "loading", "failed", "unloaded", "deferred"]
    assert loading.state(REGISTRY["torch"]) is LoadState.READY  # no package to load
    assert all(isinstance(loading.state(b), LoadState) for b in REGISTRY.values())
    assert loading.PENDING == (LoadState.LOADING, LoadState.DEFERRED)
