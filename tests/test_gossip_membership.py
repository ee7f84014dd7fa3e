"""SWIM membership: probes, indirect probes, suspicion, refutation, death, rejoin."""

from __future__ import annotations

import random

import pytest

from cassette.errors import FabricError
from gossip.membership import Member, Membership, MembershipConfig, Roster
from gossip.messages import Ack, Members, MemberState, MemberUpdate, Ping, PingReq

ALIVE, SUSPECT, DEAD, LEFT = MemberState.ALIVE, MemberState.SUSPECT, MemberState.DEAD, MemberState.LEFT
QUIET = MembershipConfig(member_sync_interval=None, reconnect_interval=None)


class Net:
    """Zero-delay synchronous network of Membership machines with link cuts."""

    def __init__(self, ids, config=QUIET, caps=None, roster=True):
        self.ids = list(ids)
        r = Roster(Member(i, i, capabilities=frozenset((caps or {}).get(i, ()))) for i in self.ids) if roster else None
        self.m = {
            i: Membership(i, capabilities=(caps or {}).get(i, ()), config=config, rng=random.Random(i), roster=r, now=0.0)
            for i in self.ids
        }
        self.cut: set[frozenset] = set()
        self.down: set[str] = set()
        self.log: list[tuple[str, str, object]] = []
        self.now = 0.0

    def ok(self, a, b):
        return a not in self.down and b not in self.down and frozenset((a, b)) not in self.cut

    def pump(self, out, src):
        queue = [(src, dst, msg) for dst, msg in out]
        while queue:
            s, d, msg = queue.pop(0)
            self.log.append((s, d, msg))
            if not self.ok(s, d) or d not in self.m:
                continue
            for dst, reply in self.m[d].receive(s, msg, self.now):
                queue.append((d, dst, reply))

    def tick_all(self, now):
        self.now = now
        for i in self.ids:
            if i not in self.down:
                self.pump(self.m[i].tick(now), i)

    def run(self, until, step=0.1):
        t = self.now
        while t < until - 1e-9:
            t = round(t + step, 6)
            self.tick_all(t)

    def state(self, viewer, target):
        return self.m[viewer].member(target).state


def test_ping_ack_keeps_everyone_alive():
    net = Net(["a", "b", "c"])
    net.run(10)
    for v in net.ids:
        assert [m.node_id for m in net.m[v].live_members()] == ["a", "b", "c"]
        assert all(m.state == ALIVE for m in net.m[v].members())
    kinds = {type(msg) for _, _, msg in net.log}
    assert Ping in kinds and Ack in kinds and PingReq not in kinds


def test_indirect_probe_avoids_false_suspicion():
    net = Net(["a", "b", "c", "d"])
    net.cut.add(frozenset(("a", "b")))  # a cannot reach b directly, c and d can
    net.run(15)
    assert net.state("a", "b") == ALIVE
    assert any(type(msg) is PingReq and s == "a" and msg.target == "b" for s, _, msg in net.log)
    # the relayed ack came back to a from a helper
    assert any(type(msg) is Ack and d == "a" and s in ("c", "d") for s, d, msg in net.log)


def test_crashed_member_is_suspected_then_declared_dead():
    net = Net(["a", "b", "c", "d"])
    net.run(2)
    net.down.add("d")
    cfg = net.m["a"].config
    timeout = cfg.suspicion_timeout(4)
    saw_suspect = False
    for _ in range(int((timeout + 20) / 0.1)):
        net.run(net.now + 0.1)
        states = {net.state(v, "d") for v in ("a", "b", "c")}
        saw_suspect |= SUSPECT in states
        if states == {DEAD}:
            break
    assert saw_suspect
    assert {net.state(v, "d") for v in ("a", "b", "c")} == {DEAD}
    assert all("d" not in {m.node_id for m in net.m[v].live_members()} for v in ("a", "b", "c"))
    assert not net.m["a"].is_live("d")


def test_suspected_member_refutes_with_a_higher_incarnation():
    net = Net(["a", "b", "c"])
    a, b = net.m["a"], net.m["b"]
    a.apply_updates([MemberUpdate("b", 0, SUSPECT, "b", frozenset())], 0.0)
    assert net.state("a", "b") == SUSPECT
    net.run(8)
    assert b.incarnation == 1
    assert net.state("a", "b") == ALIVE and a.member("b").incarnation == 1
    assert net.state("c", "b") == ALIVE


