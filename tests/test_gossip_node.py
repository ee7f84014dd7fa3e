"""GossipNode: anti-entropy, eager push, holders/home, conflicts, and a stateful cluster model."""

from __future__ import annotations

import hashlib
import logging
import random
from collections import Counter

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from cassette.errors import FabricError
from cassette.keys import ContentKey
from gossip.holding import HeldContent, HoldingIndex
from gossip.membership import Member, MembershipConfig, Roster
from gossip.messages import Facts, MemberState, MemberUpdate, Summary, SyncRequest, decode_message, encode_message
from gossip.node import GossipConfig, GossipNode, rendezvous_home, rendezvous_order

QUIET = GossipConfig(membership=MembershipConfig(member_sync_interval=None, reconnect_interval=None))


def k(i) -> ContentKey:
    return ContentKey.of("request", b"node-test-%d" % i)


def dg(key) -> bytes:
    return hashlib.blake2b(bytes(key), digest_size=32).digest()


def pair(config=QUIET):
    roster = Roster([Member("a", "a"), Member("b", "b")])
    a = GossipNode("a", rng=random.Random(1), config=config, roster=roster)
    b = GossipNode("b", rng=random.Random(2), config=config, roster=roster)
    return a, b


def exchange(nodes: dict, out, src):
    """Deliver everything (zero delay, through the wire codec); return the messages seen."""
    seen = []
    queue = [(src, d, m) for d, m in out]
    while queue:
        s, d, m = queue.pop(0)
        m = decode_message(encode_message(m))
        seen.append((s, d, m))
        for d2, m2 in nodes[d].receive(s, m, 0.0):
            queue.append((d, d2, m2))
    return seen


def sync_from(a: GossipNode, b: GossipNode):
    """Run one anti-entropy exchange started by a towards b."""
    msg = SyncRequest(a.node_id, a.index.summary_digest(), ())
    return exchange({a.node_id: a, b.node_id: b}, [(b.node_id, msg)], a.node_id)


# -- anti-entropy ---------------------------------------------------------------------
def test_in_sync_exchange_is_one_small_message():
    a, b = pair()
    for i in range(200):
        a.add_local(k(i), dg(k(i)), announce=False)
    b.index.merge(list(a.index.facts()))
    seen = sync_from(a, b)
    assert [type(m) for _, _, m in seen] == [SyncRequest]
    assert len(encode_message(seen[0][2])) < 64
    assert b.stats.syncs_in_sync == 1


def test_exchange_sends_only_what_each_side_lacks():
    a, b = pair()
    for i in range(30):
        a.add_local(k(i), dg(k(i)), announce=False)
    b.index.merge(list(a.index.facts())[:20])
    for i in range(100, 105):
        b.add_local(k(i), dg(k(i)), announce=False)
    seen = sync_from(a, b)
    facts_to_b = sum(r.count for s, d, m in seen if type(m) is Facts and d == "b" for r in m.runs)
    facts_to_a = sum(r.count for s, d, m in seen if type(m) is Facts and d == "a" for r in m.runs)
    assert (facts_to_b, facts_to_a) == (10, 5)
    assert [type(m).__name__ for _, _, m in seen].count("Summary") == 2
    assert a.index.summary_digest() == b.index.summary_digest()
    assert len(a.index) == len(b.index) == 35


def test_large_catch_up_is_chunked_and_bounded_per_exchange():
    cfg = GossipConfig(max_facts_per_message=100, max_facts_per_exchange=250, membership=QUIET.membership)
    a, b = pair(cfg)
    for i in range(600):
        a.add_local(k(i), dg(k(i)), announce=False)
    rounds = 0
    while a.index.summary_digest() != b.index.summary_digest() and rounds < 10:
        rounds += 1
        seen = sync_from(b, a)
        for _, _, m in seen:
            if type(m) is Facts:
                assert sum(r.count for r in m.runs) <= 100
        assert sum(sum(r.count for r in m.runs) for _, _, m in seen if type(m) is Facts) <= 250
        # forget the in-flight memory, as time passing would
        a._sent.clear()
        b._sent.clear()
    assert rounds == 3 and len(b.index) == 600


