"""``put`` through a node: both ends of the ``put`` op (specs/wire.md section 13).

The client cuts the content with the embedded put's chunking
(:class:`fabric.artifacts.ChunkPlan`), so it knows every chunk key, the
manifest and the artifact key before it sends a byte.  Then, in rounds:

1. it opens an upload (``open`` op ``put``, ``end`` false) whose body is
   ``{"manifest": canonical manifest bytes}``;
2. the node checks the manifest, and answers one ``metadata``
   ``{"key": artifact key, "missing": [chunk indexes]}``: the first index of
   every distinct chunk it lacks, a stored chunk whose bytes no longer match
   its key counted as lacking, so a put repairs it as the embedded put does
   (none if it holds the artifact intact);
3. the client pushes those chunks, in that order, one ``push`` (bin) each, as
   many as the node's per-stream byte limit allows, then ``close``;
4. the node checks each pushed chunk against the key the manifest gives it
   (DATA_LOSS at the first mismatch: nothing of that chunk is stored and no
   manifest recorded) and stores verified chunks as they arrive, a few per
   group commit.  At the end of the upload, if every chunk is held, it checks
   the chunk sizes and the content digest, records the manifest (only now is
   the artifact visible), announces it to the fleet, and answers
   ``{"key", "complete": true, "received", "size", "digest", "dtype",
   "shape", "chunks"}``; otherwise (listed chunks it still lacks)
   ``{"key", "complete": false, "received", "missing": count}`` and the
   client runs another round.

Chunks a node stored stay stored when an upload breaks off (a cancel, a lost
connection, a DATA_LOSS), so calling ``put`` again resumes: the node's
``missing`` list then names only what it still lacks.  Until the manifest is
recorded, ``get`` of the artifact key is NOT_FOUND.

Chunk size: :data:`fabric.artifacts.DEFAULT_CHUNK` (the embedded put's, so
equal content gets one key either way) unless the node's ``max_frame_bytes``
is too small for a push of that size, then the largest that fits.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import trio

from cassette.errors import FabricError, StatusCode
from cassette.keys import ContentKey
from fabric import artifacts
from fabric.errors import bounded_wait

if TYPE_CHECKING:
    from fabric.net import ServerCall, WireClient
    from fabric.serve import NodeService
    from fabric.wire import AdvertisedLimits

__all__ = ["chunk_size_for", "upload", "serve_put", "PUSH_OVERHEAD", "PUT_BATCH"]

log = logging.getLogger("fabric.node")

#: Bytes a ``push`` frame adds around its data (envelope, MAC, message map; about 80), with room to spare.
PUSH_OVERHEAD = 256
#: Room kept in the node's per-stream byte budget for the ``open`` map and the ``close``.
STREAM_MARGIN = 4096
#: Verified uploaded chunks a node keeps before storing them in one group commit.
PUT_BATCH = 4


# ============================================================================ client
def chunk_size_for(limits: "AdvertisedLimits", chunk_size: int | None = None) -> int:
    """The chunk size for a put to a peer with ``limits``: ``chunk_size`` if given (it must
    fit one push frame: INVALID_ARGUMENT otherwise), else the default capped to what fits."""
    fit = limits.max_frame_bytes - PUSH_OVERHEAD
    if chunk_size is None:
        return min(artifacts.DEFAULT_CHUNK, fit)
    if isinstance(chunk_size, int) and chunk_size > fit:
        raise FabricError(
            StatusCode.INVALID_ARGUMENT,
            f"chunk_size {chunk_size} does not fit the node's {limits.max_frame_bytes}-byte frames (at most {fit})",
        )
    return chunk_size


async def upload(run: Callable[[Callable[["WireClient"], Awaitable[Any]]], Awaitable[Any]], plan: artifacts.ChunkPlan,
                 on_chunk: Callable[[int], None] | None = None, progress: Callable[[int], None] | None = None) -> dict:
    """Run ``put`` rounds until the node records ``plan``'s manifest; returns the node's final
    reply.  ``run(fn)`` awaits ``fn(client)`` (or ``fn(client, wait_s=...)``, bounding each wait
    for the node) on a connection to the node, with the caller's retries, once per round (a
    retried round sends only what the node still lacks).  ``on_chunk(nbytes)`` is called per chunk pushed.
    ``progress(n)``: ``n`` bytes of the content the node holds, as far as this upload knows —
    once per round when the node has said what it lacks, then after each chunk pushed (a chunk
    that occurs several times in the content counts at each place); increasing (a retried
    round that finds less held than was pushed before the break reports nothing until it is
    past it), and the last call, once the put is complete, has the content's size."""
    report = _Increasing(progress) if progress is not None else None
    while True:
        reply, sent = await run(functools.partial(_round, plan=plan, on_chunk=on_chunk, progress=report))
        if reply.get("complete") is True:
            if report is not None:
                report(plan.manifest["size"])  # the node may hold chunks this upload did not push
            return reply
        if sent == 0:
            raise FabricError(StatusCode.INTERNAL, "node reports the put incomplete but lacks no chunk", key=plan.key)


