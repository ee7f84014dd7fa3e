"""Artifacts: chunked, content-addressed put/get/get_into on real cassettes."""

from __future__ import annotations

import io
import math
import os

import blake3
import lmdb
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis.extra import numpy as hnp
from prometheus_client import REGISTRY

import fabric
from cassette import codec
from cassette.errors import FabricError, StatusCode
from cassette.keys import ContentKey
from cassette.store import Cassette
from conftest import flip_in_file
from fabric import artifacts
from fabric.artifacts import ArtifactRef, ArtifactSession


@pytest.fixture
def fab(tmp_path):
    f = fabric.open(tmp_path / "node")
    yield f
    f.close()


def _mismatches() -> float:
    return REGISTRY.get_sample_value("fabric_layout_mismatch_total") or 0.0


def _blobs(cas: Cassette) -> int:
    return cas.stats()["blobs"]


# ------------------------------------------------------------------ put / get
@pytest.mark.parametrize("size", [0, 1, 999, 1000, 1001, 3007])
def test_bytes_round_trip(fab, size):
    data = os.urandom(size)
    ref = fab.put(data, chunk_size=1000)
    assert isinstance(ref, ArtifactRef)
    assert ref.key.kind == "artifact"
    assert ref.size_bytes == size
    assert ref.digest == blake3.blake3(data).hexdigest()
    assert ref.chunks == max(1, math.ceil(size / 1000))
    assert (ref.dtype, ref.shape) == (None, None)
    assert ref.uri == f"fabric://{ref.key}"
    got = fab.get(ref.key)
    assert type(got) is bytes and got == data
    assert fab.get(str(ref.key)) == data  # text form works too
    assert fab.cassette.verify().ok


def _peak_ratio(fn, size: int):
    """``fn()`` and the peak of Python memory it took, as a multiple of ``size``."""
    import tracemalloc

    tracemalloc.start()
    try:
        got = fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return got, peak / size


def test_get_of_a_bytes_artifact_holds_its_content_once(fab):
    data = os.urandom(24 << 20)
    ref = fab.put(data)
    got, peak = _peak_ratio(lambda: fab.get(ref.key), len(data))
    assert type(got) is bytes and got == data
    assert peak < 1.5  # 2.0 when the assembled bytearray was copied into bytes at the end


def test_assemble_refuses_chunks_that_do_not_add_up_to_the_manifest(fab):
    for dtype, chunks in ((None, [b"ab", b"c"]), (None, [b"ab", b"cde"]), ("|u1", [b"abc"])):
        manifest = {"size": 4, "dtype": dtype, "shape": None if dtype is None else [4]}
        with pytest.raises(FabricError) as ei:
            artifacts.assemble(manifest, iter(chunks))
        assert ei.value.status_code is StatusCode.DATA_LOSS and "4 bytes" in str(ei.value)


def test_bytearray_and_memoryview_round_trip(fab):
    data = os.urandom(2500)
    a = fab.put(bytearray(data), chunk_size=1000)
    b = fab.put(memoryview(data), chunk_size=1000)
    assert a.key == b.key == fab.put(data, chunk_size=1000).key
    assert fab.get(a.key) == data


class _DeviceArray:
    """What put needs of a CuPy array, duck-typed: the CUDA array interface, iteration, ``get()``."""

    def __init__(self, host: np.ndarray) -> None:
        self._host = host
        self.__cuda_array_interface__ = {"shape": host.shape, "typestr": host.dtype.str, "version": 3}

    def __iter__(self):
        return iter(self._host)

    def get(self) -> np.ndarray:
        return self._host


def test_a_device_array_is_stored_as_its_host_copy_not_as_an_iterator(fab):
    host = np.arange(12, dtype=np.float32).reshape(3, 4)
    ref = fab.put(_DeviceArray(host), chunk_size=16)
    assert ref.key == fab.put(host, chunk_size=16).key and (ref.dtype, ref.shape) == ("<f4", (3, 4))
    np.testing.assert_array_equal(fab.get(ref.key), host)