def test_dead_rumour_about_self_is_refuted_even_without_persisted_incarnation():
    m = Membership("x", config=QUIET, rng=random.Random(1))
    m.apply_updates([MemberUpdate("x", 4, DEAD, "x", frozenset())], 0.0)
    assert m.incarnation == 5
    assert any(u.node_id == "x" and u.state == ALIVE and u.incarnation == 5 for u in m.piggyback())
    m.apply_updates([MemberUpdate("x", 9, ALIVE, "x", frozenset())], 0.0)  # an old life claims more
    assert m.incarnation == 10


@pytest.mark.parametrize(
    "current, update, accepted",
    [
        ((ALIVE, 3), (ALIVE, 3), False),
        ((ALIVE, 3), (ALIVE, 4), True),
        ((ALIVE, 3), (SUSPECT, 2), False),
        ((ALIVE, 3), (SUSPECT, 3), True),
        ((SUSPECT, 3), (SUSPECT, 3), False),
        ((SUSPECT, 3), (SUSPECT, 4), True),
        ((SUSPECT, 3), (ALIVE, 3), False),
        ((SUSPECT, 3), (ALIVE, 4), True),
        ((SUSPECT, 3), (DEAD, 3), True),
        ((ALIVE, 3), (DEAD, 3), True),
        ((ALIVE, 3), (DEAD, 2), False),
        ((DEAD, 3), (ALIVE, 3), False),
        ((DEAD, 3), (ALIVE, 4), True),
        ((DEAD, 3), (SUSPECT, 3), False),
        ((DEAD, 3), (DEAD, 3), False),
        ((DEAD, 3), (LEFT, 3), False),
        ((ALIVE, 3), (LEFT, 3), True),
    ],
)
def test_precedence_rules(current, update, accepted):
    m = Membership("me", config=QUIET, rng=random.Random(0))
    m.apply_updates([MemberUpdate("x", current[1], current[0], "addr-x", frozenset({"serve"}))], 0.0)
    changed = m.apply_updates([MemberUpdate("x", update[1], update[0], "addr-x", frozenset({"serve"}))], 0.0)
    assert bool(changed) == accepted
    expect = update if accepted else current
    got = m.member("x")
    assert (got.state, got.incarnation) == expect


def test_a_newer_incarnation_brings_its_address_whatever_its_state():
    """A restart on a new port first reaches some nodes as a SUSPECT rumour: they must
    not keep dialling the dead process's address."""
    m = Membership("me", config=QUIET, rng=random.Random(0))
    m.apply_updates([MemberUpdate("x", 1, DEAD, "old:1", frozenset({"serve"}))], 0.0)
    m.apply_updates([MemberUpdate("x", 2, SUSPECT, "new:2", frozenset({"serve", "gpu"}))], 0.0)
    got = m.member("x")
    assert (got.state, got.incarnation, got.addr, got.capabilities) == (SUSPECT, 2, "new:2", frozenset({"serve", "gpu"}))
    # the same incarnation's suspicion does not rewrite what its ALIVE said
    m.apply_updates([MemberUpdate("y", 3, ALIVE, "right:3", frozenset())], 0.0)
    m.apply_updates([MemberUpdate("y", 3, SUSPECT, "stale:9", frozenset())], 0.0)
    assert m.member("y").addr == "right:3"


def test_restarted_node_rejoins_with_higher_incarnation():
    net = Net(["a", "b", "c", "d"])
    net.run(2)
    net.down.add("d")
    net.run(net.now + net.m["a"].config.suspicion_timeout(4) + 15)
    assert net.state("a", "d") == DEAD
    old = net.m["a"].member("d").incarnation
    # the restart: fresh memory, incarnation above the old one
    net.m["d"] = Membership("d", config=QUIET, rng=random.Random(99), roster=Roster(Member(i, i) for i in net.ids), incarnation=old + 1, now=net.now)
    net.down.discard("d")
    net.run(net.now + 10)
    for v in ("a", "b", "c"):
        assert net.state(v, "d") == ALIVE
        assert net.m[v].member("d").incarnation > old


