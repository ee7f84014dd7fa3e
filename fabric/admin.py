"""Node administration over the wire: both ends of the ``verify``, ``export`` and
``replay`` ops (normative: ``specs/wire.md`` section 13).

* ``verify`` (body nil): the node scrubs its own cassette
  (:meth:`cassette.store.Cassette.scrub`, step by step in a worker thread, so a
  node shutting down stops it between steps) and answers
  ``{"records", "indexed", "blobs", "problems": [{"code", "message", "key"}],
  "problem_count"}``; at most :data:`MAX_PROBLEMS` problems travel,
  ``problem_count`` is the true count.  The client gets a
  :class:`NodeVerifyReport`.
* ``export`` (body nil): the node pushes its portable ledger file
  (``specs/cassette-format.md`` section 9) as ``push`` items of bytes, the very
  chunks :func:`cassette.ledgerfile.iter_ledger_file_bytes` yields (each made in
  a worker thread), then answers ``{"records", "bytes"}``.  The client writes
  ``FILE.tmp-PID``, checks the magic, the version, the trailer's BLAKE3 check
  over everything before it, its record count and the length against the reply,
  and only then fsyncs and renames to ``FILE``; on any failure the temporary
  file is removed and nothing is left at ``FILE``.
* ``replay`` (upload, body nil): the client validates the whole ledger file
  locally first (as an import does: nothing is sent if any byte is bad), then
  pushes its entries, byte for byte as in the file (``tag | length | body``,
  without header and trailer) cut into ``push`` items of at most 1 MiB (an
  entry may span items, an item may hold several entries): every blob entry
  first, then every record entry, so that an artifact's manifest reaches the
  node after its chunks.  The node verifies each record fully and each blob
  against its key before storing them in batches, refuses an artifact manifest
  whose chunks it does not hold, announces newly recorded keys to its fleet, and
  answers ``{"records", "appended", "blobs"}``.  Entries that do not fit one
  request's byte budget go in further ``replay`` requests (rounds); replaying a
  record already held is a no-op, so a retried round is harmless.

These ops trust any authenticated client exactly as the fleet's shared secret
does: whoever holds the secret may read every record (``export``) and add
verified ones (``replay``).
"""

from __future__ import annotations

import functools
import logging
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, BinaryIO, Callable, Iterator

import blake3
import trio

from cassette.errors import FabricError, StatusCode
from cassette.keys import ContentKey
from cassette.ledgerfile import (
    EXPORT_CHUNK,
    LEDGER_FILE_VERSION,
    MAGIC,
    REPLAY_BATCH,
    REPLAY_BATCH_BYTES,
    TRAILER_SIZE,
    EntryReader,
    check_write_target,
    entry_header,
    iter_ledger_file,
    iter_ledger_file_bytes,
    validate_entry,
    validate_ledger_file,
    write_error,
)
from cassette.record import unpack_record
from cassette.store import PutResult, VerifyReport
from fabric.errors import RetryPolicy
from fabric.upload import PUSH_OVERHEAD, STREAM_MARGIN

if TYPE_CHECKING:
    from cassette.store import Cassette
    from fabric.net import ServerCall, WireClient
    from fabric.serve import NodeService
    from fabric.wire import AdvertisedLimits

__all__ = [
    "OPS", "ADMIN_POLICY", "MAX_PROBLEMS", "NodeVerifyReport", "verify_report", "receive_export", "send_replay",
    "serve_admin",
]

log = logging.getLogger("fabric.node")

#: The ops of this module.
OPS = frozenset({"verify", "export", "replay"})
#: Retries of the admin ops: their work grows with the cassette, so no overall deadline
#: (a retry redoes a scrub or an export from the start, or resends one replay round).
ADMIN_POLICY = RetryPolicy(attempts=2, deadline_s=math.inf)
#: Problems a ``verify`` answer carries at most (``problem_count`` is the true count).
MAX_PROBLEMS = 100
#: Bytes of entries one ``replay`` request carries at most (less when the node's per-stream budget is smaller).
REPLAY_ROUND_BYTES = 64 << 20
#: ``max_bytes_per_stream`` a client advertises on its export connection: the file is written as it comes.
EXPORT_STREAM_BYTES = 2**63 - 1
_HEAD = len(MAGIC) + 4


def _no_body(call: "ServerCall") -> None:
    if call.body not in (None, {}):
        raise FabricError(StatusCode.INVALID_ARGUMENT, f"{call.op}: body must be nil or an empty map")


