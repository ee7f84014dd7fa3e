"""Audit of DESIGN.md "Observability": each ``fabric_*`` family moves by exactly what a user
would expect after a real operation — embedded over a real LMDB directory, and through real
``fabric node`` subprocesses whose ``--metrics-port`` endpoint is scraped over HTTP on
127.0.0.1 and parsed with prometheus_client's own text parser.  ``fabric stats`` (``--data``
and ``--node``) shows the same samples; long transfers draw their progress bar on stderr.
"""

from __future__ import annotations

import gc
import json
import os
import pty
import re
import select
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import fabric
from fabric import metrics
from fabric.errors import FabricError
from fabric.placement import evaluator_capability
from gossip.membership import Member
from gossip.node import rendezvous_home

from _nodes import FABRIC, SECRET, start_node, stop_node, wait_until as _wait


# ------------------------------------------------------------------ reading samples
def _parse(text: str) -> dict[str, float]:
    """Every ``fabric_*`` sample of an exposition text as ``{'name{labels}': value}``, parsed by
    prometheus_client; a (name, labels) that appears twice fails (Prometheus rejects the scrape)."""
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        if not fam.name.startswith("fabric_"):
            continue
        for s in fam.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            name = f"{s.name}{{{labels}}}" if labels else s.name
            assert name not in out, f"duplicate sample {name}"
            out[name] = s.value
    return out


def _here() -> dict[str, float]:
    """This process's samples, as its /metrics would serve them."""
    return _parse(generate_latest(REGISTRY).decode())


def _scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return _parse(r.read().decode())


def _delta(before: dict[str, float], after: dict[str, float], *skip: str) -> dict[str, float]:
    """Samples that moved (bucket, sum and created samples left out, and names starting with ``skip``)."""
    out = {}
    for k in set(before) | set(after):
        name = k.split("{")[0]
        if name.endswith(("_bucket", "_sum", "_created")) or k.startswith(skip):
            continue
        d = after.get(k, 0.0) - before.get(k, 0.0)
        if d:
            out[k] = d
    return out


