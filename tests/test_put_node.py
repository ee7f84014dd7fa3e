"""``put`` through a node (fabric/upload.py): real ``fabric node`` subprocesses on 127.0.0.1.

Most tests share one node (module fixture, distinct content per test); the
fleet test starts two.  Upload sessions that break off are driven with the raw
wire client, so the node sees exactly what a client that died mid-upload sends.
"""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
import trio

import fabric
from cassette.errors import FabricError, StatusCode
from cassette.keys import ContentKey
from fabric.artifacts import ChunkPlan, build_manifest
from fabric.net import open_connection
from fabric.remote import RemoteFabric
from fabric.wire import Metadata
from _nodes import FABRIC, SECRET, in_process_node, node, start_node, stop_node
from test_fleet import _wait

SMALL = 1 << 16  # 64 KiB chunks: many chunks from little data


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("put")
    with node(tmp, "node", "--durability", "fast") as (addr, proc, data):
        yield addr, proc, tmp
        assert proc.poll() is None  # every test left it serving


def _embedded_key(tmp, data, **kw) -> ContentKey:
    """The key the embedded put gives (a fresh data dir each time)."""
    d = tmp / f"embedded-{os.urandom(4).hex()}"
    with fabric.open(d) as f:
        return f.put(data, **kw).key


def _not_found(f: RemoteFabric, key) -> bool:
    with pytest.raises(FabricError) as ei:
        f.get(key)
    return ei.value.status_code is StatusCode.NOT_FOUND


def _raw_session(addr: str, plan: ChunkPlan, push: int, how: str, alter: bool = False):
    """Open a put for ``plan``, push the first ``push`` chunks the node asks for, then ``how``:
    "end" (end early, return the reply) or "cancel" (leave the upload: a cancel)."""
    host, port = addr.rsplit(":", 1)

    async def main():
        client = await open_connection(host, int(port), SECRET)
        async with client:
            async with client.stream("put", {"manifest": plan.payload}, upload=True, credit=0) as call:
                md = await call.receive()
                assert isinstance(md, Metadata) and md.body["key"] == plan.key
                todo = md.body["missing"]
                for i in todo[:push]:
                    data = plan.chunk(i)
                    if alter:
                        data = data[:-1] + bytes([data[-1] ^ 1])
                    await call.send(data)
                if how == "end":
                    await call.end()
                    return todo, await call.result()
            return todo, None  # left the block unanswered: the client sent cancel

    return trio.run(main)


def test_put_bytes_and_numpy_through_a_node_round_trip_and_second_put_uploads_nothing(shared, tmp_path):
    addr, proc, _ = shared
    rng = np.random.default_rng(1)
    blob = rng.bytes((5 << 19) + 123)  # 2.5 MiB: 3 chunks of the default size
    arr = rng.standard_normal((300, 1000))  # 2.4 MB of float64
    with fabric.open(addr, secret=SECRET) as a, fabric.open(addr, secret=SECRET) as b:
        ref = a.put(blob)
        assert ref.chunks == 3 and ref.size_bytes == len(blob) and a.chunks_uploaded == 3
        assert ref.key == _embedded_key(tmp_path, blob)  # the same key as the embedded put
        aref = a.put(arr)
        assert (aref.dtype, aref.shape) == ("<f8", (300, 1000)) and aref.key == _embedded_key(tmp_path, arr)
        for f in (a, b):
            assert f.get(ref.key) == blob
            got = f.get(aref.key)
            assert got.dtype == arr.dtype and got.shape == arr.shape and got.tobytes() == arr.tobytes()
        # the same content again, from another client: nothing is uploaded
        assert b.put(blob) == ref and b.put(arr) == aref and b.chunks_uploaded == 0
        # content sharing its first two chunks with ``blob``: only the last chunk travels
        tail = rng.bytes(1000)
        other = b.put(blob[: 2 << 20] + tail)
        assert b.chunks_uploaded == 1 and b.bytes_uploaded == len(tail) and other.chunks == 3
        assert a.get(other.key) == blob[: 2 << 20] + tail
        # an iterator and a file object upload like bytes
        assert a.put(iter([blob[:7], blob[7:]])).key == ref.key
        with open(tmp_path / "blob.bin", "wb") as fh:
            fh.write(blob)
        with open(tmp_path / "blob.bin", "rb") as fh:
            assert a.put(fh) == ref
        assert a.put(b"").key == _embedded_key(tmp_path, b"") and a.get(a.put(b"").key) == b""


