"""Gossip and membership messages and their canonical wire form.

Normative text and byte-exact vectors: ``specs/gossip.md`` ("Messages").

Every message is one canonical-codec map (``cassette.codec``) with the common
fields ``t`` (type name), ``v`` (protocol version, 1), ``from`` (sender node id)
and ``u`` (piggy-backed membership updates), plus its own fields.
:func:`encode_message` and :func:`decode_message` are exact inverses; decoding is
strict: the bytes must be the canonical encoding, unknown or missing fields,
wrong types, out-of-range numbers and non-canonical orderings all raise
``FabricError(INVALID_ARGUMENT, "gossip.<field>: ...")`` naming the field, so a
peer's garbage can never become state.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Mapping, Union

from cassette import codec
from cassette.errors import FabricError, StatusCode
from gossip.holding import MAX_SEQ, RECORD_SIZE, FactRun, _check_run, check_node_id

__all__ = [
    "PROTOCOL_VERSION",
    "MemberState",
    "MemberUpdate",
    "Ping",
    "PingReq",
    "Ack",
    "Members",
    "SyncRequest",
    "Summary",
    "Facts",
    "Message",
    "encode_message",
    "decode_message",
    "MAX_PIGGYBACK_UPDATES",
    "MAX_MEMBERS",
    "MAX_FACTS_PER_MESSAGE",
    "MAX_SUMMARY_ORIGINS",
    "MAX_CAPABILITIES",
    "MAX_CAPABILITY_BYTES",
    "MAX_ADDR_BYTES",
    "MAX_INCARNATION",
]

#: Value of the ``v`` field; any other version is INVALID_ARGUMENT.
PROTOCOL_VERSION = 1
#: Most membership updates piggy-backed on one message (``u``).
MAX_PIGGYBACK_UPDATES = 1024
#: Most member entries in one full-state :class:`Members` message: ample for a real fleet
#: (a larger membership goes out as several messages, see ``Membership``), and small enough
#: that a peer cannot make a node allocate or apply millions of entries in one message.
MAX_MEMBERS = 4096
#: Most facts (records) in one :class:`Facts` message.
MAX_FACTS_PER_MESSAGE = 1 << 17
#: Most origins in one :class:`Summary`.
MAX_SUMMARY_ORIGINS = 1 << 20
#: Most capabilities one member may advertise.
MAX_CAPABILITIES = 256
#: Longest capability string, in UTF-8 bytes.
MAX_CAPABILITY_BYTES = 128
#: Longest member address, in UTF-8 bytes.
MAX_ADDR_BYTES = 255
#: Largest incarnation an update may carry (u64); a member never goes past it.
MAX_INCARNATION = (1 << 64) - 1

_U64_MAX = (1 << 64) - 1
_DIGEST_BYTES = 16
#: Most arrays and maps a valid message decodes to: the map, ``u`` and its updates (each a
#: list holding a capability list), then a facts message's runs (each a list) or a members
#: message's entries (likewise two lists each).  Decoding stops past it (``codec.decode``'s
#: ``max_compound``), so no field makes a node build more before its own bound is checked.
_MAX_COMPOUND = 3 + 2 * MAX_PIGGYBACK_UPDATES + max(MAX_FACTS_PER_MESSAGE, 2 * MAX_MEMBERS)


class MemberState(enum.IntEnum):
    """A member's state as carried on the wire (small ints, see the spec)."""

    ALIVE = 0
    SUSPECT = 1
    DEAD = 2
    LEFT = 3


@dataclass(frozen=True, slots=True)
class MemberUpdate:
    """What the sender believes about one member: state at an incarnation.

    Wire form: ``[node_id, incarnation, state, addr, [capabilities sorted]]``.
    """

    node_id: str
    incarnation: int
    state: MemberState
    addr: str
    capabilities: frozenset = frozenset()


@dataclass(frozen=True, slots=True)
class Ping:
    """SWIM probe ``seq``; ``target`` is the node id it is meant for (None: whoever listens)."""

    sender: str
    seq: int
    target: str | None
    updates: tuple = ()