@pytest.mark.parametrize(
    "dtype", ["|b1", "|u1", "|i1", "<i2", ">i2", "<u4", ">i4", "<i8", "<f4", ">f4", "<f8", ">f8", "<c8", ">c16"]
)
def test_numpy_round_trip_comes_back_little_endian(fab, dtype):
    rng = np.random.default_rng(5)
    dt = np.dtype(dtype)
    if dt.kind == "b":
        arr = rng.integers(0, 2, size=(7, 13)).astype(dt)
    elif dt.kind in "iu":
        info = np.iinfo(dt)
        arr = rng.integers(info.min, info.max, size=(7, 13), endpoint=True).astype(dt)
    elif dt.kind == "c":
        arr = (rng.standard_normal((7, 13)) + 1j * rng.standard_normal((7, 13))).astype(dt)
    else:
        arr = rng.standard_normal((7, 13)).astype(dt)
    ref = fab.put(arr, chunk_size=128)
    le = dt.newbyteorder("<") if dt.itemsize > 1 else dt
    assert ref.dtype == le.str and ref.shape == (7, 13) and ref.size_bytes == arr.nbytes
    got = fab.get(ref.key)
    assert isinstance(got, np.ndarray)
    assert got.dtype == le and got.dtype.str == le.str
    assert got.shape == arr.shape
    assert np.array_equal(got, arr)
    assert got.flags.writeable and got.flags.c_contiguous
    got[0, 0] = got[0, 1]  # writable: a private copy, not a view into the cassette
    assert np.array_equal(fab.get(ref.key), arr)


@pytest.mark.parametrize("shape", [(), (0,), (0, 3), (5,), (2, 3, 4)])
def test_numpy_shapes(fab, shape):
    arr = np.array(np.arange(int(np.prod(shape)), dtype=np.float64).reshape(shape) * 1.5)
    assert isinstance(arr, np.ndarray) and arr.shape == shape
    ref = fab.put(arr)
    got = fab.get(ref.key)
    assert got.shape == shape and got.dtype == np.float64 and np.array_equal(got, arr)


def test_non_contiguous_and_fortran_input(fab):
    base = np.arange(60, dtype=np.int32).reshape(6, 10)
    c = np.ascontiguousarray(base[::2, 1::3])
    strided = base[::2, 1::3]
    fortran = np.asfortranarray(c)
    keys = {fab.put(x, chunk_size=16).key for x in (c, strided, fortran)}
    assert len(keys) == 1  # layout is not part of the content
    assert np.array_equal(fab.get(keys.pop()), c)


def test_files_and_file_objects(fab, tmp_path):
    data = os.urandom((1 << 20) * 2 + 12345)  # crosses the default 1 MiB chunking
    p = tmp_path / "in.bin"
    p.write_bytes(data)
    from_path = fab.put(p)
    from_str = fab.put(str(p))
    with open(p, "rb") as f:
        from_fileobj = fab.put(f)
        assert not f.closed  # a caller's file object is left open
    from_bytesio = fab.put(io.BytesIO(data))
    from_bytes = fab.put(data)
    assert {r.key for r in (from_path, from_str, from_fileobj, from_bytesio)} == {from_bytes.key}
    assert from_path.chunks == 3
    assert fab.get(from_path.key) == data


def test_iterators(fab):
    data = os.urandom(5000)
    pieces = [data[i : i + 333] for i in range(0, 5000, 333)]
    ref = fab.put(iter(pieces), chunk_size=1000)
    gen = fab.put((data[i : i + 7] for i in range(0, 5000, 7)), chunk_size=1000)
    assert ref.key == gen.key == fab.put(data, chunk_size=1000).key  # chunking ignores feed boundaries
    assert fab.get(ref.key) == data
    assert fab.put(iter([]), chunk_size=1000).key == fab.put(b"", chunk_size=1000).key

    with pytest.raises(FabricError) as ei:
        fab.put(iter([b"ok", "not bytes"]))
    assert ei.value.status_code is StatusCode.INVALID_ARGUMENT and "[1]" in ei.value.message