def test_get_of_a_bytes_artifact_through_a_node_holds_its_content_once(shared):
    from test_artifacts import _peak_ratio

    addr, _, _ = shared
    blob = os.urandom(24 << 20)
    with fabric.open(addr, secret=SECRET) as f:
        ref = f.put(blob)
        got, peak = _peak_ratio(lambda: f.get(ref.key), len(blob))
    assert type(got) is bytes and got == blob
    assert peak < 1.5  # 2.0 and more when the assembled bytearray was copied into bytes at the end


def test_put_resumes_after_an_upload_that_ended_early_and_is_invisible_until_complete(shared):
    addr, proc, _ = shared
    blob = os.urandom(2 << 20)
    with ChunkPlan(blob, chunk_size=SMALL) as plan, fabric.open(addr, secret=SECRET) as f:
        todo, reply = _raw_session(addr, plan, 10, "end")
        assert len(todo) == 32
        assert reply == {"key": plan.key, "complete": False, "received": 10, "missing": 22}
        assert _not_found(f, plan.key)
        ref = f.put(blob, chunk_size=SMALL)
        assert ref == plan.ref and f.chunks_uploaded == 22  # only the rest travels
        assert f.get(plan.key) == blob


def test_put_resumes_after_a_cancelled_upload(shared):
    addr, proc, _ = shared
    blob = os.urandom(2 << 20)
    with ChunkPlan(blob, chunk_size=SMALL) as plan, fabric.open(addr, secret=SECRET) as f:
        # 12 pushes need 4 credits back (the node grants 8, then one per chunk it takes),
        # so the node verified at least 3 chunks before the cancel; those it keeps
        todo, reply = _raw_session(addr, plan, 12, "cancel")
        assert len(todo) == 32 and reply is None
        assert _not_found(f, plan.key)
        # the cancelled session stores what it verified as it ends: wait until the node says so
        # (a put racing that store would only send a few chunks twice)
        lacking = _wait(lambda: (n := len(_raw_session(addr, plan, 0, "cancel")[0])) <= 32 - 3 and n, 10,
                        "the node to keep the chunks of the cancelled upload")
        ref = f.put(blob, chunk_size=SMALL)
        assert ref == plan.ref and 32 - 12 <= f.chunks_uploaded <= lacking
        assert f.get(plan.key) == blob


def test_pushed_chunk_not_matching_its_key_is_data_loss_nothing_recorded_node_keeps_serving(shared):
    addr, proc, _ = shared
    blob = os.urandom(300_000)
    with ChunkPlan(blob, chunk_size=SMALL) as plan, fabric.open(addr, secret=SECRET) as f:
        with pytest.raises(FabricError) as ei:
            _raw_session(addr, plan, 1, "end", alter=True)
        assert ei.value.status_code is StatusCode.DATA_LOSS and "chunk 0" in ei.value.message
        assert _not_found(f, plan.key)
        assert _not_found(f, plan.manifest["chunks"][0])  # the bad chunk was not stored either
        # a manifest whose digest is not its chunks' is refused at the end, after every chunk
        key, payload, _ = build_manifest(plan.manifest["chunks"], plan.manifest["sizes"], len(blob), b"\0" * 32, None, None)
        liar = ChunkPlan(blob, chunk_size=SMALL)
        liar.key, liar.payload = key, payload
        with pytest.raises(FabricError) as ej:
            _raw_session(addr, liar, 5, "end")
        assert ej.value.status_code is StatusCode.DATA_LOSS
        liar.close()
        assert _not_found(f, key)
        # a malformed manifest is INVALID_ARGUMENT
        liar2 = ChunkPlan(b"x", chunk_size=SMALL)
        liar2.payload = b"\x01\x02"
        with pytest.raises(FabricError) as ek:
            _raw_session(addr, liar2, 0, "end")
        assert ek.value.status_code is StatusCode.INVALID_ARGUMENT
        liar2.close()
        # the node still serves, the good chunks stay usable, and the real content goes in
        assert f.put(blob, chunk_size=SMALL) == plan.ref
        assert f.get(plan.key) == blob
    assert proc.poll() is None