def test_reconnect_heals_a_false_death():
    cfg = MembershipConfig(member_sync_interval=None, reconnect_interval=1.0)
    net = Net(["a", "b", "c"], config=cfg)
    # a and b wrongly believe c is dead (as after a partition)
    for v in ("a", "b"):
        net.m[v].apply_updates([MemberUpdate("c", 0, DEAD, "c", frozenset())], 0.0)
    # and c believes a and b are dead
    net.m["c"].apply_updates([MemberUpdate("a", 0, DEAD, "a", frozenset()), MemberUpdate("b", 0, DEAD, "b", frozenset())], 0.0)
    net.run(30)
    for v in net.ids:
        assert {m.node_id for m in net.m[v].live_members()} == {"a", "b", "c"}, v
    assert net.m["c"].incarnation >= 1


def test_join_through_a_seed_learns_everyone():
    net = Net(["a", "b", "c"])
    net.run(1)
    newcomer = Membership("z", "z-addr", ("compute",), config=QUIET, rng=random.Random(5))
    net.m["z-addr"] = newcomer  # address -> machine for the harness
    net.ids.append("z-addr")
    net.pump(newcomer.join(["a"], net.now), "z-addr")
    assert {m.node_id for m in newcomer.live_members()} == {"a", "b", "c", "z"}
    assert net.m["a"].member("z").addr == "z-addr"
    assert net.m["a"].member("z").capabilities == frozenset({"compute"})
    net.run(net.now + 10)
    assert net.m["b"].is_live("z") and net.m["c"].is_live("z")


def test_members_message_answers_only_when_asked():
    m = Membership("a", config=QUIET, rng=random.Random(1))
    out = m.receive("b", Members("b", (MemberUpdate("b", 0, ALIVE, "b", frozenset()),), False, ()), 0.0)
    assert out == [] and m.is_live("b")
    out = m.receive("b", Members("b", (), True, ()), 0.0)
    assert len(out) == 1 and type(out[0][1]) is Members and out[0][1].reply is False
    assert {u.node_id for u in out[0][1].members} == {"a", "b"}


def test_leave_is_announced_and_final():
    net = Net(["a", "b", "c"])
    net.run(1)
    net.pump(net.m["c"].leave(net.now), "c")
    net.down.add("c")
    net.run(net.now + 5)
    assert net.state("a", "c") == LEFT and net.state("b", "c") == LEFT
    assert not net.m["a"].is_live("c")


def test_tick_always_moves_the_deadline_forward_even_after_leaving():
    net = Net(["a", "b", "c"], config=MembershipConfig())
    net.pump(net.m["a"].leave(0.0), "a")
    for step in range(1, 400):
        now = step * 0.1
        for i in net.ids:
            net.pump(net.m[i].tick(now), i)
            assert net.m[i].next_deadline() > now


def _pair(**cfg):
    roster = Roster([Member("a", "a"), Member("b", "b"), Member("c", "c")])
    config = MembershipConfig(member_sync_interval=None, reconnect_interval=None, **cfg)
    return Membership("a", config=config, rng=random.Random(0), roster=roster, now=0.0)


def test_a_stalled_node_does_not_blame_its_peers():
    a = _pair()
    now = 0.0
    while a._probe is None:
        a.tick(now)
        now = round(now + 0.1, 6)
    probe = a._probe
    # the process is paused for 10 s: no ticks, no reads
    a.tick(now + 10.0)
    assert a.member(probe.target).state == ALIVE, "a stall was blamed on the peer"
    assert a.local_health >= 1 and a._probe is probe
    # the ack that was waiting unread is read now: the probe succeeds
    a.receive(probe.addr, Ack(probe.target, probe.seq, ()), now + 10.0)
    assert a._probe is None and a.member(probe.target).state == ALIVE


def test_suspicion_timers_pause_during_a_stall():
    a = _pair()
    a.tick(0.0)
    a.apply_updates([MemberUpdate("c", 0, SUSPECT, "c", frozenset())], 0.0)
    timeout = a.config.suspicion_timeout(3)
    a.tick(0.5)
    a.tick(timeout + 5.0)  # stalled across the whole suspicion period
    assert a.member("c").state == SUSPECT
    for step in range(1, 200):
        a.tick(timeout + 5.0 + step * 0.1)
    assert a.member("c").state == DEAD  # but it does expire once time is observed again


