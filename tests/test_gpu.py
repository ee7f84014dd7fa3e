"""GPU materialization: the CPU-side contract everywhere; device tests where CuPy and a GPU exist."""

from __future__ import annotations

import numpy as np
import pytest

import fabric
import gpu
from fabric.errors import FabricError, StatusCode

HAVE_GPU = gpu.available()
needs_gpu = pytest.mark.skipif(not HAVE_GPU, reason="no CuPy or no CUDA device here: GPU tests run on a GPU machine (pip install evalfabric[gpu])")


@fabric.evaluator("t.gpu_arr", version="1")
def _arr(n: int):
    return np.arange(n, dtype=np.float32)


@pytest.fixture
def fab(tmp_path):
    f = fabric.open(tmp_path / "g")
    yield f
    f.close()


@pytest.mark.skipif(HAVE_GPU, reason="checks the no-GPU path")
def test_materialize_without_gpu_is_failed_precondition_naming_the_extra(fab):
    ref = fab.put(np.arange(10, dtype=np.float32))
    with pytest.raises(FabricError) as ei:
        gpu.materialize(ref, source=fab)
    assert ei.value.status_code is StatusCode.FAILED_PRECONDITION
    assert "evalfabric[gpu]" in ei.value.message
    # the CPU paths keep working
    np.testing.assert_array_equal(fab.get(ref.key), np.arange(10, dtype=np.float32))


@pytest.mark.skipif(HAVE_GPU, reason="checks the no-GPU path")
def test_realize_on_a_device_without_gpu_is_failed_precondition(tmp_path, monkeypatch):
    from fabric import api

    monkeypatch.setenv("FABRIC_HOME", str(tmp_path / "home"))
    old = api.set_default(None)
    try:
        with pytest.raises(FabricError) as ei:
            fabric.realize(fabric.Request("t.gpu_arr", {"n": 4}), device="cuda:0")
        assert ei.value.status_code is StatusCode.FAILED_PRECONDITION
        assert fabric.realize(fabric.Request("t.gpu_arr", {"n": 4})).source == "local"  # it was recorded on the CPU side
    finally:
        api.set_default(old).close()


def test_bad_device_text_is_invalid_argument():
    with pytest.raises(FabricError) as ei:
        gpu._parse_device("gpu-zero")
    assert ei.value.status_code is StatusCode.INVALID_ARGUMENT


@pytest.mark.gpu
@needs_gpu
def test_materialize_round_trips_bytes_on_the_device(fab):
    import cupy

    host = np.random.default_rng(1).standard_normal((513, 1031)).astype(np.float32)
    ref = fab.put(host, chunk_size=1 << 18)  # several chunks: exercises the double-buffered staging
    dev = gpu.materialize(ref, device="cuda:0", source=fab)
    assert isinstance(dev, cupy.ndarray) and dev.shape == host.shape and dev.dtype == host.dtype
    np.testing.assert_array_equal(cupy.asnumpy(dev), host)


@pytest.mark.gpu
@needs_gpu
def test_get_into_a_cupy_array_in_place_and_staged(fab):
    import cupy

    from prometheus_client import REGISTRY

    host = np.arange(4096, dtype=np.int64).reshape(64, 64)
    ref = fab.put(host, chunk_size=4096)
    out = cupy.empty((64, 64), dtype=np.int64)
    assert fab.get_into(ref.key, out) is out
    np.testing.assert_array_equal(cupy.asnumpy(out), host)
    before = REGISTRY.get_sample_value("fabric_layout_mismatch_total") or 0.0
    strided = cupy.empty((64, 64), dtype=np.int64, order="F")
    fab.get_into(ref.key, strided)
    np.testing.assert_array_equal(cupy.asnumpy(strided), host)
    assert REGISTRY.get_sample_value("fabric_layout_mismatch_total") == before + 1


@pytest.mark.gpu
@needs_gpu
def test_realize_returns_device_arrays(tmp_path, monkeypatch):
    import cupy

    from fabric import api

    monkeypatch.setenv("FABRIC_HOME", str(tmp_path / "home"))
    old = api.set_default(None)
    try:
        rep = fabric.realize(fabric.Request("t.gpu_arr", {"n": 8}), device="cuda:0")
        assert isinstance(rep.value, cupy.ndarray)
        np.testing.assert_array_equal(cupy.asnumpy(rep.value), np.arange(8, dtype=np.float32))
    finally:
        api.set_default(old).close()


@pytest.mark.skipif(HAVE_GPU, reason="checks the no-GPU path")
def test_every_fabric_takes_device_and_without_gpu_says_what_to_install(tmp_path):
    """Fabric.realize / arealize (embedded and through a node) accept device=: without
    CuPy it is FAILED_PRECONDITION naming the extra, and the reply was recorded anyway."""
    import trio

    from _nodes import SECRET, node

    with fabric.open(tmp_path / "e") as f:
        with pytest.raises(FabricError) as ei:
            f.realize(fabric.Request("t.gpu_arr", {"n": 3}), device="cuda:0")
        assert ei.value.status_code is StatusCode.FAILED_PRECONDITION and "evalfabric[gpu]" in ei.value.message
        with pytest.raises(FabricError):
            trio.run(lambda: f.arealize(fabric.Request("t.gpu_arr", {"n": 3}), device=0))
        assert f.realize(fabric.Request("t.gpu_arr", {"n": 3})).source == "local"
    with node(tmp_path) as (addr, proc, data):
        with fabric.open(addr, secret=SECRET) as r:
            req = fabric.Request("text.stats", {"text": "a b"}, version="1")
            with pytest.raises(FabricError) as ei:
                r.realize(req, device="cuda:0")
            assert ei.value.status_code is StatusCode.FAILED_PRECONDITION
            assert r.realize(req).source == "local"


def test_to_device_moves_every_numpy_array_and_nothing_else(monkeypatch):
    """gpu.to_device with a stand-in CuPy module: arrays anywhere in lists and dicts are
    converted, on the requested device; other values are kept as they are."""
    import sys
    import types

    seen = []

    class FakeDevice:
        def __init__(self, i):
            self.i = i

        def __enter__(self):
            seen.append(("device", self.i))

        def __exit__(self, *a):
            return False

    class DevArray:
        def __init__(self, a):
            self.host = a

    fake = types.SimpleNamespace(
        asarray=DevArray,
        cuda=types.SimpleNamespace(Device=FakeDevice, runtime=types.SimpleNamespace(getDeviceCount=lambda: 2),
                                   get_current_stream=lambda: types.SimpleNamespace(synchronize=lambda: None)),
    )
    monkeypatch.setitem(sys.modules, "cupy", fake)
    value = {"a": np.arange(3), "b": [np.ones(2), "text", 4], "c": {"d": np.zeros(1)}, "e": b"raw"}
    got = gpu.to_device(value, "cuda:1")
    assert seen == [("device", 1)]
    assert isinstance(got["a"], DevArray) and np.array_equal(got["a"].host, np.arange(3))
    assert isinstance(got["b"][0], DevArray) and got["b"][1:] == ["text", 4]
    assert isinstance(got["c"]["d"], DevArray) and got["e"] == b"raw"
    with pytest.raises(FabricError) as ei:
        gpu.to_device(value, "cuda:5")  # no such device
    assert ei.value.status_code is StatusCode.FAILED_PRECONDITION
