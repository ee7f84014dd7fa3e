"""The evalfabric peer wire protocol, as a sans-I/O state machine.

Normative text: ``specs/wire.md``.  Like h11, :class:`WireConnection` never
touches a socket or a clock: it takes bytes with :meth:`~WireConnection.receive_data`,
hands out parsed events with :meth:`~WireConnection.next_event` (or the
:data:`NEED_DATA` sentinel), and turns events into bytes with
:meth:`~WireConnection.send`.  Bytes the machine produces on its own (handshake
replies, the ``fault`` it sends before closing on a peer's violation) wait in an
outbox that :meth:`~WireConnection.data_to_send` drains; :meth:`~WireConnection.send`
returns the outbox *and* the new event's bytes, so writing every returned byte
string in the order it was returned keeps frames in sequence.  Time enters only
as explicit ``now`` arguments (:meth:`~WireConnection.check_timeouts`).

In one paragraph: frames are a 4-byte big-endian length and a canonical msgpack
body; the length is checked against the limit before any body byte is kept.  A
connection opens with a mutual shared-secret handshake (``hello`` both ways, then
keyed-BLAKE3 proofs over the transcript, client first, so a client without the
secret never receives a proof or a content byte).  After it, every frame is an
envelope ``[seq, msg, mac]`` whose MAC binds direction, sequence number and
message, so a replayed, reordered, dropped or altered frame closes the connection
with UNAUTHENTICATED.  Requests carry ids and pipeline; streams use credit-based flow
control.  Any limit a peer exceeds closes the connection with RESOURCE_EXHAUSTED
after a ``fault`` frame tells the (authenticated) peer why.

The trio adapter is :mod:`fabric.net`.
"""

from __future__ import annotations

import enum
import hmac
import math
import os
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterable, Union

import blake3
import msgpack

from cassette import codec
from cassette.errors import FabricError, StatusCode

__all__ = [
    "PROTOCOL_VERSION",
    "NONCE_BYTES",
    "MAC_BYTES",
    "HANDSHAKE_MAX_FRAME_BYTES",
    "MIN_FRAME_BYTES",
    "MAX_NODE_ID_BYTES",
    "MAX_OP_BYTES",
    "MAX_CREDIT",
    "MAX_REQUEST_ID",
    "MAX_FRAME_COMPOUND",
    "PROOF_KEY_CONTEXT",
    "SESSION_KEY_CONTEXT",
    "DIRECTION_CLIENT_TO_SERVER",
    "DIRECTION_SERVER_TO_CLIENT",
    "FRAME_TYPES",
    "StreamFrameLimits",
    "AdvertisedLimits",
    "ConnectionState",
    "NEED_DATA",
    "NeedData",
    "Hello",
    "Authenticated",
    "Request",
    "Stats",
    "Metadata",
    "StreamData",
    "Credit",
    "EndOfStream",
    "Response",
    "Cancel",
    "Fault",
    "Closed",
    "Event",
    "WireConnection",
    "proof_key",
    "transcript_hash",
    "session_key",
    "frame_mac",
]

#: The only wire version this module speaks (field ``v`` of ``hello``).
PROTOCOL_VERSION = 1
#: Bytes of a handshake nonce.
NONCE_BYTES = 32
#: Bytes of a proof and of a frame MAC (a BLAKE3 output).
MAC_BYTES = 32
#: Hard limit on a frame body before the handshake completes.
HANDSHAKE_MAX_FRAME_BYTES = 512
#: Smallest ``max_frame_bytes`` a node may configure or advertise.
MIN_FRAME_BYTES = 1024
#: Largest frame body the 4-byte length prefix can name.
MAX_FRAME_BYTES_CEILING = 0xFFFFFFFF
#: Longest node id (UTF-8 bytes).
MAX_NODE_ID_BYTES = 128
#: Longest op name (UTF-8 bytes).
MAX_OP_BYTES = 64
#: Most credit that may be outstanding on one stream in one direction.
MAX_CREDIT = 2**31 - 1
#: Largest request id.
MAX_REQUEST_ID = 2**63 - 1
#: Most compound values (arrays and maps, ndarray payloads' included, and ext values) one
#: frame's envelope or message may decode to: a 4 MiB frame of empty arrays would otherwise
#: build ~290 MB of Python objects.  A protocol constant (not advertised): over it is
#: RESOURCE_EXHAUSTED, on receipt (the connection closes) and in ``send`` (nothing sent).
MAX_FRAME_COMPOUND = 65_536
#: Longest error message carried in a ``fault`` frame (UTF-8 bytes; longer ones are cut).
MAX_FAULT_MESSAGE = 512
#: Longest error key text carried in a ``fault`` frame (UTF-8 bytes; longer ones are cut).
MAX_FAULT_KEY = 200

#: BLAKE3 derive_key context for the handshake proof key (published in specs/wire.md).
PROOF_KEY_CONTEXT = "evalfabric 2026-11-23 wire handshake proof key v1"
#: BLAKE3 derive_key context for the per-connection session MAC key.
SESSION_KEY_CONTEXT = "evalfabric 2026-11-23 wire session mac key v1"

#: Direction byte in a frame MAC: frames the client sends.
DIRECTION_CLIENT_TO_SERVER = 0x01
#: Direction byte in a frame MAC: frames the server sends.
DIRECTION_SERVER_TO_CLIENT = 0x02

_ROLES = ("client", "server")
_LABEL = {"client": b"client", "server": b"server"}
_DIRECTION = {"client": DIRECTION_CLIENT_TO_SERVER, "server": DIRECTION_SERVER_TO_CLIENT}

#: Every frame type (``t``): two handshake types, then the stream control ops.
FRAME_TYPES = ("hello", "auth", "open", "next", "push", "close", "cancel", "fault", "metadata", "stats")

# exact field sets per frame type (unknown or missing fields are malformed)
_FIELDS: dict[str, frozenset[str]] = {
    "hello": frozenset({"t", "v", "role", "nonce"}),
    "auth": frozenset({"t", "node", "limits", "proof"}),
    "open": frozenset({"t", "id", "op", "body", "end", "credit", "timeout"}),
    "next": frozenset({"t", "id", "credit"}),
    "push": frozenset({"t", "id", "data"}),
    "close": frozenset({"t", "id", "body"}),
    "cancel": frozenset({"t", "id"}),
    "fault": frozenset({"t", "id", "error"}),
    "metadata": frozenset({"t", "id", "body"}),
    "stats": frozenset({"t", "id", "body"}),
}
_LIMIT_FIELDS = ("max_frame_bytes", "max_inflight_requests", "max_streams", "max_bytes_per_stream")
# frames whose message bytes count towards max_bytes_per_stream
_COUNTED = frozenset({"open", "stats", "metadata", "push", "close"})
# push data of at least this many bytes is framed in place, never copied into an interim message
_IN_PLACE_BYTES = 64 * 1024
# the envelope's MAC field: bin 8 of MAC_BYTES
_MAC_HEADER = b"\xc4" + bytes((MAC_BYTES,))


# --------------------------------------------------------------------------- limits


def _positive_int(name: str, value: Any, lo: int = 1, hi: int = 2**63 - 1) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise FabricError(
            StatusCode.INVALID_ARGUMENT,
            f"StreamFrameLimits.{name}: expected an int in {lo}..{hi}, got {type(value).__name__}",
        )
    return value


def _positive_seconds(name: str, value: Any) -> float:
    if type(value) not in (int, float) or not value > 0:  # NaN fails too
        raise FabricError(
            StatusCode.INVALID_ARGUMENT,
            f"StreamFrameLimits.{name}: expected seconds > 0 (math.inf disables), got {value!r}",
        )
    return float(value)


