"""RemoteFabric: the client side of a running ``fabric node``.

``fabric.open("host:port", secret=...)`` (or ``FABRIC_NODE`` + ``FABRIC_SECRET``)
returns one.  The node looks up or computes and records; this client verifies
every record it receives (CRC, BLAKE3 digest, and that it is the record of the
key asked for, recomputed here from the evaluator, version and args) before
decoding it — a mismatch is DATA_LOSS and the bytes are discarded.

Sync calls, from any number of threads, run on one background trio thread that
owns one reused, pipelined connection; async calls (``arealize``) use one
connection per trio run of the caller, closed when that run ends.  Either way a
connection that broke is re-dialled by the retry helper within the operation's
deadline, and a caller's trio deadline or cancellation travels to the node as
the request's timeout / ``cancel``.  ``close()`` (from any thread) closes every
one of them: calls in flight and later calls fail with FAILED_PRECONDITION.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import os
import queue
import threading
import weakref
from typing import Any, Callable

import trio

from cassette import codec
from cassette.errors import FabricError, StatusCode
from cassette.keys import ContentKey
from cassette.record import Record
from fabric import artifacts, metrics
from fabric.errors import RetryPolicy, aretry_call, bounded_wait, policy_for
from fabric.local import Fabric, on_device
from fabric.net import WireClient, open_connection
from fabric.request import Reply, Request
from fabric.serve import EVALUATOR_ERROR, verify_record
from fabric.wire import Metadata, Response, StreamData, StreamFrameLimits

__all__ = ["RemoteFabric", "parse_address"]


def parse_address(address: str, *, listen: bool = False) -> tuple[str, int]:
    """``"host:port"`` → ``(host, port)``; INVALID_ARGUMENT otherwise (port 0 only when ``listen``;
    the port is ASCII digits: ``str.isdigit`` alone admits '²', which ``int`` refuses)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not (port.isascii() and port.isdigit()) or not (0 if listen else 1) <= int(port) < 65536:
        raise FabricError(StatusCode.INVALID_ARGUMENT, f"address must be HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def _raise_fault(exc: FabricError) -> None:
    """Re-raise an evaluator's own error with its builtin type where possible."""
    msg = exc.message
    if exc.status_code is StatusCode.INTERNAL and msg.startswith(EVALUATOR_ERROR):
        tname, _, text = msg[len(EVALUATOR_ERROR) :].partition(": ")
        import builtins

        etype = getattr(builtins, tname, None)
        if isinstance(etype, type) and issubclass(etype, Exception) and not issubclass(etype, FabricError):
            try:
                err = etype(text)
            except Exception:  # noqa: BLE001 - odd constructors fall through to the FabricError
                err = None
            if err is not None:
                raise err from exc
    raise exc


class _HitBatch:
    """Requests of concurrent ``arealize`` calls, asked of the node in one ``lookup``.

    ``answers`` (one per request: a verified :class:`Reply`, the DATA_LOSS of a record
    that failed verification, or None to realize) is set once the lookup succeeded;
    ``done`` is set when it is over either way, so no caller waits on a cancelled one.
    """

    __slots__ = ("reqs", "answers", "done", "leader")

    def __init__(self) -> None:
        self.reqs: list[Request] = []
        self.answers: list[Any] | None = None
        self.done = trio.Event()
        self.leader = trio.lowlevel.current_task()  # the call that sends the lookup


#: The policy of a node's forward of its client's request (:meth:`RemoteFabric.aforward_record`):
#: one attempt, within the realize deadline (the client's own deadline, which travels with the
#: request, is usually the nearer); retrying is the client's (specs/errors.md "Relays").
FORWARD_POLICY = RetryPolicy(attempts=1, deadline_s=policy_for("realize").deadline_s)

#: Verified chunk bytes :meth:`RemoteFabric.aforward_get` stores per commit.
FORWARD_BATCH_BYTES = 8 << 20

#: Seconds a connection closed at the end of its trio run (or by ``close()`` on the portal)
#: gets to write its goodbye to a node that does not read.
CLOSE_GRACE_S = 1.0


class _Conns:
    """One connection per trio run, re-dialled after it breaks; and the run's
    ``arealize`` calls in progress, which share lookups while more than one is.

    Made by :meth:`RemoteFabric._conns`, which registers it in the run (``table``) and in
    its owner's ``_runs``; it is forgotten by both, and its connection closed, when the
    run ends (:func:`_close_at_run_end`) or the owner is closed, whichever comes first."""

    def __init__(self, owner: "RemoteFabric", table: dict, token: trio.lowlevel.TrioToken) -> None:
        self.owner = owner
        self.table = table  # the run's {id(fabric): _Conns}
        self.token = token
        self.client: WireClient | None = None
        self.lock = trio.Lock()
        self.done = trio.Event()  # set once forgotten: the run's watcher then closes the connection
        self.busy = 0  # arealize calls in progress
        self.gathering: _HitBatch | None = None  # open for more requests until its leader sends it
        self.sending: _HitBatch | None = None  # the latest batch whose lookup is in flight

    async def get(self) -> WireClient:
        c = self.client
        if c is not None and c.reusable():
            return c
        async with self.lock:
            o = self.owner
            if o._closed:
                raise o._closed_error()
            if self.client is None or not self.client.reusable():
                client = await open_connection(o.host, o.port, o.secret, o.limits)
                if o._closed or self.done.is_set():  # closed while dialling: the new socket is not kept
                    client.close_now()
                    raise o._closed_error()
                self.client = client
            return self.client

    def drop(self, client: WireClient) -> None:
        if self.client is client:
            self.client = None

    def forget(self) -> None:
        """Leave the run's table and the owner's ``_runs`` (in this run)."""
        if self.table.get(id(self.owner)) is self:
            del self.table[id(self.owner)]
        if self.owner._runs.get(self.token) is self:
            del self.owner._runs[self.token]
        self.done.set()

    def close_now(self) -> None:
        """Forget this run's connection and close its socket at once (no goodbye); calls
        waiting on it fail (in this run)."""
        self.forget()
        c, self.client = self.client, None
        if c is not None:
            c.close_now()

    def drop_after_fork(self) -> None:
        """In a forked child: leave the run's table (a child that carries on in the run it forked
        in dials anew) and drop the connection, the parent's (:meth:`WireClient.drop_after_fork`).
        Nothing of trio is touched: the run is the parent's."""
        if self.table.get(id(self.owner)) is self:
            del self.table[id(self.owner)]
        c, self.client = self.client, None
        if c is not None:
            c.drop_after_fork()

    async def aclose(self) -> None:
        """:meth:`close_now` with a goodbye first, written within :data:`CLOSE_GRACE_S`."""
        self.forget()
        c, self.client = self.client, None
        if c is not None:
            with trio.CancelScope(shield=True):
                await c.aclose(grace=CLOSE_GRACE_S)


async def _close_at_run_end(conns: _Conns) -> None:
    """A system task of the run ``conns`` belongs to: closes its connection when the run ends
    (system tasks are cancelled then) or once ``conns`` is forgotten, whichever is first."""
    try:
        await conns.done.wait()
    finally:
        with trio.CancelScope(shield=True):
            try:
                await conns.aclose()
            except Exception:  # noqa: BLE001 - a system task must not raise; the socket is closed either way
                conns.close_now()


_RUNVAR: trio.lowlevel.RunVar = trio.lowlevel.RunVar("fabric_remote_conns")


class RemoteFabric:
    """A fabric whose node is a running ``fabric node`` at ``address`` (see module docstring)."""

    def __init__(self, address: str, secret: bytes, *, limits: StreamFrameLimits | None = None) -> None:
        self.address = address
        self.host, self.port = parse_address(address)
        if not secret:
            raise FabricError(StatusCode.UNAUTHENTICATED, "a shared secret is required to talk to a node")
        self.secret = bytes(secret)
        self.limits = limits
        self.node_id: str | None = None
        self._portal_token: trio.lowlevel.TrioToken | None = None
        self._portal_thread: threading.Thread | None = None
        self._portal_stop: trio.Event | None = None
        self._portal_lock = threading.Lock()
        self._portal_nursery: trio.Nursery | None = None
        self._streams: set[threading.Event] = set()  # releases of open artifact_stream iterators
        #: the connections of every trio run using this client (the portal's included), by run
        self._runs: dict[trio.lowlevel.TrioToken, _Conns] = {}
        self._closed = False
        #: chunks (and their bytes) this client pushed to the node in puts, resumed ones included
        self.chunks_uploaded = 0
        self.bytes_uploaded = 0
        _live.add(self)

    # ------------------------------------------------------------ connections
    def _conns(self) -> _Conns:
        """This trio run's connections to the node (FAILED_PRECONDITION once closed).  The
        first use in a run registers them; they are closed when the run ends or at
        :meth:`close`, whichever comes first."""
        if self._closed:
            raise self._closed_error()
        try:
            table = _RUNVAR.get()
        except LookupError:
            table = {}
            _RUNVAR.set(table)
        c = table.get(id(self))
        if c is None:
            token = trio.lowlevel.current_trio_token()
            c = table[id(self)] = self._runs[token] = _Conns(self, table, token)
            trio.lowlevel.spawn_system_task(_close_at_run_end, c, name=f"fabric-remote-close:{self.address}")
            if self._closed:  # close() ran meanwhile in another thread and did not see this run
                c.forget()
                raise self._closed_error()
        return c

    async def _call(self, op: str, fn, policy: RetryPolicy | None = None) -> Any:
        """Run ``fn(client)`` with retries (``policy``, default the op's): a connection that
        broke is re-dialled by the next attempt; one that answered is kept."""
        conns = self._conns()

        async def attempt():
            client = await conns.get()
            self.node_id = client.peer_node_id
            try:
                return await fn(client)
            except FabricError as exc:
                if self._closed:  # the connection was closed under the call: not retried
                    raise self._closed_error() from None
                if client.closed:  # lost or refused: the next attempt dials again (a node's own
                    conns.drop(client)  # UNAVAILABLE answer, e.g. a relay's upstream down, keeps it)
                raise

        return await aretry_call(attempt, op=op, policy=policy)

    async def _call_transfer(self, op: str, fn: Callable[[WireClient, float], Any]) -> Any:
        """``_call`` for a streamed artifact transfer: ``fn(client, wait_s)`` runs with ``op``'s
        attempts, and ``op``'s deadline becomes ``wait_s``, the bound of each wait for the node
        (the manifest, then every chunk: see :func:`_stream_artifact`) instead of the bound of
        the whole transfer, so a large artifact takes as long as it needs while it keeps coming
        (as Bazel's remote cache times byte-stream reads).  The caller's own deadline still
        bounds everything and travels to the node."""
        pol = policy_for(op)
        return await self._call(op, functools.partial(fn, wait_s=pol.deadline_s), policy=dataclasses.replace(pol, deadline_s=math.inf))

    # ---------------------------------------------------------------- realize
    @metrics.observed("realize", evaluates=True)
    async def arealize_record(self, req: Request) -> tuple[Record, str, str]:
        """``(verified record, source, holder)`` for ``req`` from the node.

        The record must be the one of ``req``'s key (recomputed here from the
        evaluator, the version the node used, and the args) or DATA_LOSS.
        """
        try:
            return await self._realize_record(req)
        except FabricError as exc:
            _raise_fault(exc)

    @metrics.observed("realize", evaluates=True)
    async def aforward_record(self, req: Request) -> tuple[Record, str, str]:
        """:meth:`arealize_record` for a node forwarding its own client's realize (a relay to
        its upstream): one attempt (:data:`FORWARD_POLICY`), since that client retries a
        retryable error itself, so an upstream that is down costs it one dial per attempt, not
        three; and the upstream's fault is raised as the :class:`FabricError` it was (an
        evaluator's own error stays the INTERNAL fault that carries it), for the node to
        answer its client with as it came.  The caller's deadline bounds it and travels on."""
        return await self._realize_record(req, FORWARD_POLICY)

    @metrics.observed("get")
    async def aforward_get(self, key: ContentKey, cassette: Any, fetched: Callable[[int], None] | None = None) -> str:
        """Make ``cassette`` hold ``key`` — a reply's record, a blob, or an artifact with every
        chunk — got with op ``get`` from the node (a relay's upstream); returns the holder the
        node named (its own id for a blob or an artifact).

        Every byte is verified before it is stored (DATA_LOSS, and nothing recorded,
        otherwise).  An artifact streams: its chunks are stored as they arrive, a few MiB per
        commit, never gathered whole, with ``fetched(n)`` told the bytes stored so far, and its
        manifest is recorded last, once the whole has the manifest's digest.  One attempt, as
        :meth:`aforward_record`; for an artifact the ``get`` deadline bounds each wait for the
        node, not the transfer (specs/errors.md "Long transfers")."""
        if key.kind == "artifact":
            return await self._forward_artifact(key, cassette, fetched)
        if key.kind == "blob":
            _, items = await self._call("get", lambda client: _get_items(client, key, None), FORWARD_POLICY)
            data = items[0] if items else b""
            if type(data) is not bytes or ContentKey.of("blob", data) != key:
                raise FabricError(StatusCode.DATA_LOSS, "blob bytes do not match their key", key=key)
            await cassette.aput_blobs([(key, data)], verified=True)
            return self.node_id or ""
        reply, raw = await self._call("get", lambda client: _stream_record(client, "get", {"key": key}), FORWARD_POLICY)
        await cassette.aput_record(verify_record(raw, key))
        return str(reply.get("holder", ""))

    async def _forward_artifact(self, key: ContentKey, cassette: Any, fetched: Callable[[int], None] | None) -> str:
        keep: dict = {}

        def store(stream: Callable[[], tuple[dict, Any]]) -> None:  # a trio worker thread
            _, chunks = stream()
            batch: list[bytes] = []
            done = size = 0  # bytes stored; bytes in batch
            for data in itertools.chain(chunks, [None]):  # None: the end, after the digest was checked
                if data is not None:
                    batch.append(data)
                    size += len(data)
                if batch and (data is None or size >= FORWARD_BATCH_BYTES):
                    cassette.put_blobs(batch)
                    done += size
                    batch, size = [], 0
                    if fetched is not None:
                        fetched(done)

        async def go(client: WireClient) -> None:
            await _stream_artifact(client, key, store, policy_for("get").deadline_s, keep)

        await self._call("get", go, dataclasses.replace(FORWARD_POLICY, deadline_s=math.inf))
        await cassette.aput_record(keep["record"])  # last: the artifact is visible only with every chunk
        return self.node_id or ""

    async def _realize_record(self, req: Request, policy: RetryPolicy | None = None) -> tuple[Record, str, str]:
        body = _realize_body(req)

        async def go(client: WireClient):
            return await _stream_record(client, "realize", body)

        reply, raw = await self._call("realize", go, policy)
        return _check_realized(req, reply, raw)

    @metrics.observed("realize_many", evaluates=True)
    async def arealize_many(self, reqs: list[Request]) -> list[Reply]:
        """Realize every request of ``reqs`` on the node over one connection: about one or
        two round trips plus the per-request work, instead of one round trip each.

        First the node is asked, in ``lookup`` requests of up to :data:`LOOKUP_BATCH` keys,
        for the records it already holds (hits, answered at once); every other request is
        then realized, pipelined (:meth:`fabric.net.WireClient.call_many`).  Replies come in
        the order of ``reqs``, each verified as :meth:`arealize` verifies it.  If any
        request fails, every one is still answered (the node records what it computed) and
        the error of the first failing one, in order, is raised.  A broken connection
        retries the whole batch (realize is idempotent: what was computed is a hit the
        second time); the retry deadline is the realize deadline times the number of
        requests.
        """
        import dataclasses

        from fabric.errors import policy_for

        base = policy_for("realize")
        policy = dataclasses.replace(base, deadline_s=base.deadline_s * max(1, len(reqs)))

        def check(i: int, reply: Any, items: list) -> Reply:
            rec, source, holder = _check_realized(reqs[i], reply, _take_record(reply, items)[0])
            return Reply(rec.key, codec.decode(rec.payload), source, holder)

        async def go(client: WireClient):
            answers: list[Any] = [None] * len(reqs)
            todo = await _lookup_hits(client, reqs, answers)
            if todo:
                got = await client.call_many("realize", [_realize_body(reqs[i]) for i in todo], then=lambda j, reply, items: check(todo[j], reply, items))
                for i, answer in zip(todo, got):
                    answers[i] = answer
            return answers

        answers = await self._call("realize", go, policy)
        for answer in answers:
            if isinstance(answer, FabricError):
                _raise_fault(answer)
        return answers

    @metrics.observed("realize_many", evaluates=True)
    def realize_many(self, reqs: list[Request]) -> list[Reply]:
        """Sync :meth:`arealize_many`."""
        return self._portal(self.arealize_many, list(reqs))

    @metrics.observed("realize", evaluates=True)
    async def arealize(self, req: Request, *, timeout: float | None = None, device: Any = None) -> Reply:
        """Realize ``req`` on the node (trio); ``timeout`` bounds the whole call (DEADLINE_EXCEEDED);
        ``device="cuda:0"``: numpy values come back as CuPy arrays on that device.

        A call made while others of this trio run are in progress on this fabric joins
        theirs: the requests that arrive in one scheduler pass are asked of the node in one
        ``lookup``, and only those it does not hold are realized one by one (each reply
        verified either way).  A lone call is one ``realize`` round trip."""
        if timeout is None:  # no cancel scope on the common path: it costs more than a hit's parsing
            rep = await self._arealize(req)
        else:
            if not (isinstance(timeout, (int, float)) and timeout >= 0):  # NaN too
                raise FabricError(StatusCode.INVALID_ARGUMENT, f"timeout must be a number of seconds >= 0, got {timeout!r}")
            try:
                with trio.fail_after(timeout):
                    rep = await self._arealize(req)
            except trio.TooSlowError:
                raise FabricError(StatusCode.DEADLINE_EXCEEDED, f"realize did not finish within {timeout:g} s", retryable=False) from None
        return rep if device is None else on_device(rep, device)

    async def _arealize(self, req: Request) -> Reply:
        conns = self._conns()
        together = conns.busy > 0 and req.version is not None
        conns.busy += 1
        try:
            if together:
                got = await self._hit_together(conns, req)
                if isinstance(got, FabricError):
                    raise got
                if got is not None:
                    return got
            rec, source, holder = await self.arealize_record(req)
            return Reply(rec.key, codec.decode(rec.payload), source, holder)
        finally:
            conns.busy -= 1

    async def _hit_together(self, conns: _Conns, req: Request) -> Reply | FabricError | None:
        """``req``'s answer from a lookup shared with the calls of this scheduler pass: a
        verified hit, the DATA_LOSS of a bad record, or None (not held, or the lookup did
        not happen: refused, failed, or its sender was cancelled) to realize instead."""
        batch = conns.gathering
        if batch is not None:
            i = len(batch.reqs)
            batch.reqs.append(req)
            await batch.done.wait()
            return None if batch.answers is None else batch.answers[i]
        batch = conns.gathering = _HitBatch()
        batch.reqs.append(req)
        try:
            try:
                await trio.lowlevel.checkpoint()  # the calls runnable in this pass join
            finally:
                conns.gathering = None
            conns.sending = batch
            answers: list[Any] = [None] * len(batch.reqs)
            try:
                await self._call("realize", lambda client: _lookup_hits(client, batch.reqs, answers))
            except FabricError:
                return None  # every caller realizes on its own, and meets the error there if it lasts
            batch.answers = answers
            return answers[0]
        finally:
            if conns.sending is batch:
                conns.sending = None
            batch.done.set()

    @metrics.observed("realize", evaluates=True)
    def realize(self, req: Request, *, timeout: float | None = None, device: Any = None) -> Reply:
        """Realize ``req`` on the node (sync; runs on this client's portal thread)."""
        return self._portal(self._arealize_kw, req, timeout, device)

    async def _arealize_kw(self, req: Request, timeout: float | None, device: Any) -> Reply:
        return await self.arealize(req, timeout=timeout, device=device)

    # ---------------------------------------------------------------- reading
    @metrics.observed("fetch")
    async def afetch(self, key: ContentKey, expected_digest: bytes | None = None) -> Record:
        """The verified record of ``key`` from the node's ContentServeFabric (NOT_FOUND if not held)."""

        async def go(client: WireClient):
            return await _stream_record(client, "fetch", {"key": key})

        reply, raw = await self._call("get", go)
        return verify_record(raw, key, expected_digest)

    async def _aget_items(self, key: ContentKey, progress: Callable[[int], None] | None) -> tuple[Any, list]:
        """The node's answer to op ``get`` of ``key``: ``(reply, pushed items)``, unverified."""

        async def go(client: WireClient):
            return await _get_items(client, key, progress)

        return await self._call("get", go)

    @metrics.observed("get")
    async def aget(self, key: ContentKey | str, *, progress: Callable[[int], None] | None = None) -> Any:
        """An artifact (bytes / numpy) or a reply value from the node, every chunk verified
        (``key``: a key, its text, or an ArtifactRef).

        An artifact streams (as :meth:`get_into` does): the manifest comes first and each
        verified chunk is copied into the result as it arrives, so the artifact is held
        once, not twice.  ``progress(n)``: ``n`` content bytes received so far in this
        attempt, per pushed item (for an artifact, per chunk, ending at its size; called
        from a worker thread).  A retried attempt counts from 0 again.
        """
        key = artifacts.key_of(key)
        if key.kind == "artifact":

            def assemble(stream: Callable[[], tuple[dict, Any]]) -> Any:
                return artifacts.assemble(*stream(), progress)

            async def go(client: WireClient, wait_s: float):
                return await _stream_artifact(client, key, assemble, wait_s)

            return await self._call_transfer("get", go)
        reply, items = await self._aget_items(key, progress)
        if key.kind == "blob":
            data = items[0] if items else b""
            if type(data) is not bytes or ContentKey.of("blob", data) != key:
                raise FabricError(StatusCode.DATA_LOSS, "blob bytes do not match their key", key=key)
            return data
        raw, items = _take_record(reply, items)
        return codec.decode(verify_record(raw, key).payload)

    @metrics.observed("get")
    def get(self, key: ContentKey | str, *, progress: Callable[[int], None] | None = None) -> Any:
        """Sync :meth:`aget` (``progress`` is called on this client's portal thread)."""
        return self._portal(self._aget_kw, key, progress)

    async def _aget_kw(self, key: ContentKey | str, progress: Callable[[int], None] | None) -> Any:
        return await self.aget(key, progress=progress)

    @metrics.observed("artifact_stream")
    def artifact_stream(self, key: ContentKey | str) -> tuple[dict, Any]:
        """``(manifest, iterator of verified chunk bytes)`` of an artifact held by or through the
        node: the source :mod:`gpu` materializes from (as :meth:`fabric.local.Fabric.artifact_stream`).

        Streams: returns once the manifest record has arrived and is verified (op ``get``,
        retried under its policy until then), and each chunk is verified against its key as
        the iterator yields it, the whole against the manifest digest at the end (DATA_LOSS
        otherwise).  At most :data:`FILL_AHEAD` chunks wait here and the node pushes only
        within its credit, so the artifact is never gathered in memory.  A failure after the
        manifest is raised by the iterator (not retried).  The stream stays open on the node
        until the iterator is exhausted, closed (``close()``), dropped, or this client is
        closed; then the node's side is cancelled.
        """
        key = artifacts.artifact_key(key, "materialize")
        if self._closed:
            raise self._closed_error()
        token = self._ensure_portal()
        handoff: queue.SimpleQueue = queue.SimpleQueue()
        release = threading.Event()
        try:
            trio.from_thread.run_sync(self._start_stream, key, handoff, release, trio_token=token)
        except trio.RunFinishedError:
            raise self._closed_error() from None
        got = handoff.get()
        if isinstance(got, BaseException):
            raise got
        manifest, chunks = got
        return manifest, _ChunkIter(chunks, release, self)

    def _start_stream(self, key: ContentKey, handoff: queue.SimpleQueue, release: threading.Event) -> None:
        if self._closed or self._portal_nursery is None:
            handoff.put(self._closed_error())
            return
        self._streams.add(release)
        self._portal_nursery.start_soon(self._pump_artifact, key, handoff, release)

    async def _pump_artifact(self, key: ContentKey, handoff: queue.SimpleQueue, release: threading.Event) -> None:
        """In the portal: run one streaming ``get`` whose consumer is the caller's thread, handing it
        ``(manifest, verified chunks)`` (or the error that ended the attempts) through ``handoff``, and
        keep the stream open until ``release`` is set."""
        handed = False

        def consume(stream: Callable[[], tuple[dict, Any]]) -> None:  # a trio worker thread
            nonlocal handed
            manifest, chunks = stream()
            handed = True
            handoff.put((manifest, chunks))
            release.wait()

        async def go(client: WireClient, wait_s: float) -> None:
            try:
                await _stream_artifact(client, key, consume, wait_s)
            except FabricError:
                if not handed:
                    raise  # retried: nothing reached the caller yet
                # else the caller's iterator raises it (the reader's error ends its chunks)

        try:
            await self._call_transfer("get", go)
        except BaseException as exc:
            if not handed:
                handoff.put(exc if isinstance(exc, FabricError) else self._closed_error())
            if not isinstance(exc, Exception):
                raise
        finally:
            self._streams.discard(release)

    @metrics.observed("get_into")
    def get_into(self, key: ContentKey | str, out: Any) -> Any:
        """Fill the preallocated numpy or CuPy array ``out`` with an artifact (its key, key text or
        ArtifactRef) from the node; returns ``out``.

        Exactly the embedded :meth:`fabric.local.Fabric.get_into`
        (:func:`fabric.artifacts.fill_target`): ``key`` must be an artifact key and
        ``out`` a numpy / CuPy array (INVALID_ARGUMENT); the node sends the manifest
        record first, and ``out``'s dtype, shape and writability are checked against
        it before any chunk is used (a wrong target cancels the transfer); then each
        chunk, verified against its key as it arrives, is written in place, or, for a
        target that cannot take the bytes as they are (not C-contiguous, other byte
        order), into a staged copy counted in ``fabric_layout_mismatch_total``.  At
        most a few chunks are held in memory at once.  The content is checked against
        the manifest digest before ``out`` counts as filled (on DATA_LOSS ``out``'s
        content is unspecified).  Op ``get``, retried under the ``get_into`` policy.
        """
        return self._portal(self._aget_into, key, out, _queued_work(out))

    @metrics.observed("get_into")
    async def aget_into(self, key: ContentKey | str, out: Any) -> Any:
        """:meth:`get_into` under trio (the copy into ``out`` runs on a worker thread)."""
        return await self._aget_into(key, out, _queued_work(out))

    async def _aget_into(self, key: ContentKey | str, out: Any, after: Any) -> Any:
        key = artifacts.artifact_key(key, "get_into")
        fill = functools.partial(artifacts.fill_target, key=key, out=out, after=after)

        async def go(client: WireClient, wait_s: float):
            return await _stream_artifact(client, key, fill, wait_s)

        return await self._call_transfer("get_into", go)

    # ---------------------------------------------------------------- writing
    @metrics.observed("put")
    async def aput(self, data: Any, *, chunk_size: int | None = None, progress: Callable[[int], None] | None = None) -> Any:
        """Store ``data`` (bytes, numpy array, file path or object, iterator of bytes) on the
        node as an artifact; returns its :class:`~fabric.artifacts.ArtifactRef`, the same
        one the embedded put gives for the same content and chunk size.

        The content is cut and keyed here first; the node is sent only the chunks it
        lacks, checks each against its key (DATA_LOSS otherwise), and records the
        manifest once it holds them all (protocol: :mod:`fabric.upload`).  A put that
        breaks off leaves nothing visible, and calling it again sends only what the
        node still lacks.  ``chunk_size`` defaults to the embedded put's, capped to
        the node's frame limit.  Chunks pushed are counted in :attr:`chunks_uploaded`.

        ``progress(n)``: ``n`` bytes of the content the node holds — reported once the
        content is cut and keyed here and the node has said which chunks it lacks (so a
        resumed or repeated put starts at what it already has), then after each chunk
        pushed; increasing (after a retried round the count resumes above the last one
        reported), and the last call has the content's size (``size_bytes``).  Nothing is
        reported while the content is read and hashed here.
        """
        from fabric import upload
        from fabric.artifacts import ChunkPlan

        async def limits(client: WireClient):
            return client.peer_limits

        size = upload.chunk_size_for(await self._call("put", limits), chunk_size)
        plan = await trio.to_thread.run_sync(functools.partial(ChunkPlan, data, chunk_size=size))
        try:
            await upload.upload(functools.partial(self._call_transfer, "put"), plan, self._count_upload, progress)
        finally:
            plan.close()
        return plan.ref

    @metrics.observed("put")
    def put(self, data: Any, *, chunk_size: int | None = None, progress: Callable[[int], None] | None = None) -> Any:
        """Sync :meth:`aput` (``progress`` is called on this client's portal thread)."""
        return self._portal(self._aput_kw, data, chunk_size, progress)

    async def _aput_kw(self, data: Any, chunk_size: int | None, progress: Callable[[int], None] | None) -> Any:
        return await self.aput(data, chunk_size=chunk_size, progress=progress)

    def _count_upload(self, nbytes: int) -> None:
        self.chunks_uploaded += 1
        self.bytes_uploaded += nbytes

    @metrics.observed("holders")
    async def aholders(self, key: ContentKey | str) -> list[str]:
        """Node ids the node knows to hold ``key`` (or an ArtifactRef's)."""
        key = artifacts.key_of(key)

        async def go(client: WireClient):
            return await client.request("holders", {"key": key})

        return list(await self._call("get", go))

    @metrics.observed("holders")
    def holders(self, key: ContentKey | str) -> list[str]:
        """Sync :meth:`aholders`."""
        return self._portal(self.aholders, key)

    @metrics.observed("stats")
    async def astats(self) -> dict:
        """The node's stats answer: ``{"node": {counts, gossip counters, "metrics": {fabric_* sample: value}}, "wire": {...}, "server": {...}}``."""

        async def go(client: WireClient):
            return await client.stats()

        return await self._call("get", go)

    @metrics.observed("stats")
    def stats(self) -> dict:
        """Sync :meth:`astats`."""
        return self._portal(self.astats)

    # ------------------------------------------------------------------ admin
    @metrics.observed("verify")
    async def averify(self) -> Any:
        """Scrub the node's cassette (op ``verify``); returns a
        :class:`fabric.admin.NodeVerifyReport` (``records``, ``indexed``, ``blobs``,
        ``problems``, ``problem_count``, ``ok``).  No overall deadline: a scrub's
        time grows with the cassette."""
        from fabric import admin

        async def go(client: WireClient):
            return await client.request("verify", None)

        reply = await self._call("verify", go, admin.ADMIN_POLICY)
        return admin.verify_report(reply, self.node_id or "")

    @metrics.observed("verify")
    def verify(self) -> Any:
        """Sync :meth:`averify`."""
        return self._portal(self.averify)

    @metrics.observed("export")
    async def aexport(self, path: str | os.PathLike, *, progress: Callable[[int], None] | None = None) -> int:
        """Write the node's portable ledger file to ``path`` (op ``export``); returns its record count.

        The bytes are those a local :meth:`cassette.store.Cassette.export` of the
        node's cassette writes.  They go to ``path.tmp-PID`` and are renamed to
        ``path`` only once the trailer (BLAKE3 check, record count, length)
        matches; on failure nothing is left at ``path``.  Runs on a connection of
        its own whose per-stream byte limit is lifted (the file is written as it
        arrives).  ``progress(bytes received)`` is called per chunk.
        """
        import dataclasses

        from fabric import admin

        limits = dataclasses.replace(self.limits or StreamFrameLimits(), max_bytes_per_stream=admin.EXPORT_STREAM_BYTES)

        async def attempt():
            async with await open_connection(self.host, self.port, self.secret, limits) as client:
                self.node_id = client.peer_node_id
                return await admin.receive_export(client, path, progress)

        return await aretry_call(attempt, op="export", policy=admin.ADMIN_POLICY)

    @metrics.observed("export")
    def export(self, path: str | os.PathLike, *, progress: Callable[[int], None] | None = None) -> int:
        """Sync :meth:`aexport`."""
        return self._portal(self._aexport_kw, path, progress)

    async def _aexport_kw(self, path: str | os.PathLike, progress: Callable[[int], None] | None) -> int:
        return await self.aexport(path, progress=progress)

    @metrics.observed("replay")
    async def areplay(self, path: str | os.PathLike, *, progress: Callable[[int], None] | None = None) -> dict:
        """Append the records and blobs of the ledger file at ``path`` to the node (op ``replay``).

        The whole file is validated here first (as an import does: a bad file is
        DATA_LOSS / INVALID_ARGUMENT and nothing is sent); the node verifies every
        entry again before storing it.  Returns ``{"records", "appended",
        "blobs"}``: records sent (``appended`` of them new to the node; the rest
        it already held) and blobs sent.  ``progress(entries sent)`` per round.
        """
        from fabric import admin

        return await admin.send_replay(functools.partial(self._call, "replay", policy=admin.ADMIN_POLICY), path, progress)

    @metrics.observed("replay")
    def replay(self, path: str | os.PathLike, *, progress: Callable[[int], None] | None = None) -> dict:
        """Sync :meth:`areplay`."""
        return self._portal(self._areplay_kw, path, progress)

    async def _areplay_kw(self, path: str | os.PathLike, progress: Callable[[int], None] | None) -> dict:
        return await self.areplay(path, progress=progress)

    # ----------------------------------------------------------------- portal
    def _closed_error(self) -> FabricError:
        """What a call on this client raises once it is closed."""
        return FabricError(StatusCode.FAILED_PRECONDITION, f"client for {self.address} is closed")

    def _portal(self, afn, *args: Any) -> Any:
        """Run ``afn(*args)`` on the portal thread and return what it returns; a call that
        :meth:`close` cuts off raises FAILED_PRECONDITION (not trio's ``Cancelled``)."""
        token = self._ensure_portal()
        try:
            return trio.from_thread.run(afn, *args, trio_token=token)
        except (trio.Cancelled, trio.RunFinishedError):
            if not self._closed:
                raise
            raise self._closed_error() from None

    def _ensure_portal(self) -> trio.lowlevel.TrioToken:
        """The portal's trio token, starting its thread on first use (FAILED_PRECONDITION once closed)."""
        with self._portal_lock:
            if self._closed:
                raise self._closed_error()
            if self._portal_token is not None:
                return self._portal_token
            ready = threading.Event()

            async def main():
                async with trio.open_nursery() as nursery:  # artifact_stream's pumps run here
                    self._portal_nursery = nursery
                    self._portal_token = trio.lowlevel.current_trio_token()
                    self._portal_stop = trio.Event()
                    ready.set()
                    await self._portal_stop.wait()
                    conns = self._runs.get(self._portal_token)
                    if conns is not None:  # calls waiting on it fail with the closed error
                        await conns.aclose()
                    nursery.cancel_scope.cancel()

            t = threading.Thread(target=trio.run, args=(main,), name=f"fabric-remote:{self.address}", daemon=True)
            t.start()
            ready.wait(10)
            self._portal_thread = t
            assert self._portal_token is not None
            return self._portal_token

    def _drop_after_fork(self) -> None:
        """In a forked child: the portal thread and every trio run that used this client are
        the parent's (a fork copies none of them), and so are their connections.  Forget them
        all — each inherited socket is closed in this process only, with no goodbye, so the
        parent's connections go on — and the child's next call starts its own portal and dials
        its own connection."""
        self._portal_lock = threading.Lock()  # a parent thread may have held it
        self._portal_token = self._portal_thread = self._portal_stop = self._portal_nursery = None
        self._streams = set()  # the parent's artifact_stream iterators: their pumps are not here
        runs, self._runs = self._runs, {}
        for conns in runs.values():
            conns.drop_after_fork()

    def close(self) -> None:
        """Close every connection (the portal's and those of the trio runs using this client)
        and stop the portal thread.  Calls in flight, from any thread or run, and every later
        call fail with FAILED_PRECONDITION.  Idempotent; callable from any thread, inside a
        trio run too."""
        with self._portal_lock:
            if self._closed:
                return
            self._closed = True
            portal = self._portal_token
        for release in list(self._streams):
            release.set()  # open artifact_stream iterators: their pumps end (the iterators raise FAILED_PRECONDITION)
        try:
            here = trio.lowlevel.current_trio_token()
        except RuntimeError:
            here = None
        for token, conns in list(self._runs.items()):
            if token is portal:
                continue  # closed with a goodbye as the portal stops
            if token is here:
                conns.close_now()
                continue
            try:
                token.run_sync_soon(conns.close_now)
            except trio.RunFinishedError:
                pass  # that run's end closed it
        if portal is not None and self._portal_stop is not None:
            try:
                portal.run_sync_soon(self._portal_stop.set)
            except trio.RunFinishedError:
                pass
            if self._portal_thread is not None and self._portal_thread is not threading.current_thread():
                self._portal_thread.join(5)

    def __enter__(self) -> "RemoteFabric":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<RemoteFabric {self.address} node={self.node_id}>"


Fabric.register(RemoteFabric)  # isinstance(fabric.open("host:port", ...), fabric.Fabric)

#: the RemoteFabrics of this process (a forked child drops what they hold: :func:`_after_fork_in_child`)
_live: "weakref.WeakSet[RemoteFabric]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """A RemoteFabric made before a ``fork()`` (``multiprocessing``) keeps working in the child:
    its sync calls waited forever on the parent's portal thread, which the child does not
    have.  Each one drops what it inherited (:meth:`RemoteFabric._drop_after_fork`)."""
    for fab in list(_live):
        fab._drop_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


class _ChunkIter:
    """The chunk iterator :meth:`RemoteFabric.artifact_stream` returns: yields verified chunk
    bytes; exhausting, closing or dropping it ends the stream on the node."""

    def __init__(self, chunks: Any, release: threading.Event, owner: RemoteFabric) -> None:
        self._chunks = chunks
        self._owner = owner
        self._pid = os.getpid()  # its pump runs in this process only
        self._done = weakref.finalize(self, release.set)

    def __iter__(self) -> "_ChunkIter":
        return self

    def __next__(self) -> bytes:
        if not self._done.alive:
            raise StopIteration
        if self._pid != os.getpid():  # (its chunks would wait forever on the parent's portal)
            raise FabricError(StatusCode.FAILED_PRECONDITION, "an artifact stream is read in the process that opened it, "
                              "not in one forked from it")
        try:
            return next(self._chunks)
        except StopIteration:
            self.close()
            raise
        except (FabricError, trio.RunFinishedError) as exc:
            self.close()
            if self._owner._closed:
                raise self._owner._closed_error() from None
            if isinstance(exc, trio.RunFinishedError):
                raise FabricError(StatusCode.UNAVAILABLE, "artifact stream ended with its client", retryable=True) from None
            raise
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """End the stream (idempotent); the node's side is cancelled if it is still open."""
        self._done()


def _realize_body(req: Request) -> dict:
    """The ``realize`` open body of ``req`` (specs/wire.md section 13)."""
    body = {"evaluator": req.evaluator, "version": req.version, "args": req.args}
    if req.version is not None:
        body["key"] = req.key  # a hint the node may answer a hit with
    return body


#: Request keys per ``lookup`` request of :meth:`RemoteFabric.arealize_many` (the node takes up to ``fabric.serve.LOOKUP_MAX``).
LOOKUP_BATCH = 256
#: Room left in a ``lookup`` reply frame for everything but the records (nil entries, bin headers, the holder).
LOOKUP_MARGIN = 8192


async def _lookup_hits(client: WireClient, reqs: list[Request], answers: list[Any]) -> list[int]:
    """Ask the node for the records it holds of ``reqs`` (op ``lookup``); put each verified
    hit's :class:`Reply` (or the DATA_LOSS of a record that fails verification) in
    ``answers`` and return the indexes still to realize, in order.  Requests without a
    version (their key depends on the node's choice) and every request of a lookup the
    node refused are left to realize.  A request whose key cannot be made (INVALID_ARGUMENT
    args) gets that error as its answer, alone."""
    asked = []
    for i, r in enumerate(reqs):
        if r.version is not None:
            try:
                r.key  # made (and kept) here: args that cannot be encoded raise
            except FabricError as exc:
                answers[i] = exc
                continue
            asked.append(i)
    max_bytes = min(client.limits.max_frame_bytes, client.limits.max_bytes_per_stream) - LOOKUP_MARGIN
    if not asked or max_bytes <= 0:
        return [i for i, a in enumerate(answers) if a is None]
    batches = [asked[j : j + LOOKUP_BATCH] for j in range(0, len(asked), LOOKUP_BATCH)]

    def take(b: int, reply: Any, items: list) -> None:
        idx = batches[b]
        records = reply.get("records") if type(reply) is dict else None
        holder = reply.get("holder") if type(reply) is dict else None
        if type(records) is not list or len(records) != len(idx) or type(holder) is not str:
            raise FabricError(StatusCode.DATA_LOSS, "malformed lookup reply from node")
        for i, raw in zip(idx, records):
            if raw is None:
                continue
            req = reqs[i]
            try:
                if type(raw) is not bytes:
                    raise FabricError(StatusCode.DATA_LOSS, "malformed lookup reply from node: record is not bytes", key=req.key)
                rec = _check_record(req, req.key, raw)
                answers[i] = Reply(rec.key, codec.decode(rec.payload), "local", holder)
            except FabricError as exc:
                answers[i] = exc

    got = await client.call_many("lookup", [{"keys": [reqs[i].key for i in b], "max_bytes": max_bytes} for b in batches], then=take)
    for b, result in enumerate(got):
        if isinstance(result, FabricError):  # refused or malformed: these requests are realized instead
            for i in batches[b]:
                answers[i] = None
    return [i for i, a in enumerate(answers) if a is None]


def _check_record(req: Request, key: ContentKey, raw: bytes) -> Record:
    """The verified record ``raw`` of ``key``, which must be the key of ``req`` (recomputed
    from the record's version when ``req`` names none); DATA_LOSS otherwise."""
    rec = verify_record(raw, key)
    expect = req.key if req.version is not None else ContentKey.for_request(req.evaluator, rec.version, req.args)
    if key != expect or rec.evaluator != req.evaluator:
        raise FabricError(StatusCode.DATA_LOSS, "node answered with the record of another request", key=expect)
    return rec


def _check_realized(req: Request, reply: Any, raw: bytes) -> tuple[Record, str, str]:
    """``(record, source, holder)`` of a realize answer, once the record is verified and is
    the one of ``req`` (recomputed from the version the node used); DATA_LOSS otherwise."""
    key = reply.get("key")
    if type(key) is not ContentKey:
        raise FabricError(StatusCode.DATA_LOSS, "node answered realize without a content key")
    rec = _check_record(req, key, raw)
    source = reply.get("source")
    if source not in ("local", "peer", "computed"):
        raise FabricError(StatusCode.DATA_LOSS, f"node answered with an unknown source {source!r}", key=key)
    return rec, source, str(reply.get("holder", ""))


async def _stream_record(client: WireClient, op: str, body: Any) -> tuple[dict, bytes]:
    """Send ``op`` and return ``(reply, raw record)``, joining pushed pieces."""
    reply, items = await client.call(op, body)
    raw, _ = _take_record(reply, items)
    return reply, raw


def _take_record(reply: Any, items: list) -> tuple[bytes, list]:
    if not isinstance(reply, dict):
        raise FabricError(StatusCode.DATA_LOSS, f"malformed reply from node: {type(reply).__name__}")
    if "record" in reply:
        raw = reply["record"]
        if type(raw) is not bytes:
            raise FabricError(StatusCode.DATA_LOSS, "malformed reply from node: record is not bytes")
        return raw, items
    size = reply.get("record_size")
    if type(size) is not int or size < 0:
        raise FabricError(StatusCode.DATA_LOSS, "malformed reply from node: no record")
    parts, got = [], 0
    while got < size:
        if not items:
            raise FabricError(StatusCode.DATA_LOSS, f"node sent {got} of {size} record bytes")
        piece = items.pop(0)
        if type(piece) is not bytes:
            raise FabricError(StatusCode.DATA_LOSS, "malformed record piece from node")
        parts.append(piece)
        got += len(piece)
    if got != size:
        raise FabricError(StatusCode.DATA_LOSS, f"node sent {got} record bytes, announced {size}")
    return b"".join(parts), items


#: Verified chunks a streaming ``get_into`` lets arrive ahead of the copy into its target.
FILL_AHEAD = 4


async def _read_head(call: Any, key: ContentKey, wait_s: float = math.inf, keep: dict | None = None) -> dict:
    """Of a ``get`` stream of artifact ``key``: the announcement (after any ``obtaining``
    heartbeats of a fleet member fetching it), then the manifest record's pieces; returns the
    manifest once the record is verified and is that artifact's (and sets ``keep["record"]``
    to that verified record, when ``keep`` is given).  Each wait for the node is
    bounded by ``wait_s`` (a heartbeat starts a new one)."""
    while True:
        with bounded_wait(wait_s, "get: the manifest", key):
            first = await call.receive()
        if not (isinstance(first, Metadata) and isinstance(first.body, dict) and set(first.body) == {"obtaining"}):
            break
    body = first.body if isinstance(first, Metadata) else None
    size = body.get("record_size") if isinstance(body, dict) else None
    if type(size) is not int or size <= 0:
        raise FabricError(StatusCode.DATA_LOSS, "node did not announce the artifact's manifest record", key=key)
    parts: list[bytes] = []
    got = 0
    while got < size:
        with bounded_wait(wait_s, "get: the manifest", key):
            ev = await call.receive()
        if not isinstance(ev, StreamData) or type(ev.data) is not bytes:
            raise FabricError(StatusCode.DATA_LOSS, f"node sent {got} of the {size} bytes of the manifest record", key=key)
        parts.append(ev.data)
        got += len(ev.data)
    if got != size:
        raise FabricError(StatusCode.DATA_LOSS, f"node sent {got} manifest record bytes, announced {size}", key=key)
    rec = verify_record(b"".join(parts), key)
    manifest = _manifest_of(key, rec)
    if keep is not None:
        keep["record"] = rec
    return manifest


def _queued_work(out: Any) -> Any:
    """For a CuPy ``out``: an event after the work this thread has queued on its current stream
    (:func:`gpu.queued_work`), which the fill, on a trio worker thread, must wait for too."""
    if not hasattr(out, "__cuda_array_interface__"):
        return None
    from gpu import queued_work

    return queued_work(out)


async def _take_ready(recv: trio.MemoryReceiveChannel) -> list:
    """The next item of ``recv`` and every one already behind it (one trip from a worker
    thread into trio per batch, not per chunk); EndOfChannel when none is left."""
    got = [await recv.receive()]
    while True:
        try:
            got.append(recv.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel):
            return got


async def _stream_artifact(client: WireClient, key: ContentKey, consume: Callable[[Callable[[], tuple[dict, Any]]], Any],
                           wait_s: float = math.inf, keep: dict | None = None) -> Any:
    """One streaming ``get`` of artifact ``key``: a task reads the stream (manifest first,
    then chunks, at most :data:`FILL_AHEAD` ahead of what the worker took: it takes every
    chunk that has arrived in one trip into trio, so at most twice that are held) while a
    worker thread runs ``consume(stream)``, where ``stream()`` gives ``(manifest, chunks)``, the chunks
    verified as they come (:func:`fabric.artifacts.verified_chunks`) — e.g.
    :func:`fabric.artifacts.fill_target`, which checks its target before calling it.
    Returns what ``consume`` returns.  ``wait_s`` bounds each wait for the node: the manifest,
    then each chunk (not the waits for ``consume`` to take one); a longer one is a retryable
    DEADLINE_EXCEEDED naming what did not arrive.  ``keep``: see :func:`_read_head`."""
    head = trio.Event()
    state: dict[str, Any] = {}
    errors: list[Exception] = []  # the reader's (FabricError), then the filler's (whatever consume raised)
    send, recv = trio.open_memory_channel(FILL_AHEAD)
    token = trio.lowlevel.current_trio_token()  # stream() also works from a thread trio did not start
    async with client.stream("get", {"key": key}) as call:

        async def read() -> None:
            try:
                manifest = state["manifest"] = await _read_head(call, key, wait_s, keep)
                head.set()
                for i in range(len(manifest["chunks"])):
                    with bounded_wait(wait_s, f"get: chunk {i}", key):
                        ev = await call.receive()
                    if not isinstance(ev, StreamData):
                        break  # too few chunks: the filler's count check says so
                    await send.send(ev.data)
            except FabricError as exc:
                errors.insert(0, exc)
            finally:
                head.set()
                send.close()

        def stream() -> tuple[dict, Any]:  # in the worker thread, once out is a usable target
            trio.from_thread.run(head.wait, trio_token=token)
            if "manifest" not in state:
                raise errors[0] if errors else FabricError(StatusCode.UNAVAILABLE, "get stopped before the manifest arrived", key=key, retryable=True)

            def chunks():
                while True:
                    try:
                        yield from trio.from_thread.run(_take_ready, recv, trio_token=token)
                    except trio.EndOfChannel:
                        if errors:
                            raise errors[0] from None  # what stopped the reader, not a short count
                        return

            return state["manifest"], artifacts.verified_chunks(key, state["manifest"], chunks())

        async with trio.open_nursery() as nursery:

            async def fill() -> None:
                try:
                    state["out"] = await trio.to_thread.run_sync(consume, stream)
                except Exception as exc:  # noqa: BLE001 - raised below as it is (a caller's progress callback's own
                    errors.append(exc)  # error too), not wrapped in this nursery's ExceptionGroup
                finally:
                    nursery.cancel_scope.cancel()  # the reader has nothing left to do for us

            nursery.start_soon(read)
            nursery.start_soon(fill)
        if errors:
            raise errors[0]
        final = await call.receive()
        if not isinstance(final, Response):
            raise FabricError(StatusCode.DATA_LOSS, "node sent more chunks than the manifest lists", key=key)
    return state["out"]


async def _get_items(client: WireClient, key: ContentKey, progress: Callable[[int], None] | None) -> tuple[Any, list]:
    """Op ``get`` of ``key`` (a reply's or a blob's; artifacts stream, :func:`_stream_artifact`):
    ``(reply, pushed items)``; with ``progress``, read item by item, reporting the bytes
    received so far after each."""
    if progress is None:
        return await client.call("get", {"key": key})
    items: list = []
    got = 0
    async with client.stream("get", {"key": key}) as call:
        async for item in call:
            items.append(item)
            if type(item) is bytes:
                got += len(item)
                progress(got)
    return call.response, items


def _manifest_of(key: ContentKey, rec: Record) -> dict:
    """The manifest in a verified record of artifact ``key``: it must be a well-formed,
    canonical manifest whose key is ``key`` (DATA_LOSS otherwise)."""
    try:
        got, manifest = artifacts.parse_manifest(rec.payload)
    except FabricError as exc:
        raise FabricError(StatusCode.DATA_LOSS, f"node sent a malformed artifact manifest: {exc.message}", key=key) from None
    if got != key:
        raise FabricError(StatusCode.DATA_LOSS, "node sent the manifest of another artifact", key=key)
    return manifest
