"""A fleet member fetching an artifact it lacks from several holders at once.

Unit level: :meth:`ContentAddressedFabric.obtain` over embedded cassettes with
a duck-typed fleet whose :class:`PeerPool` talks to fake peers (the pool's own
record and blob verification run unchanged), so striping and failover are
deterministic.  Then real ``fabric node`` subprocesses on 127.0.0.1: two
holders both serve a member that lacks the artifact, and a holder killed with
``kill -9`` while gossip still lists it as live costs nothing but a log line.
"""

from __future__ import annotations

import signal
from types import SimpleNamespace

import numpy as np
import pytest
import trio

import fabric
from cassette.errors import FabricError, StatusCode
from fabric.fleet import FETCH_PER_HOLDER, ContentAddressedFabric, Fleet, PeerPool
from _nodes import SECRET, start_node, stop_node
from test_fleet import _stats, _wait

CHUNK = 1 << 16


# ------------------------------------------------------------------ unit level
class _Peer:
    """What one fake holder serves (from a real cassette) and how it misbehaves."""

    def __init__(self, node_id: str, cassette, *, delay: float = 0.001, fail_after: int | None = None,
                 alter: bool = False) -> None:
        self.node_id, self.cassette, self.delay = node_id, cassette, delay
        self.fail_after, self.alter = fail_after, alter
        self.served: list = []  # blob keys answered with bytes
        self.inflight = self.max_inflight = 0
        self.failed_at: int | None = None  # calls started when it first failed
        self.calls = 0

    def opened_after_failing(self) -> int:
        return 0 if self.failed_at is None else self.calls - self.failed_at


class _Call:
    def __init__(self, peer: _Peer, op: str, body: dict) -> None:
        self.peer, self.op, self.key = peer, op, body["key"]
        self.items: list = []
        self.response: dict = {}

    async def __aenter__(self) -> "_Call":
        p = self.peer
        p.calls += 1
        p.inflight += 1
        p.max_inflight = max(p.max_inflight, p.inflight)
        try:
            await trio.sleep(p.delay)
        finally:
            p.inflight -= 1
        if self.op == "fetch":
            self.response = {"key": self.key, "record": p.cassette.get_raw(self.key)}
            return self
        if p.fail_after is not None and len(p.served) >= p.fail_after:
            if p.failed_at is None:
                p.failed_at = p.calls
            raise FabricError(StatusCode.UNAVAILABLE, "connection lost (fake)")
        data = p.cassette.get_blob(self.key)
        if p.alter:
            data = bytes([data[0] ^ 1]) + data[1:]
        p.served.append(self.key)
        self.items, self.response = [data], {"key": self.key, "chunks": 1}
        return self

    async def __aexit__(self, *exc) -> bool:
        return False

    async def __aiter__(self):
        for item in self.items:
            yield item


class _Client:
    closed = False

    def __init__(self, peer: _Peer) -> None:
        self.peer = peer

    def stream(self, op: str, body: dict) -> _Call:
        return _Call(self.peer, op, body)

    async def call(self, op: str, body: dict) -> tuple[dict, list]:
        c = await _Call(self.peer, op, body).__aenter__()
        return c.response, c.items


class _Pool(PeerPool):
    """The real pool (verification, timing, drop on UNAVAILABLE) over fake connections."""

    def __init__(self, peers: dict[str, _Peer]) -> None:
        super().__init__(SECRET)
        self.peers = peers

    async def client(self, addr: str) -> _Client:
        return _Client(self.peers[addr])


