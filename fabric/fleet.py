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
   over members advertising the evaluator (``eval:NAME@VERSION``) that can be
   reached: if that is this node it computes (single-flight), else the request
   is forwarded to the home (marked ``home``, so the home never forwards again)
   and the verified reply recorded.  A member that refuses the connection is
   skipped for the next in order, so a dead node is never used as home;
4. record locally and announce, so this node becomes a holder.

An artifact a member lacks (:meth:`ContentAddressedFabric.obtain`) comes in
two steps: its manifest record from one live holder (verified against the
digest it announced), then the chunks still missing here, striped over every
live holder announcing that digest (a shared queue, at most
``FETCH_PER_HOLDER`` chunks in flight per holder, so a faster holder serves
more).  Every chunk is verified against its blob key before it is stored, in
batches of ``FETCH_BATCH``; a holder that fails once gets no further chunks
and its unfinished ones go to the others.  The manifest is recorded only once
every chunk it names is held here.

Two holders claiming different digests for one key is a determinism
violation: it is logged and counted (``fabric_determinism_violations_total``)
and the digest served is the one most holders claim (ties: the home's).
"""

from __future__ import annotations

import collections
import logging
import math
import time
from typing import TYPE_CHECKING, Any

import trio

from cassette.errors import FabricError, StatusCode
from cassette.keys import ContentKey
from cassette.record import Record
from fabric import metrics
from fabric.net import WireClient, open_connection
from fabric.remote import parse_address
from fabric.placement import evaluator_capability
from fabric.serve import answer_held, answer_if_held, evaluator_fault, verify_record
from gossip.membership import MemberState
from gossip.node import GossipConfig, GossipNode, rendezvous_order
from gossip.runner import GossipRunner

if TYPE_CHECKING:
    from fabric.local import Fabric
    from fabric.net import ServerCall

__all__ = ["PeerPool", "WireTransport", "Fleet", "ContentAddressedFabric"]

log = logging.getLogger("fabric.fleet")

INBOX = 1024
#: Chunks of one artifact in flight per holder while a member fetches it.
FETCH_PER_HOLDER = 4
#: Verified chunks stored per ``aput_blobs`` during a fetch (what a fetch holds in memory stays small).
FETCH_BATCH = 4
#: Seconds one chunk may take from one holder before that holder counts as failed for this fetch.
CHUNK_DEADLINE_S = 15.0


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
        """The ``gossip`` op: queue the payload for the runner; drop it when the inbox is full."""
        body = call.body
        if not isinstance(body, dict) or type(body.get("msg")) is not bytes or not isinstance(body.get("from"), str):
            raise FabricError(StatusCode.INVALID_ARGUMENT, "gossip: body must be {'from': str, 'msg': bytes}")
        try:
            self._inbox_send.send_nowait((body["from"], body["msg"]))
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
        """Count ``nbytes`` verified bytes fetched from peer ``node_id``."""
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

        The order is the rendezvous order over every known member that
        advertises the evaluator and has not left, whatever the failure
        detector currently thinks of it: two nodes whose detectors disagree
        for a moment (a loaded machine) still agree on the order, so they
        agree on the home.  A member that is really down refuses the
        connection and the caller moves on to the next in order.
        """
        cap = evaluator_capability(evaluator, version)
        members = {m.node_id: m for m in self.gossip.membership.members() if cap in m.capabilities and m.state is not MemberState.LEFT}
        order = rendezvous_order(key, list(members))
        return [(n, self.addr if n == self.fab.node_id else members[n].addr) for n in order]

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
            "gossip_dropped": self.dropped,
            "gossip_bytes_sent": self.runner.bytes_sent,
            "peer_fetch_bytes_by_node": dict(self.fetched_bytes),
        }

    async def aclose(self) -> None:
        """Leave gracefully and close peer connections."""
        with trio.move_on_after(2):
            await self.runner.leave()
        await self.pool.aclose()


