"""What a node answers over the wire: ContentServeFabric and the node's op handlers.

Ops (normative: ``specs/wire.md`` section 13):

* ``realize`` ``{"evaluator", "version" | None, "args"}``: look up or compute on
  this node (or, for a relay, fetch from upstream), record, answer the record.
* ``fetch`` ``{"key"}``: :class:`ContentServeFabric` — the record of a key this
  node holds, NOT_FOUND otherwise; it never computes.
* ``get`` ``{"key"}``: a reply's record, or an artifact's manifest record
  followed by its chunks.
* ``holders`` ``{"key"}``: node ids known to hold the key.
* ``lookup`` ``{"keys", "max_bytes"}``: the records of those request keys this
  node holds, answered at once as realize hits; never computes nor asks peers.
* ``put`` ``{"manifest"}`` (an upload): the chunks this node lacks, verified as
  they arrive; the manifest recorded once all are held (:mod:`fabric.upload`).
* ``verify``, ``export``, ``replay``: scrub this node's cassette, stream its
  ledger file, append a ledger file's verified entries (:mod:`fabric.admin`).

A record travels as its raw ledger value (``cassette.record`` layout) so the
receiver verifies it exactly as the cassette does: CRC, BLAKE3 digest of the
payload, and that the record's key is the key asked for.  A record larger than
:data:`INLINE_MAX` is pushed in chunks after the reply's ``record_size``.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Callable

import trio

from cassette.errors import FabricError, StatusCode
from cassette.keys import ContentKey
from cassette.record import Record, unpack_record
from cassette.store import Cassette
from fabric import metrics, registry
from fabric.net import DEFER
from fabric.request import Request

if TYPE_CHECKING:
    from fabric.local import Fabric
    from fabric.net import ServerCall

__all__ = ["ContentServeFabric", "KeyFlights", "NodeService", "INLINE_MAX", "RECORD_CHUNK", "LOOKUP_MAX", "LOOKUP_REPLY_MAX",
           "OBTAIN_HEARTBEAT_S", "verify_record", "EVALUATOR_ERROR"]

log = logging.getLogger("fabric.node")

#: Records up to this size travel inside the reply; larger ones are pushed in chunks.
INLINE_MAX = 1 << 20
#: Chunk size for pushed records and artifact chunks.
RECORD_CHUNK = 1 << 20
#: Most request keys one ``lookup`` may name (its rows are read inline, in the event loop).
LOOKUP_MAX = 256
#: Most record bytes one ``lookup`` reply carries, whatever the client allows.
LOOKUP_REPLY_MAX = 2 << 20
#: Message prefix marking an evaluator's own exception carried in a fault.
EVALUATOR_ERROR = "evaluator raised "
#: The ``op`` label of each wire op a node handles (:mod:`fabric.metrics`); any other is ``node_other``.
_NODE_OPS = {op: f"node_{op}" for op in ("realize", "fetch", "get", "holders", "lookup", "put", "verify", "export", "replay", "gossip")}
#: While a fleet member obtains an artifact for a ``get`` (before its manifest can go out), it
#: sends a ``metadata`` ``{"obtaining": verified chunk bytes fetched so far}`` this often, so a client that bounds
#: each wait for the node (fabric.remote) sees progress and does not give up on a long fetch.
OBTAIN_HEARTBEAT_S = 5.0


def verify_record(raw: bytes, key: ContentKey, expected_digest: bytes | None = None) -> Record:
    """Check a record received from elsewhere: its CRC, its BLAKE3 digest, that it is
    the record of ``key`` and (when known) that its digest is ``expected_digest``.
    Any mismatch is DATA_LOSS naming the key; the bytes must then be discarded."""
    try:
        rec = unpack_record(raw)
    except FabricError as exc:
        raise FabricError(StatusCode.DATA_LOSS, f"received record fails verification: {exc.message}", key=key) from None
    if rec.key != key:
        raise FabricError(StatusCode.DATA_LOSS, f"received the record of {rec.key.short()} instead", key=key)
    if expected_digest is not None and rec.digest != expected_digest:
        raise FabricError(StatusCode.DATA_LOSS, "received record's digest differs from the holder's announced digest", key=key)
    return rec


def evaluator_fault(exc: Exception, key: ContentKey) -> FabricError:
    """An evaluator's own exception as the fault that carries it to the caller."""
    return FabricError(StatusCode.INTERNAL, f"{EVALUATOR_ERROR}{type(exc).__name__}: {exc}", retryable=False, key=key)


