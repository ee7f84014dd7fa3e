"""The sans-I/O wire state machine (fabric.wire) with no sockets and no clock.

Covers the handshake both ways, a wrong secret, garbage and non-handshake
frames before authentication, replay / reorder / drop / alteration / reflection
of sealed frames, pipelining, credit-based flow control, every limit, the
timeouts, and hypothesis-generated malformed and oversized input: never a
crash, never an exception other than a documented ``FabricError``, and never
more buffered bytes than one frame's limit.

``Pair.forge`` seals arbitrary messages with the session key recomputed from the
public formulas of specs/wire.md, so a *misbehaving but authenticated* peer can
be played without touching the state machine's private state.
"""

from __future__ import annotations

import math

import msgpack
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from cassette import codec
from cassette.errors import FabricError, StatusCode
from fabric.wire import (
    HANDSHAKE_MAX_FRAME_BYTES,
    MAX_CREDIT,
    MAX_FRAME_COMPOUND,
    NEED_DATA,
    Authenticated,
    Cancel,
    Closed,
    ConnectionState,
    Credit,
    EndOfStream,
    Fault,
    Hello,
    Metadata,
    Request,
    Response,
    Stats,
    StreamData,
    StreamFrameLimits,
    WireConnection,
    frame_mac,
    proof_key,
    session_key,
    transcript_hash,
)

SECRET = b"correct horse battery staple"
SMALL = StreamFrameLimits(max_frame_bytes=4096, max_inflight_requests=4, max_streams=2,
                          max_bytes_per_stream=20_000, handshake_timeout_s=5.0, idle_timeout_s=30.0)
PEER_ERRORS = {StatusCode.INVALID_ARGUMENT, StatusCode.RESOURCE_EXHAUSTED, StatusCode.UNAUTHENTICATED}


# --------------------------------------------------------------------------- harness


def drain(conn: WireConnection) -> list:
    """Every pending event, ending at NEED_DATA or (inclusive) the Closed event."""
    out = []
    while True:
        ev = conn.next_event()
        if ev is NEED_DATA:
            return out
        out.append(ev)
        if isinstance(ev, Closed):
            return out


def deliver(src: WireConnection, dst: WireConnection, data: bytes | None = None) -> list:
    """Move ``data`` (default: src's queued bytes) into dst; return dst's events."""
    dst.receive_data(src.data_to_send() if data is None else data)
    return drain(dst)


class Pair:
    """A client and a server, handshaken, plus what a forger needs."""

    def __init__(self, client_limits=None, server_limits=None, *, client_secret=SECRET, server_secret=SECRET):
        self.client = WireConnection("client", client_secret, client_limits, node_id="c1")
        self.server = WireConnection("server", server_secret, server_limits, node_id="s1")
        self.hc = self.client.data_to_send()
        self.server_events = deliver(self.client, self.server, self.hc)
        self.hs = self.server.data_to_send()
        self.client_events = deliver(self.server, self.client, self.hs)
        self.server_events += deliver(self.client, self.server)
        self.client_events += deliver(self.server, self.client)
        self.skey = session_key(proof_key(SECRET), transcript_hash(self.hc[4:], self.hs[4:]))

    def c2s(self, event) -> list:
        return deliver(self.server, self.server, self.client.send(event))

    def s2c(self, event) -> list:
        return deliver(self.client, self.client, self.server.send(event))

    def forge(self, sender: WireConnection, msg, *, seq: int | None = None, raw: bytes | None = None) -> bytes:
        """A correctly sealed frame carrying ``msg`` as if ``sender`` sent it next."""
        if seq is None:
            seq = sender.stats()["frames_sent"] - 2  # minus hello + auth
        body = codec.encode(msg) if raw is None else raw
        direction = 1 if sender.role == "client" else 2
        env = codec.encode([seq, body, frame_mac(self.skey, direction, seq, body)])
        return len(env).to_bytes(4, "big") + env


def closed_reason(events) -> FabricError:
    assert events and isinstance(events[-1], Closed), events
    return events[-1].reason


def open_msg(rid, *, op="echo", body=None, end=True, credit=0, timeout=None):
    return {"t": "open", "id": rid, "op": op, "body": body, "end": end, "credit": credit, "timeout": timeout}


# --------------------------------------------------------------------------- handshake


def test_handshake_both_ways():
    client_limits = StreamFrameLimits(max_streams=3)
    p = Pair(client_limits, None)
    assert [type(e) for e in p.server_events] == [Hello, Authenticated]
    assert [type(e) for e in p.client_events] == [Hello, Authenticated]
    assert p.server_events[0].role == "client" and p.client_events[0].role == "server"
    assert p.server_events[1].peer_node_id == "c1" and p.client_events[1].peer_node_id == "s1"
    assert p.server.peer_limits == client_limits.advertised()
    assert p.client.peer_limits == StreamFrameLimits().advertised()
    assert p.client.state is p.server.state is ConnectionState.OPEN
    assert p.client.data_to_send() == p.server.data_to_send() == b""
    assert p.c2s(Request(1, "echo", {"x": 1})) == [Request(1, "echo", {"x": 1})]
    assert p.s2c(Response(1, "ok")) == [Response(1, "ok")]


def test_handshake_fed_one_byte_at_a_time():
    c = WireConnection("client", SECRET)
    s = WireConnection("server", SECRET)
    for _ in range(3):
        for a, b in ((c, s), (s, c)):
            for byte in a.data_to_send():
                b.receive_data(bytes([byte]))
                assert b.buffered_bytes < 4 + HANDSHAKE_MAX_FRAME_BYTES
    assert c.state is s.state is ConnectionState.OPEN
    assert isinstance(drain(c)[-1], Authenticated) and isinstance(drain(s)[-1], Authenticated)


def test_wrong_secret_server_rejects_and_sends_nothing():
    c = WireConnection("client", b"not the secret")
    s = WireConnection("server", SECRET)
    deliver(c, s)
    deliver(s, c)  # client receives the server hello and sends its (wrong) proof
    events = deliver(c, s)
    err = closed_reason(events)
    assert err.status_code is StatusCode.UNAUTHENTICATED and "proof does not verify" in err.message
    assert s.data_to_send() == b"" and s.state is ConnectionState.CLOSED
    # the client sees the hang-up after its proof as UNAUTHENTICATED, not as a retryable outage
    c.receive_data(b"")
    err = closed_reason(drain(c))
    assert err.status_code is StatusCode.UNAUTHENTICATED and not err.retryable


def _handshake(c: WireConnection, s: WireConnection) -> tuple[list, list]:
    cev, sev = [], []
    for _ in range(3):
        for a, b, evs in ((c, s, sev), (s, c, cev)):
            data = a.data_to_send()
            if data:  # (empty bytes would be an EOF)
                evs += deliver(a, b, data)
    return cev, sev


