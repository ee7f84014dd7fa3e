"""The thin trio adapter that drives :class:`fabric.wire.WireConnection` over TCP.

Two entry points:

* :func:`serve` listens, runs one task per connection inside a nursery, and
  calls an async ``handler(call)`` per request in its own task (so requests on
  one connection run concurrently).  A handler returns the reply, raises
  ``FabricError`` for a ``fault``, may stream with ``call.send`` and read an
  upload with ``async for item in call``.  A client's ``cancel`` cancels the
  handler's task; a request's ``timeout`` becomes a cancel scope deadline.
* :func:`open_connection` dials, completes the handshake and returns a
  :class:`WireClient` that pipelines many concurrent requests on one
  connection.  It has no background task: whichever request task is waiting
  reads the socket and hands each event to its request (leader/follower), so
  it needs no nursery.  Cancelling a request's task sends ``cancel``; the
  caller's effective trio deadline travels as the request's ``timeout``.

Every connection-level failure of an established client connection reaches
the waiting requests as ``FabricError(UNAVAILABLE, retryable=True)`` (a
RESOURCE_EXHAUSTED fault from the server stays RESOURCE_EXHAUSTED).  Logging
uses the ``fabric.net`` logger, one line per closed or refused connection; it
names peers, request ids and op names, never payloads or secrets.

Runner convention (``specs/wire.md``, "Server runner"): right after its
``auth`` frame a server sends either a connection-level ``metadata`` frame
``{"welcome": {...}}`` (accepted) or a connection ``fault`` (refused, e.g. at
``max_connections``); :func:`open_connection` waits for one of the two.
"""

from __future__ import annotations

import logging
import math
import os
from collections import deque
from typing import Any, Awaitable, Callable, Iterator, Mapping, NamedTuple, Sequence

import trio

from cassette.errors import FabricError, StatusCode
from fabric.wire import (
    NEED_DATA,
    AdvertisedLimits,
    Authenticated,
    Cancel,
    Closed,
    ConnectionState,
    Credit,
    EndOfStream,
    Fault,
    Metadata,
    Request,
    Response,
    Stats,
    StreamData,
    StreamFrameLimits,
    WireConnection,
)

__all__ = [
    "Listening",
    "ServerCall",
    "WireClient",
    "ClientCall",
    "Handler",
    "FastHandler",
    "DEFER",
    "serve",
    "listen",
    "bind_error",
    "open_connection",
    "READ_BYTES",
    "UPLOAD_WINDOW",
    "MAX_CALL_METADATA",
    "DEFAULT_CREDIT",
    "MANY_FLUSH_EVERY",
    "REUSE_CHECK_AFTER_S",
]

log = logging.getLogger("fabric.net")

#: Most bytes read from a socket at once.
READ_BYTES = 256 * 1024
#: A node writes its inline replies every this many, so a pipelining client starts on them sooner.
INLINE_FLUSH_EVERY = 4
#: Push credits a server handler keeps outstanding while it reads an upload.
UPLOAD_WINDOW = 8
#: ``metadata`` frames a server keeps per request (:attr:`ServerCall.metadata`); one more fails the
#: request RESOURCE_EXHAUSTED.  Metadata is not flow-controlled, so without a bound a client could
#: make the server hold up to ``max_bytes_per_stream`` (1 GiB) of decoded bodies per request.
MAX_CALL_METADATA = 8
#: Push credits a client grants a download stream at open (then one per item consumed).
DEFAULT_CREDIT = 8
#: Requests :meth:`WireClient.call_many` queues per write (so the server starts on them while more are encoded).
MANY_FLUSH_EVERY = 8
#: A connection quiet this long (seconds) is checked for the peer's goodbye before it is reused
#: (:meth:`WireClient.reusable`): a node closes connections idle past its ``idle_timeout_s``.
REUSE_CHECK_AFTER_S = 1.0
#: Once a server stops serving a connection (shutdown), its pending writes (replies, the goodbye)
#: get at most this long: a client that does not read can no longer hold the node's exit.
TEARDOWN_WRITE_S = 1.0
#: A server stops answering, and its handlers stop queueing, while more than this many bytes wait
#: to be written on one connection (:meth:`_Link.room`): a client that sends many small requests
#: for large replies and does not read them otherwise had every reply (256 x 1-2 MiB) held queued.
MAX_QUEUED_BYTES = 8 << 20

_NET_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
#: Most buffers one ``writev`` takes (POSIX guarantees 16; Linux takes 1024).
_IOV_MAX = min(os.sysconf("SC_IOV_MAX"), 1024) if "SC_IOV_MAX" in getattr(os, "sysconf_names", {}) else 16
#: Queued frames shorter than this are joined before a blocking write; longer ones go out as they are.
_JOIN_BELOW = 64 * 1024


class Listening(NamedTuple):
    """Where :func:`serve` listens (passed to ``task_status.started``)."""

    host: str
    port: int


