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

The file's bytes come from one generator, :func:`iter_ledger_file_bytes`, used
by :func:`write_ledger_file` and by a node's ``export`` op (which pushes the
same chunks over the wire, so both give byte-identical files).
:class:`EntryReader` parses entries fed in arbitrary pieces (a node's ``replay``
upload); :func:`validate_entry` is the one check of an entry's body.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from typing import TYPE_CHECKING, BinaryIO, Callable, Iterator

import blake3

from cassette.errors import FabricError, StatusCode
from cassette.keys import ContentKey, derive
from cassette.record import check_recordable, unpack_record

if TYPE_CHECKING:
    from cassette.store import Cassette, PendingPuts

__all__ = [
    "MAGIC", "LEDGER_FILE_VERSION", "EXPORT_CHUNK", "TRAILER_SIZE", "write_ledger_file", "read_ledger_file",
    "iter_ledger_file", "iter_ledger_file_bytes", "LedgerFileBytes", "validate_entry", "validate_ledger_file",
    "EntryReader", "entry_header", "REPLAY_BATCH", "REPLAY_BATCH_BYTES", "check_write_target", "write_error",
]

MAGIC = b"EVALFABRIC-LEDGER\n"
LEDGER_FILE_VERSION = 1
_ENTRY = struct.Struct(">cQ")
_MAX_ENTRY = 1 << 34  # 16 GiB: refuse absurd lengths before allocating


#: Default chunk size of :func:`iter_ledger_file_bytes`.
EXPORT_CHUNK = 1 << 20
#: A replay stores its entries once this many are pending, or this many bytes (memory stays
#: bounded whatever the entry sizes; one group commit per batch).
REPLAY_BATCH = 1024
REPLAY_BATCH_BYTES = 8 << 20
#: Bytes of the trailer: tag, length, records, check.
TRAILER_SIZE = _ENTRY.size + 40


def entry_header(tag: bytes, length: int) -> bytes:
    """The 9-byte header of an entry: ``tag u8 | length u64 BE``."""
    return _ENTRY.pack(tag, length)


class LedgerFileBytes:
    """The bytes of ``cas``'s ledger file as an iterator of chunks (see :func:`iter_ledger_file_bytes`).

    Every chunk has ``chunk_size`` bytes but the last (small entries share a
    chunk, large ones are cut).  Once exhausted, ``records`` is the number of
    ``R`` entries written and ``nbytes`` the file's length.  Rows and blobs are
    read in short read transactions, so chunks may be taken from different
    threads one after another (never at once) and no transaction is held
    between two chunks.
    """

    def __init__(self, cas: "Cassette", *, chunk_size: int = EXPORT_CHUNK, progress: Callable[[int], None] | None = None) -> None:
        if type(chunk_size) is not int or chunk_size < 1:
            raise FabricError(StatusCode.INVALID_ARGUMENT, f"chunk_size: expected an int >= 1, got {chunk_size!r}")
        self.cas = cas
        self.chunk_size = chunk_size
        self.progress = progress
        self.records = 0
        self.nbytes = 0
        self._gen = self._chunks()

    def __iter__(self) -> "LedgerFileBytes":
        return self

    def __next__(self) -> bytes:
        return next(self._gen)

    def close(self) -> None:
        """Stop early (nothing is held open between chunks, so this only drops the generator)."""
        self._gen.close()

    def _pieces(self) -> Iterator[bytes]:
        yield MAGIC + struct.pack(">I", LEDGER_FILE_VERSION)
        for rec_value in _verified_values(self.cas):
            yield _ENTRY.pack(b"R", len(rec_value))
            yield rec_value
            self.records += 1
            if self.progress is not None and self.records % 4096 == 0:
                self.progress(self.records)
        for k, data in self.cas._iter_blobs():
            if len(k) != 33 or k[0] != 2 or derive("blob", data) != k[1:]:
                continue  # never export bytes that fail their hash, nor a key no import accepts
            yield _ENTRY.pack(b"B", 33 + len(data)) + k
            yield data

    def _chunks(self) -> Iterator[bytes]:
        h = blake3.blake3()
        size = self.chunk_size
        buf = bytearray()
        for piece in self._pieces():
            h.update(piece)
            buf += piece
            while len(buf) >= size:
                yield self._out(buf, size)
        buf += _ENTRY.pack(b"E", 40) + struct.pack(">Q", self.records) + h.digest()
        while buf:
            yield self._out(buf, size)

    def _out(self, buf: bytearray, size: int) -> bytes:
        chunk = bytes(buf[:size])
        del buf[:size]
        self.nbytes += len(chunk)
        return chunk