def local_reply(fab: "Fabric", key: ContentKey) -> dict:
    """The reply of a realize answered from this node's cassette (counted as a local hit)."""
    fab.local_hits += 1
    return {"key": key, "source": "local", "holder": fab.node_id}


async def answer_if_held(call: "ServerCall", fab: "Fabric", key: ContentKey) -> dict | None:
    """Answer a realize from this node's cassette as ``source="local"``, or None on a miss."""
    raw = fab.cassette.get_raw(key)
    if raw is None:
        return None
    return await send_record(call, raw, local_reply(fab, key))


async def answer_held(call: "ServerCall", cassette: Cassette, key: ContentKey, reply: dict) -> dict:
    """Answer with the row this node has just recorded for ``key``."""
    raw = cassette.get_raw(key)
    if raw is None:
        raise FabricError(StatusCode.INTERNAL, "reply vanished from the cassette after recording", key=key)
    return await send_record(call, raw, reply)


class KeyFlights:
    """Single-flight per key among the trio tasks of one node, for work that obtains a key
    from elsewhere (a forward to the home, a fetch from a holder, a relay upstream): while one
    task (the leader) runs it for a key, the others asking for that key wait for it instead of
    repeating it.  :meth:`lead` returns ``(True, result)`` to the leader, ``(False, None)`` to a
    waiter once the leader succeeded (it recorded the key: the waiter answers from the
    cassette), and raises to a waiter what the leader's attempt raised; a waiter whose leader
    was cancelled (its client went away) tries again itself.

    Only askers that may wait for another node belong here: a request a peer forwarded to this
    node as the key's home must not wait on a leader of this node that forwards elsewhere
    (two nodes with different views of the home would wait on each other).

    ``on_wait()`` is called once by each :meth:`lead` that finds the key in flight and
    waits (the nodes pass ``fabric_singleflight_coalesced_total``'s ``inc``)."""

    class _Turn:
        __slots__ = ("done", "ok", "error")

        def __init__(self) -> None:
            self.done = trio.Event()
            self.ok = False
            self.error: BaseException | None = None

    def __init__(self, on_wait: Callable[[], None] | None = None) -> None:
        self._turns: dict[ContentKey, KeyFlights._Turn] = {}
        self.on_wait = on_wait

    def __len__(self) -> int:
        return len(self._turns)

    async def lead(self, key: ContentKey, fn: Any) -> tuple[bool, Any]:
        """``await fn()`` for ``key`` unless another task is already running it (see the class)."""
        if self.on_wait is not None and key in self._turns:
            self.on_wait()
        while (turn := self._turns.get(key)) is not None:
            await turn.done.wait()
            if turn.ok:
                return False, None
            if turn.error is not None:
                raise turn.error
        turn = self._turns[key] = KeyFlights._Turn()
        try:
            result = await fn()
            turn.ok = True
            return True, result
        except Exception as exc:
            turn.error = exc
            raise
        finally:
            del self._turns[key]
            turn.done.set()

    async def share(self, key: ContentKey, fn: Any, held: Any) -> Any:
        """The answer for an asker of ``key``: ``await fn()`` if it leads (see :meth:`lead`);
        if it waited on a leader that succeeded, ``await held()``, the answer from what the
        leader recorded, or (``held()`` is None: nothing of it here) its own turn."""
        while True:
            led, reply = await self.lead(key, fn)
            if led:
                return reply
            hit = await held()
            if hit is not None:
                return hit


class ContentServeFabric:
    """The read side a node exposes to peers: answers only keys it holds, never computes."""

    def __init__(self, cassette: Cassette) -> None:
        self.cassette = cassette

    def fetch(self, key: ContentKey) -> bytes:
        """The raw, verified ledger value of a held key; NOT_FOUND if not held (or corrupt here)."""
        raw = self.cassette.get_raw(key)
        if raw is None:
            raise FabricError(StatusCode.NOT_FOUND, "not held by this node", key=key)
        return raw