# ============================================================================ verify
@dataclass
class NodeVerifyReport(VerifyReport):
    """A node's scrub (:meth:`cassette.store.Cassette.verify`) as the ``verify`` op answered it.

    ``problems`` holds at most :data:`MAX_PROBLEMS` DATA_LOSS errors (each naming
    its key where known); ``problem_count`` is how many the node found.
    """

    problem_count: int = 0
    node_id: str = ""

    @property
    def ok(self) -> bool:
        """True when the node found nothing wrong."""
        return self.problem_count == 0 and not self.problems


def verify_report(reply: Any, node_id: str = "") -> NodeVerifyReport:
    """The :class:`NodeVerifyReport` of a ``verify`` reply; INTERNAL if it is malformed."""
    counts = ("records", "indexed", "blobs", "problem_count")
    if (type(reply) is not dict or not all(type(reply.get(k)) is int and reply[k] >= 0 for k in counts)
            or type(reply.get("problems")) is not list):
        raise FabricError(StatusCode.INTERNAL, f"malformed verify reply from node {node_id}: {reply!r:.200}")
    problems = []
    for p in reply["problems"]:
        if type(p) is not dict or type(p.get("code")) is not str or type(p.get("message")) is not str:
            raise FabricError(StatusCode.INTERNAL, f"malformed verify problem from node {node_id}: {p!r:.200}")
        key = p.get("key")
        try:
            problems.append(FabricError(p["code"], p["message"], key=key if type(key) is ContentKey else None))
        except ValueError:
            raise FabricError(StatusCode.INTERNAL, f"verify problem with unknown status {p['code']!r} from node {node_id}") from None
    if len(problems) > reply["problem_count"]:
        raise FabricError(StatusCode.INTERNAL, f"node {node_id} lists more verify problems than it counts")
    return NodeVerifyReport(records=reply["records"], blobs=reply["blobs"], indexed=reply["indexed"], problems=problems,
                            problem_count=reply["problem_count"], node_id=node_id)


async def _serve_verify(call: "ServerCall", service: "NodeService") -> dict:
    _no_body(call)
    async with service.scrub_lock:  # one scrub at a time per node: concurrent verifies queue
        rep = VerifyReport()
        steps = service.fab.cassette.scrub(rep)  # short read transactions; stops between steps if cancelled
        try:
            while await trio.to_thread.run_sync(next, steps, None) is not None:
                pass
        finally:
            steps.close()
    log.info("verify for %s: %d rows, %d index entries, %d blobs, %d problem(s)", call.peer, rep.records, rep.indexed,
             rep.blobs, len(rep.problems))
    return {
        "records": rep.records,
        "indexed": rep.indexed,
        "blobs": rep.blobs,
        "problems": [{"code": p.status_code.name, "message": p.message, "key": p.key if type(p.key) is ContentKey else None}
                     for p in rep.problems[:MAX_PROBLEMS]],
        "problem_count": len(rep.problems),
    }


# ============================================================================ export
async def _serve_export(call: "ServerCall", service: "NodeService") -> dict:
    _no_body(call)
    size = max(1, min(EXPORT_CHUNK, call.peer_limits.max_frame_bytes - PUSH_OVERHEAD))
    it = iter_ledger_file_bytes(service.fab.cassette, chunk_size=size)
    try:
        while True:
            chunk = await trio.to_thread.run_sync(next, it, None)  # reads and hashes off the node's loop
            if chunk is None:
                break
            await call.send(chunk)
    finally:
        it.close()
    log.info("export for %s: %d records, %d bytes", call.peer, it.records, it.nbytes)
    return {"records": it.records, "bytes": it.nbytes}


