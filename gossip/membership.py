"""SWIM-style membership as a sans-I/O state machine.

Normative text: ``specs/gossip.md`` ("Membership").

:class:`Membership` never reads a clock and never does I/O.  The owner feeds it
time and messages and sends what it returns:

* ``tick(now) -> [(addr, message), ...]``: probe timers, suspicion timers,
  periodic full-state repair and reconnect attempts;
* ``receive(src_addr, message, now) -> [(addr, message), ...]`` for
  :class:`~gossip.messages.Ping`, :class:`~gossip.messages.PingReq`,
  :class:`~gossip.messages.Ack` and :class:`~gossip.messages.Members`;
* ``apply_updates(updates, now)`` for updates piggy-backed on any message and
  ``piggyback()`` for the updates to attach to any outgoing message.

Failure detection, one probe per ``probe_interval``: ping a random live member;
no ack after ``ping_timeout`` -> ask ``indirect_k`` other members to ping it
(:class:`~gossip.messages.PingReq`); no ack by the end of the period -> the
member is SUSPECT at its incarnation.  A suspect that hears of its suspicion
refutes by bumping its incarnation and gossiping ALIVE; a suspicion not refuted
within ``suspicion_timeout(n)`` makes the member DEAD.  ALIVE at a higher
incarnation overrides anything, so a restarted node (which starts with a higher
incarnation, or bumps past any rumour about itself) rejoins.  Dead members are
pinged now and then (``reconnect_interval``) with our verdict attached, so
healed partitions find each other again.

Randomness comes only from the injected ``random.Random``.
"""

from __future__ import annotations

import heapq
import logging
import math
import random
from dataclasses import dataclass
from typing import Iterable, Iterator

from cassette.errors import FabricError, StatusCode
from gossip.holding import check_node_id
from gossip.messages import (
    MAX_ADDR_BYTES,
    MAX_CAPABILITIES,
    MAX_CAPABILITY_BYTES,
    MAX_INCARNATION,
    MAX_MEMBERS,
    Ack,
    Members,
    MemberState,
    MemberUpdate,
    Message,
    Ping,
    PingReq,
)

__all__ = ["Member", "MemberState", "MembershipConfig", "Roster", "Membership", "Outgoing"]

log = logging.getLogger("evalfabric.gossip")

#: What the machines return: ``(destination address, message)`` pairs.
Outgoing = list[tuple[str, Message]]

_ALIVE = MemberState.ALIVE
_SUSPECT = MemberState.SUSPECT
_DEAD = MemberState.DEAD
_LEFT = MemberState.LEFT
_EMPTY: tuple = ()


@dataclass(frozen=True, slots=True)
class Member:
    """A member as this node sees it: id, address, incarnation, state and capabilities."""

    node_id: str
    addr: str
    incarnation: int = 0
    state: MemberState = MemberState.ALIVE
    capabilities: frozenset = frozenset()

    @property
    def live(self) -> bool:
        """True for ALIVE and SUSPECT (a suspect may still refute)."""
        return self.state <= _SUSPECT


class _Rec:
    """Mutable member record (same attribute names as :class:`Member`)."""

    __slots__ = ("node_id", "addr", "incarnation", "state", "capabilities")

    def __init__(self, node_id: str, addr: str, incarnation: int, state: MemberState, capabilities: frozenset) -> None:
        self.node_id = node_id
        self.addr = addr
        self.incarnation = incarnation
        self.state = state
        self.capabilities = capabilities


class Roster:
    """An immutable starting view (all members ALIVE) that many machines may share.

    Passing one Roster to many :class:`Membership` objects (the simulator does)
    is equivalent to each copying it, but costs memory only for the members
    whose state a machine has changed.
    """

    __slots__ = ("_by_id", "ids")

    def __init__(self, members: Iterable[Member]) -> None:
        self._by_id: dict[str, Member] = {}
        for m in members:
            if not isinstance(m, Member):
                raise FabricError(StatusCode.INVALID_ARGUMENT, f"roster: expected Member, got {type(m).__name__}")
            check_node_id(m.node_id, "roster.node_id")
            self._by_id[m.node_id] = m
        #: Member ids in input order.
        self.ids: list[str] = list(self._by_id)

    def __len__(self) -> int:
        """Number of members."""
        return len(self.ids)

    def get(self, node_id: str) -> Member | None:
        """The member named ``node_id``, or None."""
        return self._by_id.get(node_id)


