"""Artifacts: large content cut into verified chunks (blobs) under one manifest.

``put`` runs a Begin/Feed/Commit session: bytes are cut into ``chunk_size``
chunks, each keyed (``blob`` kind) and stored as it arrives (chunks already
held are not written again, so resuming a session re-sends nothing); the
manifest ``{"chunks", "sizes", "size", "digest", "dtype", "shape"}`` is
recorded in the ledger under its ``artifact`` key at commit.  Until commit
nothing is visible under an artifact key; an aborted session leaves only
unreferenced chunks behind.  Every chunk is verified against its key when read,
and the whole content against the manifest digest.

The cutting is :class:`ChunkCutter`'s, and the manifest :func:`build_manifest`'s,
for the embedded session and for a put through a node alike
(:class:`ChunkPlan` keys content without storing it; :mod:`fabric.upload`
sends it), so equal content and chunk size give one artifact key everywhere.
"""

from __future__ import annotations

import io
import itertools
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import blake3
import numpy as np

from cassette import codec
from cassette.errors import FabricError, StatusCode
from cassette.keys import ContentKey
from cassette.record import Record
from cassette.store import MISS, Cassette
from fabric import metrics

__all__ = [
    "ArtifactRef", "ArtifactSession", "ChunkCutter", "ChunkPlan", "build_manifest", "parse_manifest", "check_content",
    "put", "get", "get_into", "manifest_of", "DEFAULT_CHUNK", "artifact_key", "verified_chunks", "assemble",
    "fill_target", "check_target", "key_of",
]

DEFAULT_CHUNK = 1 << 20
#: Content a :class:`ChunkPlan` cannot re-read (an iterator, a file object) is spooled
#: to a temporary file, kept in memory up to this many bytes.
SPOOL_MEMORY = 32 << 20
#: The fields of a manifest, exactly.
MANIFEST_FIELDS = frozenset({"chunks", "sizes", "size", "digest", "dtype", "shape"})
#: Chunks an embedded session stores per group commit when one feed fills many.
STORE_BATCH = 16


@dataclass(frozen=True)
class ArtifactRef:
    """A stored artifact: its ``key``, ``size_bytes``, content ``digest`` (BLAKE3 hex) and layout."""

    key: ContentKey
    size_bytes: int
    digest: str
    dtype: str | None = None
    shape: tuple[int, ...] | None = None
    chunks: int = 0

    @property
    def uri(self) -> str:
        """``fabric://artifact:<hex>``."""
        return f"fabric://{self.key}"


class ChunkCutter:
    """The one chunking rule: cuts a byte stream into ``chunk_size`` chunks and hashes all of it.

    ``feed(data)`` returns the chunks that filled: views into ``data`` where
    nothing was buffered (valid while ``data`` is), else bytes.  ``finish()``
    returns the last, short chunk (one empty chunk for empty content).
    ``size``, ``count`` and ``digest()`` describe what was fed.  The embedded
    session and a put through a node both cut with it, so equal content gets
    one artifact key either way, whatever the feed boundaries.
    """

    def __init__(self, chunk_size: int = DEFAULT_CHUNK) -> None:
        if not isinstance(chunk_size, (int, np.integer)) or isinstance(chunk_size, bool) or chunk_size <= 0:
            raise FabricError(StatusCode.INVALID_ARGUMENT, f"chunk_size must be positive, got {chunk_size}")
        self.chunk_size = chunk_size
        self._buf = bytearray()
        self._hash = blake3.blake3()
        self.size = 0
        self.count = 0

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes | memoryview]:
        """Append bytes; returns the chunks that are now full."""
        mv = memoryview(data).cast("B")
        self._hash.update(mv)
        self.size += len(mv)
        cs = self.chunk_size
        out: list[bytes | memoryview] = []
        if self._buf:
            head = mv[: cs - len(self._buf)]
            self._buf += head
            mv = mv[len(head) :]
            if len(self._buf) < cs:
                return out
            out.append(bytes(self._buf))
            self._buf.clear()
        n = len(mv) // cs * cs
        out.extend(mv[i : i + cs] for i in range(0, n, cs))
        self._buf += mv[n:]
        self.count += len(out)
        return out

    def finish(self) -> list[bytes]:
        """The last chunk, if any bytes are left (or if there were none at all)."""
        if not self._buf and self.count:
            return []
        last = bytes(self._buf)
        self._buf.clear()
        self.count += 1
        return [last]

    def digest(self) -> bytes:
        """BLAKE3 of everything fed."""
        return self._hash.digest()


