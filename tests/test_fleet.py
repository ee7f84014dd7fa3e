"""The fleet: real node processes gossiping on 127.0.0.1 (bounded, always stopped)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import fabric
from cassette.keys import ContentKey
from fabric.placement import evaluator_capability
from gossip.node import rendezvous_home
from _nodes import ROOT, SECRET, realize_at_once, start_node, stop_node, wait_until


def _wait(pred, timeout: float, what: str):
    return wait_until(pred, timeout, what, interval=0.2)  # each poll opens a connection to a node


def _stats(addr: str) -> dict:
    with fabric.open(addr, secret=SECRET) as f:
        return f.stats()["node"]


class Fleet:
    """N node processes, the first a seed for the rest."""

    def __init__(self, tmp_path: Path, n: int, env: dict | None = None) -> None:
        self.tmp, self.env, self.nodes = tmp_path, env, []
        for i in range(n):
            self.start(i, *([] if i == 0 else ["--join", self.nodes[0][0]]))

    def start(self, i: int, *extra: str) -> None:
        addr, proc, data = start_node(self.tmp, f"n{i}", "--gossip-interval", "0.3", *extra, env=self.env)
        entry = (addr, proc, data)
        if i < len(self.nodes):
            self.nodes[i] = entry
        else:
            self.nodes.append(entry)

    def addrs(self) -> list[str]:
        return [a for a, _, _ in self.nodes]

    def ids(self) -> list[str]:
        return [_stats(a)["node_id"] for a in self.addrs()]

    def converged(self, live: int, among: list[str] | None = None) -> None:
        for a in among or self.addrs():
            _wait(lambda a=a: _stats(a)["members_live"] == live, 30, f"{a} to see {live} live members")

    def stop(self) -> list[int | None]:
        return [stop_node(p) for _, p, _ in self.nodes]


@pytest.fixture
def fleet_of(tmp_path):
    made = []

    def make(n, env=None):
        f = Fleet(tmp_path, n, env)
        made.append(f)
        return f

    yield make
    for f in made:
        f.stop()


_AGENT = textwrap.dedent(
    """
    import json, random, sys
    import blake3, fabric
    from cassette import codec
    addr, agent, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    f = fabric.open(addr, secret=sys.argv[4].encode())
    xs = list(range(n)); random.Random(agent).shuffle(xs)
    out = {}
    for x in xs:
        rep = f.realize(fabric.Request("slow.square", {"x": x, "delay": 0.0}, version="1"))
        assert rep.value == x * x, (x, rep.value)
        out[str(rep.key)] = blake3.blake3(codec.encode(rep.value)).hexdigest()
    f.close()
    print(json.dumps(out))
    """
)


def test_five_nodes_eight_agents_500_requests_evaluated_exactly_500_times(fleet_of, tmp_path):
    log = tmp_path / "evals.log"
    fl = fleet_of(5, env={"FABRIC_EVAL_LOG": str(log)})
    fl.converged(5)
    addrs = fl.addrs()
    agents = [
        subprocess.Popen([sys.executable, "-c", _AGENT, addrs[i % 5], str(i), "500", SECRET.decode()],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(ROOT))
        for i in range(8)
    ]
    results = []
    try:
        for p in agents:
            out, err = p.communicate(timeout=300)
            assert p.returncode == 0, err[-2000:]
            results.append(json.loads(out))
    finally:
        for p in agents:
            if p.poll() is None:
                p.kill()
    assert all(len(r) == 500 for r in results)
    for key in results[0]:
        assert len({r[key] for r in results}) == 1, f"agents disagree on {key}"
    assert len(log.read_text().splitlines()) == 500  # compute-once, fleet-wide


def test_after_a_computes_b_gets_it_from_peer_a(fleet_of):
    fl = fleet_of(3)
    fl.converged(3)
    ids = fl.ids()
    a_addr, b_addr = fl.addrs()[0], fl.addrs()[1]
    cap = evaluator_capability("text.stats", "1")
    # pick a request whose home is node A, so A computes it itself
    for i in range(1000):
        req = fabric.Request("text.stats", {"text": f"home probe {i}"}, version="1")
        if rendezvous_home(req.key, _members_with(ids, cap)) == ids[0]:
            break
    with fabric.open(a_addr, secret=SECRET) as a:
        first = a.realize(req)
    assert (first.source, first.holder) == ("computed", ids[0])
    _wait(lambda: ids[0] in _holders(b_addr, req.key), 20, "B to learn that A holds the key")
    with fabric.open(b_addr, secret=SECRET) as b:
        second = b.realize(fabric.Request("text.stats", {"text": req.args["text"]}, version="1"))
    assert (second.source, second.holder) == ("peer", ids[0])
    assert second.value == first.value
    assert _stats(fl.addrs()[1])["records"] == 1  # B recorded it and is now a holder too
    _wait(lambda: set(_holders(fl.addrs()[2], req.key)) >= {ids[0], ids[1]}, 20, "C to learn both holders")


def _members_with(ids, cap):
    from gossip.membership import Member

    return [Member(node_id=i, addr="-", capabilities=frozenset({cap})) for i in ids]


def _holders(addr: str, key: ContentKey) -> list[str]:
    with fabric.open(addr, secret=SECRET) as f:
        return f.holders(key)


def test_kill_9_a_holder_then_restart_it(fleet_of):
    fl = fleet_of(3)
    fl.converged(3)
    ids = fl.ids()
    cap = evaluator_capability("text.stats", "1")
    homed_on_a = []
    for i in range(2000):
        req = fabric.Request("text.stats", {"text": f"victim {i}"}, version="1")
        if rendezvous_home(req.key, _members_with(ids, cap)) == ids[0]:
            homed_on_a.append(req)
        if len(homed_on_a) == 2:
            break
    with fabric.open(fl.addrs()[0], secret=SECRET) as a:
        for req in homed_on_a:
            assert a.realize(req).source == "computed"
    for req in homed_on_a:
        _wait(lambda req=req: ids[0] in _holders(fl.addrs()[1], req.key), 20, "B to learn A's holdings")

    victim = fl.nodes[0][1]
    victim.send_signal(signal.SIGKILL)
    victim.wait(10)
    # its key is still answered (recomputed at the new home) within the realize deadline
    t0 = time.monotonic()
    with fabric.open(fl.addrs()[1], secret=SECRET) as b:
        rep = b.realize(fabric.Request("text.stats", dict(homed_on_a[0].args), version="1"), timeout=40)
    assert rep.source == "computed" and time.monotonic() - t0 < 40
    fl.converged(2, among=fl.addrs()[1:])  # the dead node left the live set

    # restart with the same data dir: it rejoins and its replayed holdings are served again
    fl.start(0, "--join", fl.addrs()[1])
    fl.converged(3)
    assert fl.ids()[0] == ids[0]
    other = homed_on_a[1]
    _wait(lambda: ids[0] in _holders(fl.addrs()[2], other.key), 30, "C to see A's replayed holdings")
    with fabric.open(fl.addrs()[2], secret=SECRET) as c:
        again = c.realize(fabric.Request("text.stats", dict(other.args), version="1"))
    assert (again.source, again.holder) == ("peer", ids[0])


def test_fleet_demo_runs_each_distinct_request_once_and_a_rerun_computes_nothing(tmp_path):
    import re

    env = dict(os.environ, FABRIC_HOME=str(tmp_path / "home"), COLUMNS="200")
    cmd = [sys.executable, "-m", "fabric.cli", "demo", "--nodes", "2", "--agents", "3", "--requests", "10", "--distinct", "12"]
    runs = []
    for _ in range(2):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=str(ROOT))
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        m = re.search(r"evaluator runs fleet-wide: (\d+)", r.stdout)
        assert m, r.stdout[-2000:]
        runs.append(int(m.group(1)))
    asked = len(_distinct_asked(12, 3, 10))
    assert runs == [asked, 0]


def _distinct_asked(distinct: int, agents: int, requests: int, seed: int = 7) -> set:
    from fabric.demo import request_pool

    pool = request_pool(distinct, seed)
    asked = set()
    for a in range(agents):
        rng = random.Random(seed * 1000 + a)
        asked.update(rng.randrange(len(pool)) for _ in range(requests))
    return asked


def test_a_member_lacking_an_artifact_fetches_it_verified_from_a_holder(fleet_of, tmp_path):
    import numpy as np

    fl = fleet_of(2)
    fl.converged(2)
    a, b = fl.addrs()
    arr = np.random.default_rng(3).standard_normal(300_000)
    with fabric.open(a, secret=SECRET) as fa:
        ref = fa.put(arr, chunk_size=1 << 18)  # 10 chunks, uploaded to A only
    ids = fl.ids()
    _wait(lambda: ids[0] in _holders(b, ref.key), 30, "B to learn that A holds the artifact")
    with fabric.open(b, secret=SECRET) as fb:
        got = fb.get(ref.key)
    np.testing.assert_array_equal(got, arr)
    assert _stats(b)["blobs"] == 10  # B now holds every chunk itself
    _wait(lambda: ids[1] in _holders(a, ref.key), 30, "A to learn that B holds it too")


def test_a_row_written_beside_a_running_member_reaches_its_peers_and_a_restart_keeps_the_numbering(tmp_path):
    """A member numbers its facts in ledger order, live as after a restart's replay: a record
    another process wrote into its data dir goes out with the member's next record (it used to
    stay unknown to peers for good: after a restart its seq named a fact they already had)."""
    fast = ("--gossip-interval", "0.2", "--durability", "fast")
    a_addr, a_proc, a_data = start_node(tmp_path, "a", *fast)
    b_proc = None
    try:
        b_addr, b_proc, _ = start_node(tmp_path, "b", *fast, "--join", a_addr)
        a_id = _stats(a_addr)["node_id"]
        with fabric.open(a_data, durability="fast") as beside:  # another process on A's data dir
            x = beside.put(b"written beside the running node")
        with fabric.open(a_addr, secret=SECRET) as fa:
            y = fa.put(b"put through the node")
        for ref in (y, x):
            _wait(lambda ref=ref: a_id in _holders(b_addr, ref.key), 20, f"B to learn that A holds {ref.key.short()}")

        stop_node(a_proc)
        a_addr, a_proc, _ = start_node(tmp_path, "a", *fast, "--join", b_addr)  # same data dir, same node id
        with fabric.open(a_addr, secret=SECRET) as fa:
            z = fa.put(b"put after the restart")
        _wait(lambda: a_id in _holders(b_addr, z.key), 20, "B to learn of A's record after its restart")
        for addr in (a_addr, b_addr):
            st = _stats(addr)
            assert st["gossip_equivocations"] == 0, (addr, st)
            assert st["facts"] == 3  # x, y, z: each held by A only, each one fact
    finally:
        if b_proc is not None:
            stop_node(b_proc)
        stop_node(a_proc)


def _homed_on(ids: list[str], home: str, make, n: int) -> list:
    """``n`` requests ``make(i)`` whose rendezvous home among ``ids`` (all advertising the
    evaluator at version 1) is ``home``."""
    out = []
    for i in range(5000):
        req = make(i)
        if rendezvous_home(req.key, _members_with(ids, evaluator_capability(req.evaluator, "1"))) == home:
            out.append(req)
            if len(out) == n:
                return out
    raise AssertionError(f"no {n} requests homed on {home}")


def test_a_hung_home_is_given_up_once_dead_and_is_a_home_again_after_it_comes_back(fleet_of):
    """A member SWIM holds DEAD is no home: an asker whose forward to it was already waiting
    moves on once the detector declares it DEAD, one asking afterwards never waits on it, and
    the member is a home again once it is ALIVE again.  (It used to stay a candidate
    "whatever the detector thinks", and a forward to a hung process had no bound: DEADLINE_EXCEEDED.)"""
    fl = fleet_of(3)
    fl.converged(3)
    ids = fl.ids()
    n0, n2 = fl.nodes[0][1], fl.addrs()[2]
    in_flight, after_dead, after_back = _homed_on(
        ids, ids[0], lambda i: fabric.Request("slow.square", {"x": 10_000 + i, "delay": 0.0}, version="1"), 3)
    n0.send_signal(signal.SIGSTOP)  # hung, not gone: its port still accepts connections
    try:
        with fabric.open(n2, secret=SECRET) as f:
            rep = f.realize(in_flight, timeout=30)  # forwarded to the hung home before it is DEAD
            assert rep.value == in_flight.args["x"] ** 2 and rep.holder != ids[0]
            _wait(lambda: _stats(n2)["members_live"] == 2, 30, "n2 to hold n0 DEAD")
            rep = f.realize(after_dead, timeout=15)
            assert rep.value == after_dead.args["x"] ** 2 and rep.holder != ids[0]
    finally:
        n0.send_signal(signal.SIGCONT)
    fl.converged(3)
    with fabric.open(n2, secret=SECRET) as f:
        rep = f.realize(after_back, timeout=30)
    assert (rep.source, rep.holder) == ("computed", ids[0])


def test_home_order_skips_dead_and_left_members_keeps_suspects_and_takes_back_a_returning_member():
    from types import SimpleNamespace

    from fabric.fleet import Fleet as FleetImpl
    from gossip.membership import MemberState
    from gossip.messages import MemberUpdate
    from gossip.node import GossipNode, rendezvous_order

    cap = evaluator_capability("text.stats", "1")
    me = GossipNode("n0", addr="127.0.0.1:1", capabilities=[cap])
    ns = SimpleNamespace(gossip=me, addr="127.0.0.1:1", fab=SimpleNamespace(node_id="n0"))
    peers = {f"n{i}": f"127.0.0.1:{i + 1}" for i in range(1, 5)}
    me.membership.apply_updates([MemberUpdate(n, 1, MemberState.ALIVE, a, frozenset({cap})) for n, a in peers.items()]
                                + [MemberUpdate("n9", 1, MemberState.ALIVE, "127.0.0.1:99", frozenset())], 0.0)
    key = ContentKey.of("request", b"homes")
    everyone = rendezvous_order(key, ["n0", *peers])
    assert [n for n, _ in FleetImpl.home_order(ns, key, "text.stats", "1")] == everyone  # n9 lacks the evaluator
    me.membership.apply_updates([MemberUpdate("n1", 1, MemberState.SUSPECT, peers["n1"], frozenset({cap})),
                                 MemberUpdate("n2", 1, MemberState.DEAD, peers["n2"], frozenset({cap})),
                                 MemberUpdate("n3", 1, MemberState.LEFT, peers["n3"], frozenset({cap}))], 1.0)
    assert [n for n, _ in FleetImpl.home_order(ns, key, "text.stats", "1")] == [n for n in everyone if n not in ("n2", "n3")]
    me.membership.apply_updates([MemberUpdate("n2", 2, MemberState.ALIVE, "127.0.0.1:42", frozenset({cap}))], 2.0)
    order = FleetImpl.home_order(ns, key, "text.stats", "1")
    assert [n for n, _ in order] == [n for n in everyone if n != "n3"] and ("n2", "127.0.0.1:42") in order


_ONLY_ON_A = textwrap.dedent(
    """
    import fabric

    @fabric.evaluator("only.on.a", version="1")
    def v1(x: int) -> int:
        return x + 1

    @fabric.evaluator("only.on.a", version="2")
    def v2(x: int) -> int:
        return x + 2
    """
)


def test_a_member_without_the_evaluator_routes_realize_to_holders_and_to_members_advertising_it(tmp_path):
    """B runs no evaluator: a realize through B is served by the holder A (a held key), computed
    at the home among members advertising ``eval:NAME@VERSION`` (a new key), or, naming no
    version, resolved by a member advertising the name; NOT_FOUND only when no live member
    advertises it.  (B used to refuse all of these with NOT_FOUND: 'no evaluator named ...'.)"""
    only = tmp_path / "only_on_a.py"
    only.write_text(_ONLY_ON_A)
    nothing = tmp_path / "no_evaluators.py"
    nothing.write_text("# registers nothing\n")
    a_addr, a_proc, _ = start_node(tmp_path, "a", "--gossip-interval", "0.3", "--evaluators", str(only))
    b_proc = None
    try:
        b_addr, b_proc, _ = start_node(tmp_path, "b", "--gossip-interval", "0.3", "--join", a_addr, evaluators=str(nothing))
        for addr in (a_addr, b_addr):
            _wait(lambda addr=addr: _stats(addr)["members_live"] == 2, 30, f"{addr} to see both members")
        a_id, b_id = _stats(a_addr)["node_id"], _stats(b_addr)["node_id"]
        held = fabric.Request("text.stats", {"text": "held by a"}, version="1")
        with fabric.open(a_addr, secret=SECRET) as fa:
            first = fa.realize(held)
        _wait(lambda: a_id in _holders(b_addr, held.key), 20, "B to learn that A holds the key")
        with fabric.open(b_addr, secret=SECRET) as fb:
            rep = fb.realize(fabric.Request("text.stats", dict(held.args), version="1"))
            assert (rep.source, rep.holder, rep.value) == ("peer", a_id, first.value)
            new = fb.realize(fabric.Request("text.stats", {"text": "new through b"}, version="1"))
            assert (new.source, new.holder) == ("computed", a_id) and new.value["words"] == 3
            assert fb.realize(fabric.Request("text.stats", {"text": "new through b"}, version="1")).source == "local"

            versionless = fabric.Request("only.on.a", {"x": 40})  # this process never registered it
            assert versionless.version is None
            rep = fb.realize(versionless)
            assert (rep.value, rep.source, rep.holder) == (42, "computed", a_id)  # A's latest: version 2
            assert rep.key == ContentKey.for_request("only.on.a", "2", {"x": 40})
            assert fb.realize(fabric.Request("only.on.a", {"x": 40}, version="1")).value == 41

            for req, says in ((fabric.Request("text.stats", {"text": "x"}, version="9"), "eval:text.stats@9"),
                              (fabric.Request("nobody.has", {"x": 1}), "'nobody.has'")):
                with pytest.raises(fabric.FabricError) as err:
                    fb.realize(req)
                assert err.value.status_code is fabric.StatusCode.NOT_FOUND
                assert "no live member of the fleet advertises" in err.value.message and says in err.value.message
        assert _stats(b_addr)["records"] == 4  # B recorded what it served: it is a holder now
    finally:
        if b_proc is not None:
            stop_node(b_proc)
        stop_node(a_proc)


def test_a_get_through_a_member_right_after_a_put_on_another_never_misses(tmp_path):
    """A get through B right after a put on A often comes before the gossip of the put (1 in
    12 here, on a loaded machine): B asks its live peers who holds the key and fetches it (it
    used to answer NOT_FOUND, 'not held by this node').  A key no member holds is NOT_FOUND
    saying so."""
    import numpy as np

    slow = ("--gossip-interval", "3")  # anti-entropy rarely repairs a lost push in time
    a_addr, a_proc, _ = start_node(tmp_path, "a", *slow)
    b_proc = None
    try:
        b_addr, b_proc, _ = start_node(tmp_path, "b", *slow, "--join", a_addr)
        for addr in (a_addr, b_addr):
            _wait(lambda addr=addr: _stats(addr)["members_live"] == 2, 30, f"{addr} to see both members")
        a_id = _stats(a_addr)["node_id"]
        with fabric.open(a_addr, secret=SECRET) as fa, fabric.open(b_addr, secret=SECRET) as fb:
            for i in range(100):
                data = f"put on A, got through B, try {i}".encode()
                ref = fa.put(data)
                assert fb.get(ref.key) == data
            arr = np.arange(100_000, dtype=np.float64)
            ref = fa.put(arr, chunk_size=1 << 16)  # several chunks, none of them on B yet
            np.testing.assert_array_equal(fb.get(ref.key), arr)
            assert a_id in fb.holders(ref.key)
            with pytest.raises(fabric.FabricError) as err:
                fb.get(ContentKey.of("artifact", b"never put anywhere"))
            assert err.value.status_code is fabric.StatusCode.NOT_FOUND
            assert "no live member of the fleet holds it" in err.value.message
    finally:
        if b_proc is not None:
            stop_node(b_proc)
        stop_node(a_proc)


def test_concurrent_askers_on_a_member_share_one_forward_to_the_home(fleet_of):
    """Eight clients of one member ask at once for a reply nobody holds: the member forwards
    it to the key's home once, and the askers that came while that forward ran are answered
    from what the member recorded ("local"), so the home sees one realize and no follower hits.
    (Each asker used to make its own forward: eight realizes at the home, seven of them
    waiting on its single-flight.)"""
    import threading

    fl = fleet_of(2)
    fl.converged(2)
    ids = fl.ids()
    home, member = fl.addrs()
    (req,) = _homed_on(ids, ids[0], lambda i: fabric.Request("slow.square", {"x": 20_000 + i, "delay": 1.5}, version="1"), 1)
    replies = realize_at_once(member, req, 8)
    assert {r.value for r in replies} == {req.args["x"] ** 2}
    assert sorted(r.source for r in replies) == ["computed"] + ["local"] * 7
    home_stats = _stats(home)
    realizes = home_stats["metrics"]['fabric_operation_latency_seconds_count{op="node_realize"}']
    assert (realizes, home_stats["local_hits"]) == (1, 0)


def test_a_node_started_before_its_join_seed_joins_it_once_the_seed_is_up(tmp_path):
    """README: a `--join` peer that is not up yet is fine. The first join push went
    nowhere and was never sent again, so the two nodes stayed strangers for good."""
    import socket

    with socket.socket() as s:  # a free port for the seed, which starts second
        s.bind(("127.0.0.1", 0))
        seed = f"127.0.0.1:{s.getsockname()[1]}"
    a_addr, a_proc, _ = start_node(tmp_path, "a", "--gossip-interval", "0.3", "--join", seed)
    try:
        time.sleep(1.5)  # a's first push and a probe period or more go nowhere
        b_addr, b_proc, _ = start_node(tmp_path, "b", "--gossip-interval", "0.3", "--listen", seed)
        try:
            for addr in (a_addr, b_addr):
                _wait(lambda addr=addr: _stats(addr)["members_live"] == 2, 15, f"{addr} to see both members")
        finally:
            assert stop_node(b_proc) == 0
    finally:
        assert stop_node(a_proc) == 0