@dataclass(frozen=True, slots=True)
class PingReq:
    """Ask the receiver to probe ``target`` at ``target_addr`` on the sender's behalf."""

    sender: str
    seq: int
    target: str
    target_addr: str
    updates: tuple = ()


@dataclass(frozen=True, slots=True)
class Ack:
    """Answer to :class:`Ping` ``seq`` (directly, or relayed by a :class:`PingReq` helper)."""

    sender: str
    seq: int
    updates: tuple = ()


@dataclass(frozen=True, slots=True)
class Members:
    """Full membership state push (join and periodic repair); ``reply``: answer with yours."""

    sender: str
    members: tuple
    reply: bool
    updates: tuple = ()


@dataclass(frozen=True, slots=True)
class SyncRequest:
    """Anti-entropy step 1: the sender's 16-byte holding summary digest."""

    sender: str
    digest: bytes
    updates: tuple = ()


@dataclass(frozen=True, slots=True)
class Summary:
    """Anti-entropy step 2/3: the sender's ``(origin, high-water)`` pairs; ``reply``: answer with yours.

    ``high_water`` is a tuple of ``(origin, hw)`` sorted by origin UTF-8 bytes,
    every hw >= 1.  Wire form packs the hws as fixed 8-byte big-endian integers so
    a summary's size never depends on how many keys exist.
    """

    sender: str
    high_water: tuple
    reply: bool
    updates: tuple = ()

    def as_dict(self) -> dict[str, int]:
        """The summary as ``{origin: hw}``."""
        return dict(self.high_water)

    @classmethod
    def of(cls, sender: str, summary: Mapping[str, int], reply: bool, updates: tuple = ()) -> "Summary":
        """Build from a ``{origin: hw}`` mapping (entries with hw 0 are dropped)."""
        pairs = tuple(sorted(((o, h) for o, h in summary.items() if h), key=lambda p: p[0].encode("utf-8")))
        return cls(sender, pairs, reply, updates)


@dataclass(frozen=True, slots=True)
class Facts:
    """Holder facts as packed runs; ``push``: eagerly pushed (relay new ones) vs anti-entropy reply."""

    sender: str
    runs: tuple
    push: bool
    updates: tuple = ()


Message = Union[Ping, PingReq, Ack, Members, SyncRequest, Summary, Facts]

_TYPE_NAME = {
    Ping: "ping",
    PingReq: "ping-req",
    Ack: "ack",
    Members: "members",
    SyncRequest: "sync",
    Summary: "summary",
    Facts: "facts",
}
_COMMON = frozenset(("t", "v", "from", "u"))
_FIELDS = {
    "ping": _COMMON | {"seq", "to"},
    "ping-req": _COMMON | {"seq", "to", "addr"},
    "ack": _COMMON | {"seq"},
    "members": _COMMON | {"m", "reply"},
    "sync": _COMMON | {"d"},
    "summary": _COMMON | {"o", "hw", "reply"},
    "facts": _COMMON | {"runs", "push"},
}


def _bad(field: str, message: str) -> FabricError:
    return FabricError(StatusCode.INVALID_ARGUMENT, f"gossip.{field}: {message}")


# -- encoding ------------------------------------------------------------------
def _update_wire(u: MemberUpdate) -> list:
    return [u.node_id, u.incarnation, int(u.state), u.addr, sorted(u.capabilities)]


def encode_message(msg: Message) -> bytes:
    """Canonical bytes of ``msg``; a field that cannot be encoded is INVALID_ARGUMENT."""
    t = _TYPE_NAME.get(type(msg))
    if t is None:
        raise FabricError(StatusCode.INVALID_ARGUMENT, f"gossip: {type(msg).__name__} is not a gossip message")
    m: dict[str, Any] = {"t": t, "v": PROTOCOL_VERSION, "from": msg.sender, "u": [_update_wire(u) for u in msg.updates]}
    if t == "ping":
        m["seq"] = msg.seq
        m["to"] = msg.target
    elif t == "ping-req":
        m["seq"] = msg.seq
        m["to"] = msg.target
        m["addr"] = msg.target_addr
    elif t == "ack":
        m["seq"] = msg.seq
    elif t == "members":
        m["m"] = [_update_wire(u) for u in msg.members]
        m["reply"] = bool(msg.reply)
    elif t == "sync":
        m["d"] = bytes(msg.digest)
    elif t == "summary":
        m["o"] = [o for o, _ in msg.high_water]
        m["hw"] = b"".join(h.to_bytes(8, "big") for _, h in msg.high_water)
        m["reply"] = bool(msg.reply)
    else:
        m["runs"] = [[r.origin, r.start, bytes(r.records)] for r in msg.runs]
        m["push"] = bool(msg.push)
    return codec.encode(m, root="gossip")


