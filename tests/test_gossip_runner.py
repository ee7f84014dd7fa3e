"""The trio runner over the in-memory transport (virtual time via pytest-trio's autojump clock)."""

from __future__ import annotations

import hashlib
import logging

import pytest
import trio

from cassette.errors import FabricError, StatusCode
from cassette.keys import ContentKey
from gossip.membership import Member, MembershipConfig, Roster
from gossip.messages import MemberState, MemberUpdate, Ping, encode_message
from gossip.node import GossipConfig, GossipNode
from gossip.runner import GossipRunner, MemoryNetwork

CFG = GossipConfig(membership=MembershipConfig(member_sync_interval=10.0, reconnect_interval=2.0))


def key(i: int) -> ContentKey:
    return ContentKey.of("request", b"runner-%d" % i)


def dg(k: bytes) -> bytes:
    return hashlib.blake2b(bytes(k), digest_size=32).digest()


def fleet(net: MemoryNetwork, ids, roster=True):
    r = Roster(Member(i, i) for i in ids) if roster else None
    return {i: GossipRunner(GossipNode(i, roster=r, config=CFG, now=trio.current_time()), net.attach(i)) for i in ids}


async def start(nursery, net, runners):
    for addr, runner in runners.items():
        await nursery.start(net.serve, addr, runner)
        await nursery.start(runner.run)


async def wait_for(predicate, timeout=60.0):
    with trio.move_on_after(timeout):
        while not predicate():
            await trio.sleep(0.05)
        return True
    return False


@pytest.mark.trio
async def test_a_local_fact_reaches_every_runner(autojump_clock):
    net = MemoryNetwork()
    runners = fleet(net, [f"r{i}" for i in range(6)])
    async with trio.open_nursery() as nursery:
        await start(nursery, net, runners)
        k = key(1)
        fact = await runners["r0"].add_local(k, dg(k))
        assert await wait_for(lambda: all(r.node.index.knows(k) for r in runners.values()), 5.0)
        for r in runners.values():
            assert r.node.holders(k) == [("r0", fact.digest)]
            assert r.bytes_sent > 0 and r.malformed == 0
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_malformed_payload_is_dropped_and_logged(autojump_clock, caplog):
    net = MemoryNetwork()
    runners = fleet(net, ["a", "b"])
    async with trio.open_nursery() as nursery:
        await start(nursery, net, runners)
        with caplog.at_level(logging.WARNING, logger="evalfabric.gossip"):
            await runners["a"].deliver("b", b"\xc1 not msgpack")
            bad_version = encode_message(Ping("b", 1, "a", ())).replace(b"\xa1v\x01", b"\xa1v\x02")
            await runners["a"].deliver("b", bad_version)
        assert runners["a"].malformed == 2
        lines = [r.getMessage() for r in caplog.records]
        assert any("malformed" in line and "from b" in line and "gossip.v" in line for line in lines)
        # the node carries on
        k = key(2)
        await runners["a"].add_local(k, dg(k))
        assert await wait_for(lambda: runners["b"].node.index.knows(k), 5.0)
        nursery.cancel_scope.cancel()


class FailingTransport:
    def __init__(self, exc):
        self.exc = exc
        self.calls = 0

    async def send(self, peer_addr, payload):
        self.calls += 1
        raise self.exc


class StuckTransport:
    async def send(self, peer_addr, payload):
        await trio.sleep_forever()


@pytest.mark.trio
@pytest.mark.parametrize("exc", [OSError("connection refused"), FabricError(StatusCode.UNAVAILABLE, "peer gone")])
async def test_send_failures_are_counted_not_fatal(autojump_clock, exc):
    roster = Roster([Member("a", "a"), Member("b", "b")])
    transport = FailingTransport(exc)
    runner = GossipRunner(GossipNode("a", roster=roster, config=CFG), transport)
    async with trio.open_nursery() as nursery:
        await nursery.start(runner.run)
        await runner.add_local(key(3), dg(key(3)))
        await trio.sleep(5)
        assert transport.calls > 3 and runner.send_failures == transport.calls
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_a_stuck_send_is_bounded_by_the_send_timeout(autojump_clock):
    roster = Roster([Member("a", "a"), Member("b", "b")])
    runner = GossipRunner(GossipNode("a", roster=roster, config=CFG), StuckTransport(), send_timeout=0.5)
    async with trio.open_nursery() as nursery:
        await nursery.start(runner.run)
        await trio.sleep(10)
        assert runner.send_failures >= 3  # the loop kept going instead of hanging on one send
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_join_through_a_seed(autojump_clock):
    net = MemoryNetwork()
    runners = fleet(net, ["a", "b", "c"])
    newcomer = GossipRunner(GossipNode("z", addr="z:1", capabilities={"compute"}, config=CFG), net.attach("z:1"))
    async with trio.open_nursery() as nursery:
        await start(nursery, net, runners)
        await start(nursery, net, {"z:1": newcomer})
        k = key(4)
        await runners["b"].add_local(k, dg(k))
        await newcomer.join(["a"])
        assert await wait_for(lambda: {m.node_id for m in newcomer.node.membership.live_members()} == {"a", "b", "c", "z"})
        assert await wait_for(lambda: all(r.node.membership.is_live("z") for r in runners.values()))
        assert [m.node_id for m in runners["c"].node.membership.live_members("compute")] == ["z"]
        assert await wait_for(lambda: newcomer.node.index.knows(k))
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_a_silent_peer_is_declared_dead_and_a_leaving_one_left(autojump_clock):
    net = MemoryNetwork()
    runners = fleet(net, ["a", "b", "c", "d"])
    async with trio.open_nursery() as nursery:
        await start(nursery, net, runners)
        net.down("d")
        assert await wait_for(lambda: all(runners[i].node.membership.member("d").state == MemberState.DEAD for i in "abc"))
        await runners["c"].leave()
        assert await wait_for(lambda: all(runners[i].node.membership.member("c").state == MemberState.LEFT for i in "ab"))
        # d comes back (same memory, so it refutes the rumour with a higher incarnation)
        net.up("d")
        assert await wait_for(lambda: all(runners[i].node.membership.is_live("d") for i in "ab"))
        assert runners["a"].node.membership.member("d").incarnation >= 1
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_run_twice_is_refused(autojump_clock):
    runner = GossipRunner(GossipNode("a", config=CFG), FailingTransport(OSError()))
    async with trio.open_nursery() as nursery:
        await nursery.start(runner.run)
        with pytest.raises(FabricError) as ei:
            await runner.run()
        assert ei.value.status_code is StatusCode.FAILED_PRECONDITION
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_blocked_links_drop_and_unblocking_restores(autojump_clock):
    net = MemoryNetwork()
    runners = fleet(net, ["a", "b"])
    net.block("a", "b")
    async with trio.open_nursery() as nursery:
        await start(nursery, net, runners)
        k = key(5)
        await runners["a"].add_local(k, dg(k))
        await trio.sleep(3)
        assert not runners["b"].node.index.knows(k) and net.dropped > 0
        net.unblock("a", "b")
        assert await wait_for(lambda: runners["b"].node.index.knows(k))
        nursery.cancel_scope.cancel()


