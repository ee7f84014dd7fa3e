"""gpu/ against CuPy's documented behaviour, where this machine (no GPU) can check it.

The stand-in CuPy of tests/test_audit_artifacts.py runs queued device work only when it
is waited for, as a stream does; here its current stream is also per thread, as CuPy's
is (``cupy.cuda.get_current_stream``: thread-local, per device).  That is what a node
client's ``get_into`` meets: its copies run on a trio worker thread, not the caller's.
"""

from __future__ import annotations

import threading
import types

import numpy as np
import pytest

import fabric
import gpu
from cassette.errors import FabricError, StatusCode
from cassette.keys import ContentKey
from _nodes import embedded_and_remote
from test_audit_artifacts import _HostBacked, _LazyCupy, _LazyStream


class _ThreadCupy(_LazyCupy):
    """The lazy stand-in with one current stream per thread (``current``: the test thread's),
    and ``cupy.asarray`` queuing its host-to-device copy there, as CuPy's does."""

    def __init__(self) -> None:
        super().__init__()
        local = threading.local()

        def current() -> _LazyStream:
            if not hasattr(local, "stream"):
                local.stream = _LazyStream()
            return local.stream

        self.cuda.get_current_stream = current
        self.current = current()
        self.asarray = self._asarray
        self.asnumpy = lambda a: np.array(a.host)

    def _asarray(self, a: np.ndarray) -> _HostBacked:
        dev = _HostBacked(a.shape, a.dtype)
        self.cuda.get_current_stream().push(lambda: dev.host.__setitem__(..., a))
        return dev


class _Strided(_HostBacked):
    """A Fortran-order device array: ``out[...] = x`` is a kernel queued on the current stream."""

    def __init__(self, shape, dtype, cupy: _ThreadCupy) -> None:
        super().__init__(shape, dtype, order="F")
        self._cupy = cupy

    def __setitem__(self, index, value: _HostBacked) -> None:
        self._cupy.cuda.get_current_stream().push(lambda: self.host.__setitem__(index, value.host))


class _Foreign:
    """Another library's device array (a torch CUDA tensor, a numba DeviceNDArray): it has
    ``__cuda_array_interface__`` but neither ``.get()`` nor CuPy's ``.device`` / ``.data``."""

    def __init__(self, shape, dtype) -> None:
        self.shape, self.dtype = shape, np.dtype(dtype)
        self.__cuda_array_interface__ = {"shape": shape, "typestr": self.dtype.str, "data": (0, False), "version": 3}


@pytest.fixture
def cupy(monkeypatch):
    _LazyCupy.streams.clear()
    fake = _ThreadCupy()
    monkeypatch.setitem(__import__("sys").modules, "cupy", fake)
    yield fake
    _LazyCupy.streams.clear()


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """``{"embedded": Fabric, "remote": RemoteFabric}`` (a real node subprocess)."""
    with embedded_and_remote(tmp_path_factory.mktemp("audit_gpu3")) as fabrics:
        yield fabrics


@pytest.fixture(params=["embedded", "remote"])
def fab(request, both):
    return both[request.param]


# ------------------------------------------------------------ stream order across threads
def test_get_into_copies_land_after_work_the_callers_thread_queued(fab, cupy):
    """``out = cupy.zeros(...)`` on the caller's current stream, then get_into: a node client
    fills ``out`` on a worker thread, whose current stream is another one, so the copies
    waited for nothing and the caller's late fill overwrote the artifact with zeros."""
    host = np.arange(3000, dtype="<i4")
    ref = fab.put(host, chunk_size=1000)
    out = _HostBacked((3000,), "<i4")
    cupy.current.push(lambda: out.host.fill(0))  # the fill is still queued on this thread's stream
    assert fab.get_into(ref.key, out) is out
    cupy.current.synchronize()  # what this thread's next kernel on out waits for
    assert np.array_equal(out.host, host)


def test_a_staged_get_into_is_complete_when_it_returns(fab, cupy):
    """A Fortran-order target: the final ``out[...] = staged`` kernel ran on the filling thread's
    current stream and nobody waited for it (through a node: never, on this thread)."""
    host = np.arange(600, dtype="<f8").reshape(20, 30)
    ref = fab.put(host, chunk_size=1000)
    out = _Strided((20, 30), "<f8", cupy)
    assert fab.get_into(ref.key, out) is out
    assert np.array_equal(out.host, host)