class ContentAddressedFabric:
    """The fleet lookup of a node (see the module docstring)."""

    def __init__(self, fab: "Fabric", fleet: Fleet) -> None:
        self.fab = fab
        self.fleet = fleet
        self._obtaining: dict[ContentKey, trio.Event] = {}  # single-flight of obtain, per key
        self._fetched: dict[ContentKey, int] = {}  # verified chunk bytes fetched so far, per artifact being obtained

    async def realize(self, call: "ServerCall", req: Any, *, at_home: bool, begin, end) -> dict:
        """Answer a realize for ``req`` (version resolved) as the module docstring says."""
        key = req.key
        hit = await answer_if_held(call, self.fab, key)
        if hit is not None:
            return hit
        begin()
        try:
            got = await self._from_holders(key)
            if got is not None:
                rec, holder = got
                return await self._record_and_answer(call, rec, "peer", holder)
            if not at_home:
                for home_id, home_addr in self.fleet.home_order(key, req.evaluator, req.version):
                    if home_id == self.fab.node_id:
                        break  # this node is the first reachable home: compute here
                    forwarded = await self._forward(home_addr, req)
                    if forwarded is not None:
                        rec, source, holder = forwarded
                        return await self._record_and_answer(call, rec, source, holder)
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

    async def obtain(self, key: ContentKey) -> str | None:
        """Make this node hold ``key`` (a reply or an artifact with all its chunks) by fetching
        it from live holders, every byte verified before it is stored; records and announces
        it.  Returns the holder the record came from, or None when no holder could serve it.
        An artifact's missing chunks come from every live holder at once (:meth:`_fetch_chunks`).
        Concurrent calls for one key share one fetch."""
        while True:
            if self.fab.cassette.contains(key):
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
        got = await self._from_holders(key)
        if got is None:
            return None
        rec, holder = got
        if key.kind == "artifact":
            from cassette import codec

            manifest = codec.decode(rec.payload)
            missing = list(dict.fromkeys(self.fab.cassette.missing(manifest["chunks"], verify_blobs=True)))
            if missing:
                holders = [(node_id, addr) for node_id, addr, digest in self.fleet.live_holders(key) if digest == rec.digest]
                await self._fetch_chunks(key, missing, holders)
        # the manifest (or reply) is recorded only once every chunk it names is held here
        await self.fab.cassette.aput_record(rec)
        await self.fleet.announce_recorded()
        return holder

    async def _fetch_chunks(self, key: ContentKey, chunks: list[ContentKey], holders: list[tuple[str, str]]) -> None:
        """Store ``chunks`` (blob keys of artifact ``key``) fetched from ``holders`` ``[(node_id, addr)]``.

        ``FETCH_PER_HOLDER`` lanes per holder take chunks from one shared queue;
        ``pool.blob`` verifies each against its key (DATA_LOSS otherwise) and
        verified chunks are stored every ``FETCH_BATCH``.  A holder whose fetch
        fails is done: the chunk goes back to the front of the queue for the
        others.  A round ends when every lane has stopped; chunks a failed holder
        handed back after the others had stopped start another round with the
        holders left.  UNAVAILABLE when no holder is left for a chunk.
        """
        pending = collections.deque(chunks)
        batch: list[tuple[ContentKey, bytes]] = []
        pool = self.fleet.pool

        async def flush() -> None:
            if batch:
                items = batch[:]
                batch.clear()
                await self.fab.cassette.aput_blobs(items, verified=True)  # pool.blob checked each

        async def lane(node_id: str, addr: str, failed: set[str]) -> None:
            while pending and node_id not in failed:
                ck = pending.popleft()
                try:
                    with trio.fail_after(CHUNK_DEADLINE_S):
                        data = await pool.blob(addr, ck)
                except (FabricError, trio.TooSlowError) as exc:
                    if isinstance(exc, trio.TooSlowError):  # a holder that accepts but never answers
                        exc = FabricError(StatusCode.DEADLINE_EXCEEDED, f"no answer within {CHUNK_DEADLINE_S:g} s")
                    pending.appendleft(ck)
                    if node_id not in failed:
                        failed.add(node_id)
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
        while pending:
            if not live:
                raise FabricError(StatusCode.UNAVAILABLE, f"no live holder could serve chunk {pending[0].short()}", key=key)
            failed: set[str] = set()
            async with trio.open_nursery() as nursery:
                for node_id, addr in live:
                    for _ in range(FETCH_PER_HOLDER):
                        nursery.start_soon(lane, node_id, addr, failed)
            await flush()
            live = [h for h in live if h[0] not in failed]

    async def _from_holders(self, key: ContentKey) -> tuple[Record, str] | None:
        holders = self.fleet.live_holders(key)
        if not holders:
            return None
        preferred = self.fleet.gossip.preferred_digest(key)
        if len({d for _, _, d in holders}) > 1:
            metrics.DETERMINISM_VIOLATIONS.inc()
            log.warning("holders of %s disagree on its digest; serving the majority's", key.short())
        for node_id, addr, digest in holders:
            if preferred is not None and digest != preferred:
                continue
            try:
                reply, raw = await self.fleet.pool.record(addr, "fetch", {"key": key})
                rec = verify_record(raw, key, digest)
            except FabricError as exc:
                if exc.status_code is StatusCode.DATA_LOSS:
                    metrics.ERRORS.labels(op="peer_fetch", status="DATA_LOSS").inc()
                log.info("fetch of %s from %s failed: %s; trying the next holder", key.short(), node_id, exc.status_code.name)
                continue
            self.fleet.count_fetch(node_id, len(raw))
            return rec, node_id
        return None

    async def _forward(self, addr: str, req: Any) -> tuple[Record, str, str] | None:
        body = {"evaluator": req.evaluator, "version": req.version, "args": req.args, "home": True}
        try:
            reply, raw = await self.fleet.pool.record(addr, "realize", body)
        except FabricError as exc:
            if exc.status_code is StatusCode.UNAVAILABLE:  # down or gone: the next in order takes over
                log.info("home %s unreachable for %s: trying the next in rendezvous order", addr, req.key.short())
                return None
            raise  # a slow home is not a dead one: never compute twice because of a timeout
        rec = verify_record(raw, req.key)
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

