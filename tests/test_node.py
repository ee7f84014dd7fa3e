"""Peer node over the authenticated wire: real `fabric node` subprocesses on 127.0.0.1."""

from __future__ import annotations

import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings, strategies as st
from prometheus_client import REGISTRY

import fabric
from cassette import codec
from cassette.keys import ContentKey
from cassette.record import pack_record
from cassette.store import Cassette
from fabric.errors import FabricError, StatusCode
from fabric.remote import RemoteFabric

from _nodes import EVALUATORS, FABRIC, ROOT, SECRET, _readline, node, realize_at_once, start_node, stop_node, wait_until


def _records(data: Path) -> int:
    with Cassette(data) as c:
        return c.stats()["records"]


def test_remote_realize_computed_then_local_second_client_same_bytes(tmp_path):
    with node(tmp_path) as (addr, proc, data):
        a = fabric.open(addr, secret=SECRET)
        b = fabric.open(addr, secret=SECRET)
        assert isinstance(a, fabric.Fabric)  # DESIGN: fabric.open(path | address) gives a Fabric
        try:
            req = fabric.Request("text.stats", {"text": "to be or not to be"}, version="1")
            first = a.realize(req)
            assert first.source == "computed"
            second = a.realize(fabric.Request("text.stats", {"text": "to be or not to be"}, version="1"))
            assert second.source == "local" and second.holder == first.holder
            other = b.realize(fabric.Request("text.stats", {"text": "to be or not to be"}))  # version resolved by the node
            assert other.source == "local" and other.key == first.key
            assert codec.encode(other.value) == codec.encode(first.value)
            assert first.value["words"] == 6
        finally:
            a.close()
            b.close()


def test_a_realize_key_hint_answers_hits_but_is_never_trusted(tmp_path):
    """specs/wire.md section 13: the optional ``key`` of a realize body is a lookup hint only."""
    from fabric.net import open_connection
    from fabric.remote import _take_record
    from fabric.serve import verify_record

    with node(tmp_path) as (addr, proc, data):
        held = fabric.Request("text.stats", {"text": "a b"}, version="1")
        other = fabric.Request("text.stats", {"text": "c d e"}, version="1")
        with fabric.open(addr, secret=SECRET) as f:
            assert f.realize(held).source == "computed"

            async def ask(body):
                host, port = addr.rsplit(":", 1)
                async with await open_connection(host, int(port), SECRET) as client:
                    reply, items = await client.call("realize", body)
                    return reply, _take_record(reply, items)[0]

            # a hint naming a held key is answered from it, whatever the args say ...
            body = {"evaluator": "text.stats", "version": "1", "args": other.args, "key": held.key}
            reply, raw = trio.run(ask, body)
            assert reply["source"] == "local" and verify_record(raw, held.key).key == held.key
            # (a client detects that: see test_a_peer_answering_with_another_requests_intact_record_is_data_loss)
            # a miss ignores the hint: computed and recorded under the key of the args
            reply, raw = trio.run(ask, {**body, "key": ContentKey.of("request", b"nothing held")})
            assert reply["source"] == "computed" and reply["key"] == other.key
            assert verify_record(raw, other.key).key == other.key
            assert f.realize(other).source == "local"
        assert _records_after_stop(proc, data) == 2


def test_fabric_node_env_routes_the_default_fabric(tmp_path):
    with node(tmp_path) as (addr, proc, data):
        (tmp_path / "s").write_bytes(SECRET)
        code = "import fabric; r = fabric.realize(fabric.Request('text.embed', {'text': 'x y', 'dim': 4}, version='1')); print(r.source, r.holder)"
        env = dict(os.environ, FABRIC_NODE=addr, FABRIC_SECRET_FILE=str(tmp_path / "s"), FABRIC_HOME=str(tmp_path / "unused"))
        out = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60) for _ in range(2)]
        assert [o.returncode for o in out] == [0, 0], out[0].stderr
        assert [o.stdout.split()[0] for o in out] == ["computed", "local"]
        assert not (tmp_path / "unused").exists()  # nothing was computed in-process


def test_evaluator_error_reaches_remote_caller_with_type_and_message(tmp_path):
    with node(tmp_path) as (addr, proc, data):
        with fabric.open(addr, secret=SECRET) as f:
            with pytest.raises(ValueError, match="^kaput$"):
                f.realize(fabric.Request("fail.always", {"message": "kaput"}, version="1"))
            with pytest.raises(FabricError) as ei:
                f.realize(fabric.Request("no.such", {}))
            assert ei.value.status_code is StatusCode.NOT_FOUND
            # the list is the node's registry, and the message says so
            assert f"on node {f.node_id}: no evaluator named 'no.such'" in ei.value.message and "text.stats@1" in ei.value.message
        assert _records_after_stop(proc, data) == 0


