"""A deterministic in-memory simulator for a fleet of :class:`~gossip.node.GossipNode`.

One ``seed`` fixes everything: each node's ``random.Random``, message loss and
delay.  The same seed and the same calls give the same run, message for
message, and :meth:`Simulator.trace_hash` proves it.

Time is virtual: a *round* is one gossip interval (``config.interval``, 1.0 by
default) split into ``steps_per_round`` steps.  Each step first delivers the
messages due at that step (in send order), then ticks every running node in id
order.  A message sent at step ``s`` is lost with probability ``loss``, or else
arrives at step ``s + d`` with ``d`` drawn uniformly from ``delay`` (in steps).
Partitions drop messages between groups at delivery time; messages to a crashed
node are dropped.  A crashed node loses all memory; :meth:`Simulator.restart`
builds a fresh node with a higher incarnation and replays its *ledger* (the
facts it recorded through :meth:`Simulator.add_fact`), as the fabric replays its
cassette.

Cost: per step O(running nodes) cheap tick checks plus O(messages); per round
each node sends O(fanout) messages, so a round is O(N).

Measurement helpers for benchmarks: :func:`dissemination_rounds`,
:func:`anti_entropy_bytes`, :func:`catchup_bytes`.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import math
import random
from array import array
from dataclasses import dataclass, field
from typing import Callable, Iterable

from cassette.errors import FabricError, StatusCode
from cassette.keys import ContentKey
from gossip.holding import FactRun, HeldContent, HoldingIndex
from gossip.membership import Member, MembershipConfig, Roster
from gossip.messages import Ack, Facts, Members, Ping, PingReq, Summary, SyncRequest, decode_message, encode_message
from gossip.node import GossipConfig, GossipNode

__all__ = [
    "Simulator",
    "SimStats",
    "ANTI_ENTROPY_TYPES",
    "dissemination_rounds",
    "anti_entropy_bytes",
    "catchup_bytes",
    "synthetic_runs",
]

_TYPE_CODE = {Ping: 1, PingReq: 2, Ack: 3, Members: 4, SyncRequest: 5, Summary: 6, Facts: 7}
_TYPE_NAME = {Ping: "ping", PingReq: "ping-req", Ack: "ack", Members: "members", SyncRequest: "sync", Summary: "summary", Facts: "facts"}
#: Message type names that make up anti-entropy traffic (bytes helpers count these).
ANTI_ENTROPY_TYPES = frozenset(("sync", "summary", "facts"))
_NEVER = 1 << 62
_NEG_INF = float("-inf")


@dataclass
class SimStats:
    """Network counters.  ``bytes``/``bytes_by_type`` are counted only with ``wire=True``."""

    sent: int = 0
    delivered: int = 0
    dropped_loss: int = 0
    dropped_partition: int = 0
    dropped_down: int = 0
    bytes: int = 0
    bytes_by_type: dict = field(default_factory=dict)
    sent_by_type: dict = field(default_factory=dict)

    def anti_entropy_bytes(self) -> int:
        """Bytes of sync + summary + facts messages sent so far."""
        return sum(v for k, v in self.bytes_by_type.items() if k in ANTI_ENTROPY_TYPES)


class Simulator:
    """N gossip nodes on a virtual clock, with loss, delay, partitions, crashes and restarts.

    ``Simulator(n, *, seed=1, loss=0.0, delay=(1, 2), steps_per_round=20,
    config=None, capabilities=None, wire=False, node_ids=None)``.  Node ids are
    ``n0 .. n{N-1}`` unless ``node_ids`` is given; a node's address is its id.
    ``capabilities(i)`` gives node i's capabilities (default ``{"serve"}``).
    ``wire=True`` sends every message through :func:`encode_message` /
    :func:`decode_message` and counts bytes.
    """

    def __init__(
        self,
        n: int = 0,
        *,
        seed: int = 1,
        loss: float = 0.0,
        delay: tuple[int, int] = (1, 2),
        steps_per_round: int = 20,
        config: GossipConfig | None = None,
        capabilities: Callable[[int], Iterable[str]] | None = None,
        wire: bool = False,
        node_ids: Iterable[str] | None = None,
    ) -> None:
        ids = list(node_ids) if node_ids is not None else [f"n{i}" for i in range(n)]
        if len(set(ids)) != len(ids):
            raise FabricError(StatusCode.INVALID_ARGUMENT, "sim: node ids must be distinct")
        dmin, dmax = delay
        if not 1 <= dmin <= dmax:
            raise FabricError(StatusCode.INVALID_ARGUMENT, f"sim: delay must be 1 <= min <= max steps, got {delay}")
        if not 0.0 <= loss < 1.0:
            raise FabricError(StatusCode.INVALID_ARGUMENT, f"sim: loss must be in [0, 1), got {loss}")
        self.seed = seed
        self.loss = float(loss)
        self.delay = (dmin, dmax)
        self.steps_per_round = int(steps_per_round)
        self.config = config or GossipConfig()
        self.wire = wire
        #: Node ids in index order.
        self.ids: list[str] = ids
        self._idx = {nid: i for i, nid in enumerate(ids)}
        caps = capabilities or (lambda i: ("serve",))
        self._caps = [frozenset(caps(i)) for i in range(len(ids))]
        #: The shared starting view every node boots with.
        self.roster = Roster(Member(nid, nid, 0, capabilities=self._caps[i]) for i, nid in enumerate(ids))
        self._net = random.Random(f"evalfabric-sim/{seed}/net")
        self._ledgers: list[list[tuple[ContentKey, bytes]]] = [[] for _ in ids]
        self._incs = [0] * len(ids)
        self._groups: list[int] | None = None
        self._queue: dict[int, list] = {}
        self._trace = hashlib.blake2b(digest_size=16, person=b"ef-gossip-sim")
        self._tbuf = array("I")
        #: Network counters.
        self.stats = SimStats()
        self.step_no = 0
        with _gc_paused():
            self._nodes: list[GossipNode | None] = [self._make(i, 0) for i in range(len(ids))]
        self._wheel: dict[int, list[int]] = {}
        self._wake = [_NEVER] * len(ids)  # step each node is scheduled to tick at
        for i, node in enumerate(self._nodes):
            self._schedule(i, node, 0, None)

    # -- clock -------------------------------------------------------------------
    @property
    def now(self) -> float:
        """Current virtual time (rounds, times ``config.interval``)."""
        return self.step_no / self.steps_per_round * self.config.interval

    @property
    def rounds(self) -> float:
        """Rounds elapsed so far."""
        return self.step_no / self.steps_per_round

    # -- nodes -------------------------------------------------------------------
    def node(self, node_id: str) -> GossipNode:
        """The running node ``node_id`` (FAILED_PRECONDITION if it is crashed)."""
        n = self._nodes[self._index(node_id)]
        if n is None:
            raise FabricError(StatusCode.FAILED_PRECONDITION, f"sim: node {node_id} is crashed")
        return n

    def is_up(self, node_id: str) -> bool:
        """Whether ``node_id`` is running."""
        return self._nodes[self._index(node_id)] is not None

    def up_ids(self) -> list[str]:
        """Ids of running nodes, in index order."""
        return [self.ids[i] for i, n in enumerate(self._nodes) if n is not None]

    def add_fact(self, node_id: str, key: ContentKey, digest: bytes) -> HeldContent:
        """``node_id`` records ``key`` in its ledger and announces it (see ``GossipNode.add_local``)."""
        i = self._index(node_id)
        node = self.node(node_id)
        before = len(node.index)
        fact = node.add_local(key, digest)
        if len(node.index) > before:
            self._ledgers[i].append((fact.key, fact.digest))
        self._event(10, i, fact.seq)
        self._schedule(i, node, self.step_no, None)
        return fact

    def crash(self, node_id: str) -> None:
        """Stop ``node_id`` now, losing all its memory except its ledger and incarnation."""
        i = self._index(node_id)
        node = self._nodes[i]
        if node is None:
            return
        self._incs[i] = node.membership.incarnation
        self._nodes[i] = None
        self._event(11, i, 0)

    def restart(self, node_id: str) -> GossipNode:
        """Start a crashed ``node_id`` afresh: incarnation + 1, ledger replayed, shared roster."""
        i = self._index(node_id)
        if self._nodes[i] is not None:
            raise FabricError(StatusCode.FAILED_PRECONDITION, f"sim: node {node_id} is running")
        self._incs[i] += 1
        node = self._make(i, self._incs[i])
        for seq, (key, digest) in enumerate(self._ledgers[i], 1):
            node.add_local(key, digest, seq=seq, announce=False)
        self._nodes[i] = node
        self._wake[i] = _NEVER
        self._schedule(i, node, self.step_no, None)
        self._event(12, i, self._incs[i])
        return node

    def partition(self, groups: Iterable[Iterable[str]]) -> None:
        """Split the network: messages pass only within a group.  Unlisted nodes form one more group."""
        g = [0] * len(self.ids)
        for gi, members in enumerate(groups, 1):
            for nid in members:
                g[self._index(nid)] = gi
        self._groups = g
        self._event(13, len(set(g)), 0)

    def heal(self) -> None:
        """Remove any partition."""
        self._groups = None
        self._event(14, 0, 0)

    def preload(self, node_id: str, index: HoldingIndex) -> None:
        """Replace a running node's index (measurement setups; not in its ledger)."""
        node = self.node(node_id)
        if index.node_id != node_id:
            raise FabricError(StatusCode.INVALID_ARGUMENT, f"sim: index belongs to {index.node_id!r}")
        node.index = index
        self._schedule(self._idx[node_id], node, self.step_no, None)

    # -- running -----------------------------------------------------------------
    def step(self) -> None:
        """Deliver this step's messages, then tick every running node."""
        s = self.step_no
        now = s / self.steps_per_round * self.config.interval
        nodes = self._nodes
        ids = self.ids
        tbuf = self._tbuf
        due = self._wheel.pop(s, None)
        due = set(due) if due else set()
        batch = self._queue.pop(s, None)
        if batch:
            groups = self._groups
            st = self.stats
            for src, dst, msg in batch:
                node = nodes[dst]
                if node is None:
                    st.dropped_down += 1
                    continue
                if groups is not None and groups[src] != groups[dst]:
                    st.dropped_partition += 1
                    continue
                if self.wire:
                    msg = decode_message(msg)
                st.delivered += 1
                tbuf.append(src)
                tbuf.append(dst)
                tbuf.append(_TYPE_CODE[type(msg)])
                out = node.receive(ids[src], msg, now)
                if out:
                    self._send(dst, out, s)
                self._schedule(dst, node, s, due)
        # tick the nodes with work due (ticking the others would be a no-op)
        for i in sorted(due):
            node = nodes[i]
            if node is not None and self._wake[i] <= s:
                out = node.tick(now)
                if out:
                    self._send(i, out, s)
                self._wake[i] = _NEVER
                self._schedule(i, node, s + 1, None)
        if tbuf:
            tbuf.append(s)
            self._trace.update(tbuf.tobytes())
            del tbuf[:]
        self.step_no = s + 1
        if self.step_no % self.steps_per_round == 0:
            h = self._trace
            for n in nodes:
                h.update(n.index.summary_digest() if n is not None else b"-")

    def run(self, rounds: float) -> None:
        """Advance ``rounds`` rounds."""
        with _gc_paused():
            for _ in range(round(rounds * self.steps_per_round)):
                self.step()

    def run_until(self, predicate: Callable[["Simulator"], bool], max_rounds: float) -> float | None:
        """Step until ``predicate(self)`` holds (checked after every step); return rounds taken, or None."""
        start = self.step_no
        limit = start + round(max_rounds * self.steps_per_round)
        with _gc_paused():
            while self.step_no < limit:
                self.step()
                if predicate(self):
                    return (self.step_no - start) / self.steps_per_round
        return None

    # -- observations ------------------------------------------------------------
    def trace_hash(self) -> str:
        """Hex digest of everything so far: deliveries, faults, per-round index digests."""
        h = self._trace.copy()
        h.update(self._tbuf.tobytes() + self.step_no.to_bytes(8, "big"))
        return h.hexdigest()

    def converged(self) -> bool:
        """Whether every running node holds the same set of facts."""
        ds = {n.index.summary_digest() for n in self._nodes if n is not None}
        return len(ds) <= 1

    def holders_everywhere(self, key: bytes) -> bool:
        """Whether every running node knows at least one holder of ``key``."""
        return all(n.index.knows(key) for n in self._nodes if n is not None)

    def membership_agrees(self) -> bool:
        """Whether every running node sees exactly the running nodes as live."""
        up = set(self.up_ids())
        for n in self._nodes:
            if n is not None and {m.node_id for m in n.membership.live_members()} != up:
                return False
        return True

    # -- internals ---------------------------------------------------------------
    def _index(self, node_id: str) -> int:
        try:
            return self._idx[node_id]
        except KeyError:
            raise FabricError(StatusCode.NOT_FOUND, f"sim: no node {node_id!r}") from None

    def _make(self, i: int, inc: int) -> GossipNode:
        nid = self.ids[i]
        return GossipNode(
            nid,
            addr=nid,
            capabilities=self._caps[i],
            rng=random.Random(f"evalfabric-sim/{self.seed}/{nid}/{inc}"),
            config=self.config,
            incarnation=inc,
            roster=self.roster,
            now=self.now,
        )

    def _schedule(self, i: int, node: GossipNode, earliest: int, due: set | None) -> None:
        """Make sure node ``i`` is ticked at the first step >= ``earliest`` its deadline allows."""
        d = node.next_deadline()
        if d == _NEG_INF:
            at = earliest
        else:
            at = max(earliest, math.ceil(d * self.steps_per_round / self.config.interval))
        if at >= self._wake[i]:
            return
        self._wake[i] = at
        if due is not None and at <= self.step_no:
            due.add(i)
            return
        bucket = self._wheel.get(at)
        if bucket is None:
            self._wheel[at] = [i]
        else:
            bucket.append(i)

    def _event(self, code: int, a: int, b: int) -> None:
        self._tbuf.extend((0xFFFFFFFF, code, a, b & 0xFFFFFFFF))

    def _send(self, src: int, out: list, s: int) -> None:
        st = self.stats
        idx = self._idx
        rng = self._net
        loss = self.loss
        dmin, dmax = self.delay
        span = dmax - dmin + 1
        q = self._queue
        wire = self.wire
        for addr, msg in out:
            dst = idx.get(addr)
            st.sent += 1
            name = _TYPE_NAME[type(msg)]
            st.sent_by_type[name] = st.sent_by_type.get(name, 0) + 1
            if wire:
                payload = encode_message(msg)
                st.bytes += len(payload)
                st.bytes_by_type[name] = st.bytes_by_type.get(name, 0) + len(payload)
                msg = payload
            if dst is None:
                st.dropped_down += 1
                continue
            if loss and rng.random() < loss:
                st.dropped_loss += 1
                continue
            at = s + (dmin if dmin == dmax else dmin + int(rng.random() * span))
            bucket = q.get(at)
            if bucket is None:
                q[at] = [(src, dst, msg)]
            else:
                bucket.append((src, dst, msg))