@dataclass(frozen=True)
class AdvertisedLimits:
    """The limits a node tells its peer in its ``auth`` frame.

    The peer must respect them when it sends: no frame body over
    ``max_frame_bytes``, at most ``max_inflight_requests`` live request ids, at
    most ``max_streams`` of them upload streams, and at most
    ``max_bytes_per_stream`` counted bytes on one stream.
    """

    max_frame_bytes: int
    max_inflight_requests: int
    max_streams: int
    max_bytes_per_stream: int

    def to_wire(self) -> dict:
        """The ``limits`` map of an ``auth`` frame."""
        return {name: getattr(self, name) for name in _LIMIT_FIELDS}


@dataclass(frozen=True)
class StreamFrameLimits:
    """Hard limits of one wire connection (and of the server runner).

    * ``max_frame_bytes``: the longest frame body accepted; a longer length
      prefix closes the connection before a body byte is buffered.  At least
      :data:`MIN_FRAME_BYTES`.
    * ``max_inflight_requests``: live request ids (requests and stats queries
      not yet answered or cancelled) the peer may hold at once.
    * ``max_streams``: how many of those may be upload streams (opened with
      ``end=false``).
    * ``max_bytes_per_stream``: counted message bytes (``open``, ``stats``,
      ``metadata``, ``push``, ``close``) the peer may send on one request id.
    * ``handshake_timeout_s``: the handshake must finish this long after the
      connection starts.
    * ``idle_timeout_s``: with no live request, a connection that receives
      nothing for this long is closed (``math.inf`` disables).
    * ``max_connections``: authenticated connections a server runner keeps at
      once (:func:`fabric.net.serve`); the state machine does not use it.

    Invalid values raise ``FabricError(INVALID_ARGUMENT)`` naming the field.
    """

    max_frame_bytes: int = 4 * 1024 * 1024
    max_inflight_requests: int = 256
    max_streams: int = 64
    max_bytes_per_stream: int = 1 << 30
    handshake_timeout_s: float = 10.0
    idle_timeout_s: float = 300.0
    max_connections: int = 256

    def __post_init__(self) -> None:
        _positive_int("max_frame_bytes", self.max_frame_bytes, MIN_FRAME_BYTES, MAX_FRAME_BYTES_CEILING)
        _positive_int("max_inflight_requests", self.max_inflight_requests, 1, MAX_CREDIT)
        _positive_int("max_streams", self.max_streams, 1, MAX_CREDIT)
        _positive_int("max_bytes_per_stream", self.max_bytes_per_stream)
        _positive_seconds("handshake_timeout_s", self.handshake_timeout_s)
        _positive_seconds("idle_timeout_s", self.idle_timeout_s)
        _positive_int("max_connections", self.max_connections, 1, MAX_CREDIT)

    def advertised(self) -> AdvertisedLimits:
        """The subset of these limits a node advertises to its peer."""
        return AdvertisedLimits(
            self.max_frame_bytes, self.max_inflight_requests, self.max_streams, self.max_bytes_per_stream
        )


# --------------------------------------------------------------------------- events


class NeedData:
    """Type of :data:`NEED_DATA`: no complete event is buffered; feed more bytes."""

    _instance: "NeedData | None" = None

    def __new__(cls) -> "NeedData":
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NEED_DATA"

    def __reduce__(self):
        return (NeedData, ())


#: Returned by :meth:`WireConnection.next_event` when more bytes are needed.
NEED_DATA = NeedData()


@dataclass(frozen=True)
class Hello:
    """Received only: the peer's ``hello`` arrived (version, role, its fresh nonce).

    Informational; nothing about the peer is authenticated yet.
    """

    role: str
    version: int
    nonce: bytes


@dataclass(frozen=True)
class Authenticated:
    """Received only: the handshake completed; the peer proved the secret.

    ``peer_node_id`` is the node id the peer stated in its (proven) ``auth``
    frame; ``peer_limits`` are the limits it advertised, which this side's
    :meth:`WireConnection.send` now enforces on outgoing frames.
    """

    peer_node_id: str
    peer_limits: AdvertisedLimits


@dataclass(frozen=True)
class Request:
    """``open`` (client to server): start request ``req_id`` running ``op`` on ``body``.

    ``end_stream`` true means the client sends no ``push`` on it (a unary or
    download request); false makes it an upload stream (counts against
    ``max_streams``; the server grants credit before the client may push).
    ``credit`` is how many ``push`` frames the server may send before the
    client grants more.  ``timeout_s`` is the client's remaining deadline in
    seconds (relative; the server applies it from receipt) or ``None``.
    """

    req_id: int
    op: str
    body: Any = None
    end_stream: bool = True
    credit: int = 0
    timeout_s: float | None = None


@dataclass(frozen=True)
class Stats:
    """``stats``: from the client, a query opening request ``req_id``; from the
    server, the answer (``body`` a map of counters) that finishes it."""

    req_id: int
    body: Any = None


@dataclass(frozen=True)
class Metadata:
    """``metadata``: side information on live request ``req_id`` (either way).

    ``req_id == 0`` is connection-level metadata (for example capabilities).
    Not flow-controlled; counts towards ``max_bytes_per_stream``.
    """

    req_id: int
    body: Any = None


@dataclass(frozen=True)
class StreamData:
    """``push``: one item of stream data on request ``req_id`` (either way).

    Consumes one credit the receiver granted; a sender never exceeds it.
    """

    req_id: int
    data: Any


@dataclass(frozen=True)
class Credit:
    """``next``: the sender of this event grants ``credits`` more ``push`` frames
    on request ``req_id`` to its peer."""

    req_id: int
    credits: int


@dataclass(frozen=True)
class EndOfStream:
    """``close`` from the client on ``req_id``: the client sends no more ``push``."""

    req_id: int


@dataclass(frozen=True)
class Response:
    """``close`` from the server on ``req_id``: the final reply; the request is done."""

    req_id: int
    body: Any = None


@dataclass(frozen=True)
class Cancel:
    """``cancel`` (client to server): abandon ``req_id``; the server stops it and
    sends nothing more for it."""

    req_id: int


@dataclass(frozen=True)
class Fault:
    """``fault`` (server to client) on ``req_id``: the request failed with ``error``.

    Connection-level faults (``id`` 0) surface as :class:`Closed` instead.
    """

    req_id: int
    error: FabricError


@dataclass(frozen=True)
class Closed:
    """The connection is over; nothing more is sent or received.

    ``reason`` is ``None`` after a clean goodbye, else the :class:`FabricError`
    that ended it (the local detection, or the peer's connection ``fault``).
    Sending ``Closed(reason)`` closes the connection locally: a goodbye
    (``None``) or a connection ``fault`` (an error) after the handshake, no
    bytes before it.  Once returned by ``next_event`` it is returned again on
    every later call.
    """

    reason: FabricError | None = None


#: Every event type.
Event = Union[
    Hello, Authenticated, Request, Stats, Metadata, StreamData, Credit, EndOfStream, Response, Cancel, Fault, Closed
]


class ConnectionState(enum.Enum):
    """Where a :class:`WireConnection` is: handshaking, open for requests, or closed."""

    HANDSHAKE = "handshake"
    OPEN = "open"
    CLOSED = "closed"


# --------------------------------------------------------------------------- crypto (published in specs/wire.md)


def proof_key(secret: bytes) -> bytes:
    """The 32-byte handshake proof key: BLAKE3 derive_key(:data:`PROOF_KEY_CONTEXT`, secret)."""
    return blake3.blake3(bytes(secret), derive_key_context=PROOF_KEY_CONTEXT).digest()


def transcript_hash(client_hello: bytes, server_hello: bytes) -> bytes:
    """BLAKE3 of ``u32be(len) || client hello body || u32be(len) || server hello body``."""
    h = blake3.blake3()
    h.update(len(client_hello).to_bytes(4, "big"))
    h.update(client_hello)
    h.update(len(server_hello).to_bytes(4, "big"))
    h.update(server_hello)
    return h.digest()


def session_key(pkey: bytes, transcript: bytes) -> bytes:
    """The session MAC key: BLAKE3 derive_key(:data:`SESSION_KEY_CONTEXT`, proof key || transcript)."""
    return blake3.blake3(pkey + transcript, derive_key_context=SESSION_KEY_CONTEXT).digest()