class _ExportCheck:
    """Running checks of a received ledger file: its head, the BLAKE3 of all but the trailer, the trailer."""

    def __init__(self) -> None:
        self.h = blake3.blake3()
        self.head = b""
        self.tail = b""  # the last TRAILER_SIZE bytes seen so far (not hashed yet)
        self.nbytes = 0

    def update(self, data: bytes) -> None:
        self.nbytes += len(data)
        if len(self.head) < _HEAD:
            self.head += data[: _HEAD - len(self.head)]
        if len(data) >= TRAILER_SIZE:
            self.h.update(self.tail)
            self.h.update(memoryview(data)[:-TRAILER_SIZE])
            self.tail = data[-TRAILER_SIZE:]
            return
        t = self.tail + data
        cut = len(t) - TRAILER_SIZE
        if cut > 0:
            self.h.update(t[:cut])
            t = t[cut:]
        self.tail = t

    def finish(self, reply: Any, name: str) -> int:
        """The record count, once every check passed; DATA_LOSS (or FAILED_PRECONDITION for a newer format) otherwise."""
        if type(reply) is not dict or type(reply.get("records")) is not int or type(reply.get("bytes")) is not int:
            raise FabricError(StatusCode.DATA_LOSS, f"export to {name}: malformed final reply from the node: {reply!r:.200}")
        if len(self.head) < _HEAD or self.head[: len(MAGIC)] != MAGIC:
            raise FabricError(StatusCode.DATA_LOSS, f"export to {name}: the node's stream is not a ledger file (bad magic)")
        version = int.from_bytes(self.head[len(MAGIC) :], "big")
        if version > LEDGER_FILE_VERSION:
            raise FabricError(StatusCode.FAILED_PRECONDITION,
                              f"export to {name}: the node sent ledger file version {version}, newer than supported ({LEDGER_FILE_VERSION})")
        if self.nbytes != reply["bytes"]:
            raise FabricError(StatusCode.DATA_LOSS, f"export to {name}: received {self.nbytes} bytes, the node sent {reply['bytes']}")
        t = self.tail
        if (len(t) != TRAILER_SIZE or self.nbytes < _HEAD + TRAILER_SIZE or t[:9] != entry_header(b"E", 40)
                or t[17:] != self.h.digest()):
            raise FabricError(StatusCode.DATA_LOSS, f"export to {name}: the trailer check does not match the bytes received")
        count = int.from_bytes(t[9:17], "big")
        if count != reply["records"]:
            raise FabricError(StatusCode.DATA_LOSS, f"export to {name}: the trailer counts {count} records, the node {reply['records']}")
        return count


async def receive_export(client: "WireClient", path: str | os.PathLike, progress: Callable[[int], None] | None = None) -> int:
    """Run ``export`` on ``client`` into ``path`` (see the module docstring); returns the record count.

    ``progress(bytes received)`` is called per chunk.  The connection must
    accept the whole file on one stream (its ``max_bytes_per_stream``).
    """
    name = os.fspath(path)
    target = check_write_target(name)  # before the node streams the whole ledger
    tmp = f"{target}.tmp-{os.getpid()}"
    try:
        f = open(tmp, "wb")
    except OSError as exc:
        raise write_error(name, exc) from None
    done = False
    try:
        with f:
            check = _ExportCheck()
            async with client.stream("export", None) as call:
                async for item in call:
                    if type(item) is not bytes:
                        raise FabricError(StatusCode.DATA_LOSS, f"export to {name}: the node pushed a {type(item).__name__}, not bytes")
                    check.update(item)
                    try:
                        f.write(item)
                    except OSError as exc:
                        raise write_error(name, exc) from None
                    if progress is not None:
                        progress(check.nbytes)
                reply = call.response
            records = check.finish(reply, name)
            try:
                f.flush()
                os.fsync(f.fileno())
            except OSError as exc:
                raise write_error(name, exc) from None
        try:
            os.replace(tmp, target)
        except OSError as exc:
            raise write_error(name, exc) from None
        done = True
    finally:
        if not done:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
    return records