def test_overlapping_exchanges_do_not_send_the_same_facts_twice():
    a, b = pair()
    for i in range(50):
        a.add_local(k(i), dg(k(i)), announce=False)
    s_b = Summary.of("b", b.index.summary(), False)
    first = a.receive("b", s_b, 0.0)
    second = a.receive("b", s_b, 0.1)  # b's summary again, before our facts arrived
    assert sum(r.count for _, m in first if type(m) is Facts for r in m.runs) == 50
    assert [m for _, m in second if type(m) is Facts] == []
    third = a.receive("b", s_b, 5.0)  # memory expired: the answer may have been lost, resend
    assert sum(r.count for _, m in third if type(m) is Facts for r in m.runs) == 50


# -- eager push ------------------------------------------------------------------------
def test_new_local_fact_is_pushed_to_fanout_peers_at_next_tick():
    ids = [f"n{i}" for i in range(8)]
    roster = Roster(Member(i, i) for i in ids)
    node = GossipNode("n0", rng=random.Random(4), config=QUIET, roster=roster)
    fact = node.add_local(k(1), dg(k(1)))
    assert node.next_deadline() == float("-inf")
    out = [(d, m) for d, m in node.tick(0.0) if type(m) is Facts]
    assert len(out) == 3 and len({d for d, _ in out}) == 3 and "n0" not in {d for d, _ in out}
    assert all(m.push and m.runs[0].records == fact.record for _, m in out)
    assert [m for _, m in node.tick(0.01) if type(m) is Facts] == []  # sent once


def test_pushed_facts_are_relayed_once_and_anti_entropy_facts_are_not():
    ids = [f"n{i}" for i in range(8)]
    roster = Roster(Member(i, i) for i in ids)
    node = GossipNode("n1", rng=random.Random(4), config=QUIET, roster=roster)
    src = HoldingIndex("n0")
    f = src.add_local(k(1), dg(k(1)))
    g = src.add_local(k(2), dg(k(2)))
    push = Facts("n0", tuple(src.missing_runs({}, limit=1)), True, ())
    node.receive("n0", push, 0.0)
    relayed = [m for _, m in node.tick(0.0) if type(m) is Facts]
    assert len(relayed) == 3 and all(m.runs[0].records == f.record for m in relayed)
    node.receive("n0", push, 0.1)  # the same push again: nothing new, nothing relayed
    assert [m for _, m in node.tick(0.1) if type(m) is Facts] == []
    node.receive("n0", Facts("n0", tuple(src.missing_runs({"n0": 1})), False, ()), 0.2)
    assert g in node.index
    assert [m for _, m in node.tick(0.2) if type(m) is Facts] == []


# -- holders, home, conflicts -------------------------------------------------------------
def test_live_holders_and_home_skip_dead_members():
    ids = ["a", "b", "c", "d"]
    roster = Roster(Member(i, i, capabilities=frozenset({"serve", "eval:embed"} if i != "d" else {"serve"})) for i in ids)
    node = GossipNode("a", rng=random.Random(0), config=QUIET, roster=roster)
    key = k(7)
    node.index.merge([HeldContent(h, key, dg(key), 1) for h in ("b", "c")])
    assert [h for h, _ in node.live_holders(key)] == ["b", "c"]
    home = node.home(key, "eval:embed")
    assert home == rendezvous_home(key, ["a", "b", "c"])
    node.membership.apply_updates([MemberUpdate("c", 0, MemberState.DEAD, "c", frozenset())], 0.0)
    assert [h for h, _ in node.live_holders(key)] == ["b"]
    assert [h for h, _ in node.holders(key)] == ["b", "c"]  # the fact itself stays
    assert node.home(key, "eval:embed") == rendezvous_home(key, ["a", "b"])
    assert node.home(key, "eval:nothing") is None


def test_rendezvous_is_deterministic_balanced_and_minimally_disruptive():
    nodes = [f"n{i}" for i in range(5)]
    keys = [k(i) for i in range(2000)]
    homes = {key: rendezvous_home(key, nodes) for key in keys}
    counts = Counter(homes.values())
    assert set(counts) == set(nodes)
    assert all(250 <= c <= 550 for c in counts.values()), counts
    # removing one node moves only the keys it was home for
    fewer = nodes[:2] + nodes[3:]
    for key in keys:
        new = rendezvous_home(key, fewer)
        if homes[key] != "n2":
            assert new == homes[key]
    assert rendezvous_home(keys[0], []) is None
    order = rendezvous_order(keys[0], nodes)
    assert order[0] == homes[keys[0]] and sorted(order) == sorted(nodes)
    assert rendezvous_home(keys[0], [Member(n, n) for n in nodes]) == homes[keys[0]]