@dataclass(frozen=True)
class MembershipConfig:
    """Timing and fan-out of the failure detector (times in the owner's clock units).

    ``suspicion_timeout(n) = suspicion_mult * max(1, log10(n)) * probe_interval``;
    each update is piggy-backed ``retransmit_mult * ceil(log10(n + 1))`` times;
    ``member_sync_interval`` / ``reconnect_interval`` of None turn those off.
    ``max_local_health`` caps the Lifeguard local-health score that stretches
    this node's own probe period and ping timeout when it is the slow one
    (0 disables it).
    """

    probe_interval: float = 1.0
    ping_timeout: float = 0.4
    indirect_k: int = 3
    suspicion_mult: float = 4.0
    retransmit_mult: int = 3
    max_piggyback: int = 8
    member_sync_interval: float | None = 30.0
    reconnect_interval: float | None = 5.0
    max_local_health: int = 8

    def __post_init__(self) -> None:
        if not 0 < self.ping_timeout < self.probe_interval:
            raise FabricError(StatusCode.INVALID_ARGUMENT, "membership: need 0 < ping_timeout < probe_interval")
        if self.indirect_k < 0 or self.max_piggyback < 1 or self.retransmit_mult < 1 or self.suspicion_mult <= 0 or self.max_local_health < 0:
            raise FabricError(StatusCode.INVALID_ARGUMENT, "membership: indirect_k >= 0, max_piggyback >= 1, retransmit_mult >= 1, suspicion_mult > 0")

    def suspicion_timeout(self, n: int) -> float:
        """How long a suspicion stands before the member is declared DEAD, for n members."""
        return self.suspicion_mult * max(1.0, math.log10(max(n, 1))) * self.probe_interval

    def retransmit_limit(self, n: int) -> int:
        """How many outgoing messages carry each update, for n members."""
        return self.retransmit_mult * max(1, math.ceil(math.log10(n + 1)))


def _check_addr(addr: object) -> str:
    if type(addr) is not str or not addr or len(addr.encode("utf-8")) > MAX_ADDR_BYTES:
        raise FabricError(StatusCode.INVALID_ARGUMENT, f"membership: addr must be a str of 1..{MAX_ADDR_BYTES} UTF-8 bytes, got {addr!r:.80}")
    return addr


def _check_capabilities(capabilities: Iterable[str]) -> frozenset:
    if isinstance(capabilities, str):
        raise FabricError(StatusCode.INVALID_ARGUMENT, "membership: capabilities must be a collection of str, not one str")
    caps = frozenset(capabilities)
    if len(caps) > MAX_CAPABILITIES:
        raise FabricError(StatusCode.INVALID_ARGUMENT, f"membership: at most {MAX_CAPABILITIES} capabilities, got {len(caps)}")
    for c in caps:
        if type(c) is not str or not c or len(c.encode("utf-8")) > MAX_CAPABILITY_BYTES:
            raise FabricError(StatusCode.INVALID_ARGUMENT, f"membership: capability {c!r:.60} must be a str of 1..{MAX_CAPABILITY_BYTES} UTF-8 bytes")
    return caps


def _next_period(due: float, period: float, now: float) -> float:
    """The next due time of a periodic timer that fired at ``now`` (always > now)."""
    nxt = due + period
    return nxt if nxt > now else now + period


class _Probe:
    __slots__ = ("target", "addr", "seq", "indirect_at", "fail_at", "indirect")

    def __init__(self, target: str, addr: str, seq: int, indirect_at: float, fail_at: float) -> None:
        self.target = target
        self.addr = addr
        self.seq = seq
        self.indirect_at = indirect_at  # no ack by then: ask others to probe
        self.fail_at = fail_at  # no ack by then: suspect the target
        self.indirect = False


