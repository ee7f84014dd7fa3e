"""The fleet: gossip over the authenticated wire, and ContentAddressedFabric.

A node in a fleet runs a :class:`gossip.runner.GossipRunner` whose transport is
the wire (op ``gossip``; payloads are gossip messages, decoded by the runner).
Its HoldingIndex is seeded by replaying its own ledger (so a restarted node's
holdings come back), and every record it makes afterwards is announced.

:class:`ContentAddressedFabric` answers a realize in this order:

1. the local cassette;
2. peers the index says hold the key, live ones only, lowest observed latency
   first: the record is fetched with ``fetch`` (ContentServeFabric), verified
   against the digest the holder announced, recorded here, announced;
3. the key's *home site*, the first member in the rendezvous order of the key
   over live members (ALIVE or SUSPECT here) advertising the evaluator
   (``eval:NAME@VERSION``) that can be reached: if that is this node it
   computes (single-flight), else the request is forwarded to the home (marked
   ``home``, so the home never forwards again) and the verified reply recorded.
   A member this node's failure detector holds DEAD is no candidate; one that
   refuses the connection is skipped for the next in order, and a forward (or
   a holder fetch) still waiting when its peer turns DEAD is cancelled and the
   next in order tried (:meth:`Fleet.while_live`);
4. record locally and announce, so this node becomes a holder.

An artifact (or reply) a member lacks (:meth:`ContentAddressedFabric.obtain`,
for ``get``) comes in two steps — when the index knows no live holder of it
yet (a put on a peer moments ago, its gossip still on the way), the member
first asks every live peer who holds it (op ``holders``, all at once, within
``ASK_HOLDERS_S``) and uses what they say: its manifest record from one live
holder (verified against the digest it announced, or against the key alone
for a holder found by asking), then the chunks still missing here, striped over every
live holder announcing that digest (a shared queue, at most
``FETCH_PER_HOLDER`` chunks in flight per holder, so a faster holder serves
more).  Every chunk is verified against its blob key before it is stored, in
batches of ``FETCH_BATCH``; a holder that fails once gets no further chunks
and its unfinished ones go to the others.  The manifest is recorded only once
every chunk it names is held here.  A record held here whose row fails its check
counts as lacking (it is fetched and recorded afresh).  When no holder is left:
DATA_LOSS if every holder's copy of a chunk failed its check or was missing, else
a retryable UNAVAILABLE; likewise, a record no holder served is UNAVAILABLE
(retryable) when a holder failed in a way worth retrying (killed, not yet DEAD
here), else "no holder" (NOT_FOUND, or DATA_LOSS for a copy corrupt here).

Two holders claiming different digests for one key is a determinism
violation: it is logged and counted (``fabric_determinism_violations_total``)
and the digest served is the one most holders claim (ties: the one the key's home
holds, the home among live members advertising the evaluator, as in step 3).
"""

from __future__ import annotations

import collections
import ipaddress
import logging
import math
import re
import time
from typing import TYPE_CHECKING, Any

import trio

from cassette.errors import FabricError, StatusCode
from cassette.keys import ContentKey
from cassette.record import Record, unpack_record
from fabric import metrics
from fabric.net import WireClient, open_connection
from fabric.remote import parse_address
from fabric.placement import evaluator_capability
from fabric.serve import KeyFlights, answer_held, answer_if_held, evaluator_fault, verify_record
from gossip.messages import MAX_ADDR_BYTES
from gossip.node import GossipConfig, GossipNode, rendezvous_order
from gossip.runner import GossipRunner

if TYPE_CHECKING:
    from fabric.local import Fabric
    from fabric.net import ServerCall

__all__ = ["PeerPool", "WireTransport", "Fleet", "ContentAddressedFabric", "reply_address"]

log = logging.getLogger("fabric.fleet")

INBOX = 1024
#: Chunks of one artifact in flight per holder while a member fetches it.
FETCH_PER_HOLDER = 4
#: Verified chunks stored per ``aput_blobs`` during a fetch (what a fetch holds in memory stays small).
FETCH_BATCH = 4
#: Seconds one chunk may take from one holder before that holder counts as failed for this fetch.
CHUNK_DEADLINE_S = 15.0
#: How often a call waiting on a peer checks whether the failure detector now holds that peer DEAD.
LIVENESS_POLL_S = 0.25
#: How long a member asks its live peers who holds a key it knows no holder of (``get``).
ASK_HOLDERS_S = 2.0


#: One DNS label of a host name a peer may give as its ``from`` address.
_HOST_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


