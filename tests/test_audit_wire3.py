"""Audit: an authenticated but misbehaving client against a live ``fabric node``.

Each probe plays a client that knows the secret and then writes whatever sealed
frames it likes (:class:`RawPeer`: the handshake from :class:`WireConnection`,
then frames sealed with the session key recomputed from the public formulas of
specs/wire.md, and the node's frames read back without a state machine).  The
contract checked: every bad request gets a one-line fault with the right status,
a protocol violation closes only that connection, the node keeps serving other
clients, holds no unbounded memory for a client, and still stops on SIGTERM.
"""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

import msgpack
import pytest

from cassette import codec
from cassette.keys import ContentKey
from fabric.wire import (
    Authenticated,
    StreamFrameLimits,
    WireConnection,
    frame_mac,
    proof_key,
    session_key,
    transcript_hash,
)

from _nodes import SECRET, node, start_node, stop_node


# --------------------------------------------------------------------------- a raw authenticated client


class RawPeer:
    """A client that completes the handshake honestly, then seals any message it is given."""

    def __init__(self, addr: str, *, limits: StreamFrameLimits | None = None, after_auth: list | None = None) -> None:
        host, port = addr.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        conn = WireConnection("client", SECRET, limits, node_id="raw-peer")
        hc = conn.data_to_send()
        self.buf = b""
        self.sock.sendall(hc)
        hs = self._frame()
        conn.receive_data(len(hs).to_bytes(4, "big") + hs)
        self.skey = session_key(proof_key(SECRET), transcript_hash(hc[4:], hs))
        self.seq = self.rseq = 0
        # frames in ``after_auth`` leave in the same write as our auth
        self.sock.sendall(conn.data_to_send() + b"".join(self.seal(m) for m in after_auth or ()))
        auth = self._frame()
        conn.receive_data(len(auth).to_bytes(4, "big") + auth)
        events = [conn.next_event(), conn.next_event()]  # Hello, then Authenticated: the node proved the secret
        assert isinstance(events[1], Authenticated), events
        self.welcome = None if after_auth else self.recv()

    def _frame(self) -> bytes:
        while True:
            if len(self.buf) >= 4:
                n = int.from_bytes(self.buf[:4], "big")
                if len(self.buf) >= 4 + n:
                    body, self.buf = self.buf[4 : 4 + n], self.buf[4 + n :]
                    return body
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise EOFError("the node closed the connection")
            self.buf += chunk

    def seal(self, msg: dict | None, raw: bytes | None = None) -> bytes:
        """The next sealed frame carrying ``msg`` (or the message bytes ``raw``)."""
        body = codec.pack(msg) if raw is None else raw
        env = msgpack.packb([self.seq, body, frame_mac(self.skey, 1, self.seq, body)])
        self.seq += 1
        return len(env).to_bytes(4, "big") + env

    def send(self, msg: dict | None = None, raw: bytes | None = None) -> None:
        self.sock.sendall(self.seal(msg, raw))

    def recv(self, timeout: float = 10) -> dict:
        self.sock.settimeout(timeout)
        seq, raw, mac = msgpack.unpackb(self._frame())
        assert seq == self.rseq and mac == frame_mac(self.skey, 2, seq, raw)
        self.rseq += 1
        return codec.decode(raw)

    def open(self, rid: int, op, body=None, *, end: bool = True, credit: int = 0, timeout=None) -> None:
        self.send({"t": "open", "id": rid, "op": op, "body": body, "end": end, "credit": credit, "timeout": timeout})

    def final(self, rid: int, timeout: float = 10) -> dict:
        """The node's final frame for ``rid`` (close / fault / stats answer) or a connection fault."""
        while True:
            m = self.recv(timeout)
            if m["id"] in (rid, 0) and m["t"] in ("close", "fault", "stats"):
                return m

    def ask(self, rid: int, op, body=None, **kw) -> dict:
        self.open(rid, op, body, **kw)
        return self.final(rid)

    def closing_fault(self, timeout: float = 10) -> dict:
        """The connection ``fault`` the node sends before it closes (frames before it skipped)."""
        while True:
            m = self.recv(timeout)
            if m["id"] == 0 and m["t"] == "fault":
                with pytest.raises((EOFError, ConnectionError)):
                    self.recv(timeout)
                return m["error"]

    def close(self) -> None:
        self.sock.close()