def frame_mac(skey: bytes, direction: int, seq: int, msg: bytes) -> bytes:
    """Keyed BLAKE3 (key ``skey``) of ``direction byte || u64be(seq) || msg``."""
    return _mac_of(skey, direction, seq, (msg,))


def _mac_of(skey: bytes, direction: int, seq: int, pieces: tuple) -> bytes:
    """:func:`frame_mac` of the message whose bytes are ``pieces`` joined (never joined here)."""
    h = blake3.blake3(key=skey)
    h.update(bytes((direction,)))
    h.update(seq.to_bytes(8, "big"))
    for piece in pieces:
        h.update(piece)
    return h.digest()


def _bin_header(n: int) -> bytes:
    """msgpack's header of a bin of ``n`` bytes, in its shortest form (as msgpack packs it)."""
    if n < 0x100:
        return b"\xc4" + n.to_bytes(1, "big")
    if n < 0x10000:
        return b"\xc5" + n.to_bytes(2, "big")
    return b"\xc6" + n.to_bytes(4, "big")


def _push_pieces(rid: int, data: bytes) -> tuple:
    """The bytes of ``codec.pack({"t": "push", "id": rid, "data": data})`` as pieces, ``data`` itself last."""
    return (b"\x83\xa1t\xa4push\xa2id" + msgpack.packb(rid) + b"\xa4data" + _bin_header(len(data)), data)


def _envelope_in_place(body: memoryview) -> tuple[int, memoryview, memoryview] | None:
    """``[seq, msg, mac]`` of a sealed frame body as :meth:`WireConnection._seal` writes it
    (fixarray 3, a uint, two bins, nothing after), with ``msg`` and ``mac`` as views of
    ``body``; ``None`` for any other bytes (the general decoder then judges them)."""
    n = len(body)
    if n < 4 or body[0] != 0x93:
        return None
    b = body[1]
    if b < 0x80:
        seq, pos = b, 2
    elif 0xCC <= b <= 0xCF:
        size = 1 << (b - 0xCC)
        seq, pos = int.from_bytes(body[2 : 2 + size], "big"), 2 + size
    else:
        return None
    fields = []
    for _ in range(2):
        if pos >= n or not 0xC4 <= body[pos] <= 0xC6:
            return None
        size = 1 << (body[pos] - 0xC4)
        start = pos + 1 + size
        if start > n:
            return None
        end = start + int.from_bytes(body[pos + 1 : start], "big")
        if end > n:
            return None
        fields.append(body[start:end])
        pos = end
    if pos != n:
        return None
    return seq, fields[0], fields[1]


def _may_hold_bin(raw: bytes | memoryview) -> bool:
    """False only when ``raw`` surely holds no msgpack ``bin`` (no byte 0xc4..0xc6), hence no
    ``bin`` map key: a short scan in C that spares most messages the walk for one."""
    return type(raw) is not bytes or b"\xc4" in raw or b"\xc5" in raw or b"\xc6" in raw


def _proof(pkey: bytes, role: str, transcript: bytes, auth_fields: dict) -> bytes:
    h = blake3.blake3(key=pkey)
    h.update(_LABEL[role])
    h.update(transcript)
    h.update(codec.encode(auth_fields))
    return h.digest()


# --------------------------------------------------------------------------- validation helpers


class _Violation(Exception):
    """Internal: the peer broke the protocol; carries the error that closes the connection."""

    def __init__(self, code: StatusCode, message: str) -> None:
        super().__init__(message)
        self.error = FabricError(code, message)


def _tname(v: Any) -> str:
    if v is None:
        return "nil"
    if type(v) is bool:
        return "bool"
    if type(v) is int:
        return "int"
    if type(v) is float:
        return "float"
    if type(v) is str:
        return "str"
    if isinstance(v, bytes):
        return "bin"
    if type(v) is list:
        return "array"
    if type(v) is dict:
        return "map"
    return type(v).__name__


def _bad(where: str, expected: str, got: Any, path: str) -> _Violation:
    return _Violation(
        StatusCode.INVALID_ARGUMENT, f"{where}: expected {expected}, got `{_tname(got)}` - at `$.{path}`"
    )


def _check_shape(m: Any, where: str, allowed: tuple[str, ...]) -> str:
    """Check ``m`` is a map with a known ``t`` in ``allowed`` and exactly its fields."""
    if type(m) is not dict:
        raise _Violation(StatusCode.INVALID_ARGUMENT, f"{where}: expected `map`, got `{_tname(m)}` - at `$`")
    t = m.get("t")
    if type(t) is not str:
        raise _bad(where, "`str`", t, "t")
    if t not in _FIELDS:
        raise _Violation(StatusCode.INVALID_ARGUMENT, f"{where}: unknown frame type {t[:32]!r} - at `$.t`")
    if t not in allowed:
        raise _Violation(StatusCode.INVALID_ARGUMENT, f"{where}: a `{t}` frame is not allowed here - at `$.t`")
    fields = _FIELDS[t]
    if len(m) != len(fields) or not fields.issuperset(m):
        missing = sorted(fields.difference(m))
        if missing:
            raise _Violation(
                StatusCode.INVALID_ARGUMENT, f"{where}: `{t}` frame lacks field `{missing[0]}` - at `$`"
            )
        extra = sorted(k for k in m if k not in fields)
        raise _Violation(
            StatusCode.INVALID_ARGUMENT, f"{where}: `{t}` frame has unknown field {extra[0][:32]!r} - at `$`"
        )
    return t


def _int_field(m: dict, name: str, lo: int, hi: int, where: str) -> int:
    v = m[name]
    if type(v) is not int or not lo <= v <= hi:
        raise _bad(where, f"`int` in {lo}..{hi}", v, name)
    return v


def _text_field(m: dict, name: str, max_bytes: int, where: str, min_bytes: int = 0) -> str:
    v = m[name]
    if type(v) is not str:
        raise _bad(where, "`str`", v, name)
    n = len(v.encode("utf-8", "surrogatepass"))
    if not min_bytes <= n <= max_bytes:
        raise _Violation(
            StatusCode.INVALID_ARGUMENT,
            f"{where}: expected {min_bytes}..{max_bytes} UTF-8 bytes, got {n} - at `$.{name}`",
        )
    return v


def _bin_field(m: dict, name: str, size: int, where: str) -> bytes:
    v = m[name]
    if type(v) is not bytes or len(v) != size:
        raise _bad(where, f"`bin` of {size} bytes", v, name)
    return v


def _limits_field(m: dict, where: str) -> AdvertisedLimits:
    lm = m["limits"]
    if type(lm) is not dict or set(lm) != set(_LIMIT_FIELDS):
        raise _bad(where, "`map` with exactly " + ", ".join(_LIMIT_FIELDS), lm, "limits")
    vals = {}
    for name in _LIMIT_FIELDS:
        lo = MIN_FRAME_BYTES if name == "max_frame_bytes" else 1
        hi = {
            "max_frame_bytes": MAX_FRAME_BYTES_CEILING,
            "max_bytes_per_stream": 2**63 - 1,
        }.get(name, MAX_CREDIT)
        vals[name] = _int_field(lm, name, lo, hi, where + " limits")
    return AdvertisedLimits(**vals)


def _error_field(m: dict, where: str) -> FabricError:
    e = m["error"]
    if type(e) is not dict or set(e) != {"code", "message", "retryable", "key"}:
        raise _bad(where, "`map` with exactly code, message, retryable, key", e, "error")
    code = e["code"]
    if type(code) is not str or code not in StatusCode.__members__:
        raise _bad(where, "a status code name", code, "error.code")
    if type(e["message"]) is not str:
        raise _bad(where, "`str`", e["message"], "error.message")
    if type(e["retryable"]) is not bool:
        raise _bad(where, "`bool`", e["retryable"], "error.retryable")
    if e["key"] is not None and type(e["key"]) is not str:
        raise _bad(where, "`str` or nil", e["key"], "error.key")
    return FabricError.from_wire(
        {"code": code, "message": _cut(e["message"], MAX_FAULT_MESSAGE), "retryable": e["retryable"], "key": e["key"]}
    )


