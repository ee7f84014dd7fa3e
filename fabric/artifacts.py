"""Artifacts: large content cut into verified chunks (blobs) under one manifest.

``put`` runs a Begin/Feed/Commit session: bytes are cut into ``chunk_size``
chunks, each keyed (``blob`` kind) and stored as it arrives (chunks already
held are not written again, so resuming a session re-sends nothing); the
manifest ``{"chunks", "sizes", "size", "digest", "dtype", "shape"}`` is
recorded in the ledger under its ``artifact`` key at commit.  Until commit
nothing is visible under an artifact key; an aborted session leaves only
unreferenced chunks behind.  Every chunk is verified against its key when read,
and the whole content against the manifest digest.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import blake3
import numpy as np

from cassette import codec
from cassette.errors import FabricError, StatusCode
from cassette.keys import ContentKey
from cassette.record import Record
from cassette.store import MISS, Cassette
from fabric import metrics

__all__ = ["ArtifactRef", "ArtifactSession", "put", "get", "get_into", "manifest_of", "DEFAULT_CHUNK"]

DEFAULT_CHUNK = 1 << 20


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


class ArtifactSession:
    """One Begin/Feed/Commit upload into a cassette.

    ``feed(bytes)`` any number of times, then ``commit()`` → :class:`ArtifactRef`,
    or ``abort()``.  Usable as a context manager (commits on success, aborts on error).
    """

    def __init__(self, cassette: Cassette, *, dtype: str | None = None, shape: tuple[int, ...] | None = None, chunk_size: int = DEFAULT_CHUNK) -> None:
        if chunk_size <= 0:
            raise FabricError(StatusCode.INVALID_ARGUMENT, f"chunk_size must be positive, got {chunk_size}")
        self.cassette = cassette
        self.dtype = dtype
        self.shape = None if shape is None else tuple(int(n) for n in shape)
        self.chunk_size = chunk_size
        self._buf = bytearray()
        self._chunks: list[ContentKey] = []
        self._sizes: list[int] = []
        self._hash = blake3.blake3()
        self._size = 0
        self._state = "open"

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append bytes; full chunks are hashed and stored as they fill."""
        if self._state != "open":
            raise FabricError(StatusCode.FAILED_PRECONDITION, f"artifact session is {self._state}")
        mv = memoryview(data).cast("B")
        self._hash.update(mv)
        self._size += len(mv)
        self._buf += mv
        if len(self._buf) >= self.chunk_size:
            n = len(self._buf) // self.chunk_size * self.chunk_size
            self._store([bytes(self._buf[i : i + self.chunk_size]) for i in range(0, n, self.chunk_size)])
            del self._buf[:n]

    def _store(self, chunks: list[bytes]) -> None:
        keys = [ContentKey.of("blob", c) for c in chunks]
        missing = set(self.cassette.missing(keys, verify_blobs=True))
        todo = [(k, c) for k, c in zip(keys, chunks) if k in missing]
        if todo:
            self.cassette.put_verified_blobs(todo)
        self._chunks.extend(keys)
        self._sizes.extend(len(c) for c in chunks)

    def commit(self) -> ArtifactRef:
        """Store the last chunk and record the manifest; returns the artifact's ref."""
        if self._state != "open":
            raise FabricError(StatusCode.FAILED_PRECONDITION, f"artifact session is {self._state}")
        if self._buf or not self._chunks:
            self._store([bytes(self._buf)])
            self._buf.clear()
        manifest = {
            "chunks": list(self._chunks),
            "sizes": list(self._sizes),
            "size": self._size,
            "digest": self._hash.digest(),
            "dtype": self.dtype,
            "shape": None if self.shape is None else list(self.shape),
        }
        payload = codec.encode(manifest, root="manifest")
        key = ContentKey.of("artifact", payload)
        self.cassette.put(key, payload, evaluator="", version="")
        self._state = "committed"
        return _ref(key, manifest)

    def abort(self) -> None:
        """Drop the session; nothing becomes visible under an artifact key."""
        self._state = "aborted"
        self._buf.clear()

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
        dt = data.dtype
        if dt.kind not in "biufc" or dt.fields is not None:
            raise FabricError(StatusCode.INVALID_ARGUMENT, f"put: numpy dtype {dt} is not storable (bool, int, uint, float, complex)")
        le = dt.newbyteorder("<") if dt.itemsize > 1 else dt
        arr = np.ascontiguousarray(data, dtype=le)
        return [memoryview(arr.reshape(-1).view(np.uint8))], le.str, tuple(data.shape)
    if isinstance(data, (bytes, bytearray, memoryview)):
        return [data], None, None
    if isinstance(data, (str, os.PathLike)):
        p = Path(data)
        if not p.is_file():
            raise FabricError(StatusCode.NOT_FOUND, f"put: no such file {p}")
        return _read_file(p.open("rb")), None, None
    if isinstance(data, io.IOBase) or hasattr(data, "read"):
        return _read_file(data, close=False), None, None
    if hasattr(data, "__iter__"):
        return _check_iter(data), None, None
    cupy_like = getattr(data, "__cuda_array_interface__", None)
    if cupy_like is not None:
        return _chunks_of(data.get())  # type: ignore[union-attr]
    raise FabricError(StatusCode.INVALID_ARGUMENT, f"put: cannot store {type(data).__name__} (bytes, numpy array, file, or iterator of bytes)")