def test_local_health_stretches_probing_when_probes_keep_failing():
    roster = Roster(Member(f"m{i}", f"m{i}") for i in range(20))
    cfg = MembershipConfig(member_sync_interval=None, reconnect_interval=None, indirect_k=0)
    a = Membership("m0", config=cfg, rng=random.Random(0), roster=roster)
    now, pings = 0.0, []
    while now < 100:
        for _, m in a.tick(now):
            if type(m) is Ping:
                pings.append(now)
        now = round(now + 0.1, 6)
    assert a.local_health == a.config.max_local_health  # nobody ever answered
    gaps = [b - x for x, b in zip(pings, pings[1:])]
    assert gaps[0] < 1.5 and max(gaps) > 5  # the probe period grew with local health
    # answers bring it back down
    for _ in range(3):
        nxt = a.next_deadline()
        a.tick(nxt)
        p = a._probe
        if p is not None:
            a.receive(p.addr, Ack(p.target, p.seq, ()), nxt)
    assert a.local_health < a.config.max_local_health


def test_capabilities_filter_and_change():
    net = Net(["a", "b", "c"], caps={"a": {"serve"}, "b": {"serve", "gpu"}, "c": {"compute", "eval:embed"}})
    assert [m.node_id for m in net.m["a"].live_members("gpu")] == ["b"]
    assert [m.node_id for m in net.m["a"].live_members("eval:embed")] == ["c"]
    net.m["a"].set_capabilities({"serve", "eval:embed"})
    assert net.m["a"].incarnation == 1
    net.run(6)
    assert [m.node_id for m in net.m["b"].live_members("eval:embed")] == ["a", "c"]


def test_piggyback_respects_limits_and_retransmit_count():
    cfg = MembershipConfig(max_piggyback=3, member_sync_interval=None, reconnect_interval=None)
    roster = Roster([Member("me", "me")] + [Member(f"x{i}", f"x{i}") for i in range(10)])
    m = Membership("me", config=cfg, rng=random.Random(0), roster=roster)
    assert m.apply_updates([MemberUpdate(f"x{i}", 1, ALIVE, f"x{i}", frozenset()) for i in range(10)], 0.0) == 10
    limit = cfg.retransmit_limit(11)
    assert limit == 6
    total = 0
    while True:
        batch = m.piggyback()
        assert len(batch) <= 3
        if not batch:
            break
        total += len(batch)
    assert total == 11 * limit  # ten learned updates and our own ALIVE, each sent `limit` times
    assert m.pending_updates() == 0


def test_ping_for_another_node_id_is_ignored():
    m = Membership("a", config=QUIET, rng=random.Random(0))
    assert m.receive("x", Ping("x", 1, "someone-else", ()), 0.0) == []
    out = m.receive("x", Ping("x", 2, None, ()), 0.0)
    assert out and type(out[0][1]) is Ack and out[0][1].seq == 2 and out[0][0] == "x"


def test_reply_to_a_sender_we_think_dead_carries_our_verdict():
    m = Membership("a", config=QUIET, rng=random.Random(0))
    m.apply_updates([MemberUpdate("b", 2, DEAD, "b", frozenset())], 0.0)
    (dst, ack), = m.receive("b", Ping("b", 1, "a", ()), 0.0)
    assert ack.updates[0] == MemberUpdate("b", 2, DEAD, "b", frozenset())


def test_random_live_peers_are_distinct_live_and_never_self():
    roster = Roster(Member(f"n{i}", f"n{i}") for i in range(50))
    m = Membership("n0", config=QUIET, rng=random.Random(3), roster=roster)
    for i in range(1, 25):
        m.apply_updates([MemberUpdate(f"n{i}", 0, DEAD, f"n{i}", frozenset())], 0.0)
    for _ in range(50):
        peers = m.random_live_peers(5)
        ids = [p[0] for p in peers]
        assert len(ids) == len(set(ids)) == 5
        assert all(int(i[1:]) >= 25 for i in ids)
    assert len(m.random_live_peers(100)) == 25
    assert len(m) == 50