def still_serving(addr: str) -> None:
    """Another client is answered by the node (a stats query and a realize)."""
    p = RawPeer(addr)
    try:
        assert p.ask(1, "realize", {"evaluator": "text.embed", "version": "1", "args": {"text": "ok", "dim": 4}})["t"] == "close"
        p.send({"t": "stats", "id": 2, "body": None})
        assert p.final(2)["t"] == "stats"
    finally:
        p.close()


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """One node for the probes that must leave it serving; checked alive after every test."""
    with node(tmp_path_factory.mktemp("audit-wire3")) as (addr, proc, data):
        yield addr, proc


@pytest.fixture
def addr(live):
    address, proc = live
    yield address
    assert proc.poll() is None, "the node died"
    still_serving(address)


# --------------------------------------------------------------------------- one client's violation never kills the node


def test_a_stats_query_and_a_bad_frame_in_one_write_close_only_that_connection(addr):
    # the node parses both frames of the read, then answered the query on the closed
    # connection: its send raised UNAVAILABLE out of the read loop and the node exited
    p = RawPeer(addr)
    p.sock.sendall(p.seal({"t": "stats", "id": 1, "body": None}) + p.seal({"t": "bogus"}))
    err = p.closing_fault()
    assert err["code"] == "INVALID_ARGUMENT" and "unknown frame type 'bogus'" in err["message"]


def test_a_bad_frame_right_behind_the_auth_closes_only_that_connection(addr):
    # the same read brings the proof and the violation: the welcome was queued on a closed connection
    p = RawPeer(addr, after_auth=[{"t": "bogus"}])
    err = p.closing_fault()
    assert err["code"] == "INVALID_ARGUMENT" and "'bogus'" in err["message"]


def test_pipelining_past_max_inflight_in_one_write_is_resource_exhausted_for_that_connection(addr):
    # 300 stats queries in one write: the 257th is over max_inflight_requests (256) while the
    # first 256 still wait for their answers
    p = RawPeer(addr)
    p.sock.sendall(b"".join(p.seal({"t": "stats", "id": i, "body": None}) for i in range(1, 301)))
    err = p.closing_fault()
    assert err["code"] == "RESOURCE_EXHAUSTED" and "max_inflight_requests 256" in err["message"]


def test_a_client_whose_frame_limit_the_welcome_exceeds_is_refused_and_the_node_lives_on(tmp_path):
    # a client may advertise max_frame_bytes 1024; a node with a long capability list could not
    # queue its welcome, and the send error ended the node
    many = tmp_path / "many_evaluators.py"
    many.write_text("import fabric\n" + "".join(
        f"@fabric.evaluator('an.evaluator.with.a.rather.long.name.{i}', version='1')\ndef f{i}(x: int) -> int:\n"
        "    return x\n" for i in range(40)))
    addr, proc, _ = start_node(tmp_path, "n", "--evaluators", str(many))
    try:
        p = RawPeer(addr, limits=StreamFrameLimits(max_frame_bytes=1024))
        assert p.welcome["t"] == "fault" and p.welcome["id"] == 0, p.welcome
        err = p.welcome["error"]
        assert err["code"] == "RESOURCE_EXHAUSTED"
        assert err["message"].startswith("cannot send this client the welcome: metadata frame of ")
        assert "exceeds the peer's max_frame_bytes 1024" in err["message"]
        with pytest.raises((EOFError, ConnectionError)):
            p.recv()
        time.sleep(0.3)
        assert proc.poll() is None
        still_serving(addr)
    finally:
        stop_node(proc)


# --------------------------------------------------------------------------- a client that stops reading


BIG_EMBED = {"evaluator": "text.embed", "version": "1", "args": {"text": "a big reply", "dim": 200_000}}  # ~800 KB record