def test_realize_many_pipelines_hits_and_misses_in_order_each_evaluated_once(tmp_path):
    """realize_many answers in request order, each reply verified as realize verifies it:
    held keys as local hits, new ones computed once (a repeat inside the batch is one
    computation); a failing request raises its own error after the others are recorded."""
    texts = [f"text number {i} of the batch" for i in range(30)]
    log = tmp_path / "evals.log"
    with node(tmp_path, env={"FABRIC_EVAL_LOG": str(log)}) as (addr, proc, data):
        with fabric.open(addr, secret=SECRET) as f:
            for t in texts[:10]:
                assert f.realize(fabric.Request("text.stats", {"text": t}, version="1")).source == "computed"
            reqs = [fabric.Request("text.stats", {"text": t}, version="1") for t in texts + texts[25:]]
            reps = f.realize_many(reqs)
            assert [r.key for r in reps] == [r.key for r in reqs]
            assert [r.source for r in reps[:10]] == ["local"] * 10
            assert {r.source for r in reps[10:25]} == {"computed"}
            assert [r.value["words"] for r in reps] == [len(t.split()) for t in texts + texts[25:]]
            assert reps[-5:][0].value == reps[25].value  # a repeat in the batch: same reply
            assert all(r.source == "local" for r in f.realize_many(reqs))
            assert [ln.split()[0] for ln in log.read_text().splitlines()] == ["text.stats"] * len(texts)  # once per distinct request
            runs = f.stats()["node"]
            bad = [fabric.Request("text.stats", {"text": "one more"}, version="1"),
                   fabric.Request("fail.always", {"message": "kaput"}, version="1"),
                   fabric.Request("text.stats", {"text": "and another"}, version="1")]
            with pytest.raises(ValueError, match="^kaput$"):
                f.realize_many(bad)
            assert [f.realize(r).source for r in (bad[0], bad[2])] == ["local", "local"]  # recorded nonetheless
            assert runs["local_hits"] >= 10 + len(reqs)
    assert _records(data) == len(texts) + 2


def _records_after_stop(proc, data) -> int:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    return _records(data)


def test_wrong_secret_is_unauthenticated_and_node_keeps_serving(tmp_path):
    with node(tmp_path) as (addr, proc, data):
        bad = RemoteFabric(addr, b"not-the-secret-at-all-0123456789")
        with pytest.raises(FabricError) as ei:
            bad.realize(fabric.Request("text.embed", {"text": "secret stuff", "dim": 4}, version="1"))
        bad.close()
        assert ei.value.status_code is StatusCode.UNAUTHENTICATED
        # garbage before any handshake, and a silent connection, while others are served
        host, port = addr.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as garbage, socket.create_connection((host, int(port)), timeout=5) as silent:
            garbage.sendall(b"\x00\x00\x00\x05hello" + os.urandom(64))
            got = _recv_all(garbage, 2.0)
            assert b"secret stuff" not in got
            with fabric.open(addr, secret=SECRET) as good:
                assert good.realize(fabric.Request("text.embed", {"text": "a b", "dim": 4}, version="1")).source == "computed"
            assert silent.fileno() >= 0
        assert proc.poll() is None
        assert _records_after_stop(proc, data) == 1  # nothing from the bad peers
        assert "UNAUTHENTICATED" in proc.log_path.read_text()


def test_a_short_secret_file_with_a_newline_serves_clients_proving_either_form(tmp_path):
    """``echo s3cret > F``: the node starts (warning that the secret is short) and accepts
    ``secret=b"s3cret"`` (what ``--secret-file F`` on a client reads) and the file's exact bytes."""
    secret_file = tmp_path / "short"
    secret_file.write_bytes(b"s3cret\n")
    data = tmp_path / "n"
    log = open(tmp_path / "n.log", "w")
    proc = subprocess.Popen([FABRIC, "node", "--data", str(data), "--listen", "127.0.0.1:0", "--secret-file", str(secret_file),
                             "--evaluators", EVALUATORS], stdout=subprocess.PIPE, stderr=log, text=True, cwd=str(ROOT))
    log.close()
    try:
        line = _readline(proc, 30)
        assert line.startswith("listening on "), line
        addr = line.split()[2]
        req = fabric.Request("text.embed", {"text": "short secret", "dim": 4}, version="1")
        for secret, source in ((b"s3cret", "computed"), (b"s3cret\n", "local")):
            with fabric.open(addr, secret=secret) as f:
                assert f.realize(req).source == source
        with pytest.raises(FabricError) as ei, fabric.open(addr, secret=b"s3cre") as f:
            f.realize(req)
        assert ei.value.status_code is StatusCode.UNAUTHENTICATED
    finally:
        stop_node(proc)
    text = (tmp_path / "n.log").read_text()
    assert "the shared secret is 6 bytes" in text and "s3cret" not in text


def _recv_all(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    out = b""
    try:
        while True:
            b = sock.recv(65536)
            if not b:
                return out
            out += b
    except (socket.timeout, ConnectionResetError):
        return out


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.binary(min_size=0, max_size=300), min_size=1, max_size=4))
def test_malformed_frames_against_a_live_node_never_kill_it(live_node, chunks):
    addr, proc = live_node
    host, port = addr.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        for c in chunks:
            try:
                s.sendall(c)
            except OSError:
                break  # the node already closed this connection: fine
        try:
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        _recv_all(s, 1.0)
    assert proc.poll() is None


