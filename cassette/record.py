"""The ledger record: one recorded reply (or artifact manifest), self-checking.

Binary layout of a ledger value (normative: ``specs/cassette-format.md``)::

    check[32] | meta_len u32 BE | meta | payload

* ``meta`` is the canonical encoding of a map with keys ``key`` (ContentKey),
  ``digest`` (32 bytes, BLAKE3 of ``payload``), ``evaluator``, ``version``,
  ``created`` (unix seconds, float), ``compute_s`` (float), ``node`` (str),
  ``size`` (payload length);
* ``check`` is BLAKE3 (derive_key, context :data:`RECORD_CONTEXT`) over
  everything after it, so one hash verifies the whole record, payload included.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import blake3

from cassette import codec
from cassette.errors import FabricError, StatusCode
from cassette.keys import ContentKey

__all__ = ["Record", "RECORD_CONTEXT", "pack_record", "unpack_record", "payload_digest", "record_payload"]

RECORD_CONTEXT = "evalfabric 2026-11-23 ledger record check v1"
_HDR = struct.Struct(">I")
_blake3 = blake3.blake3


def payload_digest(payload: bytes | memoryview) -> bytes:
    """The reply digest: plain BLAKE3 (32 bytes) of the payload bytes."""
    return _blake3(payload).digest()


@dataclass(frozen=True)
class Record:
    """A decoded, verified ledger record."""

    key: ContentKey
    digest: bytes
    payload: bytes
    evaluator: str
    version: str
    created: float
    compute_s: float
    node: str
    seq: int = 0

    def value(self):
        """The payload decoded with the canonical codec."""
        return codec.decode(self.payload)


def pack_record(
    key: ContentKey,
    payload: bytes,
    *,
    evaluator: str,
    version: str,
    created: float,
    compute_s: float,
    node: str,
    digest: bytes | None = None,
) -> bytes:
    """The ledger value for one record (see module docstring)."""
    if digest is None:
        digest = payload_digest(payload)
    meta = codec.encode(
        {
            "key": key,
            "digest": digest,
            "evaluator": evaluator,
            "version": version,
            "created": float(created),
            "compute_s": float(compute_s),
            "node": node,
            "size": len(payload),
        },
        root="record",
    )
    body = _HDR.pack(len(meta)) + meta + payload
    return _blake3(body, derive_key_context=RECORD_CONTEXT).digest() + body


def check_ok(value: bytes | memoryview) -> bool:
    """Whether a ledger value's check hash matches its body."""
    return len(value) >= 36 and _blake3(value[32:], derive_key_context=RECORD_CONTEXT).digest() == value[:32]


def record_payload(value: bytes | memoryview) -> memoryview | None:
    """The payload of a ledger value if its check verifies, else ``None`` (hot path)."""
    if len(value) < 36:
        return None
    mv = value if isinstance(value, memoryview) else memoryview(value)
    if _blake3(mv[32:], derive_key_context=RECORD_CONTEXT).digest() != mv[:32]:
        return None
    (meta_len,) = _HDR.unpack_from(mv, 32)
    return mv[36 + meta_len :]


def unpack_record(value: bytes | memoryview, seq: int = 0) -> Record:
    """Decode and fully verify a ledger value; any mismatch is DATA_LOSS."""
    if not check_ok(value):
        raise FabricError(StatusCode.DATA_LOSS, f"ledger row {seq}: record check hash does not match its bytes")
    mv = memoryview(value)
    (meta_len,) = _HDR.unpack_from(mv, 32)
    if 36 + meta_len > len(mv):
        raise FabricError(StatusCode.DATA_LOSS, f"ledger row {seq}: meta length {meta_len} runs past the record")
    try:
        meta = codec.decode(mv[36 : 36 + meta_len])
        key = meta["key"]
        rec = Record(
            key=key,
            digest=meta["digest"],
            payload=bytes(mv[36 + meta_len :]),
            evaluator=meta["evaluator"],
            version=meta["version"],
            created=meta["created"],
            compute_s=meta["compute_s"],
            node=meta["node"],
            seq=seq,
        )
    except (FabricError, KeyError, TypeError) as exc:
        raise FabricError(StatusCode.DATA_LOSS, f"ledger row {seq}: malformed record meta ({exc})") from None
    if type(key) is not ContentKey:
        raise FabricError(StatusCode.DATA_LOSS, f"ledger row {seq}: record key is not a ContentKey")
    if len(rec.payload) != meta.get("size") or payload_digest(rec.payload) != rec.digest:
        raise FabricError(StatusCode.DATA_LOSS, f"ledger row {seq}: payload does not match its digest", key=key)
    return rec


def record_key(value: bytes | memoryview) -> ContentKey | None:
    """Best-effort key of a (possibly corrupt) ledger value, for error messages."""
    try:
        (meta_len,) = _HDR.unpack_from(value, 32)
        k = codec.decode(bytes(value[36 : 36 + meta_len]))["key"]
        return k if type(k) is ContentKey else None
    except Exception:  # noqa: BLE001 - corrupt bytes may fail in any way
        return None