def _decode(raw: bytes, where: str, strict: bool = True) -> Any:
    """Decode (canonical only when ``strict``) within :data:`MAX_FRAME_COMPOUND`; a refusal
    becomes a located violation with the codec's status (INVALID_ARGUMENT, or RESOURCE_EXHAUSTED
    over the budget)."""
    try:
        return codec.decode(raw, strict=strict, max_compound=MAX_FRAME_COMPOUND)
    except FabricError as exc:
        raise _Violation(exc.status_code, f"{where}: {exc.message}") from None


def _check_compound(raw: bytes, what: str) -> None:
    """RESOURCE_EXHAUSTED (a local send error) when the message ``raw`` would decode to more than
    :data:`MAX_FRAME_COMPOUND` compound values at the peer; judged by the peer's own decoder."""
    try:
        codec.decode(raw, max_compound=MAX_FRAME_COMPOUND)
    except FabricError as exc:
        if exc.status_code is not StatusCode.RESOURCE_EXHAUSTED:
            raise
        raise FabricError(
            StatusCode.RESOURCE_EXHAUSTED,
            f"{what} frame holds more than {MAX_FRAME_COMPOUND} arrays, maps and ext values (the wire's "
            "per-frame budget); send bulk data as bytes or numpy arrays, or in several requests",
        ) from None


def _cut(text: str, max_bytes: int) -> str:
    raw = text.encode("utf-8", "replace")
    return text if len(raw) <= max_bytes else raw[:max_bytes].decode("utf-8", "ignore")


def _error_to_wire(err: FabricError) -> dict:
    """The error map of a ``fault``, cut so that any fault fits a MIN_FRAME_BYTES frame."""
    w = err.to_wire()
    key = w["key"]
    return {  # canonical field order
        "key": None if key is None else _cut(key, MAX_FAULT_KEY),
        "code": w["code"],
        "message": _cut(w["message"], MAX_FAULT_MESSAGE),
        "retryable": w["retryable"],
    }


def _timeout_value(v: Any) -> float | None:
    if v is None:
        return None
    if type(v) is int and not isinstance(v, bool):
        v = float(v)
    if type(v) is not float or not (v >= 0.0) or v == math.inf:
        raise FabricError(StatusCode.INVALID_ARGUMENT, "Request.timeout_s: expected finite seconds >= 0 or None")
    return v


def _misuse(text: str) -> FabricError:
    return FabricError(StatusCode.FAILED_PRECONDITION, text)


def _noop() -> None:
    return None


_OPEN = ("open",)


# --------------------------------------------------------------------------- streams


class _Stream:
    """Bookkeeping of one live request id on one side of the connection."""

    __slots__ = ("req_id", "kind", "upload", "local_open", "remote_open", "send_credit", "recv_credit",
                 "sent_bytes", "recv_bytes")

    def __init__(self, req_id: int, kind: str, upload: bool) -> None:
        self.req_id = req_id
        self.kind = kind  # "open" or "stats"
        self.upload = upload  # opened with end=false: the client pushes
        self.local_open = False  # this side may still push
        self.remote_open = False  # the peer may still push
        self.send_credit = 0  # pushes this side may still send
        self.recv_credit = 0  # pushes the peer may still send
        self.sent_bytes = 0
        self.recv_bytes = 0


# --------------------------------------------------------------------------- the connection

_PH_HELLO = "await_hello"
_PH_AUTH = "await_auth"
_PH_OPEN = "open"
_PH_CLOSED = "closed"