def test_unstorable_inputs(fab, tmp_path):
    before = fab.cassette.stats()
    for bad in (12, 3.5, {"a": 1}, np.array(["text"]), np.array([object()]), np.zeros(2, dtype="datetime64[s]")):
        with pytest.raises(FabricError) as ei:
            fab.put(bad)
        assert ei.value.status_code is StatusCode.INVALID_ARGUMENT, bad
    with pytest.raises(FabricError) as ei:
        fab.put(tmp_path / "missing.bin")
    assert ei.value.status_code is StatusCode.NOT_FOUND
    with pytest.raises(FabricError) as ei:
        fab.put(b"x", chunk_size=0)
    assert ei.value.status_code is StatusCode.INVALID_ARGUMENT
    (tmp_path / "text.txt").write_text("words")
    with open(tmp_path / "text.txt") as text_mode:  # read() gives str
        with pytest.raises(FabricError) as ei:
            fab.put(text_mode)
    assert ei.value.status_code is StatusCode.INVALID_ARGUMENT and "'rb'" in ei.value.message
    for bad, needle in ((tmp_path, "is a directory"), (np.ma.masked_array([1, 2], mask=[0, 1]), "mask")):
        with pytest.raises(FabricError) as ei:
            fab.put(bad)
        assert ei.value.status_code is StatusCode.INVALID_ARGUMENT and needle in ei.value.message
    assert fab.cassette.stats()["records"] == before["records"]


def test_a_strided_memoryview_is_stored_as_its_elements_in_order(fab):
    arr = np.arange(10, dtype=np.uint8)
    ref = fab.put(memoryview(arr[::2]))
    assert fab.get(ref.key) == bytes([0, 2, 4, 6, 8]) == fab.get(fab.put(bytes(arr[::2])).key)


def test_get_unknown_keys(fab):
    for k in (ContentKey.of("artifact", b"nope"), ContentKey.of("blob", b"nope"), ContentKey.of("request", b"nope")):
        with pytest.raises(FabricError) as ei:
            fab.get(k)
        assert ei.value.status_code is StatusCode.NOT_FOUND and ei.value.key == k
    with pytest.raises(FabricError) as ei:
        fab.get("artifact:xyz")
    assert ei.value.status_code is StatusCode.INVALID_ARGUMENT


# ----------------------------------------------------------- content address
def test_artifact_key_is_content_addressed(fab, tmp_path):
    data = os.urandom(10_000)
    a = fab.put(data, chunk_size=1000)
    assert fab.put(data, chunk_size=1000).key == a.key
    with fabric.open(tmp_path / "elsewhere") as other:  # another node computes the same key
        assert other.put(data, chunk_size=1000).key == a.key
    # what we found: the chunk size is part of the address (the manifest lists chunk keys)
    b = fab.put(data, chunk_size=2000)
    assert b.key != a.key and b.digest == a.digest and b.size_bytes == a.size_bytes
    # different content, or the same bytes as a typed array, is a different artifact
    assert fab.put(data[:-1] + bytes([data[-1] ^ 1]), chunk_size=1000).key != a.key
    as_u1 = fab.put(np.frombuffer(data, dtype=np.uint8), chunk_size=1000)
    assert as_u1.key != a.key and as_u1.digest == a.digest
    as_2d = fab.put(np.frombuffer(data, dtype=np.uint8).reshape(100, 100), chunk_size=1000)
    assert as_2d.key != as_u1.key
    # the byte order of the input is not part of the address
    x = np.linspace(0, 1, 999)
    assert fab.put(x.astype(">f8")).key == fab.put(x.astype("<f8")).key


def test_manifest_layout_matches_the_spec(fab):
    arr = np.arange(2500, dtype=">u2").reshape(50, 50)
    ref = fab.put(arr, chunk_size=1024)
    rec = fab.cassette.get_record(ref.key)
    assert (rec.evaluator, rec.version) == ("", "")
    assert ref.key == ContentKey.of("artifact", rec.payload)
    assert codec.is_canonical(rec.payload)
    m = codec.decode(rec.payload)
    assert set(m) == {"chunks", "sizes", "size", "digest", "dtype", "shape"}
    content = arr.astype("<u2").tobytes()
    assert m["size"] == len(content) == 5000
    assert m["sizes"] == [1024, 1024, 1024, 1024, 904]
    assert m["chunks"] == [ContentKey.of("blob", content[i : i + 1024]) for i in range(0, 5000, 1024)]
    assert m["digest"] == blake3.blake3(content).digest()
    assert (m["dtype"], m["shape"]) == ("<u2", [50, 50])
    assert all(fab.cassette.get_blob(k) == content[i * 1024 : (i + 1) * 1024] for i, k in enumerate(m["chunks"]))


def test_shared_chunks_are_stored_once(fab):
    a = os.urandom(3000)
    b = a[:2000] + os.urandom(1000)
    before = _blobs(fab.cassette)
    fab.put(a, chunk_size=1000)
    assert _blobs(fab.cassette) == before + 3
    fab.put(b, chunk_size=1000)
    assert _blobs(fab.cassette) == before + 4  # the two common chunks are not stored again