def _read_file(f: Any, close: bool = True) -> Iterator[bytes]:
    try:
        while True:
            b = f.read(DEFAULT_CHUNK)
            if not b:
                return
            yield b
    finally:
        if close:
            f.close()


def _check_iter(it: Iterable[Any]) -> Iterator[bytes]:
    for i, b in enumerate(it):
        if not isinstance(b, (bytes, bytearray, memoryview)):
            raise FabricError(StatusCode.INVALID_ARGUMENT, f"put: item [{i}] of the iterator is {type(b).__name__}, not bytes")
        yield b


def put(cassette: Cassette, data: Any, *, chunk_size: int = DEFAULT_CHUNK) -> ArtifactRef:
    """Store ``data`` (bytes, numpy array, file path or object, iterator of bytes) as an artifact."""
    parts, dtype, shape = _chunks_of(data)
    with ArtifactSession(cassette, dtype=dtype, shape=shape, chunk_size=chunk_size) as s:
        for part in parts:
            s.feed(part)
        return s.commit()


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


def _iter_verified(cassette: Cassette, key: ContentKey, manifest: dict) -> Iterator[bytes]:
    h = blake3.blake3()
    for ck, size in zip(manifest["chunks"], manifest["sizes"]):
        data = cassette.get_blob(ck)
        if data is None:
            raise FabricError(StatusCode.DATA_LOSS, f"chunk {ck.short()} of the artifact is missing or corrupt", key=key)
        if len(data) != size:
            raise FabricError(StatusCode.DATA_LOSS, f"chunk {ck.short()} has {len(data)} bytes, manifest says {size}", key=key)
        h.update(data)
        yield data
    if h.digest() != manifest["digest"]:
        raise FabricError(StatusCode.DATA_LOSS, "artifact content does not match its digest", key=key)


def get(cassette: Cassette, key: ContentKey | str) -> Any:
    """An artifact's content (bytes, or a writable numpy array if it was one), or a reply's value."""
    key = ContentKey.parse(key)
    if key.kind == "request":
        value = cassette.lookup_value(key)
        if value is MISS:
            raise FabricError(StatusCode.NOT_FOUND, "no reply recorded for this request here", key=key)
        return value
    if key.kind == "blob":
        data = cassette.get_blob(key)
        if data is None:
            raise FabricError(StatusCode.NOT_FOUND, "blob not held here", key=key)
        return data
    manifest = manifest_of(cassette, key)
    buf = bytearray(manifest["size"])
    off = 0
    for data in _iter_verified(cassette, key, manifest):
        buf[off : off + len(data)] = data
        off += len(data)
    if manifest["dtype"] is None:
        return bytes(buf)
    return np.frombuffer(buf, dtype=np.dtype(manifest["dtype"])).reshape(manifest["shape"])


def get_into(cassette: Cassette, key: ContentKey | str, out: Any) -> Any:
    """Fill preallocated ``out`` with an artifact; returns ``out``.

    ``out`` must have the artifact's dtype (any byte order) and shape
    (INVALID_ARGUMENT otherwise; a bytes artifact fits any array of
    ``size_bytes`` bytes).  A C-contiguous, writable, same-byte-order target is
    written chunk by chunk in place; anything else gets a staged copy, counted
    in ``fabric_layout_mismatch_total``.  CuPy targets go through :mod:`gpu`.
    """
    key = ContentKey.parse(key)
    if hasattr(out, "__cuda_array_interface__"):
        from gpu import materialize_into

        return materialize_into(lambda: _stream_artifact(cassette, key), out)
    if not isinstance(out, np.ndarray):
        raise FabricError(StatusCode.INVALID_ARGUMENT, f"get_into: out must be a numpy or CuPy array, got {type(out).__name__}")
    manifest = manifest_of(cassette, key)
    in_place = check_target(manifest, out, key)
    if in_place:
        dst = memoryview(out.reshape(-1).view(np.uint8))
        off = 0
        for data in _iter_verified(cassette, key, manifest):
            dst[off : off + len(data)] = data
            off += len(data)
        return out
    metrics.LAYOUT_MISMATCH.inc()
    staged = get(cassette, key)
    if isinstance(staged, bytes):
        out[...] = np.frombuffer(staged, dtype=out.dtype).reshape(out.shape)
    else:
        out[...] = staged
    return out


def check_target(manifest: dict, out: Any, key: ContentKey) -> bool:
    """Validate ``out`` against the manifest; True when it can be written in place."""
    if not getattr(out, "flags", None) or not out.flags.writeable:
        raise FabricError(StatusCode.INVALID_ARGUMENT, "get_into: out is read-only", key=key)
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


def _stream_artifact(cassette: Cassette, key: ContentKey) -> tuple[dict, Iterator[bytes]]:
    manifest = manifest_of(cassette, key)
    return manifest, _iter_verified(cassette, key, manifest)