def test_a_client_that_stops_reading_does_not_hold_the_nodes_exit(tmp_path):
    # the node's writes are shielded from cancellation and bounded only by the write timeout
    # (300 s): SIGTERM left the node waiting on a client that no longer reads
    addr, proc, _ = start_node(tmp_path)
    try:
        p = RawPeer(addr)
        assert p.ask(1, "realize", BIG_EMBED)["t"] == "close"
        for rid in range(2, 102):  # 100 hits of ~800 KB, never read: more than both socket buffers hold
            p.open(rid, "realize", BIG_EMBED)
        time.sleep(1.0)
        still_serving(addr)  # meanwhile others are served
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(8)
        assert proc.returncode == 0 and time.monotonic() - t0 < 8
        p.close()
    finally:
        stop_node(proc)


def _rss_mib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmRSS"))


def test_inline_replies_a_client_does_not_read_are_bounded_per_connection(tmp_path):
    # 256 small realize hits for a ~1 MB record, answered inline by the read loop, were all
    # queued for a client that does not read: ~240 MiB held per connection for ~30 KB of requests
    addr, proc, _ = start_node(tmp_path)
    peers = []
    try:
        big = {"evaluator": "text.embed", "version": "1", "args": {"text": "just under the inline limit", "dim": 250_000}}
        p = RawPeer(addr)
        peers.append(p)
        assert p.ask(1, "realize", big, credit=8)["t"] == "close"
        before = _rss_mib(proc.pid)
        for _ in range(4):
            p = RawPeer(addr)
            peers.append(p)
            p.sock.sendall(b"".join(p.seal({"t": "open", "id": i, "op": "realize", "body": big, "end": True,
                                             "credit": 8, "timeout": None}) for i in range(1, 257)))
        time.sleep(1.5)
        assert _rss_mib(proc.pid) - before < 150  # was ~960 MiB
        still_serving(addr)
    finally:
        for p in peers:
            p.close()
        stop_node(proc)


def _peak_rss_mib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmHWM"))


def test_a_frame_of_empty_lists_costs_the_node_little_and_closes_only_that_connection(tmp_path):
    # one 4 MiB frame of `90` bytes as realize args decoded to ~4 million lists (~290 MB), and keying
    # them held the node's event loop ~3 s: the decode budget (specs/wire.md section 9) stops it early
    addr, proc, _ = start_node(tmp_path)
    other = RawPeer(addr)  # connected before, served after
    p = RawPeer(addr)
    try:
        assert other.ask(1, "realize", {"evaluator": "text.embed", "version": "1", "args": {"text": "x", "dim": 4}})["t"] == "close"
        before = _peak_rss_mib(proc.pid)
        n = (4 << 20) - 256
        realize = b"\x83\xa9evaluator\xaatext.embed\xa7version\xa11\xa4args\x81\xa1x"
        p.send(raw=_open_raw(1, "realize", realize + b"\xdd" + n.to_bytes(4, "big") + b"\x90" * n))
        err = p.closing_fault()
        assert err["code"] == "RESOURCE_EXHAUSTED", err
        assert err["message"] == "frame seq 0: codec: input decodes to more than 65536 arrays, maps and ext values"
        assert other.ask(2, "realize", {"evaluator": "text.embed", "version": "1", "args": {"text": "y", "dim": 4}})["t"] == "close"
        still_serving(addr)
        assert _peak_rss_mib(proc.pid) - before < 64  # was ~580 MiB (the lists, then the keying's copy)
    finally:
        p.close()
        other.close()
        stop_node(proc)


# --------------------------------------------------------------------------- metadata is not flow-controlled


def _meta(rid: int, body) -> dict:
    return {"t": "metadata", "id": rid, "body": body}