def reply_address(addr: str) -> str:
    """``addr`` if it is an address a ``gossip`` op may name as ``from`` (where the runner
    sends its replies), else INVALID_ARGUMENT: ``HOST:PORT`` of at most
    :data:`~gossip.messages.MAX_ADDR_BYTES` UTF-8 bytes, PORT 1-65535 in ASCII digits, HOST
    an IP address (IPv6 bare, as a node advertises it, or in brackets) or a DNS name of
    dot-separated labels of 1-63 ASCII letters, digits, ``-`` or ``_`` (no label starting or
    ending with ``-``).  Only the form is checked: whether it answers is gossip's business."""
    bad = FabricError(StatusCode.INVALID_ARGUMENT,
                      f"gossip: 'from' must be HOST:PORT (port 1-65535, at most {MAX_ADDR_BYTES} bytes), got {addr!r:.80}")
    if len(addr.encode("utf-8", "surrogatepass")) > MAX_ADDR_BYTES:
        raise bad
    try:
        host, _ = parse_address(addr)
    except FabricError:
        raise bad from None
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not all(_HOST_LABEL.fullmatch(label) for label in host.split(".")):
            raise bad from None
    return addr


class PeerPool:
    """One reused, pipelined wire connection per peer address, with observed latency."""

    def __init__(self, secret: bytes) -> None:
        self.secret = secret
        self._clients: dict[str, WireClient] = {}
        self._locks: dict[str, trio.Lock] = {}
        #: exponentially weighted round-trip estimate per address (seconds)
        self.rtt: dict[str, float] = {}

    async def client(self, addr: str) -> WireClient:
        """A connected client for ``addr`` (dialled on first use, after a break, or once the peer
        closed it: see :meth:`~fabric.net.WireClient.reusable`)."""
        c = self._clients.get(addr)
        if c is not None and c.reusable():
            return c
        lock = self._locks.setdefault(addr, trio.Lock())
        async with lock:
            c = self._clients.get(addr)
            if c is None or not c.reusable():
                host, port = parse_address(addr)
                c = self._clients[addr] = await open_connection(host, port, self.secret)
            return c

    def drop(self, addr: str) -> None:
        """Forget ``addr``'s connection (it broke); the next call re-dials."""
        self._clients.pop(addr, None)

    async def _call(self, addr: str, fn) -> Any:
        """``await fn(client)`` on ``addr``'s connection, timing it; UNAVAILABLE drops the connection."""
        t0 = time.perf_counter()
        client = await self.client(addr)
        try:
            out = await fn(client)
        except FabricError as exc:
            if exc.status_code is StatusCode.UNAVAILABLE:
                self.drop(addr)
            raise
        self._observe(addr, time.perf_counter() - t0)
        return out

    async def request(self, addr: str, op: str, body: Any) -> Any:
        """A unary request to ``addr``."""
        return await self._call(addr, lambda client: client.request(op, body))

    async def record(self, addr: str, op: str, body: Any) -> tuple[dict, bytes]:
        """A streaming request answered with a record (see :mod:`fabric.serve`)."""
        from fabric.remote import _stream_record

        return await self._call(addr, lambda client: _stream_record(client, op, body))

    async def blob(self, addr: str, key: ContentKey) -> bytes:
        """A blob from ``addr`` (op ``get``), verified against its key (DATA_LOSS otherwise)."""

        async def go(client: WireClient) -> bytes:
            _, items = await client.call("get", {"key": key})
            if len(items) != 1 or type(items[0]) is not bytes or ContentKey.of("blob", items[0]) != key:
                raise FabricError(StatusCode.DATA_LOSS, "peer sent bytes that do not match the blob key", key=key)
            return items[0]

        return await self._call(addr, go)

    def _observe(self, addr: str, dt: float) -> None:
        old = self.rtt.get(addr)
        self.rtt[addr] = dt if old is None else 0.8 * old + 0.2 * dt

    async def aclose(self) -> None:
        """Close every connection."""
        for c in list(self._clients.values()):
            with trio.move_on_after(1):
                await c.aclose()
        self._clients.clear()


class WireTransport:
    """The gossip :class:`~gossip.runner.Transport` over the wire: op ``gossip``."""

    def __init__(self, pool: PeerPool, self_addr: str) -> None:
        self.pool = pool
        self.self_addr = self_addr

    async def send(self, peer_addr: str, payload: bytes) -> None:
        """Send one gossip payload to ``peer_addr`` (errors are the runner's to count)."""
        await self.pool.request(peer_addr, "gossip", {"from": self.self_addr, "msg": payload})
        metrics.GOSSIP_BYTES.inc(len(payload))


