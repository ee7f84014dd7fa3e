"""Artifacts at their edges, embedded and through a real ``fabric node`` alike.

What a user hits with put / get / get_into beyond the common cases: targets that
cannot take raw bytes, ndarray subclasses, iterators yielding strided or mixed
buffers or failing midway, odd shapes, ArtifactRefs where keys are expected, a
progress callback that raises; and the GPU staging loop's promise that no async
copy outlives its pinned buffers (with a stand-in CuPy that runs copies lazily,
as a stream does, since this machine has no GPU).
"""

from __future__ import annotations

import ctypes
import sys
import types

import numpy as np
import pytest

import fabric
import gpu
from cassette.errors import FabricError, StatusCode
from cassette.keys import ContentKey
from fabric import artifacts, metrics
from _nodes import embedded_and_remote


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """``{"embedded": Fabric, "remote": RemoteFabric}``: a real node subprocess and an embedded fabric."""
    with embedded_and_remote(tmp_path_factory.mktemp("audit_artifacts")) as fabrics:
        yield fabrics


@pytest.fixture(params=["embedded", "remote"])
def fab(request, both):
    return both[request.param]


def _mismatches() -> float:
    return metrics.snapshot().get("fabric_layout_mismatch_total", 0.0)


def _error(fn, *args) -> FabricError:
    with pytest.raises(FabricError) as ei:
        fn(*args)
    return ei.value


# ------------------------------------------------------------------ get_into targets
def test_an_object_array_target_is_invalid_argument_and_left_untouched(fab):
    """A bytes artifact "fits any array of its size", but not one of object pointers: writing
    content bytes there would forge pointers.  It was a TypeError / ValueError (through a node
    an ExceptionGroup) from numpy; now INVALID_ARGUMENT before any chunk is used."""
    ref = fab.put(bytes(range(16)))
    for out in (np.array([1, "a"], dtype=object), np.array([None] * 4, dtype=object)[::2],
                np.zeros(1, dtype=[("n", "<i8"), ("o", object)])):
        snapshot = list(out.tolist())
        err = _error(fab.get_into, ref.key, out)
        assert err.status_code is StatusCode.INVALID_ARGUMENT and "object" in err.message, out.dtype
        assert err.key == ref.key
        assert list(out.tolist()) == snapshot
    assert fab.get(ref.key) == bytes(range(16))  # the fabric (and the node) still serve


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # np.matrix: the ndarray subclass users still meet
def test_an_ndarray_subclass_target_is_filled_in_place(fab):
    """np.matrix stays 2-D under reshape(-1); the in-place fill used to raise NotImplementedError."""
    arr = np.arange(12.0).reshape(3, 4)
    ref = fab.put(arr, chunk_size=32)
    out = np.asmatrix(np.zeros((3, 4)))
    before = _mismatches()
    assert fab.get_into(ref.key, out) is out
    assert np.array_equal(np.asarray(out), arr)
    assert _mismatches() == before  # in place, not staged


def test_zero_d_empty_and_huge_but_empty_shapes_round_trip(fab):
    for arr in (np.array(2.5, dtype=">f4"), np.zeros((0, 3), dtype=np.int16), np.empty((0, 10**12), dtype=np.float64)):
        ref = fab.put(arr)
        assert ref.shape == arr.shape and ref.size_bytes == arr.nbytes
        got = fab.get(ref.key)
        assert got.shape == arr.shape and got.dtype == arr.dtype.newbyteorder("<") and np.array_equal(got, arr)
        out = np.full(arr.shape, 7, dtype=arr.dtype.newbyteorder("<"))
        assert fab.get_into(ref.key, out) is out and np.array_equal(out, arr)


# ------------------------------------------------------------------------- put input
def test_iterator_items_may_be_strided_or_mixed_buffers(fab):
    """Bytes, bytearray and memoryviews of any format mix freely in an iterator, and a strided
    memoryview counts as its elements in order, as it does when put on its own (it was a
    TypeError from memoryview.cast)."""
    base = np.arange(40, dtype=np.uint8)
    items = [b"ab", bytearray(b"cd"), memoryview(base)[::3], memoryview(np.arange(3, dtype="<f4")),
             memoryview(np.arange(6, dtype="<u2").reshape(2, 3))]
    content = b"abcd" + base[::3].tobytes() + np.arange(3, dtype="<f4").tobytes() + np.arange(6, dtype="<u2").tobytes()
    ref = fab.put(iter(items), chunk_size=8)
    assert ref.key == fab.put(content, chunk_size=8).key and ref.size_bytes == len(content)
    assert fab.get(ref.key) == content