@pytest.mark.parametrize("proved", [b"old secret", b"new secret", b"new secret\n"])
def test_a_server_accepts_any_secret_it_was_given_and_answers_under_the_one_proved(proved):
    s = WireConnection("server", b"new secret", accept=[b"old secret", b"new secret\n"])
    c = WireConnection("client", proved)
    cev, sev = _handshake(c, s)
    assert isinstance(cev[-1], Authenticated) and isinstance(sev[-1], Authenticated)
    # the session keys derive from the secret the client proved: sealed frames verify both ways
    assert deliver(s, s, c.send(Request(1, "echo", {"x": 1}))) == [Request(1, "echo", {"x": 1})]
    assert deliver(c, c, s.send(Response(1, "ok"))) == [Response(1, "ok")]
    # a secret the server was not given still fails, and the server sends nothing
    s2 = WireConnection("server", b"new secret", accept=[b"old secret"])
    c2 = WireConnection("client", b"other secret")
    _, sev2 = _handshake(c2, s2)
    assert closed_reason(sev2).status_code is StatusCode.UNAUTHENTICATED and s2.data_to_send() == b""


def test_only_a_server_takes_further_secrets():
    with pytest.raises(FabricError) as ei:
        WireConnection("client", SECRET, accept=[b"x"])
    assert ei.value.status_code is StatusCode.INVALID_ARGUMENT
    with pytest.raises(FabricError):
        WireConnection("server", SECRET, accept=[b""])


def test_client_rejects_a_server_auth_replayed_from_another_connection():
    # connection 1 completes; its server auth is bound to connection 1's transcript
    s1 = WireConnection("server", SECRET)
    c1 = WireConnection("client", SECRET)
    s1.receive_data(c1.data_to_send())
    c1.receive_data(s1.data_to_send())
    s1.receive_data(c1.data_to_send())
    server_auth = s1.data_to_send()
    # connection 2 (a fresh client nonce) is fed that auth by a man in the middle
    victim = WireConnection("client", SECRET)
    server2 = WireConnection("server", SECRET)
    server2.receive_data(victim.data_to_send())
    victim.receive_data(server2.data_to_send())
    victim.data_to_send()  # its proof
    victim.receive_data(server_auth)
    err = closed_reason(drain(victim))
    assert err.status_code is StatusCode.UNAUTHENTICATED and "server's proof" in err.message
    assert victim.data_to_send() == b""


@pytest.mark.parametrize("junk", [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"\x00\x00\x00\x05hello",
    b"\x00\x00\x00\x00",
    b"\xff\xff\xff\xff",
    b"\x00\x00\x00\x01\xc1",
])
def test_garbage_before_handshake_closes_with_unauthenticated_and_nothing_sent(junk):
    s = WireConnection("server", SECRET)
    s.receive_data(junk)
    err = closed_reason(drain(s))
    assert err.status_code is StatusCode.UNAUTHENTICATED
    assert s.data_to_send() == b"" and s.buffered_bytes == 0
    s.receive_data(b"more bytes after the close are discarded")
    assert s.buffered_bytes == 0 and s.data_to_send() == b""


def _plain(msg) -> bytes:
    body = codec.encode(msg)
    return len(body).to_bytes(4, "big") + body


@pytest.mark.parametrize("msg, needle", [
    (open_msg(1), "not allowed here"),
    ({"t": "hello", "v": 2, "role": "client", "nonce": bytes(32)}, "wire version 2"),
    ({"t": "hello", "v": 1, "role": "server", "nonce": bytes(32)}, "claims role"),
    ({"t": "hello", "v": 1, "role": "client", "nonce": bytes(31)}, "$.nonce"),
    ({"t": "hello", "v": 1, "role": "client", "nonce": bytes(32), "x": 1}, "unknown field"),
    ({"t": "auth", "node": "n", "limits": {}, "proof": bytes(32)}, "not allowed here"),
    ([0, b"sealed?", bytes(32)], "expected `map`"),
])
def test_non_handshake_frame_before_auth_is_unauthenticated(msg, needle):
    s = WireConnection("server", SECRET)
    s.receive_data(_plain(msg))
    err = closed_reason(drain(s))
    assert err.status_code is StatusCode.UNAUTHENTICATED and needle in err.message, err
    assert s.data_to_send() == b""


def test_server_accepts_nothing_but_auth_after_the_hellos():
    c = WireConnection("client", SECRET)
    s = WireConnection("server", SECRET)
    deliver(c, s)
    s.data_to_send()
    s.receive_data(_plain(open_msg(1)))
    assert closed_reason(drain(s)).status_code is StatusCode.UNAUTHENTICATED
    assert s.data_to_send() == b""


def test_nothing_but_handshake_frames_can_be_sent_before_auth():
    c = WireConnection("client", SECRET)
    with pytest.raises(FabricError) as ei:
        c.send(Request(1, "echo"))
    assert ei.value.status_code is StatusCode.FAILED_PRECONDITION
    with pytest.raises(FabricError):
        c.send(Stats(1))
    # closing before auth emits no bytes at all (not even the queued hello)
    assert c.send(Closed(FabricError(StatusCode.ABORTED, "bye"))) == b""
    assert closed_reason(drain(c)).status_code is StatusCode.ABORTED


def test_eof_before_the_server_hello_is_unavailable_for_the_client():
    c = WireConnection("client", SECRET)
    c.data_to_send()
    c.receive_data(b"")
    err = closed_reason(drain(c))
    assert err.status_code is StatusCode.UNAVAILABLE and err.retryable


def test_handshake_timeout():
    c = WireConnection("client", SECRET, SMALL, now=100.0)
    assert c.next_deadline() == 105.0
    c.check_timeouts(104.9)
    assert c.state is ConnectionState.HANDSHAKE
    c.data_to_send()
    c.check_timeouts(105.0)
    err = closed_reason(drain(c))
    assert err.status_code is StatusCode.DEADLINE_EXCEEDED
    assert c.data_to_send() == b"" and c.next_deadline() is None


def test_constructor_validates_its_arguments():
    for kwargs in ({"secret": b""}, {"role": "peer"}, {"nonce": b"short"}, {"node_id": "x" * 129}):
        args = {"role": "client", "secret": SECRET, **kwargs}
        with pytest.raises(FabricError) as ei:
            WireConnection(args.pop("role"), args.pop("secret"), **args)
        assert ei.value.status_code is StatusCode.INVALID_ARGUMENT
    with pytest.raises(FabricError) as ei:
        StreamFrameLimits(max_frame_bytes=100)
    assert "max_frame_bytes" in ei.value.message
    with pytest.raises(FabricError):
        StreamFrameLimits(idle_timeout_s=0)
    with pytest.raises(FabricError):
        StreamFrameLimits(max_streams=True)