async def _round(client: "WireClient", *, plan: artifacts.ChunkPlan, on_chunk: Callable[[int], None] | None,
                 progress: Callable[[int], None] | None = None, wait_s: float = math.inf) -> tuple[dict, int]:
    """One ``put`` request: learn what the node lacks, push what fits its per-stream budget, end.
    ``wait_s`` bounds each wait for the node (its list, its credit for the next chunk, its
    answer), not the round (specs/errors.md "Long transfers")."""
    from fabric.wire import Metadata

    limits = client.peer_limits
    if len(plan.payload) + PUSH_OVERHEAD > limits.max_frame_bytes:
        raise FabricError(
            StatusCode.RESOURCE_EXHAUSTED,
            f"the manifest of {len(plan.manifest['chunks'])} chunks ({len(plan.payload)} bytes) exceeds the node's "
            f"{limits.max_frame_bytes}-byte frames; put it with a larger chunk_size",
            key=plan.key,
        )
    budget = limits.max_bytes_per_stream - len(plan.payload) - STREAM_MARGIN
    sizes = plan.manifest["sizes"]
    async with client.stream("put", {"manifest": plan.payload}, upload=True, credit=0) as call:
        with bounded_wait(wait_s, "put: the node's list of missing chunks", plan.key):
            first = await call.receive()
        if not isinstance(first, Metadata):
            raise FabricError(StatusCode.INTERNAL, "node answered put without listing the chunks it lacks", key=plan.key)
        sent = used = 0
        todo = _missing_list(first.body, plan)
        held = _Held(plan, todo, progress) if progress is not None else None
        for i in todo:
            cost = sizes[i] + PUSH_OVERHEAD
            if sent and used + cost > budget:
                break  # the rest goes in the next round (a fresh per-stream budget)
            data = plan.chunk(i)
            with bounded_wait(wait_s, f"put: the node's credit for chunk {i}", plan.key):
                await call.send(data)
            sent += 1
            used += cost
            if on_chunk is not None:
                on_chunk(sizes[i])
            if held is not None:
                held.pushed(i)
        await call.end()
        with bounded_wait(wait_s, "put: the node's answer", plan.key):
            reply = await call.result()
    if not isinstance(reply, dict) or reply.get("key") != plan.key or reply.get("received") != sent:
        raise FabricError(StatusCode.INTERNAL, f"node's put reply does not match the upload: {_short(reply)}", key=plan.key)
    return reply, sent


class _Increasing:
    """``progress`` called only with counts above the last one it was given."""

    def __init__(self, progress: Callable[[int], None]) -> None:
        self._progress = progress
        self._last = -1

    def __call__(self, n: int) -> None:
        if n > self._last:
            self._last = n
            self._progress(n)


class _Held:
    """Bytes of the content a node holds during one round, for ``progress``: what it did not
    list as missing, plus every place in the content of each chunk pushed since."""

    def __init__(self, plan: artifacts.ChunkPlan, todo: list[int], progress: Callable[[int], None]) -> None:
        chunks, sizes = plan.manifest["chunks"], plan.manifest["sizes"]
        lacking = {chunks[i] for i in todo}
        self._weight: dict[ContentKey, int] = dict.fromkeys(lacking, 0)  # content bytes of each missing chunk
        for ck, n in zip(chunks, sizes):
            if ck in lacking:
                self._weight[ck] += n
        self._chunks = chunks
        self._progress = progress
        self.held = plan.manifest["size"] - sum(self._weight.values())
        progress(self.held)

    def pushed(self, i: int) -> None:
        self.held += self._weight.pop(self._chunks[i], 0)
        self._progress(self.held)


