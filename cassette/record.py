"""The ledger record: one recorded reply (or artifact manifest), self-checking.

Binary layout of a ledger value (normative: ``specs/cassette-format.md``)::

    check u32 BE | meta_len u32 BE | meta | payload

* ``meta`` is the canonical encoding of a map with keys ``key`` (ContentKey),
  ``digest`` (32 bytes, BLAKE3 of ``payload``), ``evaluator``, ``version``,
  ``created`` (unix seconds, float), ``compute_s`` (float), ``node`` (str),
  ``size`` (payload length);
* ``check`` is CRC-32 (zlib polynomial) over everything after it.  It guards
  the local read path against bit rot on every hit at a fraction of a hash's
  cost; the BLAKE3 ``digest`` is what identifies the content and is checked by
  :func:`unpack_record` (scrub, replay, import) and by every peer transfer.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import blake3

import msgpack

from cassette import codec
from cassette.codec import EXT_CONTENT_KEY, _packb
from cassette.errors import FabricError, StatusCode
from cassette.keys import ContentKey

__all__ = ["Record", "pack_record", "unpack_record", "payload_digest", "check_recordable"]

_HDR = struct.Struct(">II")  # check, meta_len
_HDR_SIZE = _HDR.size
_blake3 = blake3.blake3
_crc32 = zlib.crc32
_ext_key = msgpack.ExtType


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
    meta = _pack_meta(key, digest, evaluator, version, created, compute_s, node, len(payload))
    body = struct.pack(">I", len(meta)) + meta + payload
    return struct.pack(">I", _crc32(body)) + body


def _pack_meta(key, digest, evaluator, version, created, compute_s, node, size) -> bytes:
    """The canonical meta map, packed directly in canonical key order (UTF-8 length, then
    bytes: key, node, size, digest, created, version, compute_s, evaluator).  Anything
    unusual (a non-str field, a NaN time) goes through the general codec instead."""
    if (
        type(key) is ContentKey and type(evaluator) is str and type(version) is str and type(node) is str
        and type(digest) is bytes and created == created and compute_s == compute_s
    ):
        try:
            return _packb({
                "key": _ext_key(EXT_CONTENT_KEY, bytes(key)),
                "node": node,
                "size": size,
                "digest": digest,
                "created": float(created),
                "version": version,
                "compute_s": float(compute_s),
                "evaluator": evaluator,
            })
        except (UnicodeEncodeError, TypeError, ValueError):
            pass
    return codec.encode(
        {
            "key": key,
            "digest": digest,
            "evaluator": evaluator,
            "version": version,
            "created": float(created),
            "compute_s": float(compute_s),
            "node": node,
            "size": size,
        },
        root="record",
    )


def check_ok(value: bytes | memoryview) -> bool:
    """Whether a ledger value's CRC-32 check matches its body."""
    if len(value) < _HDR_SIZE:
        return False
    check, meta_len = _HDR.unpack_from(value)
    return _HDR_SIZE + meta_len <= len(value) and _crc32(value[4:]) == check


def unpack_record(value: bytes | memoryview, seq: int = 0) -> Record:
    """Decode and fully verify a ledger value; any mismatch is DATA_LOSS."""
    if not check_ok(value):
        raise FabricError(StatusCode.DATA_LOSS, f"ledger row {seq}: record check does not match its bytes", key=record_key(value))
    mv = memoryview(value)
    meta_len = _HDR.unpack_from(mv)[1]
    try:
        meta = codec.decode(mv[_HDR_SIZE : _HDR_SIZE + meta_len])
        key = meta["key"]
        rec = Record(
            key=key,
            digest=meta["digest"],
            payload=bytes(mv[_HDR_SIZE + meta_len :]),
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


def check_recordable(rec: Record) -> Record:
    """``rec`` when its key may answer a ledger row: a request or an artifact key
    (``specs/cassette-format.md`` section 3).  DATA_LOSS naming the key otherwise: a blob
    is stored under its own key in ``blobs`` and never recorded, and a scrub reports an
    index entry under a blob key as damage."""
    if rec.key.kind == "blob":
        raise FabricError(StatusCode.DATA_LOSS, f"ledger row {rec.seq}: a record under a blob key (blobs are never recorded)",
                          key=rec.key)
    return rec


def record_key(value: bytes | memoryview) -> ContentKey | None:
    """Best-effort key of a (possibly corrupt) ledger value, for error messages."""
    try:
        meta_len = _HDR.unpack_from(value)[1]
        k = codec.decode(bytes(value[_HDR_SIZE : _HDR_SIZE + meta_len]))["key"]
        return k if type(k) is ContentKey else None
    except Exception:  # noqa: BLE001 - corrupt bytes may fail in any way
        return None