@pytest.fixture(scope="module")
def live_node(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("live")
    with node(tmp) as (addr, proc, data):
        yield addr, proc
        with fabric.open(addr, secret=SECRET) as f:  # still serving after all the garbage
            assert f.realize(fabric.Request("text.embed", {"text": "still here", "dim": 4}, version="1")).value.shape == (4,)
        assert proc.poll() is None


def test_oversized_frame_claim_is_refused_without_allocation(live_node):
    addr, proc = live_node
    host, port = addr.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall((2**31 - 1).to_bytes(4, "big"))
        assert _recv_all(s, 3.0) is not None
    assert proc.poll() is None


async def _evil_server(task_status=trio.TASK_STATUS_IGNORED):
    """A peer that knows the secret but answers every realize with altered payload bytes."""
    from fabric.net import serve

    async def handler(call):
        body = call.body
        key = ContentKey.for_request(body["evaluator"], body["version"] or "1", body["args"])
        raw = bytearray(pack_record(key, codec.encode("honest answer"), evaluator=body["evaluator"], version="1",
                                    created=0.0, compute_s=0.0, node="evil"))
        raw[-3] ^= 0x20  # alter one payload byte
        return {"key": key, "source": "local", "holder": "evil", "record": bytes(raw)}

    await serve("127.0.0.1", 0, SECRET, handler, node_id="evil", task_status=task_status)


def test_altered_bytes_from_a_peer_are_data_loss_and_nothing_is_recorded(tmp_path):
    async def main():
        async with trio.open_nursery() as nursery:
            listening = await nursery.start(_evil_server)
            evil = f"{listening.host}:{listening.port}"
            direct = RemoteFabric(evil, SECRET)
            with pytest.raises(FabricError) as ei:
                await direct.arealize(fabric.Request("text.stats", {"text": "x"}, version="1"))
            assert ei.value.status_code is StatusCode.DATA_LOSS
            # a relay node in front of the evil peer must not record what it got
            def run_relay():
                with node(tmp_path, "relay", "--relay", evil) as (addr, proc, data):
                    with fabric.open(addr, secret=SECRET) as f:
                        with pytest.raises(FabricError) as ej:
                            f.realize(fabric.Request("text.stats", {"text": "x"}, version="1"))
                        assert ej.value.status_code is StatusCode.DATA_LOSS
                    return _records_after_stop(proc, data)

            recorded = await trio.to_thread.run_sync(run_relay)
            assert recorded == 0
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_a_peer_answering_with_another_requests_intact_record_is_data_loss():
    """What a node may answer from a realize's key hint is checked: the record must be the asker's."""
    async def swapper(call):
        key = ContentKey.for_request("text.stats", "1", {"text": "something else"})
        raw = pack_record(key, codec.encode({"words": 2}), evaluator="text.stats", version="1",
                          created=0.0, compute_s=0.0, node="swapper")
        return {"key": key, "source": "local", "holder": "swapper", "record": raw}

    async def main():
        from fabric.net import serve

        async with trio.open_nursery() as nursery:
            listening = await nursery.start(lambda task_status: serve("127.0.0.1", 0, SECRET, swapper, task_status=task_status))
            client = RemoteFabric(f"{listening.host}:{listening.port}", SECRET)
            with pytest.raises(FabricError) as ei:
                await client.arealize(fabric.Request("text.stats", {"text": "x"}, version="1"))
            assert ei.value.status_code is StatusCode.DATA_LOSS and "another request" in ei.value.message
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_relay_serves_from_upstream_and_becomes_a_holder(tmp_path):
    with node(tmp_path, "upstream") as (up, up_proc, up_data):
        with node(tmp_path, "relay", "--relay", up) as (relay, relay_proc, relay_data):
            with fabric.open(relay, secret=SECRET) as f:
                first = f.realize(fabric.Request("linalg.spectrum", {"seed": 3, "n": 8}, version="1"))
                second = f.realize(fabric.Request("linalg.spectrum", {"seed": 3, "n": 8}, version="1"))
            assert first.source == "peer" and second.source == "local"
            assert _records_after_stop(relay_proc, relay_data) == 1
        with fabric.open(up, secret=SECRET) as g:
            assert g.realize(fabric.Request("linalg.spectrum", {"seed": 3, "n": 8}, version="1")).source == "local"


def test_a_second_node_on_the_same_data_dir_is_refused_until_the_first_is_gone(tmp_path):
    """Two nodes on one cassette would gossip under one node id: the second is refused with
    one FAILED_PRECONDITION line naming the first's pid, and the directory is untouched.
    Embedded use of the directory beside the node goes on; once the node is killed -9, a new
    node serves the directory (the lock does not outlive its holder)."""
    addr, first, data = start_node(tmp_path, "shared")
    try:
        with fabric.open(addr, secret=SECRET) as f:
            f.realize(fabric.Request("text.stats", {"text": "held once"}, version="1"))
        second = subprocess.run([FABRIC, "node", "--data", str(data), "--listen", "127.0.0.1:0", "--secret-file",
                                 str(tmp_path / "secret"), "--evaluators", EVALUATORS],
                                capture_output=True, text=True, timeout=60, cwd=str(ROOT))
        assert second.returncode != 0 and second.stdout == ""
        err = second.stderr.strip().splitlines()
        assert err[-1] == f"fabric node: error: FAILED_PRECONDITION: another fabric node (pid {first.pid}) is serving {data}; run one node per data directory"
        with fabric.open(data) as embedded:  # not a node: no lock taken
            assert embedded.realize(fabric.Request("text.stats", {"text": "held once"}, version="1")).source == "local"
    finally:
        stop_node(first, signal.SIGKILL)
    again, proc, _ = start_node(tmp_path, "shared")
    try:
        with fabric.open(again, secret=SECRET) as f:
            assert f.realize(fabric.Request("text.stats", {"text": "held once"}, version="1")).source == "local"
    finally:
        assert stop_node(proc) == 0


def test_concurrent_askers_on_a_relay_share_one_upstream_forward(tmp_path):
    """Eight clients of a relay ask at once for what neither node holds: the relay forwards it
    upstream once; the askers that came meanwhile are answered from the relay's cassette
    ("local"), and the upstream handled a single realize (it used to get eight)."""
    req = fabric.Request("slow.square", {"x": 77, "delay": 1.5}, version="1")
    with node(tmp_path, "upstream") as (up, up_proc, up_data):
        with node(tmp_path, "relay", "--relay", up) as (relay, relay_proc, relay_data):
            replies = realize_at_once(relay, req, 8)
            assert {r.value for r in replies} == {77 * 77}
            assert sorted(r.source for r in replies) == ["local"] * 7 + ["peer"]
        with fabric.open(up, secret=SECRET) as g:
            st = g.stats()["node"]
        assert (st["metrics"]['fabric_operation_latency_seconds_count{op="node_realize"}'], st["local_hits"]) == (1, 0)


def test_a_relay_without_the_evaluator_serves_requests_naming_no_version_from_its_own_cassette(tmp_path):
    """A client and a relay that do not know the evaluator: the relay answers such a request
    from its cassette under the version its upstream resolved it to, even with the upstream gone."""
    with node(tmp_path, "upstream") as (up, up_proc, up_data):
        log = open(tmp_path / "relay.log", "w")
        relay_proc = subprocess.Popen([FABRIC, "node", "--data", str(tmp_path / "relay"), "--listen", "127.0.0.1:0",
                                       "--secret-file", str(tmp_path / "secret"), "--relay", up],  # no --evaluators
                                      stdout=subprocess.PIPE, stderr=log, text=True, cwd=str(ROOT))
        log.close()
        try:
            relay = _readline(relay_proc, 30).split()[2]
            req = fabric.Request("text.stats", {"text": "relay me"})
            req.version = None  # as a client that has not registered text.stats sends it
            with fabric.open(relay, secret=SECRET) as f:
                assert f.realize(req).source == "peer"
                assert f.realize(req).source == "local"
                stop_node(up_proc)
                rep = f.realize(req)
            assert rep.source == "local" and rep.key == fabric.Request("text.stats", {"text": "relay me"}, version="1").key
        finally:
            stop_node(relay_proc)


def test_64_clients_200_requests_each_distinct_request_evaluated_once(tmp_path):
    log = tmp_path / "evals.log"
    with node(tmp_path, env={"FABRIC_EVAL_LOG": str(log)}) as (addr, proc, data):
        distinct = 300
        rng = random.Random(5)
        plans = [[rng.randrange(distinct) for _ in range(200)] for _ in range(64)]
        bad: list = []
        computed = 0

        async def client(i: int, plan: list[int]):
            nonlocal computed
            f = RemoteFabric(addr, SECRET)
            for x in plan:
                rep = await f.arealize(fabric.Request("slow.square", {"x": x, "delay": 0.0}, version="1"))
                computed += rep.source == "computed"
                if rep.value != x * x:
                    bad.append((i, x, rep.value))

        async def main():
            with trio.fail_after(240):
                async with trio.open_nursery() as nursery:
                    for i, plan in enumerate(plans):
                        nursery.start_soon(client, i, plan)

        trio.run(main)
        assert bad == []
        asked = {x for plan in plans for x in plan}
        runs = log.read_text().splitlines()
        assert len(runs) == len(asked)
        assert computed == len(asked)  # one "computed" reply per evaluator run; every other caller a hit
        assert _records_after_stop(proc, data) == len(asked)


def test_sigterm_during_a_write_burst_keeps_every_acknowledged_record(tmp_path):
    with node(tmp_path) as (addr, proc, data):
        acked: list[int] = []

        async def main():
            f = RemoteFabric(addr, SECRET)

            async def writer(start: int):
                for x in range(start, start + 10_000, 16):
                    try:
                        rep = await f.arealize(fabric.Request("slow.square", {"x": x, "delay": 0.001}, version="1"))
                    except FabricError:
                        return  # the node went away: stop
                    assert rep.value == x * x
                    acked.append(x)

            with trio.fail_after(120):
                async with trio.open_nursery() as nursery:
                    for s in range(16):
                        nursery.start_soon(writer, s)
                    while len(acked) < 150:
                        await trio.sleep(0.01)
                    proc.send_signal(signal.SIGTERM)

        trio.run(main)
        assert proc.wait(30) == 0
        assert len(acked) >= 150
        with Cassette(data) as c:
            for x in acked:
                key = ContentKey.for_request("slow.square", "1", {"x": x, "delay": 0.001})
                assert c.lookup_value(key) == x * x
            assert c.verify().ok


def _retries(op: str, status: str) -> float:
    return REGISTRY.get_sample_value("fabric_operation_retries_total", {"op": op, "status": status}) or 0.0


def test_a_connection_the_node_closed_as_idle_is_redialled_without_a_failed_attempt(tmp_path, monkeypatch):
    """A node closes connections idle past ``--idle-timeout``; the client's next request must
    go out on a fresh connection, not into the closed one (which costs an attempt and a backoff)."""
    monkeypatch.setattr("fabric.net.REUSE_CHECK_AFTER_S", 0.05)
    with node(tmp_path, "node", "--idle-timeout", "0.2") as (addr, proc, data):
        f = fabric.open(addr, secret=SECRET)
        try:
            req = fabric.Request("text.stats", {"text": "idle then busy"}, version="1")
            assert f.realize(req).source == "computed"
            before = _retries("realize", "UNAVAILABLE")
            for n in range(1, 4):  # each quiet spell ends with the node's goodbye (logged once it is sent)
                deadline = time.monotonic() + 20
                while proc.log_path.read_text().count("closing idle connection") < n:
                    assert time.monotonic() < deadline, "the node never closed the idle connection"
                    time.sleep(0.05)
                rep = f.realize(req)
                assert rep.source == "local" and rep.value["words"] == 3
            assert _retries("realize", "UNAVAILABLE") == before
        finally:
            f.close()


def test_node_cli_errors_are_one_line(tmp_path):
    r = subprocess.run([FABRIC, "node", "--data", str(tmp_path / "d"), "--listen", "nonsense"], capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    assert len(r.stderr.strip().splitlines()) == 1
    (tmp_path / "secret").write_bytes(SECRET)
    r = subprocess.run([FABRIC, "node", "--data", str(tmp_path / "d"), "--secret-file", str(tmp_path / "secret"),
                        "--idle-timeout", "0"], capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert "INVALID_ARGUMENT" in r.stderr and "idle_timeout_s" in r.stderr
    r = subprocess.run([FABRIC, "node", "--help"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "--listen" in r.stdout


def test_a_node_logs_each_connection_event_at_its_default_level(tmp_path):
    with node(tmp_path) as (addr, proc, _):
        with fabric.open(addr, secret=SECRET) as f:
            f.realize(fabric.Request("text.stats", {"text": "secret payload words"}))
        with fabric.open(addr, secret=SECRET) as f:  # a second connection, for a second pair of lines
            f.stats()
        deadline = time.monotonic() + 10
        while proc.log_path.read_text().count("closed cleanly") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    log = proc.log_path.read_text()
    assert log.count(" INFO authenticated 127.0.0.1:") == 2, log
    assert log.count(" INFO connection from 127.0.0.1:") >= 2 and log.count("closed cleanly") >= 2, log
    assert "payload" not in log and SECRET.decode() not in log


def test_a_peer_chosen_node_id_cannot_forge_log_lines(tmp_path):
    """A client proves the secret with a node id holding a line break and a terminal escape:
    the node's log shows them escaped inside its one 'authenticated' line, and no line of
    the log starts with the forged text."""
    from fabric.net import open_connection

    evil = "agent\n2026-01-01 00:00:00,000 fabric.node INFO forged line\x1b[2J"
    with node(tmp_path) as (addr, proc, _):
        host, port = addr.rsplit(":", 1)

        async def main() -> None:
            async with await open_connection(host, int(port), SECRET, node_id=evil) as client:
                await client.stats()

        trio.run(main)
        deadline = time.monotonic() + 10
        while "closed cleanly" not in proc.log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
    lines = proc.log_path.read_text().splitlines()
    assert any(" INFO authenticated 127.0.0.1:" in ln and "node=agent\\x0a2026-01-01" in ln and "\\x1b[2J" in ln for ln in lines), lines
    assert not any("forged line" in ln and "authenticated" not in ln for ln in lines), lines
    assert "\x1b" not in "".join(lines)


def test_node_bind_failures_and_malformed_addresses_are_one_status_line(tmp_path):
    (tmp_path / "secret").write_bytes(SECRET)
    base = [FABRIC, "node", "--data", str(tmp_path / "d"), "--secret-file", str(tmp_path / "secret"), "--evaluators", EVALUATORS]
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cases = [
            (["--listen", f"127.0.0.1:{port}"], f"UNAVAILABLE: cannot listen on 127.0.0.1:{port}: Address already in use"),
            (["--metrics-port", str(port)], f"UNAVAILABLE: cannot serve metrics on 127.0.0.1:{port}: Address already in use"),
            (["--listen", "192.0.2.1:0"], "FAILED_PRECONDITION: cannot listen on 192.0.2.1:0: "),  # TEST-NET-1: not ours
            (["--metrics-port", "-5"], "INVALID_ARGUMENT: --metrics-port must be 0-65535, got -5"),
            (["--metrics-port", "65536"], "INVALID_ARGUMENT: --metrics-port must be 0-65535, got 65536"),
            (["--join", "garbage"], "INVALID_ARGUMENT: --join must be HOST:PORT (port 1-65535), got 'garbage'"),
            (["--join", "127.0.0.1:7001", "--join", "h:0"], "INVALID_ARGUMENT: --join must be HOST:PORT (port 1-65535), got 'h:0'"),
            (["--relay", "garbage"], "INVALID_ARGUMENT: --relay must be HOST:PORT (port 1-65535), got 'garbage'"),
        ]
        for extra, want in cases:
            r = subprocess.run([*base, *extra], capture_output=True, text=True, timeout=60)
            assert r.returncode == 1, (extra, r.stderr)
            assert r.stderr.startswith(f"fabric node: error: {want}") and r.stderr.count("\n") == 1, (extra, r.stderr)
            assert r.stdout == "", extra
    # a well-formed --join whose peer is not up (yet) is fine: it is dialled every round
    with node(tmp_path, "joiner", "--join", "127.0.0.1:1") as (addr, _, _):
        with fabric.open(addr, secret=SECRET) as f:
            assert f.realize(fabric.Request("text.stats", {"text": "a b"})).source == "computed"


def test_a_node_that_cannot_bind_leaves_its_data_dir_as_it_was(tmp_path):
    """The listen and metrics ports are bound before the cassette is created: a node that
    fails to start on a taken port leaves no cassette (nor node.lock) in --data, whether
    the directory did not exist or was empty."""
    (tmp_path / "secret").write_bytes(SECRET)
    (tmp_path / "empty").mkdir()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for extra in (["--listen", f"127.0.0.1:{port}"], ["--metrics-port", str(port)]):
            for data in (tmp_path / "fresh", tmp_path / "empty"):
                r = subprocess.run([FABRIC, "node", "--data", str(data), "--secret-file", str(tmp_path / "secret"), *extra],
                                   capture_output=True, text=True, timeout=30)
                assert r.returncode == 1 and r.stderr.count("\n") == 1 and "UNAVAILABLE: cannot " in r.stderr, (extra, r.stderr)
                assert not (tmp_path / "fresh").exists() and list((tmp_path / "empty").iterdir()) == [], extra


def test_a_relay_refuses_the_fleet_flags_it_would_ignore(tmp_path):
    """A relay forwards to one upstream and gossips with no fleet: --join and
    --gossip-interval on it were taken and ignored; each is one INVALID_ARGUMENT line,
    given before the port is bound (here a taken one) or anything is created."""
    (tmp_path / "secret").write_bytes(SECRET)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        base = [FABRIC, "node", "--data", str(tmp_path / "d"), "--secret-file", str(tmp_path / "secret"),
                "--listen", f"127.0.0.1:{busy.getsockname()[1]}", "--relay", "127.0.0.1:7001"]
        for flag, value in (("--join", "127.0.0.1:7002"), ("--gossip-interval", "2")):
            r = subprocess.run([*base, flag, value], capture_output=True, text=True, timeout=30)
            assert r.returncode == 1 and r.stdout == "", r.stderr
            assert r.stderr == (f"fabric node: error: INVALID_ARGUMENT: {flag} with --relay: "
                                "a relay forwards to its upstream and joins no fleet\n")
    assert not (tmp_path / "d").exists()


def test_a_node_id_other_than_the_data_dirs_is_refused_not_ignored(tmp_path):
    """--node-id names a new data directory's node; on an existing cassette of another node
    it was ignored (the node served as that other node).  It is one FAILED_PRECONDITION
    line naming both ids; the same id, or none, serves as before."""
    (tmp_path / "secret").write_bytes(SECRET)
    data = tmp_path / "d"
    Cassette(data, node_id="alpha").close()
    r = subprocess.run([FABRIC, "node", "--data", str(data), "--secret-file", str(tmp_path / "secret"), "--node-id", "beta"],
                       capture_output=True, text=True, timeout=15)
    assert r.returncode == 1 and r.stdout == "", r.stderr
    assert r.stderr == (f"fabric node: error: FAILED_PRECONDITION: --node-id 'beta': {data} is the cassette of node alpha "
                        "(a node id is set only when its data directory is new)\n")
    with node(tmp_path, "d", "--node-id", "alpha") as (addr, _, _):
        with fabric.open(addr, secret=SECRET) as f:
            assert f.stats()["node"]["node_id"] == "alpha"


def test_a_node_id_the_protocols_cannot_carry_is_refused_before_anything_is_created(tmp_path):
    """A node's id travels in the wire's ``auth`` (at most 128 UTF-8 bytes, specs/wire.md
    section 3) and in gossip (non-empty, specs/gossip.md section 2).  A --node-id of 129 bytes
    created the cassette under that id and then failed with INVALID_ARGUMENT 'node_id: ...',
    so every later start on that --data failed too; '' created a cassette of a random id and
    then was FAILED_PRECONDITION.  Each is one INVALID_ARGUMENT line naming --node-id, given
    before --data is touched; 128 bytes of multi-byte text serve."""
    (tmp_path / "secret").write_bytes(SECRET)
    data = tmp_path / "d"
    for bad, why in (("x" * 129, "--node-id: 129 UTF-8 bytes, at most 128 allowed"), ("", "--node-id: expected a non-empty str")):
        r = subprocess.run([FABRIC, "node", "--data", str(data), "--secret-file", str(tmp_path / "secret"), "--node-id", bad],
                           capture_output=True, text=True, timeout=15)
        assert r.returncode == 1 and r.stdout == "" and r.stderr.count("\n") == 1, r.stderr
        assert r.stderr.startswith(f"fabric node: error: INVALID_ARGUMENT: {why}"), r.stderr
        assert not data.exists(), bad
    with node(tmp_path, "d", "--node-id", "é" * 64) as (addr, _, _):
        with fabric.open(addr, secret=SECRET) as f:
            assert f.stats()["node"]["node_id"] == "é" * 64


#: Runs the ``fabric`` CLI in a fresh interpreter and reports its peak RSS (VmHWM, KiB) on stderr.
#: VmHWM belongs to the process's own memory map, which exec starts anew, so unlike a child's
#: ``ru_maxrss`` it does not include the test process's memory at fork.
_CLI_WITH_PEAK_RSS = ("import sys; from fabric.cli import main; rc = main(sys.argv[1:]); "
                      "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0].split()[1]; "
                      "print('VmHWM', hwm, file=sys.stderr); sys.exit(rc)")


def _cli_peak_rss(*args: str, timeout: float = 120) -> tuple[int, str]:
    """Run ``fabric ARGS`` in a fresh interpreter (it must succeed): ``(peak RSS in bytes, stdout)``."""
    r = subprocess.run([sys.executable, "-c", _CLI_WITH_PEAK_RSS, *args], capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    assert r.returncode == 0, r.stderr
    return int(r.stderr.split("VmHWM")[-1].split()[0]) << 10, r.stdout


_PROC_STATUS = pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads VmHWM from /proc (Linux)")
_BIG = 96 << 20  # bytes: 96 chunks of 1 MiB; holding it whole (or twice) shows far above the bound


@_PROC_STATUS
def test_cli_get_through_a_node_streams_an_artifact_to_the_file_in_bounded_memory(tmp_path):
    import numpy as np

    content = np.random.default_rng(11).integers(0, 256, _BIG, dtype=np.uint8)
    with fabric.open(tmp_path / "node", durability="fast") as f:
        small = f.put(b"one small chunk")
        big = f.put(content)
    assert big.chunks == 96
    with node(tmp_path) as (addr, proc, _):
        via = ["--node", addr, "--secret-file", str(tmp_path / "secret")]
        peak = {name: _cli_peak_rss("get", str(ref.key), *via, "-o", str(tmp_path / f"{name}.bin"))[0]
                for name, ref in (("small", small), ("big", big))}
        assert (tmp_path / "big.bin").read_bytes() == content.tobytes()
        assert (tmp_path / "small.bin").read_bytes() == b"one small chunk"
        # a few chunks in flight, never the artifact: gathering it (and copying it once to write) costs >= 2 x 96 MiB
        grew = peak["big"] - peak["small"]
        assert grew < _BIG // 2, f"fabric get of a 96 MiB artifact peaked {grew >> 20} MiB above a one-chunk get"
        assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]


def _minor_faults(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])


@_PROC_STATUS
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="fabric.allocator sets glibc's heap thresholds")
def test_a_node_serving_an_artifact_does_not_fault_in_fresh_memory_for_every_chunk(tmp_path):
    """With glibc's defaults a node faulted in about two fresh chunk buffers (~480 pages) per
    MiB it served, which halved its serving rate; its heap now keeps freed chunk buffers."""
    content = os.urandom(16 << 20)
    with fabric.open(tmp_path / "node", durability="fast") as f:
        ref = f.put(content)
    with node(tmp_path) as (addr, proc, _):
        with fabric.open(addr, secret=SECRET) as client:
            assert client.get(ref.key) == content  # warm-up: the heap reaches its working size
            before = _minor_faults(proc.pid)
            for _ in range(2):
                assert client.get(ref.key) == content
            per_mib = (_minor_faults(proc.pid) - before) / 32
    assert per_mib < 64, f"the node faulted in {per_mib:.0f} pages per MiB served"


@_PROC_STATUS
def test_cli_put_of_a_file_through_a_node_reads_it_a_chunk_at_a_time(tmp_path):
    content = os.urandom(_BIG)
    (tmp_path / "big.bin").write_bytes(content)
    (tmp_path / "small.bin").write_bytes(b"one small chunk")
    with node(tmp_path) as (addr, proc, _):
        via = ["--node", addr, "--secret-file", str(tmp_path / "secret")]
        runs = {name: _cli_peak_rss("put", str(tmp_path / f"{name}.bin"), *via) for name in ("small", "big")}
        grew = runs["big"][0] - runs["small"][0]
        assert grew < _BIG // 2, f"fabric put of a 96 MiB file through a node peaked {grew >> 20} MiB above a one-chunk put"
        key = json.loads(runs["big"][1])["key"]
        with fabric.open(addr, secret=SECRET) as rf:
            assert rf.get(key) == content


def test_cli_get_and_stats_through_a_node(tmp_path):
    import numpy as np

    data = tmp_path / "node"
    with fabric.open(data) as f:
        ref = f.put(np.arange(300_000, dtype=np.float64), chunk_size=1 << 20)  # 3 chunks
    with node(tmp_path) as (addr, proc, _):
        out = tmp_path / "got.bin"
        r = subprocess.run([FABRIC, "get", str(ref.key), "--node", addr, "--secret-file", str(tmp_path / "secret"), "-o", str(out)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        np.testing.assert_array_equal(np.frombuffer(out.read_bytes(), dtype="<f8"), np.arange(300_000, dtype=np.float64))
        r = subprocess.run([FABRIC, "stats", "--json", "--node", addr, "--secret-file", str(tmp_path / "secret")],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        st = json.loads(r.stdout)
        assert st["blobs"] == 3 and st["records"] == 1 and st["members"] == 1
        # the node's own fabric_* metrics, as the embedded stats have them
        assert st["metrics"][f'fabric_ledger_records{{node="{st["node_id"]}"}}'] == 1
        assert st["metrics"]["fabric_corrupt_reads_total"] == 0 and "fabric_gossip_rounds_total" in st["metrics"]
        r = subprocess.run([FABRIC, "stats", "--node", addr, "--secret-file", str(tmp_path / "secret")],
                           capture_output=True, text=True, timeout=60, env=dict(os.environ, COLUMNS="200"))
        assert r.returncode == 0, r.stderr
        assert "fabric_ledger_records" in r.stdout and "fabric_cache_misses_total" in r.stdout
        r = subprocess.run([FABRIC, "get", "artifact:" + "0" * 64, "--node", addr, "--secret-file", str(tmp_path / "secret")],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode != 0 and "NOT_FOUND" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_sigterm_lets_requests_in_flight_finish_and_answers_them_then_refuses_new_work(tmp_path):
    """SIGTERM while a slow realize runs: the node stops accepting connections, answers a new
    request on an open connection UNAVAILABLE (retryable: ask again elsewhere or later), and
    still sends the realize in flight its computed reply before it says goodbye and exits 0.
    (The reply used to be lost: the computation finished and was recorded while the node
    drained, but its connection was already closed, so the client failed UNAVAILABLE.)"""
    import threading

    from fabric.net import open_connection

    eval_log = tmp_path / "eval.log"
    addr, proc, data = start_node(tmp_path, "draining", env={"FABRIC_EVAL_LOG": str(eval_log)})
    slow = fabric.Request("slow.square", {"x": 41, "delay": 2.0}, version="1")
    got: list = []

    def computing(x: int):
        """A predicate: the node runs slow.square for ``x`` (its evaluator logged the run)."""
        return lambda: f"slow.square x={x} " in (eval_log.read_text() if eval_log.exists() else "")

    def draining() -> bool:
        return "wire server draining" in proc.log_path.read_text()

    def ask() -> None:
        with fabric.open(addr, secret=SECRET) as f:
            try:
                got.append(f.realize(slow, timeout=20))
            except Exception as exc:  # noqa: BLE001 - asserted below
                got.append(exc)

    host, port = addr.rsplit(":", 1)

    late: list = []
    raw: list = []

    async def main() -> None:
        async with await open_connection(host, int(port), SECRET) as client:
            async with trio.open_nursery() as nursery:

                async def slow_on_this_connection() -> None:
                    raw.append(await client.request("realize", {"evaluator": "slow.square", "version": "1",
                                                                "args": {"x": 42, "delay": 2.0}}))

                # waits on the node, not fixed sleeps: under load a late asker met a closed listener,
                # and a late drain let the 'late' request be served
                asker = threading.Thread(target=ask)
                asker.start()
                await trio.to_thread.run_sync(wait_until, computing(41), 20, "x=41 to be computing on the node")
                nursery.start_soon(slow_on_this_connection)  # last: its 2 s cover the drain and the late request
                await trio.to_thread.run_sync(wait_until, computing(42), 20, "x=42 to be computing on the node")
                proc.send_signal(signal.SIGTERM)
                await trio.to_thread.run_sync(wait_until, draining, 20, "the node to start draining")
                try:  # a new request on a connection that still has one in flight
                    await client.request("realize", {"evaluator": "text.stats", "version": "1", "args": {"text": "late"}})
                except FabricError as exc:
                    late.append(exc)
                await trio.to_thread.run_sync(asker.join, 30)

    try:
        trio.run(main)
        assert proc.wait(20) == 0
    finally:
        stop_node(proc)
    assert len(got) == 1 and not isinstance(got[0], Exception), got
    assert (got[0].value, got[0].source) == (41 * 41, "computed")
    assert raw[0]["source"] == "computed" and "record" in raw[0]
    assert len(late) == 1 and late[0].status_code is StatusCode.UNAVAILABLE and late[0].retryable
    assert late[0].message == "the node is shutting down; ask again (it or another node)"
    with socket.socket() as s2:  # the listener is gone
        assert s2.connect_ex((host, int(port))) != 0
    assert _records(data) == 2


def test_sigterm_while_the_node_is_still_starting_is_a_clean_shutdown(tmp_path):
    """A SIGTERM that lands while the node loads its evaluators (cassette already open)
    is held until it serves, then shuts it down as any SIGTERM does: exit 0, lock released."""
    started, go = tmp_path / "loading", tmp_path / "go"
    mod = tmp_path / "slow_evaluators.py"
    mod.write_text(
        "import pathlib, time\n"
        f"pathlib.Path({str(started)!r}).touch()\n"
        f"while not pathlib.Path({str(go)!r}).exists():\n"
        "    time.sleep(0.01)\n"
    )
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    data = tmp_path / "data"
    proc = subprocess.Popen([FABRIC, "node", "--data", str(data), "--listen", "127.0.0.1:0", "--secret-file", str(secret),
                             "--evaluators", str(mod)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(ROOT))
    try:
        deadline = time.monotonic() + 30
        while not started.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() is not None else "slow start"
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        go.touch()
        out, err = proc.communicate(timeout=30)
    finally:
        stop_node(proc)
    assert proc.returncode == 0, err
    assert out.startswith("listening on "), out
    assert "SIGTERM received, shutting down" in err and "stopped cleanly" in err
    with Cassette(data) as cas:  # closed cleanly: it opens again at once
        assert cas.stats()["records"] == 0


def test_a_client_outlives_a_kill_9_of_its_node_and_reconnects_once_it_is_back(tmp_path):
    """kill -9 of the node under a client: the next call is UNAVAILABLE after its retries
    (nothing listening), and once the node is back on the same port the same client
    object dials again by itself and is served what the node had recorded."""
    addr, proc, data = start_node(tmp_path)
    try:
        f = fabric.open(addr, secret=SECRET)
        req = fabric.Request("slow.square", {"x": 12, "delay": 0.0}, version="1")
        assert f.realize(req).source == "computed"
        proc.kill()
        proc.wait(10)
        with pytest.raises(FabricError) as ei:
            f.realize(fabric.Request("slow.square", {"x": 13, "delay": 0.0}, version="1"), timeout=10)
        assert ei.value.status_code in (StatusCode.UNAVAILABLE, StatusCode.DEADLINE_EXCEEDED)
        proc = subprocess.Popen([FABRIC, "node", "--data", str(data), "--listen", addr, "--secret-file", str(tmp_path / "secret"),
                                 "--evaluators", EVALUATORS], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=str(ROOT))
        assert _readline(proc, 30).startswith(f"listening on {addr} ")
        rep = f.realize(req)
        assert (rep.source, rep.value) == ("local", 144)  # recorded before the kill, served after it
        f.close()
    finally:
        stop_node(proc)


@pytest.mark.parametrize("flag, value", [("--gossip-interval", "0"), ("--gossip-interval", "-1"), ("--gossip-interval", "nan"),
                                         ("--drain-s", "-1"), ("--drain-s", "inf")])
def test_a_node_refuses_a_gossip_interval_or_drain_it_cannot_keep_before_creating_anything(tmp_path, capsys, flag, value):
    """``--gossip-interval 0`` gossiped in a busy loop (a round every 0 s) and ``--drain-s -1`` or
    ``inf`` made no sense: one INVALID_ARGUMENT line naming the flag, and ``--data`` is left as it was."""
    from fabric import cli

    data = tmp_path / "never"
    assert cli.main(["node", "--data", str(data), "--listen", "127.0.0.1:0", flag, value]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "INVALID_ARGUMENT" in err[0] and flag in err[0], err
    assert not data.exists()