# ============================================================================ replay
class _UploadOrder:
    """The entries of a (validated) ledger file, blobs first, then records, taken a round at a time."""

    def __init__(self, f: BinaryIO, name: str) -> None:
        self._it = self._entries(f, name)
        self._carry: tuple[bytes, bytes, int] | None = None

    @staticmethod
    def _entries(f: BinaryIO, name: str) -> Iterator[tuple[bytes, bytes, int]]:
        for want in (b"B", b"R"):
            f.seek(0)
            for tag, body, offset in iter_ledger_file(f, path=name):
                if tag == want:
                    yield tag, body, offset

    def take(self, budget: int, chunk: int) -> list[tuple[bytes, bytes, int]]:
        """The next entries whose pushes (cut into ``chunk``-byte items) fit ``budget`` bytes; [] at the end."""
        out: list[tuple[bytes, bytes, int]] = []
        used = 0
        while True:
            entry = self._carry if self._carry is not None else next(self._it, None)
            self._carry = None
            if entry is None:
                return out
            n = used + 9 + len(entry[1])
            if n + (n // chunk + 1) * PUSH_OVERHEAD > budget:
                if not out:
                    raise FabricError(StatusCode.RESOURCE_EXHAUSTED,
                                      f"the ledger entry at offset {entry[2]} ({len(entry[1])} bytes) does not fit the node's "
                                      f"per-request byte budget ({budget} bytes); replay this file with --data on the node's dir")
                self._carry = entry
                return out
            out.append(entry)
            used = n


def _round_budget(limits: "AdvertisedLimits") -> tuple[int, int]:
    chunk = max(1, min(EXPORT_CHUNK, limits.max_frame_bytes - PUSH_OVERHEAD))
    return min(REPLAY_ROUND_BYTES, limits.max_bytes_per_stream - STREAM_MARGIN), chunk


async def _replay_round(client: "WireClient", *, entries: list[tuple[bytes, bytes, int]], chunk: int) -> dict:
    async with client.stream("replay", None, upload=True, credit=0) as call:
        buf = bytearray()
        for tag, body, _ in entries:
            buf += entry_header(tag, len(body))
            buf += body
            while len(buf) >= chunk:
                await call.send(bytes(buf[:chunk]))
                del buf[:chunk]
        if buf:
            await call.send(bytes(buf))
        await call.end()
        reply = await call.result()
    records = sum(tag == b"R" for tag, _, _ in entries)
    if (type(reply) is not dict or not all(type(reply.get(k)) is int and reply[k] >= 0 for k in ("records", "appended", "blobs"))
            or reply["records"] != records or reply["blobs"] != len(entries) - records or reply["appended"] > records):
        raise FabricError(StatusCode.INTERNAL, f"node's replay reply does not match the upload: {reply!r:.200}")
    return reply


async def send_replay(run: Callable[[Callable[["WireClient"], Awaitable[Any]]], Awaitable[Any]], path: str | os.PathLike,
                      progress: Callable[[int], None] | None = None) -> dict:
    """Replay the ledger file at ``path`` into a node (see the module docstring).

    ``run(fn)`` awaits ``fn(client)`` on a connection to the node with the caller's
    retries, once per round.  Returns ``{"records", "appended", "blobs"}`` summed
    over the rounds.  Nothing is sent unless the whole file validates.
    ``progress(entries sent)`` is called per round.
    """
    name = os.fspath(path)
    await trio.to_thread.run_sync(validate_ledger_file, name)  # NOT_FOUND / INVALID_ARGUMENT / DATA_LOSS, nothing sent

    async def limits(client: "WireClient") -> "AdvertisedLimits":
        return client.peer_limits

    budget, chunk = _round_budget(await run(limits))
    totals = {"records": 0, "appended": 0, "blobs": 0}
    sent = 0
    with open(name, "rb") as f:
        order = _UploadOrder(f, name)
        while True:
            entries = await trio.to_thread.run_sync(order.take, budget, chunk)
            if not entries:
                return totals
            reply = await run(functools.partial(_replay_round, entries=entries, chunk=chunk))
            for k in totals:
                totals[k] += reply[k]
            sent += len(entries)
            if progress is not None:
                progress(sent)


def _artifact_chunks(body: bytes) -> list[ContentKey] | None:
    """The chunk keys of a record whose key is an artifact's (its payload must be that artifact's
    manifest); None for any other record.  Raises DATA_LOSS / INVALID_ARGUMENT for a bad one."""
    from fabric import artifacts

    try:  # spec cassette-format.md section 11: the key sits at offset 16 of a ledger value
        if ContentKey.from_bytes(body[16:49]).kind != "artifact":
            return None
    except FabricError:
        return None  # not a well-formed record: the cassette's verification names it
    rec = unpack_record(body)
    key, manifest = artifacts.parse_manifest(rec.payload)
    if key != rec.key:
        raise FabricError(StatusCode.DATA_LOSS, "an artifact record whose payload is not that artifact's manifest", key=rec.key)
    return manifest["chunks"]


def _lacking_chunk(cas: "Cassette", body: bytes, also_held: set[ContentKey] | None = None) -> ContentKey | None:
    """A chunk named by an artifact record that ``cas`` lacks (and ``also_held`` does not list), else None."""
    chunks = _artifact_chunks(body)
    if not chunks:
        return None
    missing = [k for k in cas.missing(list(dict.fromkeys(chunks))) if not also_held or k not in also_held]
    return missing[0] if missing else None


def _put(cas: "Cassette", entries: list[tuple[bytes, bytes, int]]) -> list[PutResult]:
    """Blobs, then records, each group verified by the cassette (all or nothing per group)."""
    blobs = [(ContentKey.from_bytes(body[:33]), body[33:]) for tag, body, _ in entries if tag == b"B"]
    if blobs:
        cas.put_verified_blobs(blobs)
    recs = [body for tag, body, _ in entries if tag == b"R"]
    for body in recs:
        if _lacking_chunk(cas, body) is not None:
            raise FabricError(StatusCode.FAILED_PRECONDITION, "an artifact manifest whose chunks are not held")
    return cas.put_raw_many(recs) if recs else []


def _store_batch(cas: "Cassette", entries: list[tuple[bytes, bytes, int]], where: str) -> tuple[list[PutResult], FabricError | None]:
    """Verify and store one batch of replayed entries: ``(the records' put results, error)``.

    ``error`` is the error of the first bad entry (in stream order), naming its
    offset; every entry before it was stored, and no record after it.
    """
    try:
        return _put(cas, entries), None
    except FabricError as exc:
        first = exc
    # slow path, only after a failure: find the first bad entry and store what precedes it
    held: set[ContentKey] = set()
    for i, (tag, body, offset) in enumerate(entries):
        try:
            validate_entry(tag, body, offset, where)
            if tag == b"B":
                held.add(ContentKey.from_bytes(body[:33]))
                continue
            try:
                lacking = _lacking_chunk(cas, body, held)
            except FabricError as exc:
                raise FabricError(exc.status_code, f"{where}: record at offset {offset}: {exc.message}", key=exc.key) from None
            if lacking is not None:
                raise FabricError(StatusCode.FAILED_PRECONDITION,
                                  f"{where}: the artifact record at offset {offset} names chunk {lacking} that this node does "
                                  f"not hold (blob entries must come before the manifests that use them)", key=lacking)
        except FabricError as exc:
            return _put(cas, entries[:i]), exc
    raise first  # every entry is fine on its own: the batch failed for another reason (the writer)


async def _serve_replay(call: "ServerCall", service: "NodeService") -> dict:
    if not call.upload:
        raise FabricError(StatusCode.INVALID_ARGUMENT, "replay: open an upload (end false) with body nil")
    _no_body(call)
    cas = service.fab.cassette
    where = f"replay upload from {call.peer}"
    reader = EntryReader(where=where)
    pending: list[tuple[bytes, bytes, int]] = []
    pending_bytes = 0
    counts = {"records": 0, "appended": 0, "blobs": 0}

    async def flush() -> None:
        nonlocal pending, pending_bytes
        if not pending:
            return
        batch, pending, pending_bytes = pending, [], 0
        results, error = await trio.to_thread.run_sync(_store_batch, cas, batch, where)  # hashing off the node's loop
        counts["records"] += len(results)
        counts["blobs"] += sum(tag == b"B" for tag, _, _ in batch)
        appended = sum(1 for r in results if r.appended)
        counts["appended"] += appended
        if appended and service.fleet is not None:
            await service.fleet.announce_recorded()
        if error is not None:
            raise error

    service._begin()  # a node shutting down lets the replay's writes finish
    try:
        try:
            async for item in call:
                if type(item) is not bytes:
                    raise FabricError(StatusCode.INVALID_ARGUMENT, f"{where}: items must be bytes, got {type(item).__name__}")
                for entry in reader.feed(item):
                    pending.append(entry)
                    pending_bytes += len(entry[1])
                    if len(pending) >= REPLAY_BATCH or pending_bytes >= REPLAY_BATCH_BYTES:
                        await flush()
            reader.close()
        except BaseException:
            with trio.CancelScope(shield=True):
                await flush()  # entries before the failure are kept (an earlier bad one's error wins)
            raise
        await flush()
    finally:
        service._end()
    log.info("replay from %s: %d records (%d new), %d blobs", call.peer, counts["records"], counts["appended"], counts["blobs"])
    return counts


# ============================================================================= node
async def serve_admin(call: "ServerCall", service: "NodeService") -> dict:
    """The node's handler of the ops in :data:`OPS`."""
    if call.op == "verify":
        return await _serve_verify(call, service)
    if call.op == "export":
        return await _serve_export(call, service)
    return await _serve_replay(call, service)
