"""GossipNode: HoldingIndex + Membership as one sans-I/O machine, and rendezvous hashing.

Normative text: ``specs/gossip.md`` ("Anti-entropy", "Eager push", "Rendezvous").

A :class:`GossipNode` is driven exactly like :class:`~gossip.membership.Membership`:
``tick(now)`` and ``receive(src_addr, message, now)`` return ``[(addr, message)]``
to send; it reads no clock, does no I/O, and takes its randomness from an
injected ``random.Random``, so the simulator, the trio runner and hypothesis
drive the same object.

Per ``interval`` the node runs one anti-entropy exchange with a random live
peer (``SyncRequest`` carrying the 16-byte summary digest; only on a mismatch
``Summary`` both ways and then ``Facts`` with only what each side lacks).  New
local facts, and facts first learned from a push, are pushed to ``fanout``
random live peers at the next tick (epidemic dissemination; each node relays a
fact at most once).  Membership updates ride on every message.
"""

from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import dataclass, field
from typing import Iterable

from cassette.errors import FabricError, StatusCode
from cassette.keys import ContentKey
from gossip.holding import KEY_SIZE, RECORD_SIZE, FactRun, HeldContent, HoldingIndex, facts_to_runs
from gossip.membership import Membership, MembershipConfig, Outgoing, Roster
from gossip.messages import Ack, Facts, Members, Message, Ping, PingReq, Summary, SyncRequest

__all__ = ["GossipConfig", "GossipStats", "GossipNode", "rendezvous_home", "rendezvous_order", "rendezvous_weight"]

log = logging.getLogger("evalfabric.gossip")

_MEMBERSHIP_TYPES = frozenset((Ping, PingReq, Ack, Members))


@dataclass(frozen=True)
class GossipConfig:
    """Gossip tuning.  ``interval``: anti-entropy period; ``fanout``: peers per push;
    ``max_facts_per_message`` / ``max_facts_per_exchange``: bounds on one Facts
    message and on one anti-entropy answer (the rest follows next round)."""

    interval: float = 1.0
    fanout: int = 3
    max_facts_per_message: int = 4096
    max_facts_per_exchange: int = 65536
    membership: MembershipConfig = field(default_factory=MembershipConfig)

    def __post_init__(self) -> None:
        if self.interval <= 0 or self.fanout < 1 or self.max_facts_per_message < 1 or self.max_facts_per_exchange < 1:
            raise FabricError(StatusCode.INVALID_ARGUMENT, "gossip config: interval > 0, fanout >= 1, fact limits >= 1")


@dataclass
class GossipStats:
    """Counters a node keeps (the fabric exports them as ``fabric_gossip_*`` metrics)."""

    rounds: int = 0
    syncs_started: int = 0
    syncs_in_sync: int = 0
    summaries_sent: int = 0
    facts_sent: int = 0
    facts_received: int = 0
    facts_new: int = 0
    pushes_sent: int = 0
    conflicts: int = 0
    #: facts received in this node's own name that its ledger does not have (dropped)
    foreign_own_facts: int = 0


def rendezvous_weight(key: bytes, node_id: str) -> int:
    """HRW weight of ``node_id`` for ``key``: 64-bit big-endian
    ``blake2b(bytes(key) || node_id_utf8, digest_size=8, person=b"ef-rendezvous")``."""
    return int.from_bytes(
        hashlib.blake2b(bytes(key) + node_id.encode("utf-8"), digest_size=8, person=b"ef-rendezvous").digest(), "big"
    )


def _ids(candidates: Iterable) -> list[str]:
    return [c if isinstance(c, str) else c.node_id for c in candidates]


def rendezvous_order(key: bytes, candidates: Iterable) -> list[str]:
    """Candidates (node ids, or objects with ``node_id``) by descending weight for ``key``.

    Equal weights (2**-64 odds) order by node id UTF-8 bytes, ascending.  The
    first is the key's home; the rest are its fallbacks in order.
    """
    ids = set(_ids(candidates))
    return sorted(ids, key=lambda n: (-rendezvous_weight(key, n), n.encode("utf-8")))