def _missing_list(body: Any, plan: artifacts.ChunkPlan) -> list[int]:
    n = len(plan.manifest["chunks"])
    if not isinstance(body, dict) or body.get("key") != plan.key:
        raise FabricError(StatusCode.INTERNAL, "node computed another key for the manifest", key=plan.key)
    todo = body.get("missing")
    if type(todo) is not list or not all(type(i) is int and 0 <= i < n for i in todo) or todo != sorted(set(todo)):
        raise FabricError(StatusCode.INTERNAL, "node's list of missing chunks is malformed", key=plan.key)
    return todo


def _short(v: Any) -> str:
    return repr(v)[:200]


# ============================================================================== node
async def serve_put(call: "ServerCall", service: "NodeService") -> dict:
    """The node's ``put`` handler (see the module docstring).

    Like the embedded put, it repairs what it holds: a chunk whose stored bytes no longer
    match its key is listed as missing even when the artifact is recorded, and a manifest
    row that fails its check is recorded afresh once the chunks check."""
    body = call.body
    if not call.upload or not isinstance(body, dict) or set(body) != {"manifest"}:
        raise FabricError(StatusCode.INVALID_ARGUMENT, "put: open an upload (end false) with body {'manifest': bytes}")
    key, manifest = artifacts.parse_manifest(body["manifest"])
    cas = service.fab.cassette
    chunks: list[ContentKey] = manifest["chunks"]
    held = await trio.to_thread.run_sync(cas.get_record, key) is not None  # recorded, and its row checks
    todo = _first_missing(chunks, await trio.to_thread.run_sync(functools.partial(cas.missing, chunks, verify_blobs=True)))
    await call.send_metadata({"key": key, "missing": todo})
    service._begin()
    try:
        received = await _receive_chunks(call, cas, key, manifest, todo)
        # what was listed and not pushed may have come meanwhile (another upload); a bad copy is still lacking
        rest = [chunks[i] for i in todo[received:]]  # (distinct: todo lists each key's first index)
        left = await trio.to_thread.run_sync(functools.partial(cas.missing, rest, verify_blobs=True)) if rest else []
        if left:
            return {"key": key, "complete": False, "received": received, "missing": len(left)}
        if not held:
            # every chunk is held: the sizes and the digest must be theirs before the manifest is recorded
            await trio.to_thread.run_sync(artifacts.check_content, cas, key, manifest)
            await cas.aput(key, body["manifest"], evaluator="", version="")
            if service.fleet is not None:
                await service.fleet.announce_recorded()
            log.info("put %s: recorded (%d chunks, %d received)", key.short(), len(chunks), received)
    finally:
        service._end()
    ref = artifacts._ref(key, manifest)
    return {"key": key, "complete": True, "received": received, "size": ref.size_bytes, "digest": manifest["digest"],
            "dtype": ref.dtype, "shape": manifest["shape"], "chunks": ref.chunks}


def _first_missing(chunks: list[ContentKey], lacking: list[ContentKey]) -> list[int]:
    """The first index in ``chunks`` of each key in ``lacking``, ascending (the ``missing`` list)."""
    want = set(lacking)
    todo = []
    for i, ck in enumerate(chunks):
        if ck in want:
            want.discard(ck)
            todo.append(i)
    return todo


async def _receive_chunks(call: "ServerCall", cas: Any, key: ContentKey, manifest: dict, todo: list[int]) -> int:
    """Read the pushed chunks (the ``todo`` indexes, in order), verify each, store them in
    batches; what was verified is stored even when the upload breaks off."""
    chunks, sizes = manifest["chunks"], manifest["sizes"]
    batch: list[tuple[ContentKey, bytes]] = []
    received = 0
    try:
        async for item in call:
            if received >= len(todo):
                raise FabricError(StatusCode.INVALID_ARGUMENT, f"put: pushed more than the {len(todo)} chunks the node asked for", key=key)
            i = todo[received]
            if type(item) is not bytes:
                raise FabricError(StatusCode.INVALID_ARGUMENT, f"put: chunk {i} must be bytes, got {type(item).__name__}", key=key)
            if len(item) != sizes[i] or ContentKey.of("blob", item) != chunks[i]:
                raise FabricError(StatusCode.DATA_LOSS, f"put: pushed chunk {i} does not match its key {chunks[i].short()} in the manifest", key=key)
            batch.append((chunks[i], item))
            received += 1
            if len(batch) >= PUT_BATCH:
                await cas.aput_blobs(batch, verified=True)
                batch = []
    finally:
        if batch:
            with trio.CancelScope(shield=True):  # verified chunks are kept for a resumed put
                await cas.aput_blobs(batch, verified=True)
    return received