# --------------------------------------------------------------------------- integrity after auth


def test_replayed_frame_closes_with_unauthenticated_and_tells_the_peer():
    p = Pair()
    frame = p.client.send(Request(1, "echo"))
    assert deliver(p.client, p.server, frame) == [Request(1, "echo")]
    err = closed_reason(deliver(p.client, p.server, frame))
    assert err.status_code is StatusCode.UNAUTHENTICATED and "out of sequence" in err.message
    # the authenticated peer is told why, with a connection fault
    peer_err = closed_reason(deliver(p.server, p.client))
    assert peer_err.status_code is StatusCode.UNAUTHENTICATED and "out of sequence" in peer_err.message


def test_reordered_frames_are_detected():
    p = Pair()
    f1 = p.client.send(Request(1, "a"))
    f2 = p.client.send(Request(2, "b"))
    err = closed_reason(deliver(p.client, p.server, f2 + f1))
    assert err.status_code is StatusCode.UNAUTHENTICATED and "got seq 1, expected 0" in err.message


def test_dropped_frame_is_detected():
    p = Pair()
    p.client.send(Request(1, "a"))  # lost
    f2 = p.client.send(Request(2, "b"))
    err = closed_reason(deliver(p.client, p.server, f2))
    assert err.status_code is StatusCode.UNAUTHENTICATED


def test_altered_message_is_detected_and_never_delivered():
    p = Pair()
    frame = bytearray(p.client.send(Request(1, "echo", "abcdefgh")))
    frame[frame.index(b"abcdefgh")] ^= 0x20
    events = deliver(p.client, p.server, bytes(frame))
    assert len(events) == 1
    err = closed_reason(events)
    assert err.status_code is StatusCode.UNAUTHENTICATED and "MAC mismatch" in err.message


def test_reflected_and_cross_connection_frames_are_rejected():
    p, q = Pair(), Pair()
    # a server frame fed back to the server (direction byte differs)
    p.c2s(Request(1, "echo"))
    reflected = p.server.send(Response(1, "x"))
    assert closed_reason(deliver(p.server, p.server, reflected)).status_code is StatusCode.UNAUTHENTICATED
    # a frame of connection q (other nonces, other session key) fed into connection p2
    p2 = Pair()
    foreign = q.client.send(Request(1, "echo"))
    assert closed_reason(deliver(q.client, p2.server, foreign)).status_code is StatusCode.UNAUTHENTICATED


def test_altered_seq_field_with_valid_mac_is_detected():
    p = Pair()
    body = codec.encode(open_msg(1))
    mac = frame_mac(p.skey, 1, 0, body)
    env = codec.encode([7, body, mac])  # MAC for seq 0, envelope claims seq 7
    err = closed_reason(deliver(p.client, p.server, len(env).to_bytes(4, "big") + env))
    assert err.status_code is StatusCode.UNAUTHENTICATED and "seq field altered" in err.message


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_any_single_byte_change_in_a_sealed_frame_closes_the_connection(data):
    p = Pair()
    frame = bytearray(p.client.send(Request(1, "realize", {"args": [1, 2.5, "x", b"\x00" * 20]}, True, 3, 1.5)))
    at = data.draw(st.integers(4, len(frame) - 1), label="offset")
    frame[at] ^= data.draw(st.integers(1, 255), label="xor")
    events = deliver(p.client, p.server, bytes(frame))
    err = closed_reason(events)
    assert len(events) == 1, "an altered frame must never yield an event"
    assert err.status_code in {StatusCode.UNAUTHENTICATED, StatusCode.INVALID_ARGUMENT}


# --------------------------------------------------------------------------- large frames: framed and parsed in place

#: push data sizes around the in-place threshold and msgpack's bin8/16/32 boundaries
_PUSH_SIZES = st.sampled_from([0, 1, 255, 256, 65_535, 65_536, 65_537, 70_000, 1 << 20])


def _download(p: Pair, credit: int = 8) -> int:
    p.c2s(Request(1, "get", None, True, credit))
    return 1


@settings(max_examples=40, deadline=None)
@given(size=_PUSH_SIZES, seq_skip=st.integers(0, 300), fill=st.integers(0, 255))
def test_a_push_frame_is_the_msgpack_envelope_of_the_packed_message_whatever_its_size(size, seq_skip, fill):
    """A large chunk is framed from pieces without copying it into an interim message: the
    bytes must still be exactly ``u32 len || msgpack.packb([seq, codec.pack(msg), mac])``."""
    p = Pair()
    rid = _download(p)
    for _ in range(seq_skip):  # move the sequence number across msgpack's int widths
        p.server.send(Metadata(rid, None))
    data = bytes([fill]) * size
    frame = p.server.send(StreamData(rid, data))
    body = frame[4:]
    assert int.from_bytes(frame[:4], "big") == len(body)
    seq, raw, mac = msgpack.unpackb(body)
    assert seq == seq_skip
    assert msgpack.packb([seq, raw, mac], use_bin_type=True) == body
    assert raw == codec.pack({"t": "push", "id": rid, "data": data})
    assert mac == frame_mac(p.skey, 2, seq, raw)


@settings(max_examples=200, deadline=None)
@given(seq=st.integers(0, 2**64 - 1), msg=st.binary(max_size=300), mac=st.binary(max_size=40),
       seq_form=st.sampled_from(["packb", "u8", "u16", "u32", "u64"]), bin_form=st.sampled_from(["packb", "bin16", "bin32"]),
       tail=st.binary(max_size=3), cut=st.integers(0, 3))
def test_the_in_place_envelope_parser_agrees_with_the_general_decoder(seq, msg, mac, seq_form, bin_form, tail, cut):
    """Every envelope the in-place parser accepts decodes generally to the same values; it
    refuses (and leaves to the decoder) anything that is not a whole [uint, bin, bin]."""
    from fabric.wire import _envelope_in_place

    widths = {"u8": (0xCC, 1), "u16": (0xCD, 2), "u32": (0xCE, 4), "u64": (0xCF, 8)}
    if seq_form == "packb" or seq >= 1 << (8 * widths[seq_form][1]):
        seq_bytes = msgpack.packb(seq)
    else:
        code, width = widths[seq_form]
        seq_bytes = bytes([code]) + seq.to_bytes(width, "big")

    def binary(b: bytes) -> bytes:
        if bin_form == "bin16":
            return b"\xc5" + len(b).to_bytes(2, "big") + b
        if bin_form == "bin32":
            return b"\xc6" + len(b).to_bytes(4, "big") + b
        return msgpack.packb(b, use_bin_type=True)

    whole = b"\x93" + seq_bytes + binary(msg) + binary(mac)
    body = (whole + tail)[: len(whole) + len(tail) - cut]
    got = _envelope_in_place(memoryview(body))
    if got is None:
        assert body != whole, "a whole [uint, bin, bin] envelope must parse in place"
        return
    assert body == whole
    assert (got[0], bytes(got[1]), bytes(got[2])) == (seq, msg, mac)
    assert codec.decode(body) == [seq, msg, mac]


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.sampled_from([0, 3, 1000, 65_535, 65_536, 200_000]), min_size=1, max_size=6),
       cuts=st.lists(st.integers(0, 700_000), max_size=10))