def test_to_device_arrays_are_complete_when_it_returns(cupy):
    """``cupy.asarray`` queues its copy on the current stream of the converting thread; a node
    client's ``realize(device=)`` converts on its portal thread, so the caller's streams were
    not ordered after it."""
    value = {"a": np.arange(5, dtype=np.int64), "b": [np.ones((2, 2), dtype=np.float32)]}
    got = gpu.to_device(value, 0)
    assert np.array_equal(got["a"].host, value["a"]) and np.array_equal(got["b"][0].host, value["b"][0])
    assert cupy.pending() == 0


# ------------------------------------------------------------ what is not a CuPy array
def test_another_librarys_device_array_as_get_into_target_is_invalid_argument(fab, cupy):
    """It was an AttributeError (``out.device.id``) from gpu/."""
    ref = fab.put(np.arange(6, dtype=np.float32))
    with pytest.raises(FabricError) as ei:
        fab.get_into(ref.key, _Foreign((6,), np.float32))
    assert ei.value.status_code is StatusCode.INVALID_ARGUMENT and "cupy.asarray(out)" in ei.value.message
    assert np.array_equal(fab.get(ref.key), np.arange(6, dtype=np.float32))  # the fabric still serves


@pytest.mark.skipif(gpu.available(), reason="checks the no-CuPy path")
def test_put_of_another_librarys_device_array_without_cupy_names_the_extra(tmp_path):
    """put read a device array with ``.get()``, which only CuPy's has (AttributeError)."""
    with fabric.open(tmp_path / "p") as f:
        with pytest.raises(FabricError) as ei:
            f.put(_Foreign((3,), np.float32))
    assert ei.value.status_code is StatusCode.FAILED_PRECONDITION and "evalfabric[gpu]" in ei.value.message


def test_put_of_another_librarys_device_array_copies_it_with_asnumpy(tmp_path, cupy):
    host = np.arange(12, dtype="<i8").reshape(3, 4)
    foreign = _Foreign((3, 4), host.dtype)
    foreign.host = host  # what the stand-in's asnumpy reads, as CuPy's reads the device memory
    with fabric.open(tmp_path / "p") as f:
        assert f.put(foreign) == f.put(host)


# ------------------------------------------------------------ dtypes and devices CuPy lacks
@pytest.mark.skipif(np.dtype(np.longdouble).itemsize != 16, reason="needs numpy's 16-byte float128")
def test_a_dtype_cupy_has_no_arrays_of_is_invalid_argument(tmp_path, cupy):
    """numpy's float128 is storable, but CuPy has no such arrays: ``cupy.empty`` makes one
    that no kernel takes, and ``cupy.asarray`` raises a raw ValueError."""
    big = np.arange(4, dtype=np.longdouble)
    with fabric.open(tmp_path / "g") as f:
        ref = f.put(big)
        for call in (lambda: gpu.materialize(ref, source=f), lambda: gpu.to_device({"x": big})):
            with pytest.raises(FabricError) as ei:
                call()
            assert ei.value.status_code is StatusCode.INVALID_ARGUMENT and "float128" in ei.value.message
        assert np.array_equal(f.get(ref.key), big)


def test_device_takes_numpy_integers_but_not_booleans():
    assert gpu._parse_device(np.int64(1)) == 1 and gpu._parse_device("cuda:2") == 2
    for bad in (True, np.bool_(False), 1.0, "cuda:-1"):
        with pytest.raises(FabricError) as ei:
            gpu._parse_device(bad)
        assert ei.value.status_code is StatusCode.INVALID_ARGUMENT