def iter_ledger_file_bytes(cas: "Cassette", *, chunk_size: int = EXPORT_CHUNK,
                           progress: Callable[[int], None] | None = None) -> LedgerFileBytes:
    """The ledger file of ``cas`` as byte chunks: the one source of an export's bytes.

    Records: each key's first verifying row, in ledger order; then every blob
    that matches its key, in key order (``specs/cassette-format.md`` section 9).
    ``progress(records)`` is called every 4096 records.
    """
    return LedgerFileBytes(cas, chunk_size=chunk_size, progress=progress)


def write_ledger_file(cas: "Cassette", path: str | os.PathLike, *, progress: Callable[[int], None] | None = None) -> int:
    """Export ``cas`` to ``path`` (written to a temp name, fsync'd, then renamed); returns records written.

    A ``path`` that cannot be written (a directory, a device or a fifo, a missing or
    read-only directory, a full disk) is FAILED_PRECONDITION naming it (:func:`write_error`); nothing is left behind.
    """
    name = os.fspath(path)
    target = check_write_target(name)
    tmp = f"{target}.tmp-{os.getpid()}"
    it = iter_ledger_file_bytes(cas, progress=progress)
    try:
        try:
            f = open(tmp, "wb")
        except OSError as exc:
            raise write_error(name, exc) from None
        try:
            with f:
                for chunk in it:
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except OSError as exc:
            raise write_error(name, exc) from None
    finally:
        it.close()
        if os.path.exists(tmp):
            os.unlink(tmp)
    return it.records


def check_write_target(path: str, what: str = "ledger file") -> str:
    """The path to write ``path`` at through a temporary file beside it and a rename:
    ``path`` itself, or, for a symlink, the file it names (the link stays a link).

    Checked before any work, since the final rename would fail (or do harm) only at the
    end: FAILED_PRECONDITION naming ``what`` and ``path`` when it is a directory, when its
    directory is missing, or when it is an existing file that is not a regular one (a
    device such as ``/dev/null``, a fifo, a socket), which the rename would replace
    rather than write into.
    """
    real = os.path.realpath(path)
    if os.path.isdir(real):
        raise _cannot_write(path, what, "it is a directory")
    if not os.path.isdir(os.path.dirname(real)):
        raise _cannot_write(path, what, os.strerror(errno.ENOENT))
    if os.path.lexists(real) and not os.path.isfile(real):
        raise _cannot_write(path, what, "it is not a regular file (a device, a fifo or a socket), "
                                        "and it would be replaced, not written into")
    return real


def write_error(path: str, exc: OSError, what: str = "ledger file") -> FabricError:
    """FAILED_PRECONDITION for a ``what`` that cannot be written (missing or read-only directory...)."""
    return _cannot_write(path, what, exc.strerror or str(exc))


def _cannot_write(path: str, what: str, reason: str) -> FabricError:
    """``cannot write <what> <path>: <reason>`` (FAILED_PRECONDITION); ``what`` may be empty."""
    label = f"{what} {path}" if what else path
    return FabricError(StatusCode.FAILED_PRECONDITION, f"cannot write {label}: {reason}")


