"""Portable ledger files: a cassette's records and blobs as one length-prefixed stream.

Layout (normative: ``specs/cassette-format.md``)::

    magic b"EVALFABRIC-LEDGER\\n" | version u32 BE
    entry*:  tag u8 | length u64 BE | body
        tag b"R": body is a ledger value (check | meta_len | meta | payload)
        tag b"B": body is a blob key (33 bytes) followed by the blob bytes
    trailer: tag b"E" | length 40 | records u64 BE | check[32]

``check`` is BLAKE3 over every byte before the trailer, so truncation or any
altered byte is detected.  Import validates the whole file before writing
anything: a bad file is ``DATA_LOSS`` (naming the byte offset) and leaves the
cassette untouched.
"""

from __future__ import annotations

import os
import struct
from typing import TYPE_CHECKING, BinaryIO, Callable, Iterator

import blake3

from cassette.errors import FabricError, StatusCode
from cassette.keys import ContentKey, derive
from cassette.record import unpack_record

if TYPE_CHECKING:
    from cassette.store import Cassette

__all__ = ["MAGIC", "LEDGER_FILE_VERSION", "write_ledger_file", "read_ledger_file", "iter_ledger_file"]

MAGIC = b"EVALFABRIC-LEDGER\n"
LEDGER_FILE_VERSION = 1
_ENTRY = struct.Struct(">cQ")
_MAX_ENTRY = 1 << 34  # 16 GiB: refuse absurd lengths before allocating


def write_ledger_file(cas: "Cassette", path: str | os.PathLike, *, progress: Callable[[int], None] | None = None) -> int:
    """Export ``cas`` to ``path`` (written to a temp name, then renamed); returns records written."""
    tmp = f"{os.fspath(path)}.tmp-{os.getpid()}"
    h = blake3.blake3()
    n = 0
    try:
        with open(tmp, "wb") as f:

            def emit(chunk: bytes) -> None:
                h.update(chunk)
                f.write(chunk)

            emit(MAGIC + struct.pack(">I", LEDGER_FILE_VERSION))
            for rec_value in _verified_values(cas):
                emit(_ENTRY.pack(b"R", len(rec_value)))
                emit(rec_value)
                n += 1
                if progress is not None and n % 4096 == 0:
                    progress(n)
            for k, data in cas._iter_blobs():
                if derive("blob", data) != k[1:]:
                    continue  # never export bytes that fail their hash
                emit(_ENTRY.pack(b"B", 33 + len(data)))
                emit(k)
                emit(data)
            f.write(_ENTRY.pack(b"E", 40) + struct.pack(">Q", n) + h.digest())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return n


def _verified_values(cas: "Cassette") -> Iterator[bytes]:
    """Each key's first verifying row: by the append rule, exactly the row its index points to."""
    seen: set[bytes] = set()
    for seq, value in cas._iter_rows():
        try:
            rec = unpack_record(value, seq)
        except FabricError:
            continue
        if rec.key not in seen:
            seen.add(rec.key)
            yield value


def iter_ledger_file(f: BinaryIO, *, path: str = "") -> Iterator[tuple[bytes, bytes, int]]:
    """Yield ``(tag, body, offset)`` for each entry, checking magic, lengths and the trailer.

    Raises DATA_LOSS naming the offset on any malformation; FAILED_PRECONDITION
    for a newer file version.
    """
    head = f.read(len(MAGIC) + 4)
    if head[: len(MAGIC)] != MAGIC or len(head) < len(MAGIC) + 4:
        raise FabricError(StatusCode.INVALID_ARGUMENT, f"{path}: not an evalfabric ledger file (bad magic at offset 0)")
    (version,) = struct.unpack(">I", head[len(MAGIC) :])
    if version > LEDGER_FILE_VERSION:
        raise FabricError(StatusCode.FAILED_PRECONDITION, f"{path}: ledger file version {version} is newer than supported ({LEDGER_FILE_VERSION})")
    h = blake3.blake3(head)
    offset = len(head)
    records = 0
    while True:
        hdr = f.read(_ENTRY.size)
        if len(hdr) < _ENTRY.size:
            raise FabricError(StatusCode.DATA_LOSS, f"{path}: truncated at offset {offset} (no trailer)")
        tag, length = _ENTRY.unpack(hdr)
        if tag == b"E":
            body = f.read(40)
            if length != 40 or len(body) != 40 or body[8:] != h.digest():
                raise FabricError(StatusCode.DATA_LOSS, f"{path}: trailer check at offset {offset} does not match the file")
            (count,) = struct.unpack(">Q", body[:8])
            if count != records:
                raise FabricError(StatusCode.DATA_LOSS, f"{path}: trailer at offset {offset} counts {count} records, the file holds {records}")
            if f.read(1):
                raise FabricError(StatusCode.DATA_LOSS, f"{path}: bytes after the trailer at offset {offset + 49}")
            return
        if tag not in (b"R", b"B") or length > _MAX_ENTRY:
            raise FabricError(StatusCode.DATA_LOSS, f"{path}: bad entry header at offset {offset} (tag {tag!r}, length {length})")
        body = f.read(length)
        if len(body) != length:
            raise FabricError(StatusCode.DATA_LOSS, f"{path}: truncated entry at offset {offset}")
        h.update(hdr)
        h.update(body)
        records += tag == b"R"
        yield tag, body, offset
        offset += _ENTRY.size + length


def _validate(tag: bytes, body: bytes, offset: int, path: str) -> None:
    if tag == b"R":
        try:
            unpack_record(body)
        except FabricError as exc:
            raise FabricError(StatusCode.DATA_LOSS, f"{path}: record at offset {offset}: {exc.message}", key=exc.key) from None
    else:
        if len(body) < 33:
            raise FabricError(StatusCode.DATA_LOSS, f"{path}: blob entry at offset {offset} shorter than its key")
        try:
            key = ContentKey.from_bytes(body[:33])
        except FabricError:
            raise FabricError(StatusCode.DATA_LOSS, f"{path}: blob entry at offset {offset} has a malformed key") from None
        if key.kind != "blob" or derive("blob", body[33:]) != key[1:]:
            raise FabricError(StatusCode.DATA_LOSS, f"{path}: blob at offset {offset} does not match its key", key=key)


def read_ledger_file(cas: "Cassette", path: str | os.PathLike, *, progress: Callable[[int], None] | None = None) -> int:
    """Validate the whole file, then append its records and blobs to ``cas``; returns records appended."""
    name = os.fspath(path)
    try:
        f = open(name, "rb")
    except OSError as exc:
        raise FabricError(StatusCode.NOT_FOUND, f"cannot read ledger file {name}: {exc.strerror}") from None
    with f:
        for tag, body, offset in iter_ledger_file(f, path=name):
            _validate(tag, body, offset, name)
        f.seek(0)
        appended = 0
        seen = 0
        pending: list[bytes] = []
        for tag, body, _ in iter_ledger_file(f, path=name):
            if tag == b"R":
                pending.append(body)
                seen += 1
                if len(pending) >= 1024:
                    appended += sum(r.appended for r in cas.put_raw_many(pending))
                    pending.clear()
                    if progress is not None:
                        progress(seen)
            else:
                cas.put_verified_blobs([(ContentKey.from_bytes(body[:33]), body[33:])])
        appended += sum(r.appended for r in cas.put_raw_many(pending))
    return appended