# ------------------------------------------------------------ a source that lies
def _lying_source(chunks: list[bytes], size: int):
    manifest = {"chunks": [ContentKey.of("blob", b"%d" % i) for i in range(2)], "sizes": [size // 2] * 2,
                "size": size, "digest": bytes(32), "dtype": None, "shape": None}
    return lambda: (manifest, iter(chunks))


def test_a_source_whose_chunks_overrun_or_fall_short_of_the_target_is_data_loss(cupy):
    """``source=`` is any object with ``artifact_stream``: one yielding more bytes than its
    manifest wrote past the device array (here into a guard region), one yielding fewer
    left part of it unwritten without a word."""
    guarded = np.zeros(32, np.uint8)
    out = _HostBacked((16,), np.uint8)
    out.host = guarded[:16]
    out.data = types.SimpleNamespace(ptr=out.host.ctypes.data)
    for chunks, says in (([b"a" * 8, b"b" * 8, b"c" * 8], "past"), ([b"a" * 8], "8 of the 16")):
        with pytest.raises(FabricError) as ei:
            gpu.materialize_into(_lying_source(chunks, 16), out)
        assert ei.value.status_code is StatusCode.DATA_LOSS and says in ei.value.message
        assert not guarded[16:].any() and cupy.pending() == 0


# ------------------------------------------------------------ on a real GPU (skipped elsewhere)
HAVE_GPU = gpu.available()
needs_gpu = pytest.mark.skipif(not HAVE_GPU, reason="no CuPy or no CUDA device here: GPU tests run on a GPU machine (pip install evalfabric[gpu])")
N_GPUS = __import__("cupy").cuda.runtime.getDeviceCount() if HAVE_GPU else 0


@pytest.mark.gpu
@needs_gpu
def test_gpu_odd_shapes_and_dtypes_round_trip(tmp_path):
    import cupy as cp

    arrays = [np.array(2.5, dtype=">f4"), np.zeros((0, 3), dtype=np.int16), np.array([True, False, True]),
              np.arange(7, dtype=np.float16), (np.arange(5) + 1j).astype(np.complex64), np.arange(10, dtype=">i8")]
    with fabric.open(tmp_path / "g") as f:
        for arr in arrays:
            dev = gpu.materialize(f.put(arr, chunk_size=8), source=f)
            assert isinstance(dev, cp.ndarray) and dev.shape == arr.shape and dev.dtype == arr.dtype.newbyteorder("<")
            assert np.array_equal(cp.asnumpy(dev), arr), arr.dtype
        raw = bytes(range(256)) * 3
        dev = gpu.materialize(f.put(raw, chunk_size=100), source=f)
        assert dev.dtype == np.uint8 and cp.asnumpy(dev).tobytes() == raw


@pytest.mark.gpu
@needs_gpu
def test_gpu_a_device_that_does_not_exist_is_failed_precondition(tmp_path):
    import cupy as cp

    missing = cp.cuda.runtime.getDeviceCount()
    with fabric.open(tmp_path / "g") as f:
        ref = f.put(np.arange(4, dtype=np.float32))
        for call in (lambda: gpu.materialize(ref, device=missing, source=f), lambda: gpu.to_device(np.zeros(2), f"cuda:{missing}")):
            with pytest.raises(FabricError) as ei:
                call()
            assert ei.value.status_code is StatusCode.FAILED_PRECONDITION and str(missing) in ei.value.message


@pytest.mark.gpu
@needs_gpu
def test_gpu_get_into_through_a_node_after_work_on_a_non_blocking_stream(both):
    """The real version of the stand-in test above: the caller's zero-fill on its own
    non-blocking stream, then a node client's get_into (its copies on a worker thread)."""
    import cupy as cp

    host = np.arange(1 << 20, dtype=np.float32)
    for name in ("embedded", "remote"):
        ref = both[name].put(host, chunk_size=1 << 18)
        s = cp.cuda.Stream(non_blocking=True)
        with s:
            out = cp.zeros(host.shape, dtype=host.dtype)
            assert both[name].get_into(ref.key, out) is out
            same = cp.array_equal(out, cp.asarray(host))  # kernels on s, after the fill
        s.synchronize()
        assert bool(same) and np.array_equal(cp.asnumpy(out), host), name
        strided = cp.zeros((1 << 10, 1 << 10), dtype=np.float32, order="F")
        both[name].get_into(both[name].put(host.reshape(1 << 10, 1 << 10), chunk_size=1 << 18).key, strided)
        assert np.array_equal(cp.asnumpy(strided), host.reshape(1 << 10, 1 << 10)), name


@pytest.mark.gpu
@pytest.mark.skipif(N_GPUS < 2, reason=f"needs two CUDA devices ({N_GPUS} usable here)")
def test_gpu_a_target_on_device_1_while_device_0_is_current(tmp_path):
    import cupy as cp

    host = np.arange(5000, dtype=np.int32)
    with fabric.open(tmp_path / "g") as f:
        ref = f.put(host, chunk_size=4096)
        with cp.cuda.Device(0):
            dev = gpu.materialize(ref, device=1, source=f)
            assert dev.device.id == 1 and np.array_equal(cp.asnumpy(dev), host)
            with cp.cuda.Device(1):
                out = cp.empty_like(dev)
            assert f.get_into(ref.key, out) is out and np.array_equal(cp.asnumpy(out), host)
            assert cp.cuda.runtime.getDevice() == 0