def _verified_values(cas: "Cassette") -> Iterator[bytes]:
    """Each key's first verifying row: by the append rule, exactly the row its index points to
    (never a row under a blob key, which no import accepts)."""
    seen: set[bytes] = set()
    for seq, value in cas._iter_rows():
        try:
            rec = check_recordable(unpack_record(value, seq))
        except FabricError:
            continue
        if rec.key not in seen:
            seen.add(rec.key)
            yield value


def iter_ledger_file(f: BinaryIO, *, path: str = "") -> Iterator[tuple[bytes, bytes, int]]:
    """Yield ``(tag, body, offset)`` for each entry, checking magic, lengths and the trailer.

    Raises DATA_LOSS naming the offset on any malformation; FAILED_PRECONDITION
    for a newer file version.  An entry whose length runs past the end of the file
    (a damaged length field) is DATA_LOSS before its body is read: a read of that
    length would first allocate it, up to 16 GiB.
    """
    size = _file_size(f)
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
        if size is not None and length > size - offset - _ENTRY.size:
            raise FabricError(StatusCode.DATA_LOSS, f"{path}: truncated entry at offset {offset} "
                              f"(its length, {length} bytes, runs past the end of the file)")
        body = f.read(length)
        if len(body) != length:
            raise FabricError(StatusCode.DATA_LOSS, f"{path}: truncated entry at offset {offset}")
        h.update(hdr)
        h.update(body)
        records += tag == b"R"
        yield tag, body, offset
        offset += _ENTRY.size + length


def _file_size(f: BinaryIO) -> int | None:
    """The size of the file behind ``f``; None when it is not a file (a pipe, an in-memory buffer)."""
    try:
        st = os.fstat(f.fileno())
    except (AttributeError, OSError, ValueError):
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def validate_entry(tag: bytes, body: bytes, offset: int, path: str) -> None:
    """Check one entry's body: a record verified by all three rules and answering a request or
    artifact key (:func:`cassette.record.check_recordable`), a blob against its key.

    DATA_LOSS naming ``path``, the entry's ``offset`` and, where known, the key.
    """
    if tag == b"R":
        try:
            check_recordable(unpack_record(body))
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


def _open_ledger_file(name: str) -> BinaryIO:
    try:
        return open(name, "rb")
    except OSError as exc:
        raise FabricError(StatusCode.NOT_FOUND, f"cannot read ledger file {name}: {exc.strerror}") from None


def _validate_all(f: BinaryIO, name: str) -> tuple[int, int]:
    records = blobs = 0
    for tag, body, offset in iter_ledger_file(f, path=name):
        validate_entry(tag, body, offset, name)
        if tag == b"R":
            records += 1
        else:
            blobs += 1
    return records, blobs


def validate_ledger_file(path: str | os.PathLike) -> tuple[int, int]:
    """Read and validate the whole ledger file at ``path`` as an import does; returns ``(records, blobs)``.

    NOT_FOUND when it cannot be read; otherwise the errors of :func:`iter_ledger_file`
    and :func:`validate_entry`.
    """
    name = os.fspath(path)
    with _open_ledger_file(name) as f:
        return _validate_all(f, name)


def read_ledger_file(cas: "Cassette", path: str | os.PathLike, *, progress: Callable[[int], None] | None = None,
                     counts: dict | None = None) -> int:
    """Validate the whole file, then append its records and blobs to ``cas``; returns records appended.

    ``counts`` (optional) gets ``"records"`` and ``"blobs"``: the entries of the file.
    ``progress(records)`` is called after each full batch (:data:`REPLAY_BATCH`).
    """
    name = os.fspath(path)
    with _open_ledger_file(name) as f:
        records, blobs = _validate_all(f, name)
        f.seek(0)
        appended = seen = 0
        # a batch of small records is written while the next is read and verified; a batch
        # of large ones is waited for at once (memory stays bounded by one batch's bytes)
        writing: PendingPuts | None = None
        try:
            for batch, chunks, nbytes, full in _replay_batches(iter_ledger_file(f, path=name)):
                queued = cas.submit_raw_many(batch)  # records first, as in the file
                if chunks:
                    cas.put_verified_blobs(chunks)
                done, writing = writing, queued
                if done is not None:
                    appended += _appended(done)
                if nbytes > REPLAY_BATCH_BYTES // 4:
                    writing = None
                    appended += _appended(queued)
                seen += len(batch)
                if full and progress is not None:
                    progress(seen)
        finally:
            if writing is not None:
                appended += _appended(writing)
    if counts is not None:
        counts.update(records=records, blobs=blobs)
    return appended