def rendezvous_home(key: bytes, candidates: Iterable) -> str | None:
    """The key's home among ``candidates`` (highest random weight), or None if there are none.

    Deterministic: every node that sees the same candidate set picks the same
    home, and removing a non-home candidate never moves the home.
    """
    best, best_w = None, -1
    for n in _ids(candidates):
        w = rendezvous_weight(key, n)
        if w > best_w or (w == best_w and n.encode("utf-8") < best.encode("utf-8")):
            best, best_w = n, w
    return best


def _chunks(runs: list[FactRun], limit: int) -> list[tuple[FactRun, ...]]:
    """Split runs into groups of at most ``limit`` facts (splitting runs as needed)."""
    out: list[tuple[FactRun, ...]] = []
    cur: list[FactRun] = []
    room = limit
    for r in runs:
        origin, start, recs = r
        while recs:
            take = min(room, len(recs) // RECORD_SIZE)
            cur.append(FactRun(origin, start, recs[: take * RECORD_SIZE]))
            recs = recs[take * RECORD_SIZE :]
            start += take
            room -= take
            if room == 0:
                out.append(tuple(cur))
                cur, room = [], limit
    if cur:
        out.append(tuple(cur))
    return out


class GossipNode:
    """One node's gossip machine: holding index, membership, anti-entropy and push.

    ``GossipNode(node_id, *, addr=None, capabilities=(), rng=None, config=None,
    incarnation=0, roster=None, index=None, now=0.0)``.  ``index`` lets a caller
    start from an existing :class:`HoldingIndex` (its ``node_id`` must match).
    """

    def __init__(
        self,
        node_id: str,
        *,
        addr: str | None = None,
        capabilities: Iterable[str] = (),
        rng: random.Random | None = None,
        config: GossipConfig | None = None,
        incarnation: int = 0,
        roster: Roster | None = None,
        index: HoldingIndex | None = None,
        now: float = 0.0,
    ) -> None:
        self.config = cfg = config or GossipConfig()
        self.rng = rng if rng is not None else random.Random(node_id)
        if index is not None and index.node_id != node_id:
            raise FabricError(StatusCode.INVALID_ARGUMENT, f"gossip: index belongs to {index.node_id!r}, not {node_id!r}")
        #: The holding index (grow-only set of holder facts).
        self.index = index if index is not None else HoldingIndex(node_id)
        #: The SWIM membership machine.
        self.membership = Membership(
            node_id, addr, capabilities, incarnation=incarnation, config=cfg.membership, rng=self.rng, roster=roster, now=now
        )
        self.node_id = node_id
        #: Counters (see :class:`GossipStats`).
        self.stats = GossipStats()
        self._push: list[HeldContent] = []
        self._sent: dict[str, tuple[float, dict[str, int]]] = {}
        self._warned_own: set[str] = set()  # senders already logged for facts in our name
        self._next_round = now + self.rng.random() * cfg.interval

    # -- local facts -------------------------------------------------------------
    def add_local(self, key: ContentKey, digest: bytes, *, seq: int | None = None, announce: bool = True) -> HeldContent:
        """Record that this node holds ``key`` (see :meth:`HoldingIndex.add_local`).

        A new fact is pushed to ``fanout`` peers at the next :meth:`tick` unless
        ``announce`` is False (ledger replay after a restart: peers already
        have those facts, anti-entropy covers any gap).
        """
        before = len(self.index)
        fact = self.index.add_local(key, digest, seq)
        if announce and len(self.index) > before:
            self._push.append(fact)
        self._note_conflicts()
        return fact

    # -- queries -----------------------------------------------------------------
    def holders(self, key: bytes) -> list[tuple[str, bytes]]:
        """Every ``(node_id, digest)`` ever claimed for ``key`` (dead nodes included)."""
        return self.index.holders(key)

    def live_holders(self, key: bytes) -> list[tuple[str, bytes]]:
        """``(node_id, digest)`` claims for ``key`` by members currently ALIVE or SUSPECT."""
        m = self.membership
        return [(n, d) for n, d in self.index.holders(key) if m.is_live(n)]

    def home(self, key: bytes, capability: str | None = None) -> str | None:
        """Rendezvous home of ``key`` among live members advertising ``capability`` (None: all live)."""
        return rendezvous_home(key, self.membership.live_members(capability))

    def preferred_digest(self, key: bytes, capability: str | None = None) -> bytes | None:
        """Digest to serve for ``key``: the majority of holders', a tie going to the digest of
        the key's home among live members advertising ``capability`` (its evaluator's
        ``eval:NAME@VERSION``; see the index).  ``capability`` None: the key names no
        evaluator (an artifact), so it has no home and a tie goes to the smallest digest.
        Every node whose view has the same holders and candidates picks the same digest."""
        home = None if capability is None else self.home(key, capability)
        return self.index.preferred_digest(key, home)

    def next_deadline(self) -> float:
        """Earliest time :meth:`tick` has work (``-inf`` while pushes are pending)."""
        if self._push:
            return float("-inf")
        return min(self._next_round, self.membership.next_deadline())

    # -- driving -----------------------------------------------------------------
    def tick(self, now: float) -> Outgoing:
        """Advance to ``now``: membership timers, a due anti-entropy round, pending pushes."""
        m = self.membership
        if now < self._next_round and now < m._wake and not self._push:
            return []
        out = m.tick(now)
        if now >= self._next_round:
            nxt = self._next_round + self.config.interval
            self._next_round = nxt if nxt > now else now + self.config.interval
            self.stats.rounds += 1
            if self._sent:
                self._sent = {a: v for a, v in self._sent.items() if v[0] > now}
            peers = m.random_live_peers(1)
            if peers:
                self.stats.syncs_started += 1
                out.append((peers[0][1], SyncRequest(self.node_id, self.index.summary_digest(), m.piggyback())))
        if self._push:
            out.extend(self.flush())
        return out

    def flush(self) -> Outgoing:
        """Push pending new facts to ``fanout`` random live peers now (also done by :meth:`tick`)."""
        facts, self._push = self._push, []
        if not facts:
            return []
        m = self.membership
        peers = m.random_live_peers(self.config.fanout)
        chunks = _chunks(facts_to_runs(facts), self.config.max_facts_per_message)
        out: Outgoing = []
        for _nid, addr in peers:
            for chunk in chunks:
                out.append((addr, Facts(self.node_id, chunk, True, m.piggyback())))
                self.stats.pushes_sent += 1
                self.stats.facts_sent += sum(len(r.records) for r in chunk) // RECORD_SIZE
        return out

    def receive(self, src_addr: str, msg: Message, now: float) -> Outgoing:
        """Handle one message from ``src_addr``; return the replies to send."""
        t = type(msg)
        m = self.membership
        if t in _MEMBERSHIP_TYPES:
            return m.receive(src_addr, msg, now)
        if msg.updates:
            m.apply_updates(msg.updates, now)
        if t is SyncRequest:
            if msg.digest == self.index.summary_digest():
                self.stats.syncs_in_sync += 1
                return []
            self.stats.summaries_sent += 1
            return [(src_addr, Summary.of(self.node_id, self.index.summary(), True, m.piggyback()))]
        if t is Summary:
            out: Outgoing = []
            if msg.reply:
                self.stats.summaries_sent += 1
                out.append((src_addr, Summary.of(self.node_id, self.index.summary(), False, m.piggyback())))
            runs = self._answer(src_addr, msg.as_dict(), now)
            for chunk in _chunks(runs, self.config.max_facts_per_message):
                out.append((src_addr, Facts(self.node_id, chunk, False, m.piggyback())))
                self.stats.facts_sent += sum(len(r.records) for r in chunk) // RECORD_SIZE
            return out
        if t is Facts:
            self.stats.facts_received += sum(len(r.records) for r in msg.runs) // RECORD_SIZE
            runs = msg.runs
            if any(r.origin == self.node_id for r in runs):
                runs = self._without_own(src_addr, runs)
            if msg.push:
                new = self.index.merge_runs(runs)
                self.stats.facts_new += len(new)
                self._push.extend(new)
            else:
                self.stats.facts_new += self.index.absorb_runs(runs)
            self._note_conflicts()
            return []
        raise FabricError(StatusCode.INVALID_ARGUMENT, f"gossip: cannot handle {t.__name__}")

    def join(self, seed_addrs: Iterable[str], now: float) -> Outgoing:
        """Join through seed addresses (full membership exchange with each)."""
        return self.membership.join(seed_addrs, now)

    def leave(self, now: float) -> Outgoing:
        """Announce a graceful leave; the node stops probing."""
        return self.membership.leave(now)

    # -- internals ---------------------------------------------------------------
    def _answer(self, addr: str, theirs: dict[str, int], now: float) -> list[FactRun]:
        """Runs to answer a peer's summary, minus what we sent that peer very recently.

        Two exchanges with one peer often overlap (each side starts its own
        round); remembering per peer, for ``2 * interval``, the high-water marks
        our answers brought it up to keeps a catch-up from being sent twice.  A
        lost answer is simply sent again once the memory expires.
        """
        sent_rec = self._sent.get(addr)
        sent: dict[str, int] = {}
        if sent_rec is not None and sent_rec[0] > now:
            sent = sent_rec[1]
            for o, h in sent.items():
                if h > theirs.get(o, 0):
                    theirs[o] = h
        runs = self.index.missing_runs(theirs, self.config.max_facts_per_exchange)
        if runs:
            for r in runs:
                if r.start == theirs.get(r.origin, 0) + 1:
                    sent[r.origin] = r.start + len(r.records) // RECORD_SIZE - 1
                    theirs[r.origin] = sent[r.origin]
            self._sent[addr] = (now + 2 * self.config.interval, sent)
        return runs

    def _without_own(self, src_addr: str, runs: tuple) -> list[FactRun]:
        """``runs`` minus those in this node's own name.

        This node is the only author of its facts, and they come from its ledger
        alone (``add_local``); a peer can only echo them back.  A fact in its
        name that it does not hold (another node running with the same id, or a
        peer that lies) would claim a key it lacks and shift the seq of its next
        record, so it is dropped, counted in ``stats.foreign_own_facts`` and
        logged once per sender.
        """
        me = self.node_id
        index = self.index
        foreign = 0
        for origin, start, records in runs:
            if origin == me:
                for j in range(0, len(records), RECORD_SIZE):
                    fact = HeldContent(me, records[j : j + KEY_SIZE], records[j + KEY_SIZE : j + RECORD_SIZE], start + j // RECORD_SIZE)
                    if fact not in index:
                        foreign += 1
        if foreign:
            self.stats.foreign_own_facts += foreign
            if src_addr not in self._warned_own and len(self._warned_own) < 256:
                self._warned_own.add(src_addr)
                log.warning("gossip %s: dropped %d fact(s) in this node's name from %r that its ledger does not have "
                            "(another node running with the same id, or a peer that lies)", me, foreign, src_addr)
        return [r for r in runs if r.origin != me]

    def _note_conflicts(self) -> None:
        for key in self.index.take_new_conflicts():
            self.stats.conflicts += 1
            claims = ", ".join(f"{n}={d.hex()[:12]}" for n, d in self.index.holders(key))
            log.warning("gossip: determinism violation on %s: holders disagree on the digest (%s)", key.short(), claims)