def test_a_generator_of_numpy_chunks_is_invalid_argument_naming_the_item(fab):
    err = _error(fab.put, (np.arange(3, dtype=np.uint8) for _ in range(2)))
    assert err.status_code is StatusCode.INVALID_ARGUMENT and "[0]" in err.message and "ndarray" in err.message


def test_an_iterator_that_raises_midway_makes_nothing_visible_and_a_second_put_completes(fab):
    data = bytes(range(256)) * 40  # 10240 bytes, 10 chunks of 1024

    class Broken(Exception):
        pass

    def pieces(fail_after: int | None):
        for i in range(0, len(data), 700):
            if fail_after is not None and i >= fail_after:
                raise Broken("source went away")
            yield data[i : i + 700]

    expected = artifacts.ChunkPlan(data, chunk_size=1024).key
    with pytest.raises(Broken):
        fab.put(pieces(fail_after=6000), chunk_size=1024)
    assert fab.holders(expected) == []
    assert _error(fab.get, expected).status_code is StatusCode.NOT_FOUND
    ref = fab.put(pieces(fail_after=None), chunk_size=1024)
    assert ref.key == expected and fab.get(ref.key) == data


# ------------------------------------------------------------------- keys and refs
def test_get_get_into_and_holders_take_an_artifact_ref(fab):
    """``fabric.get(ref)`` worked on the default fabric only; a Fabric object said INVALID_ARGUMENT."""
    arr = np.arange(6, dtype=np.int32)
    ref = fab.put(arr)
    assert np.array_equal(fab.get(ref), arr)
    out = np.zeros(6, dtype=np.int32)
    assert fab.get_into(ref, out) is out and np.array_equal(out, arr)
    assert fab.holders(ref) == fab.holders(ref.key) != []
    manifest, chunks = fab.artifact_stream(ref)
    assert b"".join(chunks) == arr.tobytes() and manifest["shape"] == [6]
    assert _error(fab.get, object()).status_code is StatusCode.INVALID_ARGUMENT


def test_request_blob_and_artifact_keys_of_one_put(fab):
    data = bytes(range(200)) * 10
    ref = fab.put(data, chunk_size=1000)
    blob = ContentKey.of("blob", data[:1000])
    assert fab.get(blob) == data[:1000]  # a chunk is a blob: get reads it alone
    assert _error(fab.get_into, blob, np.zeros(1000, np.uint8)).status_code is StatusCode.INVALID_ARGUMENT
    absent = ContentKey.for_request("t.audit.none", "1", {"x": 1})
    assert _error(fab.get, absent).status_code is StatusCode.NOT_FOUND
    assert _error(fab.get_into, absent, np.zeros(2000, np.uint8)).status_code is StatusCode.INVALID_ARGUMENT
    assert fab.get(ref.key) == data


def test_a_progress_callback_error_reaches_the_caller_as_itself(both):
    """``get(progress=cb)`` raises cb's own exception; through a node it came wrapped in trio's
    ExceptionGroup (and an embedded Fabric.get took no ``progress``)."""

    class Stop(Exception):
        pass

    def cb(n):
        raise Stop(f"seen {n}")

    data = bytes(range(256)) * 64
    ref = both["embedded"].put(data, chunk_size=4096)
    assert both["remote"].put(data, chunk_size=4096) == ref
    for name in ("remote", "embedded"):
        with pytest.raises(Stop, match="seen 4096"):
            both[name].get(ref.key, progress=cb)
    assert both["remote"].get(ref.key) == data  # the client goes on


# ----------------------------------------------------------------------------- gpu
class _LazyStream:
    """A CUDA stream as seen from the host: queued work runs in order, only when waited for."""

    def __init__(self, non_blocking: bool = False) -> None:
        self.queue: list = []
        self.issued = self.completed = 0
        self.ptr = id(self)
        _LazyCupy.streams[self.ptr] = self

    def push(self, work) -> None:
        self.queue.append(work)
        self.issued += 1

    def run_until(self, target: int) -> None:
        while self.completed < target:
            self.queue.pop(0)()
            self.completed += 1

    def synchronize(self) -> None:
        self.run_until(self.issued)

    def record(self) -> "_LazyEvent":
        ev = _LazyEvent()
        ev.record(self)
        return ev

    def wait_event(self, ev: "_LazyEvent") -> None:  # later work here runs after ev's stream got to ev
        self.push(ev.synchronize)


class _LazyEvent:
    def __init__(self) -> None:
        self.stream: _LazyStream | None = None
        self.target = 0

    def record(self, stream: _LazyStream) -> None:
        self.stream, self.target = stream, stream.issued

    def synchronize(self) -> None:  # the work queued before the record has run
        assert self.stream is not None
        self.stream.run_until(self.target)