def _replay_batches(entries: Iterator[tuple[bytes, bytes, int]],
                    ) -> Iterator[tuple[list[bytes], list[tuple[ContentKey, bytes]], int, bool]]:
    """The entries of a validated ledger file as replay batches ``(records, blobs, bytes, full)``:
    a batch is full at :data:`REPLAY_BATCH` entries or :data:`REPLAY_BATCH_BYTES` bytes; the
    last one (``full`` false) holds the rest, and comes even when empty."""
    records: list[bytes] = []
    chunks: list[tuple[ContentKey, bytes]] = []
    nbytes = 0
    for tag, body, _ in entries:
        if tag == b"R":
            records.append(body)
        else:
            chunks.append((ContentKey.from_bytes(body[:33]), body[33:]))
        nbytes += len(body)
        if len(records) + len(chunks) >= REPLAY_BATCH or nbytes >= REPLAY_BATCH_BYTES:
            yield records, chunks, nbytes, True
            records, chunks, nbytes = [], [], 0
    yield records, chunks, nbytes, False


def _appended(pending: "PendingPuts") -> int:
    """How many of a submitted batch's records were appended (waits for its commit)."""
    return sum(r.appended for r in pending.wait())


class EntryReader:
    """Ledger-file entries (``tag | length | body``, no header, no trailer) from bytes fed in
    arbitrary pieces: sans-I/O, as a node reads a ``replay`` upload.

    ``feed(data)`` returns the ``(tag, body, offset)`` of every entry completed so
    far (``offset`` counts from the first byte fed); ``close()`` checks that the
    stream did not end inside an entry.  A tag other than ``R`` / ``B`` or a
    length above ``max_entry`` is INVALID_ARGUMENT as soon as its header is in,
    before the body is buffered.  Bodies are not checked here (:func:`validate_entry`).
    """

    def __init__(self, *, where: str = "stream", max_entry: int = _MAX_ENTRY) -> None:
        self.where = where
        self.max_entry = max_entry
        self.offset = 0
        self._buf = bytearray()
        self._need = _ENTRY.size

    def feed(self, data: bytes) -> list[tuple[bytes, bytes, int]]:
        """Take the next bytes of the stream; returns the entries they complete, as
        ``(tag, body, offset of the entry)``, in order."""
        buf = self._buf
        buf += data
        out: list[tuple[bytes, bytes, int]] = []
        while len(buf) >= self._need:
            tag, length = _ENTRY.unpack_from(buf)
            if tag not in (b"R", b"B") or length > self.max_entry:
                raise FabricError(StatusCode.INVALID_ARGUMENT,
                                  f"{self.where}: bad entry header at offset {self.offset} (tag {tag!r}, length {length})")
            end = _ENTRY.size + length
            if len(buf) < end:
                self._need = end
                break
            out.append((tag, bytes(buf[_ENTRY.size : end]), self.offset))
            del buf[:end]
            self.offset += end
            self._need = _ENTRY.size
        return out

    def close(self) -> None:
        """The stream has ended: INVALID_ARGUMENT if it ended inside an entry."""
        if self._buf:
            raise FabricError(StatusCode.INVALID_ARGUMENT,
                              f"{self.where}: the stream ends inside the entry at offset {self.offset} ({len(self._buf)} bytes of it)")