# ------------------------------------------------------------------ get_into
def test_get_into_c_contiguous_writes_in_place(fab):
    arr = np.random.default_rng(1).standard_normal((64, 33))
    ref = fab.put(arr, chunk_size=1000)
    out = np.full((64, 33), np.nan)
    before = _mismatches()
    res = fab.get_into(ref.key, out)
    assert res is out
    assert np.array_equal(out, arr)
    assert _mismatches() == before
    # a big-endian artifact into a little-endian buffer is in place too (stored little-endian)
    ref_be = fab.put(arr.astype(">f8"), chunk_size=1000)
    out2 = np.zeros((64, 33))
    assert fab.get_into(ref_be.key, out2) is out2
    assert np.array_equal(out2, arr) and _mismatches() == before


def test_get_into_fortran_falls_back_to_a_counted_staged_copy(fab):
    arr = np.arange(12 * 7, dtype=np.int32).reshape(12, 7)
    ref = fab.put(arr, chunk_size=64)
    out = np.asfortranarray(np.zeros((12, 7), dtype=np.int32))
    before = _mismatches()
    res = fab.get_into(ref.key, out)
    assert res is out and out.flags.f_contiguous
    assert np.array_equal(out, arr)
    assert _mismatches() == before + 1

    # a strided view and a non-native byte order are staged copies as well
    big = np.zeros((24, 7), dtype=np.int32)
    view = big[::2]
    assert fab.get_into(ref.key, view) is view
    assert np.array_equal(big[::2], arr) and not big[1::2].any()
    be = np.zeros((12, 7), dtype=">i4")
    assert fab.get_into(ref.key, be) is be and np.array_equal(be, arr)
    assert _mismatches() == before + 3


def test_get_into_bytes_artifact_fits_any_array_of_its_size(fab):
    raw = np.arange(40, dtype="<f8").tobytes()
    ref = fab.put(raw, chunk_size=100)
    out = np.zeros(40)
    assert fab.get_into(ref.key, out) is out and np.array_equal(out, np.arange(40.0))
    out_u1 = np.zeros((16, 20), dtype=np.uint8)
    fab.get_into(ref.key, out_u1)
    assert out_u1.tobytes() == raw
    with pytest.raises(FabricError) as ei:
        fab.get_into(ref.key, np.zeros(41))
    assert ei.value.status_code is StatusCode.INVALID_ARGUMENT


def test_get_into_rejects_wrong_targets_and_leaves_them_untouched(fab):
    arr = np.arange(30, dtype=np.float32).reshape(5, 6)
    ref = fab.put(arr)
    ro = np.full((5, 6), 7.0, dtype=np.float32)
    ro.setflags(write=False)
    cases = [
        np.full((5, 6), 7.0, dtype=np.float64),  # wrong dtype
        np.full((5, 6), 7, dtype=np.int32),  # wrong kind, same itemsize
        np.full((6, 5), 7.0, dtype=np.float32),  # wrong shape
        np.full((30,), 7.0, dtype=np.float32),  # wrong shape, same size
        ro,  # read-only
    ]
    for out in cases:
        snapshot = out.copy()
        with pytest.raises(FabricError) as ei:
            fab.get_into(ref.key, out)
        assert ei.value.status_code is StatusCode.INVALID_ARGUMENT, out.dtype
        assert ei.value.key == ref.key
        assert np.array_equal(out, snapshot)
    with pytest.raises(FabricError) as ei:
        fab.get_into(ref.key, [0.0] * 30)
    assert ei.value.status_code is StatusCode.INVALID_ARGUMENT
    with pytest.raises(FabricError) as ei:
        fab.get_into(ContentKey.of("artifact", b"absent"), np.zeros((5, 6), dtype=np.float32))
    assert ei.value.status_code is StatusCode.NOT_FOUND


