"""The wire protocol against the byte-exact vectors published in ``specs/wire.md``.

The ```` ```hex NAME ```` blocks are read from the spec itself, so the published
text and the code cannot drift apart.  Two independent checks:

* a real client/server pair of :class:`fabric.wire.WireConnection`, with the
  spec's fixed secret, nonces and node ids, must emit exactly those bytes;
* the keys, proofs and MACs are recomputed here from the formulas of
  specs/wire.md sections 4-5 with plain BLAKE3 and msgpack (not through
  ``fabric.wire``), so the prose, not just the code, is what is checked.
"""

from __future__ import annotations

import re
from pathlib import Path

import blake3
import msgpack
import pytest

from fabric.wire import (
    NEED_DATA,
    Authenticated,
    ConnectionState,
    Request,
    Response,
    WireConnection,
)

SPEC = Path(__file__).resolve().parent.parent / "specs" / "wire.md"
_HEX_BLOCK = re.compile(r"^```hex ([A-Za-z0-9_-]+)\n(.*?)^```", re.MULTILINE | re.DOTALL)

SECRET = b"evalfabric wire test vector secret"
CLIENT_NONCE = bytes(range(0, 32))
SERVER_NONCE = bytes(range(32, 64))
PROOF_CTX = "evalfabric 2026-11-23 wire handshake proof key v1"
SESSION_CTX = "evalfabric 2026-11-23 wire session mac key v1"
# maps in canonical order, so the published frame is canonical (sealed frames need not be: specs/wire.md section 5)
REALIZE_BODY = {"args": {"dim": 8, "text": "hi"}, "version": "2", "evaluator": "embed"}


def load_vectors() -> dict[str, bytes]:
    text = SPEC.read_text(encoding="utf-8")
    out: dict[str, bytes] = {}
    for name, block in _HEX_BLOCK.findall(text):
        assert name not in out, f"duplicate vector {name!r} in {SPEC.name}"
        out[name] = bytes.fromhex("".join(block.split()))
    return out


VECTORS = load_vectors()
NAMES = ["client-hello", "server-hello", "client-auth", "server-auth", "proof-key", "transcript",
         "session-key", "client-open", "server-close"]


def test_spec_has_every_vector():
    assert set(NAMES) <= set(VECTORS), sorted(set(NAMES) - set(VECTORS))


def _drain(conn: WireConnection) -> list:
    out = []
    while (ev := conn.next_event()) is not NEED_DATA:
        out.append(ev)
        if ev.__class__.__name__ == "Closed":
            break
    return out


def test_state_machine_emits_the_published_bytes():
    c = WireConnection("client", SECRET, nonce=CLIENT_NONCE, node_id="client-1")
    s = WireConnection("server", SECRET, nonce=SERVER_NONCE, node_id="server-1")
    got = {}
    got["client-hello"] = c.data_to_send()
    s.receive_data(got["client-hello"])
    got["server-hello"] = s.data_to_send()
    c.receive_data(got["server-hello"])
    got["client-auth"] = c.data_to_send()
    s.receive_data(got["client-auth"])
    got["server-auth"] = s.data_to_send()
    c.receive_data(got["server-auth"])
    assert c.state is s.state is ConnectionState.OPEN
    assert any(isinstance(e, Authenticated) and e.peer_node_id == "server-1" for e in _drain(c))
    assert any(isinstance(e, Authenticated) and e.peer_node_id == "client-1" for e in _drain(s))
    got["client-open"] = c.send(Request(1, "realize", REALIZE_BODY, True, 0, 30.0))
    s.receive_data(got["client-open"])
    assert _drain(s) == [Request(1, "realize", REALIZE_BODY, True, 0, 30.0)]
    got["server-close"] = s.send(Response(1, {"value": [1, 2, 3]}))
    c.receive_data(got["server-close"])
    assert _drain(c) == [Response(1, {"value": [1, 2, 3]})]
    for name, data in got.items():
        assert data == VECTORS[name], f"{name}: state machine bytes differ from specs/wire.md"


