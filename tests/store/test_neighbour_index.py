"""The persisted neighbour index (issue 31, item 4): a new length's neighbour lookup reads the few
entries of its cell (neighbour group and sequence-length buckets), listed by ``v2/groups/<cell>/``,
not every entry of the cache. Asserts on what is read, never on time."""
import copy
import os

from diffsynth_attention.store import fs as fs_mod
from diffsynth_attention.store import group_index
from diffsynth_attention.store.cache import DecisionCache
from diffsynth_attention.store.decision import Candidate, Decision, key_id
from diffsynth_attention.store.neighbours import cell, neighbour_group

from support.store_helpers import fake_key


def grouped_decision(i: int, group: int) -> Decision:
    """Decisions of ``group`` differ only in their sequence length (a neighbour group)."""
    key = copy.deepcopy(fake_key(0))
    key["problem"].update(seq_q=100 + i, seq_kv=100 + i, head_dim=8 * (group + 1), head_dim_v=8 * (group + 1))
    return Decision(key_id(key), key, "torch", {"torch": Candidate("chosen", 1.0, 0.0, reps=3)},
                    created="2026-01-01T00:00:00+00:00", tuning_seconds=0.01)


def _count_reads(monkeypatch) -> list:
    reads = []
    real = fs_mod.read_secure

    def counting(dfd, name, cap):
        reads.append(name)
        return real(dfd, name, cap)
    monkeypatch.setattr(fs_mod, "read_secure", counting)
    return reads


def _populate(folder, groups=10, per_group=20) -> dict:
    """{group: (a new key's fields in it, the key ids of its cell)}."""
    writer = DecisionCache(folder)
    by_group = {}
    for g in range(groups):
        ds = [grouped_decision(i, g) for i in range(per_group)]
        writer.put_many(ds)
        new = grouped_decision(per_group + 100, g).key  # a new length...
        new["problem"].update(seq_q=101, seq_kv=101)  # ...in the bucket of the first ones
        by_group[neighbour_group(ds[0].key)] = (new, {d.key_id for d in ds if cell(d.key) == cell(new)})
    assert writer.flush()
    return by_group


def test_a_lookup_reads_its_group_only_not_the_whole_cache(isolated, monkeypatch):
    by_group = _populate(isolated)
    group, (new, members) = next(iter(by_group.items()))
    assert 3 <= len(members) < 20
    reader = DecisionCache(isolated)  # another process: nothing in memory
    reads = _count_reads(monkeypatch)
    found = reader.neighbours(group, fields=new)
    assert {d.key_id for d in found} == members
    assert {r.removesuffix(".json") for r in reads if r.endswith(".json")} == members  # its cell of 200 entries
    reads.clear()
    assert {d.key_id for d in reader.neighbours(group, fields=new)} == members and reads == []  # once per process


def test_an_entry_written_since_by_another_process_is_found(isolated):
    by_group = _populate(isolated, groups=2, per_group=3)
    group, (new, members) = next(iter(by_group.items()))
    reader = DecisionCache(isolated)
    assert {d.key_id for d in reader.neighbours(group, fields=new)} == members
    since = grouped_decision(2, 0).key
    since["problem"].update(seq_q=103, seq_kv=103)
    since = Decision(key_id(since), since, "torch", {"torch": Candidate("chosen", 1.0, 0.0, reps=3)})
    DecisionCache(isolated).put(since)
    assert since.key_id in {d.key_id for d in reader.neighbours(group, fields=new)}


def test_a_cache_without_an_index_builds_it_once(isolated, monkeypatch):
    by_group = _populate(isolated, groups=4, per_group=5)
    vfd = fs_mod.open_dir(isolated / "v2")
    try:
        group_index.drop(vfd)  # as if an older version had written every entry
    finally:
        os.close(vfd)
    group, (new, members) = next(iter(by_group.items()))
    reads = _count_reads(monkeypatch)
    assert {d.key_id for d in DecisionCache(isolated).neighbours(group, fields=new)} == members
    assert len([r for r in reads if r.endswith(".json")]) == 20  # the one full read that builds the index
    reads.clear()
    assert {d.key_id for d in DecisionCache(isolated).neighbours(group, fields=new)} == members  # the next process
    assert len(reads) == len(members)


def test_cleared_entries_are_not_served_and_their_markers_go(isolated):
    by_group = _populate(isolated, groups=2, per_group=4)
    group, (new, members) = next(iter(by_group.items()))
    gone = sorted(members)[0]
    assert (isolated / "v2" / "groups" / cell(new) / gone).exists()
    DecisionCache(isolated).clear(lambda d: d.key_id == gone)
    assert gone not in {d.key_id for d in DecisionCache(isolated).neighbours(group, fields=new)}
    assert not (isolated / "v2" / "groups" / cell(new) / gone).exists()
    DecisionCache(isolated).clear()
    assert DecisionCache(isolated).neighbours(group, fields=new) == []
    assert not any((isolated / "v2" / "groups").glob("*/*"))