def build_manifest(
    chunks: list[ContentKey], sizes: list[int], size: int, digest: bytes, dtype: str | None, shape: tuple[int, ...] | None
) -> tuple[ContentKey, bytes, dict]:
    """``(artifact key, canonical manifest bytes, manifest)``: the key is the key of those bytes."""
    manifest = {
        "chunks": list(chunks),
        "sizes": list(sizes),
        "size": size,
        "digest": digest,
        "dtype": dtype,
        "shape": None if shape is None else list(shape),
    }
    payload = codec.encode(manifest, root="manifest")
    return ContentKey.of("artifact", payload), payload, manifest


class ArtifactSession:
    """One Begin/Feed/Commit upload into a cassette.

    ``feed(bytes)`` any number of times, then ``commit()`` → :class:`ArtifactRef`,
    or ``abort()``.  Usable as a context manager (commits on success, aborts on error).
    ``progress(n)``, if given, is called each time chunks are stored (or found
    already held) with ``n`` the bytes of content stored so far; after ``commit()``
    the last call has the content's size.
    """

    def __init__(
        self,
        cassette: Cassette,
        *,
        dtype: str | None = None,
        shape: tuple[int, ...] | None = None,
        chunk_size: int = DEFAULT_CHUNK,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        self._cut = ChunkCutter(chunk_size)
        self._progress = progress
        self._stored = 0
        self.cassette = cassette
        self.dtype = dtype
        self.shape = None if shape is None else tuple(int(n) for n in shape)
        self.chunk_size = chunk_size
        self._chunks: list[ContentKey] = []
        self._sizes: list[int] = []
        self._state = "open"

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append bytes; full chunks are hashed and stored as they fill."""
        if self._state != "open":
            raise FabricError(StatusCode.FAILED_PRECONDITION, f"artifact session is {self._state}")
        full = self._cut.feed(data)
        for i in range(0, len(full), STORE_BATCH):
            self._store([bytes(c) for c in full[i : i + STORE_BATCH]])

    def _store(self, chunks: list[bytes]) -> None:
        keys = [ContentKey.of("blob", c) for c in chunks]
        missing = set(self.cassette.missing(keys, verify_blobs=True))
        todo = [(k, c) for k, c in zip(keys, chunks) if k in missing]
        if todo:
            self.cassette.put_verified_blobs(todo)
        self._chunks.extend(keys)
        self._sizes.extend(len(c) for c in chunks)
        if self._progress is not None:
            self._stored += sum(len(c) for c in chunks)
            self._progress(self._stored)

    def commit(self) -> ArtifactRef:
        """Store the last chunk and record the manifest; returns the artifact's ref."""
        if self._state != "open":
            raise FabricError(StatusCode.FAILED_PRECONDITION, f"artifact session is {self._state}")
        last = self._cut.finish()
        if last:
            self._store(last)
        key, payload, manifest = build_manifest(self._chunks, self._sizes, self._cut.size, self._cut.digest(), self.dtype, self.shape)
        self.cassette.put(key, payload, evaluator="", version="")
        self._state = "committed"
        return _ref(key, manifest)

    def abort(self) -> None:
        """Drop the session; nothing becomes visible under an artifact key."""
        self._state = "aborted"
        self._cut = ChunkCutter(self.chunk_size)  # drop buffered bytes

    def __enter__(self) -> "ArtifactSession":
        return self

    def __exit__(self, exc_type, *rest: Any) -> None:
        if exc_type is not None and self._state == "open":
            self.abort()


def _ref(key: ContentKey, manifest: dict) -> ArtifactRef:
    shape = manifest.get("shape")
    return ArtifactRef(
        key=key,
        size_bytes=manifest["size"],
        digest=manifest["digest"].hex(),
        dtype=manifest.get("dtype"),
        shape=None if shape is None else tuple(shape),
        chunks=len(manifest["chunks"]),
    )


def _chunks_of(data: Any) -> tuple[Iterable[bytes | memoryview], str | None, tuple[int, ...] | None]:
    if isinstance(data, np.ndarray):
        if isinstance(data, np.ma.MaskedArray):
            raise FabricError(StatusCode.INVALID_ARGUMENT, "put: a masked array's mask would be lost; put .data and .mask separately")
        dt = data.dtype
        if dt.kind not in "biufc" or dt.fields is not None:
            raise FabricError(StatusCode.INVALID_ARGUMENT, f"put: numpy dtype {dt} is not storable (bool, int, uint, float, complex)")
        le = dt.newbyteorder("<") if dt.itemsize > 1 else dt
        flat = np.ascontiguousarray(data, dtype=le).reshape(-1).view(np.uint8)
        if dt.kind == "b" and flat.size and flat.max() > 1:
            # numpy reads any non-zero byte as True: equal bool arrays, equal content (00 / 01)
            flat = (flat != 0).view(np.uint8)
        return [memoryview(flat)], le.str, tuple(data.shape)
    if isinstance(data, (bytes, bytearray, memoryview)):
        return [_contiguous(data)], None, None
    if isinstance(data, (str, os.PathLike)):
        return _read_file(source_file(data).open("rb")), None, None
    if isinstance(data, io.IOBase) or hasattr(data, "read"):
        return _read_file(data, close=False), None, None
    if getattr(data, "__cuda_array_interface__", None) is not None:  # a device array (iterable too: check first)
        if hasattr(data, "get"):  # CuPy's
            return _chunks_of(data.get())
        from gpu import to_host  # another library's (torch, numba): through CuPy, FAILED_PRECONDITION without it

        return _chunks_of(to_host(data))
    if hasattr(data, "__iter__"):
        return _check_iter(data), None, None
    raise FabricError(StatusCode.INVALID_ARGUMENT, f"put: cannot store {type(data).__name__} (bytes, numpy array, file, or iterator of bytes)")


def source_file(path: str | os.PathLike, what: str = "put") -> Path:
    """``path`` as a file :func:`put` (or the ``what`` operation) can read: INVALID_ARGUMENT
    for a directory or another non-regular file, NOT_FOUND if there is nothing there."""
    p = Path(path)
    if p.is_dir():
        raise FabricError(StatusCode.INVALID_ARGUMENT, f"{what}: {p} is a directory, not a file")
    if not p.is_file():
        if p.exists():
            raise FabricError(StatusCode.INVALID_ARGUMENT, f"{what}: {p} is not a regular file")
        raise FabricError(StatusCode.NOT_FOUND, f"{what}: no such file {p}")
    return p


def _read_file(f: Any, close: bool = True) -> Iterator[bytes]:
    try:
        while True:
            b = f.read(DEFAULT_CHUNK)
            if not b:
                return
            if not isinstance(b, (bytes, bytearray, memoryview)):
                raise FabricError(StatusCode.INVALID_ARGUMENT,
                                  f"put: the file object's read() gave {type(b).__name__}, not bytes (open it in binary mode, 'rb')")
            yield b
    finally:
        if close:
            f.close()


def _contiguous(data: bytes | bytearray | memoryview) -> bytes | bytearray | memoryview:
    """``data``, or a strided memoryview's elements in logical order (as numpy input is made contiguous)."""
    if isinstance(data, memoryview) and not data.c_contiguous:
        return data.tobytes()
    return data


def _check_iter(it: Iterable[Any]) -> Iterator[bytes | bytearray | memoryview]:
    for i, b in enumerate(it):
        if not isinstance(b, (bytes, bytearray, memoryview)):
            raise FabricError(StatusCode.INVALID_ARGUMENT, f"put: item [{i}] of the iterator is {type(b).__name__}, not bytes")
        yield _contiguous(b)


def put(cassette: Cassette, data: Any, *, chunk_size: int = DEFAULT_CHUNK, progress: Callable[[int], None] | None = None) -> ArtifactRef:
    """Store ``data`` (bytes, numpy array, file path or object, iterator of bytes) as an artifact.

    ``progress(n)``: ``n`` bytes of the content stored so far, increasing, called per
    group of stored chunks; the last call has the content's size (``size_bytes``).
    """
    parts, dtype, shape = _chunks_of(data)
    with ArtifactSession(cassette, dtype=dtype, shape=shape, chunk_size=chunk_size, progress=progress) as s:
        for part in parts:
            s.feed(part)
        return s.commit()


class ChunkPlan:
    """``data`` cut and keyed exactly as :func:`put` stores it, with nothing stored.

    For a put through a node (:mod:`fabric.upload`): ``key``, ``payload`` (the
    canonical manifest bytes), ``manifest`` and ``ref`` (the
    :class:`ArtifactRef` the artifact will have) are known before any byte is
    sent, and ``chunk(i)`` reads chunk ``i`` again when the node asks for it.
    In-memory content (bytes, numpy) is sliced and a file path re-read (a file
    that changes meanwhile yields chunks that fail the node's check); an
    iterator or file object is spooled while it is cut (in memory up to
    :data:`SPOOL_MEMORY`, then to a temporary file).  ``close()`` (or ``with``)
    drops the spool and closes the file.
    """

    def __init__(self, data: Any, *, chunk_size: int = DEFAULT_CHUNK) -> None:
        cut = ChunkCutter(chunk_size)
        parts, dtype, shape = _chunks_of(data)
        self.chunk_size = chunk_size
        self._whole: memoryview | None = None
        self._path: Path | None = None
        self._file: Any = None
        if isinstance(data, (str, os.PathLike)):
            self._path = Path(data)
        elif isinstance(parts, list):  # one in-memory buffer (bytes-like or a numpy array's bytes)
            self._whole = memoryview(parts[0]).cast("B")
        else:
            self._file = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY)
        keys: list[ContentKey] = []
        sizes: list[int] = []
        try:
            for part in itertools.chain(parts, (None,)):  # lazily: a file or iterator is never read whole
                for c in cut.feed(part) if part is not None else cut.finish():
                    keys.append(ContentKey.of("blob", c))
                    sizes.append(len(c))
                    if self._file is not None:
                        self._file.write(c)
        except BaseException:
            self.close()
            raise
        self.key, self.payload, self.manifest = build_manifest(keys, sizes, cut.size, cut.digest(), dtype, shape)
        self.ref = _ref(self.key, self.manifest)

    def chunk(self, i: int) -> bytes:
        """The bytes of chunk ``i``."""
        off, n = i * self.chunk_size, self.manifest["sizes"][i]
        if self._whole is not None:
            return bytes(self._whole[off : off + n])
        if self._file is None:
            assert self._path is not None
            self._file = self._path.open("rb")
        self._file.seek(off)
        data = self._file.read(n)
        if len(data) != n:
            raise FabricError(StatusCode.FAILED_PRECONDITION, f"put: {self._path} changed while it was being put (chunk {i} is short)")
        return data

    def close(self) -> None:
        """Release the content (idempotent)."""
        if self._whole is not None:
            self._whole.release()
            self._whole = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "ChunkPlan":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