@contextlib.contextmanager
def _gc_paused():
    """Pause the cyclic garbage collector while simulating (restored afterwards).

    A large fleet keeps millions of live objects, and CPython's full
    collections over them cost ~40 % of the run time; the simulator creates no
    reference cycles, so nothing is lost by collecting after the run.
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


# -- measurement helpers ---------------------------------------------------------------
def synthetic_runs(origin: str, count: int, *, start: int = 1, salt: bytes = b"") -> list[FactRun]:
    """``count`` deterministic facts of ``origin`` (seqs from ``start``) as one packed run."""
    recs = bytearray()
    ob = origin.encode("utf-8") + b"/" + salt
    for s in range(start, start + count):
        d = hashlib.blake2b(ob + s.to_bytes(8, "big"), digest_size=64).digest()
        recs += b"\x01" + d[:32] + d[32:]
    return [FactRun(origin, start, bytes(recs))] if count else []


def dissemination_rounds(n: int, fanout: int = 3, loss: float = 0.05, seed: int = 1, *, max_rounds: float | None = None) -> int:
    """Rounds until a new fact added at one node is known by all ``n`` nodes.

    A fleet of ``n`` nodes with the given push ``fanout`` and message ``loss``;
    the fact is added at round 0 at node ``n0``; returns the rounds elapsed
    (rounded up).  Membership full-state repair is off (it does not carry
    facts).  FAILED_PRECONDITION if it has not spread after ``max_rounds``
    (default ``4 * log2(n) + 10``).
    """
    cfg = GossipConfig(fanout=fanout, membership=MembershipConfig(member_sync_interval=None))
    sim = Simulator(n, seed=seed, loss=loss, config=cfg)
    key = ContentKey.of("request", b"dissemination/%d" % seed)
    sim.add_fact(sim.ids[0], key, hashlib.blake2b(bytes(key), digest_size=32).digest())
    waiting = [sim.node(i) for i in sim.ids]

    def done(_: Simulator) -> bool:
        nonlocal waiting
        waiting = [nd for nd in waiting if not nd.index.knows(key)]
        return not waiting

    limit = max_rounds if max_rounds is not None else 4 * math.log2(max(n, 2)) + 10
    r = sim.run_until(done, limit)
    if r is None:
        raise FabricError(StatusCode.FAILED_PRECONDITION, f"sim: fact did not reach all {n} nodes in {limit} rounds")
    return math.ceil(r)


def anti_entropy_bytes(total_keys: int, *, nodes: int = 2, origins: int = 4, rounds: int = 5, seed: int = 1) -> float:
    """In-sync anti-entropy bytes per round per node when the fleet knows ``total_keys`` facts.

    Every node starts with the same ``total_keys`` facts (spread over ``origins``
    origins); the fleet runs ``rounds`` rounds with the real wire encoding and
    the sync/summary/facts bytes are averaged per round per node.
    """
    base = HoldingIndex(None)
    per = [total_keys // origins + (1 if i < total_keys % origins else 0) for i in range(origins)]
    for i, c in enumerate(per):
        base.merge_runs(synthetic_runs(f"origin-{i}", c))
    cfg = GossipConfig(membership=MembershipConfig(member_sync_interval=None))
    sim = Simulator(nodes, seed=seed, config=cfg, wire=True)
    for nid in sim.ids:
        idx = base.copy()
        idx.node_id = nid
        sim.preload(nid, idx)
    before = sim.stats.anti_entropy_bytes()
    sim.run(rounds)
    if not sim.converged():
        raise FabricError(StatusCode.INTERNAL, "sim: identical indexes diverged")
    return (sim.stats.anti_entropy_bytes() - before) / (rounds * nodes)


def catchup_bytes(missing: int, *, base_keys: int = 1000, seed: int = 1, max_rounds: float = 100) -> int:
    """Anti-entropy bytes for one node to catch up ``missing`` facts it lacks.

    Two nodes share ``base_keys`` facts; one also has ``missing`` more (of an
    origin that is not a fleet member, so only anti-entropy carries them).
    Returns the sync/summary/facts bytes sent until both hold the same set.
    """
    cfg = GossipConfig(membership=MembershipConfig(member_sync_interval=None))
    sim = Simulator(2, seed=seed, config=cfg, wire=True)
    a = HoldingIndex("n0")
    a.merge_runs(synthetic_runs("origin-0", base_keys))
    b = a.copy()
    b.node_id = "n1"
    a.merge_runs(synthetic_runs("origin-0", missing, start=base_keys + 1))
    sim.preload("n0", a)
    sim.preload("n1", b)
    if sim.run_until(lambda s: s.converged(), max_rounds) is None:
        raise FabricError(StatusCode.INTERNAL, f"sim: catch-up of {missing} facts did not converge in {max_rounds} rounds")
    return sim.stats.anti_entropy_bytes()