def _key_field(body: Any) -> ContentKey:
    if not isinstance(body, dict):
        raise FabricError(StatusCode.INVALID_ARGUMENT, f"body: expected a map, got {type(body).__name__}")
    k = body.get("key")
    if isinstance(k, str):
        return ContentKey.parse(k)
    if type(k) is ContentKey:
        return k
    raise FabricError(StatusCode.INVALID_ARGUMENT, "body.key: expected a ContentKey")


def inline_record(raw: bytes, reply: dict) -> dict | None:
    """``reply`` carrying ``raw`` inline, or None when ``raw`` is too large to (see :func:`send_record`)."""
    if len(raw) > INLINE_MAX:
        return None
    reply["record"] = raw
    return reply


async def send_record(call: "ServerCall", raw: bytes, reply: dict) -> dict:
    """Put ``raw`` inline in ``reply``, or push it in chunks and announce its size."""
    if inline_record(raw, reply) is not None:
        return reply
    return await push_record(call, raw, reply)


async def push_record(call: "ServerCall", raw: bytes, reply: dict) -> dict:
    """Push ``raw`` in :data:`RECORD_CHUNK` pieces; ``reply`` announces its size (``record_size``)."""
    for off in range(0, len(raw), RECORD_CHUNK):
        await call.send(raw[off : off + RECORD_CHUNK])
    reply["record_size"] = len(raw)
    return reply


