"""Gossip messages: canonical encoding, strict decoding, and the vectors in specs/gossip.md."""

from __future__ import annotations

import re
from pathlib import Path

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cassette import codec
from cassette.errors import FabricError, StatusCode
from cassette.keys import ContentKey
from gossip.holding import FactRun, HeldContent, HoldingIndex, fact_fingerprint
from gossip.messages import (
    Ack,
    Facts,
    Members,
    MemberState,
    MemberUpdate,
    Ping,
    PingReq,
    Summary,
    SyncRequest,
    decode_message,
    encode_message,
)
from gossip.node import rendezvous_order, rendezvous_weight

SPEC = Path(__file__).resolve().parent.parent / "specs" / "gossip.md"
_BLOCK = re.compile(r"```hex gossip-(vector|invalid):(\S+)\n(.*?)```", re.S)


def spec_blocks() -> dict[tuple[str, str], bytes]:
    out = {}
    for kind, name, body in _BLOCK.findall(SPEC.read_text(encoding="utf-8")):
        out[(kind, name)] = bytes.fromhex("".join(body.split()))
    return out


BLOCKS = spec_blocks()
K = ContentKey.of("request", b"hello")
K2 = ContentKey.of("blob", b"chunk")
D = bytes(range(32))
D2 = bytes(range(32, 64))
A = MemberState

VECTORS = {
    "ping": Ping("n1", 7, "n2", (MemberUpdate("n1", 3, A.ALIVE, "10.0.0.1:7000", frozenset({"serve", "compute"})),)),
    "ping-any": Ping("n1", 1, None, ()),
    "ping-req": PingReq("n1", 8, "n3", "10.0.0.3:7000", ()),
    "ack": Ack("n2", 7, (MemberUpdate("n3", 1, A.SUSPECT, "10.0.0.3:7000", frozenset()),)),
    "members": Members(
        "n1",
        (
            MemberUpdate("n1", 3, A.ALIVE, "10.0.0.1:7000", frozenset({"serve"})),
            MemberUpdate("n4", 2, A.DEAD, "10.0.0.4:7000", frozenset()),
        ),
        True,
        (),
    ),
    "sync": SyncRequest("n1", bytes(range(16)), ()),
    "summary": Summary("n2", (("n1", 5), ("n2", 300)), True, ()),
    "facts": Facts("n1", (FactRun("n1", 4, bytes(K) + D + bytes(K2) + D2),), True, ()),
}


def test_spec_has_every_vector():
    names = {n for kind, n in BLOCKS if kind == "vector"}
    assert set(VECTORS) <= names
    assert sum(1 for kind, _ in BLOCKS if kind == "invalid") >= 6


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_message_vectors_from_the_spec(name):
    expected = BLOCKS[("vector", name)]
    assert encode_message(VECTORS[name]) == expected
    assert decode_message(expected) == VECTORS[name]


@pytest.mark.parametrize("field", sorted(n for kind, n in BLOCKS if kind == "invalid"))
def test_invalid_vectors_from_the_spec_name_the_field(field):
    with pytest.raises(FabricError) as ei:
        decode_message(BLOCKS[("invalid", field)])
    assert ei.value.status_code is StatusCode.INVALID_ARGUMENT
    assert ei.value.message.startswith(field + ":"), ei.value.message


def test_digest_and_rendezvous_vectors_from_the_spec():
    assert fact_fingerprint("n1", 1, bytes(K) + D).to_bytes(8, "big") == BLOCKS[("vector", "fingerprint-1")]
    assert fact_fingerprint("n1", 2, bytes(K2) + D2).to_bytes(8, "big") == BLOCKS[("vector", "fingerprint-2")]
    idx = HoldingIndex("n1")
    idx.add_local(K, D)
    idx.add_local(K2, D2)
    assert idx.summary_digest() == BLOCKS[("vector", "summary-digest")]
    assert HoldingIndex().summary_digest() == BLOCKS[("vector", "summary-digest-empty")]
    # order of arrival does not matter
    other = HoldingIndex()
    other.merge([HeldContent("n1", K2, D2, 2), HeldContent("n1", K, D, 1)])
    assert other.summary_digest() == BLOCKS[("vector", "summary-digest")]
    for n in ("n1", "n2", "n3"):
        assert rendezvous_weight(K, n).to_bytes(8, "big") == BLOCKS[("vector", f"rendezvous-{n}")]
    assert rendezvous_order(K, ["n1", "n2", "n3"]) == ["n3", "n2", "n1"]


# -- round trip ------------------------------------------------------------------------------
node_ids = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12)
caps = st.frozensets(st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=8), max_size=4)
u64 = st.integers(0, (1 << 64) - 1)
updates = st.builds(
    MemberUpdate, node_ids, u64, st.sampled_from(list(MemberState)), st.text(min_size=1, max_size=20).filter(lambda s: len(s.encode()) <= 255), caps
)
upd_tuples = st.lists(updates, max_size=4).map(tuple)