@example(sizes=[200_000, 200_000, 200_000], cuts=list(range(0, 700_000, 65_536)))  # as a socket hands them over
def test_large_and_small_frames_in_any_chunking_arrive_in_order_and_intact(sizes, cuts):
    """Long envelopes are parsed as views of the read buffer: however the bytes are cut, the
    events are the same, and the buffer keeps taking bytes after each (no view left behind)."""
    p = Pair()
    rid = _download(p, credit=len(sizes))
    items = [bytes([i + 1]) * n for i, n in enumerate(sizes)]
    wire = b""
    for i, item in enumerate(items):
        wire += p.server.send(StreamData(rid, item))
        wire += p.server.send(Metadata(rid, {"after": i}))
    wire += p.server.send(Response(rid, "done"))
    points = sorted({min(x, len(wire)) for x in cuts} | {0, len(wire)})
    got = []
    for a, b in zip(points, points[1:]):
        p.client.receive_data(bytearray(wire[a:b]))  # any bytes-like, as a socket hands them over
        got += drain(p.client)
    expected = []
    for i, item in enumerate(items):
        expected += [StreamData(rid, item), Metadata(rid, {"after": i})]
    assert got == expected + [Response(rid, "done")]
    assert p.client.buffered_bytes == 0


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_any_single_byte_change_in_a_large_frame_closes_the_connection(data):
    p = Pair()
    rid = _download(p)
    frame = bytearray(p.server.send(StreamData(rid, bytes(range(256)) * 400)))
    at = data.draw(st.one_of(st.integers(4, 40), st.integers(4, len(frame) - 1), st.integers(len(frame) - 40, len(frame) - 1)),
                   label="offset")
    frame[at] ^= data.draw(st.integers(1, 255), label="xor")
    events = deliver(p.server, p.client, bytes(frame))
    err = closed_reason(events)
    assert len(events) == 1, "an altered frame must never yield an event"
    assert err.status_code in {StatusCode.UNAUTHENTICATED, StatusCode.INVALID_ARGUMENT}


# --------------------------------------------------------------------------- requests, pipelining, flow control


def test_pipelined_requests_are_answered_out_of_order():
    p = Pair()
    wire = b"".join(p.client.send(Request(i, "echo", i)) for i in range(1, 51))
    assert deliver(p.client, p.server, wire) == [Request(i, "echo", i) for i in range(1, 51)]
    replies = b"".join(p.server.send(Response(i, i * 10)) for i in range(50, 0, -1))
    assert deliver(p.server, p.client, replies) == [Response(i, i * 10) for i in range(50, 0, -1)]
    assert p.client.live_requests == p.server.live_requests == frozenset()


def test_request_ids_only_increase():
    p = Pair()
    p.c2s(Request(5, "a"))
    with pytest.raises(FabricError) as ei:
        p.client.send(Request(5, "b"))
    assert ei.value.status_code is StatusCode.FAILED_PRECONDITION
    assert p.client.new_request_id() == 6
    err = closed_reason(deliver(p.client, p.server, p.forge(p.client, open_msg(3))))
    assert err.status_code is StatusCode.INVALID_ARGUMENT and "reused" in err.message


def test_download_credit_is_respected_both_ways():
    p = Pair()
    assert p.c2s(Request(1, "get", {"k": 1}, True, 2)) == [Request(1, "get", {"k": 1}, True, 2)]
    assert p.server.send_credit(1) == 2
    wire = p.server.send(Metadata(1, {"size": 3})) + p.server.send(StreamData(1, b"a")) + p.server.send(StreamData(1, b"b"))
    with pytest.raises(FabricError) as ei:
        p.server.send(StreamData(1, b"c"))
    assert ei.value.status_code is StatusCode.FAILED_PRECONDITION and "credit" in ei.value.message
    assert deliver(p.server, p.client, wire) == [Metadata(1, {"size": 3}), StreamData(1, b"a"), StreamData(1, b"b")]
    assert p.c2s(Credit(1, 1)) == [Credit(1, 1)]
    assert p.s2c(StreamData(1, b"c")) == [StreamData(1, b"c")]
    assert p.s2c(Response(1, {"digest": "d"})) == [Response(1, {"digest": "d"})]


def test_server_pushing_beyond_credit_is_a_limit_violation():
    p = Pair()
    p.c2s(Request(1, "get", None, True, 1))
    p.s2c(StreamData(1, b"ok"))
    forged = p.forge(p.server, {"t": "push", "id": 1, "data": b"too much"})
    err = closed_reason(deliver(p.server, p.client, forged))
    assert err.status_code is StatusCode.RESOURCE_EXHAUSTED and "beyond its credit" in err.message
    assert closed_reason(deliver(p.client, p.server)).status_code is StatusCode.RESOURCE_EXHAUSTED


def test_upload_flow():
    p = Pair()
    assert p.c2s(Request(1, "put", {"n": 3}, end_stream=False)) == [Request(1, "put", {"n": 3}, False)]
    with pytest.raises(FabricError):  # no credit until the server grants it
        p.client.send(StreamData(1, b"x"))
    assert p.s2c(Credit(1, 2)) == [Credit(1, 2)]
    assert p.c2s(StreamData(1, b"0")) + p.c2s(StreamData(1, b"1")) == [StreamData(1, b"0"), StreamData(1, b"1")]
    with pytest.raises(FabricError):
        p.client.send(StreamData(1, b"2"))
    assert p.c2s(EndOfStream(1)) == [EndOfStream(1)]
    with pytest.raises(FabricError):  # a grant after the end is local misuse
        p.server.send(Credit(1, 1))
    assert p.s2c(Response(1, {"ok": True})) == [Response(1, {"ok": True})]


def test_outstanding_credit_is_capped():
    p = Pair()
    p.c2s(Request(1, "get", None, True, 1))
    with pytest.raises(FabricError) as ei:  # 1 + MAX_CREDIT would overflow the cap
        p.client.send(Credit(1, MAX_CREDIT))
    assert ei.value.status_code is StatusCode.INVALID_ARGUMENT
    assert p.c2s(Credit(1, MAX_CREDIT - 1)) == [Credit(1, MAX_CREDIT - 1)]
    assert p.server.send_credit(1) == MAX_CREDIT
    err = closed_reason(deliver(p.client, p.server, p.forge(p.client, {"t": "next", "id": 1, "credit": 1})))
    assert err.status_code is StatusCode.RESOURCE_EXHAUSTED and "overflows" in err.message