class Membership:
    """One node's SWIM membership machine.

    ``Membership(node_id, addr=None, capabilities=(), *, incarnation=0, config=None,
    rng=None, roster=None, now=0.0)``.  ``addr`` defaults to ``node_id`` (the
    simulator's addressing); ``roster`` is an optional shared starting view.
    A restarting node passes an ``incarnation`` above any it used before (it also
    bumps past any rumour about itself it hears).
    """

    def __init__(
        self,
        node_id: str,
        addr: str | None = None,
        capabilities: Iterable[str] = (),
        *,
        incarnation: int = 0,
        config: MembershipConfig | None = None,
        rng: random.Random | None = None,
        roster: Roster | None = None,
        now: float = 0.0,
    ) -> None:
        check_node_id(node_id)
        addr = _check_addr(addr or node_id)
        capabilities = _check_capabilities(capabilities)
        self.node_id = node_id
        self.config = cfg = config or MembershipConfig()
        self._rng = rng if rng is not None else random.Random(node_id)
        self._roster = roster if roster is not None else Roster(())
        self._local: dict[str, _Rec] = {}
        self._extra_ids: list[str] = []  # ids in _local that the roster lacks
        if type(incarnation) is not int or not 0 <= incarnation <= MAX_INCARNATION:
            raise FabricError(StatusCode.INVALID_ARGUMENT, f"membership: incarnation must be an int in 0..{MAX_INCARNATION}, got {incarnation!r}")
        self._me = _Rec(node_id, addr, incarnation, _ALIVE, capabilities)
        self._put(self._me)
        self._queue: dict[str, list] = {}  # node_id -> [update, transmits left]
        self._timers: list[tuple[float, str, int]] = []  # suspicion deadlines
        self._probe: _Probe | None = None
        self._seq = 0
        self._relays: dict[int, tuple[str, int, float]] = {}  # our seq -> (requester addr, its seq, expiry)
        self._dead: dict[str, None] = {}  # DEAD (not LEFT) members, for reconnects
        self._seeds: tuple[str, ...] = ()  # join addresses, asked again while no member is live
        self._leaving = False
        self._health = 0  # Lifeguard local health: 0 = healthy
        self._twins: set[str] = set()  # addresses already logged for claiming our id
        self._ticked = False
        r = self._rng.random
        self._next_probe = now + r() * cfg.probe_interval
        self._next_sync = None if cfg.member_sync_interval is None else now + r() * cfg.member_sync_interval
        self._next_reconnect = None if cfg.reconnect_interval is None else now + r() * cfg.reconnect_interval
        self._wake = now
        self._enqueue(self._self_update())

    # -- views -------------------------------------------------------------------
    @property
    def incarnation(self) -> int:
        """This node's current incarnation."""
        return self._me.incarnation

    @property
    def addr(self) -> str:
        """This node's address."""
        return self._me.addr

    @property
    def capabilities(self) -> frozenset:
        """What this node advertises."""
        return self._me.capabilities

    @property
    def local_health(self) -> int:
        """Lifeguard local-health score: 0 when healthy; each point stretches this
        node's probe period and ping timeout by one more base length.  Raised by
        failed probes, by refuting rumours about itself and by stalls; lowered by
        each successful probe."""
        return self._health

    def __len__(self) -> int:
        """Number of members known (any state, self included)."""
        return len(self._roster) + len(self._extra_ids)

    def member(self, node_id: str) -> Member | None:
        """This node's view of ``node_id`` (None if unknown)."""
        r = self._get(node_id)
        if r is None:
            return None
        return r if type(r) is Member else Member(r.node_id, r.addr, r.incarnation, r.state, r.capabilities)

    def is_live(self, node_id: str) -> bool:
        """Whether ``node_id`` is known and ALIVE or SUSPECT."""
        r = self._get(node_id)
        return r is not None and r.state <= _SUSPECT

    def members(self) -> list[Member]:
        """Every known member with its state (self included), sorted by node id."""
        return sorted((self.member(i) for i in self._ids()), key=lambda m: m.node_id)

    def live_members(self, capability: str | None = None) -> list[Member]:
        """ALIVE and SUSPECT members (self included), optionally only those advertising ``capability``."""
        out = []
        for i in self._ids():
            r = self._get(i)
            if r.state <= _SUSPECT and (capability is None or capability in r.capabilities):
                out.append(self.member(i))
        out.sort(key=lambda m: m.node_id)
        return out

    def random_live_peers(self, k: int, exclude: Iterable[str] = ()) -> list[tuple[str, str]]:
        """Up to ``k`` distinct random live members other than self: ``[(node_id, addr)]``.

        Expected O(k) when most members are live (rejection sampling over the
        known ids), O(n) otherwise.
        """
        if k <= 0:
            return []
        ex = set(exclude)
        ex.add(self.node_id)
        out: list[tuple[str, str]] = []
        ids, extra = self._roster.ids, self._extra_ids
        nr = len(ids)
        total = nr + len(extra)
        if total == 0:
            return out
        rand = self._rng.random
        local = self._local
        for _ in range(4 * k + 8):
            i = int(rand() * total)
            nid = ids[i] if i < nr else extra[i - nr]
            if nid in ex:
                continue
            r = local.get(nid)
            if r is None:
                r = self._roster.get(nid)
            if r.state <= _SUSPECT:
                out.append((nid, r.addr))
                ex.add(nid)
                if len(out) == k:
                    return out
        rest = [i for i in self._ids() if i not in ex and self._get(i).state <= _SUSPECT]
        for nid in self._rng.sample(rest, min(k - len(out), len(rest))):
            out.append((nid, self._get(nid).addr))
        return out

    def addr_of(self, node_id: str) -> str | None:
        """Address of a known member, or None."""
        r = self._get(node_id)
        return None if r is None else r.addr

    def next_deadline(self) -> float:
        """Earliest time at which :meth:`tick` has work to do."""
        return self._wake

    # -- piggy-backing -------------------------------------------------------------
    def piggyback(self) -> tuple:
        """Updates to attach to one outgoing message (at most ``max_piggyback``).

        Freshest first (most retransmissions left); each call counts as one
        transmission of every update returned.
        """
        q = self._queue
        if not q:
            return _EMPTY
        maxp = self.config.max_piggyback
        entries = list(q.values())
        if len(entries) > maxp:
            entries.sort(key=lambda e: -e[1])
            entries = entries[:maxp]
        out = []
        for e in entries:
            out.append(e[0])
            e[1] -= 1
            if e[1] <= 0:
                del q[e[0].node_id]
        return tuple(out)

    def pending_updates(self) -> int:
        """Updates still waiting to be piggy-backed."""
        return len(self._queue)

    def full_state(self) -> tuple:
        """Every known member as a :class:`~gossip.messages.MemberUpdate` (for :class:`Members`)."""
        out = []
        for i in self._ids():
            r = self._get(i)
            out.append(MemberUpdate(r.node_id, r.incarnation, r.state, r.addr, r.capabilities))
        return tuple(out)

    def full_state_messages(self, *, reply: bool) -> list[Members]:
        """:meth:`full_state` as :class:`Members` messages of at most
        :data:`~gossip.messages.MAX_MEMBERS` entries each (more in one is refused by every
        receiver); only the first asks for a reply (``reply``) and carries piggy-backed updates."""
        state = self.full_state()
        parts = [state[i : i + MAX_MEMBERS] for i in range(0, len(state), MAX_MEMBERS)]
        return [Members(self.node_id, part, reply and i == 0, self.piggyback() if i == 0 else ())
                for i, part in enumerate(parts)]

    # -- inputs ------------------------------------------------------------------
    def apply_updates(self, updates: Iterable[MemberUpdate], now: float) -> int:
        """Apply piggy-backed updates (SWIM precedence rules); return how many changed state."""
        changed = 0
        for u in updates:
            if self._apply(u, now):
                changed += 1
        if changed:
            self._rewake()
        return changed

    def receive(self, src_addr: str, msg: Message, now: float) -> Outgoing:
        """Handle a membership message (its piggy-backed updates included); return replies."""
        if msg.updates:
            self.apply_updates(msg.updates, now)
        t = type(msg)
        out: Outgoing = []
        if t is Ping:
            if msg.target is None or msg.target == self.node_id:
                out.append((src_addr, Ack(self.node_id, msg.seq, self._updates_for(msg.sender))))
        elif t is Ack:
            p = self._probe
            if p is not None and msg.seq == p.seq:
                self._probe = None
                if self._health:
                    self._health -= 1
            else:
                relay = self._relays.pop(msg.seq, None)
                if relay is not None:
                    out.append((relay[0], Ack(self.node_id, relay[1], self.piggyback())))
        elif t is PingReq:
            if msg.target != self.node_id:
                self._seq += 1
                self._relays[self._seq] = (src_addr, msg.seq, now + self.config.probe_interval)
                out.append((msg.target_addr, Ping(self.node_id, self._seq, msg.target, self.piggyback())))
            else:  # asked to probe ourselves: we are evidently alive
                out.append((src_addr, Ack(self.node_id, msg.seq, self.piggyback())))
        elif t is Members:
            self.apply_updates(msg.members, now)
            if msg.reply:
                out += [(src_addr, m) for m in self.full_state_messages(reply=False)]
        else:
            raise FabricError(StatusCode.INVALID_ARGUMENT, f"membership: cannot handle {t.__name__}")
        self._rewake()
        return out

    def tick(self, now: float) -> Outgoing:
        """Advance timers to ``now``; return the messages to send."""
        if now < self._wake:
            return []
        cfg = self.config
        out: Outgoing = []
        late = now - self._wake  # how long after it asked to run this node runs
        if late > cfg.probe_interval and self._ticked:
            self._stalled(late)
        self._ticked = True
        scale = 1 + self._health
        p = self._probe
        if p is not None:
            if not p.indirect and now >= p.indirect_at:
                p.indirect = True
                for _nid, addr in self.random_live_peers(cfg.indirect_k, exclude=(p.target,)):
                    out.append((addr, PingReq(self.node_id, p.seq, p.target, p.addr, self.piggyback())))
            if now >= p.fail_at:
                self._probe = None
                self._health = min(cfg.max_local_health, self._health + 1)
                self._suspect(p.target, now)
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, nid, inc = heapq.heappop(timers)
            r = self._local.get(nid)
            if r is not None and r.state == _SUSPECT and r.incarnation == inc:
                self._set_state(r, _DEAD)
                self._enqueue(MemberUpdate(nid, inc, _DEAD, r.addr, r.capabilities))
        if self._relays:
            for seq in [s for s, v in self._relays.items() if v[2] <= now]:
                del self._relays[seq]
        if now >= self._next_probe:
            self._next_probe = _next_period(self._next_probe, cfg.probe_interval * scale, now)
            peers = [] if self._leaving or self._probe is not None else self.random_live_peers(1)
            if peers:
                nid, addr = peers[0]
                self._seq += 1
                self._probe = _Probe(nid, addr, self._seq, now + cfg.ping_timeout * scale, now + cfg.probe_interval * scale)
                out.append((addr, Ping(self.node_id, self._seq, nid, self.piggyback())))
            elif self._seeds and not self._leaving and self._probe is None:
                out += self._join_pushes()  # alone: a seed that was not up may be now
        if self._next_reconnect is not None and now >= self._next_reconnect:
            self._next_reconnect = _next_period(self._next_reconnect, cfg.reconnect_interval, now)
            if self._dead and not self._leaving:
                nid = self._rng.choice(list(self._dead))
                r = self._local[nid]
                self._seq += 1
                verdict = MemberUpdate(nid, r.incarnation, r.state, r.addr, r.capabilities)
                out.append((r.addr, Ping(self.node_id, self._seq, nid, (verdict, self._self_update()) + self.piggyback())))
        if self._next_sync is not None and now >= self._next_sync:
            self._next_sync = _next_period(self._next_sync, cfg.member_sync_interval, now)
            peers = self.random_live_peers(1)
            if peers and not self._leaving:
                out += [(peers[0][1], m) for m in self.full_state_messages(reply=True)]
        self._rewake()
        return out

    def join(self, seed_addrs: Iterable[str], now: float) -> Outgoing:
        """Start joining through seeds: push our full state to each, asking for theirs.

        A push to a seed that is not up yet is lost, so the seeds are remembered and
        pushed to again every probe period in which this node knows no live member
        (none has answered yet, or every one it knew is DEAD or LEFT)."""
        self._seeds = tuple(dict.fromkeys(a for a in seed_addrs if a != self._me.addr))
        return self._join_pushes()

    def _join_pushes(self) -> Outgoing:
        msgs = self.full_state_messages(reply=True)
        return [(a, m) for a in self._seeds for m in msgs]

    def leave(self, now: float) -> Outgoing:
        """Announce a graceful leave (state LEFT) to up to ``indirect_k`` live peers; stop probing."""
        self._leaving = True
        self._me.state = _LEFT
        u = self._self_update()
        self._enqueue(u)
        out: Outgoing = []
        for nid, addr in self.random_live_peers(max(1, self.config.indirect_k)):
            self._seq += 1
            out.append((addr, Ping(self.node_id, self._seq, nid, (u,))))
        return out

    def set_capabilities(self, capabilities: Iterable[str]) -> None:
        """Change what this node advertises: bumps the incarnation and gossips ALIVE."""
        self._me.capabilities = _check_capabilities(capabilities)
        self._bump(self._me.incarnation)
        self._enqueue(self._self_update())

    # -- internals ---------------------------------------------------------------
    def _ids(self) -> Iterator[str]:
        yield from self._roster.ids
        yield from self._extra_ids

    def _get(self, node_id: str):
        r = self._local.get(node_id)
        return r if r is not None else self._roster.get(node_id)

    def _put(self, rec: _Rec) -> None:
        if rec.node_id not in self._local and self._roster.get(rec.node_id) is None:
            self._extra_ids.append(rec.node_id)
        self._local[rec.node_id] = rec

    def _mut(self, node_id: str) -> _Rec | None:
        r = self._local.get(node_id)
        if r is None:
            m = self._roster.get(node_id)
            if m is None:
                return None
            r = _Rec(m.node_id, m.addr, m.incarnation, m.state, m.capabilities)
            self._local[node_id] = r
        return r

    def _self_update(self) -> MemberUpdate:
        me = self._me
        return MemberUpdate(me.node_id, me.incarnation, me.state, me.addr, me.capabilities)

    def _enqueue(self, u: MemberUpdate) -> None:
        self._queue[u.node_id] = [u, self.config.retransmit_limit(len(self))]

    def _set_state(self, r: _Rec, state: MemberState) -> None:
        if state != r.state:
            # state changes are rare and operators need them: suspicion, death, return
            log.info("gossip %s: member %s is now %s (incarnation %d, was %s)",
                     self.node_id, r.node_id, state.name, r.incarnation, MemberState(r.state).name)
        r.state = state
        if state == _DEAD:
            self._dead[r.node_id] = None
        else:
            self._dead.pop(r.node_id, None)

    def _start_timer(self, r: _Rec, now: float) -> None:
        heapq.heappush(self._timers, (now + self.config.suspicion_timeout(len(self)), r.node_id, r.incarnation))

    def _updates_for(self, sender: str) -> tuple:
        """Piggy-back for a reply to ``sender``: our verdict first if we think it is not ALIVE."""
        r = self._get(sender)
        if r is not None and r.state != _ALIVE:
            return (MemberUpdate(r.node_id, r.incarnation, r.state, r.addr, r.capabilities),) + self.piggyback()
        return self.piggyback()

    def _suspect(self, node_id: str, now: float) -> None:
        r = self._mut(node_id)
        if r is None or r.state != _ALIVE:
            return
        self._set_state(r, _SUSPECT)
        self._start_timer(r, now)
        self._enqueue(MemberUpdate(node_id, r.incarnation, _SUSPECT, r.addr, r.capabilities))

    def _twin(self, u: MemberUpdate) -> None:
        """Log (once per address) news of this node's id ALIVE elsewhere at a higher incarnation.

        That is a second node running with this id, or an earlier run of this
        node that peers remember at a higher incarnation than it restarted
        with.  It is outbid all the same (the refutation that follows); with a
        twin that never ends, hence the warning.
        """
        if u.addr in self._twins or len(self._twins) >= 256:
            return
        self._twins.add(u.addr)
        log.warning("gossip %s: peers know this node id ALIVE at %r (incarnation %d, ours %d): another node "
                    "running with the same id, or an earlier run of this one; outbidding it",
                    self.node_id, u.addr, u.incarnation, self._me.incarnation)

    def _refute(self, inc: int) -> None:
        self._health = min(self.config.max_local_health, self._health + 1)
        if inc >= self._me.incarnation:
            self._bump(inc)
        self._enqueue(self._self_update())

    def _bump(self, inc: int) -> None:
        """Take incarnation ``inc + 1``, but never past :data:`MAX_INCARNATION`.

        Past it our own updates would no longer decode anywhere (every message
        carrying them dropped as malformed, so no peer could hear from us); a
        rumour at the largest incarnation cannot be outbid, which is logged.
        """
        if inc >= MAX_INCARNATION and self._me.incarnation < MAX_INCARNATION:  # once: later rumours change nothing
            log.warning("gossip %s: a peer spread incarnation %d for this node, the largest there is; "
                        "it cannot be outbid, so peers may keep holding this node suspect or dead", self.node_id, inc)
        self._me.incarnation = min(inc + 1, MAX_INCARNATION)

    def _apply(self, u: MemberUpdate, now: float) -> bool:
        nid, inc, state = u.node_id, u.incarnation, u.state
        if nid == self.node_id:
            if self._leaving:
                return False
            me = self._me
            if state == _ALIVE and inc > me.incarnation and u.addr != me.addr:
                self._twin(u)
            if (state != _ALIVE and inc >= me.incarnation) or (state == _ALIVE and inc > me.incarnation):
                self._refute(inc)
                return True
            return False
        cur = self._get(nid)
        if cur is None:
            r = _Rec(nid, u.addr, inc, state, u.capabilities)
            self._put(r)
            if state == _DEAD:
                self._dead[nid] = None
            elif state == _SUSPECT:
                self._start_timer(r, now)
            self._enqueue(u)
            return True
        cs, ci = cur.state, cur.incarnation
        if state == _ALIVE:
            accept = inc > ci
        elif state == _SUSPECT:
            accept = (cs == _ALIVE and inc >= ci) or inc > ci
        else:
            accept = (cs <= _SUSPECT and inc >= ci) or inc > ci
        if not accept:
            return False
        r = self._mut(nid)
        if state == _ALIVE or inc > ci:
            # a newer incarnation is a newer life: it may listen elsewhere (a
            # restart on a fresh port) and advertise other capabilities
            r.addr = u.addr
            r.capabilities = u.capabilities
        r.incarnation = inc
        self._set_state(r, state)
        if state == _SUSPECT:
            self._start_timer(r, now)
        self._enqueue(MemberUpdate(nid, inc, state, r.addr, r.capabilities))
        return True

    def _stalled(self, gap: float) -> None:
        """This node did not run for ``gap`` (a paused process, a starved event loop).

        Time we did not observe must not count against others: acks and
        refutations may be waiting unread.  Every running deadline (the probe,
        suspicion timers, relays) moves ``gap`` later, and local health worsens.
        """
        log.info("gossip %s: no tick for %.2fs; deadlines moved, peers not blamed for it", self.node_id, gap)
        self._health = min(self.config.max_local_health, self._health + 1)
        self._next_probe += gap
        p = self._probe
        if p is not None:
            p.indirect_at += gap
            p.fail_at += gap
        if self._timers:
            self._timers = [(d + gap, nid, inc) for d, nid, inc in self._timers]
            heapq.heapify(self._timers)
        if self._relays:
            self._relays = {s: (a, q, e + gap) for s, (a, q, e) in self._relays.items()}

    def _rewake(self) -> None:
        w = self._next_probe
        p = self._probe
        if p is not None:
            w = min(w, p.fail_at if p.indirect else p.indirect_at)
        if self._timers:
            w = min(w, self._timers[0][0])
        if self._next_sync is not None:
            w = min(w, self._next_sync)
        if self._next_reconnect is not None:
            w = min(w, self._next_reconnect)
        if self._relays:
            w = min(w, min(v[2] for v in self._relays.values()))
        self._wake = w
