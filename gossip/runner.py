"""A thin trio runner for one :class:`~gossip.node.GossipNode`, and an in-memory transport.

The runner owns no protocol logic: it turns inbound bytes into
``node.receive(...)``, the passage of time into ``node.tick(...)``, and every
``(addr, message)`` the node returns into ``await transport.send(addr, bytes)``.

Transport contract (:class:`Transport`), deliberately minimal so the fabric's TCP
transport can implement it:

* ``async send(peer_addr: str, payload: bytes) -> None`` delivers one encoded
  message to ``peer_addr`` *at most once*, or gives up: it may drop the payload,
  and it may raise ``OSError`` or ``FabricError``; the runner logs, counts and
  carries on (gossip tolerates loss by design).  A peer whose sends keep failing
  (:data:`FAIL_WARN_AFTER` in a row) is logged at WARNING, at most once per
  :data:`FAIL_WARN_EVERY_S` while it goes on, and at INFO when it recovers.  It should not block for long;
  the runner bounds each send by ``send_timeout`` seconds with a cancel scope.
* inbound payloads are handed to ``await runner.deliver(src_addr, payload)`` by
  whoever receives them (the transport's own tasks).  ``src_addr`` must be the
  address the peer can be reached at (gossip replies go there).

Structured concurrency only: :meth:`GossipRunner.run` is one task that the
caller starts in its nursery (``await nursery.start(runner.run)``); the
per-destination sender tasks it needs are children of its own nursery, so
cancelling the caller's scope stops everything and nothing outlives ``run``.
"""

from __future__ import annotations

import logging
import math
from typing import Iterable, Protocol

import trio

from cassette.errors import FabricError, StatusCode
from cassette.keys import ContentKey
from gossip.holding import HeldContent
from gossip.messages import decode_message, encode_message
from gossip.node import GossipNode

__all__ = ["Transport", "GossipRunner", "MemoryNetwork", "MemoryTransport"]

log = logging.getLogger("evalfabric.gossip")

_MIN_SLEEP = 0.001
#: Consecutive failed sends to one peer after which the runner logs it at WARNING.
FAIL_WARN_AFTER = 3
#: While sends to a peer keep failing, the WARNING is repeated at most this often (seconds).
FAIL_WARN_EVERY_S = 300.0
#: Most peers whose failing sends the runner tracks at once (the oldest is forgotten first).
_MAX_TRACKED_FAILING = 1024


def _why(exc: BaseException) -> str:
    """Why a send failed, in one short line: the error's kind and text, never the payload."""
    if isinstance(exc, FabricError):
        text = f"{exc.status_code.name}: {exc.message}"
    elif isinstance(exc, OSError):
        text = f"{type(exc).__name__}: {exc.strerror or exc}"
    else:
        text = f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())[:200]


class Transport(Protocol):
    """What the runner needs from a network: fire-and-forget sends of one payload."""

    async def send(self, peer_addr: str, payload: bytes) -> None:
        """Deliver ``payload`` to ``peer_addr`` at most once (may drop; may raise OSError/FabricError)."""
        ...