class _Fleet:
    """What ContentAddressedFabric uses of a Fleet: a pool, live holders, counters, announce;
    ``announced`` lists the keys of the member's ledger rows in the order they were announced."""

    count_fetch = Fleet.count_fetch
    while_live = Fleet.while_live
    until_not_live = Fleet.until_not_live

    def __init__(self, peers: list[_Peer], digest: bytes, member) -> None:
        self.pool = _Pool({f"127.0.0.1:{9000 + i}": p for i, p in enumerate(peers)})
        self._live = [(p.node_id, addr, digest) for addr, p in self.pool.peers.items()]
        self.dead: set[str] = set()  # node ids the fake failure detector holds DEAD
        self.gossip = SimpleNamespace(preferred_digest=lambda key, capability=None: None,
                                      membership=SimpleNamespace(is_live=lambda node_id: node_id not in self.dead))
        self.fetched_bytes: dict[str, int] = {}
        self.member = member  # the member's fabric
        self.announced: list = []

    def live_holders(self, key):
        return [h for h in self._live if h[0] not in self.dead]

    async def announce_recorded(self) -> None:
        self.announced += [rec.key for rec in self.member.cassette.iter_ledger(len(self.announced) + 1)]


@pytest.fixture
def source(tmp_path):
    """An embedded cassette holding a 40-chunk artifact; yields (fabric, ref, bytes)."""
    data = np.random.default_rng(5).integers(0, 255, size=40 * CHUNK, dtype=np.uint8).tobytes()
    with fabric.open(tmp_path / "src", durability="fast") as src:
        ref = src.put(data, chunk_size=CHUNK)
        yield src, ref, data


def _obtain(tmp_path, ref, peers):
    """Run ``obtain(ref.key)`` on a fresh member; returns (holder or error, member fabric, fleet)."""
    dst = fabric.open(tmp_path / "dst", durability="fast")
    fleet = _Fleet(peers, peers[0].cassette.get_record(ref.key).digest, dst)

    async def go():
        try:
            return await ContentAddressedFabric(dst, fleet).obtain(ref.key)
        except FabricError as exc:
            return exc

    return trio.run(go), dst, fleet


def _chunks(src, ref) -> list:
    from cassette import codec

    return codec.decode(src.cassette.get_record(ref.key).payload)["chunks"]


def _verified_clean(dst) -> None:
    rep = dst.cassette.verify(raise_errors=False)
    assert rep.problems == []


def test_chunks_are_striped_over_every_holder_bounded_in_flight_each_fetched_once(tmp_path, source):
    src, ref, data = source
    a, b = _Peer("A", src.cassette), _Peer("B", src.cassette)
    holder, dst, fleet = _obtain(tmp_path, ref, [a, b])
    try:
        assert holder == "A"  # the holder that served the manifest
        assert dst.get(ref.key) == data
        assert len(a.served) >= FETCH_PER_HOLDER and len(b.served) >= FETCH_PER_HOLDER
        assert sorted(a.served + b.served) == sorted(_chunks(src, ref))  # each chunk once
        assert a.max_inflight == b.max_inflight == FETCH_PER_HOLDER
        assert fleet.fetched_bytes["B"] == len(b.served) * CHUNK
        assert fleet.announced == [ref.key]
        _verified_clean(dst)
    finally:
        dst.close()


@pytest.mark.parametrize("delay_b", [0.001, 0.05], ids=["fails-among-others", "fails-after-the-others-finished"])
def test_a_holder_that_fails_gets_no_further_chunks_and_its_chunks_go_to_the_others(tmp_path, source, delay_b):
    src, ref, data = source
    a, b = _Peer("A", src.cassette, delay=0), _Peer("B", src.cassette, delay=delay_b, fail_after=3)
    holder, dst, fleet = _obtain(tmp_path, ref, [a, b])
    try:
        assert holder == "A"
        assert dst.get(ref.key) == data
        assert b.failed_at is not None and b.opened_after_failing() == 0
        assert len(a.served) + len(b.served) == 40
        _verified_clean(dst)
    finally:
        dst.close()