def test_digest_conflict_is_logged_counted_and_resolved_by_majority(caplog):
    a, b = pair()
    key = k(3)
    a.add_local(key, dg(key))
    other = HoldingIndex("b")
    other.add_local(key, b"\x00" * 32)
    third = HoldingIndex("c")
    third.add_local(key, dg(key))
    with caplog.at_level(logging.WARNING, logger="evalfabric.gossip"):
        a.receive("b", Facts("b", tuple(other.missing_runs({})), False, ()), 0.0)
        a.receive("b", Facts("b", tuple(other.missing_runs({})), False, ()), 0.0)
    warnings = [r for r in caplog.records if "determinism violation" in r.getMessage()]
    assert len(warnings) == 1 and key.short() in warnings[0].getMessage()
    assert a.stats.conflicts == 1
    assert a.index.digest_conflicts() == [key]
    a.index.merge(third.facts())
    assert a.preferred_digest(key) == dg(key)


def test_a_tie_goes_to_the_home_among_members_advertising_the_evaluator_and_never_to_a_bare_live_one():
    """specs/gossip.md 3.4 and 6: the home that breaks a 1-1 tie is chosen among live members
    advertising the evaluator; a key of no evaluator (capability None) has no home.  The node
    used to take capability None as "every live member", whose home may not run the evaluator."""
    ids = ["a", "b", "c", "d"]
    cap = "eval:embed@1"
    roster = Roster(Member(i, i, capabilities=frozenset({"serve", cap} if i == "c" else {"serve"})) for i in ids)
    node = GossipNode("a", rng=random.Random(0), config=QUIET, roster=roster)
    key, other = [k(i) for i in range(1000) if rendezvous_home(k(i), ids) == "d"][:2]  # homed on d among all
    low, high = b"\x01" * 32, b"\x02" * 32
    node.index.merge([HeldContent("c", key, high, 1), HeldContent("d", key, low, 1)])
    assert node.home(key, cap) == "c"
    assert node.preferred_digest(key, cap) == high  # c's: the only member advertising the evaluator
    node.index.merge([HeldContent("c", other, low, 2), HeldContent("d", other, high, 2)])
    assert node.preferred_digest(other) == low  # no evaluator named, no home: the smallest, not d's


def test_index_must_belong_to_the_node():
    with pytest.raises(FabricError):
        GossipNode("a", index=HoldingIndex("b"))
    with pytest.raises(FabricError):
        GossipConfig(fanout=0)


def test_same_seed_same_outputs():
    def run(seed):
        ids = [f"n{i}" for i in range(6)]
        roster = Roster(Member(i, i) for i in ids)
        node = GossipNode("n0", rng=random.Random(seed), config=QUIET, roster=roster)
        node.add_local(k(1), dg(k(1)))
        out = []
        for t in range(20):
            out.extend((d, type(m).__name__) for d, m in node.tick(t * 0.25))
        return out

    assert run(5) == run(5)
    assert run(5) != run(6)


# -- stateful model: a small cluster under random deliver/drop/partition/crash ------------------
IDS = ["a", "b", "c", "d"]