# ---------------------------------------------------------------- corruption
def test_corrupted_chunk_is_data_loss(tmp_path):
    path = tmp_path / "node"
    chunks = [os.urandom(8192) for _ in range(4)]
    with fabric.open(path) as fab:
        ref = fab.put(b"".join(chunks), chunk_size=8192)
        arr_ref = fab.put(np.frombuffer(b"".join(chunks), dtype="<u4"), chunk_size=8192)
    flip_in_file(path / "data.mdb", chunks[2][1000:1100])
    with fabric.open(path) as fab:
        with pytest.raises(FabricError) as ei:
            fab.get(ref.key)
        assert ei.value.status_code is StatusCode.DATA_LOSS and ei.value.key == ref.key
        out = np.zeros(4 * 8192 // 4, dtype="<u4")
        with pytest.raises(FabricError) as ei:
            fab.get_into(arr_ref.key, out)
        assert ei.value.status_code is StatusCode.DATA_LOSS and ei.value.key == arr_ref.key
        bad_blob = ContentKey.of("blob", chunks[2])
        rep = fab.verify(raise_errors=False)
        assert [p.key for p in rep.problems] == [bad_blob]
        with pytest.raises(FabricError) as ei:
            fab.get(bad_blob)
        assert ei.value.status_code is StatusCode.DATA_LOSS and ei.value.key == bad_blob  # held, but corrupt
        # the intact chunks still serve other artifacts that use them
        assert fab.get(fab.put(chunks[0], chunk_size=8192).key) == chunks[0]


def test_get_of_a_request_whose_recorded_reply_is_corrupt_is_data_loss(tmp_path):
    path = tmp_path / "node"
    key = ContentKey.for_request("t.any", "1", {"x": 1})
    marker = os.urandom(64)
    with Cassette(path) as cas:
        cas.put(key, codec.encode({"marker": marker}))
    flip_in_file(path / "data.mdb", marker)
    with fabric.open(path) as fab:
        with pytest.raises(FabricError) as ei:
            fab.get(key)
        assert ei.value.status_code is StatusCode.DATA_LOSS and ei.value.key == key  # not NOT_FOUND: it is held, corrupt
        with pytest.raises(FabricError) as ei:
            fab.get(ContentKey.for_request("t.any", "1", {"x": 2}))
        assert ei.value.status_code is StatusCode.NOT_FOUND


def test_reputting_content_heals_a_rotted_chunk(tmp_path):
    path = tmp_path / "node"
    chunks = [os.urandom(8192) for _ in range(3)]
    data = b"".join(chunks)
    with fabric.open(path) as fab:
        ref = fab.put(data, chunk_size=8192)
    flip_in_file(path / "data.mdb", chunks[1][2000:2100])
    with fabric.open(path) as fab:
        again = fab.put(data, chunk_size=8192)  # the same content, offered again
        assert again.key == ref.key
        assert fab.get(ref.key) == data


def test_missing_chunk_is_data_loss(tmp_path):
    path = tmp_path / "node"
    data = os.urandom(5000)
    with fabric.open(path) as fab:
        ref = fab.put(data, chunk_size=1000)
    env = lmdb.open(str(path), max_dbs=8, subdir=True, create=False)
    blobs = env.open_db(b"blobs", create=False)
    with env.begin(write=True, db=blobs) as txn:
        assert txn.delete(bytes(ContentKey.of("blob", data[3000:4000])))
    env.close()
    with fabric.open(path) as fab:
        with pytest.raises(FabricError) as ei:
            fab.get(ref.key)
        assert ei.value.status_code is StatusCode.DATA_LOSS and ei.value.key == ref.key


# ------------------------------------------------------- sessions and resume
class _BlobSpy(Cassette):
    """A real Cassette that records the blob keys handed to its writer."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.blob_writes: list[ContentKey] = []

    def _submit(self, job):
        if job.op == "blobs":
            self.blob_writes.extend(k for k, _ in job.args[0])
        return super()._submit(job)


def test_aborted_session_leaves_no_artifact(tmp_path):
    data = os.urandom(5500)
    with Cassette(tmp_path / "ref") as ref_cas:
        expected_key = artifacts.put(ref_cas, data, chunk_size=1000).key
    with Cassette(tmp_path / "c") as cas:
        before = cas.stats()
        s = ArtifactSession(cas, chunk_size=1000)
        s.feed(data[:3000])
        s.feed(data[3000:])
        s.abort()
        for op in (lambda: s.feed(b"more"), s.commit):
            with pytest.raises(FabricError) as ei:
                op()
            assert ei.value.status_code is StatusCode.FAILED_PRECONDITION
        after = cas.stats()
        assert (after["records"], after["ledger_rows"]) == (before["records"], before["ledger_rows"])
        assert not cas.contains(expected_key)
        with pytest.raises(FabricError) as ei:
            artifacts.get(cas, expected_key)
        assert ei.value.status_code is StatusCode.NOT_FOUND

        # an exception inside the context manager aborts too
        with pytest.raises(RuntimeError):
            with ArtifactSession(cas, chunk_size=1000) as s2:
                s2.feed(data)
                raise RuntimeError("upload interrupted")
        assert cas.stats()["records"] == before["records"]
        assert not cas.contains(expected_key)
        assert cas.verify().ok


def test_resuming_writes_no_already_held_chunk(tmp_path):
    data = os.urandom(10_000)
    with _BlobSpy(tmp_path / "c") as cas:
        s = ArtifactSession(cas, chunk_size=1000)
        s.feed(data[:4500])  # 4 full chunks stored, 500 bytes buffered
        s.abort()
        first = list(cas.blob_writes)
        assert first == [ContentKey.of("blob", data[i : i + 1000]) for i in range(0, 4000, 1000)]
        assert _blobs(cas) == 4

        cas.blob_writes.clear()
        with ArtifactSession(cas, chunk_size=1000) as s2:
            for i in range(0, 10_000, 700):
                s2.feed(data[i : i + 700])
            ref = s2.commit()
        new = [ContentKey.of("blob", data[i : i + 1000]) for i in range(4000, 10_000, 1000)]
        assert sorted(cas.blob_writes) == sorted(new)  # only the missing chunks were written
        assert _blobs(cas) == 10
        assert artifacts.get(cas, ref.key) == data

        cas.blob_writes.clear()
        again = artifacts.put(cas, data, chunk_size=1000)  # everything held: no chunk written at all
        assert again.key == ref.key
        assert cas.blob_writes == [] and _blobs(cas) == 10
        assert cas.stats()["ledger_rows"] == 1


def test_module_level_put_get_on_the_default_fabric(fabric_home):
    from fabric import api

    old = api.set_default(None)
    try:
        arr = np.arange(10, dtype=">i8")
        ref = fabric.put(arr)
        got = fabric.get(ref)
        assert got.dtype == np.dtype("<i8") and np.array_equal(got, arr)
        out = np.empty(10, dtype=np.int64)
        assert fabric.get_into(ref, out) is out and np.array_equal(out, arr)
        assert (fabric_home / "data.mdb").is_file()
    finally:
        fab = api.set_default(old)
        if fab is not None:
            fab.close()


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.uint8, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5)))
def test_equal_bool_arrays_are_one_artifact(raw):
    """specs/cassette-format.md section 8: a bool array holding bytes other than 00 / 01
    (a uint8 array viewed as bool) is the same content as the equal 00 / 01 array."""
    odd, plain = raw.view(np.bool_), np.array(raw != 0)
    with artifacts.ChunkPlan(odd) as a, artifacts.ChunkPlan(plain) as b:
        assert a.key == b.key and a.payload == b.payload


def test_a_bool_array_with_odd_bytes_is_stored_as_00_01(fab):
    odd = np.array([[0, 2], [255, 1]], np.uint8).view(np.bool_)
    ref = fab.put(odd)
    assert ref.key == fab.put(np.array([[False, True], [True, True]])).key
    got = fab.get(ref.key)
    assert got.dtype == np.bool_ and got.tobytes() == bytes([0, 1, 1, 1])


def test_parse_manifest_stops_decoding_bytes_that_no_manifest_of_their_length_could_be():
    # a put's manifest is a client's bin: 1 MiB of empty lists decoded (and re-encoded, strict) to
    # ~70 MB of lists on the node's event loop before it was found not to be a manifest
    import tracemalloc

    n = 1 << 20
    bomb = b"\xdd" + n.to_bytes(4, "big") + b"\x90" * n
    tracemalloc.start()
    try:
        with pytest.raises(FabricError) as ei:
            artifacts.parse_manifest(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert ei.value.status_code is StatusCode.INVALID_ARGUMENT
    assert ei.value.message == "manifest: more arrays, maps and ext values than its length holds chunk keys"
    assert peak < 16 << 20, peak
    # a real manifest is never near its bound: every chunk key takes 36 bytes
    chunks = [ContentKey.of("blob", i.to_bytes(4, "big")) for i in range(5000)]
    key, payload, manifest = artifacts.build_manifest(chunks, [1] * 5000, 5000, b"d" * 32, "|u1", (5000,))
    assert artifacts.parse_manifest(payload) == (key, manifest)
