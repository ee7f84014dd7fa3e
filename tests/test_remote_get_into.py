"""``get_into`` through a node is the embedded ``get_into``, and ``progress=`` of put / get.

Every get_into test runs on both fabrics (a real ``fabric node`` subprocess on
127.0.0.1, and an embedded one holding the same artifacts) and the remote
errors are compared with the embedded ones, message for message.  The
``fabric_layout_mismatch_total`` counter is read from :mod:`fabric.metrics` in
this process: a remote get_into checks and fills ``out`` on the client side.
"""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
import trio

import fabric
import gpu
from cassette.errors import FabricError, StatusCode
from cassette.keys import ContentKey
from cassette.record import pack_record
from fabric import artifacts, metrics, net, remote
from fabric.registry import load_evaluators
from fabric.remote import RemoteFabric
from _nodes import EVALUATORS, FABRIC, SECRET, embedded_and_remote, in_process_node

SMALL = 1 << 16  # 64 KiB chunks: many chunks from little data


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """``{"embedded": Fabric, "remote": RemoteFabric}`` plus the node's address and tmp dir."""
    with embedded_and_remote(tmp_path_factory.mktemp("get_into")) as fabrics:
        yield fabrics


@pytest.fixture(params=["embedded", "remote"])
def fab(request, both):
    return both[request.param]


def _put_both(both, data, **kw) -> artifacts.ArtifactRef:
    """Put ``data`` on both fabrics; they must agree on its ref."""
    ref = both["embedded"].put(data, **kw)
    assert both["remote"].put(data, **kw) == ref
    return ref


def _mismatches() -> float:
    return metrics.snapshot().get("fabric_layout_mismatch_total", 0.0)


def _error(f, key, out) -> FabricError:
    with pytest.raises(FabricError) as ei:
        f.get_into(key, out)
    return ei.value


class _DeviceArray:
    """Duck-typed device array: what ``get_into`` dispatches to :mod:`gpu` on."""

    def __init__(self, shape, dtype) -> None:
        self.host = np.zeros(shape, dtype)
        self.shape, self.dtype, self.nbytes = self.host.shape, self.host.dtype, self.host.nbytes
        self.device = type("Device", (), {"id": 0})()
        self.__cuda_array_interface__ = {"shape": self.shape, "typestr": self.dtype.str, "data": (0, False), "version": 3}


# ------------------------------------------------------------------ targets
def test_wrong_targets_are_invalid_argument_as_embedded_and_left_untouched(both, fab):
    arr = np.arange(30, dtype=np.float32).reshape(5, 6)
    ref = _put_both(both, arr)
    raw = _put_both(both, np.arange(40, dtype="<f8").tobytes(), chunk_size=100)
    ro = np.full((5, 6), 7.0, dtype=np.float32)
    ro.setflags(write=False)
    cases = [
        (ref, np.full((5, 6), 7.0, dtype=np.float64)),  # wrong dtype
        (ref, np.full((5, 6), 7, dtype=np.int32)),  # wrong kind, same itemsize
        (ref, np.full((6, 5), 7.0, dtype=np.float32)),  # wrong shape
        (ref, np.full((30,), 7.0, dtype=np.float32)),  # wrong shape, same size
        (ref, ro),  # read-only
        (raw, np.zeros(41)),  # a bytes artifact into an array of another size
    ]
    before = _mismatches()
    for r, out in cases:
        snapshot = out.copy()
        err = _error(fab, r.key, out)
        assert err.status_code is StatusCode.INVALID_ARGUMENT and err.key == r.key, out.dtype
        assert str(err) == str(_error(both["embedded"], r.key, out))
        assert np.array_equal(out, snapshot)
    err = _error(fab, ref.key, [0.0] * 30)
    assert err.status_code is StatusCode.INVALID_ARGUMENT and "numpy or CuPy" in err.message
    assert str(err) == str(_error(both["embedded"], ref.key, [0.0] * 30))
    assert _mismatches() == before