def _body(frame: bytes) -> bytes:
    n = int.from_bytes(frame[:4], "big")
    assert len(frame) == 4 + n, "length prefix must cover exactly the body"
    return frame[4:]


def _keyed(key: bytes, *parts: bytes) -> bytes:
    return blake3.blake3(b"".join(parts), key=key).digest()


def test_formulas_of_the_spec_reproduce_the_vectors():
    hc, hs = _body(VECTORS["client-hello"]), _body(VECTORS["server-hello"])
    assert msgpack.unpackb(hc) == {"t": "hello", "v": 1, "role": "client", "nonce": CLIENT_NONCE}
    assert msgpack.unpackb(hs) == {"t": "hello", "v": 1, "role": "server", "nonce": SERVER_NONCE}

    proof_key = blake3.blake3(SECRET, derive_key_context=PROOF_CTX).digest()
    assert proof_key == VECTORS["proof-key"]
    transcript = blake3.blake3(len(hc).to_bytes(4, "big") + hc + len(hs).to_bytes(4, "big") + hs).digest()
    assert transcript == VECTORS["transcript"]
    session = blake3.blake3(proof_key + transcript, derive_key_context=SESSION_CTX).digest()
    assert session == VECTORS["session-key"]

    for name, label, node in (("client-auth", b"client", "client-1"), ("server-auth", b"server", "server-1")):
        auth = msgpack.unpackb(_body(VECTORS[name]))
        assert auth["node"] == node and set(auth) == {"t", "node", "limits", "proof"}
        assert auth["limits"] == {"max_frame_bytes": 4 * 1024 * 1024, "max_inflight_requests": 256,
                                  "max_streams": 64, "max_bytes_per_stream": 1 << 30}
        # the signed map: canonical msgpack, keys by (UTF-8 length, bytes)
        signed = msgpack.packb({"t": "auth", "node": node, "limits": dict(sorted(
            auth["limits"].items(), key=lambda kv: (len(kv[0]), kv[0])))}, use_bin_type=True)
        assert auth["proof"] == _keyed(proof_key, label, transcript, signed), name
        assert auth["proof"] != _keyed(proof_key, b"server" if label == b"client" else b"client",
                                       transcript, signed)

    for name, direction in (("client-open", 1), ("server-close", 2)):
        seq, msg, mac = msgpack.unpackb(_body(VECTORS[name]))
        assert seq == 0
        assert mac == _keyed(session, bytes([direction]), seq.to_bytes(8, "big"), msg), name
        # the other direction's MAC must differ (a reflected frame never verifies)
        assert mac != _keyed(session, bytes([3 - direction]), seq.to_bytes(8, "big"), msg)

    _, msg, _ = msgpack.unpackb(_body(VECTORS["client-open"]))
    assert msgpack.unpackb(msg) == {"t": "open", "id": 1, "op": "realize", "body": REALIZE_BODY,
                                    "end": True, "credit": 0, "timeout": 30.0}


@pytest.mark.parametrize("name", ["client-auth", "server-auth"])
def test_a_vector_proof_with_one_flipped_bit_is_rejected(name):
    """The peer receiving a tampered auth closes with UNAUTHENTICATED and sends nothing."""
    c = WireConnection("client", SECRET, nonce=CLIENT_NONCE, node_id="client-1")
    s = WireConnection("server", SECRET, nonce=SERVER_NONCE, node_id="server-1")
    s.receive_data(c.data_to_send())
    c.receive_data(s.data_to_send())
    client_auth = c.data_to_send()
    assert client_auth == VECTORS["client-auth"]
    victim, frame = (s, client_auth) if name == "client-auth" else (c, VECTORS["server-auth"])
    if name == "server-auth":
        s.receive_data(client_auth)
        assert s.data_to_send() == frame
    bad = bytearray(frame)
    proof_at = bad.index(b"\xc4\x20") + 2  # bin8 header of the 32-byte proof
    bad[proof_at] ^= 0x01
    victim.receive_data(bytes(bad))
    events = _drain(victim)
    assert events[-1].reason.status_code.name == "UNAUTHENTICATED"
    assert "proof does not verify" in events[-1].reason.message
    assert victim.data_to_send() == b""