class Fleet:
    """A node's gossip membership and holding index, run under trio."""

    def __init__(self, fab: "Fabric", addr: str, secret: bytes, capabilities: list[str], *, interval: float = 0.5) -> None:
        from gossip.membership import MembershipConfig

        self.fab = fab
        self.addr = addr
        self.pool = PeerPool(secret)
        # Failure detection must tolerate a loaded machine: a false DEAD splits the
        # live set, and nodes that disagree on the live set disagree on homes.
        probe = max(1.0, interval)
        cfg = GossipConfig(
            interval=interval,
            fanout=3,
            membership=MembershipConfig(probe_interval=probe, ping_timeout=0.8 * probe, suspicion_mult=5.0,
                                        member_sync_interval=10 * probe, reconnect_interval=4 * probe),
        )
        # a restart must outrank every incarnation this node had before
        incarnation = int(time.time() * 1000)
        self.gossip = GossipNode(fab.node_id, addr=addr, capabilities=capabilities, config=cfg, incarnation=incarnation,
                                 now=trio.current_time())
        self.runner = GossipRunner(self.gossip, WireTransport(self.pool, addr))
        self._inbox_send, self._inbox_recv = trio.open_memory_channel(INBOX)
        self.dropped = 0
        self._seen_conflicts = 0
        #: verified bytes fetched from each peer (records and chunks), by node id
        self.fetched_bytes: dict[str, int] = {}
        self._taken = 0  # the last ledger seq whose row became a fact (see _take_ledger)

    def replay_ledger(self) -> int:
        """Seed the index with this node's own ledger, in ledger order (no announcement)."""
        return self._take_ledger(announce=False)

    def _take_ledger(self, *, announce: bool) -> int:
        """Make every ledger row after the last one taken a fact of this node, in ledger order;
        returns how many facts were new.

        Live announcements and a restart's replay both number facts this way, so
        ``(node, seq)`` names the same record before and after a restart (specs/gossip.md
        section 2), whatever order the tasks that recorded them resumed in and whoever
        wrote the rows (another process on the same data dir too).  A row that does not
        read back is skipped, as replay skips it.
        """
        new = 0
        for rec in self.fab.cassette.iter_ledger(self._taken + 1, verify=False):
            self._taken = rec.seq
            before = len(self.gossip.index)
            try:
                self.gossip.add_local(rec.key, rec.digest, announce=announce)
            except FabricError as exc:  # a second row for a key with another digest: a corrupt or forged ledger
                log.warning("gossip: ledger row %d (%s) not announced: %s", rec.seq, rec.key.short(), exc.message)
                continue
            new += len(self.gossip.index) - before
        return new

    async def run(self, seeds: list[str], *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run gossip until cancelled: the tick loop, the inbox, and joining ``seeds``."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.runner.run)
            nursery.start_soon(self._drain_inbox)
            nursery.start_soon(self._export_metrics)
            if seeds:
                await self.runner.join(seeds)
            task_status.started()

    async def handle(self, call: "ServerCall") -> None:
        """The ``gossip`` op: queue the payload for the runner; drop it when the inbox is full.
        INVALID_ARGUMENT, before anything is queued, for a body that is not ``{'from': str,
        'msg': bytes}`` or a ``from`` that is no address to reply to (:func:`reply_address`)."""
        body = call.body
        if not isinstance(body, dict) or type(body.get("msg")) is not bytes or not isinstance(body.get("from"), str):
            raise FabricError(StatusCode.INVALID_ARGUMENT, "gossip: body must be {'from': str, 'msg': bytes}")
        src = reply_address(body["from"])
        try:
            self._inbox_send.send_nowait((src, body["msg"]))
        except trio.WouldBlock:
            self.dropped += 1  # gossip tolerates loss; anti-entropy repairs it

    async def _drain_inbox(self) -> None:
        async for src, payload in self._inbox_recv:
            await self.runner.deliver(src, payload)

    async def _export_metrics(self) -> None:
        last_rounds = last_new = 0
        while True:
            await trio.sleep(1.0)
            st = self.gossip.stats
            metrics.GOSSIP_ROUNDS.inc(st.rounds - last_rounds)
            metrics.GOSSIP_FACTS.inc(st.facts_new - last_new)
            last_rounds, last_new = st.rounds, st.facts_new
            if st.conflicts > self._seen_conflicts:
                metrics.DETERMINISM_VIOLATIONS.inc(st.conflicts - self._seen_conflicts)
                log.warning("gossip: %d new determinism violation(s) (holders disagree on a digest)", st.conflicts - self._seen_conflicts)
                self._seen_conflicts = st.conflicts

    def count_fetch(self, node_id: str, nbytes: int) -> None:
        """Count ``nbytes`` verified bytes fetched from peer ``node_id``: a holder's record or
        chunk, or the record a home (or resolver) answered a forwarded realize with."""
        metrics.PEER_FETCH_BYTES.inc(nbytes)
        self.fetched_bytes[node_id] = self.fetched_bytes.get(node_id, 0) + nbytes

    async def announce_recorded(self) -> None:
        """Tell the fleet what this node recorded: every row its ledger gained since the
        last call (or the replay), in ledger order (see :meth:`_take_ledger`)."""
        if self._take_ledger(announce=True):
            self.runner.facts_added()
        await trio.lowlevel.checkpoint()

    def live_holders(self, key: ContentKey) -> list[tuple[str, str, bytes]]:
        """``(node_id, addr, digest)`` of live holders other than this node, nearest first."""
        out = []
        for node_id, digest in self.gossip.live_holders(key):
            if node_id == self.fab.node_id:
                continue
            addr = self.gossip.membership.addr_of(node_id)
            if addr:
                out.append((node_id, addr, digest))
        out.sort(key=lambda t: self.pool.rtt.get(t[1], math.inf))
        return out

    def home_order(self, key: ContentKey, evaluator: str, version: str) -> list[tuple[str, str]]:
        """``[(node_id, addr)]``: the key's home first, then its fallbacks.

        The order is the rendezvous order over the *live* members (ALIVE or
        SUSPECT in this node's view) that advertise the evaluator.  A member the
        failure detector holds DEAD (its suspicion ran out unrefuted) or that
        left is no candidate, so no asker waits on a hung home; a SUSPECT one
        still is, because suspicion is where a detector flaps under load, and a
        member that comes back (refutes, or restarts with a higher incarnation)
        is ALIVE and a candidate again.  A member that is really down but not
        yet DEAD refuses the connection (the caller moves on to the next in
        order) or hangs until this node holds it DEAD (:meth:`while_live`).
        """
        cap = evaluator_capability(evaluator, version)
        members = {m.node_id: m for m in self.gossip.membership.live_members(cap)}
        order = rendezvous_order(key, list(members))
        return [(n, self.addr if n == self.fab.node_id else members[n].addr) for n in order]

    def resolver_order(self, evaluator: str) -> list[tuple[str, str]]:
        """``[(node_id, addr)]``: the live members other than this node that advertise some
        version of ``evaluator``, in the rendezvous order of the evaluator's *name*; the first
        resolves requests for it that name no version on behalf of members that lack it.

        Keyed by the name, so while membership holds still every such request is resolved
        by one member and all agree on which version "latest" is."""
        prefix = evaluator_capability(evaluator, "")
        members = {m.node_id: m for m in self.gossip.membership.live_members()
                   if m.node_id != self.fab.node_id and any(c.startswith(prefix) for c in m.capabilities)}
        order = rendezvous_order(prefix.encode("utf-8"), list(members))
        return [(n, members[n].addr) for n in order]

    async def ask_holders(self, key: ContentKey) -> list[tuple[str, str, None]]:
        """``(node_id, addr, None)`` of live members other than this node that some live peer
        says holds ``key``, nearest first: every live peer is asked (op ``holders``) at once,
        all within :data:`ASK_HOLDERS_S`, and their answers merged.  For a key the gossiped
        index does not know yet (a put on a peer moments ago); the digest is unknown, so
        what is fetched is verified against the key alone."""
        me = self.fab.node_id
        peers = [m for m in self.gossip.membership.live_members() if m.node_id != me]
        said: set[str] = set()

        async def ask(addr: str) -> None:
            try:
                ids = await self.pool.request(addr, "holders", {"key": key})
            except FabricError as exc:
                log.debug("holders of %s from %s failed: %s", key.short(), addr, exc.status_code.name)
                return
            if isinstance(ids, (list, tuple)):
                said.update(i for i in ids if type(i) is str)

        with trio.move_on_after(ASK_HOLDERS_S):
            async with trio.open_nursery() as nursery:
                for m in peers:
                    nursery.start_soon(ask, m.addr)
        out = []
        for node_id in said - {me}:
            m = self.gossip.membership.member(node_id)
            if m is not None and m.live:
                out.append((node_id, m.addr, None))
        out.sort(key=lambda t: self.pool.rtt.get(t[1], math.inf))
        return out

    async def until_not_live(self, node_id: str) -> None:
        """Return once this node's failure detector holds ``node_id`` DEAD or LEFT (or forgets it).

        Membership is a sans-I/O machine with no callbacks, so the state is read
        every :data:`LIVENESS_POLL_S` (a dictionary lookup)."""
        while self.gossip.membership.is_live(node_id):
            await trio.sleep(LIVENESS_POLL_S)

    async def while_live(self, node_id: str, fn) -> tuple[bool, Any]:
        """``(True, await fn())``, or ``(False, None)`` when ``node_id`` turns DEAD or LEFT
        first: the call is then cancelled, so waiting on a hung peer ends when the failure
        detector gives up on it instead of at the asker's deadline.  ``fn``'s exceptions
        propagate unchanged."""
        done, result, error = False, None, None
        async with trio.open_nursery() as nursery:

            async def run() -> None:
                nonlocal done, result, error
                try:
                    result = await fn()
                except Exception as exc:  # noqa: BLE001 - re-raised below, outside the nursery
                    error = exc
                done = True
                nursery.cancel_scope.cancel()

            async def watch() -> None:
                await self.until_not_live(node_id)
                nursery.cancel_scope.cancel()

            nursery.start_soon(run)
            nursery.start_soon(watch)
        if error is not None:
            raise error
        return done, result

    def stats(self) -> dict:
        """Members, facts, rounds and conflicts, for ``fabric stats``."""
        members = self.gossip.membership.members()
        st = self.gossip.stats
        return {
            "members": len(members),
            "members_live": sum(1 for m in members if m.live),
            "facts": len(self.gossip.index),
            "gossip_rounds": st.rounds,
            "gossip_facts_new": st.facts_new,
            "gossip_conflicts": st.conflicts,
            "gossip_equivocations": len(self.gossip.index.equivocations()),
            "gossip_foreign_own_facts": st.foreign_own_facts,
            "gossip_dropped": self.dropped,
            "gossip_bytes_sent": self.runner.bytes_sent,
            "peer_fetch_bytes_by_node": dict(self.fetched_bytes),
        }

    async def aclose(self) -> None:
        """Leave gracefully and close peer connections."""
        with trio.move_on_after(2):
            await self.runner.leave()
        await self.pool.aclose()


def _unregistered(evaluator: str, version: str | None) -> str:
    """What this node's registry says of ``evaluator`` at ``version`` (None: any) when it lacks it."""
    from fabric import registry

    try:
        registry.lookup(evaluator, version)
    except FabricError as exc:
        return exc.message
    return f"{evaluator!r} version {version!r} is registered here but not advertised"


class ContentAddressedFabric:
    """The fleet lookup of a node (see the module docstring)."""

    def __init__(self, fab: "Fabric", fleet: Fleet) -> None:
        self.fab = fab
        self.fleet = fleet
        self._obtaining: dict[ContentKey, trio.Event] = {}  # single-flight of obtain, per key
        self._fetched: dict[ContentKey, int] = {}  # verified chunk bytes fetched so far, per artifact being obtained
        #: one fetch-or-forward per key at a time for askers that are not forwarded here as the home
        self.resolving = KeyFlights(on_wait=metrics.COALESCED.inc)

    async def realize(self, call: "ServerCall", req: Any, *, at_home: bool, begin, end) -> dict:
        """Answer a realize for ``req`` as the module docstring says.  A request naming no
        version reaches here only on a member that does not know the evaluator: see
        :meth:`_realize_elsewhere`."""
        if req.version is None:
            return await self._realize_elsewhere(call, req, begin, end)
        key = req.key
        hit = await answer_if_held(call, self.fab, key)
        if hit is not None:
            return hit
        if at_home:  # never waits on this node's other askers (see KeyFlights)
            return await self._resolve(call, req, at_home, begin, end)
        return await self.resolving.share(key, lambda: self._resolve(call, req, at_home, begin, end),
                                          lambda: answer_if_held(call, self.fab, key))

    async def _resolve(self, call: "ServerCall", req: Any, at_home: bool, begin, end) -> dict:
        """A miss here: from a live holder, else from the key's home (computed here when this
        node is the first reachable home); recorded and announced either way."""
        key = req.key
        begin()
        try:
            got = await self._from_holders(key, capability=evaluator_capability(req.evaluator, req.version))
            if got is not None:
                rec, holder = got
                return await self._record_and_answer(call, rec, "peer", holder)
            if not at_home:
                order = self.fleet.home_order(key, req.evaluator, req.version)
                cap = evaluator_capability(req.evaluator, req.version)
                if not order:
                    raise FabricError(StatusCode.NOT_FOUND, f"on node {self.fab.node_id}: {_unregistered(req.evaluator, req.version)}; "
                                      f"no live member of the fleet advertises {cap} and none holds this request's reply", key=key)
                for home_id, home_addr in order:
                    if home_id == self.fab.node_id:
                        break  # this node is the first reachable home: compute here
                    forwarded = await self._forward(home_id, home_addr, req)
                    if forwarded is not None:
                        rec, source, holder = forwarded
                        return await self._record_and_answer(call, rec, source, holder)
                else:  # this node lacks the evaluator and no member advertising it answered
                    raise FabricError(StatusCode.UNAVAILABLE, f"on node {self.fab.node_id}: no live member advertising "
                                      f"{cap} could be reached", retryable=True, key=key)
            rep = await self.fab.arealize(req)
        except FabricError:
            raise
        except Exception as exc:  # noqa: BLE001 - the evaluator's own error, carried to the caller
            raise evaluator_fault(exc, key) from None
        finally:
            end()
        if self.fab.cassette.get_record(key) is None:
            raise FabricError(StatusCode.INTERNAL, "reply vanished from the cassette after recording", key=key)
        await self.fleet.announce_recorded()
        return await answer_held(call, self.fab.cassette, key, {"key": key, "source": rep.source, "holder": self.fab.node_id})

    async def _realize_elsewhere(self, call: "ServerCall", req: Any, begin, end) -> dict:
        """A request naming no version, on a member whose registry lacks the evaluator: it is
        forwarded, still naming no version and not marked ``home``, to the first reachable
        member of :meth:`Fleet.resolver_order`, which resolves "latest" as it would for its own
        client and then looks the request up as usual (local, holders, home).  The record that
        comes back is verified against the key of the version it names, recorded here and
        announced.  NOT_FOUND when no live member advertises any version of the evaluator."""
        order = self.fleet.resolver_order(req.evaluator)
        if not order:
            raise FabricError(StatusCode.NOT_FOUND, f"on node {self.fab.node_id}: {_unregistered(req.evaluator, None)}; "
                              "no live member of the fleet advertises any version of it")
        body = {"evaluator": req.evaluator, "version": None, "args": req.args}
        begin()
        try:
            for node_id, addr in order:
                try:
                    live, got = await self.fleet.while_live(node_id, lambda: self.fleet.pool.record(addr, "realize", body))
                except FabricError as exc:
                    if exc.status_code is not StatusCode.UNAVAILABLE:
                        raise
                    live = False
                if not live:
                    log.info("resolver %s of %s unreachable or DEAD: trying the next", node_id, req.evaluator)
                    continue
                reply, raw = got
                try:
                    version = unpack_record(raw).version
                except FabricError as exc:
                    raise FabricError(StatusCode.DATA_LOSS, f"received record fails verification: {exc.message}") from None
                rec = verify_record(raw, ContentKey.for_request(req.evaluator, version, req.args))
                self.fleet.count_fetch(node_id, len(raw))
                source = "computed" if reply.get("source") == "computed" else "peer"
                return await self._record_and_answer(call, rec, source, str(reply.get("holder", "")))
        finally:
            end()
        raise FabricError(StatusCode.UNAVAILABLE, f"on node {self.fab.node_id}: no live member advertising "
                          f"{req.evaluator!r} could be reached", retryable=True)

    async def obtain(self, key: ContentKey) -> str | None:
        """Make this node hold ``key`` (a reply or an artifact with all its chunks) by fetching
        it from live holders, every byte verified before it is stored; records and announces
        it.  Returns the holder the record came from, or None when no holder could serve it.
        An artifact's missing chunks come from every live holder at once (:meth:`_fetch_chunks`).
        Concurrent calls for one key share one fetch.  A key held here whose row fails its
        check counts as lacking: the record fetched is recorded afresh (the cassette appends a
        fresh row).  UNAVAILABLE (retryable) when no holder served the record and some failed
        in a way worth retrying (a holder killed but not yet DEAD here refuses the connection)."""
        while True:
            if self.fab.cassette.get_raw(key) is not None:  # held, and its row verifies (a corrupt one is repaired)
                return self.fab.node_id
            busy = self._obtaining.get(key)
            if busy is None:
                break
            await busy.wait()  # another request is fetching it: share its result (or retry after its failure)
        self._obtaining[key] = done = trio.Event()
        try:
            return await self._obtain(key)
        finally:
            del self._obtaining[key]
            self._fetched.pop(key, None)
            done.set()

    def obtaining_bytes(self, key: ContentKey) -> int:
        """Verified chunk bytes of artifact ``key`` fetched so far by the obtain in progress (0 if none)."""
        return self._fetched.get(key, 0)

    async def _obtain(self, key: ContentKey) -> str | None:
        # a key the index knows no live holder of may be news the gossip has not brought yet: ask
        asked = [] if self.fleet.live_holders(key) else await self.fleet.ask_holders(key)
        failures: list[FabricError] = []
        got = await self._from_holders(key, asked or None, failures=failures)
        if got is None:
            transient = [exc for exc in failures if exc.retryable]
            if transient:
                raise FabricError(StatusCode.UNAVAILABLE, f"on node {self.fab.node_id}: {len(transient)} live holder(s) "
                                  f"could not serve it (last: {transient[-1].status_code.name}); try again",
                                  retryable=True, key=key)
            return None
        rec, holder = got
        if key.kind == "artifact":
            from cassette import codec

            manifest = codec.decode(rec.payload)
            missing = list(dict.fromkeys(self.fab.cassette.missing(manifest["chunks"], verify_blobs=True)))
            if missing:
                known = self.fleet.live_holders(key) or asked  # a holder found by asking vouches by its manifest
                holders = [(node_id, addr) for node_id, addr, digest in known if digest in (rec.digest, None)]
                await self._fetch_chunks(key, missing, holders)
        # the manifest (or reply) is recorded only once every chunk it names is held here
        await self.fab.cassette.aput_record(rec)
        await self.fleet.announce_recorded()
        return holder

    async def repair_chunk(self, key: ContentKey, digest: bytes, chunk: ContentKey) -> bytes | None:
        """The bytes of ``chunk`` of artifact ``key`` (held here with ``digest``), fetched from
        the live holders announcing that digest, verified and stored (repairing a copy that
        rotted here: :meth:`_fetch_chunks`); None when there is none or none has an intact
        copy; a retryable error of theirs (holders listed live that could not be reached) is raised."""
        holders = [(node_id, addr) for node_id, addr, d in self.fleet.live_holders(key) if d == digest]
        if not holders:
            return None
        try:
            await self._fetch_chunks(key, [chunk], holders)
        except FabricError as exc:
            if exc.retryable:  # holders listed live could not be reached: the client may try again
                raise
            log.info("repair of chunk %s of %s failed: %s", chunk.short(), key.short(), exc.message)
            return None
        finally:
            if key not in self._obtaining:
                self._fetched.pop(key, None)
        log.warning("chunk %s of %s was corrupt here: repaired from a live holder", chunk.short(), key.short())
        return self.fab.cassette.get_blob(chunk)

    async def _fetch_chunks(self, key: ContentKey, chunks: list[ContentKey], holders: list[tuple[str, str]]) -> None:
        """Store ``chunks`` (blob keys of artifact ``key``) fetched from ``holders`` ``[(node_id, addr)]``.

        ``FETCH_PER_HOLDER`` lanes per holder take chunks from one shared queue;
        ``pool.blob`` verifies each against its key (DATA_LOSS otherwise) and
        verified chunks are stored every ``FETCH_BATCH``.  A holder whose fetch
        fails, takes over ``CHUNK_DEADLINE_S`` or turns DEAD while a chunk waits on
        it (:meth:`Fleet.while_live`) is done: the chunk goes back to the front of
        the queue for the others.  A round ends when every lane has stopped; chunks a failed holder
        handed back after the others had stopped start another round with the
        holders left.  When no holder is left for a chunk: DATA_LOSS if every holder's copy of
        some chunk still pending failed its check or was missing (no good copy to fetch),
        else UNAVAILABLE (retryable: chunks fetched so far stay, and a holder dropped for
        another chunk's failure may well serve this one next time).
        """
        pending = collections.deque(chunks)
        batch: list[tuple[ContentKey, bytes]] = []
        pool = self.fleet.pool

        async def flush() -> None:
            if batch:
                items = batch[:]
                batch.clear()
                await self.fab.cassette.aput_blobs(items, verified=True)  # pool.blob checked each

        async def one(node_id: str, addr: str, ck: ContentKey, failed: dict[str, bool]) -> bytes | None:
            if node_id in failed:  # another lane's failure came while this one was being scheduled
                return None
            try:
                return await pool.blob(addr, ck)
            except FabricError:
                failed.setdefault(node_id, False)  # at once: no lane of this holder starts another chunk
                raise

        async def lane(node_id: str, addr: str, failed: dict[str, bool]) -> None:
            while pending and node_id not in failed:
                ck = pending.popleft()
                try:
                    with trio.fail_after(CHUNK_DEADLINE_S):
                        live, data = await self.fleet.while_live(node_id, lambda: one(node_id, addr, ck, failed))
                    if not live:  # the failure detector gave up on it while this chunk waited
                        raise FabricError(StatusCode.UNAVAILABLE, "the holder is now DEAD")
                    if data is None:
                        pending.appendleft(ck)
                        return
                except (FabricError, trio.TooSlowError) as exc:
                    if isinstance(exc, trio.TooSlowError):  # a holder that accepts but never answers
                        exc = FabricError(StatusCode.DEADLINE_EXCEEDED, f"no answer within {CHUNK_DEADLINE_S:g} s")
                    pending.appendleft(ck)
                    if not exc.retryable:  # its copy fails its check (DATA_LOSS) or is not there (NOT_FOUND)
                        bad.setdefault(ck, set()).add(node_id)
                    if not failed.get(node_id):  # (False: failed, not yet reported)
                        failed[node_id] = True
                        if exc.status_code is StatusCode.DATA_LOSS:
                            metrics.ERRORS.labels(op="peer_fetch", status="DATA_LOSS").inc()
                        log.info("chunk %s of %s from %s failed: %s; it gets no further chunks",
                                 ck.short(), key.short(), node_id, exc.status_code.name)
                    return
                self.fleet.count_fetch(node_id, len(data))
                self._fetched[key] = self._fetched.get(key, 0) + len(data)
                batch.append((ck, data))
                del data
                if len(batch) >= FETCH_BATCH:
                    await flush()

        live = list(holders)
        bad: dict[ContentKey, set[str]] = {}  # chunk -> holders whose copy of it is corrupt or missing
        while pending:
            if not live:
                everyone = {node_id for node_id, _ in holders}
                lost = next((ck for ck in pending if bad.get(ck, set()) >= everyone), None)
                if lost is not None:
                    raise FabricError(StatusCode.DATA_LOSS, f"no live holder has an intact copy of chunk {lost.short()}", key=key)
                raise FabricError(StatusCode.UNAVAILABLE, f"no live holder could serve chunk {pending[0].short()}", key=key)
            failed: dict[str, bool] = {}  # holder -> its failure was reported
            async with trio.open_nursery() as nursery:
                for node_id, addr in live:
                    for _ in range(FETCH_PER_HOLDER):
                        nursery.start_soon(lane, node_id, addr, failed)
            await flush()
            live = [h for h in live if h[0] not in failed]

    async def _from_holders(self, key: ContentKey, holders: list | None = None, *,
                            capability: str | None = None, failures: list | None = None) -> tuple[Record, str] | None:
        """The verified record of ``key`` from the first of ``holders`` ``[(node_id, addr,
        digest or None)]`` (default: the live holders the index knows) that serves the digest
        to serve, or None.

        The digest to serve is the one most holders claim; a tie goes to the digest held by
        the key's home among the live members advertising ``capability``, the request's
        ``eval:NAME@VERSION`` (specs/gossip.md sections 3.4 and 6), so members agree with each
        other and with the home, which answers forwards with its own.  A ``get`` names only
        the key: when ``capability`` is None and holders disagree on a request key's digest,
        it is read from the first record a holder serves (evaluator and version), and that
        record is kept only if it has the digest chosen then.  ``failures``, when given,
        collects each holder's error (see :meth:`_fetch_record`).
        """
        if holders is None:
            holders = self.fleet.live_holders(key)
        if not holders:
            return None
        if len({d for _, _, d in holders}) > 1:
            metrics.DETERMINISM_VIOLATIONS.inc()
            log.warning("holders of %s disagree on its digest; serving the majority's", key.short())
        first = None
        if capability is None and key.kind == "request" and len({d for _, d in self.fleet.gossip.holders(key)}) > 1:
            first = await self._fetch_record(key, holders, None, failures)  # any holder's record names the evaluator
            if first is None:
                return None
            capability = evaluator_capability(first[0].evaluator, first[0].version)
        preferred = self.fleet.gossip.preferred_digest(key, capability)
        if first is not None and first[0].digest == preferred:
            return first
        return await self._fetch_record(key, holders, preferred, failures)

    async def _fetch_record(self, key: ContentKey, holders: list, preferred: bytes | None,
                            failures: list | None = None) -> tuple[Record, str] | None:
        """The verified record of ``key`` from the first of ``holders`` announcing ``preferred``
        (None: any digest; a holder found by asking, digest None, is verified against the key
        alone), skipping one that fails (its error appended to ``failures`` when given) or
        turns DEAD meanwhile; None when none serves it."""
        for node_id, addr, digest in holders:
            if preferred is not None and digest is not None and digest != preferred:
                continue
            try:
                live, got = await self.fleet.while_live(node_id, lambda: self.fleet.pool.record(addr, "fetch", {"key": key}))
                if not live:
                    log.info("fetch of %s from %s: the holder is now DEAD; trying the next holder", key.short(), node_id)
                    continue
                reply, raw = got
                rec = verify_record(raw, key, digest if digest is not None else preferred)
            except FabricError as exc:
                if exc.status_code is StatusCode.DATA_LOSS:
                    metrics.ERRORS.labels(op="peer_fetch", status="DATA_LOSS").inc()
                log.info("fetch of %s from %s failed: %s; trying the next holder", key.short(), node_id, exc.status_code.name)
                if failures is not None:
                    failures.append(exc)
                continue
            self.fleet.count_fetch(node_id, len(raw))
            return rec, node_id
        return None

    async def _forward(self, home_id: str, addr: str, req: Any) -> tuple[Record, str, str] | None:
        """The home's verified reply to ``req``, or None when the next home in order must take
        over: the home refused the connection, or this node's failure detector holds it DEAD
        (before or while the forward waits; see :meth:`Fleet.while_live`)."""
        body = {"evaluator": req.evaluator, "version": req.version, "args": req.args, "home": True}
        try:
            live, got = await self.fleet.while_live(home_id, lambda: self.fleet.pool.record(addr, "realize", body))
        except FabricError as exc:
            if exc.status_code is StatusCode.UNAVAILABLE:  # down or gone: the next in order takes over
                log.info("home %s unreachable for %s: trying the next in rendezvous order", addr, req.key.short())
                return None
            raise  # a slow home is not a dead one: never compute twice because of a timeout
        if not live:  # the detector gave up on it (suspicion ran out unrefuted): the next in order takes over
            log.info("home %s of %s is now DEAD: trying the next in rendezvous order", home_id, req.key.short())
            return None
        reply, raw = got
        rec = verify_record(raw, req.key)
        self.fleet.count_fetch(home_id, len(raw))
        source = reply.get("source") if reply.get("source") in ("local", "peer", "computed") else "peer"
        # from here the reply came over the wire: "local" at the home is "peer" for us
        return rec, ("computed" if source == "computed" else "peer"), str(reply.get("holder", ""))

    async def _record_and_answer(self, call: "ServerCall", rec: Record, source: str, holder: str) -> dict:
        await self.fab.cassette.aput_record(rec)
        await self.fleet.announce_recorded()
        metrics.count_answer(source)
        return await answer_held(call, self.fab.cassette, rec.key, {"key": rec.key, "source": source, "holder": holder})

    def holders(self, key: ContentKey) -> list[str]:
        """Every node the index says holds ``key`` (this node included when it does)."""
        ids = [n for n, _ in self.fleet.gossip.holders(key)]
        if self.fab.cassette.contains(key) and self.fab.node_id not in ids:
            ids.insert(0, self.fab.node_id)
        return ids