# -- decoding ------------------------------------------------------------------
def _int(v: Any, field: str, lo: int = 0, hi: int = _U64_MAX) -> int:
    if type(v) is not int:
        raise _bad(field, f"expected int, got {type(v).__name__}")
    if not lo <= v <= hi:
        raise _bad(field, f"expected int in {lo}..{hi}, got {v}")
    return v


def _bool(v: Any, field: str) -> bool:
    if type(v) is not bool:
        raise _bad(field, f"expected bool, got {type(v).__name__}")
    return v


def _text(v: Any, field: str, max_bytes: int) -> str:
    if type(v) is not str or not v:
        raise _bad(field, f"expected a non-empty str, got {type(v).__name__}")
    n = len(v.encode("utf-8"))
    if n > max_bytes:
        raise _bad(field, f"{n} UTF-8 bytes, at most {max_bytes} allowed")
    return v


def _node_id(v: Any, field: str) -> str:
    try:
        return check_node_id(v, f"gossip.{field}")
    except FabricError as e:
        raise FabricError(StatusCode.INVALID_ARGUMENT, e.message) from None


def _list(v: Any, field: str, max_len: int) -> list:
    if type(v) is not list:
        raise _bad(field, f"expected list, got {type(v).__name__}")
    if len(v) > max_len:
        raise _bad(field, f"{len(v)} entries, at most {max_len} allowed")
    return v


def _update(v: Any, field: str) -> MemberUpdate:
    if type(v) is not list or len(v) != 5:
        raise _bad(field, "expected [node_id, incarnation, state, addr, capabilities]")
    node_id = _node_id(v[0], f"{field}.node_id")
    inc = _int(v[1], f"{field}.incarnation", 0, MAX_INCARNATION)
    state = _int(v[2], f"{field}.state", 0, 3)
    addr = _text(v[3], f"{field}.addr", MAX_ADDR_BYTES)
    caps = _list(v[4], f"{field}.capabilities", MAX_CAPABILITIES)
    prev = None
    for i, c in enumerate(caps):
        _text(c, f"{field}.capabilities[{i}]", MAX_CAPABILITY_BYTES)
        if prev is not None and not prev < c:
            raise _bad(f"{field}.capabilities[{i}]", "capabilities must be sorted and distinct")
        prev = c
    return MemberUpdate(node_id, inc, MemberState(state), addr, frozenset(caps))


def _updates(v: Any, field: str, max_len: int) -> tuple:
    return tuple(_update(u, f"{field}[{i}]") for i, u in enumerate(_list(v, field, max_len)))


def _declared_members(data: bytes | bytearray | memoryview) -> int | None:
    """How many entries ``m`` declares in a canonical ``members`` message, read from its first
    bytes without decoding it (None when ``data`` does not start that way).  ``m`` sorts
    first among a members message's keys, so the canonical form starts with a map header
    (6 entries), the key ``"m"`` (``a1 6d``) and the array header, whose count bounds what
    decoding would allocate."""
    head = bytes(data[:8])
    if len(head) < 4 or head[:3] != b"\x86\xa1m":
        return None
    h = head[3]
    if 0x90 <= h <= 0x9F:
        return h & 0x0F
    width = {0xDC: 2, 0xDD: 4}.get(h)
    if width is None or len(head) < 4 + width:
        return None
    return int.from_bytes(head[4 : 4 + width], "big")