def test_client_push_without_grant_is_a_limit_violation():
    p = Pair()
    p.c2s(Request(1, "put", None, end_stream=False))
    err = closed_reason(deliver(p.client, p.server, p.forge(p.client, {"t": "push", "id": 1, "data": b"x"})))
    assert err.status_code is StatusCode.RESOURCE_EXHAUSTED


def test_push_on_a_request_that_is_not_an_upload_is_malformed():
    p = Pair()
    p.c2s(Request(1, "echo"))
    err = closed_reason(deliver(p.client, p.server, p.forge(p.client, {"t": "push", "id": 1, "data": b"x"})))
    assert err.status_code is StatusCode.INVALID_ARGUMENT and "not an open upload" in err.message


def test_cancel_and_late_frames_are_ignored():
    p = Pair()
    p.c2s(Request(1, "slow", None, True, 4))
    late = p.server.send(Metadata(1, "working")) + p.server.send(StreamData(1, b"chunk"))
    assert p.c2s(Cancel(1)) == [Cancel(1)]
    assert not p.client.is_live(1) and not p.server.is_live(1)
    assert deliver(p.server, p.client, late) == []  # ignored, connection still fine
    with pytest.raises(FabricError):
        p.server.send(Response(1, "after cancel"))
    # a final reply crossing a cancel: each side ignores the other's frame
    p.c2s(Request(2, "race"))
    reply = p.server.send(Response(2, "done"))
    cancel = p.client.send(Cancel(2))
    assert deliver(p.client, p.server, cancel) == []
    assert deliver(p.server, p.client, reply) == []
    assert p.client.state is p.server.state is ConnectionState.OPEN
    p.c2s(Request(3, "next"))
    assert p.s2c(Response(3, "fine")) == [Response(3, "fine")]


def test_a_request_fault_leaves_the_connection_open():
    p = Pair()
    p.c2s(Request(1, "realize"))
    events = p.s2c(Fault(1, FabricError(StatusCode.NOT_FOUND, "no evaluator 'x'")))
    assert len(events) == 1 and isinstance(events[0], Fault)
    assert events[0].error.status_code is StatusCode.NOT_FOUND and events[0].error.message == "no evaluator 'x'"
    assert p.client.state is ConnectionState.OPEN and not p.client.is_live(1)


def test_any_fault_fits_the_smallest_frame_limit():
    p = Pair(client_limits=StreamFrameLimits(max_frame_bytes=1024))
    p.c2s(Request(1, "x"))
    events = p.s2c(Fault(1, FabricError(StatusCode.NOT_FOUND, "é" * 5000, key="k" * 5000)))
    err = events[0].error
    assert err.status_code is StatusCode.NOT_FOUND and err.message == "é" * 256 and err.key == "k" * 200


def test_stats_and_connection_metadata():
    p = Pair()
    assert p.c2s(Stats(1, {"want": "all"})) == [Stats(1, {"want": "all"})]
    counters = p.server.stats()
    assert counters["live_requests"] == 1 and counters["frames_received"] == 3
    assert p.s2c(Stats(1, counters)) == [Stats(1, counters)]
    assert p.s2c(Metadata(0, {"welcome": {"caps": ["serve"]}})) == [Metadata(0, {"welcome": {"caps": ["serve"]}})]
    with pytest.raises(FabricError):  # a server cannot open a stats query
        p.server.send(Stats(2))


def test_goodbye_and_eof():
    p = Pair()
    assert closed_reason(p.c2s(Closed(None))) is None  # the server sees a clean goodbye
    assert closed_reason(drain(p.client)) is None
    with pytest.raises(FabricError) as ei:
        p.client.send(Request(1, "x"))
    assert ei.value.status_code is StatusCode.UNAVAILABLE and ei.value.retryable
    q = Pair()
    q.c2s(Request(1, "x"))
    q.client.receive_data(b"")
    err = closed_reason(drain(q.client))
    assert err.status_code is StatusCode.UNAVAILABLE and err.retryable and not q.client.live_requests


def test_local_misuse_raises_and_changes_nothing():
    p = Pair()
    before = p.client.stats()
    for bad, code in [
        (Request(1, "", None), StatusCode.INVALID_ARGUMENT),
        (Request(1, "x" * 65, None), StatusCode.INVALID_ARGUMENT),
        (Request(1, "echo", {1: "non-str key"}), StatusCode.INVALID_ARGUMENT),
        (Request(1, "echo", None, True, -1), StatusCode.INVALID_ARGUMENT),
        (Request(1, "echo", None, True, 0, math.nan), StatusCode.INVALID_ARGUMENT),
        (StreamData(9, b""), StatusCode.FAILED_PRECONDITION),
        (Response(1, None), StatusCode.FAILED_PRECONDITION),
        (Cancel(0), StatusCode.INVALID_ARGUMENT),
        (Hello("client", 1, bytes(32)), StatusCode.FAILED_PRECONDITION),
        ("not an event", StatusCode.INVALID_ARGUMENT),
    ]:
        with pytest.raises(FabricError) as ei:
            p.client.send(bad)
        assert ei.value.status_code is code, (bad, ei.value)
    assert p.client.stats() == before and p.client.data_to_send() == b""
    assert p.c2s(Request(1, "echo")) == [Request(1, "echo")]  # seq was not consumed by the failures


# --------------------------------------------------------------------------- limits


def test_oversized_frame_claim_is_refused_before_buffering():
    p = Pair(server_limits=SMALL)
    header = (SMALL.max_frame_bytes + 1).to_bytes(4, "big")
    p.server.receive_data(header[:2])
    assert p.server.buffered_bytes == 2
    p.server.receive_data(header[2:] + b"\x00" * 1000)
    err = closed_reason(drain(p.server))
    assert err.status_code is StatusCode.RESOURCE_EXHAUSTED and "4097 bytes" in err.message
    assert p.server.buffered_bytes == 0
    p.server.receive_data(b"\x00" * 100_000)
    assert p.server.buffered_bytes == 0
    # the authenticated peer is told why
    assert closed_reason(deliver(p.server, p.client)).status_code is StatusCode.RESOURCE_EXHAUSTED


def test_sender_respects_the_peer_frame_limit():
    p = Pair(server_limits=SMALL)
    with pytest.raises(FabricError) as ei:
        p.client.send(Request(1, "echo", b"x" * SMALL.max_frame_bytes))
    assert ei.value.status_code is StatusCode.RESOURCE_EXHAUSTED and "max_frame_bytes" in ei.value.message
    assert p.c2s(Request(1, "echo", b"x" * 3000)) == [Request(1, "echo", b"x" * 3000)]


def _empty_lists(n: int) -> bytes:
    return b"\xdd" + n.to_bytes(4, "big") + b"\x90" * n