class _HostBacked:
    """A "device" array kept in host memory (``data.ptr`` its address)."""

    def __init__(self, shape, dtype, order="C") -> None:
        self.host = np.zeros(shape, dtype, order=order)
        self.shape, self.dtype, self.nbytes, self.flags = self.host.shape, self.host.dtype, self.host.nbytes, self.host.flags
        self.data = types.SimpleNamespace(ptr=self.host.ctypes.data)
        self.device = types.SimpleNamespace(id=0)
        self.__cuda_array_interface__ = {"shape": self.shape, "typestr": self.dtype.str, "version": 3}


class _LazyCupy:
    """Just the CuPy surface gpu/ uses, with the one property that matters here: an async
    copy reads its pinned source when the stream gets to it, not when it is queued."""

    streams: dict[int, _LazyStream] = {}

    def __init__(self) -> None:
        runtime = types.SimpleNamespace(getDeviceCount=lambda: 1, memcpyHostToDevice=1, memcpyAsync=self._memcpy_async)
        self.current = _LazyStream()  # the null stream, where cupy.zeros & co. queue their kernels
        self.cuda = types.SimpleNamespace(runtime=runtime, Stream=_LazyStream, Event=_LazyEvent, Device=lambda i: _Nothing(),
                                          alloc_pinned_memory=lambda n: bytearray(n), get_current_stream=lambda: self.current)
        self.empty = lambda shape, dtype: _HostBacked(shape, dtype)
        self.ndarray = _HostBacked

    @staticmethod
    def _memcpy_async(dst: int, src: int, n: int, kind: int, stream: int) -> None:
        _LazyCupy.streams[stream].push(lambda: ctypes.memmove(dst, src, n))

    @classmethod
    def pending(cls) -> int:
        return sum(len(s.queue) for s in cls.streams.values())


class _Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.fixture
def lazy_cupy(monkeypatch):
    _LazyCupy.streams.clear()
    fake = _LazyCupy()
    monkeypatch.setitem(sys.modules, "cupy", fake)
    yield fake
    _LazyCupy.streams.clear()


def test_gpu_staging_reuses_a_pinned_buffer_only_after_its_copy_ran(tmp_path, lazy_cupy):
    """Many chunks through two pinned buffers: every chunk lands intact (a buffer refilled
    before its queued copy ran would land the next chunk's bytes instead)."""
    host = np.random.default_rng(3).integers(0, 2**31, size=(37, 53)).astype("<i8")
    with fabric.open(tmp_path / "g") as f:
        ref = f.put(host, chunk_size=1000)
        assert ref.chunks > 4
        dev = gpu.materialize(ref, source=f)
        assert np.array_equal(dev.host, host) and lazy_cupy.pending() == 0
        out = _HostBacked((37, 53), "<i8")
        assert f.get_into(ref.key, out) is out and np.array_equal(out.host, host)


def test_gpu_staging_waits_for_queued_copies_when_a_chunk_fails(tmp_path, lazy_cupy):
    """A source whose content fails its digest (DATA_LOSS after the last chunk was queued):
    materialize raises it, and only once no queued copy still reads the pinned buffers or
    writes the dropped device array (CuPy's pinned pool hands a released buffer straight to
    the next allocation)."""
    data = bytes(range(256)) * 20
    with fabric.open(tmp_path / "g") as f:
        ref = f.put(data, chunk_size=1024)
        manifest, _ = f.artifact_stream(ref.key)
    bad = dict(manifest, digest=bytes(32))  # every chunk matches its key; the whole does not

    class Source:
        def artifact_stream(self, key):
            chunks = [data[i : i + 1024] for i in range(0, len(data), 1024)]
            return bad, artifacts.verified_chunks(key, bad, iter(chunks))

    with pytest.raises(FabricError) as ei:
        gpu.materialize(ref, source=Source())
    assert ei.value.status_code is StatusCode.DATA_LOSS
    assert lazy_cupy.pending() == 0


def test_gpu_copies_land_after_work_already_queued_on_the_current_stream(tmp_path, lazy_cupy):
    """``out = cupy.zeros(...)`` queues its fill on the current stream and returns; get_into's
    copies run on their own non-blocking stream, which is not ordered after it, so without
    waiting for it the late fill overwrote the artifact with zeros."""
    host = np.arange(3000, dtype="<i4")
    with fabric.open(tmp_path / "g") as f:
        ref = f.put(host, chunk_size=1000)
        out = _HostBacked((3000,), "<i4")
        lazy_cupy.current.push(lambda: out.host.fill(0))  # cupy.zeros: the fill is still queued
        assert f.get_into(ref.key, out) is out
        lazy_cupy.current.synchronize()  # what any later read of out waits for
        assert np.array_equal(out.host, host)