def test_same_seed_same_behaviour():
    def trace(seed):
        net = Net(["a", "b", "c", "d"])
        for i in net.ids:
            net.m[i]._rng.seed(seed)
        net.down.add("b")
        net.run(12)
        return [(s, d, type(msg).__name__, getattr(msg, "seq", None)) for s, d, msg in net.log]

    assert trace(7) == trace(7)


def test_config_validation():
    with pytest.raises(FabricError):
        MembershipConfig(ping_timeout=2.0, probe_interval=1.0)
    with pytest.raises(FabricError):
        MembershipConfig(max_piggyback=0)
    with pytest.raises(FabricError):
        Roster([("a", "a")])  # type: ignore[list-item]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"addr": "x" * 300},
        {"capabilities": "serve"},
        {"capabilities": {"serve", ""}},
        {"capabilities": {"c" * 200}},
        {"incarnation": -1},
    ],
)
def test_own_identity_is_validated(kwargs):
    with pytest.raises(FabricError):
        Membership("me", **kwargs)


def test_shared_roster_is_not_mutated_by_one_member():
    roster = Roster(Member(i, i) for i in ("a", "b", "c"))
    a = Membership("a", config=QUIET, rng=random.Random(0), roster=roster)
    b = Membership("b", config=QUIET, rng=random.Random(1), roster=roster)
    a.apply_updates([MemberUpdate("c", 0, DEAD, "c", frozenset())], 0.0)
    assert a.member("c").state == DEAD
    assert b.member("c").state == ALIVE
    assert roster.get("c").state == ALIVE


def test_a_seed_that_is_not_up_yet_is_asked_again_each_probe_period_until_it_answers():
    """`fabric node --join` before the seed runs: the first join push is lost, so the
    joiner asks again every probe period while it knows no live member, and stops
    once it does (the README promises a seed that is not up yet is fine)."""
    net = Net(["a"])
    joiner = Membership("z", "z-addr", config=QUIET, rng=random.Random(5))
    net.m["z-addr"] = joiner
    net.ids.append("z-addr")
    net.down.add("a")  # the seed is not up yet: the first push is lost
    net.pump(joiner.join(["a"], net.now), "z-addr")
    net.run(3)
    assert not joiner.is_live("a")
    assert sum(1 for s, d, m in net.log if s == "z-addr" and d == "a" and type(m) is Members) >= 3
    net.down.discard("a")  # the seed comes up
    net.run(net.now + 2)
    assert joiner.is_live("a") and net.m["a"].is_live("z")
    pushes = sum(1 for s, d, m in net.log if s == "z-addr" and type(m) is Members)
    net.run(net.now + 5)  # joined: no more join pushes (probes keep it alive)
    assert sum(1 for s, d, m in net.log if s == "z-addr" and type(m) is Members) == pushes


def test_a_node_that_never_joined_asks_no_one():
    m = Membership("z", config=QUIET, rng=random.Random(5))
    assert m.tick(0.0) == [] and m.tick(5.0) == []


def test_a_full_state_larger_than_one_message_goes_as_several_each_within_the_bound():
    """A peer refuses a ``members`` message of more than MAX_MEMBERS entries, so a larger
    membership is sent in parts; the first alone asks for a reply, and the receiver learns all."""
    from gossip.messages import MAX_MEMBERS, decode_message, encode_message

    n = MAX_MEMBERS + 10
    roster = Roster(Member(f"m{i}", f"10.1.{i >> 8}.{i & 255}:7000") for i in range(n))
    big = Membership("m0", config=QUIET, rng=random.Random(1), roster=roster)
    out = big.join(["seed:7000"], 0.0)
    assert [len(m.members) for _, m in out] == [MAX_MEMBERS, 10] and [m.reply for _, m in out] == [True, False]
    assert {a for a, _ in out} == {"seed:7000"}
    seed = Membership("seed", "seed:7000", config=QUIET, rng=random.Random(2))
    answers = [seed.receive("m0-addr", decode_message(encode_message(msg)), 0.0) for _, msg in out]  # each decodes
    assert len(seed.live_members()) == n + 1
    assert [len(a) for a in answers] == [2, 0]  # one exchange, one answer (itself in two parts)
    answers = seed.receive("m0-addr", Members("m0", (), True, ()), 0.0)
    assert [len(m.members) for _, m in answers] == [MAX_MEMBERS, 11] and not any(m.reply for _, m in answers)