class _Signal:
    """A level-free wakeup: ``fire()`` wakes every current ``wait()``er."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def fire(self) -> None:
        self._event.set()
        self._event = trio.Event()

    async def wait(self) -> None:
        await self._event.wait()


class _Link:
    """A TCP stream plus its WireConnection, with ordered, cancel-safe writes.

    ``queue(event)`` is synchronous, so frames enter the queue in sequence
    order; ``flush()`` first writes without yielding (:meth:`write_now`: one
    ``write``/``writev`` on the non-blocking socket, the common case on an idle
    link), and writes any rest under a lock inside a shielded, time-bounded
    scope, so a cancelled caller never leaves a half-written frame (which the
    peer would read as an altered one).  Frames are queued as the objects the
    connection returned and written from there: a chunk is not copied again.
    """

    def __init__(self, stream: trio.SocketStream, conn: WireConnection, write_timeout: float) -> None:
        self.stream = stream
        self.conn = conn
        self.broken: str | None = None
        self.write_failed = False  # broken by a failed write (the peer closed or reset), not a stall
        self._pending: list = []  # frames (bytes, or a view of the unwritten end of one), in order
        self.queued_bytes = 0  # bytes in _pending
        self._lock = trio.Lock()
        self._write_timeout = write_timeout
        self._write_scope: trio.CancelScope | None = None  # bounds the blocking write in progress
        self._fd = stream.socket.fileno()

    def queue(self, event: Any) -> None:
        frame = self.conn.send(event, now=trio.current_time())
        self._pending.append(frame)
        self.queued_bytes += len(frame)

    def write_now(self) -> bool:
        """Write what is queued without yielding, as far as the socket takes it.

        True when nothing is left to write (all written, or the link is
        broken); False when :meth:`flush` must wait for the socket or for a
        write already in progress.  The socket is non-blocking (trio's), so a
        full send buffer is a short write, never a stall; bytes stay in order
        because this writes only while no :meth:`flush` holds the lock.
        """
        out = self.conn.data_to_send()
        pending = self._pending
        if out:
            pending.append(out)
            self.queued_bytes += len(out)
        if not pending:
            return True
        if self.broken is not None or self._fd < 0:
            pending.clear()
            self.queued_bytes = 0
            return True
        if self._lock.locked():
            return False
        try:
            n = os.write(self._fd, pending[0]) if len(pending) == 1 else os.writev(self._fd, pending[:_IOV_MAX])
        except BlockingIOError:
            return False
        except OSError as exc:
            self.broken = f"write failed ({type(exc).__name__})"
            self.write_failed = True
            pending.clear()
            self.queued_bytes = 0
            return True
        self.queued_bytes -= n
        done = 0
        while done < len(pending) and n >= len(pending[done]):
            n -= len(pending[done])
            done += 1
        del pending[:done]
        if n:
            pending[0] = memoryview(pending[0])[n:]
        return not pending

    def read_now(self) -> bytes | None:
        """What the peer already sent (at most READ_BYTES) without waiting: ``None`` when
        nothing is there, ``b""`` at EOF or when the read fails (as :meth:`receive`)."""
        if self._fd < 0:
            return b""
        try:
            return os.read(self._fd, READ_BYTES)
        except BlockingIOError:
            return None
        except OSError:
            return b""

    def close_now(self) -> None:
        """Close the socket without waiting (a later :meth:`aclose` does nothing more)."""
        self._fd = -1
        self.stream.socket.close()

    def drop_after_fork(self) -> None:
        """In a forked child: close this process's copy of the socket, and nothing more (no
        shutdown, no trio: the run that owns the link is the parent's), so the parent's
        connection goes on.  The link is broken here; a later :meth:`aclose` does nothing more."""
        self._fd = -1
        self.broken = self.broken or "connection inherited across a fork"
        fd = self.stream.socket.detach()
        if fd >= 0:
            os.close(fd)

    async def receive(self) -> None:
        """Read what the peer sent (at most READ_BYTES) into the connection; a failed read is EOF."""
        try:
            data = await self.stream.receive_some(READ_BYTES)
        except _NET_ERRORS:
            data = b""
        self.conn.receive_data(data, now=trio.current_time())

    async def flush(self) -> None:
        if self.write_now():
            return
        with trio.CancelScope(shield=True):
            async with self._lock:
                if not self._pending:
                    return
                frames, self._pending = self._pending, []
                self.queued_bytes = 0
                if self.broken is not None:
                    return
                with trio.move_on_after(self._write_timeout) as scope:
                    self._write_scope = scope
                    try:
                        for data in _coalesced(frames):
                            await self.stream.send_all(data)
                    except _NET_ERRORS as exc:
                        self.broken = f"write failed ({type(exc).__name__})"
                        self.write_failed = True
                    finally:
                        self._write_scope = None
                if scope.cancelled_caught:
                    self.broken = f"write stalled for {self._write_timeout:g} s"

    async def room(self) -> None:
        """Write until at most :data:`MAX_QUEUED_BYTES` wait to be written (at once when they
        do already), so that a peer that does not read holds a bounded amount here: queue
        nothing large without it."""
        while self.queued_bytes > MAX_QUEUED_BYTES and self.broken is None:
            await self.flush()

    def hurry(self, grace: float) -> None:
        """Give the blocking write in progress, and every later one, at most ``grace`` more
        seconds (the shielded writes of :meth:`flush` otherwise wait up to the write timeout
        for a peer that does not read)."""
        self._write_timeout = min(self._write_timeout, grace)
        if self._write_scope is not None:
            self._write_scope.deadline = min(self._write_scope.deadline, trio.current_time() + grace)

    async def aclose(self) -> None:
        self._fd = -1  # never write to the number again: the OS may reuse it
        with trio.CancelScope(shield=True):
            try:
                await self.stream.aclose()
            except _NET_ERRORS:
                pass


def _coalesced(frames: list) -> Iterator[Any]:
    """``frames`` in order, runs of short ones joined into one buffer (fewer writes), long ones as they are."""
    run: list = []
    for frame in frames:
        if len(frame) < _JOIN_BELOW:
            run.append(frame)
            continue
        if run:
            yield b"".join(run)
            run = []
        yield frame
    if run:
        yield b"".join(run)


def _write_timeout(limits: StreamFrameLimits) -> float:
    return max(limits.handshake_timeout_s, limits.idle_timeout_s)


def _peer_name(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
        return f"{host}:{port}"
    except (OSError, ValueError, TypeError):
        return "?"


def _remaining_s() -> float | None:
    deadline = trio.current_effective_deadline()
    if math.isinf(deadline):
        return None
    return max(0.0, deadline - trio.current_time())


# =========================================================================== server

#: A request handler: ``async def handler(call: ServerCall) -> reply``.
Handler = Callable[["ServerCall"], Awaitable[Any]]


class _Defer:
    """The type of :data:`DEFER` (one instance)."""

    def __repr__(self) -> str:
        return "DEFER"


#: What a ``fast`` handler returns when the request needs the async handler.
DEFER = _Defer()

#: An inline handler: ``fast(op, body) -> reply`` (or :data:`DEFER`), run by the read loop itself.
FastHandler = Callable[[str, Any], Any]


class ServerCall:
    """One request as a :func:`serve` handler sees it.

    Attributes: ``req_id``, ``op`` (the op name), ``body`` (the decoded open
    body), ``upload`` (the client will push items), ``timeout_s`` (the
    client's remaining deadline, already applied as this task's cancel scope
    deadline), ``peer`` (address), ``peer_node_id``, ``peer_limits`` (what
    the client advertised), and ``metadata`` (the bodies of ``metadata``
    frames the client sent so far: at most :data:`MAX_CALL_METADATA`; one
    more fails the request RESOURCE_EXHAUSTED and cancels its handler).

    ``async for item in call`` reads the upload (granting credit as it goes;
    ends at the client's end of stream).  ``await call.send(item)`` pushes one
    item, waiting for the client's credit.  ``await call.send_metadata(body)``
    sends side information.  The handler's return value is the reply; a
    ``FabricError`` it raises becomes a ``fault`` with that status; any other
    exception becomes INTERNAL naming its type and message.
    """

    def __init__(self, conn: "_ServerConnection", req: Request) -> None:
        self._c = conn
        self.req_id: int = req.req_id
        self.op: str = req.op
        self.body: Any = req.body
        self.upload: bool = not req.end_stream
        self.timeout_s: float | None = req.timeout_s
        self.peer: str = conn.peer
        self.peer_node_id: str | None = conn.link.conn.peer_node_id
        self.metadata: list[Any] = []
        self._inbox: deque = deque()
        self._ended = not self.upload
        self._granted = False
        self._signal = _Signal()
        self._cancelled_by_peer = False
        self._refused: FabricError | None = None  # why the server ended the request itself
        deadline = math.inf if req.timeout_s is None else trio.current_time() + req.timeout_s
        self._scope = trio.CancelScope(deadline=deadline)

    def __repr__(self) -> str:
        return f"<ServerCall {self.req_id} op={self.op!r} from {self.peer}>"

    @property
    def deadline(self) -> float:
        """The trio time at which the request's deadline cancels its handler (``inf`` if none);
        a handler cancelled at or past it is answered DEADLINE_EXCEEDED."""
        return self._scope.deadline

    @property
    def peer_limits(self) -> AdvertisedLimits:
        """The limits the client advertised (what :meth:`send` must respect: frame and stream bytes)."""
        return self._c.link.conn.peer_limits  # type: ignore[return-value]

    def __aiter__(self) -> "ServerCall":
        return self

    async def __anext__(self) -> Any:
        """The next uploaded item; ``StopAsyncIteration`` at the client's end of stream."""
        if not self.upload:
            raise StopAsyncIteration
        if not self._granted:
            self._granted = True
            await self._grant(UPLOAD_WINDOW)
        while not self._inbox:
            if self._ended or not self._c.link.conn.is_live(self.req_id):
                raise StopAsyncIteration
            await self._wait_for_client("upload item")
        item = self._inbox.popleft()
        await self._grant(1)
        return item

    def _take_metadata(self, body: Any) -> None:
        """Keep a ``metadata`` body from the client, or fail the request once it sent more than
        :data:`MAX_CALL_METADATA` (the handler is cancelled; the fault says why)."""
        if len(self.metadata) >= MAX_CALL_METADATA:
            if self._refused is None:
                self._refused = FabricError(
                    StatusCode.RESOURCE_EXHAUSTED,
                    f"request {self.req_id} ({self.op}): more than {MAX_CALL_METADATA} metadata frames from the client",
                )
                self._scope.cancel()
        else:
            self.metadata.append(body)
        self._signal.fire()

    async def _grant(self, n: int) -> None:
        link = self._c.link
        if self._ended or not link.conn.is_live(self.req_id):
            return
        try:
            link.queue(Credit(self.req_id, n))
        except FabricError:
            return  # the client ended its upload (event not yet dispatched) or the connection closed
        await link.flush()

    async def send(self, data: Any) -> None:
        """Push one item to the client, waiting for its credit.

        Raises ``FabricError``: ABORTED when the request is no longer live,
        INVALID_ARGUMENT / RESOURCE_EXHAUSTED when the item cannot be encoded
        or exceeds the client's frame or stream limits.
        """
        link = self._c.link
        while True:
            if not link.conn.is_live(self.req_id):
                raise FabricError(StatusCode.ABORTED, f"request {self.req_id} is no longer live", retryable=False)
            if link.conn.send_credit(self.req_id) > 0:
                if link.queued_bytes > MAX_QUEUED_BYTES:
                    await link.room()
                    continue  # the request may have ended meanwhile
                link.queue(StreamData(self.req_id, data))
                await link.flush()
                return
            await self._wait_for_client("credit")

    async def _wait_for_client(self, what: str) -> None:
        """Wait for the client's next frame on this request, at most the connection's idle
        timeout: a request whose client neither feeds it (an upload) nor drains it (a
        download's credit) for that long is as idle as a quiet connection, and ends
        DEADLINE_EXCEEDED (else it would hold what it has read, a whole record, forever)."""
        stall_s = self._c.server.limits.idle_timeout_s
        with trio.move_on_after(stall_s) as scope:
            await self._signal.wait()
        if scope.cancelled_caught:
            raise FabricError(StatusCode.DEADLINE_EXCEEDED,
                              f"request {self.req_id} ({self.op}): the client sent no {what} for {stall_s:g} s", retryable=True)

    async def send_metadata(self, body: Any) -> None:
        """Send a ``metadata`` frame on this request (not flow-controlled)."""
        link = self._c.link
        await link.room()
        link.queue(Metadata(self.req_id, body))
        await link.flush()


class _ServerState:
    def __init__(self, secret: bytes, handler: Handler, limits: StreamFrameLimits, node_id: str,
                 stats: Callable[[], Any] | None, welcome: Mapping[str, Any] | None,
                 fast: FastHandler | None = None, accept: tuple[bytes, ...] = ()) -> None:
        self.secret = secret
        self.accept = accept
        self.handler = handler
        self.fast = fast
        self.limits = limits
        self.node_id = node_id
        self.stats = stats
        self.welcome = dict(welcome or {})
        self.live = 0  # connection tasks (handshaking or authenticated)
        self.authenticated = 0
        self.draining = False  # see serve(drain=)
        self.connections: set[_ServerConnection] = set()
        self.internal_errors = 0  # connections ended by a bug that escaped them (_run_connection)


class _ServerConnection:
    """One accepted connection: a read loop plus one task per request."""

    def __init__(self, stream: trio.SocketStream, server: _ServerState) -> None:
        self.server = server
        self.peer = _peer_name(stream)
        conn = WireConnection("server", server.secret, server.limits, node_id=server.node_id,
                              now=trio.current_time(), accept=server.accept)
        self.link = _Link(stream, conn, _write_timeout(server.limits))
        self.calls: dict[int, ServerCall] = {}
        self.counted = False
        self.refused = False
        self._answered = 0
        self.nursery: trio.Nursery | None = None
        self._reading = trio.CancelScope()  # cancelled to end the read loop once drained (serve(drain=))

    async def run(self) -> None:
        reason: FabricError | None = None
        self.server.connections.add(self)
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                nursery.start_soon(self._hurry_writes_when_cancelled)
                self.drain()
                with self._reading:
                    reason = await self._read_loop()
                nursery.cancel_scope.cancel()
        finally:
            self.server.connections.discard(self)
            if self.counted:
                self.server.authenticated -= 1
            self.server.live -= 1
            if self.link.conn.state is ConnectionState.OPEN:  # shutting down: say goodbye
                try:
                    self.link.queue(Closed(None))
                except FabricError:
                    pass
            await self.link.flush()
            await self.link.aclose()
        self._log_close(reason)

    def drain(self) -> None:
        """While the server drains: once no request of this connection is in flight, stop
        reading; the connection then ends with a goodbye, its pending writes bounded by
        :data:`TEARDOWN_WRITE_S` (a client that stopped reading must not hold the drain)."""
        if self.server.draining and not self.calls:
            self.link.hurry(TEARDOWN_WRITE_S)
            self._reading.cancel()

    async def _hurry_writes_when_cancelled(self) -> None:
        """When this connection stops being served (the server shuts down, or the read loop
        ended), bound its pending writes by :data:`TEARDOWN_WRITE_S`: they are shielded from
        cancellation, so a client that stopped reading would otherwise keep the node from
        exiting for the whole write timeout."""
        try:
            await trio.sleep_forever()
        finally:
            self.link.hurry(TEARDOWN_WRITE_S)

    def _log_close(self, reason: FabricError | None) -> None:
        if self.refused:
            return  # logged when refused
        if reason is None:
            log.info("connection from %s closed cleanly", self.peer)
        elif reason.status_code == StatusCode.DEADLINE_EXCEEDED and self.link.conn.peer_node_id is not None:
            log.info("closing idle connection from %s: %s", self.peer, reason)
        elif reason.status_code == StatusCode.UNAVAILABLE:
            log.info("connection from %s lost: %s", self.peer, reason)
        else:
            log.warning("closing connection from %s: %s", self.peer, reason)

    async def _read_loop(self) -> FabricError | None:
        conn = self.link.conn
        while True:
            # One timer per quiet spell, not per read: the scope's deadline is the
            # connection's next deadline when entered and is only ever moved earlier;
            # activity that pushes the idle deadline later is noticed when it fires.
            deadline = conn.next_deadline()
            with trio.CancelScope(deadline=math.inf if deadline is None else deadline) as scope:
                return await self._read_until_closed(scope)
            conn.check_timeouts(trio.current_time())  # the scope fired: idle, or just a stale deadline

    async def _read_until_closed(self, scope: trio.CancelScope) -> FabricError | None:
        link, conn = self.link, self.link.conn
        while True:
            ev = conn.next_event()
            if ev is NEED_DATA:
                await link.flush()
                if link.broken is not None:
                    return FabricError(StatusCode.UNAVAILABLE, link.broken, retryable=True)
                deadline = conn.next_deadline()
                if deadline is not None and deadline < scope.deadline:
                    scope.deadline = deadline
                await link.receive()
                continue
            if isinstance(ev, Closed):
                await link.flush()
                return ev.reason
            if conn.state is ConnectionState.CLOSED:
                # parsed from the same read as the frame that closed the connection (a peer's
                # violation, or our refusal): nothing can be answered on it any more
                continue
            self._dispatch(ev)
            if link.queued_bytes > MAX_QUEUED_BYTES:
                await link.room()  # answers inline wait for the client to take those queued

    def _dispatch(self, ev: Any) -> None:
        link = self.link
        if isinstance(ev, Authenticated):
            self._welcome(ev.peer_node_id)
        elif isinstance(ev, Request):
            if self.server.draining:
                self._queue_reply(ev.req_id, ev.op, Fault(ev.req_id, FabricError(
                    StatusCode.UNAVAILABLE, "the node is shutting down; ask again (it or another node)", retryable=True)))
                return
            if ev.end_stream and self.server.fast is not None and self._answer_now(ev):
                return
            call = ServerCall(self, ev)
            self.calls[ev.req_id] = call
            assert self.nursery is not None
            self.nursery.start_soon(self._run_call, call)
        elif isinstance(ev, Stats):
            self._answer_stats(ev.req_id)
        elif isinstance(ev, Metadata):
            call = self.calls.get(ev.req_id)
            if call is not None:
                call._take_metadata(ev.body)
        elif isinstance(ev, StreamData):
            call = self.calls.get(ev.req_id)
            if call is not None:
                call._inbox.append(ev.data)
                call._signal.fire()
        elif isinstance(ev, EndOfStream):
            call = self.calls.get(ev.req_id)
            if call is not None:
                call._ended = True
                call._signal.fire()
        elif isinstance(ev, Credit):
            call = self.calls.get(ev.req_id)
            if call is not None:
                call._signal.fire()
        elif isinstance(ev, Cancel):
            call = self.calls.get(ev.req_id)
            if call is not None:
                call._cancelled_by_peer = True
                call._scope.cancel()
                call._signal.fire()

    def _welcome(self, peer_node_id: str) -> None:
        """Send the welcome, or refuse the connection (``fault`` id 0) when the server is at its
        connection limit or the welcome does not fit the limits the client advertised (a
        client may advertise ``max_frame_bytes`` 1024, less than a long capability list)."""
        srv = self.server
        if srv.authenticated >= srv.limits.max_connections:
            self._refuse(peer_node_id, FabricError(
                StatusCode.RESOURCE_EXHAUSTED,
                f"server at its connection limit ({srv.limits.max_connections}); try another node or later",
            ))
            return
        try:
            self.link.queue(Metadata(0, {"welcome": srv.welcome}))
        except FabricError as exc:  # a raising send changes nothing: the refusal still goes out
            self._refuse(peer_node_id, FabricError(exc.status_code, f"cannot send this client the welcome: {exc.message}"))
            return
        srv.authenticated += 1
        self.counted = True
        log.info("authenticated %s node=%s", self.peer, peer_node_id)

    def _refuse(self, peer_node_id: str, err: FabricError) -> None:
        """Close a just-authenticated connection with ``err`` as its ``fault`` id 0 (one log line)."""
        self.refused = True
        log.warning("refused connection from %s node=%s: %s", self.peer, peer_node_id, err)
        self.link.queue(Closed(err))

    def _answer_now(self, ev: Request) -> bool:
        """Run the ``fast`` handler inline; False when it defers to the async handler.

        The reply is queued here and written by the read loop's next flush,
        together with every other reply to the frames of the same read.
        """
        rid, op = ev.req_id, ev.op
        try:
            result = self.server.fast(op, ev.body)  # type: ignore[misc]
        except FabricError as exc:
            reply: Response | Fault = Fault(rid, exc)
        except Exception as exc:  # noqa: BLE001 - the handler's bug becomes an INTERNAL fault
            reply = self._internal_fault(rid, op, exc)
        else:
            if result is DEFER:
                return False
            reply = Response(rid, result)
        self._queue_reply(rid, op, reply)
        self._answered += 1
        if self._answered % INLINE_FLUSH_EVERY == 0:
            self.link.write_now()  # let the client start on these while we answer the rest of the read
        return True

    def _internal_fault(self, rid: int, op: str, exc: Exception) -> Fault:
        log.warning("handler for op %r (request %d from %s) raised %s", op, rid, self.peer, type(exc).__name__)
        return Fault(rid, FabricError(StatusCode.INTERNAL, f"handler for {op!r} failed: {type(exc).__name__}: {exc}"))

    def _queue_reply(self, rid: int, op: str, reply: Response | Fault) -> None:
        link = self.link
        if not link.conn.is_live(rid):
            return
        try:
            link.queue(reply)
        except FabricError as exc:  # reply not encodable, or too large for the client's limits
            log.warning("reply to op %r (request %d from %s) not sendable: %s", op, rid, self.peer,
                        exc.status_code.name)
            # a fault always fits (messages are cut to fit the smallest frame limit)
            link.queue(Fault(rid, FabricError(exc.status_code, f"reply to {op!r} not sendable: {exc.message}")))

    def _answer_stats(self, req_id: int) -> None:
        srv = self.server
        try:
            node = srv.stats() if srv.stats is not None else None
            body = {
                "wire": self.link.conn.stats(),
                "server": {"connections": srv.authenticated, "requests": len(self.calls),
                           "internal_errors": srv.internal_errors},
                "node": node,
            }
            self.link.queue(Stats(req_id, body))
        except FabricError as exc:
            self.link.queue(Fault(req_id, exc))
        except Exception as exc:  # noqa: BLE001 - a stats provider's bug must not kill the connection
            log.warning("stats provider raised %s", type(exc).__name__)
            self.link.queue(Fault(req_id, FabricError(StatusCode.INTERNAL, f"stats failed: {type(exc).__name__}")))

    async def _run_call(self, call: ServerCall) -> None:
        rid, op = call.req_id, call.op
        reply: Any = None
        with call._scope:
            try:
                result = await self.server.handler(call)
            except FabricError as exc:
                reply = Fault(rid, exc)
            except Exception as exc:  # noqa: BLE001 - the handler's bug becomes an INTERNAL fault
                reply = self._internal_fault(rid, op, exc)
            else:
                reply = Response(rid, result)
        self.calls.pop(rid, None)
        if call._cancelled_by_peer:
            return  # the client cancelled; it expects nothing more
        if call._refused is not None:
            reply = Fault(rid, call._refused)
        if reply is None:  # our deadline scope fired
            reply = Fault(rid, FabricError(
                StatusCode.DEADLINE_EXCEEDED, f"request {rid} ({op}) ran past its {call.timeout_s:g} s deadline"
            ))
        await self.link.room()
        self._queue_reply(rid, op, reply)
        await self.link.flush()
        self.drain()


async def serve(
    host: str,
    port: int,
    secret: bytes,
    handler: Handler,
    limits: StreamFrameLimits | None = None,
    *,
    node_id: str = "",
    stats: Callable[[], Any] | None = None,
    welcome: Mapping[str, Any] | None = None,
    fast: FastHandler | None = None,
    accept: Sequence[bytes] = (),
    drain: trio.Event | None = None,
    listeners: Sequence[trio.SocketListener] | None = None,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on ``host:port`` and serve wire connections until cancelled (or drained).

    ``task_status.started(Listening(host, port))`` reports the bound address
    (``port=0`` picks a free one), so ``await nursery.start(serve, ...)``
    returns it.  Each connection gets its own task; each request its own task
    running ``await handler(call)`` (see :class:`ServerCall`).  ``stats`` (a
    sync callable) supplies the ``node`` part of ``stats`` answers;
    ``welcome`` is the map sent in the welcome frame (for example
    capabilities).

    ``fast`` (optional), a sync ``fast(op, body) -> reply``, is tried first
    for every request without an upload, inside the connection's read loop:
    no task, no cancel scope, and the replies to all frames of one read leave
    in one write.  It returns the reply (or raises ``FabricError`` for a
    fault, as a handler does), or :data:`DEFER` to hand the request to
    ``handler`` as usual.  It must not block: answer from memory or a local
    read, defer anything that waits.

    ``accept``: further secrets a client may prove instead of ``secret``
    (:class:`~fabric.wire.WireConnection`'s ``accept``).

    ``drain``: once this event is set, the server stops accepting connections,
    answers every new request UNAVAILABLE (retryable: "the node is shutting
    down"), lets the requests in flight finish and send their replies, closes
    each connection with a goodbye once it has none left, and returns when all
    are closed.  Cancel it to stop without waiting.

    Limits: beyond ``limits.max_connections`` authenticated connections a new
    one is refused with a RESOURCE_EXHAUSTED fault right after its handshake
    (so only peers that know the secret learn why); beyond twice that many
    connection tasks a new socket is closed at once, unread.  A connection that
    fails the handshake, breaks the protocol, exceeds a limit or idles past
    ``idle_timeout_s`` is closed with one log line, and only that connection.
    An address that cannot be bound is a ``FabricError`` naming it (:func:`bind_error`).
    ``listeners``: sockets already bound by :func:`listen` (a node binds before it creates
    anything on disk), served instead of binding ``host:port`` here; they close when
    serving stops (closing them again is harmless, as the caller must if ``serve``
    fails before it serves).
    """
    if limits is None:
        limits = StreamFrameLimits()
    # validate arguments once, up front (a bad secret or node id fails here, not per connection)
    accept = tuple(bytes(a) for a in accept)
    WireConnection("server", secret, limits, node_id=node_id, accept=accept)
    state = _ServerState(bytes(secret), handler, limits, node_id, stats, welcome, fast, accept)
    if listeners is None:
        listeners = await listen(host, port)
    bound = listeners[0].socket.getsockname()
    accepting = [trio.CancelScope() for _ in listeners]  # one per accept loop (a scope is entered once)
    async with trio.open_nursery() as nursery:
        for listener, scope in zip(listeners, accepting):
            nursery.start_soon(_accept_loop, listener, state, nursery, scope)
        log.info("wire server listening on %s:%d node=%s", bound[0], bound[1], node_id)
        task_status.started(Listening(str(bound[0]), int(bound[1])))
        if drain is not None:
            await drain.wait()
            state.draining = True
            for scope in accepting:
                scope.cancel()  # the listeners close: new connections are refused
            log.info("wire server draining: %d connection(s), %d request(s) in flight", len(state.connections),
                     sum(len(c.calls) for c in state.connections))
            for connection in list(state.connections):
                connection.drain()


async def listen(host: str, port: int) -> list[trio.SocketListener]:
    """The listening sockets of ``host:port`` (``port=0`` picks a free one), for :func:`serve`;
    a ``FabricError`` naming the address when it cannot be bound (:func:`bind_error`)."""
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise bind_error("listen", host, port, exc) from None


def bind_error(what: str, host: str, port: int, exc: OSError) -> FabricError:
    """``FabricError("cannot {what} on HOST:PORT: reason")`` for a socket that could not be
    bound: UNAVAILABLE when the port is in use (it may be freed), PERMISSION_DENIED for a
    privileged port, FAILED_PRECONDITION otherwise (an address that is not this machine's,
    a host name that does not resolve)."""
    import errno

    if exc.errno == errno.EADDRINUSE:
        code = StatusCode.UNAVAILABLE
    elif exc.errno in (errno.EACCES, errno.EPERM):
        code = StatusCode.PERMISSION_DENIED
    else:
        code = StatusCode.FAILED_PRECONDITION
    return FabricError(code, f"cannot {what} on {host}:{port}: {exc.strerror or exc}")


async def _accept_loop(listener: trio.SocketListener, state: _ServerState, nursery: trio.Nursery,
                       accepting: trio.CancelScope) -> None:
    with accepting:  # cancelled when the server drains: the listener closes
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:  # e.g. out of file descriptors: back off, keep serving
                    log.warning("accept failed: %s", exc.strerror or type(exc).__name__)
                    await trio.sleep(0.1)
                    continue
                if state.live >= 2 * state.limits.max_connections:
                    log.warning("refused connection from %s: %d connection tasks already (limit %d)",
                                _peer_name(stream), state.live, state.limits.max_connections)
                    with trio.CancelScope(shield=True):
                        try:
                            await stream.aclose()
                        except _NET_ERRORS:
                            pass
                    continue
                state.live += 1
                nursery.start_soon(_run_connection, stream, state)


async def _run_connection(stream: trio.SocketStream, state: _ServerState) -> None:
    """Serve one accepted connection.  A bug that escapes it (an exception that is no
    cancellation) ends that connection only, logged once with its traceback: the server
    and every other connection go on (one peer must never be able to stop a node)."""
    peer = "?"
    try:
        try:
            connection = _ServerConnection(stream, state)
        except BaseException:
            state.live -= 1
            with trio.CancelScope(shield=True):
                await stream.aclose()
            raise
        peer = connection.peer
        await connection.run()
    except Exception as exc:  # noqa: BLE001 - the point: contain it to this connection
        state.internal_errors += 1
        leaf: BaseException = exc
        while isinstance(leaf, BaseExceptionGroup) and len(leaf.exceptions) == 1:
            leaf = leaf.exceptions[0]
        log.error("connection from %s ended by an internal error (%s: %s); the node serves on",
                  peer, type(leaf).__name__, leaf, exc_info=exc)


# =========================================================================== client


class _Slot:
    """One waiting request: what it has received so far, and how to wake its task."""

    __slots__ = ("items", "final", "waiter", "collect")

    def __init__(self, collect: bool = False) -> None:
        self.items: deque = deque()  # Metadata / StreamData events, in order
        self.final: Response | Fault | Stats | None = None
        self.waiter: trio.Event | None = None  # set while the task sleeps as a follower
        self.collect = collect  # grant one more credit per pushed item as it arrives

    def wake(self) -> None:
        if self.waiter is not None:
            self.waiter.set()

    def pushed(self) -> list:
        """The data of the items pushed so far, in order (metadata left out)."""
        return [ev.data for ev in self.items if isinstance(ev, StreamData)]


class WireClient:
    """An authenticated client connection that pipelines requests.

    Made by :func:`open_connection`.  Many tasks may call :meth:`request`,
    :meth:`call`, :meth:`stats` and :meth:`stream` concurrently; each request
    gets its own id and the replies are matched back by id.  At most the
    server's advertised ``max_inflight_requests`` are in flight at once (more
    wait for a slot, not fail), and at most ``max_streams`` upload streams.
    ``async with client:`` closes it on exit.

    There is no reader task: whichever waiting request finds nobody reading
    becomes the reader (leader) and hands every parsed event to its request,
    waking only that request's task; when the leader's own reply is in, it
    hands the socket to one other waiting request.

    Attributes: ``address`` (``"host:port"``), ``peer_node_id``,
    ``peer_limits`` (:class:`~fabric.wire.AdvertisedLimits`), ``limits`` (this
    side's :class:`~fabric.wire.StreamFrameLimits`: what it accepts),
    ``welcome`` (the server's welcome map), ``closed``.
    """

    def __init__(self, link: _Link, address: str, welcome: Any) -> None:
        self._link = link
        self._conn = link.conn
        self.address = address
        self.peer_node_id: str | None = link.conn.peer_node_id
        limits: AdvertisedLimits = link.conn.peer_limits  # type: ignore[assignment]
        self.peer_limits = limits
        self.limits: StreamFrameLimits = link.conn.limits
        self.welcome = welcome
        self._inflight = trio.Semaphore(limits.max_inflight_requests)
        self._uploads = trio.Semaphore(limits.max_streams)
        self._slots: dict[int, _Slot] = {}
        self._followers: set[_Slot] = set()
        self._reading = False
        self._corked = False
        self._failure: FabricError | None = None
        self.peer_metadata: Any = None

    def __repr__(self) -> str:
        return f"<WireClient {self.address} node={self.peer_node_id} {'closed' if self.closed else 'open'}>"

    @property
    def closed(self) -> bool:
        """Whether the connection is over (locally closed, lost or refused)."""
        return self._failure is not None

    async def __aenter__(self) -> "WireClient":
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.aclose()

    def reusable(self) -> bool:
        """Whether a new request may go out on this connection, decided without waiting.

        False once it is closed; also False when it has been quiet for
        :data:`REUSE_CHECK_AFTER_S` or more and the peer has meanwhile closed it
        (a node closes connections idle past its ``idle_timeout_s``): what the
        peer sent is taken in here, its goodbye or EOF closes this side too.  A
        pool asks before each reuse and dials a new connection on False, so a
        request is not sent into a connection the peer has left, which would
        cost the caller a failed attempt and a backoff.
        """
        if self._failure is not None or self._link.broken is not None:
            return False
        if self._reading or self._slots:
            return True  # a request is in flight: its reader takes in whatever the peer says
        now = trio.current_time()
        if now - self._conn.last_activity < REUSE_CHECK_AFTER_S:
            return True
        data = self._link.read_now()
        if data is None:
            return True
        self._conn.receive_data(data, now=now)
        self._drain()
        if self._failure is None:
            return True  # connection-level metadata, or a late frame of a finished request
        self._link.close_now()
        return False

    # ---------------------------------------------------------------- public API

    async def request(self, op: str, body: Any = None) -> Any:
        """Send a unary request and return the server's reply body.

        The caller's effective trio deadline (if any) is sent as the request's
        timeout.  Raises the server's ``FabricError`` for a fault,
        ``FabricError(UNAVAILABLE, retryable=True)`` if the connection breaks,
        and INVALID_ARGUMENT / RESOURCE_EXHAUSTED when ``body`` cannot be
        encoded or sent.  Cancelling the calling task sends ``cancel``.
        """
        final, _ = await self._unary(lambda rid: Request(rid, op, body, True, 0, _remaining_s()))
        if isinstance(final, Fault):
            raise final.error
        return final.body

    async def call(self, op: str, body: Any = None, *, credit: int = DEFAULT_CREDIT) -> tuple[Any, list]:
        """A request whose answer may be pushed items and then a reply: ``(reply body, [items])``.

        Credit is granted back as each item arrives, so the server streams at
        the pace of the connection; everything pushed is kept in memory, so
        use it for answers of bounded size (a record, an artifact's chunks)
        and :meth:`stream` to consume items one by one.  Errors as
        :meth:`request`.
        """
        final, slot = await self._unary(lambda rid: Request(rid, op, body, True, credit, _remaining_s()), collect=True)
        if isinstance(final, Fault):
            raise final.error
        return final.body, slot.pushed()

    async def call_many(self, op: str, bodies: Sequence[Any], *, credit: int = DEFAULT_CREDIT,
                        then: Callable[[int, Any, list], Any] | None = None) -> list[Any]:
        """Pipelined calls (as :meth:`call`) of ``op``, one per body: requests are written without
        waiting for replies (every :data:`MANY_FLUSH_EVERY`), so N small requests cost
        about one round trip plus N times the per-request work, not N round trips.

        Returns, in the order of ``bodies``, ``(reply body, [pushed items])`` or the
        ``FabricError`` of that request alone (its fault, or a body that cannot be sent).
        ``then(index, reply body, items)``, if given, is applied to each reply as it is
        taken in (its work overlaps the server's on later requests) and its result stands
        in for the pair; a ``FabricError`` it raises becomes that request's result.
        When the peer's in-flight limit is reached, the oldest replies are taken in
        before more requests go out.  A broken connection raises as :meth:`request`
        does; cancelling the caller cancels every request still live.  The caller's
        deadline travels with each request.
        """
        self._check_usable()
        results: list[Any] = [None] * len(bodies)
        live: deque[tuple[int, int, _Slot]] = deque()  # sent, reply not taken yet: each holds an in-flight permit
        timeout = _remaining_s()
        try:
            for i, body in enumerate(bodies):
                while True:
                    try:
                        self._inflight.acquire_nowait()
                        break
                    except trio.WouldBlock:
                        pass
                    if not live:  # we hold no permit: others do, and their replies free them
                        await self._inflight.acquire()
                        break
                    await self._link.flush()
                    await self._check_link()
                    await self._take_reply(live.popleft(), results, then)
                rid = self._conn.new_request_id()
                try:
                    self._link.queue(Request(rid, op, body, True, credit, timeout))
                except FabricError as exc:  # this body cannot be sent; nothing was queued for it
                    self._inflight.release()
                    results[i] = exc
                    continue
                slot = self._slots[rid] = _Slot(True)
                live.append((i, rid, slot))
                if len(live) % MANY_FLUSH_EVERY == 0:
                    await self._link.flush()
            await self._link.flush()
            await self._check_link()
            while live:
                await self._take_reply(live.popleft(), results, then)
            return results
        except BaseException:
            for _, rid, _ in live:
                await self._abandon(rid)
            raise
        finally:
            for _, rid, _ in live:
                self._slots.pop(rid, None)
                self._inflight.release()

    async def _take_reply(self, entry: tuple[int, int, _Slot], results: list, then: Callable[[int, Any, list], Any] | None) -> None:
        """Wait for the final reply of one :meth:`call_many` request and put it in ``results``."""
        i, rid, slot = entry
        try:
            await self._wait(slot, lambda: slot.final is not None)
        except BaseException:
            await self._abandon(rid)
            raise
        finally:
            self._slots.pop(rid, None)
            self._inflight.release()
        final = slot.final
        if isinstance(final, Fault):
            results[i] = final.error
            return
        items = slot.pushed()
        if then is None:
            results[i] = (final.body, items)
            return
        try:
            results[i] = then(i, final.body, items)
        except FabricError as exc:
            results[i] = exc

    async def stats(self, body: Any = None) -> Any:
        """Ask the server for its counters (``{"wire": ..., "server": ..., "node": ...}``)."""
        final, _ = await self._unary(lambda rid: Stats(rid, body))
        if isinstance(final, Fault):
            raise final.error
        return final.body

    def stream(self, op: str, body: Any = None, *, upload: bool = False, credit: int = DEFAULT_CREDIT) -> "ClientCall":
        """A streaming request, used as ``async with client.stream(op, body) as call:``.

        ``upload=True`` lets the client push items (``call.send``) until
        ``call.end()``; ``credit`` is how many items the server may push before
        the client consumes some (the client grants one more per item read).
        Leaving the block before the final reply cancels the request.
        """
        return ClientCall(self, op, body, upload, credit)

    async def wait_closed(self) -> FabricError:
        """Read until the connection ends; return why (as a request would see it)."""
        try:
            await self._wait(_Slot(), lambda: False)
        except FabricError as exc:
            return exc
        raise AssertionError("unreachable")  # pragma: no cover

    async def aclose(self, grace: float | None = None) -> None:
        """Say goodbye and close the socket; waiting requests get UNAVAILABLE. Idempotent.
        ``grace``: at most this long for what is queued and the goodbye to be written (a peer
        that does not read otherwise holds this up to the write timeout)."""
        if grace is not None:
            self._link.hurry(grace)
        if self._conn.state == ConnectionState.OPEN:
            try:
                self._link.queue(Closed(None))
            except FabricError:
                pass
            await self._link.flush()
        self._set_failure(FabricError(StatusCode.UNAVAILABLE, f"connection to {self.address} closed locally",
                                      retryable=True))
        await self._link.aclose()

    def close_now(self) -> None:
        """Close the socket without waiting (no goodbye: the peer sees it close); waiting
        requests get UNAVAILABLE.  For synchronous code inside the connection's trio run,
        where :meth:`aclose` cannot be awaited.  Idempotent."""
        self._set_failure(FabricError(StatusCode.UNAVAILABLE, f"connection to {self.address} closed locally",
                                      retryable=True))
        self._link.close_now()

    def drop_after_fork(self) -> None:
        """In a forked child: this connection is the parent's.  It counts as closed here, and
        this process's copy of the socket is closed without a goodbye (the parent's connection
        goes on) and without waking the requests waiting on it (their run is the parent's)."""
        if self._failure is None:
            self._failure = FabricError(StatusCode.UNAVAILABLE, f"connection to {self.address} was inherited across a fork",
                                        retryable=True)
        self._link.drop_after_fork()

    # ---------------------------------------------------------------- internals

    def _set_failure(self, err: FabricError) -> None:
        if self._failure is None:
            self._failure = err
        for slot in self._slots.values():
            slot.wake()
        for slot in self._followers:
            slot.wake()

    def _connection_error(self, reason: FabricError | None) -> FabricError:
        if reason is not None and reason.status_code == StatusCode.RESOURCE_EXHAUSTED:
            return FabricError(StatusCode.RESOURCE_EXHAUSTED, f"connection to {self.address}: {reason.message}")
        why = "closed by peer" if reason is None else str(reason)
        return FabricError(StatusCode.UNAVAILABLE, f"connection to {self.address} lost: {why}", retryable=True)

    def _check_usable(self) -> None:
        if self._failure is not None:
            raise self._failure
        if self._link.broken is not None:  # a failed write; the requests in flight still read (see _wait)
            raise self._connection_error(FabricError(StatusCode.UNAVAILABLE, self._link.broken, retryable=True))

    async def _send(self, event: Any) -> None:
        """Queue ``event`` and write it; while other requests are in flight, the requests
        that run in one scheduler pass share one write (the first waits one pass for the rest)."""
        link = self._link
        link.queue(event)
        if self._corked:
            return  # the task that corked writes our bytes after its pass
        if len(self._slots) > 1:
            self._corked = True
            try:
                await trio.lowlevel.cancel_shielded_checkpoint()
            finally:
                self._corked = False
        await link.flush()
        await self._check_link(own_frame=type(event) is not Credit)

    async def _check_link(self, own_frame: bool = True) -> None:
        """After a write: a broken link fails the connection — except a write that failed (the
        peer closed or reset; not a stall): what the peer sent before it went is still read
        (:meth:`_wait`), so that fails nothing but the request whose ``own_frame`` could not go
        out, and only it while other requests are in flight (a credit grant or a read's flush
        is no frame of a request's own)."""
        link = self._link
        if link.broken is None or self._failure is not None:
            return
        if link.write_failed and not own_frame:
            return
        err = self._connection_error(FabricError(StatusCode.UNAVAILABLE, link.broken, retryable=True))
        if link.write_failed and len(self._slots) > 1:
            raise err
        self._set_failure(err)
        await link.aclose()

    def _drain(self) -> None:
        """Hand every parsed event to its request's slot, waking that request's task."""
        conn = self._conn
        while True:
            ev = conn.next_event()
            if ev is NEED_DATA:
                return
            if isinstance(ev, Closed):
                self._set_failure(self._connection_error(ev.reason))
                return
            rid = getattr(ev, "req_id", None)
            if rid == 0 and isinstance(ev, Metadata):
                self.peer_metadata = ev.body
                continue
            slot = self._slots.get(rid)
            if slot is None:
                continue
            if isinstance(ev, (Response, Fault, Stats)):
                slot.final = ev
            elif isinstance(ev, (Metadata, StreamData)):
                slot.items.append(ev)
                if slot.collect and isinstance(ev, StreamData) and conn.is_live(rid):
                    try:
                        self._link.queue(Credit(rid, 1))
                    except FabricError:
                        pass  # the request ended meanwhile; nothing to grant
            # Credit: the machine tracks it; the woken sender re-checks send_credit
            slot.wake()

    async def _wait(self, slot: _Slot, cond: Callable[[], bool]) -> None:
        """Until ``cond()``: read the socket (as leader) or sleep until woken (as follower)."""
        try:
            while not cond():
                if self._failure is not None:
                    raise self._failure
                if self._reading:
                    slot.waiter = trio.Event()
                    self._followers.add(slot)
                    try:
                        await slot.waiter.wait()
                    finally:
                        slot.waiter = None
                        self._followers.discard(slot)
                    continue
                self._reading = True
                try:
                    await self._link.receive()
                finally:
                    self._reading = False
                self._drain()
                await self._link.flush()  # credits granted, or the fault the machine queued on a violation
                # (after a failed write the reads go on: the last pushes, the reply and the
                # goodbye the peer sent before it went; the read that finds the end fails the rest)
                await self._check_link(own_frame=False)
                if self._failure is not None:
                    await self._link.aclose()
        finally:
            if not self._reading:
                self._hand_over()

    def _hand_over(self) -> None:
        """Nobody reads: wake one sleeping request to take the socket."""
        for other in self._followers:
            if other.waiter is not None and not other.waiter.is_set():
                other.waiter.set()
                return

    async def _acquire_inflight(self) -> None:
        try:
            self._inflight.acquire_nowait()
        except trio.WouldBlock:
            await self._inflight.acquire()

    async def _open_slot(self, make: Callable[[int], Any], collect: bool = False) -> tuple[int, _Slot]:
        self._check_usable()
        rid = self._conn.new_request_id()
        slot = _Slot(collect)
        self._slots[rid] = slot
        try:
            await self._send(make(rid))
        except BaseException:
            await self._abandon(rid)
            raise
        return rid, slot

    async def _abandon(self, rid: int) -> None:
        """Cancel ``rid`` at the server if it is still live (safe inside a cancelled scope)."""
        self._slots.pop(rid, None)
        if self._failure is None and self._conn.is_live(rid):
            try:
                self._link.queue(Cancel(rid))
            except FabricError:
                return
            await self._link.flush()

    async def _unary(self, make: Callable[[int], Any], collect: bool = False) -> tuple[Response | Fault | Stats, _Slot]:
        self._check_usable()
        await self._acquire_inflight()
        try:
            rid, slot = await self._open_slot(make, collect)
            try:
                await self._wait(slot, lambda: slot.final is not None)
            except BaseException:
                await self._abandon(rid)
                raise
            self._slots.pop(rid, None)
            assert slot.final is not None
            return slot.final, slot
        finally:
            self._inflight.release()


class ClientCall:
    """A streaming request on a :class:`WireClient` (see :meth:`WireClient.stream`).

    ``await call.send(item)`` pushes an upload item (waits for the server's
    credit); ``await call.send_metadata(body)``; ``await call.end()`` ends the
    upload.  ``await call.receive()`` returns the next :class:`~fabric.wire.Metadata`,
    :class:`~fabric.wire.StreamData` or the final :class:`~fabric.wire.Response`
    in arrival order (a fault raises its ``FabricError``).  ``async for item
    in call`` yields pushed data items (metadata bodies collect in
    ``call.metadata``) and stops at the final reply, kept as ``call.response``.
    ``await call.result()`` returns the final reply body, discarding unread
    pushes.  Leaving ``async with`` before the final reply sends ``cancel``.
    """

    def __init__(self, client: WireClient, op: str, body: Any, upload: bool, credit: int) -> None:
        self._client = client
        self.op = op
        self._body = body
        self.upload = upload
        self._credit = credit
        self.req_id: int | None = None
        self._slot: _Slot | None = None
        self._held: list[trio.Semaphore] = []
        self.metadata: list[Any] = []
        self.response: Any = None
        self._done = False

    async def __aenter__(self) -> "ClientCall":
        client = self._client
        client._check_usable()
        await client._acquire_inflight()
        self._held.append(client._inflight)
        if self.upload:
            try:
                await client._uploads.acquire()
            except BaseException:
                self._release()
                raise
            self._held.append(client._uploads)
        try:
            self.req_id, self._slot = await client._open_slot(
                lambda rid: Request(rid, self.op, self._body, not self.upload, self._credit, _remaining_s())
            )
        except BaseException:
            self._release()
            raise
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        try:
            if not self._done and self.req_id is not None:
                await self._client._abandon(self.req_id)
                self._done = True
        finally:
            self._release()

    def _release(self) -> None:
        while self._held:
            self._held.pop().release()

    def _require_open(self) -> tuple[int, _Slot]:
        if self.req_id is None or self._slot is None:
            raise FabricError(StatusCode.FAILED_PRECONDITION, "use the call inside `async with client.stream(...)`")
        return self.req_id, self._slot

    async def send(self, data: Any) -> None:
        """Push one upload item, waiting for the server's credit.

        Raises the server's error if it already failed the request, and
        FAILED_PRECONDITION if it already replied or the call is not an
        upload.
        """
        rid, slot = self._require_open()
        if not self.upload:
            raise FabricError(StatusCode.FAILED_PRECONDITION, f"request {rid} ({self.op}) is not an upload")
        client = self._client
        await client._wait(slot, lambda: slot.final is not None or client._conn.send_credit(rid) > 0)
        if slot.final is not None:
            if isinstance(slot.final, Fault):
                raise slot.final.error
            raise FabricError(StatusCode.FAILED_PRECONDITION, f"server answered request {rid} before the upload ended")
        await client._send(StreamData(rid, data))

    async def send_metadata(self, body: Any) -> None:
        """Send a ``metadata`` frame on this request."""
        rid, _ = self._require_open()
        await self._client._send(Metadata(rid, body))

    async def end(self) -> None:
        """End the upload (the server's ``async for`` then stops)."""
        rid, slot = self._require_open()
        if slot.final is None and self._client._conn.is_live(rid):
            await self._client._send(EndOfStream(rid))

    async def receive(self) -> Metadata | StreamData | Response:
        """The next event of this request in arrival order; a fault raises its error.

        After the final :class:`~fabric.wire.Response` was returned, raises
        FAILED_PRECONDITION.
        """
        rid, slot = self._require_open()
        if self._done:
            raise FabricError(StatusCode.FAILED_PRECONDITION, f"request {rid} already finished")
        client = self._client
        await client._wait(slot, lambda: bool(slot.items) or slot.final is not None)
        if slot.items:
            ev = slot.items.popleft()
            if isinstance(ev, StreamData) and client._conn.is_live(rid):
                await client._send(Credit(rid, 1))
            return ev
        self._done = True
        client._slots.pop(rid, None)
        final = slot.final
        if isinstance(final, Fault):
            raise final.error
        assert isinstance(final, Response)
        self.response = final.body
        return final

    def __aiter__(self) -> "ClientCall":
        return self

    async def __anext__(self) -> Any:
        """The next pushed data item; metadata is collected into ``metadata``."""
        while True:
            if self._done:
                raise StopAsyncIteration
            ev = await self.receive()
            if isinstance(ev, StreamData):
                return ev.data
            if isinstance(ev, Metadata):
                self.metadata.append(ev.body)
                continue
            raise StopAsyncIteration

    async def result(self) -> Any:
        """Wait for the final reply and return its body (unread pushes are discarded)."""
        while not self._done:
            ev = await self.receive()
            if isinstance(ev, Metadata):
                self.metadata.append(ev.body)
        return self.response

    async def cancel(self) -> None:
        """Abandon the request: the server's handler is cancelled; nothing more arrives."""
        if self.req_id is not None and not self._done:
            self._done = True
            await self._client._abandon(self.req_id)


async def open_connection(
    host: str,
    port: int,
    secret: bytes,
    limits: StreamFrameLimits | None = None,
    *,
    node_id: str = "",
) -> WireClient:
    """Dial ``host:port``, run the handshake, and return a :class:`WireClient`.

    The whole dial + handshake + welcome runs under ``limits.handshake_timeout_s``.
    Raises ``FabricError``: UNAUTHENTICATED (wrong secret or a non-fabric
    peer), RESOURCE_EXHAUSTED (the server is at its connection limit),
    DEADLINE_EXCEEDED (handshake too slow), UNAVAILABLE (cannot connect, or
    the peer hung up), INVALID_ARGUMENT (bad secret, limits or node id, or a host
    name the resolver cannot encode).
    """
    if limits is None:
        limits = StreamFrameLimits()
    address = f"{host}:{port}"
    conn = WireConnection("client", secret, limits, node_id=node_id, now=trio.current_time())
    link: _Link | None = None
    welcome: Any = None
    try:
        with trio.move_on_after(limits.handshake_timeout_s) as scope:
            try:
                stream = await trio.open_tcp_stream(host, port)
            except OSError as exc:
                raise FabricError(StatusCode.UNAVAILABLE, f"cannot connect to {address}: {exc.strerror or exc}",
                                  retryable=True) from None
            except UnicodeError as exc:  # the resolver's IDNA encoding refuses the host name ('a..b', a 64-char label)
                raise FabricError(StatusCode.INVALID_ARGUMENT, f"cannot connect to {address}: not a valid host name ({exc})") from None
            link = _Link(stream, conn, _write_timeout(limits))
            welcome = await _client_handshake(link, address)
        if scope.cancelled_caught:
            raise FabricError(
                StatusCode.DEADLINE_EXCEEDED,
                f"handshake with {address} did not complete within {limits.handshake_timeout_s:g} s",
                retryable=True,
            )
    except BaseException:
        if link is not None:
            await link.aclose()
        raise
    assert link is not None
    return WireClient(link, address, welcome)


async def _client_handshake(link: _Link, address: str) -> Any:
    conn = link.conn
    authenticated = False
    while True:
        ev = conn.next_event()
        if ev is NEED_DATA:
            await link.flush()
            if link.broken is not None:
                raise FabricError(StatusCode.UNAVAILABLE, f"connection to {address}: {link.broken}", retryable=True)
            await link.receive()
            continue
        if isinstance(ev, Closed):
            err = ev.reason
            if err is None:
                err = FabricError(StatusCode.UNAVAILABLE, "server said goodbye before its welcome", retryable=True)
            raise FabricError(err.status_code, f"connection to {address}: {err.message}", err.retryable)
        if isinstance(ev, Authenticated):
            authenticated = True
        elif authenticated and isinstance(ev, Metadata) and ev.req_id == 0:
            body = ev.body
            if type(body) is dict and "welcome" in body:
                return body["welcome"]