#: Bytes of one chunk key in a canonical manifest (ext 8 header, then the 33-byte key).  A
#: manifest of n bytes holds at most n // 36 keys, so at most 4 + n // 36 arrays, maps and ext
#: values (the map, ``chunks``, ``sizes``, ``shape``): :func:`parse_manifest` decodes no more.
_MANIFEST_KEY_BYTES = 36


def parse_manifest(payload: Any) -> tuple[ContentKey, dict]:
    """``(artifact key, manifest)`` of manifest bytes received from elsewhere (an upload).

    The bytes must be the canonical encoding of a well-formed manifest: the
    fields of :data:`MANIFEST_FIELDS`, at least one ``blob`` chunk key, one
    size per chunk adding up to ``size``, a 32-byte digest, and a storable
    numpy dtype whose shape covers ``size`` bytes and is one numpy can make an
    array of (at most 64 dimensions, each in range), or neither.  Anything else
    is INVALID_ARGUMENT, and bytes that hold more arrays, maps and ext values than
    a manifest of their length could are refused while decoding (an upload's
    bytes cost at most about one container per 36 bytes).  Whether the chunks really have those sizes and that
    digest is :func:`check_content`'s job once they are held.
    """
    if type(payload) is not bytes:
        raise FabricError(StatusCode.INVALID_ARGUMENT, f"manifest: expected bytes, got {type(payload).__name__}")
    try:  # INVALID_ARGUMENT if malformed or not canonical
        m = codec.decode(payload, strict=True, max_compound=4 + len(payload) // _MANIFEST_KEY_BYTES)
    except FabricError as exc:
        if exc.status_code is not StatusCode.RESOURCE_EXHAUSTED:
            raise
        raise FabricError(
            StatusCode.INVALID_ARGUMENT, "manifest: more arrays, maps and ext values than its length holds chunk keys"
        ) from None
    why = _manifest_problem(m)
    if why:
        raise FabricError(StatusCode.INVALID_ARGUMENT, f"manifest: {why}")
    return ContentKey.of("artifact", payload), m


def _manifest_problem(m: Any) -> str | None:
    if type(m) is not dict or set(m) != MANIFEST_FIELDS:
        return f"expected a map with exactly {sorted(MANIFEST_FIELDS)}"
    chunks, sizes, size = m["chunks"], m["sizes"], m["size"]
    if type(chunks) is not list or not chunks or not all(type(k) is ContentKey and k.kind == "blob" for k in chunks):
        return "chunks must be a non-empty list of blob keys"
    if type(sizes) is not list or len(sizes) != len(chunks) or not all(type(n) is int and n >= 0 for n in sizes):
        return "sizes must list one size (int >= 0) per chunk"
    if type(size) is not int or sum(sizes) != size:
        return "size must be the sum of the chunk sizes"
    if type(m["digest"]) is not bytes or len(m["digest"]) != 32:
        return "digest must be 32 bytes"
    dtype, shape = m["dtype"], m["shape"]
    if dtype is None and shape is None:
        return None
    if type(dtype) is not str or type(shape) is not list or not all(type(n) is int and n >= 0 for n in shape):
        return "dtype (str) and shape (list of ints) go together"
    try:
        dt = np.dtype(dtype)
    except (TypeError, ValueError):
        return f"dtype {dtype!r} is not a numpy dtype"
    if dt.kind not in "biufc" or dt.fields is not None or dt.str != dtype:
        return f"dtype {dtype!r} is not storable"
    if int(np.prod(shape, dtype=object)) * dt.itemsize != size:
        return f"shape {shape} of {dtype} does not cover {size} bytes"
    try:  # a view of one element: numpy's own checks of the dimensions, nothing allocated
        np.broadcast_to(np.zeros((), dt), tuple(shape))
    except ValueError as exc:
        return f"shape of {len(shape)} dimensions is not one numpy can make an array of ({exc})"
    return None


def check_content(cassette: Cassette, key: ContentKey, manifest: dict) -> None:
    """DATA_LOSS unless every chunk of ``manifest`` is held here with its size and all of
    them together have its digest (reads every chunk; run it off the event loop)."""
    for _ in _iter_verified(cassette, key, manifest):
        pass


def manifest_of(cassette: Cassette, key: ContentKey) -> dict:
    """The verified manifest of a held artifact, or NOT_FOUND."""
    rec: Record | None = cassette.get_record(key)
    if rec is None:
        raise FabricError(StatusCode.NOT_FOUND, "artifact not held here", key=key)
    try:
        manifest = codec.decode(rec.payload)
        if len(manifest["chunks"]) != len(manifest["sizes"]) or sum(manifest["sizes"]) != manifest["size"]:
            raise KeyError("chunk sizes")
    except (FabricError, KeyError, TypeError) as exc:
        raise FabricError(StatusCode.DATA_LOSS, f"artifact manifest is malformed ({exc})", key=key) from None
    return manifest


def key_of(key: "ContentKey | str | ArtifactRef") -> ContentKey:
    """The :class:`ContentKey` a ``get`` / ``get_into`` / ``holders`` argument names: a key,
    its text form, or an :class:`ArtifactRef` (its ``key``); INVALID_ARGUMENT otherwise."""
    return ContentKey.parse(key.key if isinstance(key, ArtifactRef) else key)


def artifact_key(key: "ContentKey | str | ArtifactRef", op: str) -> ContentKey:
    """``key`` parsed (:func:`key_of`), if it names an artifact; INVALID_ARGUMENT naming ``op``
    otherwise (a recorded reply or a single blob is not an array's content: ``get`` reads those)."""
    key = key_of(key)
    if key.kind != "artifact":
        raise FabricError(StatusCode.INVALID_ARGUMENT, f"{op}: expected an artifact key, got a {key.kind} key (read it with get)", key=key)
    return key


_END = object()


def verified_chunks(key: ContentKey, manifest: dict, chunks: Iterable[Any], *, check_keys: bool = True) -> Iterator[bytes]:
    """The chunks of the artifact ``key`` (in manifest order), each checked as it is yielded.

    Each must be ``bytes`` of its manifest size with (``check_keys``) its manifest
    key; ``None`` stands for a chunk that is not held.  After the last one there
    must be no more, and all of them together must have the manifest's digest.
    Anything else is DATA_LOSS naming ``key``, so the content is verified as a
    whole only once the iterator is exhausted.  ``check_keys=False`` is for chunks
    already checked against their keys (a cassette's ``get_blob``).
    """
    h = blake3.blake3()
    it = iter(chunks)
    n = 0
    for ck, size, data in zip(manifest["chunks"], manifest["sizes"], it):
        if data is None:
            raise FabricError(StatusCode.DATA_LOSS, f"chunk {ck.short()} of the artifact is missing or corrupt", key=key)
        if check_keys and type(data) is not bytes:
            raise FabricError(StatusCode.DATA_LOSS, f"chunk {ck.short()} is {type(data).__name__}, not bytes", key=key)
        if len(data) != size:
            raise FabricError(StatusCode.DATA_LOSS, f"chunk {ck.short()} has {len(data)} bytes, manifest says {size}", key=key)
        if check_keys and ContentKey.of("blob", data) != ck:
            raise FabricError(StatusCode.DATA_LOSS, f"chunk {ck.short()} does not match its key", key=key)
        h.update(data)
        n += 1
        yield data
    want = len(manifest["chunks"])
    if n != want or next(it, _END) is not _END:
        raise FabricError(StatusCode.DATA_LOSS, f"got {n if n != want else 'more than ' + str(n)} chunks, manifest lists {want}", key=key)
    if h.digest() != manifest["digest"]:
        raise FabricError(StatusCode.DATA_LOSS, "artifact content does not match its digest", key=key)


def _iter_verified(cassette: Cassette, key: ContentKey, manifest: dict) -> Iterator[bytes]:
    return verified_chunks(key, manifest, (cassette.get_blob(ck) for ck in manifest["chunks"]), check_keys=False)


def assemble(manifest: dict, chunks: Iterable[bytes], progress: Callable[[int], None] | None = None) -> Any:
    """The content of ``chunks`` as ``get`` returns it: bytes, or a writable numpy array
    of the manifest's dtype and shape, holding the content once (no second copy at the
    end).  ``progress(n)``: bytes assembled so far, per chunk."""
    size = manifest["size"]
    if manifest["dtype"] is not None:
        buf = bytearray(size)
        with memoryview(buf) as view:
            _fill(view, chunks, progress)
        return np.frombuffer(buf, dtype=np.dtype(manifest["dtype"])).reshape(manifest["shape"])
    # BytesIO.getvalue() hands out the object's own bytes buffer when no view of it is
    # alive (CPython), where bytes(bytearray) would copy: a bytes artifact peaked at 2x.
    out = io.BytesIO()
    if size:
        out.seek(size - 1)
        out.write(b"\0")
    with out.getbuffer() as view:
        _fill(view, chunks, progress)
    return out.getvalue()


def _fill(view: memoryview, chunks: Iterable[bytes], progress: Callable[[int], None] | None) -> None:
    off = 0
    for data in chunks:
        end = off + len(data)
        if end > len(view):
            break
        view[off:end] = data
        off = end
        if progress is not None:
            progress(off)
    else:
        end = off
    if end != len(view):
        raise FabricError(StatusCode.DATA_LOSS, f"artifact chunks do not add up to the manifest's {len(view)} bytes")


def get(cassette: Cassette, key: ContentKey | str, *, progress: Callable[[int], None] | None = None) -> Any:
    """An artifact's content (bytes, or a writable numpy array if it was one), or a reply's value.

    ``progress(n)``, for an artifact: ``n`` bytes of it read and verified so far, per
    chunk; the last call has its ``size_bytes``.  Not called for a reply or a blob.
    """
    key = key_of(key)
    if key.kind == "request":
        value = cassette.lookup_value(key)
        if value is MISS:
            if cassette.contains(key):  # indexed, but its row did not check
                raise FabricError(StatusCode.DATA_LOSS, "the reply recorded here for this request is corrupt "
                                  "(realize it again to record a fresh row)", key=key)
            raise FabricError(StatusCode.NOT_FOUND, "no reply recorded for this request here", key=key)
        return value
    if key.kind == "blob":
        data = cassette.get_blob(key)
        if data is None:
            if cassette.contains(key):  # stored, but its bytes no longer match its key
                raise FabricError(StatusCode.DATA_LOSS, "the blob stored here is corrupt (put its content again to repair it)", key=key)
            raise FabricError(StatusCode.NOT_FOUND, "blob not held here", key=key)
        return data
    manifest = manifest_of(cassette, key)
    return assemble(manifest, _iter_verified(cassette, key, manifest), progress)


def get_into(cassette: Cassette, key: ContentKey | str, out: Any) -> Any:
    """Fill preallocated ``out`` with an artifact; returns ``out`` (see :func:`fill_target`).

    ``key`` must be an artifact key (INVALID_ARGUMENT for a request or blob key).
    """
    key = artifact_key(key, "get_into")
    return fill_target(lambda: _stream_artifact(cassette, key), key, out)


def fill_target(stream: Callable[[], tuple[dict, Iterable[bytes]]], key: ContentKey, out: Any, after: Any = None) -> Any:
    """What every ``get_into`` does, wherever the chunks come from; returns ``out``.

    ``stream()`` gives ``(manifest, chunks)``: the artifact's verified manifest and
    an iterator of its chunks that verifies them (:func:`verified_chunks`).  It is
    called only once ``out`` is known to be a numpy or CuPy array.  CuPy targets
    (``__cuda_array_interface__``) go to :func:`gpu.materialize_into`, their copies
    ordered after the event ``after`` too (:func:`gpu.queued_work`, recorded on the
    caller's thread when this runs on another).  A numpy
    ``out`` must have the artifact's dtype (any byte order) and shape
    (:func:`check_target`, INVALID_ARGUMENT otherwise, checked before any chunk
    is used; a bytes artifact fits any array of ``size_bytes`` bytes that holds
    no Python objects).  A C-contiguous, writable, same-byte-order target is
    written chunk by chunk in place; anything else gets a staged copy, counted in
    ``fabric_layout_mismatch_total``.  On DATA_LOSS the content of ``out`` is
    unspecified.
    """
    if hasattr(out, "__cuda_array_interface__"):
        from gpu import materialize_into

        return materialize_into(stream, out, after=after)  # type: ignore[arg-type]
    if not isinstance(out, np.ndarray):
        raise FabricError(StatusCode.INVALID_ARGUMENT, f"get_into: out must be a numpy or CuPy array, got {type(out).__name__}")
    manifest, chunks = stream()
    if check_target(manifest, out, key):
        dst = memoryview(out.view(np.ndarray).reshape(-1).view(np.uint8))  # also for a subclass (np.matrix stays 2-D)
        off = 0
        for data in chunks:
            dst[off : off + len(data)] = data
            off += len(data)
        return out
    metrics.LAYOUT_MISMATCH.inc()
    staged = assemble(manifest, chunks)
    if isinstance(staged, bytes):
        out[...] = np.frombuffer(staged, dtype=out.dtype).reshape(out.shape)
    else:
        out[...] = staged
    return out


def check_target(manifest: dict, out: Any, key: ContentKey) -> bool:
    """Validate ``out`` against the manifest; True when it can be written in place."""
    if not getattr(out, "flags", None) or not out.flags.writeable:
        raise FabricError(StatusCode.INVALID_ARGUMENT, "get_into: out is read-only", key=key)
    if out.dtype.hasobject:  # its elements are object pointers: no content's bytes belong there
        raise FabricError(StatusCode.INVALID_ARGUMENT, f"get_into: out dtype {out.dtype} holds Python objects, not numbers", key=key)
    dtype, shape = manifest["dtype"], manifest["shape"]
    if dtype is None:
        if out.nbytes != manifest["size"]:
            raise FabricError(StatusCode.INVALID_ARGUMENT, f"get_into: out has {out.nbytes} bytes, artifact has {manifest['size']}", key=key)
        return bool(out.flags.c_contiguous)
    want = np.dtype(dtype)
    if out.dtype.newbyteorder("<") != want.newbyteorder("<") or out.dtype.kind != want.kind:
        raise FabricError(StatusCode.INVALID_ARGUMENT, f"get_into: out dtype {out.dtype} does not match artifact dtype {want}", key=key)
    if tuple(out.shape) != tuple(shape):
        raise FabricError(StatusCode.INVALID_ARGUMENT, f"get_into: out shape {tuple(out.shape)} does not match artifact shape {tuple(shape)}", key=key)
    return bool(out.flags.c_contiguous) and (out.dtype.itemsize == 1 or out.dtype.str == want.str)


def _stream_artifact(cassette: Cassette, key: ContentKey, op: str = "materialize") -> tuple[dict, Iterator[bytes]]:
    key = artifact_key(key, op)
    manifest = manifest_of(cassette, key)
    return manifest, _iter_verified(cassette, key, manifest)
