"""HoldingIndex: the grow-only holder-fact set, its summary and its merge laws."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cassette.errors import FabricError, StatusCode
from cassette.keys import ContentKey
from gossip.holding import (
    RECORD_SIZE,
    FactRun,
    HeldContent,
    HoldingIndex,
    fact_fingerprint,
    facts_to_runs,
    runs_to_facts,
)

KEYS = [ContentKey.of("request", b"k%d" % i) for i in range(8)]
DIGESTS = [hashlib.blake2b(b"d%d" % i, digest_size=32).digest() for i in range(4)]
NODES = ["a", "b", "c", "d"]


def digest_of(key: bytes) -> bytes:
    return hashlib.blake2b(bytes(key), digest_size=32).digest()


def key(i: int) -> ContentKey:
    return ContentKey.of("request", b"key-%d" % i)


# -- strategies ------------------------------------------------------------------
# arbitrary facts: equivocations and digest conflicts included
any_fact = st.builds(
    HeldContent,
    node_id=st.sampled_from(NODES),
    key=st.sampled_from(KEYS),
    digest=st.sampled_from(DIGESTS),
    seq=st.integers(1, 6),
)
fact_lists = st.lists(any_fact, max_size=25)


def world_fact(origin: str, seq: int) -> HeldContent:
    """The one fact a well-behaved origin records at ``seq`` (ledgers never equivocate)."""
    k = ContentKey.of("request", f"{origin}/{seq % 5}".encode())  # keys shared between origins
    return HeldContent(origin, k, digest_of(k), seq)


world_facts = st.lists(st.tuples(st.sampled_from(NODES), st.integers(1, 12)), max_size=40).map(
    lambda pairs: [world_fact(o, s) for o, s in pairs]
)


def index_of(*fact_lists_) -> HoldingIndex:
    idx = HoldingIndex()
    for fl in fact_lists_:
        idx.merge(fl)
    return idx


def observable(idx: HoldingIndex):
    """Everything a reader of the index can observe, in a comparable form."""
    keys = sorted(idx.keys())
    return (
        frozenset(idx.facts()),
        len(idx),
        idx.summary(),
        idx.summary_digest(),
        {k: idx.holders(k) for k in keys},
        sorted(idx.digest_conflicts()),
        {k: idx.conflicts(k) for k in keys},
    )


# -- HeldContent -------------------------------------------------------------------
def test_held_content_validates_every_field():
    k = KEYS[0]
    d = DIGESTS[0]
    HeldContent("a", k, d, 1)
    for args, field in [
        (("", k, d, 1), "node_id"),
        ((7, k, d, 1), "node_id"),
        (("x" * 256, k, d, 1), "node_id"),
        (("a", b"short", d, 1), "key"),
        (("a", k, b"\x00" * 31, 1), "digest"),
        (("a", k, "text", 1), "digest"),
        (("a", k, d, 0), "seq"),
        (("a", k, d, 1 << 40), "seq"),
        (("a", k, d, True), "seq"),
    ]:
        with pytest.raises(FabricError) as ei:
            HeldContent(*args)
        assert ei.value.status_code is StatusCode.INVALID_ARGUMENT
        assert ei.value.message.startswith(field), ei.value.message


def test_held_content_is_frozen_and_accepts_raw_key_bytes():
    f = HeldContent("a", bytes(KEYS[1]), bytearray(DIGESTS[1]), 3)
    assert type(f.key) is ContentKey and f.key == KEYS[1]
    assert type(f.digest) is bytes
    assert f.record == bytes(KEYS[1]) + DIGESTS[1] and len(f.record) == RECORD_SIZE
    with pytest.raises(AttributeError):
        f.seq = 4  # type: ignore[misc]


# -- local facts -------------------------------------------------------------------
def test_add_local_sequences_facts_in_ledger_order():
    idx = HoldingIndex("me")
    facts = [idx.add_local(key(i), digest_of(key(i))) for i in range(5)]
    assert [f.seq for f in facts] == [1, 2, 3, 4, 5]
    assert idx.summary() == {"me": 5}
    assert idx.holders(key(2)) == [("me", digest_of(key(2)))]
    assert idx.knows(key(2)) and not idx.knows(key(99))


def test_add_local_again_is_a_no_op_but_a_new_digest_is_refused():
    idx = HoldingIndex("me")
    f = idx.add_local(key(1), digest_of(key(1)))
    assert idx.add_local(key(1), digest_of(key(1))) == f
    assert len(idx) == 1
    with pytest.raises(FabricError) as ei:
        idx.add_local(key(1), DIGESTS[0])
    assert ei.value.status_code is StatusCode.FAILED_PRECONDITION


def test_add_local_replay_with_explicit_seqs_matches_gossiped_own_facts():
    """A restarted node may hear its own facts from peers before it replays its ledger."""
    idx = HoldingIndex("me")
    idx.merge([HeldContent("me", key(2), digest_of(key(2)), 2)])
    assert idx.high_water("me") == 0  # seq 1 is missing: an out-of-order extra
    f1 = idx.add_local(key(1), digest_of(key(1)), seq=1)
    f2 = idx.add_local(key(2), digest_of(key(2)), seq=2)
    assert (f1.seq, f2.seq) == (1, 2)
    assert idx.high_water("me") == 2 and len(idx) == 2
    nxt = idx.add_local(key(3), digest_of(key(3)))
    assert nxt.seq == 3


def test_add_local_refuses_a_seq_naming_other_content():
    idx = HoldingIndex("me")
    idx.merge([HeldContent("me", key(7), digest_of(key(7)), 1)])  # peers remember our seq 1
    with pytest.raises(FabricError) as ei:
        idx.add_local(key(1), digest_of(key(1)), seq=1)  # a wiped ledger starting over
    assert ei.value.status_code is StatusCode.FAILED_PRECONDITION
    assert "new node id" in ei.value.message


def test_add_local_needs_a_node_id():
    with pytest.raises(FabricError) as ei:
        HoldingIndex().add_local(key(1), digest_of(key(1)))
    assert ei.value.status_code is StatusCode.FAILED_PRECONDITION


# -- merge laws ----------------------------------------------------------------------
@settings(max_examples=150, deadline=None)
@given(fact_lists, fact_lists)
def test_merge_is_commutative(x, y):
    assert observable(index_of(x, y)) == observable(index_of(y, x))


@settings(max_examples=150, deadline=None)
@given(fact_lists, fact_lists, fact_lists)
def test_merge_is_associative(x, y, z):
    left = index_of(x, y)
    left.merge(z)
    yz = index_of(y, z)
    right = index_of(x)
    right.merge(list(yz.facts()))
    assert observable(left) == observable(right)


@settings(max_examples=150, deadline=None)
@given(fact_lists)
def test_merge_is_idempotent_and_returns_only_new_facts(x):
    idx = HoldingIndex()
    new = idx.merge(x)
    assert len(new) == len(set(x)) == len(idx)
    assert set(new) == set(x)
    before = observable(idx)
    assert idx.merge(x) == []
    assert idx.merge(list(idx.facts())) == []
    assert observable(idx) == before


@settings(max_examples=100, deadline=None)
@given(fact_lists)
def test_merge_order_of_single_facts_does_not_matter(x):
    fwd, rev = HoldingIndex(), HoldingIndex()
    for f in x:
        fwd.merge([f])
    for f in reversed(x):
        rev.merge([f])
    assert observable(fwd) == observable(rev)


@settings(max_examples=100, deadline=None)
@given(fact_lists)
def test_runs_round_trip_and_merge_like_facts(x):
    runs = facts_to_runs(x)
    assert set(runs_to_facts(runs)) == set(x)
    via_runs = HoldingIndex()
    new = via_runs.merge_runs(runs)
    assert set(new) == set(x)
    assert observable(via_runs) == observable(index_of(x))
    assert HoldingIndex().absorb_runs(runs) == len(set(x))


# -- summary and anti-entropy ---------------------------------------------------------------
@settings(max_examples=150, deadline=None)
@given(world_facts, world_facts)
def test_missing_for_brings_the_other_side_up_to_date(mine, theirs):
    a, b = index_of(mine), index_of(theirs)
    a.merge(b.missing_for(a.summary()))
    b.merge(a.missing_for(b.summary()))
    assert frozenset(a.facts()) == frozenset(b.facts()) == frozenset(mine) | frozenset(theirs)
    assert a.summary_digest() == b.summary_digest()
    # once in sync nothing new flows; only facts above a gap (which a summary
    # cannot express) are offered again, and the digest check stops even that
    assert b.merge(a.missing_for(b.summary())) == [] and a.merge(b.missing_for(a.summary())) == []
    gap_free = all(a.high_water(o) == sum(1 for f in a.facts() if f.node_id == o) for o in a.origins())
    if gap_free:
        assert a.missing_for(b.summary()) == [] and b.missing_for(a.summary()) == []


@settings(max_examples=100, deadline=None)
@given(world_facts, world_facts)
def test_summary_digest_is_equal_exactly_when_fact_sets_are(x, y):
    a, b = index_of(x), index_of(y)
    assert (a.summary_digest() == b.summary_digest()) == (frozenset(x) == frozenset(y))


def test_summary_size_does_not_depend_on_the_number_of_keys():
    small, large = HoldingIndex(), HoldingIndex()
    for origin in ("a", "b", "c"):
        small.merge_runs([_run(origin, 1, 10)])
        large.merge_runs([_run(origin, 1, 5000)])
    assert len(small.summary()) == len(large.summary()) == 3
    assert large.summary() == {"a": 5000, "b": 5000, "c": 5000}


@pytest.mark.parametrize("d", [0, 1, 10, 1000, 20000])
def test_missing_runs_returns_exactly_the_d_missing_facts(d):
    full, behind = HoldingIndex(), HoldingIndex()
    full.merge_runs([_run("o", 1, 100 + d)])
    behind.merge_runs([_run("o", 1, 100)])
    runs = full.missing_runs(behind.summary())
    assert sum(r.count for r in runs) == d
    assert sum(len(r.records) for r in runs) == d * RECORD_SIZE
    assert behind.absorb_runs(runs) == d
    assert behind.summary_digest() == full.summary_digest()


def test_missing_runs_respects_the_limit():
    full = HoldingIndex()
    full.merge_runs([_run("o", 1, 50), _run("p", 1, 50)])
    runs = full.missing_runs({}, limit=70)
    assert sum(r.count for r in runs) == 70
    assert full.missing_runs({}, limit=0) == []


def test_out_of_order_facts_wait_above_the_gap_and_join_when_it_fills():
    idx = HoldingIndex()
    facts = [world_fact("a", s) for s in range(1, 7)]
    idx.merge([facts[4], facts[2], facts[5]])  # seqs 5, 3, 6
    assert idx.high_water("a") == 0 and len(idx) == 3
    idx.merge([facts[0]])
    assert idx.high_water("a") == 1
    idx.merge([facts[1]])
    assert idx.high_water("a") == 3
    idx.merge([facts[3]])
    assert idx.high_water("a") == 6
    # a peer whose summary says hw=3 is sent 4..6 only
    assert [f.seq for f in idx.missing_for({"a": 3})] == [4, 5, 6]


def test_extras_above_a_peers_high_water_are_sent_too():
    idx = HoldingIndex()
    idx.merge([world_fact("a", 1), world_fact("a", 4)])
    assert [f.seq for f in idx.missing_for({})] == [1, 4]
    assert [f.seq for f in idx.missing_for({"a": 1})] == [4]


def test_packed_log_is_compact():
    idx = HoldingIndex()
    idx.merge_runs([_run("o", 1, 1000)])
    o = idx._origins["o"]
    assert len(o.log) == 1000 * RECORD_SIZE and not o.extras


# -- determinism violations -----------------------------------------------------------------
def test_two_digests_for_one_key_are_kept_and_reported():
    k = KEYS[3]
    idx = HoldingIndex()
    idx.merge([HeldContent("a", k, DIGESTS[0], 1), HeldContent("b", k, DIGESTS[0], 1)])
    assert idx.digest_conflicts() == [] and idx.conflicts(k) == []
    assert idx.take_new_conflicts() == []
    idx.merge([HeldContent("c", k, DIGESTS[1], 1)])
    assert idx.digest_conflicts() == [k]
    assert idx.take_new_conflicts() == [k] and idx.take_new_conflicts() == []
    assert {f.node_id for f in idx.conflicts(k)} == {"a", "b", "c"}
    assert idx.holders(k) == [("a", DIGESTS[0]), ("b", DIGESTS[0]), ("c", DIGESTS[1])]
    # serve the majority's digest
    assert idx.preferred_digest(k) == DIGESTS[0]
    assert idx.preferred_digest(k, home="c") == DIGESTS[0]


def test_preferred_digest_tie_goes_to_the_home_then_the_smallest():
    k = KEYS[4]
    lo, hi = sorted(DIGESTS[:2])
    idx = HoldingIndex()
    idx.merge([HeldContent("a", k, hi, 1), HeldContent("b", k, lo, 1)])
    assert idx.preferred_digest(k, home="a") == hi
    assert idx.preferred_digest(k, home="b") == lo
    assert idx.preferred_digest(k, home="zz") == lo
    assert idx.preferred_digest(k) == lo
    assert idx.preferred_digest(KEYS[5]) is None


def test_equivocation_is_kept_and_surfaced():
    idx = HoldingIndex()
    f1 = HeldContent("a", KEYS[0], DIGESTS[0], 1)
    f2 = HeldContent("a", KEYS[1], DIGESTS[1], 1)
    idx.merge([f1, f2])
    assert f1 in idx and f2 in idx and len(idx) == 2
    assert idx.equivocations() == [f2]
    assert idx.high_water("a") == 1


# -- misc ----------------------------------------------------------------------------------
def test_copy_is_independent():
    idx = HoldingIndex("me")
    idx.add_local(key(1), digest_of(key(1)))
    c = idx.copy()
    c.merge([HeldContent("x", key(1), DIGESTS[2], 1)])
    assert len(idx) == 1 and len(c) == 2
    assert idx.digest_conflicts() == [] and c.digest_conflicts() == [key(1)]
    assert observable(idx) != observable(c)


def test_merge_runs_rejects_malformed_runs_naming_the_field():
    idx = HoldingIndex()
    good = bytes(KEYS[0]) + DIGESTS[0]
    cases = [
        (FactRun("", 1, good), "runs[0].origin"),
        (FactRun("a", 0, good), "runs[0].start"),
        (FactRun("a", 1, good[:-1]), "runs[0].records"),
        (FactRun("a", 1, b"\x09" + good[1:]), "runs[0].records[0]"),
        (FactRun("a", (1 << 40) - 1, good + good), "runs[0].start"),
    ]
    for run, field in cases:
        with pytest.raises(FabricError) as ei:
            idx.merge_runs([run])
        assert ei.value.status_code is StatusCode.INVALID_ARGUMENT
        assert ei.value.message.startswith(field + ":"), ei.value.message
    assert len(idx) == 0


def test_merge_rejects_non_facts():
    with pytest.raises(FabricError) as ei:
        HoldingIndex().merge([("a", KEYS[0], DIGESTS[0], 1)])
    assert ei.value.status_code is StatusCode.INVALID_ARGUMENT


def test_fact_fingerprint_is_stable():
    rec = bytes(KEYS[0]) + DIGESTS[0]
    assert fact_fingerprint("a", 1, rec) == fact_fingerprint("a", 1, rec)
    assert fact_fingerprint("a", 1, rec) != fact_fingerprint("a", 2, rec)
    assert fact_fingerprint("a", 1, rec) != fact_fingerprint("b", 1, rec)


def _run(origin: str, start: int, count: int) -> FactRun:
    recs = b"".join(
        bytes(ContentKey.of("blob", b"%s/%d" % (origin.encode(), s))) + hashlib.blake2b(b"%d" % s, digest_size=32).digest()
        for s in range(start, start + count)
    )
    return FactRun(origin, start, recs)


# ------------------------------------------------------------ facts made without a seq
def test_a_fact_made_as_design_names_it_merges_as_its_nodes_next_fact():
    """``HeldContent(node_id, key, digest)``: merged, it takes the node's next seq; again, nothing new."""
    idx = HoldingIndex()
    f = HeldContent("a", KEYS[0], DIGESTS[0])
    assert f.seq is None and f not in idx
    (got,) = idx.merge([f])
    assert (got.node_id, got.key, got.digest, got.seq) == ("a", KEYS[0], DIGESTS[0], 1)
    assert f in idx and got in idx
    assert idx.merge([HeldContent("a", KEYS[0], DIGESTS[0])]) == []  # already held: not new
    assert idx.merge([HeldContent("a", KEYS[1], DIGESTS[1])])[0].seq == 2
    assert idx.holders(KEYS[0]) == [("a", DIGESTS[0])]
    assert idx.holders(str(KEYS[1])) == [("a", DIGESTS[1])]  # the text form of a key works too
    with pytest.raises(FabricError) as ei:
        idx.holders("request:not-hex")
    assert ei.value.status_code is StatusCode.INVALID_ARGUMENT
    with pytest.raises(FabricError):
        facts_to_runs([f])  # the wire form needs a seq


@settings(max_examples=60)
@given(st.lists(st.tuples(st.sampled_from(NODES), st.integers(0, 7), st.integers(0, 3)), max_size=12), st.randoms())
def test_who_holds_what_does_not_depend_on_the_order_seqless_facts_are_merged_in(triples, rnd):
    facts = [HeldContent(n, KEYS[k], DIGESTS[d]) for n, k, d in triples]
    a, b = HoldingIndex(), HoldingIndex()
    a.merge(facts)
    shuffled = list(facts)
    rnd.shuffle(shuffled)
    for f in shuffled:
        b.merge([f])
        b.merge([f])  # idempotent
    assert all(a.holders(k) == b.holders(k) for k in KEYS)
    assert len(a) == len(b) == len({(n, k, d) for n, k, d in triples})