def test_chunk_size_must_fit_the_nodes_frames(shared):
    addr, proc, _ = shared
    with fabric.open(addr, secret=SECRET) as f:
        with pytest.raises(FabricError) as ei:
            f.put(b"abc", chunk_size=8 << 20)  # the node's frames are 4 MiB
        assert ei.value.status_code is StatusCode.INVALID_ARGUMENT and "chunk_size" in ei.value.message
        assert f.chunks_uploaded == 0


def test_put_to_a_node_with_small_frames_and_streams_cuts_smaller_and_uploads_in_rounds(tmp_path):
    """In-process node whose frames are 64 KiB and whose requests carry at most 1 MiB each."""
    from fabric.local import Fabric
    from fabric.wire import StreamFrameLimits

    blob = os.urandom(3 << 20)
    limits = StreamFrameLimits(max_frame_bytes=64 << 10, max_bytes_per_stream=1 << 20)

    async def main():
        with Fabric(tmp_path / "small", durability="fast") as fab:
            async with in_process_node(fab, limits) as (addr, _):
                f = RemoteFabric(addr, SECRET)
                ref = await f.aput(blob)
                assert ref.chunks == -(-len(blob) // ((64 << 10) - 256)) and f.chunks_uploaded == ref.chunks
                assert fab.get(ref.key) == blob and await f.aget(ref.key) == blob

    trio.run(main)


def test_cli_put_through_a_node_prints_the_key(shared, tmp_path):
    addr, proc, tmp = shared
    src = tmp_path / "weights.bin"
    src.write_bytes(os.urandom(1_500_000))
    r = subprocess.run([FABRIC, "put", str(src), "--node", addr, "--secret-file", str(tmp / "secret")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["key"] == str(_embedded_key(tmp_path, src)) and out["size_bytes"] == 1_500_000 and out["chunks"] == 2
    with fabric.open(addr, secret=SECRET) as f:
        assert f.get(out["key"]) == src.read_bytes()


def test_put_on_one_fleet_member_is_announced_and_gettable_through_another(tmp_path):
    a_addr, a_proc, _ = start_node(tmp_path, "a", "--gossip-interval", "0.2", "--durability", "fast")
    try:
        b_addr, b_proc, _ = start_node(tmp_path, "b", "--gossip-interval", "0.2", "--durability", "fast", "--join", a_addr)
        try:
            arr = np.random.default_rng(2).standard_normal(200_000)
            with fabric.open(a_addr, secret=SECRET) as fa, fabric.open(b_addr, secret=SECRET) as fb:
                ref = fa.put(arr, chunk_size=1 << 18)
                a_id = fa.stats()["node"]["node_id"]
                _wait(lambda: a_id in fb.holders(ref.key), 20, "B to learn that A holds the put artifact")
                got = fb.get(ref.key)
                assert got.tobytes() == arr.tobytes()
        finally:
            stop_node(b_proc)
    finally:
        stop_node(a_proc)


def test_an_upload_longer_than_the_put_deadline_completes_while_the_node_keeps_taking_chunks(shared, tmp_path, monkeypatch):
    """The put deadline bounds each wait for the node, not the upload: a 0.3 s deadline and a
    ~2 s upload (the sending side slowed between chunks) store the artifact in one round."""
    import dataclasses
    import time

    from fabric import errors

    addr, _, _ = shared
    monkeypatch.setitem(errors.DEFAULT_POLICIES, "put", dataclasses.replace(errors.DEFAULT_POLICIES["put"], deadline_s=0.3))
    data = os.urandom(64 * SMALL)
    with RemoteFabric(addr, SECRET) as f:
        t0 = time.monotonic()
        ref = f.put(data, chunk_size=SMALL, progress=lambda n: time.sleep(0.03))
        assert time.monotonic() - t0 > 1.5
        assert f.chunks_uploaded == 64 and f.get(ref.key) == data
    assert ref.key == _embedded_key(tmp_path, data, chunk_size=SMALL)