def test_a_holder_sending_altered_bytes_is_dropped_and_nothing_unverified_is_stored(tmp_path, source):
    src, ref, data = source
    a, b = _Peer("A", src.cassette, delay=0.002), _Peer("B", src.cassette, alter=True)
    holder, dst, fleet = _obtain(tmp_path, ref, [a, b])
    try:
        assert holder == "A"
        assert dst.get(ref.key) == data
        assert "B" not in fleet.fetched_bytes and fleet.fetched_bytes["A"] >= 40 * CHUNK
        assert b.calls == FETCH_PER_HOLDER  # its first answers failed verification; no more were asked
        _verified_clean(dst)
    finally:
        dst.close()


def _obtain_declaring_dead(dst, fleet, key, hung: _Peer, calls: int) -> list:
    """Run ``obtain(key)``; once ``hung`` has taken ``calls`` calls, the fake failure detector
    declares it DEAD.  Returns what obtain returned ([] if it did not within 60 s)."""
    got = []

    async def go():
        async with trio.open_nursery() as nursery:
            async def obtain():
                got.append(await ContentAddressedFabric(dst, fleet).obtain(key))
            nursery.start_soon(obtain)
            with trio.move_on_after(60):  # bound only: the test fails, never hangs
                while hung.calls < calls:
                    await trio.sleep(0.01)
                fleet.dead.add(hung.node_id)  # the detector's verdict arrives while calls wait on it
                while not got:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()

    trio.run(go)
    return got


def test_a_fetch_waiting_on_a_hung_holder_moves_on_once_the_holder_is_dead(tmp_path, source):
    """A holder that accepts the fetch and never answers (a hung process) is given up when the
    failure detector declares it DEAD, and the next holder serves (it used to wait for good)."""
    src, ref, data = source
    a, b = _Peer("A", src.cassette, delay=3600), _Peer("B", src.cassette)
    dst = fabric.open(tmp_path / "dst", durability="fast")
    fleet = _Fleet([a, b], src.cassette.get_record(ref.key).digest, dst)
    try:
        assert _obtain_declaring_dead(dst, fleet, ref.key, a, 1) == ["B"] and a.calls == 1
        assert dst.get(ref.key) == data
        _verified_clean(dst)
    finally:
        dst.close()


def test_chunk_lanes_waiting_on_a_hung_holder_move_on_once_the_holder_is_dead(tmp_path, source, monkeypatch):
    """Chunks a hung holder accepted go to the other holders as soon as the failure detector
    declares it DEAD, not after the per-chunk deadline (made an hour here)."""
    import fabric.fleet

    monkeypatch.setattr(fabric.fleet, "CHUNK_DEADLINE_S", 3600.0)
    src, ref, data = source
    a, hung = _Peer("A", src.cassette), _Peer("H", src.cassette, delay=3600)  # A serves the manifest
    dst = fabric.open(tmp_path / "dst", durability="fast")
    fleet = _Fleet([a, hung], src.cassette.get_record(ref.key).digest, dst)
    try:
        assert _obtain_declaring_dead(dst, fleet, ref.key, hung, FETCH_PER_HOLDER) == ["A"]
        assert hung.served == [] and hung.calls == FETCH_PER_HOLDER
        assert sorted(a.served) == sorted(_chunks(src, ref))  # H's chunks went back to A, each once
        assert dst.get(ref.key) == data
        _verified_clean(dst)
    finally:
        dst.close()


def test_concurrent_obtains_of_one_key_share_one_fetch(tmp_path, source):
    src, ref, data = source
    a, b = _Peer("A", src.cassette), _Peer("B", src.cassette)
    dst = fabric.open(tmp_path / "dst", durability="fast")
    fleet = _Fleet([a, b], src.cassette.get_record(ref.key).digest, dst)
    caf = ContentAddressedFabric(dst, fleet)
    got: list = []

    async def go():
        async def one():
            got.append(await caf.obtain(ref.key))

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(one)

    try:
        trio.run(go)
        assert sorted(got) == sorted(["A", dst.node_id, dst.node_id])  # one fetched; the others found it held
        assert sorted(a.served + b.served) == sorted(_chunks(src, ref))  # every chunk fetched once in all
        assert fleet.announced == [ref.key]
        assert dst.get(ref.key) == data
    finally:
        dst.close()