class GossipCluster(RuleBasedStateMachine):
    """Four nodes, a message pool we deliver or drop in any order, partitions, crashes."""

    @initialize()
    def boot(self):
        self.cfg = GossipConfig(
            fanout=2,
            max_facts_per_message=3,
            membership=MembershipConfig(member_sync_interval=6.0, reconnect_interval=1.0),
        )
        self.roster = Roster(Member(i, i) for i in IDS)
        self.nodes = {i: self._make(i, 0) for i in IDS}
        self.ledgers = {i: [] for i in IDS}
        self.incs = {i: 0 for i in IDS}
        self.pool = []
        self.now = 0.0
        self.groups = None
        self.created: set[HeldContent] = set()
        self.last_size = {i: 0 for i in IDS}

    def _make(self, i, inc):
        return GossipNode(i, rng=random.Random(f"{i}/{inc}"), config=self.cfg, incarnation=inc, roster=self.roster, now=getattr(self, "now", 0.0))

    def _up(self):
        return [i for i in IDS if self.nodes[i] is not None]

    def _emit(self, src, out):
        for dst, msg in out:
            self.pool.append((src, dst, encode_message(msg)))

    def _deliver(self, item):
        src, dst, payload = item
        node = self.nodes.get(dst)
        if node is None or (self.groups is not None and self.groups[src] != self.groups[dst]):
            return
        self._emit(dst, node.receive(src, decode_message(payload), self.now))

    @rule(node=st.sampled_from(IDS), n=st.integers(0, 12), bad=st.booleans())
    def record(self, node, n, bad):
        nd = self.nodes[node]
        if nd is None:
            return
        key = k(n)
        digest = dg(key) if not bad else hashlib.blake2b(bytes(key) + node.encode(), digest_size=32).digest()
        try:
            fact = nd.add_local(key, digest)
        except FabricError:
            return  # already holds the key with the other digest
        if fact not in self.created:
            self.created.add(fact)
            self.ledgers[node].append((fact.key, fact.digest))

    @rule(dt=st.sampled_from([0.1, 0.3, 0.7, 1.3]))
    def tick(self, dt):
        self.now += dt
        for i in self._up():
            self._emit(i, self.nodes[i].tick(self.now))
            assert self.nodes[i].next_deadline() > self.now, "tick left work due (a driver would spin)"

    @precondition(lambda self: self.pool)
    @rule(i=st.integers(0, 10_000))
    def deliver(self, i):
        self._deliver(self.pool.pop(i % len(self.pool)))

    @precondition(lambda self: self.pool)
    @rule(i=st.integers(0, 10_000))
    def drop(self, i):
        self.pool.pop(i % len(self.pool))

    @rule(split=st.integers(1, 3))
    def partition(self, split):
        self.groups = {n: (0 if idx < split else 1) for idx, n in enumerate(IDS)}

    @rule()
    def heal(self):
        self.groups = None

    @precondition(lambda self: len(self._up()) > 2)
    @rule(node=st.sampled_from(IDS))
    def crash(self, node):
        if self.nodes[node] is not None:
            self.incs[node] = self.nodes[node].membership.incarnation
            self.nodes[node] = None
            self.last_size[node] = 0

    @rule(node=st.sampled_from(IDS))
    def restart(self, node):
        if self.nodes[node] is None:
            self.incs[node] += 1
            nd = self._make(node, self.incs[node])
            for seq, (key, digest) in enumerate(self.ledgers[node], 1):
                nd.add_local(key, digest, seq=seq, announce=False)
            self.nodes[node] = nd

    @rule()
    def settle(self):
        """Heal, deliver everything promptly for a while: the up nodes must converge."""
        self.groups = None
        for _ in range(600):
            self.now += 0.25
            for i in self._up():
                self._emit(i, self.nodes[i].tick(self.now))
            while self.pool:
                self._deliver(self.pool.pop(0))
            up = self._up()
            digests = {self.nodes[i].index.summary_digest() for i in up}
            live = [{m.node_id for m in self.nodes[i].membership.live_members()} for i in up]
            if len(digests) == 1 and all(v == set(up) for v in live):
                break
        up = self._up()
        assert len({self.nodes[i].index.summary_digest() for i in up}) == 1, "facts did not converge"
        for i in up:
            assert {m.node_id for m in self.nodes[i].membership.live_members()} == set(up), i
        conflicts = {frozenset(self.nodes[i].index.digest_conflicts()) for i in up}
        assert len(conflicts) == 1  # everyone sees the same determinism violations

    @invariant()
    def facts_are_real_and_never_lost(self):
        if not hasattr(self, "nodes"):
            return
        for i in self._up():
            nd = self.nodes[i]
            facts = set(nd.index.facts())
            assert facts <= self.created, "a node invented a fact"
            own = {HeldContent(i, key, digest, s) for s, (key, digest) in enumerate(self.ledgers[i], 1)}
            assert own <= facts, "a node lost its own facts"
            assert len(nd.index) >= self.last_size[i], "the index shrank"
            self.last_size[i] = len(nd.index)
            for f in list(facts)[:20]:
                assert (f.node_id, f.digest) in nd.index.holders(f.key)
            assert nd.membership.is_live(i)
            assert nd.membership.incarnation >= self.incs[i]


TestGossipCluster = GossipCluster.TestCase
TestGossipCluster.settings = settings(max_examples=40, stateful_step_count=40, deadline=None)