def test_request_blob_and_absent_keys_fail_as_embedded(both, fab):
    load_evaluators(EVALUATORS)  # the node loads them too
    ref = _put_both(both, np.arange(8, dtype=np.int64), chunk_size=16)
    req_key = fab.realize(fabric.Request("text.stats", {"text": "get_into"}, version="1")).key
    blob = fab.get(ref.key).tobytes()[:16]
    blob_key = ContentKey.of("blob", blob)
    assert fab.get(blob_key) == blob  # held, yet no artifact
    for key in (req_key, blob_key, str(req_key)):
        err = _error(fab, key, np.zeros(8, dtype=np.int64))
        assert err.status_code is StatusCode.INVALID_ARGUMENT and "artifact key" in err.message
        assert str(err) == str(_error(both["embedded"], key, np.zeros(8, dtype=np.int64)))
    err = _error(fab, ContentKey.of("artifact", b"absent"), np.zeros(8))
    assert err.status_code is StatusCode.NOT_FOUND
    with pytest.raises(FabricError) as ei:
        fab.get_into("artifact:xyz", np.zeros(8))
    assert ei.value.status_code is StatusCode.INVALID_ARGUMENT


# --------------------------------------------------------------- in place / staged
def test_c_contiguous_float32_is_filled_in_place_without_a_mismatch(both, fab):
    arr = np.random.default_rng(3).standard_normal(300_000).astype(np.float32)  # 1.2 MB: 19 chunks
    ref = _put_both(both, arr, chunk_size=SMALL)
    out = np.full(arr.shape, np.nan, dtype=np.float32)
    before = _mismatches()
    assert fab.get_into(ref.key, out) is out
    assert out.tobytes() == arr.tobytes()
    assert _mismatches() == before


def test_non_contiguous_targets_get_a_staged_copy_counted_once(both, fab):
    arr = np.arange(120 * 70, dtype=np.int32).reshape(120, 70)
    ref = _put_both(both, arr, chunk_size=4096)
    fortran = np.asfortranarray(np.zeros((120, 70), dtype=np.int32))
    before = _mismatches()
    assert fab.get_into(ref.key, fortran) is fortran
    assert fortran.flags.f_contiguous and np.array_equal(fortran, arr)
    assert _mismatches() == before + 1

    big = np.zeros((240, 70), dtype=np.int32)
    view = big[::2]
    assert fab.get_into(ref.key, view) is view
    assert np.array_equal(big[::2], arr) and not big[1::2].any()
    assert _mismatches() == before + 2


