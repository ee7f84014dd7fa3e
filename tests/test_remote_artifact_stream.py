"""``RemoteFabric.artifact_stream``: the source :mod:`gpu` materializes from, streamed.

A real ``fabric node`` subprocess on 127.0.0.1 holds the artifacts.  The caller's
thread takes verified chunks as they come: the artifact is never gathered on the
client, a tampered chunk is DATA_LOSS from the iterator, and closing, dropping or
abandoning the iterator (or the client) ends the stream without hanging anything.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import threading
import time

import numpy as np
import pytest

import fabric
import gpu
from cassette.errors import FabricError, StatusCode
from fabric import net, remote
from fabric.wire import StreamData, WireConnection
from _nodes import SECRET, node

CHUNK = 1 << 14  # 16 KiB: 64 chunks from 1 MiB
N_CHUNKS = 64


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """``(address, artifact ref, content bytes)`` of a node holding a 64-chunk artifact."""
    tmp = tmp_path_factory.mktemp("astream")
    content = np.random.default_rng(7).integers(0, 256, N_CHUNKS * CHUNK, dtype=np.uint8)
    with node(tmp, "node", "--durability", "fast") as (addr, proc, _):
        with fabric.open(addr, secret=SECRET) as rf:
            ref = rf.put(content, chunk_size=CHUNK)
        assert ref.chunks == N_CHUNKS
        yield addr, ref, content.tobytes()
        assert proc.poll() is None  # every test left it serving


@pytest.fixture
def pushed(monkeypatch):
    """Counts the pushed items the wire connections of this process have parsed so far
    (whatever reads them: the count is taken where every frame is turned into an event)."""
    seen = {"items": 0}
    real = WireConnection.next_event

    def next_event(self):
        ev = real(self)
        if isinstance(ev, StreamData):
            seen["items"] += 1
        return ev

    monkeypatch.setattr(WireConnection, "next_event", next_event)
    return seen


def _no_stream_left(rf, timeout: float = 10.0) -> None:
    """Every artifact_stream pump of ``rf`` has ended (they end soon after their iterator)."""
    deadline = time.monotonic() + timeout
    while rf._streams and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not rf._streams


def test_chunks_come_verified_in_order_and_join_to_the_content(served):
    addr, ref, content = served
    with fabric.open(addr, secret=SECRET) as rf:
        manifest, chunks = rf.artifact_stream(ref.key)
        got = list(chunks)
    assert manifest["digest"].hex() == ref.digest and len(manifest["chunks"]) == N_CHUNKS
    assert len(got) == N_CHUNKS and all(type(c) is bytes and len(c) == CHUNK for c in got)
    assert b"".join(got) == content


def test_the_artifact_is_never_gathered_the_node_pushes_only_ahead_of_the_caller(served, pushed):
    addr, ref, content = served
    with fabric.open(addr, secret=SECRET) as rf:
        manifest, chunks = rf.artifact_stream(ref.key)
        first = next(chunks)
        time.sleep(0.5)  # room for a gathering client to take everything
        ahead = pushed["items"]
        rest = list(chunks)
    # the manifest record (one item) + the chunk taken + FILL_AHEAD waiting + one held by the
    # reader, + at most the stream's credit window the node may push beyond what was read
    bound = 1 + 1 + remote.FILL_AHEAD + 1 + net.DEFAULT_CREDIT
    assert bound < N_CHUNKS
    assert ahead <= bound, f"{ahead} of {N_CHUNKS + 1} items received before the caller took the second chunk"
    assert first + b"".join(rest) == content


def test_a_chunk_altered_in_transit_is_data_loss_from_the_iterator(served, monkeypatch):
    addr, ref, _ = served
    real = net.ClientCall.receive
    n = {"items": 0}

    async def receive(self):
        ev = await real(self)
        if isinstance(ev, StreamData):
            n["items"] += 1
            if n["items"] == 6:  # item 0 is the manifest record: this is chunk 4
                return StreamData(ev.req_id, ev.data[:-1] + bytes([ev.data[-1] ^ 1]))
        return ev

    monkeypatch.setattr(net.ClientCall, "receive", receive)
    with fabric.open(addr, secret=SECRET) as rf:
        _, chunks = rf.artifact_stream(ref.key)
        got = [next(chunks) for _ in range(4)]
        with pytest.raises(FabricError) as ei:
            next(chunks)
        assert ei.value.status_code is StatusCode.DATA_LOSS and "does not match its key" in ei.value.message
        assert len(got) == 4
        with pytest.raises(StopIteration):
            next(chunks)  # ended for good
        monkeypatch.setattr(net.ClientCall, "receive", real)
        assert rf.get(ref.key).tobytes() == served[2]  # the client and its node go on


@pytest.mark.parametrize("how", ["close", "drop"])
def test_an_abandoned_iterator_ends_the_stream_and_the_client_goes_on(served, how):
    addr, ref, content = served
    with fabric.open(addr, secret=SECRET) as rf:
        for _ in range(3):  # more than once: nothing is left holding a stream or a thread
            _, chunks = rf.artifact_stream(ref.key)
            next(chunks)
            if how == "close":
                chunks.close()
                with pytest.raises(StopIteration):
                    next(chunks)
            else:
                del chunks
                gc.collect()
        _no_stream_left(rf)
        assert rf.get(ref.key).tobytes() == content


def test_closing_the_client_with_a_stream_open_neither_hangs_nor_yields_more(served):
    addr, ref, _ = served
    rf = fabric.open(addr, secret=SECRET)
    _, chunks = rf.artifact_stream(ref.key)
    next(chunks)
    t = threading.Thread(target=rf.close)
    t.start()
    t.join(15)
    assert not t.is_alive(), "close() hung on an open artifact stream"
    with pytest.raises(FabricError) as ei:
        for _ in range(N_CHUNKS):
            next(chunks)
    assert ei.value.status_code is StatusCode.FAILED_PRECONDITION and "closed" in ei.value.message
    with pytest.raises(FabricError) as ei:
        rf.artifact_stream(ref.key)
    assert ei.value.status_code is StatusCode.FAILED_PRECONDITION


def test_a_key_the_node_lacks_is_not_found_before_any_iterator(served):
    addr, _, _ = served
    from cassette.keys import ContentKey

    missing = ContentKey.of("artifact", b"not a manifest anyone stored")
    with fabric.open(addr, secret=SECRET) as rf:
        with pytest.raises(FabricError) as ei:
            rf.artifact_stream(missing)
        assert ei.value.status_code is StatusCode.NOT_FOUND
        with pytest.raises(FabricError) as ei:
            rf.artifact_stream(ContentKey.of("blob", b"x"))
        assert ei.value.status_code is StatusCode.INVALID_ARGUMENT and "materialize" in ei.value.message
        assert not rf._streams


@pytest.mark.skipif(gpu.available(), reason="checks the no-GPU path")
def test_gpu_materialize_through_a_node_without_cupy_is_failed_precondition(served):
    addr, ref, _ = served
    with fabric.open(addr, secret=SECRET) as rf:
        with pytest.raises(FabricError) as ei:
            gpu.materialize(ref, source=rf)
        assert ei.value.status_code is StatusCode.FAILED_PRECONDITION and "evalfabric[gpu]" in ei.value.message
        assert not rf._streams


@contextlib.contextmanager
def _streaming_from_own_node(tmp_path, name: str):
    """A node of this test's own holding a 64-chunk artifact, a client, and an open stream of it
    whose first chunk was taken: yields ``(client, node process, ref, chunk iterator)``."""
    with node(tmp_path, name, "--durability", "fast") as (addr, proc, _):
        with fabric.open(addr, secret=SECRET) as rf:
            ref = rf.put(np.arange(1 << 18, dtype=np.uint32), chunk_size=CHUNK)
            assert ref.chunks == N_CHUNKS
            _, chunks = rf.artifact_stream(ref.key)
            next(chunks)
            yield rf, proc, ref, chunks


def test_a_node_killed_mid_stream_is_unavailable_from_the_iterator_not_a_hang(tmp_path):
    with _streaming_from_own_node(tmp_path, "doomed") as (rf, proc, ref, chunks):
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        taken = 1
        with pytest.raises(FabricError) as ei:
            for _ in chunks:
                taken += 1
        assert ei.value.status_code is StatusCode.UNAVAILABLE and ei.value.retryable
        assert taken < ref.chunks  # what had arrived, verified; then the error, not a short count
        _no_stream_left(rf)


# ---------------------------------------------------------------- deadlines
@pytest.fixture
def short_get_deadline(monkeypatch):
    """The get / get_into policies with a 0.3 s deadline (their attempts unchanged)."""
    import dataclasses

    from fabric import errors

    wait = 0.3
    for op in ("get", "get_into"):
        monkeypatch.setitem(errors.DEFAULT_POLICIES, op, dataclasses.replace(errors.DEFAULT_POLICIES[op], deadline_s=wait))
    return wait


def test_a_transfer_longer_than_the_get_deadline_completes_while_chunks_keep_coming(served, short_get_deadline):
    addr, ref, content = served
    pause = 2 * short_get_deadline / N_CHUNKS * 4  # the whole transfer takes ~8 deadlines; no wait for the node takes one
    with fabric.open(addr, secret=SECRET) as rf:
        t0 = time.monotonic()
        _, chunks = rf.artifact_stream(ref.key)
        got = []
        for c in chunks:
            got.append(c)
            time.sleep(pause)
        assert b"".join(got) == content and time.monotonic() - t0 > 4 * short_get_deadline

        t0 = time.monotonic()
        value = rf.get(ref.key, progress=lambda n: time.sleep(pause))  # a slow consumer: the copy side waits
        assert value.tobytes() == content and time.monotonic() - t0 > 4 * short_get_deadline


def test_a_node_that_stops_sending_mid_transfer_is_deadline_exceeded_after_the_wait(tmp_path, short_get_deadline):
    with _streaming_from_own_node(tmp_path, "paused") as (rf, proc, ref, chunks):
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            with pytest.raises(FabricError) as ei:
                for _ in chunks:
                    pass
            assert ei.value.status_code is StatusCode.DEADLINE_EXCEEDED and "did not arrive within 0.3 s" in ei.value.message
            assert time.monotonic() - t0 < 10
            with pytest.raises(FabricError) as ei:
                rf.get(ref.key)  # every attempt stalls: the last one's error, after a few waits
            assert ei.value.status_code is StatusCode.DEADLINE_EXCEEDED
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        assert rf.get(ref.key).tobytes() == np.arange(1 << 18, dtype=np.uint32).tobytes()  # serving again
