"""gpu: materialize artifacts straight into CuPy arrays (optional extra ``evalfabric[gpu]``).

Chunks are copied through two pinned host staging buffers into the device
array with async copies on one CUDA stream, so the verification/copy of chunk
``i+1`` on the host overlaps the host-to-device copy of chunk ``i``.

This layer imports only :mod:`cassette`.  Where chunks come from is injected:
``fabric`` registers its default source with :func:`set_default_source` (a
callable ``key -> (manifest, iterator of verified chunk bytes)``), so
``gpu.materialize(key)`` works on the default fabric, and any fabric object
with an ``artifact_stream(key)`` method can be passed as ``source=``.

Without CuPy or a CUDA device every call raises
``FabricError(FAILED_PRECONDITION, "... install evalfabric[gpu] ...")``; every
CPU path of evalfabric keeps working.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import numpy as np

from cassette.errors import FabricError, StatusCode
from cassette.keys import ContentKey

__all__ = ["materialize", "materialize_into", "to_device", "to_host", "queued_work", "available", "set_default_source", "require_cupy"]

Stream = Callable[[], tuple[dict, Iterator[bytes]]]
#: The numpy dtype characters a CuPy array can have (``all_type_chars`` in CuPy's ``_core/_dtype.pyx``).
CUPY_TYPE_CHARS = "?bhilqBHILQefdFD"
_default_source: Callable[[ContentKey], tuple[dict, Iterator[bytes]]] | None = None


def set_default_source(fn: Callable[[ContentKey], tuple[dict, Iterator[bytes]]] | None) -> None:
    """Register where :func:`materialize` reads artifacts from when no ``source`` is given."""
    global _default_source
    _default_source = fn


def require_cupy(device: int = 0) -> Any:
    """The ``cupy`` module with ``device`` usable, or FAILED_PRECONDITION saying what to install."""
    try:
        import cupy  # type: ignore[import-not-found]
    except ImportError:
        raise FabricError(
            StatusCode.FAILED_PRECONDITION,
            "GPU materialization needs CuPy: install evalfabric[gpu] (cupy-cuda12x) on a machine with a CUDA GPU",
        ) from None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001 - CUDA runtime errors come in many types
        raise FabricError(StatusCode.FAILED_PRECONDITION, f"CuPy is installed but no CUDA device is usable ({exc}); install evalfabric[gpu] on a GPU machine") from None
    if not 0 <= device < count:
        raise FabricError(StatusCode.FAILED_PRECONDITION, f"CUDA device {device} does not exist ({count} visible)")
    return cupy


def available() -> bool:
    """Whether CuPy and at least one CUDA device are usable here."""
    try:
        require_cupy(0)
        return True
    except FabricError:
        return False


def _parse_device(device: Any) -> int:
    if isinstance(device, (int, np.integer)) and not isinstance(device, (bool, np.bool_)):
        return int(device)
    if isinstance(device, str) and device.startswith("cuda:") and device[5:].isdigit():
        return int(device[5:])
    if device == "cuda":
        return 0
    raise FabricError(StatusCode.INVALID_ARGUMENT, f"device must be an int or 'cuda:N', got {device!r}")


def _device_dtype(dtype: np.dtype, op: str) -> np.dtype:
    """``dtype`` if CuPy arrays can have it; INVALID_ARGUMENT naming it otherwise (numpy's
    float128 / complex256 are storable, but CuPy has no such arrays)."""
    if dtype.char not in CUPY_TYPE_CHARS:
        raise FabricError(StatusCode.INVALID_ARGUMENT, f"{op}: CuPy has no {dtype} arrays (bool, int, uint, float16-64, complex64/128 only)")
    return dtype


def _cupy_of(out: Any) -> Any:
    """The ``cupy`` module, to fill ``out``: FAILED_PRECONDITION without it, INVALID_ARGUMENT
    unless ``out`` is a ``cupy.ndarray`` (another library's device array included)."""
    cupy = require_cupy()
    if not isinstance(out, cupy.ndarray):
        raise FabricError(StatusCode.INVALID_ARGUMENT, f"get_into: out must be a numpy or CuPy array, got {type(out).__name__} "
                          "(cupy.asarray(out) is a CuPy view of a device array that get_into fills in place)")
    return cupy


def to_device(value: Any, device: Any = 0) -> Any:
    """``value`` with every numpy array in it (also inside lists and dicts) copied to a
    CuPy array on ``device`` (``0`` or ``"cuda:0"``); other values as they are.
    FAILED_PRECONDITION without CuPy or that device, INVALID_ARGUMENT for an array
    dtype CuPy lacks (float128).  The copies have finished when it returns, so the
    arrays are ready on any stream and thread (``cupy.asarray`` queues them on this
    thread's current stream, and a node client converts on its own thread)."""
    dev = _parse_device(device)
    cupy = require_cupy(dev)

    def conv(v: Any) -> Any:
        if isinstance(v, np.ndarray):
            _device_dtype(v.dtype, "to_device")
            return cupy.asarray(v)
        if isinstance(v, list):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    with cupy.cuda.Device(dev):
        moved = conv(value)
        cupy.cuda.get_current_stream().synchronize()
    return moved


def to_host(value: Any) -> np.ndarray:
    """A device array (CuPy's, or any other with ``__cuda_array_interface__``) copied to a
    numpy array (``cupy.asnumpy``); FAILED_PRECONDITION without CuPy."""
    return require_cupy().asnumpy(value)


def queued_work(out: Any) -> Any:
    """An event after the work queued so far on this thread's current stream of ``out``'s
    device, for a fill of ``out`` that runs on another thread (CuPy's current stream is per
    thread): :func:`materialize_into` ``after=``.  None where ``out`` is not a CuPy array or
    CuPy is not usable (the fill then raises why)."""
    try:
        cupy = _cupy_of(out)
    except FabricError:
        return None
    with cupy.cuda.Device(out.device.id):
        return cupy.cuda.get_current_stream().record()


def materialize(key_or_ref: Any, device: Any = 0, *, source: Any = None) -> Any:
    """The artifact as a CuPy array on ``device`` (``0`` or ``"cuda:0"``).

    Arrays come back with their stored dtype and shape; byte artifacts as a 1-D
    ``uint8`` array.  Every chunk is verified before it is copied, and every copy has
    finished when it returns.  INVALID_ARGUMENT for a dtype CuPy lacks (float128).
    """
    dev = _parse_device(device)
    cupy = require_cupy(dev)
    key = ContentKey.parse(getattr(key_or_ref, "key", key_or_ref))
    stream = _stream_for(key, source)
    manifest, chunks = stream()
    with _closing(chunks):
        dtype = _device_dtype(np.dtype(manifest["dtype"] or "|u1"), "materialize")
        shape = tuple(manifest["shape"]) if manifest["shape"] is not None else (manifest["size"],)
        with cupy.cuda.Device(dev):
            out = cupy.empty(shape, dtype=dtype)
            _copy_chunks(cupy, manifest, chunks, out)
    return out


@contextlib.contextmanager
def _closing(chunks: Any) -> Iterator[None]:
    """Close a source's chunk iterator on the way out, when it can be closed (a remote
    source's stream then ends on its node at once, not when the iterator is collected)."""
    try:
        yield
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()


def materialize_into(stream: Stream, out: Any, *, after: Any = None) -> Any:
    """Fill a preallocated CuPy array from ``stream()``; staged copy if ``out`` is not C-contiguous.

    The copies start after the work queued on this thread's current stream, and after
    the event ``after`` (:func:`queued_work`, recorded on the caller's thread when this
    runs on another); ``out`` is complete when it returns.  INVALID_ARGUMENT for a
    target that is not a ``cupy.ndarray``.
    """
    cupy = _cupy_of(out)
    manifest, chunks = stream()
    with _closing(chunks):
        return _fill(cupy, manifest, chunks, out, after)


def _fill(cupy: Any, manifest: dict, chunks: Iterator[bytes], out: Any, after: Any = None) -> Any:
    want_dtype = np.dtype(manifest["dtype"] or "|u1")
    size = manifest["size"]
    if out.nbytes != size:
        raise FabricError(StatusCode.INVALID_ARGUMENT, f"get_into: out has {out.nbytes} bytes, artifact has {size}")
    if manifest["dtype"] is not None:
        if np.dtype(out.dtype) != want_dtype or tuple(out.shape) != tuple(manifest["shape"]):
            raise FabricError(StatusCode.INVALID_ARGUMENT, f"get_into: out {out.dtype}{tuple(out.shape)} does not match artifact {want_dtype}{tuple(manifest['shape'])}")
    with cupy.cuda.Device(out.device.id):
        if out.flags.c_contiguous:
            _copy_chunks(cupy, manifest, chunks, out, after)
            return out
        _count_layout_mismatch()
        staged = cupy.empty(out.shape, dtype=out.dtype)
        _copy_chunks(cupy, manifest, chunks, staged, after)
        out[...] = staged  # a kernel on this thread's current stream: wait for it, as for the copies
        cupy.cuda.get_current_stream().synchronize()
    return out


def _count_layout_mismatch() -> None:
    try:
        from prometheus_client import REGISTRY

        REGISTRY._names_to_collectors["fabric_layout_mismatch_total"].inc()  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - metrics are best effort at this layer
        return


def _copy_chunks(cupy: Any, manifest: dict, chunks: Iterator[bytes], out: Any, after: Any = None) -> None:
    """Double-buffered pinned staging: host fill of buffer i%2 overlaps the H2D copy of the other.

    The copy stream first waits for the work already queued on the current stream (and
    for the event ``after``, if any): a non-blocking stream is not ordered after it, and
    that work may still be writing ``out`` (``cupy.zeros`` fills it asynchronously) or
    reading memory the pool just gave ``out``.  The chunks must fill ``out`` exactly
    (DATA_LOSS before a copy past its end, or when they fall short: a ``source=`` need
    not be a fabric that verifies them).
    Returns (or raises: a chunk that fails verification, a broken source) only once every
    copy it queued has finished: CuPy's pinned pool hands a released buffer to the next
    ``alloc_pinned_memory`` at once, and ``out`` (allocated on another stream) may be
    freed and reused, so neither may be let go while a copy still reads or writes it.
    """
    sizes = manifest["sizes"]
    cap = max(sizes) if sizes else 0
    if cap == 0:
        return
    stream = cupy.cuda.Stream(non_blocking=True)
    stream.wait_event(cupy.cuda.get_current_stream().record())
    if after is not None:
        stream.wait_event(after)
    pinned = [cupy.cuda.alloc_pinned_memory(cap) for _ in range(2)]
    hosts = [np.frombuffer(p, dtype=np.uint8, count=cap) for p in pinned]
    done = [None, None]
    dst = out.data.ptr
    off = 0
    try:
        for i, data in enumerate(chunks):
            slot = i % 2
            if done[slot] is not None:
                done[slot].synchronize()  # the copy that last used this buffer has finished
            n = len(data)
            if n > cap or off + n > out.nbytes:
                raise FabricError(StatusCode.DATA_LOSS, f"the source gave a chunk past the manifest's sizes ({n} bytes at offset {off} of {out.nbytes}, largest {cap})")
            hosts[slot][:n] = np.frombuffer(data, dtype=np.uint8)
            cupy.cuda.runtime.memcpyAsync(dst + off, hosts[slot].ctypes.data, n, cupy.cuda.runtime.memcpyHostToDevice, stream.ptr)
            ev = cupy.cuda.Event()
            ev.record(stream)
            done[slot] = ev
            off += n
        if off != out.nbytes:
            raise FabricError(StatusCode.DATA_LOSS, f"the source's chunks hold {off} of the {out.nbytes} bytes of the artifact")
    finally:
        stream.synchronize()  # on success and on error alike: nothing queued outlives the buffers


def _stream_for(key: ContentKey, source: Any) -> Stream:
    if source is not None:
        fn = getattr(source, "artifact_stream", None)
        if fn is None:
            raise FabricError(StatusCode.INVALID_ARGUMENT, f"source {type(source).__name__} has no artifact_stream(key)")
        return lambda: fn(key)
    if _default_source is None:
        raise FabricError(StatusCode.FAILED_PRECONDITION, "no artifact source: import fabric (it registers the default) or pass source=")
    src = _default_source
    return lambda: src(key)