class WireConnection:
    """One end of one wire connection, as a pure state machine (no I/O, no clock).

    ``WireConnection(role, secret, limits=None, nonce=None, *, node_id="", now=0.0)``

    * ``role``: ``"client"`` (opens requests) or ``"server"`` (answers them).
    * ``secret``: the shared secret (non-empty bytes); only keys derived from
      it are kept.
    * ``limits``: this side's :class:`StreamFrameLimits` (enforced on what it
      receives, advertised to the peer).
    * ``nonce``: this side's 32-byte handshake nonce; ``None`` draws a fresh
      one from ``os.urandom`` (fixed nonces are for test vectors only).
    * ``node_id``: this node's id (at most 128 UTF-8 bytes), told to the peer
      only inside the proven ``auth`` frame.
    * ``now``: the caller's clock at creation (the handshake deadline counts
      from it).
    * ``accept`` (server only): further secrets a client may prove instead of
      ``secret`` (a rotation; a secret file read with and without its surrounding
      whitespace).  The server answers with a proof under the one the client
      proved, and the session keys derive from it.

    A client queues its ``hello`` at once (:meth:`data_to_send`).  Inputs are
    :meth:`receive_data` and :meth:`check_timeouts`; outputs are
    :meth:`next_event` and the bytes of :meth:`send` / :meth:`data_to_send`,
    which the caller must write in the order they were returned.
    ``receive_data`` and ``next_event`` never raise for anything a peer sends:
    a bad peer yields a :class:`Closed` event.  ``send`` raises
    ``FabricError`` for local misuse (FAILED_PRECONDITION), a value the codec
    cannot encode (INVALID_ARGUMENT), a frame or request the peer's advertised
    limits forbid (RESOURCE_EXHAUSTED), or a closed connection (UNAVAILABLE);
    a raising ``send`` changes nothing.
    """

    def __init__(
        self,
        role: str,
        secret: bytes,
        limits: StreamFrameLimits | None = None,
        nonce: bytes | None = None,
        *,
        node_id: str = "",
        now: float = 0.0,
        accept: Iterable[bytes] = (),
    ) -> None:
        if role not in _ROLES:
            raise FabricError(StatusCode.INVALID_ARGUMENT, f"role: expected 'client' or 'server', got {role!r}")
        if not isinstance(secret, (bytes, bytearray, memoryview)) or len(secret) == 0:
            raise FabricError(StatusCode.INVALID_ARGUMENT, "secret: expected non-empty bytes")
        if limits is None:
            limits = StreamFrameLimits()
        elif not isinstance(limits, StreamFrameLimits):
            raise FabricError(StatusCode.INVALID_ARGUMENT, "limits: expected a StreamFrameLimits")
        if nonce is None:
            nonce = os.urandom(NONCE_BYTES)
        if not isinstance(nonce, (bytes, bytearray)) or len(nonce) != NONCE_BYTES:
            raise FabricError(StatusCode.INVALID_ARGUMENT, f"nonce: expected {NONCE_BYTES} bytes")
        if type(node_id) is not str or len(node_id.encode("utf-8")) > MAX_NODE_ID_BYTES:
            raise FabricError(
                StatusCode.INVALID_ARGUMENT, f"node_id: expected a str of at most {MAX_NODE_ID_BYTES} UTF-8 bytes"
            )
        self.role = role
        self.limits = limits
        self.node_id = node_id
        self.peer_node_id: str | None = None
        self.peer_limits: AdvertisedLimits | None = None
        self._peer_role = "server" if role == "client" else "client"
        self._nonce = bytes(nonce)
        self._pkey = proof_key(bytes(secret))
        self._pkeys = (self._pkey,)  # the proof keys a peer's auth may verify under
        accept = tuple(accept)
        if accept:
            if role != "server":
                raise FabricError(StatusCode.INVALID_ARGUMENT, "accept: only a server accepts further secrets")
            if not all(isinstance(a, (bytes, bytearray, memoryview)) and len(a) for a in accept):
                raise FabricError(StatusCode.INVALID_ARGUMENT, "accept: expected non-empty bytes")
            self._pkeys += tuple(k for k in (proof_key(bytes(a)) for a in accept) if k != self._pkey)
        self._skey = b""
        self._transcript = b""
        self._hello_ours = codec.encode({"t": "hello", "v": PROTOCOL_VERSION, "role": role, "nonce": self._nonce})
        self._phase = _PH_HELLO
        self._rbuf = bytearray()
        self._out = bytearray()
        self._events: deque = deque()
        self._closed: Closed | None = None
        self._send_seq = 0
        self._recv_seq = 0
        self._streams: dict[int, _Stream] = {}
        self._highest_id = 0
        self._next_id = 0
        self._uploads = 0
        self._started = float(now)
        self._last_activity = float(now)
        self._counters = {"frames_sent": 0, "frames_received": 0, "bytes_sent": 0, "bytes_received": 0}
        if role == "client":
            self._queue_plain(self._hello_ours)

    # ------------------------------------------------------------------ public state

    @property
    def state(self) -> ConnectionState:
        """HANDSHAKE until both proofs verified, then OPEN, then CLOSED."""
        if self._phase == _PH_OPEN:
            return ConnectionState.OPEN
        if self._phase == _PH_CLOSED:
            return ConnectionState.CLOSED
        return ConnectionState.HANDSHAKE

    @property
    def last_activity(self) -> float:
        """The caller's clock at the latest ``receive_data`` / ``send`` given a ``now`` (or creation)."""
        return self._last_activity

    @property
    def buffered_bytes(self) -> int:
        """Received bytes held for an incomplete frame; always below 4 + the frame limit."""
        return len(self._rbuf)

    @property
    def live_requests(self) -> frozenset[int]:
        """Request ids live on this side (opened or queried, not yet finished or cancelled)."""
        return frozenset(self._streams)

    def is_live(self, req_id: int) -> bool:
        """Whether ``req_id`` is live on this side (frames may still be sent for it)."""
        return req_id in self._streams

    def send_credit(self, req_id: int) -> int:
        """How many ``push`` frames this side may send on ``req_id`` now (0 if not live)."""
        s = self._streams.get(req_id)
        return 0 if s is None else s.send_credit

    def receive_credit(self, req_id: int) -> int:
        """How many ``push`` frames the peer may still send on ``req_id`` (credit this side granted)."""
        s = self._streams.get(req_id)
        return 0 if s is None else s.recv_credit

    def new_request_id(self) -> int:
        """Reserve the next request id (client only); send its Request before reserving another."""
        if self.role != "client":
            raise FabricError(StatusCode.FAILED_PRECONDITION, "only a client allocates request ids")
        self._next_id = max(self._next_id, self._highest_id) + 1
        return self._next_id

    def stats(self) -> dict:
        """Counters of this connection: frames/bytes sent and received, live requests, state."""
        out = dict(self._counters)
        out["live_requests"] = len(self._streams)
        out["state"] = self.state.value
        return out

    # ------------------------------------------------------------------ outputs

    def data_to_send(self) -> bytes:
        """Drain and return the bytes the machine queued on its own (in order)."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def next_event(self) -> Event | NeedData:
        """The next parsed event, :data:`NEED_DATA`, or (once closed, forever) the :class:`Closed` event."""
        if self._events:
            return self._events.popleft()
        if self._closed is not None:
            return self._closed
        return NEED_DATA

    def next_deadline(self) -> float | None:
        """When :meth:`check_timeouts` should next be called (caller's clock), or ``None``."""
        if self._phase == _PH_CLOSED:
            return None
        if self._phase != _PH_OPEN:
            return self._started + self.limits.handshake_timeout_s
        if math.isinf(self.limits.idle_timeout_s):
            return None
        return self._last_activity + self.limits.idle_timeout_s

    # ------------------------------------------------------------------ inputs

    def check_timeouts(self, now: float) -> None:
        """Apply the handshake and idle timeouts at time ``now``.

        Before the handshake completes: past ``handshake_timeout_s`` the
        connection closes with DEADLINE_EXCEEDED and sends nothing.  After it:
        a live request counts as activity at ``now``; otherwise, when nothing
        was received for ``idle_timeout_s``, a goodbye is queued and the
        connection closes with DEADLINE_EXCEEDED (retryable) as the local reason.
        """
        if self._phase == _PH_CLOSED:
            return
        if self._phase != _PH_OPEN:
            if now - self._started >= self.limits.handshake_timeout_s:
                self._fail(
                    FabricError(
                        StatusCode.DEADLINE_EXCEEDED,
                        f"handshake did not complete within {self.limits.handshake_timeout_s:g} s",
                    )
                )
            return
        if self._streams:
            self._last_activity = max(self._last_activity, now)
            return
        if now - self._last_activity >= self.limits.idle_timeout_s:
            self._queue_msg({"t": "close", "id": 0, "body": None})
            self._finish(
                FabricError(
                    StatusCode.DEADLINE_EXCEEDED,
                    f"connection idle for {self.limits.idle_timeout_s:g} s; closed",
                    retryable=True,
                )
            )

    def receive_data(self, data: bytes, now: float | None = None) -> None:
        """Feed bytes read from the peer; ``b""`` means the peer closed (EOF).

        Complete frames are parsed at once into events for :meth:`next_event`;
        at most one incomplete frame stays buffered, and its length prefix is
        checked against the limit before any of its body is kept.  ``now``
        (optional) records activity for the idle timeout.  Bytes after the
        connection closed are discarded.  Never raises for the bytes' content.
        """
        if self._phase == _PH_CLOSED:
            return
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise FabricError(StatusCode.INVALID_ARGUMENT, f"receive_data: expected bytes, got {type(data).__name__}")
        if now is not None:
            self._last_activity = max(self._last_activity, float(now))
        if len(data) == 0:
            self._on_eof()
            return
        self._counters["bytes_received"] += len(data)
        if self._rbuf:
            self._rbuf += data
            src: Any = self._rbuf
        else:
            src = data
        mv = memoryview(src)
        pos = 0
        try:
            total = len(mv)
            while self._phase != _PH_CLOSED and total - pos >= 4:
                n = int.from_bytes(mv[pos : pos + 4], "big")
                limit = self.limits.max_frame_bytes if self._phase == _PH_OPEN else HANDSHAKE_MAX_FRAME_BYTES
                if n == 0 or n > limit:
                    self._reject_length(n, limit)
                    break
                if total - pos - 4 < n:
                    break
                body = mv[pos + 4 : pos + 4 + n]  # a view: parsed in place, released before the buffer changes
                pos += 4 + n
                self._counters["frames_received"] += 1
                try:
                    self._on_frame(body)
                finally:
                    body.release()
        finally:
            rest = mv[pos:] if self._phase != _PH_CLOSED else mv[:0]
            keep = bytearray(rest) if (pos or src is not self._rbuf) else None
            rest.release()
            mv.release()
        if self._phase == _PH_CLOSED:
            self._rbuf = bytearray()
        elif keep is not None:
            self._rbuf = keep

    # ------------------------------------------------------------------ send

    def send(self, event: Event, now: float | None = None) -> bytes:
        """Turn ``event`` into frame bytes; returns queued bytes first, then its own.

        Sendable: a client sends :class:`Request`, :class:`Stats` (query),
        :class:`Metadata`, :class:`StreamData`, :class:`Credit`,
        :class:`EndOfStream`, :class:`Cancel`; a server sends :class:`Stats`
        (answer), :class:`Metadata`, :class:`StreamData`, :class:`Credit`,
        :class:`Response`, :class:`Fault`; either sends :class:`Closed`.
        ``now`` (optional) records activity for the idle timeout.  Raises
        ``FabricError`` as described on the class and then changes nothing.
        """
        if self._phase == _PH_CLOSED:
            raise FabricError(StatusCode.UNAVAILABLE, "wire connection is closed", retryable=True)
        if isinstance(event, Closed):
            if event.reason is not None and not isinstance(event.reason, FabricError):
                raise FabricError(StatusCode.INVALID_ARGUMENT, "Closed.reason: expected a FabricError or None")
            if self._phase == _PH_OPEN:
                if event.reason is None:
                    self._queue_msg({"t": "close", "id": 0, "body": None})
                else:
                    self._queue_msg({"t": "fault", "id": 0, "error": _error_to_wire(event.reason)})
            else:
                self._out.clear()  # nothing but handshake frames ever; none needed now
            self._finish(event.reason)
            return self.data_to_send()
        if self._phase != _PH_OPEN:
            raise FabricError(
                StatusCode.FAILED_PRECONDITION,
                f"cannot send {type(event).__name__} before the handshake completes",
            )
        msg, commit = self._prepare(event)
        stream_id = msg["id"]
        data = msg.get("data")
        if msg["t"] == "push" and type(data) is bytes and len(data) >= _IN_PLACE_BYTES:
            pieces = _push_pieces(stream_id, data)  # no interim copy of a large chunk
        else:
            pieces = (codec.pack(msg, root=type(event).__name__),)
        size = sum(map(len, pieces))
        st = self._streams.get(stream_id)
        counted = st is not None and msg["t"] in _COUNTED
        if counted and st.sent_bytes + size > self.peer_limits.max_bytes_per_stream:
            raise FabricError(
                StatusCode.RESOURCE_EXHAUSTED,
                f"request {stream_id}: {st.sent_bytes + size} bytes would exceed the peer's "
                f"max_bytes_per_stream {self.peer_limits.max_bytes_per_stream}",
            )
        if st is None and msg["t"] in ("open", "stats") and size > self.peer_limits.max_bytes_per_stream:
            raise FabricError(
                StatusCode.RESOURCE_EXHAUSTED,
                f"request {stream_id}: open of {size} bytes exceeds the peer's max_bytes_per_stream",
            )
        frame = self._seal(pieces, size)
        if len(frame) - 4 > self.peer_limits.max_frame_bytes:
            raise FabricError(
                StatusCode.RESOURCE_EXHAUSTED,
                f"{msg['t']} frame of {len(frame) - 4} bytes exceeds the peer's max_frame_bytes "
                f"{self.peer_limits.max_frame_bytes}; stream the value in chunks",
            )
        if len(pieces) == 1 and size > MAX_FRAME_COMPOUND:  # (shorter messages cannot exceed it)
            _check_compound(pieces[0], msg["t"])
        # committed from here on: nothing below raises
        self._send_seq += 1
        commit()
        st = self._streams.get(stream_id)
        if st is not None and msg["t"] in _COUNTED:
            st.sent_bytes += size
        if now is not None:
            self._last_activity = max(self._last_activity, float(now))
        if self._out:
            self._emit(frame)
            return self.data_to_send()
        self._count(frame)
        return frame  # nothing queued before it: no copy through the queue

    def _prepare(self, ev: Any) -> tuple[dict, Any]:
        """Validate a local event against the state; return its message and a commit action."""
        client = self.role == "client"
        misuse = _misuse
        noop = _noop
        live = self._live

        if isinstance(ev, Request) or (isinstance(ev, Stats) and client):
            if not client:
                raise misuse("only a client opens requests")
            rid = ev.req_id
            if type(rid) is not int or not self._highest_id < rid <= MAX_REQUEST_ID:
                raise misuse(f"request id must be an int above {self._highest_id} (ids only increase)")
            if len(self._streams) >= self.peer_limits.max_inflight_requests:
                raise FabricError(
                    StatusCode.RESOURCE_EXHAUSTED,
                    f"peer allows {self.peer_limits.max_inflight_requests} in-flight requests; wait for a reply",
                )
            if isinstance(ev, Stats):
                msg = {"t": "stats", "id": rid, "body": ev.body}
                upload = False
                kind = "stats"
                credit = 0
            else:
                if type(ev.op) is not str or not 1 <= len(ev.op.encode("utf-8", "surrogatepass")) <= MAX_OP_BYTES:
                    raise FabricError(
                        StatusCode.INVALID_ARGUMENT, f"Request.op: expected a str of 1..{MAX_OP_BYTES} UTF-8 bytes"
                    )
                if type(ev.end_stream) is not bool:
                    raise FabricError(StatusCode.INVALID_ARGUMENT, "Request.end_stream: expected a bool")
                credit = ev.credit
                if type(credit) is not int or not 0 <= credit <= MAX_CREDIT:
                    raise FabricError(StatusCode.INVALID_ARGUMENT, f"Request.credit: expected an int in 0..{MAX_CREDIT}")
                upload = not ev.end_stream
                if upload and self._uploads >= self.peer_limits.max_streams:
                    raise FabricError(
                        StatusCode.RESOURCE_EXHAUSTED,
                        f"peer allows {self.peer_limits.max_streams} upload streams; wait for one to finish",
                    )
                msg = {  # fields in canonical order (specs/wire.md section 5: not required, but tidy)
                    "t": "open", "id": rid, "op": ev.op, "end": ev.end_stream, "body": ev.body,
                    "credit": credit, "timeout": _timeout_value(ev.timeout_s),
                }
                kind = "open"

            def commit() -> None:
                st = _Stream(rid, kind, upload)
                st.local_open = upload
                st.remote_open = True
                st.recv_credit = credit
                self._streams[rid] = st
                self._highest_id = rid
                if upload:
                    self._uploads += 1

            return msg, commit

        if isinstance(ev, Stats):  # server answering a stats query
            st = live(ev, ev.req_id, ("stats",))
            return {"t": "stats", "id": ev.req_id, "body": ev.body}, lambda: self._drop(st.req_id)

        if isinstance(ev, Metadata):
            if ev.req_id == 0:
                return {"t": "metadata", "id": 0, "body": ev.body}, noop
            live(ev, ev.req_id, _OPEN)
            return {"t": "metadata", "id": ev.req_id, "body": ev.body}, noop

        if isinstance(ev, StreamData):
            st = live(ev, ev.req_id, _OPEN)
            if client and not st.local_open:
                raise misuse(f"request {ev.req_id} is not an open upload stream")
            if st.send_credit <= 0:
                raise misuse(f"no credit to push on request {ev.req_id}; wait for a Credit event")

            def commit_push() -> None:
                st.send_credit -= 1

            return {"t": "push", "id": ev.req_id, "data": ev.data}, commit_push

        if isinstance(ev, Credit):
            st = live(ev, ev.req_id, _OPEN)
            n = ev.credits
            if type(n) is not int or not 1 <= n <= MAX_CREDIT or st.recv_credit + n > MAX_CREDIT:
                raise FabricError(
                    StatusCode.INVALID_ARGUMENT, f"Credit.credits: expected an int >= 1, outstanding <= {MAX_CREDIT}"
                )
            if not client and not st.remote_open:
                raise misuse(f"request {ev.req_id}: the client already ended its upload")

            def commit_credit() -> None:
                st.recv_credit += n

            return {"t": "next", "id": ev.req_id, "credit": n}, commit_credit

        if isinstance(ev, EndOfStream):
            if not client:
                raise misuse("only a client ends an upload (a server sends Response)")
            st = live(ev, ev.req_id, _OPEN)
            if not st.local_open:
                raise misuse(f"request {ev.req_id} is not an open upload stream")

            def commit_end() -> None:
                st.local_open = False
                st.send_credit = 0

            return {"t": "close", "id": ev.req_id, "body": None}, commit_end

        if isinstance(ev, Response):
            if client:
                raise misuse("only a server sends Response")
            st = live(ev, ev.req_id, _OPEN)
            return {"t": "close", "id": ev.req_id, "body": ev.body}, lambda: self._drop(st.req_id)

        if isinstance(ev, Fault):
            if client:
                raise misuse("a client abandons a request with Cancel, not Fault")
            if not isinstance(ev.error, FabricError):
                raise FabricError(StatusCode.INVALID_ARGUMENT, "Fault.error: expected a FabricError")
            st = live(ev, ev.req_id, ("open", "stats"))
            return {"t": "fault", "id": ev.req_id, "error": _error_to_wire(ev.error)}, lambda: self._drop(st.req_id)

        if isinstance(ev, Cancel):
            if not client:
                raise misuse("a server ends a request with Fault, not Cancel")
            st = live(ev, ev.req_id, ("open", "stats"))
            return {"t": "cancel", "id": ev.req_id}, lambda: self._drop(st.req_id)

        if isinstance(ev, (Hello, Authenticated)):
            raise misuse(f"{type(ev).__name__} is produced by the handshake, not sent")
        raise FabricError(StatusCode.INVALID_ARGUMENT, f"not a wire event: {type(ev).__name__}")

    def _live(self, ev: Any, req_id: Any, kinds: tuple[str, ...]) -> _Stream:
        """The live stream ``ev`` is about, or the error that sending ``ev`` raises."""
        if type(req_id) is not int or req_id <= 0:
            raise FabricError(StatusCode.INVALID_ARGUMENT, f"{type(ev).__name__}.req_id: expected an int > 0")
        st = self._streams.get(req_id)
        if st is None:
            raise _misuse(f"request {req_id} is not live")
        if st.kind not in kinds:
            raise _misuse(f"request {req_id} is a {st.kind} request; {type(ev).__name__} does not apply")
        return st

    # ------------------------------------------------------------------ internals: output

    def _emit(self, frame: bytes) -> None:
        self._out += frame
        self._count(frame)

    def _count(self, frame: bytes) -> None:
        self._counters["frames_sent"] += 1
        self._counters["bytes_sent"] += len(frame)

    def _queue_plain(self, body: bytes) -> None:
        self._emit(len(body).to_bytes(4, "big") + body)

    def _seal(self, pieces: tuple, size: int) -> bytes:
        """The frame of the message whose ``size`` bytes are ``pieces`` joined: the length
        prefix and ``msgpack.packb([seq, msg, mac])`` (int, bin, bin: one encoding), built in
        one join, so a chunk's bytes are copied once."""
        seq = self._send_seq
        mac = _mac_of(self._skey, _DIRECTION[self.role], seq, pieces)
        head = b"\x93" + msgpack.packb(seq) + _bin_header(size)
        n = len(head) + size + len(_MAC_HEADER) + len(mac)
        return b"".join((n.to_bytes(4, "big"), head, *pieces, _MAC_HEADER, mac))

    def _queue_msg(self, msg: dict) -> None:
        """Seal and queue a small control message (goodbye, fault) outside send()."""
        raw = codec.pack(msg)
        self._emit(self._seal((raw,), len(raw)))
        self._send_seq += 1

    def _drop(self, req_id: int) -> None:
        st = self._streams.pop(req_id, None)
        if st is not None and st.upload:
            self._uploads -= 1

    def _finish(self, reason: FabricError | None) -> None:
        self._phase = _PH_CLOSED
        self._streams.clear()
        self._uploads = 0
        self._closed = Closed(reason)
        self._events.append(self._closed)

    def _fail(self, err: FabricError) -> None:
        """Close on a detected problem: tell an authenticated peer why, never an unauthenticated one."""
        if self._phase == _PH_OPEN:
            self._queue_msg({"t": "fault", "id": 0, "error": _error_to_wire(err)})
        else:
            self._out.clear()
        self._finish(err)

    # ------------------------------------------------------------------ internals: input

    def _reject_length(self, n: int, limit: int) -> None:
        if self._phase != _PH_OPEN:
            what = "empty" if n == 0 else f"{n}-byte"
            self._fail(
                FabricError(
                    StatusCode.UNAUTHENTICATED,
                    f"handshake failed: {what} frame (handshake frames are 1..{limit} bytes)",
                )
            )
        elif n == 0:
            self._fail(FabricError(StatusCode.INVALID_ARGUMENT, f"empty frame at seq {self._recv_seq}"))
        else:
            self._fail(
                FabricError(
                    StatusCode.RESOURCE_EXHAUSTED,
                    f"frame of {n} bytes at seq {self._recv_seq} exceeds max_frame_bytes {limit}",
                )
            )

    def _on_eof(self) -> None:
        if self._phase == _PH_HELLO and self.role == "client":
            err = FabricError(
                StatusCode.UNAVAILABLE,
                "peer closed the connection before its hello (overloaded, or not an evalfabric node)",
                retryable=True,
            )
        elif self._phase != _PH_OPEN:
            if self.role == "client":
                text = "peer closed the connection after our proof (wrong secret?)"
            else:
                text = "peer closed the connection during the handshake"
            err = FabricError(StatusCode.UNAUTHENTICATED, text)
        elif self._rbuf:
            err = FabricError(StatusCode.UNAVAILABLE, "connection closed by peer in the middle of a frame", retryable=True)
        else:
            err = FabricError(StatusCode.UNAVAILABLE, "connection closed by peer without a goodbye", retryable=True)
        self._out.clear()
        self._finish(err)

    def _on_frame(self, body: bytes) -> None:
        try:
            if self._phase == _PH_OPEN:
                self._on_sealed(body)
            else:
                self._on_handshake(bytes(body))
        except _Violation as v:
            err = v.error
            if self._phase != _PH_OPEN:
                err = FabricError(StatusCode.UNAUTHENTICATED, f"handshake failed: {err.message}")
            self._fail(err)
        except Exception as exc:  # noqa: BLE001 - a peer's bytes must never crash the caller
            code = StatusCode.UNAUTHENTICATED if self._phase != _PH_OPEN else StatusCode.INTERNAL
            self._fail(FabricError(code, f"wire: internal error handling a frame ({type(exc).__name__})"))

    # handshake ---------------------------------------------------------------

    def _on_handshake(self, body: bytes) -> None:
        m = _decode(body, "hello" if self._phase == _PH_HELLO else "auth")
        if self._phase == _PH_HELLO:
            where = "hello"
            _check_shape(m, where, ("hello",))
            v = m["v"]
            if type(v) is not int:
                raise _bad(where, "`int`", v, "v")
            if v != PROTOCOL_VERSION:
                raise _Violation(
                    StatusCode.UNAUTHENTICATED,
                    f"peer speaks wire version {v}; this node speaks {PROTOCOL_VERSION}",
                )
            if m["role"] != self._peer_role:
                raise _Violation(
                    StatusCode.UNAUTHENTICATED, f"peer's hello claims role {str(m['role'])[:16]!r}, expected {self._peer_role!r}"
                )
            nonce = _bin_field(m, "nonce", NONCE_BYTES, where)
            if self.role == "server":
                self._queue_plain(self._hello_ours)
                self._transcript = transcript_hash(body, self._hello_ours)
            else:
                self._transcript = transcript_hash(self._hello_ours, body)
                self._queue_plain(self._auth_body())
            self._phase = _PH_AUTH
            self._events.append(Hello(self._peer_role, v, nonce))
            return
        where = "auth"
        _check_shape(m, where, ("auth",))
        node = _text_field(m, "node", MAX_NODE_ID_BYTES, where)
        limits = _limits_field(m, where)
        proof = _bin_field(m, "proof", MAC_BYTES, where)
        fields = {"t": "auth", "node": node, "limits": m["limits"]}
        for pkey in self._pkeys:
            if hmac.compare_digest(proof, _proof(pkey, self._peer_role, self._transcript, fields)):
                self._pkey = pkey
                break
        else:
            raise _Violation(
                StatusCode.UNAUTHENTICATED,
                f"the {self._peer_role}'s proof does not verify (wrong secret?)",
            )
        if self.role == "server":
            self._queue_plain(self._auth_body())
        self._skey = session_key(self._pkey, self._transcript)
        self._phase = _PH_OPEN
        self.peer_node_id = node
        self.peer_limits = limits
        self._events.append(Authenticated(node, limits))

    def _auth_body(self) -> bytes:
        fields = {"t": "auth", "node": self.node_id, "limits": self.limits.advertised().to_wire()}
        proof = _proof(self._pkey, self.role, self._transcript, fields)
        return codec.encode({**fields, "proof": proof})

    # after the handshake -----------------------------------------------------

    def _unseal(self, body: memoryview) -> tuple[Any, int]:
        """The message of a sealed frame and its size, once its MAC and sequence number verified.

        A long envelope is parsed in place (its fields are views of ``body``, released
        before this returns, so the read buffer may grow again); short ones, and bytes
        in any other encoding, go through the general decoder, which judges them.
        """
        seq = self._recv_seq
        env = _envelope_in_place(body) if len(body) >= _IN_PLACE_BYTES else None  # msgpack is quicker on short ones
        if env is None:
            env = _decode(body, f"frame seq {seq}: envelope", strict=False)
            if (
                type(env) is not list
                or len(env) != 3
                or type(env[0]) is not int
                or type(env[1]) is not bytes
                or type(env[2]) is not bytes
            ):
                raise _Violation(
                    StatusCode.INVALID_ARGUMENT,
                    f"frame seq {seq}: expected an envelope [seq, msg, mac] - at `$`",
                )
        claimed, raw, mac = env
        try:
            expected = frame_mac(self._skey, _DIRECTION[self._peer_role], seq, raw)
            if not hmac.compare_digest(mac, expected):
                if claimed != seq:
                    raise _Violation(
                        StatusCode.UNAUTHENTICATED,
                        f"frame out of sequence: got seq {claimed}, expected {seq} (replayed, reordered or dropped frame)",
                    )
                raise _Violation(StatusCode.UNAUTHENTICATED, f"frame MAC mismatch at seq {seq} (altered frame)")
            if claimed != seq:
                raise _Violation(StatusCode.UNAUTHENTICATED, f"frame seq field altered at seq {seq}")
            m = _decode(raw, f"frame seq {seq}", strict=False)
            if _may_hold_bin(raw) and codec.has_non_str_key(m):  # msgpack lets `bin` keys through
                raise _Violation(StatusCode.INVALID_ARGUMENT, f"frame seq {seq}: a map key is `bin`; map keys must be `str`")
            return m, len(raw)
        finally:
            if type(raw) is memoryview:
                raw.release()
                mac.release()

    def _on_sealed(self, body: memoryview) -> None:
        seq = self._recv_seq
        m, size = self._unseal(body)
        self._recv_seq += 1
        where = f"frame seq {seq}"
        allowed = (
            ("open", "next", "push", "close", "cancel", "fault", "metadata", "stats")
            if self.role == "server"
            else ("next", "push", "close", "fault", "metadata", "stats")
        )
        t = _check_shape(m, where, allowed)
        where = f"{where} (`{t}`)"
        rid = _int_field(m, "id", 0, MAX_REQUEST_ID, where)
        if rid == 0:
            self._on_connection_msg(t, m, where)
            return
        if self.role == "server" and t in ("open", "stats"):
            self._on_open(t, m, rid, size, where)
            return
        if self.role == "server" and t == "fault":
            raise _Violation(StatusCode.INVALID_ARGUMENT, f"{where}: a client abandons a request with `cancel`")
        st = self._streams.get(rid)
        if st is None:
            if rid <= self._highest_id:
                return  # a late frame for a finished or cancelled request: ignored
            raise _Violation(StatusCode.INVALID_ARGUMENT, f"{where}: request {rid} was never opened - at `$.id`")
        if t in _COUNTED:
            st.recv_bytes += size
            if st.recv_bytes > self.limits.max_bytes_per_stream:
                raise _Violation(
                    StatusCode.RESOURCE_EXHAUSTED,
                    f"{where}: request {rid} exceeded max_bytes_per_stream {self.limits.max_bytes_per_stream}",
                )
        if st.kind == "stats" and t not in ("stats", "cancel", "fault"):
            raise _Violation(StatusCode.INVALID_ARGUMENT, f"{where}: request {rid} is a stats query")
        if t == "stats":
            if st.kind != "stats":
                raise _Violation(StatusCode.INVALID_ARGUMENT, f"{where}: request {rid} is not a stats query")
            self._drop(rid)
            self._events.append(Stats(rid, m["body"]))
        elif t == "metadata":
            self._events.append(Metadata(rid, m["body"]))
        elif t == "push":
            if self.role == "server" and not st.remote_open:
                raise _Violation(StatusCode.INVALID_ARGUMENT, f"{where}: request {rid} is not an open upload stream")
            if st.recv_credit <= 0:
                raise _Violation(StatusCode.RESOURCE_EXHAUSTED, f"{where}: peer pushed beyond its credit on request {rid}")
            st.recv_credit -= 1
            self._events.append(StreamData(rid, m["data"]))
        elif t == "next":
            n = _int_field(m, "credit", 1, MAX_CREDIT, where)
            if st.send_credit + n > MAX_CREDIT:
                raise _Violation(StatusCode.RESOURCE_EXHAUSTED, f"{where}: outstanding credit on request {rid} overflows")
            if self.role == "client" and not st.local_open:
                return  # a grant that crossed our end of upload: nothing to use it for
            st.send_credit += n
            self._events.append(Credit(rid, n))
        elif t == "close":
            if self.role == "server":
                if m["body"] is not None:
                    raise _bad(where, "nil (a client's close carries no body)", m["body"], "body")
                if not st.remote_open or not st.upload:
                    raise _Violation(StatusCode.INVALID_ARGUMENT, f"{where}: request {rid} is not an open upload stream")
                st.remote_open = False
                st.recv_credit = 0
                self._events.append(EndOfStream(rid))
            else:
                self._drop(rid)
                self._events.append(Response(rid, m["body"]))
        elif t == "cancel":
            self._drop(rid)
            self._events.append(Cancel(rid))
        elif t == "fault":
            err = _error_field(m, where)
            self._drop(rid)
            self._events.append(Fault(rid, err))

    def _on_open(self, t: str, m: dict, rid: int, size: int, where: str) -> None:
        if rid <= self._highest_id:
            raise _Violation(
                StatusCode.INVALID_ARGUMENT,
                f"{where}: request id {rid} reused or not increasing (highest so far {self._highest_id}) - at `$.id`",
            )
        if len(self._streams) >= self.limits.max_inflight_requests:
            raise _Violation(
                StatusCode.RESOURCE_EXHAUSTED,
                f"{where}: peer exceeded max_inflight_requests {self.limits.max_inflight_requests}",
            )
        if size > self.limits.max_bytes_per_stream:
            raise _Violation(
                StatusCode.RESOURCE_EXHAUSTED,
                f"{where}: request {rid} exceeded max_bytes_per_stream {self.limits.max_bytes_per_stream}",
            )
        if t == "stats":
            st = _Stream(rid, "stats", False)
            event: Event = Stats(rid, m["body"])
        else:
            op = _text_field(m, "op", MAX_OP_BYTES, where, min_bytes=1)
            end = m["end"]
            if type(end) is not bool:
                raise _bad(where, "`bool`", end, "end")
            credit = _int_field(m, "credit", 0, MAX_CREDIT, where)
            timeout = m["timeout"]
            if timeout is not None and (type(timeout) is not float or not 0.0 <= timeout < math.inf):
                raise _bad(where, "`float` seconds >= 0 or nil", timeout, "timeout")
            upload = not end
            if upload and self._uploads >= self.limits.max_streams:
                raise _Violation(
                    StatusCode.RESOURCE_EXHAUSTED, f"{where}: peer exceeded max_streams {self.limits.max_streams}"
                )
            st = _Stream(rid, "open", upload)
            st.local_open = True
            st.remote_open = upload
            st.send_credit = credit
            if upload:
                self._uploads += 1
            event = Request(rid, op, m["body"], end, credit, timeout)
        st.recv_bytes = size
        self._streams[rid] = st
        self._highest_id = rid
        self._events.append(event)

    def _on_connection_msg(self, t: str, m: dict, where: str) -> None:
        if t == "close":
            if m["body"] is not None:
                raise _bad(where, "nil (a goodbye carries no body)", m["body"], "body")
            self._out.clear()
            self._finish(None)
        elif t == "fault":
            err = _error_field(m, where)
            self._out.clear()
            self._finish(err)
        elif t == "metadata":
            self._events.append(Metadata(0, m["body"]))
        else:
            raise _Violation(StatusCode.INVALID_ARGUMENT, f"{where}: request id 0 is reserved - at `$.id`")