def test_metadata_a_node_keeps_per_request_is_bounded(addr):
    # a request the handler parks on (an upload nobody pushes to) kept every metadata body the
    # client sent, decoded (~70x the wire bytes for a list of empty lists), up to 1 GiB per request
    p = RawPeer(addr)
    p.open(1, "replay", None, end=False)
    lists = b"\xdd" + (65_000).to_bytes(4, "big") + b"\x90" * 65_000  # 65 KB: 65,000 empty lists (within the decode budget)
    for _ in range(9):
        p.send(raw=b"\x83\xa1t\xa8metadata\xa2id\x01\xa4body" + lists)
    m = p.final(1)
    assert m["t"] == "fault" and m["error"]["code"] == "RESOURCE_EXHAUSTED"
    assert m["error"]["message"] == "request 1 (replay): more than 8 metadata frames from the client"
    # the connection goes on; up to the bound a request is served as usual
    p.open(2, "replay", None, end=False)
    for i in range(8):
        p.send(_meta(2, {"i": i}))
    p.send({"t": "close", "id": 2, "body": None})
    assert p.final(2) == {"t": "close", "id": 2, "body": {"records": 0, "appended": 0, "blobs": 0}}
    p.close()


# --------------------------------------------------------------------------- bad bodies: one-line faults with the right status


def _open_raw(rid: int, op: str, body: bytes) -> bytes:
    """An ``open`` message whose body is the given msgpack bytes (nesting codec.pack cannot build)."""
    head = msgpack.packb({"t": "open", "id": rid, "op": op, "end": True, "credit": 0, "timeout": None})
    return bytes([head[0] + 1]) + head[1:] + b"\xa4body" + body


def _nested(depth: int) -> bytes:
    return b"\x91" * depth + b"\x90"


def test_a_deeply_nested_version_is_invalid_argument_not_internal(addr):
    # the fault's message repr'd the version: RecursionError, answered INTERNAL "handler failed"
    p = RawPeer(addr)
    realize = b"\x83\xa9evaluator\xaatext.embed\xa4args\x80\xa7version"
    for rid, version in ((1, _nested(1010)), (2, b"\xdd" + (300_000).to_bytes(4, "big") + b"\x00" * 300_000)):
        p.send(raw=_open_raw(rid, "realize", realize + version))
        m = p.final(rid)
        assert m["t"] == "fault" and m["error"]["code"] == "INVALID_ARGUMENT", m
        assert m["error"]["message"] == "evaluator version must be a str (or int), got list"
    p.close()


# --------------------------------------------------------------------------- map keys: `str` only (specs/wire.md section 5)


def _events(conn: WireConnection) -> list:
    """Every pending event, up to NEED_DATA or the Closed event (not listing NEED_DATA)."""
    out = []
    while not out or type(out[-1]).__name__ not in ("Closed", "NeedData"):
        out.append(conn.next_event())
    return out[:-1] if type(out[-1]).__name__ == "NeedData" else out


def _sealed_pair():
    """A handshaken client/server pair of state machines and a forger of client frames."""
    client, server = WireConnection("client", SECRET), WireConnection("server", SECRET)
    hc = client.data_to_send()
    server.receive_data(hc)
    hs = server.data_to_send()
    client.receive_data(hs)
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    skey = session_key(proof_key(SECRET), transcript_hash(hc[4:], hs[4:]))
    _events(server)  # Hello, Authenticated

    def forge(raw: bytes, seq: int = 0) -> bytes:
        env = msgpack.packb([seq, raw, frame_mac(skey, 1, seq, raw)])
        return len(env).to_bytes(4, "big") + env

    return server, forge


@pytest.mark.parametrize("msg", [
    # a `bin` key deep in a body was delivered to the handler as a bytes key
    {"t": "open", "id": 1, "op": "x", "body": {"args": [{b"k": 1}]}, "end": True, "credit": 0, "timeout": None},
    # two unknown fields, one `bin`: sorting them for the message raised, closing INTERNAL
    {"t": "cancel", "id": 1, "zz": 1, b"yy": 2},
])
def test_a_bin_map_key_anywhere_is_invalid_argument(msg):
    server, forge = _sealed_pair()
    server.receive_data(forge(msgpack.packb(msg, use_bin_type=True)))
    ev = _events(server)
    assert len(ev) == 1 and type(ev[0]).__name__ == "Closed", ev
    assert ev[0].reason.status_code.name == "INVALID_ARGUMENT"
    assert ev[0].reason.message == "frame seq 0: a map key is `bin`; map keys must be `str`"


