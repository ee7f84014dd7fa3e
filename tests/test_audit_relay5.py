"""Relay node (`fabric node --relay`): real node subprocesses and sockets on 127.0.0.1."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

import fabric
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