def test_a_frame_that_decodes_past_the_compound_budget_closes_the_connection():
    # 4 MiB of empty lists in an open body decoded to ~290 MB of objects (specs/wire.md section 9)
    assert MAX_FRAME_COMPOUND == 65_536
    m = open_msg(1)
    del m["body"]
    head = codec.pack({**m, "body": None})[:-1]  # "body" last, without its nil
    assert head.endswith(b"\xa4body")
    for raw in (head + _empty_lists((4 << 20) - 256), head + _empty_lists(MAX_FRAME_COMPOUND)):
        p = Pair()
        err = closed_reason(deliver(p.client, p.server, p.forge(p.client, None, raw=raw)))
        assert err.status_code is StatusCode.RESOURCE_EXHAUSTED
        assert err.message == "frame seq 0: codec: input decodes to more than 65536 arrays, maps and ext values"
        assert closed_reason(deliver(p.server, p.client)).status_code is StatusCode.RESOURCE_EXHAUSTED
    # the envelope is held to the budget too (it is decoded before the MAC is checked)
    p = Pair()
    env = _empty_lists(100_000)
    err = closed_reason(deliver(p.client, p.server, len(env).to_bytes(4, "big") + env))
    assert err.status_code is StatusCode.RESOURCE_EXHAUSTED and "frame seq 0: envelope: codec:" in err.message
    # one under the budget (the open map and its body list) is an ordinary request
    p = Pair()
    ok = head + _empty_lists(MAX_FRAME_COMPOUND - 2)
    assert deliver(p.client, p.server, p.forge(p.client, None, raw=ok)) == [Request(1, "echo", [[]] * (MAX_FRAME_COMPOUND - 2))]


def test_sender_refuses_a_message_past_the_compound_budget_and_changes_nothing():
    p = Pair()
    pairs = [[i, i] for i in range(MAX_FRAME_COMPOUND)]
    before = p.client.stats()
    with pytest.raises(FabricError) as ei:
        p.client.send(Request(1, "echo", pairs))
    assert ei.value.status_code is StatusCode.RESOURCE_EXHAUSTED
    assert ei.value.message.startswith("open frame holds more than 65536 arrays, maps and ext values")
    assert p.client.stats() == before and p.client.data_to_send() == b"" and not p.client.live_requests
    # bulk data is not what the budget is about: 100k ints, and a 3 MiB bin, go as one frame
    ints = list(range(100_000))
    assert p.c2s(Request(1, "echo", {"xs": ints})) == [Request(1, "echo", {"xs": ints})]
    assert p.s2c(Response(1, [b"x" * (3 << 20), ints])) == [Response(1, [b"x" * (3 << 20), ints])]


def test_max_inflight_requests():
    p = Pair(server_limits=SMALL)
    for i in range(1, 5):
        p.c2s(Request(i, "echo"))
    with pytest.raises(FabricError) as ei:  # the client respects the server's advertised limit
        p.client.send(Request(5, "echo"))
    assert ei.value.status_code is StatusCode.RESOURCE_EXHAUSTED
    err = closed_reason(deliver(p.client, p.server, p.forge(p.client, open_msg(5))))
    assert err.status_code is StatusCode.RESOURCE_EXHAUSTED and "max_inflight_requests" in err.message


def test_max_streams():
    p = Pair(server_limits=SMALL)
    p.c2s(Request(1, "put", None, False))
    p.c2s(Request(2, "put", None, False))
    p.c2s(Request(3, "echo"))  # a non-upload is fine
    with pytest.raises(FabricError) as ei:
        p.client.send(Request(4, "put", None, False))
    assert ei.value.status_code is StatusCode.RESOURCE_EXHAUSTED
    p.s2c(Response(1, None))  # one upload finishes: room again
    p.c2s(Request(4, "put", None, False))
    err = closed_reason(deliver(p.client, p.server, p.forge(p.client, open_msg(5, end=False))))
    assert err.status_code is StatusCode.RESOURCE_EXHAUSTED and "max_streams" in err.message


def test_max_bytes_per_stream():
    p = Pair(client_limits=SMALL, server_limits=SMALL)
    p.c2s(Request(1, "get", None, True, 100))
    chunk = b"x" * 3000
    sent = 0
    while True:
        try:
            p.s2c(StreamData(1, chunk))
        except FabricError as exc:
            assert exc.status_code is StatusCode.RESOURCE_EXHAUSTED and "max_bytes_per_stream" in exc.message
            break
        sent += 1
    assert sent == 6 and p.client.state is ConnectionState.OPEN
    # a peer that ignores the limit is cut off
    forged = p.forge(p.server, {"t": "push", "id": 1, "data": chunk})
    err = closed_reason(deliver(p.server, p.client, forged))
    assert err.status_code is StatusCode.RESOURCE_EXHAUSTED and "max_bytes_per_stream" in err.message


def test_idle_timeout():
    limits = StreamFrameLimits(idle_timeout_s=10.0)
    c = WireConnection("client", SECRET, limits, now=0.0)
    s = WireConnection("server", SECRET, limits, now=0.0)
    while s.state is not ConnectionState.OPEN or c.state is not ConnectionState.OPEN:
        s.receive_data(c.data_to_send(), now=2.0)
        c.receive_data(s.data_to_send(), now=2.0)
    drain(c), drain(s)
    assert s.next_deadline() == 12.0
    s.receive_data(c.send(Request(1, "slow"), now=3.0), now=3.0)
    drain(s)
    s.check_timeouts(50.0)  # a live request is activity, not idleness
    assert s.state is ConnectionState.OPEN and s.next_deadline() == 60.0
    c.receive_data(s.send(Response(1, "done"), now=55.0), now=55.0)
    s.check_timeouts(64.0)
    assert s.state is ConnectionState.OPEN
    s.check_timeouts(65.0)
    err = closed_reason(drain(s))
    assert err.status_code is StatusCode.DEADLINE_EXCEEDED and "idle" in err.message
    # the peer gets a clean goodbye
    assert closed_reason(deliver(s, c)) is None


# --------------------------------------------------------------------------- malformed messages with valid MACs