def test_bin_values_are_still_fine_and_a_node_refuses_a_bin_key(addr):
    server, forge = _sealed_pair()
    msg = {"t": "open", "id": 1, "op": "x", "body": {"k": b"\xc4\xc5\xc6", "l": [b"", {"m": b"x"}]}, "end": True,
           "credit": 0, "timeout": None}
    server.receive_data(forge(msgpack.packb(msg, use_bin_type=True)))
    assert _events(server)[0].body == msg["body"]
    p = RawPeer(addr)
    p.send(raw=_open_raw(1, "realize", msgpack.packb({"evaluator": "text.embed", "version": "1", "args": {b"text": "x"}})))
    err = p.closing_fault()
    assert err["code"] == "INVALID_ARGUMENT" and "map keys must be `str`" in err["message"]


# --------------------------------------------------------------------------- probes that found nothing wrong (kept as guards)


def _fault(m: dict, code: str, needle: str) -> None:
    """``m`` is a one-line fault with status ``code`` whose message contains ``needle``."""
    assert m["t"] == "fault", m
    assert m["error"]["code"] == code and needle in m["error"]["message"], m
    assert "\n" not in m["error"]["message"]


def test_frames_for_finished_requests_are_ignored_and_for_unopened_ones_close_the_connection(addr):
    p = RawPeer(addr)
    assert p.ask(1, "holders", {"key": ContentKey.of("blob", b"x")}) == {"t": "close", "id": 1, "body": []}
    for late in ({"t": "cancel", "id": 1}, {"t": "next", "id": 1, "credit": 5}, {"t": "push", "id": 1, "data": b"x"},
                 _meta(1, {"late": True}), {"t": "close", "id": 1, "body": None}):
        p.send(late)
    assert p.ask(2, "holders", {"key": ContentKey.of("blob", b"x")})["t"] == "close"  # still served
    p.send({"t": "next", "id": 99, "credit": 1})
    err = p.closing_fault()
    assert err["code"] == "INVALID_ARGUMENT" and "request 99 was never opened" in err["message"]


@pytest.mark.parametrize("after_end, code, needle", [
    ({"t": "push", "id": 1, "data": b"x"}, "INVALID_ARGUMENT", "request 1 is not an open upload stream"),
    ({"t": "close", "id": 1, "body": None}, "INVALID_ARGUMENT", "request 1 is not an open upload stream"),
])
def test_a_push_or_close_after_the_end_of_an_upload_closes_the_connection(addr, after_end, code, needle):
    p = RawPeer(addr)
    p.open(1, "replay", None, end=False)
    p.sock.sendall(p.seal({"t": "close", "id": 1, "body": None}) + p.seal(after_end))  # one read: no reply between
    err = p.closing_fault()
    assert err["code"] == code and needle in err["message"]


def test_a_push_beyond_the_granted_credit_closes_the_connection(addr):
    p = RawPeer(addr)
    p.open(1, "replay", None, end=False)
    p.sock.sendall(b"".join(p.seal({"t": "push", "id": 1, "data": b""}) for _ in range(9)))  # the window is 8
    err = p.closing_fault()
    assert err["code"] == "RESOURCE_EXHAUSTED" and "pushed beyond its credit" in err["message"]


@pytest.mark.parametrize("op, needle", [
    (5, "expected `str`, got `int` - at `$.op`"),
    (None, "expected `str`, got `nil` - at `$.op`"),
    ("", "expected 1..64 UTF-8 bytes, got 0 - at `$.op`"),
    ("x" * 65, "expected 1..64 UTF-8 bytes, got 65 - at `$.op`"),
])
def test_an_op_that_is_not_a_short_string_closes_the_connection(addr, op, needle):
    p = RawPeer(addr)
    p.open(1, op, None)
    err = p.closing_fault()
    assert err["code"] == "INVALID_ARGUMENT" and needle in err["message"]