def _metrics_port(proc) -> int:
    """The port a node started with ``--metrics-port 0`` serves /metrics on (its latest log line
    saying so: a restarted node appends to the same log)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        ports = re.findall(r"metrics on http://[^ ]+:(\d+)/metrics", proc.log_path.read_text())
        if ports:
            return int(ports[-1])
        time.sleep(0.05)
    raise AssertionError("the node did not log its metrics address")


def _node_id(st: dict[str, float]) -> str:
    (k,) = [k for k in st if k.startswith("fabric_ledger_records{")]
    return k.split('"')[1]


# Gossip runs on its own clock: leave its families out of exact deltas unless asked for.
GOSSIP = ("fabric_gossip_", 'fabric_operation_latency_seconds_count{op="node_gossip"}', "fabric_ledger_")
HIT = 'fabric_cache_hits_total{source="local"}'
PEER_HIT = 'fabric_cache_hits_total{source="peer"}'
MISS = "fabric_cache_misses_total"
COALESCED = "fabric_singleflight_coalesced_total"


def _runs(ev: str) -> str:
    return f'fabric_evaluator_runs_total{{evaluator="{ev}"}}'


def _lat(op: str) -> str:
    return f'fabric_operation_latency_seconds_count{{op="{op}"}}'


def _err(op: str, status: str) -> str:
    return f'fabric_operation_errors_total{{op="{op}",status="{status}"}}'


def _ledger(node: str) -> tuple[str, str]:
    return f'fabric_ledger_records{{node="{node}"}}', f'fabric_ledger_bytes{{node="{node}"}}'


@fabric.evaluator("audit3.double", version="1")
def double(x: int) -> int:
    return 2 * x


_GATE = threading.Event()


@fabric.evaluator("audit3.gated", version="1")
def gated(x: int) -> int:
    assert _GATE.wait(10), "the test never opened the gate"
    return x


GATED_MODULE = '''
import os, time
import fabric

@fabric.evaluator("audit3.gated_file", version="1")
def gated_file(gate: str, x: int) -> int:
    """Returns ``x`` once the file ``gate`` exists (at most 15 s)."""
    deadline = time.monotonic() + 15
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.01)
    return x
'''


# ------------------------------------------------------------------ embedded
def test_embedded_miss_hit_not_found_and_layout_mismatch_move_exactly_their_samples(tmp_path):
    with fabric.open(tmp_path / "c") as fab:
        req = fabric.Request("audit3.double", {"x": 5})
        s0 = _here()
        fab.realize(req)
        s1 = _here()
        assert _delta(s0, s1, "fabric_ledger_") == {MISS: 1, _runs("audit3.double"): 1, _lat("realize"): 1}
        fab.realize(req)
        s2 = _here()
        assert _delta(s1, s2) == {HIT: 1}  # a local hit: counted, not timed
        missing = fabric.ContentKey.of("artifact", b"audit3 never put")
        with pytest.raises(FabricError) as ei:
            fab.get(missing)
        assert ei.value.status_code.name == "NOT_FOUND"
        s3 = _here()
        assert _delta(s2, s3) == {_lat("get"): 1, _err("get", "NOT_FOUND"): 1}

        ref = fab.put(np.arange(24, dtype=np.float32).reshape(4, 6))
        s4 = _here()
        fab.get_into(ref.key, np.empty((4, 6), dtype=np.float32))  # C-contiguous: in place
        assert _delta(s4, _here()) == {_lat("get_into"): 1}
        for out in (np.empty((6, 4), dtype=np.float32).T,  # Fortran order
                    np.empty((4, 12), dtype=np.float32)[:, ::2],  # strided
                    np.empty((4, 6), dtype=">f4")):  # other byte order
            before = _here()
            fab.get_into(ref.key, out)
            assert _delta(before, _here()) == {_lat("get_into"): 1, "fabric_layout_mismatch_total": 1}
            assert (out == np.arange(24, dtype=np.float32).reshape(4, 6)).all()


def test_a_realize_that_waited_on_an_identical_one_counts_coalesced_and_one_evaluator_run(tmp_path):
    _GATE.clear()
    req = fabric.Request("audit3.gated", {"x": 1})
    with fabric.open(tmp_path / "c") as fab:
        s0 = _here()
        sources: list[str] = []
        threads = [threading.Thread(target=lambda: sources.append(fab.realize(req).source)) for _ in range(2)]
        for t in threads:
            t.start()
        try:
            _wait(lambda: _here().get(COALESCED, 0) - s0.get(COALESCED, 0) == 1, 10, "the second realize to wait")
        finally:
            _GATE.set()
        for t in threads:
            t.join(10)
        # the leader computed (a miss), the follower got its record here (a local hit)
        assert sorted(sources) == ["computed", "local"]
        assert _delta(s0, _here(), "fabric_ledger_") == {MISS: 1, HIT: 1, COALESCED: 1, _runs("audit3.gated"): 1,
                                                         _lat("realize"): 2}


def test_ledger_gauges_are_the_cassettes_counts_one_sample_per_cassette_and_survive_a_restart(tmp_path):
    reqs = [fabric.Request("audit3.double", {"x": i}) for i in range(3)]
    with fabric.open(tmp_path / "c") as fab:
        node = fab.node_id
        keys = [fab.realize(r).key for r in reqs] + [fab.put(b"audit3 artifact %d" % i).key for i in range(2)]
        size = sum(len(fab.cassette.get_raw(k)) for k in keys)  # each ledger value: the record as stored
        with fabric.open(tmp_path / "c") as again:  # a second fabric on the same directory
            assert again.cassette is fab.cassette
            # was: one sample per fabric, so the same series twice (a scrape Prometheus rejects)
            st = _here()
        want = dict(zip(_ledger(node), (5, size)))
        assert {k: st[k] for k in _ledger(node)} == want
    del fab, again
    gc.collect()
    assert not any(k.startswith("fabric_ledger_") for k in _here())  # closed: no longer exported
    # a new process: the counts come from the cassette, not from a counter of the writer
    out = subprocess.run([FABRIC, "stats", "--data", str(tmp_path / "c"), "--json"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    assert (shown["records"], shown["ledger_bytes"]) == (5, size)
    assert {k: shown["metrics"][k] for k in _ledger(node)} == want


def test_the_local_hit_counter_never_goes_down_when_a_fabric_is_collected(tmp_path):
    req = fabric.Request("audit3.double", {"x": 99})
    fab = fabric.open(tmp_path / "c")
    fab.realize(req)
    before = _here()[HIT]
    fab.realize(req)
    fab.realize(req)
    fab.close()
    assert _here()[HIT] == before + 2
    del fab
    gc.collect()
    assert _here()[HIT] == before + 2  # was: back to `before` (a counter reset on every dropped fabric)


def test_retries_carry_the_op_of_the_public_call_as_its_latency_and_errors_do():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there
    key = fabric.ContentKey.of("artifact", b"audit3 anything")
    with fabric.open(f"127.0.0.1:{port}", secret=SECRET) as f:
        for op, call in (("realize", lambda: f.realize(fabric.Request("audit3.double", {"x": 1}))),
                         ("holders", lambda: f.holders(key)),  # retried under the get policy
                         ("stats", f.stats)):
            before = _here()
            with pytest.raises(FabricError):
                call()
            # 3 attempts: 2 retries; was op="get" for holders and stats
            assert _delta(before, _here()) == {f'fabric_operation_retries_total{{op="{op}",status="UNAVAILABLE"}}': 2,
                                               _err(op, "UNAVAILABLE"): 1, _lat(op): 1}, op


def test_every_fabric_family_is_documented_in_the_metrics_module():
    names = {fam.name for fam in REGISTRY.collect() if fam.name.startswith("fabric_")}
    assert len(names) >= 15
    missing = [n for n in names if n not in (metrics.__doc__ or "")]
    assert not missing, missing


# ------------------------------------------------------------------ one node, scraped
def test_a_node_serves_every_count_on_its_metrics_endpoint_and_fabric_stats_node_shows_them(tmp_path):
    # records made before the node starts: its ledger gauges read them from the cassette
    with fabric.open(tmp_path / "n") as fab:
        node = fab.node_id
        keys = [fab.realize(fabric.Request("audit3.double", {"x": 100 + i})).key for i in range(2)]
        ref = fab.put(np.arange(64, dtype=np.float64).reshape(8, 8))
        size = sum(len(fab.cassette.get_raw(k)) for k in [*keys, ref.key])
    addr, proc, _ = start_node(tmp_path, "n", "--metrics-port", "0")
    try:
        port = _metrics_port(proc)
        s0 = _scrape(port)
        recs, nbytes = _ledger(node)
        assert (s0[recs], s0[nbytes]) == (3, size)
        assert s0[MISS] == 0 and s0[HIT] == 0  # a new process: no answers yet
        with fabric.open(addr, secret=SECRET) as f:
            req = fabric.Request("text.stats", {"text": "audit3 node"}, version="1")
            f.realize(req)
            s1 = _scrape(port)
            assert _delta(s0, s1, *GOSSIP) == {MISS: 1, _runs("text.stats"): 1, _lat("node_realize"): 1, _lat("realize"): 1}
            assert s1[recs] == 4 and s1[nbytes] > size
            f.realize(req)
            f.realize(req)
            s2 = _scrape(port)
            assert _delta(s1, s2, *GOSSIP) == {HIT: 2}  # answered inline: counted, not timed
            missing = fabric.ContentKey.of("artifact", b"audit3 never put")
            client0 = _here()
            with pytest.raises(FabricError) as ei:
                f.get(missing)
            assert ei.value.status_code.name == "NOT_FOUND"
            s3 = _scrape(port)
            assert _delta(s2, s3, *GOSSIP) == {_lat("node_get"): 1, _err("node_get", "NOT_FOUND"): 1}
            assert _delta(client0, _here()) == {_lat("get"): 1, _err("get", "NOT_FOUND"): 1}
            # a staged copy happens where the target is: the client
            out = np.empty((8, 8), dtype=np.float64).T
            client1 = _here()
            f.get_into(ref.key, out)
            assert (out == np.arange(64, dtype=np.float64).reshape(8, 8)).all()
            assert _delta(client1, _here()) == {_lat("get_into"): 1, "fabric_layout_mismatch_total": 1}
            s4 = _scrape(port)
            assert _delta(s3, s4, *GOSSIP) == {_lat("node_get"): 1}
        # fabric stats --node: the node's own samples, as /metrics has them
        secret_file = tmp_path / "secret"
        out = subprocess.run([FABRIC, "stats", "--node", addr, "--secret-file", str(secret_file), "--json"],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        shown = json.loads(out.stdout)["metrics"]
        s5 = _scrape(port)
        for k in (MISS, HIT, _runs("text.stats"), recs, nbytes, _err("node_get", "NOT_FOUND")):
            assert shown[k] == s5[k], k
        table = subprocess.run([FABRIC, "stats", "--node", addr, "--secret-file", str(secret_file)],
                               capture_output=True, text=True, timeout=30, env=dict(os.environ, COLUMNS="200"))
        assert table.returncode == 0 and f"{MISS}" in table.stdout and "fabric_ledger_records" in table.stdout
        # one row per latency series (was one per bucket: ~150 rows), its count as /metrics has it
        assert "_bucket" not in table.stdout and "bucket" in table.stdout  # (the header says p50/p99 are bucket estimates)
        row = next(line for line in table.stdout.splitlines() if 'fabric_operation_latency_seconds{op="node_get"}' in line)
        assert row.split("│")[2].strip() == f"{s5[_lat('node_get')]:g}" == "2"
    finally:
        stop_node(proc)
    # survives a restart: the gauges come from the cassette, the counters start again
    addr, proc, _ = start_node(tmp_path, "n", "--metrics-port", "0")
    try:
        s6 = _scrape(_metrics_port(proc))
        assert (s6[recs], s6[nbytes]) == (s5[recs], s5[nbytes])
        assert s6[MISS] == 0
    finally:
        stop_node(proc)


@pytest.mark.parametrize("via", ["member", "relay"])
def test_a_node_counts_clients_that_waited_on_an_identical_realize_as_coalesced(tmp_path, via):
    module = tmp_path / "gated_file.py"
    module.write_text(GATED_MODULE)
    gate = tmp_path / "gate"
    req = fabric.Request("audit3.gated_file", {"gate": str(gate), "x": 7}, version="1")
    up_addr, up, _ = start_node(tmp_path, "up", "--metrics-port", "0", "--evaluators", str(module))
    procs = [up]
    try:
        addr, port = up_addr, _metrics_port(up)
        if via == "relay":
            addr, relay, _ = start_node(tmp_path, "relay", "--metrics-port", "0", "--relay", up_addr)
            procs.append(relay)
            port = _metrics_port(relay)
        up_port = _metrics_port(up)
        s0, u0 = _scrape(port), _scrape(up_port)
        errors: list[BaseException] = []

        def ask() -> None:
            try:
                with fabric.open(addr, secret=SECRET) as f:
                    f.realize(req, timeout=20)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=ask) for _ in range(4)]
        for t in threads:
            t.start()
        try:  # was: never (a node's waiting clients were counted as plain hits)
            _wait(lambda: _scrape(port).get(COALESCED, 0) - s0.get(COALESCED, 0) == 3, 10, "3 clients to wait on the first")
        finally:
            gate.touch()
            for t in threads:
                t.join(20)
        assert not errors, errors
        moved = _delta(s0, _scrape(port), *GOSSIP)
        if via == "member":  # it computed once; the other three were answered from its record
            assert moved == {MISS: 1, _runs("audit3.gated_file"): 1, HIT: 3, COALESCED: 3,
                             _lat("node_realize"): 4, _lat("realize"): 1}
        else:  # one call to the upstream (timed as the relay's client call), answered as a peer hit
            assert moved == {PEER_HIT: 1, HIT: 3, COALESCED: 3, _lat("node_realize"): 4, _lat("realize"): 1}
            assert _delta(u0, _scrape(up_port), *GOSSIP) == {MISS: 1, _runs("audit3.gated_file"): 1,
                                                             _lat("node_realize"): 1, _lat("realize"): 1}
    finally:
        for p in reversed(procs):
            stop_node(p)


# ------------------------------------------------------------------ a fleet of two
def test_a_fleet_counts_gossip_facts_peer_hits_and_every_byte_fetched_from_peers(tmp_path):
    a_addr, a, _ = start_node(tmp_path, "a", "--metrics-port", "0", "--gossip-interval", "0.2")
    b_addr, b, _ = start_node(tmp_path, "b", "--metrics-port", "0", "--gossip-interval", "0.2", "--join", a_addr)
    try:
        a_port, b_port = _metrics_port(a), _metrics_port(b)
        with fabric.open(a_addr, secret=SECRET) as fa, fabric.open(b_addr, secret=SECRET) as fb:
            _wait(lambda: fa.stats()["node"]["members_live"] == 2 and fb.stats()["node"]["members_live"] == 2, 15, "2 live")
            ids = [fa.stats()["node"]["node_id"], fb.stats()["node"]["node_id"]]
            cap = evaluator_capability("text.stats", "1")
            homes = [Member(node_id=i, addr="-", capabilities=frozenset({cap})) for i in ids]
            on_a = (fabric.Request("text.stats", {"text": f"audit3 fleet {i}"}, version="1") for i in range(1000))
            held, forwarded = [r for r in on_a if rendezvous_home(r.key, homes) == ids[0]][:2]
            b0 = _scrape(b_port)
            assert b0["fabric_gossip_facts_total"] == 0
            # A computes one request and holds an artifact: B learns exactly these two facts
            assert fa.realize(held).source == "computed"
            payload = bytes(range(256)) * 4096  # 1 MiB
            ref = fa.put(payload)
            _wait(lambda: _scrape(b_port)["fabric_gossip_facts_total"] == 2, 10, "B to learn A's 2 facts")
            b1 = _scrape(b_port)
            assert b1["fabric_gossip_rounds_total"] > b0["fabric_gossip_rounds_total"]
            assert b1["fabric_gossip_bytes_total"] > b0["fabric_gossip_bytes_total"]
            assert b1["fabric_peer_fetch_bytes_total"] == 0
            # from A, the holder: a peer hit; the verified record's bytes fetched
            rep = fb.realize(held)
            assert (rep.source, rep.holder) == ("peer", ids[0])
            b2 = _scrape(b_port)
            recs, nbytes = _ledger(ids[1])
            assert _delta(b1, b2, *GOSSIP) == {PEER_HIT: 1, _lat("node_realize"): 1,
                                               "fabric_peer_fetch_bytes_total": b2[nbytes]}
            # the artifact: its manifest record and every chunk
            assert fb.get(ref.key) == payload
            b3 = _scrape(b_port)
            assert b3["fabric_peer_fetch_bytes_total"] == b3[nbytes] + len(payload)
            # held by nobody, homed on A: B forwards, A computes; B records what A sent
            # (was: the forwarded record's bytes were not counted as fetched)
            rep = fb.realize(forwarded)
            assert (rep.source, rep.holder) == ("computed", ids[0])
            b4 = _scrape(b_port)
            assert _delta(b3, b4, *GOSSIP) == {MISS: 1, _lat("node_realize"): 1,
                                               "fabric_peer_fetch_bytes_total": b4[nbytes] - b3[nbytes]}
            assert b4[recs] == 3 and _scrape(a_port)[MISS] == 2
    finally:
        stop_node(b)
        stop_node(a)


# ------------------------------------------------------------------ progress bars
def test_progress_bars_draw_on_a_terminal_stderr_and_never_into_stdout(tmp_path):
    src = tmp_path / "in.bin"
    src.write_bytes(os.urandom(3 * 1024 * 1024))
    master, slave = pty.openpty()
    env = dict(os.environ, TERM="xterm", COLUMNS="120")
    drawn = b""

    def run(*argv: str, stdout) -> subprocess.CompletedProcess:
        nonlocal drawn
        p = subprocess.run([FABRIC, *argv, "--data", str(tmp_path / "d")], stdout=stdout, stderr=slave,
                           env=env, timeout=60)
        while select.select([master], [], [], 0.1)[0]:
            drawn += os.read(master, 1 << 16)
        return p

    try:
        put = run("put", str(src), stdout=subprocess.PIPE)
        assert put.returncode == 0
        assert put.stdout.decode().startswith("{")  # was: a blank line first (the bar's, on stdout)
        key = json.loads(put.stdout)["key"]
        with open(tmp_path / "out.bin", "wb") as out:  # `fabric get KEY > out.bin` on a terminal
            assert run("get", key, stdout=out).returncode == 0
    finally:
        os.close(slave)
        os.close(master)
    assert (tmp_path / "out.bin").read_bytes() == src.read_bytes()  # was: one byte more
    assert b"putting" in drawn and b"getting" in drawn  # the bars went to the terminal