def decode_message(data: bytes | bytearray | memoryview) -> Message:
    """Parse and validate one message; inverse of :func:`encode_message`.

    Anything but the canonical encoding of a valid message raises
    ``FabricError(INVALID_ARGUMENT)`` whose message starts ``gossip.<field>:``.
    """
    declared = _declared_members(data)
    if declared is not None and declared > MAX_MEMBERS:  # refused before anything is decoded
        raise _bad("m", f"{declared} entries, at most {MAX_MEMBERS} allowed")
    try:
        m = codec.decode(data, strict=True, max_compound=_MAX_COMPOUND)
    except FabricError as e:
        raise FabricError(StatusCode.INVALID_ARGUMENT, f"gossip.message: {e.message}") from None
    if type(m) is not dict:
        raise _bad("message", f"expected a map, got {type(m).__name__}")
    t = m.get("t")
    if type(t) is not str or t not in _FIELDS:
        raise _bad("t", f"unknown message type {t!r:.40}")
    if m.get("v") != PROTOCOL_VERSION or type(m.get("v")) is not int:
        raise _bad("v", f"unsupported protocol version {m.get('v')!r:.20} (this node speaks {PROTOCOL_VERSION})")
    fields = _FIELDS[t]
    if m.keys() != fields:
        extra = sorted(m.keys() - fields)
        if extra:
            raise _bad(extra[0], f"unexpected field in {t} message")
        raise _bad(sorted(fields - m.keys())[0], f"missing field in {t} message")
    sender = _node_id(m["from"], "from")
    updates = _updates(m["u"], "u", MAX_PIGGYBACK_UPDATES)
    if t == "ping":
        to = m["to"]
        return Ping(sender, _int(m["seq"], "seq"), None if to is None else _node_id(to, "to"), updates)
    if t == "ping-req":
        return PingReq(
            sender, _int(m["seq"], "seq"), _node_id(m["to"], "to"), _text(m["addr"], "addr", MAX_ADDR_BYTES), updates
        )
    if t == "ack":
        return Ack(sender, _int(m["seq"], "seq"), updates)
    if t == "members":
        return Members(sender, _updates(m["m"], "m", MAX_MEMBERS), _bool(m["reply"], "reply"), updates)
    if t == "sync":
        d = m["d"]
        if type(d) is not bytes or len(d) != _DIGEST_BYTES:
            raise _bad("d", f"expected {_DIGEST_BYTES} bytes, got {type(d).__name__} of length {len(d) if hasattr(d, '__len__') else '?'}")
        return SyncRequest(sender, d, updates)
    if t == "summary":
        origins = _list(m["o"], "o", MAX_SUMMARY_ORIGINS)
        hw = m["hw"]
        if type(hw) is not bytes or len(hw) != 8 * len(origins):
            raise _bad("hw", f"expected {8 * len(origins)} bytes (8 per origin), got {len(hw) if type(hw) is bytes else type(hw).__name__}")
        pairs = []
        prev = None
        for i, o in enumerate(origins):
            _node_id(o, f"o[{i}]")
            ob = o.encode("utf-8")
            if prev is not None and not prev < ob:
                raise _bad(f"o[{i}]", "origins must be sorted by UTF-8 bytes and distinct")
            prev = ob
            h = int.from_bytes(hw[8 * i : 8 * i + 8], "big")
            if not 1 <= h <= MAX_SEQ:
                raise _bad(f"hw[{i}]", f"expected high-water in 1..{MAX_SEQ}, got {h}")
            pairs.append((o, h))
        return Summary(sender, tuple(pairs), _bool(m["reply"], "reply"), updates)
    runs_in = _list(m["runs"], "runs", MAX_FACTS_PER_MESSAGE)
    runs = []
    total = 0
    for i, r in enumerate(runs_in):
        if type(r) is not list or len(r) != 3:
            raise _bad(f"runs[{i}]", "expected [origin, start, records]")
        try:
            _check_run(r[0], r[1], r[2], f"gossip.runs[{i}]")
        except FabricError as e:
            raise FabricError(StatusCode.INVALID_ARGUMENT, e.message) from None
        total += len(r[2]) // RECORD_SIZE
        if total > MAX_FACTS_PER_MESSAGE:
            raise _bad("runs", f"more than {MAX_FACTS_PER_MESSAGE} facts in one message")
        runs.append(FactRun(r[0], r[1], r[2]))
    return Facts(sender, tuple(runs), _bool(m["push"], "push"), updates)