class GossipRunner:
    """Drives one :class:`GossipNode` under trio.

    ``GossipRunner(node, transport, *, max_sleep=None, send_timeout=5.0,
    queue_size=256, idle_timeout=60.0)``.  Time is ``trio.current_time()`` (so
    ``trio.testing.MockClock`` makes tests instant).  The tick loop sleeps until
    the node's next deadline, at most ``max_sleep`` (default: a quarter of the
    gossip interval), and wakes early when new facts are waiting to be pushed.

    While :meth:`run` runs, outgoing messages never block the machine: each is
    queued for its destination (at most ``queue_size`` per peer; a full queue
    drops, as a lossy network would) and one sender task per destination, a
    child of :meth:`run`'s nursery that retires after ``idle_timeout`` seconds
    without traffic, awaits the transport.  A slow or dead peer therefore
    delays nobody else's pings and acks.  Outside :meth:`run` (and for
    :meth:`leave`) messages are sent inline.
    """

    def __init__(
        self,
        node: GossipNode,
        transport: Transport,
        *,
        max_sleep: float | None = None,
        send_timeout: float = 5.0,
        queue_size: int = 256,
        idle_timeout: float = 60.0,
    ) -> None:
        self.node = node
        self.transport = transport
        self.max_sleep = max_sleep if max_sleep is not None else node.config.interval / 4
        self.send_timeout = send_timeout
        self.queue_size = queue_size
        self.idle_timeout = idle_timeout
        #: Inbound payloads dropped because they did not decode (a peer's garbage).
        self.malformed = 0
        #: Outbound sends that failed or timed out.
        self.send_failures = 0
        #: Outbound messages dropped because their peer's queue was full.
        self.dropped_outbound = 0
        #: Bytes sent / received (payload bytes, for ``fabric_gossip_bytes``).
        self.bytes_sent = 0
        self.bytes_received = 0
        self._wake = trio.Event()
        self._running = False
        self._nursery: trio.Nursery | None = None
        self._outbox: dict[str, trio.MemorySendChannel] = {}
        #: per peer address whose last send failed: [failures in a row, when last warned or None]
        self._failing: dict[str, list] = {}

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Tick the node and send its messages until cancelled; ``task_status.started()`` at once."""
        if self._running:
            raise FabricError(StatusCode.FAILED_PRECONDITION, "gossip runner: already running")
        self._running = True
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await self._tick_loop()
        finally:
            self._nursery = None
            self._outbox.clear()
            self._running = False

    async def _tick_loop(self) -> None:
        while True:
            await self._send_all(self.node.tick(trio.current_time()))
            deadline = self.node.next_deadline()
            if deadline == -math.inf:  # pushes queued while we were sending
                await trio.lowlevel.checkpoint()
                continue
            # never spin: even a deadline already due waits a millisecond
            delay = min(self.max_sleep, max(_MIN_SLEEP, deadline - trio.current_time()))
            with trio.move_on_after(delay):
                await self._wake.wait()
            self._wake = trio.Event()

    async def deliver(self, src_addr: str, payload: bytes) -> None:
        """Handle one inbound payload from ``src_addr`` and send (queue) the node's replies.

        A payload that does not decode is logged (sender and reason, never the
        bytes) and dropped; it never raises.
        """
        self.bytes_received += len(payload)
        try:
            msg = decode_message(payload)
        except FabricError as e:
            self.malformed += 1
            log.warning("gossip: dropped malformed message from %s: %s", src_addr, e.message)
            return
        try:
            out = self.node.receive(src_addr, msg, trio.current_time())
        except FabricError as e:
            self.malformed += 1
            log.warning("gossip: rejected message from %s: %s", src_addr, e.message)
            return
        await self._send_all(out)
        if self.node.next_deadline() == -math.inf:
            self._wake.set()

    async def add_local(self, key: ContentKey, digest: bytes, *, seq: int | None = None, announce: bool = True) -> HeldContent:
        """Record a local fact (see ``GossipNode.add_local``) and wake the tick loop to push it."""
        fact = self.node.add_local(key, digest, seq=seq, announce=announce)
        self.facts_added()
        await trio.lowlevel.checkpoint()
        return fact

    def facts_added(self) -> None:
        """Wake the tick loop to push facts added with the node's own ``add_local`` (a caller
        that adds several in one go, with nothing in between)."""
        self._wake.set()

    async def join(self, seed_addrs: Iterable[str]) -> None:
        """Exchange full membership with each seed address."""
        await self._send_all(self.node.join(list(seed_addrs), trio.current_time()))

    async def leave(self) -> None:
        """Announce a graceful leave to a few peers, inline (call before cancelling :meth:`run`)."""
        for addr, msg in self.node.leave(trio.current_time()):
            await self._send_one(addr, encode_message(msg))

    async def _send_all(self, out: list) -> None:
        nursery = self._nursery
        for addr, msg in out:
            payload = encode_message(msg)
            if nursery is None:
                await self._send_one(addr, payload)
                continue
            ch = self._outbox.get(addr)
            if ch is None:
                ch, receive = trio.open_memory_channel(self.queue_size)
                self._outbox[addr] = ch
                nursery.start_soon(self._sender, addr, receive)
            try:
                ch.send_nowait(payload)
            except trio.WouldBlock:
                self.dropped_outbound += 1
        await trio.lowlevel.checkpoint()

    async def _sender(self, addr: str, receive: trio.MemoryReceiveChannel) -> None:
        """Send ``addr``'s queue in order; retire after ``idle_timeout`` without traffic."""
        while True:
            payload = None
            with trio.move_on_after(self.idle_timeout):
                payload = await receive.receive()
            if payload is not None:
                await self._send_one(addr, payload)
                continue
            # idle: unregister first, so new traffic starts a fresh sender, then drain
            if self._outbox.get(addr) is not None:
                del self._outbox[addr]
            while True:
                try:
                    payload = receive.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    return
                await self._send_one(addr, payload)

    async def _send_one(self, addr: str, payload: bytes) -> None:
        try:
            with trio.move_on_after(self.send_timeout) as scope:
                await self.transport.send(addr, payload)
            if scope.cancelled_caught:
                raise TimeoutError(f"send took more than {self.send_timeout}s")
            self.bytes_sent += len(payload)
        except (OSError, FabricError, TimeoutError) as e:
            self.send_failures += 1
            log.debug("gossip: send to %r failed: %s", addr, _why(e))
            self._note_failure(addr, e)
            return
        if self._failing:
            self._note_success(addr)

    def _note_failure(self, addr: str, exc: BaseException) -> None:
        """Count a failed send to ``addr``; once :data:`FAIL_WARN_AFTER` have failed in a row,
        log one WARNING line (the address, the count, the last reason), repeated at most
        every :data:`FAIL_WARN_EVERY_S` while the failures go on."""
        st = self._failing.get(addr)
        if st is None:
            if len(self._failing) >= _MAX_TRACKED_FAILING:
                del self._failing[next(iter(self._failing))]
            st = self._failing[addr] = [0, None]
        st[0] += 1
        now = trio.current_time()
        if st[0] >= FAIL_WARN_AFTER and (st[1] is None or now - st[1] >= FAIL_WARN_EVERY_S):
            st[1] = now
            log.warning("gossip: sends to %r keep failing (%d in a row; last: %s)", addr, st[0], _why(exc))

    def _note_success(self, addr: str) -> None:
        """A send to ``addr`` went through: forget its failures, saying so at INFO if they were warned of."""
        st = self._failing.pop(addr, None)
        if st is not None and st[1] is not None:
            log.info("gossip: sends to %r work again after %d failure(s) in a row", addr, st[0])