def test_a_holder_that_never_answers_a_chunk_counts_as_failed(tmp_path, source, monkeypatch):
    import fabric.fleet

    monkeypatch.setattr(fabric.fleet, "CHUNK_DEADLINE_S", 0.3)
    src, ref, data = source
    a, hung = _Peer("A", src.cassette), _Peer("H", src.cassette, delay=3600)  # A serves the manifest
    holder, dst, fleet = _obtain(tmp_path, ref, [a, hung])
    try:
        assert holder == "A"
        assert dst.get(ref.key) == data
        assert hung.served == [] and hung.calls == FETCH_PER_HOLDER and len(a.served) == 40
        _verified_clean(dst)
    finally:
        dst.close()


def test_when_no_holder_is_left_the_manifest_is_not_recorded(tmp_path, source):
    src, ref, _ = source
    a, b = _Peer("A", src.cassette, fail_after=5), _Peer("B", src.cassette, fail_after=7)
    err, dst, fleet = _obtain(tmp_path, ref, [a, b])
    try:
        assert isinstance(err, FabricError) and err.status_code is StatusCode.UNAVAILABLE
        assert "no live holder could serve chunk" in err.message and err.key == ref.key
        assert not dst.cassette.contains(ref.key) and fleet.announced == []
        assert dst.stats()["blobs"] == 12  # what was verified may stay: it is content-addressed
        _verified_clean(dst)
    finally:
        dst.close()


def test_a_chunk_repeated_in_the_manifest_is_fetched_once(tmp_path):
    with fabric.open(tmp_path / "src", durability="fast") as src:
        ref = src.put(bytes(8 * CHUNK), chunk_size=CHUNK)  # 8 identical chunks
        a = _Peer("A", src.cassette)
        holder, dst, _ = _obtain(tmp_path, ref, [a])
        try:
            assert holder == "A" and len(a.served) == 1
            assert dst.get(ref.key) == bytes(8 * CHUNK)
        finally:
            dst.close()


# ------------------------------------------------------- real node processes
ARTIFACT_CHUNKS = 16
ARTIFACT_CHUNK = 1 << 18


@pytest.fixture
def two_holders_and_a_member(tmp_path):
    """Holders A and B (the artifact put into their data dirs before they start) and member C.

    Yields ``(nodes, ref, data)`` with ``nodes`` a dict name -> (addr, proc, data_dir, node_id)
    once C sees 3 live members and both holders of the artifact; every node is stopped after.
    """
    data = np.random.default_rng(9).integers(0, 255, size=ARTIFACT_CHUNKS * ARTIFACT_CHUNK, dtype=np.uint8).tobytes()
    refs = []
    for name in ("a", "b"):
        with fabric.open(tmp_path / name, durability="fast") as f:
            refs.append(f.put(data, chunk_size=ARTIFACT_CHUNK))
    assert refs[0].key == refs[1].key
    nodes: dict = {}
    try:
        for name in ("a", "b", "c"):
            join = ["--join", nodes["a"][0]] if nodes else []
            addr, proc, d = start_node(tmp_path, name, "--gossip-interval", "0.3", "--durability", "fast", *join)
            nodes[name] = (addr, proc, d, _stats(addr)["node_id"])
        c = nodes["c"][0]
        holders = {nodes["a"][3], nodes["b"][3]}
        _wait(lambda: _stats(c)["members_live"] == 3, 30, "C to see 3 live members")
        with fabric.open(c, secret=SECRET) as fc:
            _wait(lambda: holders <= set(fc.holders(refs[0].key)), 30, "C to learn both holders")
        yield nodes, refs[0], data
    finally:
        for _, proc, _, _ in nodes.values():
            stop_node(proc)