@pytest.mark.parametrize("msg, needle", [
    ({"t": "open", "id": 2}, "lacks field"),
    ({**open_msg(2), "extra": 1}, "unknown field"),
    ({**open_msg(2), "credit": "3"}, "at `$.credit`"),
    ({**open_msg(2), "op": ""}, "at `$.op`"),
    ({**open_msg(2), "end": 1}, "at `$.end`"),
    ({**open_msg(2), "timeout": -1.0}, "at `$.timeout`"),
    ({**open_msg(2), "timeout": 1}, "at `$.timeout`"),
    ({"t": "warp", "id": 1}, "unknown frame type"),
    ({"t": "fault", "id": 1, "error": {}}, "abandons a request with `cancel`"),
    ({"t": "push", "id": 9, "data": 1}, "never opened"),
    ({"t": "push", "id": 0, "data": 1}, "reserved"),
    ({"t": "close", "id": 0, "body": 1}, "goodbye carries no body"),
    ({"t": "next", "id": 1, "credit": 0}, "at `$.credit`"),
    ([1, 2, 3], "expected `map`"),
    ("text", "expected `map`"),
])
def test_malformed_message_is_invalid_argument_with_a_location(msg, needle):
    p = Pair()
    p.c2s(Request(1, "put", None, end_stream=False))
    err = closed_reason(deliver(p.client, p.server, p.forge(p.client, msg)))
    assert err.status_code is StatusCode.INVALID_ARGUMENT and needle in err.message, err
    assert "\n" not in err.message


def test_server_only_messages_from_the_server_are_refused_by_the_client():
    for msg in (open_msg(1), {"t": "cancel", "id": 1}):
        p = Pair()
        err = closed_reason(deliver(p.server, p.client, p.forge(p.server, msg)))
        assert err.status_code is StatusCode.INVALID_ARGUMENT and "not allowed here" in err.message


def test_sealed_messages_may_use_any_map_order_and_int_width():
    """specs/wire.md section 5: after the MAC, msg need only be well-formed msgpack."""
    import msgpack

    p = Pair()
    p.c2s(Request(1, "op", None))
    # keys in non-canonical order, the id as a uint32 (not the shortest int), the body map unsorted
    raw = (b"\x83" + msgpack.packb("body") + msgpack.packb({"zz": 1, "a": [1.5]}) + msgpack.packb("id") + b"\xce\x00\x00\x00\x01"
           + msgpack.packb("t") + msgpack.packb("close"))
    assert not codec.is_canonical(raw)
    events = deliver(p.server, p.client, p.forge(p.server, None, raw=raw))
    assert events == [Response(1, {"zz": 1, "a": [1.5]})]
    assert p.client.state is ConnectionState.OPEN


@pytest.mark.parametrize("raw, needle", [
    (b"\xc1", "malformed msgpack"),             # a reserved byte
    (b"\x82\xa1t", "malformed msgpack"),        # truncated map
    (b"\x81\x01\xa1x", "malformed msgpack"),    # a map key that is not a str
])
def test_sealed_message_that_is_not_msgpack_is_refused(raw, needle):
    p = Pair()
    err = closed_reason(deliver(p.client, p.server, p.forge(p.client, None, raw=raw)))
    assert err.status_code is StatusCode.INVALID_ARGUMENT and needle in err.message, err


def test_malformed_fault_from_the_server_is_refused():
    p = Pair()
    p.c2s(Request(1, "x"))
    bad = {"t": "fault", "id": 1, "error": {"code": "NOPE", "message": "m", "retryable": False, "key": None}}
    err = closed_reason(deliver(p.server, p.client, p.forge(p.server, bad)))
    assert err.status_code is StatusCode.INVALID_ARGUMENT and "error.code" in err.message


# --------------------------------------------------------------------------- hypothesis: hostile input


def _check_bounded(conn: WireConnection) -> None:
    limit = conn.limits.max_frame_bytes if conn.state is ConnectionState.OPEN else HANDSHAKE_MAX_FRAME_BYTES
    assert conn.buffered_bytes < 4 + max(limit, HANDSHAKE_MAX_FRAME_BYTES)


@settings(max_examples=300, deadline=None)
@given(chunks=st.lists(st.binary(max_size=700), max_size=8))
def test_random_bytes_before_auth_never_crash_and_leak_nothing(chunks):
    s = WireConnection("server", SECRET)
    events = []
    for chunk in chunks:
        s.receive_data(chunk)
        _check_bounded(s)
        events += drain(s)
    out = s.data_to_send()
    assert all(isinstance(e, (Hello, Closed)) for e in events)
    for e in events:
        if isinstance(e, Closed):
            assert e.reason.status_code is StatusCode.UNAUTHENTICATED
    # the only thing ever sent to an unauthenticated peer is the server's own hello
    if out:
        n = int.from_bytes(out[:4], "big")
        assert len(out) == 4 + n and codec.decode(out[4:])["t"] == "hello"


_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_field_names = st.sampled_from(["t", "id", "op", "body", "end", "credit", "timeout", "data", "error", "x"])


@st.composite
def _messages(draw):
    t = draw(st.sampled_from(["open", "next", "push", "close", "cancel", "fault", "metadata", "stats",
                              "hello", "auth", "bogus"]))
    msg = {"t": t, "id": draw(st.integers(-2, 6) | st.integers(0, 2**64 - 1) | _values)}
    for name in draw(st.lists(_field_names, max_size=6, unique=True)):
        if name != "t":
            msg[name] = draw(_values | st.integers(-3, 10) | st.booleans())
    return msg


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(msgs=st.lists(_messages(), min_size=1, max_size=6), from_server=st.booleans())
@example(msgs=[{"t": "close", "id": 0, "body": None}], from_server=False)  # a goodbye: closed cleanly, no error
def test_authenticated_peer_sending_random_messages_never_crashes(msgs, from_server):
    p = Pair(SMALL, SMALL)
    p.c2s(Request(1, "get", None, True, 2))
    p.c2s(Request(2, "put", None, False))
    p.s2c(Credit(2, 1))
    sender, receiver = (p.server, p.client) if from_server else (p.client, p.server)
    for i, msg in enumerate(msgs):
        try:
            frame = p.forge(sender, msg, seq=sender.stats()["frames_sent"] - 2 + i)
        except FabricError:
            return  # not encodable (e.g. a float key); nothing to send
        receiver.receive_data(frame)
        _check_bounded(receiver)
        events = drain(receiver)
        if events and isinstance(events[-1], Closed):
            reason = events[-1].reason
            if reason is None:  # the generator drew a well-formed goodbye: a clean close
                assert msg == {"t": "close", "id": 0, "body": None}, msg
            else:
                assert reason.status_code in PEER_ERRORS, reason
            return


@settings(max_examples=200, deadline=None)
@given(chunks=st.lists(st.binary(min_size=1, max_size=5000), max_size=6), claim=st.integers(0, 2**32 - 1))
def test_garbage_and_length_claims_after_auth_stay_bounded(chunks, claim):
    p = Pair(SMALL, SMALL)
    p.server.receive_data(claim.to_bytes(4, "big"))
    _check_bounded(p.server)
    for chunk in chunks:
        p.server.receive_data(chunk)
        _check_bounded(p.server)
    events = drain(p.server)
    if claim == 0 or claim > SMALL.max_frame_bytes:
        assert closed_reason(events).status_code in (StatusCode.RESOURCE_EXHAUSTED, StatusCode.INVALID_ARGUMENT)
        assert p.server.buffered_bytes == 0
    for e in events:
        if isinstance(e, Closed):
            assert e.reason.status_code in PEER_ERRORS