REALIZE_BODIES = [
    (None, "INVALID_ARGUMENT", "body: expected {'evaluator'"),
    ([1], "INVALID_ARGUMENT", "body: expected {'evaluator'"),
    ({"evaluator": 1, "version": "1", "args": {}}, "INVALID_ARGUMENT", "body: expected {'evaluator'"),
    ({"evaluator": "", "version": "1", "args": {}}, "INVALID_ARGUMENT", "evaluator: must be a non-empty str"),
    ({"evaluator": "text.embed", "version": True, "args": {}}, "INVALID_ARGUMENT", "got True"),
    ({"evaluator": "text.embed", "version": 1.5, "args": {}}, "INVALID_ARGUMENT", "got 1.5"),
    ({"evaluator": "text.embed", "version": "", "args": {}}, "INVALID_ARGUMENT", "must not be empty"),
    ({"evaluator": "text.embed", "version": b"1", "args": {}}, "INVALID_ARGUMENT", "got bytes"),
    ({"evaluator": "text.embed", "version": "1", "args": [1]}, "INVALID_ARGUMENT", "body.args: expected a map, got list"),
    ({"evaluator": "text.embed", "version": "1", "args": None}, "INVALID_ARGUMENT", "body.args: expected a map, got NoneType"),
    ({"evaluator": "text.embed", "version": "1", "args": {"nope": 1}}, "INVALID_ARGUMENT", "args: unexpected 'nope'"),
    ({"evaluator": "text.embed", "version": "1", "args": {"text": "x"}, "key": 5, "home": [1]}, None, None),  # hints ignored
    ({"evaluator": "text.embed", "version": "1", "args": {"text": "x"}, "key": ContentKey.of("blob", b"x")}, None, None),
    ({"evaluator": "no.such", "version": None, "args": {}}, "NOT_FOUND", "no evaluator named 'no.such'"),
    ({"evaluator": "no\nsuch", "version": "1", "args": {}}, "NOT_FOUND", "'no\\nsuch'"),
    ({"evaluator": "text.embed", "version": "9", "args": {}}, "NOT_FOUND", "has no version '9'"),
]


def test_realize_bodies_with_wrong_types_get_one_line_faults(addr):
    p = RawPeer(addr)
    for rid, (body, code, needle) in enumerate(REALIZE_BODIES, 1):
        m = p.ask(rid, "realize", body)
        if code is None:
            assert m["t"] == "close" and m["body"]["key"].kind == "request", m
        else:
            _fault(m, code, needle)


def test_lookup_keys_and_max_bytes_are_checked(addr):
    p = RawPeer(addr)
    req = ContentKey.for_request("embed", "1", {"text": "absent"})
    cases = [
        ({"keys": [req] * 257, "max_bytes": 10}, "body.keys: expected a list of at most 256 request keys"),
        ({"keys": [req] * 5000, "max_bytes": 10}, "body.keys: expected a list of at most 256 request keys"),
        ({"keys": req, "max_bytes": 10}, "body.keys: expected a list"),
        ({"keys": [req, str(req)], "max_bytes": 10}, "body.keys[1]: expected a request ContentKey"),
        ({"keys": [req, ContentKey.of("blob", b"x")], "max_bytes": 10}, "body.keys[1]: expected a request ContentKey"),
        ({"keys": [None], "max_bytes": 10}, "body.keys[0]: expected a request ContentKey"),
        ({"keys": [req], "max_bytes": -1}, "body.max_bytes: expected an int >= 0"),
        ({"keys": [req], "max_bytes": True}, "body.max_bytes: expected an int >= 0"),
        ({"keys": [req], "max_bytes": 1.0}, "body.max_bytes: expected an int >= 0"),
        ({"keys": [req]}, "body.max_bytes: expected an int >= 0"),
        (None, "body: expected a map"),
    ]
    for rid, (body, needle) in enumerate(cases, 1):
        _fault(p.ask(rid, "lookup", body), "INVALID_ARGUMENT", needle)
    m = p.ask(99, "lookup", {"keys": [req] * 256, "max_bytes": 2**80})  # the node caps max_bytes itself
    assert m["t"] == "close" and m["body"]["records"] == [None] * 256