class SlowTransport:
    """One peer is very slow; the others are instant."""

    def __init__(self, net_transport, slow_addr):
        self.inner = net_transport
        self.slow = slow_addr

    async def send(self, peer_addr, payload):
        if peer_addr == self.slow:
            await trio.sleep(3)
        await self.inner.send(peer_addr, payload)


@pytest.mark.trio
async def test_a_slow_peer_does_not_delay_the_others(autojump_clock):
    net = MemoryNetwork()
    runners = fleet(net, ["a", "b", "c", "d"])
    runners["a"].transport = SlowTransport(runners["a"].transport, "d")
    async with trio.open_nursery() as nursery:
        await start(nursery, net, runners)
        await trio.sleep(30)
        # a's acks to b and c are never stuck behind its 3 s sends to d
        for viewer in ("b", "c"):
            m = runners[viewer].node.membership.member("a")
            assert m.state == MemberState.ALIVE and m.incarnation == 0, viewer
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_idle_senders_retire_and_come_back(autojump_clock):
    net = MemoryNetwork()
    runners = fleet(net, ["a", "b"])
    runners["a"].idle_timeout = 0.5
    async with trio.open_nursery() as nursery:
        await start(nursery, net, runners)
        await trio.sleep(2)
        net.down("b")
        runners["a"].node.membership.apply_updates(
            [MemberUpdate("b", 5, MemberState.DEAD, "b", frozenset())], trio.current_time()
        )
        # only the occasional reconnect ping goes to a dead b: its sender retires in between
        assert await wait_for(lambda: "b" not in runners["a"]._outbox, 10)
        net.up("b")
        assert await wait_for(lambda: runners["a"].node.membership.is_live("b"), 30)  # reconnect pings restart it
        nursery.cancel_scope.cancel()


class FlakyTransport:
    """Fails every send while ``down``; counts what it was handed."""

    def __init__(self):
        self.down = True
        self.calls = 0

    async def send(self, peer_addr, payload):
        self.calls += 1
        if self.down:
            raise FabricError(StatusCode.UNAVAILABLE, f"cannot connect to {peer_addr}: Connection refused")


@pytest.mark.trio
async def test_a_peer_that_keeps_failing_is_one_warning_line_rate_limited_and_its_recovery_is_said(autojump_clock, caplog):
    """Failed sends used to be logged at DEBUG only, so a peer unreachable for hours was silent."""
    from gossip import runner as runner_mod

    roster = Roster([Member("a", "a"), Member("b", "b:7000")])
    transport = FlakyTransport()
    runner = GossipRunner(GossipNode("a", roster=roster, config=CFG), transport)

    def lines(level):
        return [r.getMessage() for r in caplog.records if r.levelno == level and "'b:7000'" in r.getMessage()]

    with caplog.at_level(logging.INFO, logger="evalfabric.gossip"):
        async with trio.open_nursery() as nursery:
            await nursery.start(runner.run)
            await trio.sleep(20)
            assert runner.send_failures > 10 and len(lines(logging.WARNING)) == 1
            warning = lines(logging.WARNING)[0]
            assert f"({runner_mod.FAIL_WARN_AFTER} in a row; last: UNAVAILABLE: cannot connect to b:7000" in warning
            assert "\n" not in warning
            await trio.sleep(runner_mod.FAIL_WARN_EVERY_S)
            assert len(lines(logging.WARNING)) == 2  # reminded, not once per send
            assert not lines(logging.INFO)
            transport.down = False
            failures = runner.send_failures
            await trio.sleep(20)
            assert runner.send_failures == failures
            assert len(lines(logging.INFO)) == 1 and "work again after" in lines(logging.INFO)[0]
            transport.down = True  # failing again: a new episode, warned of once more
            await trio.sleep(20)
            assert len(lines(logging.WARNING)) == 3
            nursery.cancel_scope.cancel()