@st.composite
def runs(draw):
    out = []
    for _ in range(draw(st.integers(0, 3))):
        n = draw(st.integers(1, 4))
        recs = b"".join(
            bytes([draw(st.integers(1, 3))]) + draw(st.binary(min_size=32, max_size=32)) + draw(st.binary(min_size=32, max_size=32))
            for _ in range(n)
        )
        out.append(FactRun(draw(node_ids), draw(st.integers(1, 1 << 39)), recs))
    return tuple(out)


summaries = st.dictionaries(node_ids, st.integers(1, (1 << 40) - 1), max_size=5)
messages = st.one_of(
    st.builds(Ping, node_ids, u64, st.none() | node_ids, upd_tuples),
    st.builds(PingReq, node_ids, u64, node_ids, st.text(min_size=1, max_size=20), upd_tuples),
    st.builds(Ack, node_ids, u64, upd_tuples),
    st.builds(Members, node_ids, upd_tuples, st.booleans(), upd_tuples),
    st.builds(SyncRequest, node_ids, st.binary(min_size=16, max_size=16), upd_tuples),
    st.builds(lambda s, m, r, u: Summary.of(s, m, r, u), node_ids, summaries, st.booleans(), upd_tuples),
    st.builds(Facts, node_ids, runs(), st.booleans(), upd_tuples),
)


@settings(max_examples=300, deadline=None)
@given(messages)
def test_round_trip_and_canonical(msg):
    data = encode_message(msg)
    assert decode_message(data) == msg
    assert codec.is_canonical(data)
    assert encode_message(decode_message(data)) == data


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_never_escapes_as_another_error(data):
    try:
        decode_message(data)
    except FabricError as e:
        assert e.status_code is StatusCode.INVALID_ARGUMENT
        assert e.message.startswith("gossip.")


@settings(max_examples=200, deadline=None)
@given(messages, st.data())
def test_corrupted_messages_are_rejected_or_still_valid(msg, data):
    raw = bytearray(encode_message(msg))
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] ^= data.draw(st.integers(1, 255))
    try:
        out = decode_message(bytes(raw))
    except FabricError as e:
        assert e.status_code is StatusCode.INVALID_ARGUMENT and e.message.startswith("gossip.")
    else:  # a flipped byte may still form a valid message; it must then round-trip
        assert encode_message(out) == bytes(raw)


# -- field validation -------------------------------------------------------------------------
def _enc(m: dict) -> bytes:
    return codec.encode(m)


BASE_ACK = {"t": "ack", "v": 1, "from": "n1", "u": [], "seq": 1}


@pytest.mark.parametrize(
    "patch, field",
    [
        ({"seq": -1}, "gossip.seq"),
        ({"seq": "1"}, "gossip.seq"),
        ({"from": ""}, "gossip.from"),
        ({"from": 5}, "gossip.from"),
        ({"from": "x" * 300}, "gossip.from"),
        ({"u": {}}, "gossip.u"),
        ({"u": [["n2", 0, 0, "a"]]}, "gossip.u[0]"),
        ({"u": [["n2", -1, 0, "a", []]]}, "gossip.u[0].incarnation"),
        ({"u": [["n2", 0, 4, "a", []]]}, "gossip.u[0].state"),
        ({"u": [["n2", 0, 0, "", []]]}, "gossip.u[0].addr"),
        ({"u": [["", 0, 0, "a", []]]}, "gossip.u[0].node_id"),
        ({"u": [["n2", 0, 0, "a", ["x", "x"]]]}, "gossip.u[0].capabilities[1]"),
        ({"u": [["n2", 0, 0, "a", [""]]]}, "gossip.u[0].capabilities[0]"),
        ({"v": True}, "gossip.v"),
    ],
)
def test_field_errors_name_the_field(patch, field):
    with pytest.raises(FabricError) as ei:
        decode_message(_enc({**BASE_ACK, **patch}))
    assert ei.value.status_code is StatusCode.INVALID_ARGUMENT
    assert ei.value.message.startswith(field + ":"), ei.value.message


def test_missing_field_is_named():
    m = dict(BASE_ACK)
    del m["seq"]
    with pytest.raises(FabricError) as ei:
        decode_message(_enc(m))
    assert ei.value.message.startswith("gossip.seq:") and "missing" in ei.value.message


def test_summary_high_water_must_be_fixed_width_and_in_range():
    base = {"t": "summary", "v": 1, "from": "n1", "u": [], "o": ["a"], "reply": False}
    with pytest.raises(FabricError) as ei:
        decode_message(_enc({**base, "hw": b"\x00" * 7}))
    assert ei.value.message.startswith("gossip.hw:")
    with pytest.raises(FabricError) as ei:
        decode_message(_enc({**base, "hw": b"\x00" * 8}))
    assert ei.value.message.startswith("gossip.hw[0]:")