def test_big_endian_target_gets_correct_values_through_a_staged_copy(both, fab):
    arr = np.random.default_rng(4).standard_normal((50, 40))
    ref = _put_both(both, arr, chunk_size=SMALL // 4)
    out = np.zeros((50, 40), dtype=">f8")
    before = _mismatches()
    assert fab.get_into(ref.key, out) is out
    assert out.dtype == np.dtype(">f8") and np.array_equal(out, arr)
    assert _mismatches() == before + 1


def test_bytes_artifact_fits_any_array_of_its_size(both, fab):
    raw = np.arange(40, dtype="<f8").tobytes()
    ref = _put_both(both, raw, chunk_size=100)
    out = np.zeros(40)
    assert fab.get_into(ref.key, out) is out and np.array_equal(out, np.arange(40.0))
    out_u1 = np.zeros((16, 20), dtype=np.uint8)
    fab.get_into(ref.key, out_u1)
    assert out_u1.tobytes() == raw


# ---------------------------------------------------------------------- CuPy
def test_a_device_array_target_goes_through_gpu_with_verified_chunks(both, fab, monkeypatch):
    arr = np.arange(5000, dtype=np.int64).reshape(50, 100)
    ref = _put_both(both, arr, chunk_size=SMALL // 8)
    seen = []

    def materialize_into(stream, out, after=None):
        manifest, chunks = stream()
        seen.append(manifest)
        out.host.reshape(-1).view(np.uint8)[:] = np.frombuffer(b"".join(chunks), np.uint8)
        return out

    monkeypatch.setattr(gpu, "materialize_into", materialize_into)
    out = _DeviceArray((50, 100), np.int64)
    assert fab.get_into(ref.key, out) is out
    assert np.array_equal(out.host, arr)
    assert seen[0]["digest"].hex() == ref.digest and len(seen[0]["chunks"]) == ref.chunks


@pytest.mark.skipif(gpu.available(), reason="checks the no-GPU path")
def test_a_device_array_target_without_cupy_is_failed_precondition_as_embedded(both, fab):
    ref = _put_both(both, np.arange(10, dtype=np.float32))
    err = _error(fab, ref.key, _DeviceArray((10,), np.float32))
    assert err.status_code is StatusCode.FAILED_PRECONDITION and "evalfabric[gpu]" in err.message
    assert str(err) == str(_error(both["embedded"], ref.key, _DeviceArray((10,), np.float32)))


# ------------------------------------------------------------ remote only
_REAL_RECEIVE = net.ClientCall.receive


def _tampering_stream(monkeypatch, change):
    """Make every streaming request's received events pass through ``change(n, event)``
    (``n`` counts the request's pushed items from 0; None drops the event)."""
    from fabric.wire import StreamData

    real = _REAL_RECEIVE  # never an earlier tampering's wrapper
    counts: dict[int, int] = {}

    async def receive(self):
        while True:
            ev = await real(self)
            if not isinstance(ev, StreamData):
                return ev
            n = counts.get(id(self), 0)
            counts[id(self)] = n + 1
            ev = change(n, ev)
            if ev is not None:
                return ev

    monkeypatch.setattr(net.ClientCall, "receive", receive)


def test_a_chunk_altered_in_transit_is_data_loss(both, monkeypatch):
    from fabric.wire import StreamData

    arr = np.arange(4096, dtype=np.uint32)
    ref = _put_both(both, arr, chunk_size=4096)
    rem = both["remote"]

    # get and get_into stream: tamper with the pushed items as they arrive (item 0 is the manifest record)
    _tampering_stream(monkeypatch, lambda n, ev: StreamData(ev.req_id, ev.data[:-1] + bytes([ev.data[-1] ^ 1])) if n == 2 else ev)
    for out in (np.zeros(4096, dtype=np.uint32), np.zeros(4096, dtype=">u4")):  # in place and staged
        err = _error(rem, ref.key, out)
        assert err.status_code is StatusCode.DATA_LOSS and err.key == ref.key and "does not match its key" in err.message
    with pytest.raises(FabricError) as ei:
        rem.get(ref.key)
    assert ei.value.status_code is StatusCode.DATA_LOSS and "does not match its key" in ei.value.message

    _tampering_stream(monkeypatch, lambda n, ev: None if n == 4 else ev)  # the last of 4 chunks never arrives
    err = _error(rem, ref.key, np.zeros(4096, dtype=np.uint32))
    assert err.status_code is StatusCode.DATA_LOSS and "manifest lists 4" in err.message


def test_a_record_claiming_the_key_with_another_manifest_is_data_loss(both, monkeypatch):
    ref = _put_both(both, np.arange(64, dtype=np.int16), chunk_size=32)
    other = _put_both(both, np.arange(1, 65, dtype=np.int16), chunk_size=32)
    rem = both["remote"]
    other_payload = both["embedded"].cassette.get_record(other.key).payload
    liar = pack_record(ref.key, other_payload, evaluator="", version="", created=0.0, compute_s=0.0, node="liar")

    # the manifest record (pushed item 0, one piece here) is swapped in transit
    from fabric.wire import StreamData

    _tampering_stream(monkeypatch, lambda n, ev: StreamData(ev.req_id, liar) if n == 0 else ev)
    real_head = remote._read_head

    async def head_of_liar(call, key, wait_s, keep=None):  # the announced size must be the liar's for the swap to parse
        from fabric.wire import Metadata

        first = await call.receive()
        assert isinstance(first, Metadata)

        class Call:
            async def receive(self):
                if not hasattr(self, "sent"):
                    self.sent = True
                    return Metadata(first.req_id, {**first.body, "record_size": len(liar)})
                return await call.receive()

        return await real_head(Call(), key, wait_s, keep)

    monkeypatch.setattr(remote, "_read_head", head_of_liar)
    for call in (lambda: rem.get(ref.key), lambda: rem.get_into(ref.key, np.zeros(64, dtype=np.int16))):
        with pytest.raises(FabricError) as ei:
            call()
        assert ei.value.status_code is StatusCode.DATA_LOSS and "manifest of another artifact" in ei.value.message


def test_aget_into_under_trio(both):
    arr = np.random.default_rng(5).standard_normal((30, 20))
    ref = _put_both(both, arr, chunk_size=1024)

    async def main():
        f = RemoteFabric(both["addr"], SECRET)
        out = np.zeros((30, 20))
        assert await f.aget_into(ref.key, out) is out and np.array_equal(out, arr)
        before = _mismatches()
        fo = np.zeros((30, 20), order="F")
        assert await f.aget_into(str(ref.key), fo) is fo and np.array_equal(fo, arr)
        assert _mismatches() == before + 1
        with pytest.raises(FabricError) as ei:
            await f.aget_into(ref.key, np.zeros((20, 30)))
        assert ei.value.status_code is StatusCode.INVALID_ARGUMENT

    trio.run(main)


# ------------------------------------------------------------------ progress
def _check_progress(seen: list[int], total: int, *, strict: bool = True) -> None:
    assert seen, "progress was never called"
    steps = list(zip(seen, seen[1:]))
    assert all(a < b for a, b in steps) if strict else all(a <= b for a, b in steps), seen
    assert seen[-1] == total


def test_embedded_put_and_get_report_bytes_stored_and_read(tmp_path):
    data = os.urandom((3 << 20) + 123)
    with fabric.open(tmp_path / "e") as f:
        seen: list[int] = []
        ref = f.put(data, progress=seen.append)  # 1 MiB chunks, stored 16 per group: one call at the end
        _check_progress(seen, len(data))
        seen = []
        ref2 = f.put(data, chunk_size=SMALL, progress=seen.append)  # 49 chunks: 4 groups
        assert len(seen) == 4
        _check_progress(seen, len(data))
        src = tmp_path / "file.bin"
        src.write_bytes(data)
        seen = []
        assert f.put(src, chunk_size=SMALL, progress=seen.append) == ref2  # a file: a call per 1 MiB read
        assert len(seen) > 3
        _check_progress(seen, len(data))
        seen = []
        assert artifacts.get(f.cassette, ref2.key, progress=seen.append) == data
        assert len(seen) == ref2.chunks
        _check_progress(seen, len(data))
        seen = []
        assert f.get(ref.key) == data
        f.put(b"", progress=seen.append)
        assert seen == [0]


def test_remote_put_reports_bytes_the_node_holds(both):
    rem = both["remote"]
    rng = np.random.default_rng(6)
    data = rng.bytes(20 * SMALL + 77)
    seen: list[int] = []
    ref = rem.put(data, chunk_size=SMALL, progress=seen.append)
    assert seen[0] == 0 and len(seen) == 1 + ref.chunks  # nothing held, then one call per chunk pushed
    _check_progress(seen, len(data))
    seen = []
    assert rem.put(data, chunk_size=SMALL, progress=seen.append) == ref
    assert seen == [len(data)]  # all held already: nothing to push
    # half of it shared with the first put, and one chunk repeated five times
    zeros = bytes(SMALL)
    mixed = data[: 10 * SMALL] + zeros * 5 + rng.bytes(3 * SMALL)
    seen = []
    before = rem.chunks_uploaded
    rem.put(mixed, chunk_size=SMALL, progress=seen.append)
    assert rem.chunks_uploaded - before == 4  # the zero chunk once, three fresh ones
    assert seen[0] == 10 * SMALL and seen[1] == 15 * SMALL
    _check_progress(seen, len(mixed))


def test_remote_put_in_rounds_reports_up_to_the_size(tmp_path):
    """An in-process node whose requests carry at most 1 MiB: a 3 MiB put takes several rounds."""
    from fabric.local import Fabric
    from fabric.wire import StreamFrameLimits

    blob = os.urandom(3 << 20)
    limits = StreamFrameLimits(max_frame_bytes=64 << 10, max_bytes_per_stream=1 << 20)
    seen: list[int] = []

    async def main():
        with Fabric(tmp_path / "small", durability="fast") as fab:
            async with in_process_node(fab, limits) as (addr, _):
                ref = await RemoteFabric(addr, SECRET).aput(blob, progress=seen.append)
                assert fab.get(ref.key) == blob

    trio.run(main)
    _check_progress(seen, len(blob), strict=False)  # each round starts with what the last one ended at


def test_remote_get_reports_bytes_received(both):
    rem = both["remote"]
    data = os.urandom(9 * SMALL + 5)
    ref = _put_both(both, data, chunk_size=SMALL)
    seen: list[int] = []
    assert rem.get(ref.key, progress=seen.append) == data
    assert len(seen) == ref.chunks  # one call per chunk: the manifest record pushed first is not counted
    _check_progress(seen, len(data))

    async def main():
        got: list[int] = []
        f = RemoteFabric(both["addr"], SECRET)
        assert await f.aget(str(ref.key), progress=got.append) == data
        return got

    assert trio.run(main) == seen
    req_key = rem.realize(fabric.Request("text.stats", {"text": "progress"}, version="1")).key
    assert rem.get(req_key, progress=seen.append)["words"] == 1  # a reply: works, progress or not
    with pytest.raises(FabricError) as ei:
        rem.get(ContentKey.of("artifact", b"absent"), progress=seen.append)
    assert ei.value.status_code is StatusCode.NOT_FOUND


def test_cli_get_through_a_node_writes_the_file(both, tmp_path):
    data = os.urandom(2 * SMALL + 9)
    ref = _put_both(both, data, chunk_size=SMALL)
    secret = both["tmp"] / "secret"
    r = subprocess.run([FABRIC, "get", str(ref.key), "-o", str(tmp_path / "out.bin"), "--node", both["addr"],
                        "--secret-file", str(secret)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out.bin").read_bytes() == data and r.stderr == ""
    src = tmp_path / "in.bin"
    src.write_bytes(data[::-1])
    r = subprocess.run([FABRIC, "put", str(src), "--node", both["addr"], "--secret-file", str(secret)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert both["remote"].get(json.loads(r.stdout)["key"]) == data[::-1]


def test_a_wrong_target_stops_the_transfer_and_a_fill_holds_only_a_few_chunks(both):
    """get_into through a node streams: the node announces and sends the manifest first,
    so a target of the wrong shape is refused after a handful of the artifact's 200
    chunks (the rest are never sent); a good fill takes exactly the announcement, the
    manifest record, the chunks and the reply."""
    rem = both["remote"]
    arr = np.arange(200 * 1024, dtype=np.int32)
    ref = _put_both(both, arr, chunk_size=4096)  # 200 chunks
    assert ref.chunks == 200

    def frames_sent() -> int:
        return rem.stats()["wire"]["frames_sent"]

    before = frames_sent()
    err = _error(rem, ref.key, np.zeros((1024, 200), dtype=np.int32))  # right size, wrong shape
    assert err.status_code is StatusCode.INVALID_ARGUMENT and "shape" in err.message
    sent = frames_sent() - before - 1  # less the stats answer
    assert sent < 40, f"the node sent {sent} frames for a refused get_into of 200 chunks"

    out = np.zeros(200 * 1024, dtype=np.int32)
    before = frames_sent()
    assert rem.get_into(ref.key, out) is out and np.array_equal(out, arr)
    assert frames_sent() - before - 1 == 1 + 1 + 200 + 1  # announcement, manifest record, chunks, reply


def test_cancelling_a_streaming_get_into_is_prompt_and_leaves_the_client_usable(both):
    """A deadline that expires while chunks stream in stops get_into at once (the reader
    task, the worker thread copying and the request at the node all end), and the next
    get_into on the same client fills the target."""
    arr = np.arange(2 << 20, dtype=np.int32)  # 8 MiB in 128 chunks
    ref = _put_both(both, arr, chunk_size=SMALL)

    async def main():
        rf = RemoteFabric(both["addr"], SECRET)
        out = np.zeros_like(arr)
        for deadline in (0.0005, 0.005, 0.02):
            t0 = trio.current_time()
            with trio.move_on_after(deadline) as scope:
                await rf.aget_into(ref.key, out)
            if scope.cancelled_caught:
                assert trio.current_time() - t0 < deadline + 2.0
        out[:] = 0
        assert await rf.aget_into(ref.key, out) is out and np.array_equal(out, arr)

    trio.run(main)