class MemoryNetwork:
    """An in-process network of :class:`MemoryTransport` endpoints (tests, demos).

    ``attach(addr)`` makes an endpoint; ``await nursery.start(network.serve, addr,
    runner)`` pumps the endpoint's inbox into ``runner.deliver``.  ``block(a, b)``
    / ``unblock(a, b)`` cut and restore the link both ways; ``down(addr)`` drops
    everything to and from ``addr``.  Inboxes are bounded: a full inbox drops.
    """

    def __init__(self, inbox_size: int = 1024) -> None:
        self.inbox_size = inbox_size
        self._inboxes: dict[str, tuple[trio.MemorySendChannel, trio.MemoryReceiveChannel]] = {}
        self._blocked: set[frozenset] = set()
        self._down: set[str] = set()
        #: Payloads dropped (blocked link, down endpoint, unknown address, full inbox).
        self.dropped = 0

    def attach(self, addr: str) -> "MemoryTransport":
        """Create (or return) the endpoint for ``addr``."""
        if addr not in self._inboxes:
            self._inboxes[addr] = trio.open_memory_channel(self.inbox_size)
        return MemoryTransport(self, addr)

    def block(self, a: str, b: str) -> None:
        """Drop traffic between ``a`` and ``b`` both ways."""
        self._blocked.add(frozenset((a, b)))

    def unblock(self, a: str, b: str) -> None:
        """Restore traffic between ``a`` and ``b``."""
        self._blocked.discard(frozenset((a, b)))

    def down(self, addr: str) -> None:
        """Drop everything to and from ``addr``."""
        self._down.add(addr)

    def up(self, addr: str) -> None:
        """Undo :meth:`down`."""
        self._down.discard(addr)

    def _send(self, src: str, dst: str, payload: bytes) -> None:
        if src in self._down or dst in self._down or frozenset((src, dst)) in self._blocked or dst not in self._inboxes:
            self.dropped += 1
            return
        try:
            self._inboxes[dst][0].send_nowait((src, bytes(payload)))
        except trio.WouldBlock:
            self.dropped += 1

    async def serve(self, addr: str, runner: GossipRunner, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Deliver ``addr``'s inbox to ``runner`` until cancelled."""
        if addr not in self._inboxes:
            self.attach(addr)
        receive = self._inboxes[addr][1]
        task_status.started()
        async for src, payload in receive:
            if addr in self._down:
                self.dropped += 1
                continue
            await runner.deliver(src, payload)


class MemoryTransport:
    """One endpoint of a :class:`MemoryNetwork`; implements :class:`Transport`."""

    def __init__(self, network: MemoryNetwork, addr: str) -> None:
        self.network = network
        self.addr = addr

    async def send(self, peer_addr: str, payload: bytes) -> None:
        """Queue ``payload`` for ``peer_addr`` (dropped if the link is cut or its inbox is full)."""
        self.network._send(self.addr, peer_addr, payload)
        await trio.lowlevel.checkpoint()