def test_facts_runs_are_validated():
    rec = bytes(K) + D
    base = {"t": "facts", "v": 1, "from": "n1", "u": [], "push": False}
    for runs_, field in [
        ([["n1", 0, rec]], "gossip.runs[0].start"),
        ([["n1", 1, "x"]], "gossip.runs[0].records"),
        ([["n1", 1, b"\x07" + rec[1:]]], "gossip.runs[0].records[0]"),
        ([["n1", 1]], "gossip.runs[0]"),
        ([["", 1, rec]], "gossip.runs[0].origin"),
    ]:
        with pytest.raises(FabricError) as ei:
            decode_message(_enc({**base, "runs": runs_}))
        assert ei.value.message.startswith(field + ":"), ei.value.message


def test_non_map_and_non_canonical_inputs():
    with pytest.raises(FabricError) as ei:
        decode_message(_enc([1, 2]))
    assert ei.value.message.startswith("gossip.message:")
    # an int encoded wider than necessary is valid msgpack but not canonical
    good = _enc(BASE_ACK)
    wide = good.replace(b"\xa3seq\x01", b"\xa3seq\xcd\x00\x01")
    assert wide != good and msgpack.unpackb(wide) == BASE_ACK
    with pytest.raises(FabricError) as ei:
        decode_message(wide)
    assert ei.value.message.startswith("gossip.message:") and "canonical" in ei.value.message
    # trailing bytes
    with pytest.raises(FabricError) as ei:
        decode_message(good + b"\x00")
    assert ei.value.message.startswith("gossip.message:")


def test_encode_rejects_non_messages():
    with pytest.raises(FabricError) as ei:
        encode_message({"t": "ping"})  # type: ignore[arg-type]
    assert ei.value.status_code is StatusCode.INVALID_ARGUMENT


def _members_of(n: int) -> Members:
    return Members("n1", tuple(MemberUpdate(f"m{i}", 1, A.ALIVE, f"10.0.{i >> 8}.{i & 255}:7000", frozenset({"serve"}))
                               for i in range(n)), False)


def test_a_members_message_holds_a_real_fleet_and_no_more_than_max_members():
    """It used to accept up to 2**20 entries in one message (each applied as a member)."""
    from gossip.messages import MAX_MEMBERS

    assert 1000 <= MAX_MEMBERS <= 16384  # DESIGN.md: fleets (and the simulator) of 1,000+ nodes
    assert len(decode_message(encode_message(_members_of(MAX_MEMBERS))).members) == MAX_MEMBERS
    with pytest.raises(FabricError) as ei:
        decode_message(encode_message(_members_of(MAX_MEMBERS + 1)))
    assert ei.value.status_code is StatusCode.INVALID_ARGUMENT
    assert ei.value.message == f"gossip.m: {MAX_MEMBERS + 1} entries, at most {MAX_MEMBERS} allowed"


def _refused_with_peak(data: bytes) -> tuple[FabricError, int]:
    """The error ``decode_message(data)`` raises and the peak of memory traced meanwhile."""
    import tracemalloc

    tracemalloc.start()
    try:
        with pytest.raises(FabricError) as ei:
            decode_message(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return ei.value, peak


def test_an_oversized_members_message_is_refused_before_its_entries_are_decoded():
    """A canonical members message whose ``m`` declares ~1M (empty) entries: 1 MiB on the wire,
    ~64 MiB of lists once decoded.  The count is read from the header and refused first."""
    n = (1 << 20) - 1
    data = (b"\x86\xa1m\xdd" + n.to_bytes(4, "big") + b"\x90" * n + b"\xa1t\xa7members\xa1u\x90\xa1v\x01"
            b"\xa4from\xa2n1\xa5reply\xc2")
    assert codec.is_canonical(data)  # a well-formed canonical message, refused for its size alone
    err, peak = _refused_with_peak(data)
    assert err.message.startswith(f"gossip.m: {n} entries")
    assert peak < 1 << 20, peak  # nothing the size of the entries was allocated


def test_a_message_decoding_to_more_lists_than_any_valid_one_is_refused_while_decoding():
    """A sync message whose ``u`` holds ~1M empty lists (1 MiB): it used to be decoded in full
    (~64 MiB of lists) before ``u``'s bound of 1,024 refused it; decoding now stops once it
    has built more arrays and maps than any valid gossip message has."""
    n = (1 << 20) - 1
    data = (b"\x85\xa1d\xc4\x10" + bytes(16) + b"\xa1t\xa4sync\xa1u\xdd" + n.to_bytes(4, "big") + b"\x90" * n
            + b"\xa1v\x01\xa4from\xa2n1")
    assert codec.is_canonical(data)
    err, peak = _refused_with_peak(data)
    assert err.status_code is StatusCode.INVALID_ARGUMENT
    assert err.message.startswith("gossip.message: codec: input decodes to more than"), err.message
    assert peak < 16 << 20, peak  # ~133k lists at most, not a million