class NodeService:
    """The op handlers of a ``fabric node`` over its embedded :class:`~fabric.local.Fabric`.

    ``relay``: an optional upstream :class:`fabric.remote.RemoteFabric`; misses
    are forwarded to it and what comes back (verified) is recorded here, so this
    node becomes a holder (LedgeredRelayFabric).
    """

    def __init__(self, fab: "Fabric", *, relay: Any = None) -> None:
        self.fab = fab
        self.node_id = fab.node_id
        self.serve = ContentServeFabric(fab.cassette)
        self.relay = relay
        #: a relay's versions for requests that name none: evaluator -> the version its
        #: upstream last resolved such a request to (learned from the upstream's replies)
        self.relay_versions: dict[str, str] = {}
        #: set by the node when it runs in a fleet (:class:`fabric.fleet.Fleet`)
        self.fleet: Any = None
        self.caf: Any = None
        self.active_computations = 0
        self.idle = trio.Event()
        self.idle.set()
        #: held while a ``verify`` op scrubs the cassette (one scrub at a time)
        self.scrub_lock = trio.Lock()
        #: one relay forward per key at a time: concurrent askers of a key wait for it
        self.relaying = KeyFlights(on_wait=metrics.COALESCED.inc)

    def handle_now(self, op: str, body: Any) -> Any:
        """The node's ``fast`` handler (see :func:`fabric.net.serve`): answer at once what needs
        no waiting — a realize or fetch of a key held here whose record fits inline, and
        ``holders`` — and :data:`fabric.net.DEFER` everything else.  Not timed (a request
        answered here is a hit); a fault counted as in :meth:`handle`."""
        try:
            if op == "realize":
                hint = body.get("key") if type(body) is dict else None
                if type(hint) is ContentKey and hint.kind == "request" and type(body.get("version")) is str:
                    key = hint  # safe for a hit: the client checks the record is its request's; never recorded under
                else:
                    req = self._relay_versioned(self._realize_request(body))
                    if req.version is None:
                        return DEFER
                    key = req.key
                raw = self.fab.cassette.get_raw(key)
                if raw is None or len(raw) > INLINE_MAX:
                    return DEFER  # a miss, or a record that is pushed in pieces
                return inline_record(raw, local_reply(self.fab, key))
            if op == "fetch":
                key = _key_field(body)
                reply = inline_record(self.serve.fetch(key), {"key": key, "holder": self.node_id})
                return DEFER if reply is None else reply
            if op == "holders":
                return self.holders(_key_field(body))
            if op == "lookup":
                return self.lookup(body)
            return DEFER
        except Exception as exc:
            metrics.ERRORS.labels(op=_NODE_OPS.get(op, "node_other"), status=metrics.error_status(exc)).inc()
            raise

    async def handle(self, call: "ServerCall") -> Any:
        """Dispatch one wire request by op name (:meth:`_dispatch`), timed in
        ``fabric_operation_latency_seconds{op="node_OP"}``; a fault it ends in (a cut-off by
        the request's deadline included) counted in ``fabric_operation_errors_total``."""
        op = _NODE_OPS.get(call.op, "node_other")
        t0 = time.perf_counter()
        try:
            return await self._dispatch(call)
        except Exception as exc:
            metrics.ERRORS.labels(op=op, status=metrics.error_status(exc)).inc()
            raise
        except trio.Cancelled:
            if trio.current_time() >= call.deadline:  # fabric.net answers DEADLINE_EXCEEDED
                metrics.ERRORS.labels(op=op, status="DEADLINE_EXCEEDED").inc()
            raise
        finally:
            metrics.LATENCY.labels(op=op).observe(time.perf_counter() - t0)

    async def _dispatch(self, call: "ServerCall") -> Any:
        op = call.op
        if op == "realize":
            return await self.realize(call)
        if op == "fetch":
            key = _key_field(call.body)
            return await send_record(call, self.serve.fetch(key), {"key": key, "holder": self.node_id})
        if op == "get":
            return await self.get(call)
        if op == "holders":
            return self.holders(_key_field(call.body))
        if op == "lookup":
            return self.lookup(call.body)
        if op == "put":
            from fabric.upload import serve_put

            return await serve_put(call, self)
        if op in ("verify", "export", "replay"):
            from fabric.admin import serve_admin

            return await serve_admin(call, self)
        if op == "gossip":
            if self.fleet is None:
                raise FabricError(StatusCode.FAILED_PRECONDITION, "this node does not run gossip")
            return await self.fleet.handle(call)
        raise FabricError(StatusCode.UNIMPLEMENTED, f"unknown op {op!r}")

    def lookup(self, body: Any) -> dict:
        """Answer op ``lookup`` ``{"keys": [request ContentKey], "max_bytes": int}``: for each
        key, in order, the raw record this node holds (verified as a hit is), or nil when it
        does not hold it or the record would take the reply past ``max_bytes`` (capped at
        :data:`LOOKUP_REPLY_MAX`).  Each record answered counts as a local hit.  Never computes
        and never asks peers or an upstream: the client realizes what comes back nil."""
        if type(body) is not dict:
            raise FabricError(StatusCode.INVALID_ARGUMENT, f"body: expected a map, got {type(body).__name__}")
        keys, max_bytes = body.get("keys"), body.get("max_bytes")
        if type(keys) is not list or len(keys) > LOOKUP_MAX:
            raise FabricError(StatusCode.INVALID_ARGUMENT, f"body.keys: expected a list of at most {LOOKUP_MAX} request keys")
        for i, k in enumerate(keys):
            if type(k) is not ContentKey or k.kind != "request":
                raise FabricError(StatusCode.INVALID_ARGUMENT, f"body.keys[{i}]: expected a request ContentKey")
        if type(max_bytes) is not int or max_bytes < 0:
            raise FabricError(StatusCode.INVALID_ARGUMENT, "body.max_bytes: expected an int >= 0")
        records = self.fab.cassette.get_raw_many(keys, min(max_bytes, LOOKUP_REPLY_MAX))
        self.fab.local_hits += sum(r is not None for r in records)
        return {"holder": self.node_id, "records": records}

    def holders(self, key: ContentKey) -> list[str]:
        """Node ids known to hold ``key`` (this node, plus what the fleet index knows)."""
        if self.caf is not None:
            return self.caf.holders(key)
        return [self.node_id] if self.fab.cassette.contains(key) else []

    def _realize_request(self, body: Any) -> Request:
        """The :class:`~fabric.request.Request` a realize body names, checked as this node
        must: INVALID_ARGUMENT for a malformed body; NOT_FOUND for an evaluator this
        node cannot resolve (no version given) unless it is a relay or a fleet member,
        which route what they cannot compute (:mod:`fabric.fleet`)."""
        if not isinstance(body, dict) or not isinstance(body.get("evaluator"), str):
            raise FabricError(StatusCode.INVALID_ARGUMENT, "body: expected {'evaluator': str, 'version': str|None, 'args': map}")
        args = body.get("args", {})
        if type(args) is not dict:
            raise FabricError(StatusCode.INVALID_ARGUMENT, f"body.args: expected a map, got {type(args).__name__}")
        req = Request(body["evaluator"], args, version=body.get("version"))
        try:
            if req.version is None and self.relay is None and self.caf is None:
                registry.lookup(req.evaluator)  # NOT_FOUND listing what this node has
        except FabricError as exc:  # say whose registry that is: the client's may differ
            raise FabricError(exc.status_code, f"on node {self.node_id}: {exc.message}") from None
        return req

    def _relay_versioned(self, req: Request) -> Request:
        """``req``; on a relay, one that names no version gets the version the upstream
        last resolved that evaluator to, so it is looked up here first (spec: README relay)."""
        if req.version is None and self.relay is not None:
            version = self.relay_versions.get(req.evaluator)
            if version is not None:
                return Request(req.evaluator, req.args, version=version)
        return req

    async def realize(self, call: "ServerCall") -> dict:
        """Look up, relay or compute; answer ``{"key", "source", "holder", "record"}``."""
        body = call.body
        req = self._realize_request(body)
        if self.caf is not None:
            return await self.caf.realize(call, req, at_home=body.get("home") is True, begin=self._begin, end=self._end)
        held = self._relay_versioned(req)
        if held.version is not None:
            hit = await answer_if_held(call, self.fab, held.key)
            if hit is not None:
                return hit
        if self.relay is not None:
            if held.version is None:  # its key is the upstream's to choose
                return await self._relay(call, req)
            # (a waiter finds nothing when the upstream answered its leader with a newer version's record)
            return await self.relaying.share(held.key, lambda: self._relay(call, req),
                                             lambda: answer_if_held(call, self.fab, held.key))
        self._begin()
        try:
            rep = await self.fab.arealize(req)
        except FabricError:
            raise
        except Exception as exc:  # noqa: BLE001 - the evaluator's own error, carried to the caller
            raise evaluator_fault(exc, req.key) from None
        finally:
            self._end()
        return await answer_held(call, self.fab.cassette, rep.key, {"key": rep.key, "source": rep.source, "holder": self.node_id})

    async def _relay(self, call: "ServerCall", req: Any) -> dict:
        self._begin()
        try:
            rec, _, holder = await self.relay.aforward_record(req)  # verified (or DATA_LOSS), one attempt
            await self.fab.cassette.aput_record(rec)
            if req.version is None:
                self.relay_versions[req.evaluator] = rec.version
        finally:
            self._end()
        metrics.count_answer("peer")
        return await answer_held(call, self.fab.cassette, rec.key, {"key": rec.key, "source": "peer", "holder": holder})

    async def get(self, call: "ServerCall") -> dict:
        """A reply's record, or an artifact's manifest record plus its chunks as pushes.

        In a fleet, a record this node lacks *or holds corrupt* is obtained from a live holder
        first (:meth:`fabric.fleet.ContentAddressedFabric.obtain`: verified, recorded here
        afresh), and a chunk found corrupt here while the artifact is sent is fetched from a
        live holder of the artifact, verified, stored (repairing it) and sent.  NOT_FOUND when
        neither this node nor any live member holds it; DATA_LOSS when this node's copy is
        corrupt and no live holder serves a good one (UNAVAILABLE, retryable, when holders the
        index lists as live could not be reached)."""
        key = _key_field(call.body)
        cas = self.fab.cassette
        holder = self.node_id
        if self.relay is not None and not cas.contains(key):
            holder = await self._forward_get(call, key)
        if key.kind == "blob":
            data = cas.get_blob(key)
            if data is None:
                if cas.contains(key):  # stored, but its bytes no longer match its key
                    raise FabricError(StatusCode.DATA_LOSS, "the blob stored here is corrupt (put its content again to repair it)", key=key)
                raise FabricError(StatusCode.NOT_FOUND, "blob not held by this node", key=key)
            await call.send(data)
            return {"key": key, "chunks": 1}
        raw = cas.get_raw(key)
        if raw is None and self.caf is not None:
            # not held here, or held but corrupt: from a live holder, verified, recorded here (afresh);
            # an artifact's client hears progress meanwhile
            obtain = self.caf.obtain(key) if key.kind != "artifact" else \
                self._obtain_telling(call, lambda: self.caf.obtain(key), lambda: self.caf.obtaining_bytes(key))
            holder = await obtain
            raw = None if holder is None else cas.get_raw(key)
        if raw is None:  # (a fleet member asked the live holders first)
            fleet = self.caf is not None
            if cas.contains(key):  # indexed here, but its row fails its check
                raise FabricError(StatusCode.DATA_LOSS, "the record held here for this key is corrupt" + (
                    ", and no live member of the fleet holds a good copy" if fleet else
                    " (a realize records it afresh; an artifact is repaired by putting it again)"), key=key)
            raise FabricError(StatusCode.NOT_FOUND, "not held by this node" + (
                ", and no live member of the fleet holds it" if fleet else ""), key=key)
        if key.kind != "artifact":
            return await send_record(call, raw, {"key": key, "holder": holder})
        # an artifact: announce, push the manifest record, then every chunk in order, so the
        # client can check its target against the manifest and use each chunk as it arrives
        from cassette import codec

        manifest = unpack_record(raw)
        chunks = codec.decode(manifest.payload)["chunks"]
        await call.send_metadata({"record_size": len(raw), "chunks": len(chunks)})
        reply = await push_record(call, raw, {"key": key, "holder": holder})
        for ck in chunks:
            data = cas.get_blob(ck)
            if data is None and self.caf is not None:  # corrupt (or lost) here: a live holder's copy repairs it
                data = await self.caf.repair_chunk(key, manifest.digest, ck)
            if data is None:  # the artifact is recorded here, so each of its chunks should be
                raise FabricError(StatusCode.DATA_LOSS, f"chunk {ck.short()} of this artifact is missing or corrupt "
                                  "on this node (putting the artifact again repairs it)", key=key)
            await call.send(data)
        reply["chunks"] = len(chunks)
        return reply

    async def _forward_get(self, call: "ServerCall", key: ContentKey) -> str:
        """A relay's ``get`` miss: make this node hold ``key`` from the upstream (verified, an
        artifact streamed into the cassette and recorded last: :meth:`RemoteFabric.aforward_get`);
        concurrent askers of a key share one forward (:class:`KeyFlights`), and an artifact's
        client hears ``obtaining`` progress meanwhile, as from a fleet member.  Returns the holder."""
        fetched = [0]  # verified bytes stored so far (an artifact's)

        def forward() -> Any:
            return self.relay.aforward_get(key, self.fab.cassette, lambda n: fetched.__setitem__(0, n))

        async def lead() -> str:
            led, holder = await self.relaying.lead(key, forward)
            return holder if led else self.node_id

        if key.kind != "artifact":
            return await lead()
        return await self._obtain_telling(call, lead, lambda: fetched[0])

    async def _obtain_telling(self, call: "ServerCall", obtain: Callable[[], Any], fetched: Callable[[], int]) -> Any:
        """``await obtain()``, sending ``call`` a ``metadata`` ``{"obtaining": fetched()}`` (verified
        bytes fetched so far) every :data:`OBTAIN_HEARTBEAT_S` until it returns."""
        async with trio.open_nursery() as nursery:

            async def tell() -> None:
                while True:
                    await trio.sleep(OBTAIN_HEARTBEAT_S)
                    try:
                        await call.send_metadata({"obtaining": fetched()})
                    except FabricError:
                        return  # the client is gone: the fetch goes on (it serves the next asker too)

            nursery.start_soon(tell)
            try:
                holder = await obtain()
            except FabricError as exc:  # re-raised after the nursery, so not wrapped in an ExceptionGroup
                error = exc
            else:
                error = None
            nursery.cancel_scope.cancel()
        if error is not None:
            raise error
        return holder

    def _begin(self) -> None:
        self.active_computations += 1
        if self.idle.is_set():
            self.idle = trio.Event()

    def _end(self) -> None:
        self.active_computations -= 1
        if self.active_computations == 0:
            self.idle.set()