def _handshaken_pair():
    """A client/server pair with fixed nonces: every such pair shares one session key."""
    c = WireConnection("client", SECRET, nonce=b"c" * 32, node_id="c")
    s = WireConnection("server", SECRET, nonce=b"s" * 32, node_id="s")
    while s.state is not ConnectionState.OPEN or c.state is not ConnectionState.OPEN:
        s.receive_data(c.data_to_send())
        c.receive_data(s.data_to_send())
    drain(c), drain(s)
    return c, s


def _conversation() -> bytes:
    c, _ = _handshaken_pair()
    wire = b""
    for i in range(1, 6):
        wire += c.send(Request(i, "op", {"i": i, "pad": b"p" * (i * 300)}, i % 2 == 0, i))
    return wire + c.send(Credit(1, 3)) + c.send(Metadata(3, "m")) + c.send(Cancel(4)) + c.send(Closed(None))


@settings(max_examples=100, deadline=None)
@given(cuts=st.lists(st.integers(0, 10_000), max_size=12))
def test_any_chunking_of_a_conversation_yields_the_same_events(cuts):
    wire = _conversation()
    _, ref = _handshaken_pair()
    ref.receive_data(wire)
    expected = drain(ref)
    assert len(expected) == 9 and closed_reason(expected) is None
    _, srv = _handshaken_pair()
    points = sorted({min(x, len(wire)) for x in cuts} | {0, len(wire)})
    got = []
    for a, b in zip(points, points[1:]):
        srv.receive_data(wire[a:b])
        _check_bounded(srv)
        got += drain(srv)
    assert [repr(e) for e in got] == [repr(e) for e in expected]


# --------------------------------------------------------------------------- hypothesis: well-behaved peers


class WellBehavedPeers(RuleBasedStateMachine):
    """Two honest peers doing random legal things, with bytes delivered in random pieces.

    Invariants: an honest pair never trips a protocol violation; nothing is
    ever buffered beyond one frame; once all bytes are delivered, both sides
    agree on which requests are live and on every credit balance.
    """

    def __init__(self):
        super().__init__()
        self.p = Pair(SMALL, SMALL)
        self.c_wire = bytearray()  # client -> server bytes not yet delivered
        self.s_wire = bytearray()
        self.seen: dict[str, int] = {}

    def _c(self, event):
        try:
            self.c_wire += self.p.client.send(event)
        except FabricError as exc:
            assert exc.status_code in (StatusCode.FAILED_PRECONDITION, StatusCode.RESOURCE_EXHAUSTED), exc

    def _s(self, event):
        try:
            self.s_wire += self.p.server.send(event)
        except FabricError as exc:
            assert exc.status_code in (StatusCode.FAILED_PRECONDITION, StatusCode.RESOURCE_EXHAUSTED), exc

    def _pick(self, data, conn, pred=lambda conn, rid: True):
        choices = [rid for rid in sorted(conn.live_requests) if pred(conn, rid)]
        return data.draw(st.sampled_from(choices)) if choices else None

    @rule(upload=st.booleans(), credit=st.integers(0, 3), size=st.integers(0, 3000))
    def open_request(self, upload, credit, size):
        self._c(Request(self.p.client.new_request_id(), "op", b"b" * size, not upload, credit))

    @rule(data=st.data(), size=st.integers(0, 2500))
    def client_push(self, data, size):
        rid = self._pick(data, self.p.client, lambda c, r: c.send_credit(r) > 0)
        if rid is not None:
            self._c(StreamData(rid, b"u" * size))

    @rule(data=st.data(), kind=st.sampled_from(["end", "credit", "meta", "cancel", "stats"]))
    def client_control(self, data, kind):
        if kind == "stats":
            self._c(Stats(self.p.client.new_request_id(), None))
            return
        rid = self._pick(data, self.p.client)
        if rid is not None:
            self._c({"end": EndOfStream(rid), "credit": Credit(rid, data.draw(st.integers(1, 3))),
                     "meta": Metadata(rid, {"m": 1}), "cancel": Cancel(rid)}[kind])

    @rule(data=st.data(), size=st.integers(0, 2500))
    def server_push(self, data, size):
        rid = self._pick(data, self.p.server, lambda c, r: c.send_credit(r) > 0)
        if rid is not None:
            self._s(StreamData(rid, b"d" * size))

    @rule(data=st.data(), n=st.integers(1, 3))
    def server_grant(self, data, n):
        rid = self._pick(data, self.p.server)
        if rid is not None:
            self._s(Credit(rid, n))

    @rule(data=st.data(), kind=st.sampled_from(["reply", "fault", "meta", "stats"]))
    def server_finish(self, data, kind):
        rid = self._pick(data, self.p.server)
        if rid is not None:
            self._s({"reply": Response(rid, "r"), "fault": Fault(rid, FabricError(StatusCode.NOT_FOUND, "nf")),
                     "meta": Metadata(rid, None), "stats": Stats(rid, {"n": 1})}[kind])

    @rule()
    def deliver_all(self):
        self.deliver_some(len(self.c_wire), True)
        self.deliver_some(len(self.s_wire), False)

    @rule(n=st.integers(1, 5000), to_server=st.booleans())
    def deliver_some(self, n, to_server):
        wire, dst = (self.c_wire, self.p.server) if to_server else (self.s_wire, self.p.client)
        piece = bytes(wire[:n])
        del wire[:n]
        if piece:  # b"" would mean EOF
            dst.receive_data(piece)
        for ev in drain(dst):
            assert not isinstance(ev, Closed), ev.reason
            self.seen[type(ev).__name__] = self.seen.get(type(ev).__name__, 0) + 1

    @invariant()
    def bounded_and_open(self):
        for conn in (self.p.client, self.p.server):
            _check_bounded(conn)
            assert conn.state is ConnectionState.OPEN

    def teardown(self):
        # flush everything: both sides must then agree exactly
        for wire, dst in ((self.c_wire, self.p.server), (self.s_wire, self.p.client)):
            if wire:
                dst.receive_data(bytes(wire))
        for conn in (self.p.client, self.p.server):
            for ev in drain(conn):
                assert not isinstance(ev, Closed), ev.reason
        c, s = self.p.client, self.p.server
        # the server may hold requests the client already cancelled only if the cancel is
        # still in flight; everything is delivered now, so the views coincide
        assert c.live_requests == s.live_requests
        for rid in c.live_requests:
            assert c.receive_credit(rid) == s.send_credit(rid)
            assert c.send_credit(rid) == s.receive_credit(rid)


TestWellBehavedPeers = WellBehavedPeers.TestCase
TestWellBehavedPeers.settings = settings(max_examples=100, stateful_step_count=50, deadline=None)
