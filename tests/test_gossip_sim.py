"""The deterministic simulator: dissemination at 1,000+ nodes, partitions, crashes, restarts."""

from __future__ import annotations

import hashlib
import math

import pytest

from cassette.errors import FabricError
from cassette.keys import ContentKey
from gossip.membership import MembershipConfig
from gossip.messages import MemberState
from gossip.node import GossipConfig
from gossip.sim import Simulator, anti_entropy_bytes, catchup_bytes, dissemination_rounds


def key(tag: str) -> ContentKey:
    return ContentKey.of("request", tag.encode())


def dg(k: bytes) -> bytes:
    return hashlib.blake2b(bytes(k), digest_size=32).digest()


NO_REPAIR = GossipConfig(membership=MembershipConfig(member_sync_interval=None))


def spread(sim: Simulator, k: bytes, max_rounds: float) -> float | None:
    waiting = [sim.node(i) for i in sim.up_ids()]

    def done(_):
        nonlocal waiting
        waiting = [n for n in waiting if not n.index.knows(k)]
        return not waiting

    return sim.run_until(done, max_rounds)


# -- dissemination -------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [1, 2])
def test_1000_nodes_new_fact_reaches_every_node_within_2_log2_n_rounds(seed):
    n = 1000
    sim = Simulator(n, seed=seed, loss=0.05, config=GossipConfig(fanout=3, membership=NO_REPAIR.membership))
    sim.run(2)  # let the fleet settle into its rhythm first
    k = key(f"fresh/{seed}")
    sim.add_fact("n17", k, dg(k))
    rounds = spread(sim, k, 2 * math.log2(n))
    assert rounds is not None, "the fact did not reach every node within 2*log2(N) rounds"
    assert sim.stats.dropped_loss > 0.03 * sim.stats.sent  # the loss really happened
    assert all(sim.node(i).holders(k) == [("n17", dg(k))] for i in sim.ids[::50])


def test_dissemination_rounds_helper():
    r = dissemination_rounds(1000, fanout=3, loss=0.05, seed=3)
    assert isinstance(r, int) and 1 <= r <= 2 * math.log2(1000)
    assert dissemination_rounds(1000, fanout=3, loss=0.05, seed=3) == r  # deterministic


@pytest.mark.slow
def test_10000_nodes_dissemination():
    n = 10_000
    assert dissemination_rounds(n, fanout=3, loss=0.05, seed=1) <= 2 * math.log2(n)


# -- partitions --------------------------------------------------------------------------------
def test_partition_healed_converges_fully():
    sim = Simulator(40, seed=11, loss=0.02)
    sim.run(3)
    left, right = sim.ids[:20], sim.ids[20:]
    sim.partition([left, right])
    ka, kb = key("left side"), key("right side")
    sim.add_fact(left[3], ka, dg(ka))
    sim.add_fact(right[5], kb, dg(kb))
    for i in range(6):
        k = key(f"during/{i}")
        sim.add_fact(sim.ids[i * 6], k, dg(k))
    sim.run(30)
    # each side knows its own news only, and has given up on the other side
    assert sim.node(left[0]).index.knows(ka) and not sim.node(left[0]).index.knows(kb)
    assert sim.node(right[0]).index.knows(kb) and not sim.node(right[0]).index.knows(ka)
    assert not sim.node(left[0]).membership.is_live(right[0])
    assert sim.stats.dropped_partition > 0
    sim.heal()
    rounds = sim.run_until(lambda s: s.converged() and s.membership_agrees(), 150)
    assert rounds is not None, "no convergence after the partition healed"
    for nid in sim.ids:
        idx = sim.node(nid).index
        assert idx.knows(ka) and idx.knows(kb) and len(idx) == 8


def test_three_way_partition_heals():
    sim = Simulator(30, seed=5, config=NO_REPAIR)
    sim.partition([sim.ids[:10], sim.ids[10:20]])  # the rest form the third group
    for g, nid in enumerate(("n1", "n12", "n25")):
        k = key(f"group/{g}")
        sim.add_fact(nid, k, dg(k))
    sim.run(10)
    assert not sim.converged()
    sim.heal()
    assert sim.run_until(lambda s: s.converged(), 60) is not None


