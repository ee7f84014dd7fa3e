"""Relay node (`fabric node --relay`): real node subprocesses and sockets on 127.0.0.1."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import trio

import fabric
from cassette import codec
from cassette.keys import ContentKey
from cassette.record import pack_record
from cassette.store import Cassette
from fabric.errors import FabricError, StatusCode

from _nodes import SECRET, node, start_node, stop_node


def _records(data: Path) -> int:
    with Cassette(data) as c:
        return c.stats()["records"]


class _Slammer:
    """A TCP listener that accepts every connection and closes it at once (an upstream
    that is not a node, or is dying), counting the connections dialled to it."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.dials = 0
        self.addr = f"127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.dials += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()


def test_an_evaluators_error_through_a_relay_reaches_the_client_with_its_type(tmp_path):
    """Direct, the client gets ValueError("boom"); through a relay it got
    FabricError(INTERNAL, "handler for 'realize' failed: ValueError: boom"): the relay's own
    client call re-raised the upstream's fault as a ValueError, which the relay's handler
    then reported as its own bug.  Nothing is recorded on the relay."""
    req = fabric.Request("fail.always", {"message": "boom"}, version="1")
    with node(tmp_path, "up") as (up, _, _):
        relay, relay_proc, relay_data = start_node(tmp_path, "relay", "--relay", up)
        try:
            with fabric.open(relay, secret=SECRET) as f:
                with pytest.raises(ValueError, match="^boom$"):
                    f.realize(req, timeout=10)
        finally:
            assert stop_node(relay_proc) == 0
        assert _records(relay_data) == 0


def test_a_relay_forwards_each_client_attempt_once(tmp_path):
    """An upstream that drops every connection: the client gets UNAVAILABLE (retryable)
    after its 3 attempts, each forwarded upstream once (3 dials; it was 3 x 3 = 9, the relay
    retrying every attempt of a client that retries anyway), within moments."""
    up = _Slammer()
    try:
        with node(tmp_path, "relay", "--relay", up.addr) as (relay, _, _):
            with fabric.open(relay, secret=SECRET) as f:
                t0 = time.monotonic()
                with pytest.raises(FabricError) as ei:
                    f.realize(fabric.Request("text.stats", {"text": "down"}, version="1"), timeout=10)
                took = time.monotonic() - t0
            assert (ei.value.status_code, ei.value.retryable) == (StatusCode.UNAVAILABLE, True)
            assert up.dials == 3 and took < 5
    finally:
        up.close()


def test_get_and_get_into_through_a_relay_forward_a_miss_upstream_and_record_it(tmp_path):
    """An artifact (several chunks) and a reply held only upstream: a `get` / `get_into` through
    the relay was NOT_FOUND; now the relay gets them (verified, streamed into its cassette),
    records them, and serves them after the upstream is gone; its cassette verifies clean."""
    arr = np.arange(3 << 20, dtype=np.int32)  # 12 MiB: several chunks
    req = fabric.Request("text.stats", {"text": "a b a"}, version="1")
    up, up_proc, _ = start_node(tmp_path, "up")
    relay, relay_proc, relay_data = start_node(tmp_path, "relay", "--relay", up)
    try:
        with fabric.open(up, secret=SECRET) as g:
            ref = g.put(arr)
            rep = g.realize(req)
            blob = _first_chunk(g, ref)
        with fabric.open(relay, secret=SECRET) as f:
            assert np.array_equal(f.get(ref), arr)
            assert f.get(rep.key) == rep.value
            stop_node(up_proc)
            out = np.empty_like(arr)
            assert f.get_into(ref, out) is out and np.array_equal(out, arr)
            assert len(f.get(blob)) > 0
            assert f.realize(req).source == "local"
    finally:
        assert stop_node(relay_proc) == 0
        stop_node(up_proc)
    with Cassette(relay_data) as c:
        report = c.verify(raise_errors=False)
        assert c.stats()["records"] == 2 and report.ok, report


def _first_chunk(f, ref) -> ContentKey:
    """The key of ``ref``'s first chunk, read from its manifest record on the node."""
    manifest, chunks = f.artifact_stream(ref)
    chunks.close()
    return manifest["chunks"][0]


def test_a_relay_refuses_another_keys_record_from_its_upstream_for_a_get(tmp_path):
    """An upstream that answers `get` with an intact record of another key: DATA_LOSS at the
    relay's client, nothing recorded on the relay."""
    asked = ContentKey.for_request("text.stats", "1", {"text": "asked"})
    other = ContentKey.for_request("text.stats", "1", {"text": "something else"})
    raw = pack_record(other, codec.encode({"words": 2}), evaluator="text.stats", version="1",
                      created=0.0, compute_s=0.0, node="swapper")

    async def swapper(call):
        return {"key": asked, "holder": "swapper", "record": raw}

    async def main():
        from fabric.net import serve

        async with trio.open_nursery() as nursery:
            at = await nursery.start(lambda task_status: serve("127.0.0.1", 0, SECRET, swapper, task_status=task_status))

            def through_relay() -> int:
                relay, proc, data = start_node(tmp_path, "relay", "--relay", f"{at.host}:{at.port}")
                try:
                    with fabric.open(relay, secret=SECRET) as f:
                        with pytest.raises(FabricError) as ei:
                            f.get(asked)
                        assert ei.value.status_code is StatusCode.DATA_LOSS, ei.value
                finally:
                    assert stop_node(proc) == 0
                return _records(data)

            assert await trio.to_thread.run_sync(through_relay) == 0
            nursery.cancel_scope.cancel()

    trio.run(main)