def test_absent_keys_of_every_kind_are_not_found(addr):
    p = RawPeer(addr)
    absent = {"request": ContentKey.for_request("embed", "1", {"text": "never asked"}),
              "blob": ContentKey.of("blob", b"never stored"), "artifact": ContentKey.of("artifact", b"never stored")}
    rid = 0
    for kind, key in absent.items():
        for op in ("get", "fetch"):
            rid += 1
            _fault(p.ask(rid, op, {"key": key}, credit=4), "NOT_FOUND", "not held by this node")
        rid += 1
        assert p.ask(rid, "holders", {"key": key})["body"] == []
    for rid, (body, needle) in enumerate([({"key": "blob:zz"}, "content key 'blob:zz'"), ({"key": 7}, "body.key"),
                                          ({}, "body.key"), ("x", "body: expected a map")], rid + 1):
        _fault(p.ask(rid, "get", body, credit=4), "INVALID_ARGUMENT", needle)


def test_a_download_never_granted_credit_parks_only_that_request_until_cancelled(addr):
    p = RawPeer(addr)
    big = {"evaluator": "text.embed", "version": "1", "args": {"text": "pushed in pieces", "dim": 300_000}}  # ~1.2 MB
    p.open(1, "realize", big, credit=0)  # computed, then its record waits for credit to be pushed
    time.sleep(0.5)
    assert p.ask(2, "holders", {"key": ContentKey.of("blob", b"x")})["t"] == "close"  # the connection is served
    p.send({"t": "stats", "id": 3, "body": None})
    assert p.final(3)["body"]["server"]["requests"] == 1  # only the parked one
    p.send({"t": "cancel", "id": 1})
    deadline = time.monotonic() + 5
    for rid in range(4, 1000):  # the cancelled handler's task ends soon after the cancel is read
        p.send({"t": "stats", "id": rid, "body": None})
        if p.final(rid)["body"]["server"]["requests"] == 0:
            break
        assert time.monotonic() < deadline, "the cancelled request still runs"
        time.sleep(0.05)
    p.close()


def test_deep_nesting_in_a_body_is_a_clear_invalid_argument(addr):
    # up to msgpack's depth the request fails alone; deeper, the frame is malformed and only
    # this connection closes, saying why (was "malformed msgpack (StackError: )")
    p = RawPeer(addr)
    realize = b"\x83\xa9evaluator\xaatext.embed\xa7version\xa11\xa4args\x81\xa4text"
    p.send(raw=_open_raw(1, "realize", realize + _nested(1000)))
    _fault(p.final(1), "INVALID_ARGUMENT", "args: nesting too deep to encode")
    p.send(raw=_open_raw(2, "realize", realize + _nested(5000)))
    err = p.closing_fault()
    assert err["code"] == "INVALID_ARGUMENT"
    assert err["message"] == "frame seq 1: codec: malformed msgpack (arrays and maps nested too deeply)"


def test_a_request_its_client_neither_feeds_nor_drains_ends_after_the_idle_timeout(tmp_path):
    """A download whose client grants no credit, and an upload whose client sends nothing,
    hold what the node read for them (a whole record) only as long as a quiet connection
    lives: after ``--idle-timeout`` each ends DEADLINE_EXCEEDED naming what the client did
    not send (they used to wait for ever: a request in flight stops the idle timer)."""
    with node(tmp_path, "stall", "--idle-timeout", "1.5") as (addr, proc, _):
        p = RawPeer(addr)
        big = {"evaluator": "text.embed", "version": "1", "args": {"text": "never drained", "dim": 300_000}}  # pushed in pieces
        t0 = time.monotonic()
        p.open(1, "realize", big, credit=0)
        p.open(2, "replay", None, end=False, credit=0)
        faults = {}
        while len(faults) < 2:
            m = p.recv(15)
            if m["t"] == "fault" and m["id"] in (1, 2):
                faults[m["id"]] = m["error"]
        assert 1.4 < time.monotonic() - t0 < 10
        assert faults[1]["code"] == "DEADLINE_EXCEEDED" and faults[1]["message"].endswith("(realize): the client sent no credit for 1.5 s")
        assert faults[2]["code"] == "DEADLINE_EXCEEDED" and faults[2]["message"].endswith("(replay): the client sent no upload item for 1.5 s")
        p.send({"t": "stats", "id": 3, "body": None})
        assert p.final(3)["body"]["server"]["requests"] == 0  # nothing parked any more
        p.close()
        assert proc.poll() is None