# -- determinism ----------------------------------------------------------------------------------
def _scenario(seed: int) -> str:
    sim = Simulator(60, seed=seed, loss=0.05, delay=(1, 3))
    k = key("det")
    sim.add_fact("n2", k, dg(k))
    sim.run(3)
    sim.partition([sim.ids[:30]])
    sim.crash("n40")
    sim.run(4)
    sim.heal()
    sim.restart("n40")
    sim.run(4)
    return sim.trace_hash()


def test_same_seed_same_trace_hash():
    assert _scenario(7) == _scenario(7)
    assert _scenario(7) != _scenario(8)


# -- crashes and restarts ----------------------------------------------------------------------------
def test_crashed_node_leaves_the_live_set_and_a_restart_brings_it_back():
    sim = Simulator(100, seed=21, loss=0.02)
    mine = [key(f"n9/{i}") for i in range(5)]
    for k in mine:
        sim.add_fact("n9", k, dg(k))
    other = key("n50/0")
    sim.add_fact("n50", other, dg(other))
    sim.run(4)
    assert all(sim.node(i).live_holders(mine[0]) == [("n9", dg(mine[0]))] for i in sim.up_ids())
    before = sim.node("n9").membership.incarnation

    sim.crash("n9")
    assert not sim.is_up("n9")
    gone = sim.run_until(lambda s: all(not s.node(i).membership.is_live("n9") for i in s.up_ids()), 80)
    assert gone is not None, "the crashed node was never declared dead"
    for nid in sim.up_ids():
        node = sim.node(nid)
        assert node.membership.member("n9").state == MemberState.DEAD
        assert "n9" not in {m.node_id for m in node.membership.live_members()}
        assert node.live_holders(mine[0]) == []  # no longer chosen as a holder
        assert node.holders(mine[0]) == [("n9", dg(mine[0]))]  # but the fact is not forgotten
        assert node.home(mine[0]) != "n9"

    fresh = sim.restart("n9")
    assert fresh.membership.incarnation > before
    assert len(fresh.index) == 5  # replayed from its ledger
    back = sim.run_until(lambda s: s.membership_agrees() and s.converged(), 60)
    assert back is not None, "the restarted node did not rejoin"
    for nid in sim.up_ids():
        node = sim.node(nid)
        m = node.membership.member("n9")
        assert m.state == MemberState.ALIVE and m.incarnation > before
        for k in mine:
            assert node.live_holders(k) == [("n9", dg(k))]  # its holdings reappear
    assert sim.node("n9").index.knows(other)  # and it re-learned the others' facts


def test_crash_and_restart_are_idempotent_guards():
    sim = Simulator(3, seed=1)
    sim.crash("n1")
    sim.crash("n1")
    with pytest.raises(FabricError):
        sim.node("n1")
    sim.restart("n1")
    with pytest.raises(FabricError):
        sim.restart("n1")
    with pytest.raises(FabricError):
        sim.node("nope")


# -- wire mode and byte costs --------------------------------------------------------------------------
def test_wire_mode_round_trips_every_message_and_counts_bytes():
    sim = Simulator(20, seed=4, loss=0.05, wire=True)
    for i in range(5):
        k = key(f"wire/{i}")
        sim.add_fact(f"n{i}", k, dg(k))
    assert sim.run_until(lambda s: s.converged(), 30) is not None
    assert sim.stats.bytes > 0 and set(sim.stats.bytes_by_type) >= {"ping", "ack", "sync", "facts"}
    assert sum(sim.stats.bytes_by_type.values()) == sim.stats.bytes


def test_in_sync_anti_entropy_bytes_do_not_grow_with_keys():
    small = anti_entropy_bytes(1_000)
    large = anti_entropy_bytes(100_000)
    assert 0 < small < 100
    assert large <= 1.1 * small


@pytest.mark.parametrize("d", [10, 1_000, 20_000])
def test_catch_up_costs_linear_bytes(d):
    b = catchup_bytes(d)
    assert 65 * d <= b <= 66 * d + 2_000


def test_simulator_validates_its_arguments():
    with pytest.raises(FabricError):
        Simulator(3, loss=1.0)
    with pytest.raises(FabricError):
        Simulator(3, delay=(0, 1))
    with pytest.raises(FabricError):
        Simulator(node_ids=["a", "a"])