def test_a_member_lacking_an_artifact_fetches_it_from_both_holders_at_once(two_holders_and_a_member):
    nodes, ref, data = two_holders_and_a_member
    c = nodes["c"][0]
    with fabric.open(c, secret=SECRET) as fc:
        got = fc.get(ref.key)
    assert bytes(got) == data
    st = _stats(c)
    assert st["blobs"] == ARTIFACT_CHUNKS
    served = st["peer_fetch_bytes_by_node"]
    for name in ("a", "b"):  # both holders served chunks
        assert served.get(nodes[name][3], 0) >= ARTIFACT_CHUNK, (name, served)
    assert sum(served.values()) >= len(data)


def test_a_holder_killed_while_gossip_lists_it_live_costs_a_log_line_not_the_fetch(two_holders_and_a_member):
    nodes, ref, data = two_holders_and_a_member
    c_addr, c_proc, c_data, _ = nodes["c"]
    b_proc, b_id = nodes["b"][1], nodes["b"][3]
    b_proc.send_signal(signal.SIGKILL)
    b_proc.wait(10)
    with fabric.open(c_addr, secret=SECRET) as fc:
        got = fc.get(ref.key)
    assert bytes(got) == data
    served = _stats(c_addr)["peer_fetch_bytes_by_node"]
    assert set(served) == {nodes["a"][3]}, served
    stop_node(c_proc)
    log = c_proc.log_path.read_text()
    assert f"of {ref.key.short()} from {b_id} failed: UNAVAILABLE" in log  # tried, and dropped
    with fabric.open(c_data) as fc:  # nothing unverified was recorded
        assert fc.stats()["blobs"] == ARTIFACT_CHUNKS and fc.cassette.contains(ref.key)
        assert fc.cassette.verify(raise_errors=False).problems == []


def test_a_client_waiting_while_a_member_obtains_an_artifact_hears_it_working(tmp_path, source, monkeypatch):
    """The member fetches for ~2 s before the manifest can go out; the client bounds each wait
    for the node by 0.3 s, and the member's ``obtaining`` heartbeats (every 0.05 s here) keep
    it waiting instead of failing with DEADLINE_EXCEEDED (which its 3 attempts would reach)."""
    import dataclasses

    from fabric import errors, serve
    from _nodes import in_process_node

    src, ref, data = source  # 40 chunks
    monkeypatch.setattr(serve, "OBTAIN_HEARTBEAT_S", 0.05)
    monkeypatch.setitem(errors.DEFAULT_POLICIES, "get", dataclasses.replace(errors.DEFAULT_POLICIES["get"], deadline_s=0.3))
    peer = _Peer("holder", src.cassette, delay=0.2)  # 4 lanes x 10 chunks x 0.2 s
    dst = fabric.open(tmp_path / "dst", durability="fast")
    fleet = _Fleet([peer], src.cassette.get_record(ref.key).digest, dst)
    beats: list = []
    real_send_metadata = __import__("fabric.net", fromlist=["ServerCall"]).ServerCall.send_metadata

    async def send_metadata(self, body):
        beats.append(body)
        await real_send_metadata(self, body)

    monkeypatch.setattr("fabric.net.ServerCall.send_metadata", send_metadata)

    async def go():
        async with in_process_node(dst) as (addr, service):
            service.caf = ContentAddressedFabric(dst, fleet)
            rf = fabric.open(addr, secret=SECRET)
            return await rf.aget(ref.key)

    try:
        got = trio.run(go)
    finally:
        dst.close()
    assert got == data
    heartbeats = [b["obtaining"] for b in beats if set(b) == {"obtaining"}]
    assert len(heartbeats) >= 10 and heartbeats == sorted(heartbeats) and heartbeats[-1] <= len(data)
    assert sorted(peer.served) == sorted(_chunks(src, ref))  # each chunk fetched once: one obtain, never restarted
