"""Audit of ``put`` through a node (fabric/upload.py, RemoteFabric.put, parse_manifest).

Real ``fabric node`` subprocesses (tests/_nodes.py) and, where a test needs small
per-stream limits (rounds), an embedded fabric served on 127.0.0.1 in this process.
Raw wire sessions play a lying client exactly as the node sees one.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import threading
from contextlib import contextmanager
from pathlib import Path

import blake3
import numpy as np
import pytest
import trio

import fabric
from cassette.errors import FabricError, StatusCode
from cassette.keys import ContentKey
from conftest import flip_in_file
from fabric.artifacts import ChunkPlan, build_manifest, parse_manifest
from fabric.local import Fabric
from fabric.net import open_connection
from fabric.remote import RemoteFabric
from fabric.wire import Metadata, StreamFrameLimits
from _nodes import FABRIC, ROOT, SECRET, _readline, in_process_node, node, start_node, stop_node

MiB = 1 << 20
#: An in-process node whose requests carry at most 1 MiB each: 15 chunks of 64 KiB frames per round.
SMALL_LIMITS = StreamFrameLimits(max_frame_bytes=64 << 10, max_bytes_per_stream=1 << 20)
SMALL_CHUNK = (64 << 10) - 256  # what a client puts to such a node


def _raw_put(addr: str, payload: bytes, pushes) -> tuple[list[int], dict]:
    """Open a put with manifest ``payload``, push ``pushes(missing)``, end; ``(missing, reply)``."""
    host, port = addr.rsplit(":", 1)

    async def main():
        async with await open_connection(host, int(port), SECRET) as client:
            async with client.stream("put", {"manifest": payload}, upload=True, credit=0) as call:
                md = await call.receive()
                assert isinstance(md, Metadata)
                todo = md.body["missing"]
                for item in pushes(todo):
                    await call.send(item)
                await call.end()
                return todo, await call.result()

    return trio.run(main)


def _manifest(chunks: list[bytes], **kw) -> tuple[ContentKey, bytes]:
    sizes = kw.pop("sizes", [len(c) for c in chunks])
    key, payload, _ = build_manifest([ContentKey.of("blob", c) for c in chunks], sizes, kw.pop("size", sum(sizes)),
                                     blake3.blake3(b"".join(chunks)).digest(), kw.pop("dtype", None), kw.pop("shape", None))
    return key, payload


def _status(fn, *args) -> FabricError:
    with pytest.raises(FabricError) as ei:
        fn(*args)
    return ei.value


def _verify_clean(data: Path) -> str:
    r = subprocess.run([FABRIC, "verify", "--data", str(data)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and " 0 problem(s)" in r.stdout, (r.stdout, r.stderr)
    return r.stdout


# ------------------------------------------------------------------ repairs
def test_a_put_through_a_node_repairs_a_rotted_chunk_and_a_rotted_manifest_row_of_a_held_artifact(tmp_path):
    """The embedded put repairs both (missing(verify_blobs=True), cassette put of a key whose
    row fails); through a node the artifact counted as held, so the put answered complete,
    sent nothing, and the artifact stayed unreadable."""
    chunks = [os.urandom(8192) for _ in range(3)]
    a, b = b"".join(chunks), os.urandom(20_000)
    with node(tmp_path, "n", "--durability", "fast") as (addr, _, data), fabric.open(addr, secret=SECRET) as f:
        ref_a, ref_b = f.put(a, chunk_size=8192), f.put(b, chunk_size=8192)
    with ChunkPlan(b, chunk_size=8192) as plan_b:
        b_manifest = plan_b.payload
    flip_in_file(data / "data.mdb", chunks[1][2000:2100])  # a chunk of A
    flip_in_file(data / "data.mdb", b_manifest)  # B's manifest row: its CRC fails
    with node(tmp_path, "n", "--durability", "fast") as (addr, proc, _), fabric.open(addr, secret=SECRET) as f:
        for ref in (ref_a, ref_b):
            assert _status(f.get, ref).status_code in (StatusCode.DATA_LOSS, StatusCode.NOT_FOUND)
        assert f.put(a, chunk_size=8192) == ref_a and f.chunks_uploaded == 1  # only the rotted chunk travels
        assert f.get(ref_a) == a
        assert f.put(b, chunk_size=8192) == ref_b and f.chunks_uploaded == 1  # every chunk of B is intact
        assert f.get(ref_b) == b
        assert f.put(a, chunk_size=8192) == ref_a and f.chunks_uploaded == 1  # all intact now: nothing sent
        assert proc.poll() is None


def test_a_put_in_rounds_lists_rotted_chunks_past_the_first_round_as_still_missing(tmp_path):
    """20 held chunks rot; a put of the same bytes as another artifact (a uint8 array, not
    held) must resend them over two rounds.  The node used to recheck only that every chunk
    was present after round 1, so the 5 rotted chunks beyond it reached the content check:
    DATA_LOSS, though the client had good copies to send."""
    chunks = [os.urandom(SMALL_CHUNK) for _ in range(20)]
    data = b"".join(chunks)
    with Fabric(tmp_path / "n", durability="fast") as fab:
        held = fab.put(data, chunk_size=SMALL_CHUNK)
    for c in chunks:
        flip_in_file(tmp_path / "n" / "data.mdb", c[:64])

    async def main():
        with Fabric(tmp_path / "n", durability="fast") as fab:
            async with in_process_node(fab, SMALL_LIMITS) as (addr, _):
                with RemoteFabric(addr, SECRET) as f:
                    ref = await f.aput(np.frombuffer(data, np.uint8))
                    assert f.chunks_uploaded == 20 and ref.chunks == 20 and ref.key != held.key
                    assert (await f.aget(ref)).tobytes() == data
                    assert await f.aget(held) == data  # the bytes artifact shares the repaired chunks

    trio.run(main)


# ------------------------------------------------------------- lying manifests
@pytest.mark.parametrize("shape", [[1] * 65, [2**63, 0]], ids=["65-dims", "dim-past-intp"])
def test_a_manifest_whose_shape_numpy_cannot_make_is_invalid_argument_and_nothing_is_recorded(tmp_path, shape):
    """Such a manifest was recorded; every get of it then raised numpy's ValueError
    (INTERNAL), through the node and embedded alike."""
    content = b"\x01" if 0 not in shape else b""
    key, payload = _manifest([content], dtype="|u1", shape=shape)
    err = _status(parse_manifest, payload)
    assert err.status_code is StatusCode.INVALID_ARGUMENT and "numpy" in err.message
    with node(tmp_path, "n", "--durability", "fast") as (addr, proc, _), fabric.open(addr, secret=SECRET) as f:
        err = _status(_raw_put, addr, payload, lambda todo: [content] * len(todo))
        assert err.status_code is StatusCode.INVALID_ARGUMENT and "\n" not in err.message
        assert _status(f.get, key).status_code is StatusCode.NOT_FOUND
        assert f.put(np.ones((1,) * 64, np.uint8)).shape == (1,) * 64  # numpy's most dimensions still go in
        assert proc.poll() is None


def test_lying_clients_get_one_line_errors_nothing_wrong_is_recorded_and_the_node_keeps_serving(tmp_path):
    """Guard (sound on the old code): more chunks than listed, chunks out of order, a
    size the chunk does not have, duplicate keys with different sizes, a wrong digest."""
    x, y, z, w = (os.urandom(3000) for _ in range(4))  # a chunk a case stored stays stored: one each
    cases = {
        "more": (_manifest([x]), lambda todo: [x, x], StatusCode.INVALID_ARGUMENT),
        "order": (_manifest([y, z]), lambda todo: [z, y], StatusCode.DATA_LOSS),
        "size": (_manifest([w], sizes=[3001]), lambda todo: [w], StatusCode.DATA_LOSS),
        "dup-sizes": (_manifest([x, x], sizes=[3000, 3001]), lambda todo: [x] * len(todo), StatusCode.DATA_LOSS),
        "digest": (build_manifest([ContentKey.of("blob", y)], [3000], 3000, b"\0" * 32, None, None)[:2],
                   lambda todo: [y] * len(todo), StatusCode.DATA_LOSS),
    }
    with node(tmp_path, "n", "--durability", "fast") as (addr, proc, data), fabric.open(addr, secret=SECRET) as f:
        for name, ((key, payload), pushes, status) in cases.items():
            err = _status(_raw_put, addr, payload, pushes)
            assert err.status_code is status and "\n" not in err.message, (name, err)
            assert _status(f.get, key).status_code is StatusCode.NOT_FOUND, name
        todo, reply = _raw_put(addr, _manifest([x, y, os.urandom(10)])[1], lambda todo: [])  # fewer: an early end
        assert reply["complete"] is False and reply["received"] == 0
        assert f.get(f.put(x + y + z + w, chunk_size=3000)) == x + y + z + w
        assert proc.poll() is None
    _verify_clean(data)


# ----------------------------------------------------------------- concurrency
def test_concurrent_puts_of_one_artifact_record_it_once_and_answer_one_ref(tmp_path):
    """Guard (sound on the old code): 6 clients at once; one ledger row, each chunk one blob."""
    content = os.urandom(2 * MiB)
    refs, errors = [], []

    def put(addr: str) -> None:
        try:
            with fabric.open(addr, secret=SECRET) as f:
                refs.append(f.put(content, chunk_size=1 << 18))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    with node(tmp_path, "n", "--durability", "fast") as (addr, _, data), fabric.open(addr, secret=SECRET) as f:
        threads = [threading.Thread(target=put, args=(addr,)) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors and len(refs) == 6 and len(set(refs)) == 1
        st = f.stats()["node"]
        assert (st["records"], st["ledger_rows"], st["blobs"]) == (1, 1, 8)
        assert f.get(refs[0]) == content
    _verify_clean(data)


# -------------------------------------------------------------------- progress
def test_progress_keeps_increasing_across_a_round_retried_after_a_kill_9_and_the_data_dir_verifies(tmp_path):
    """The node is killed (-9) after 13 of 20 chunks were pushed (it stored at most 12: it
    stores them 4 at a time) and is back on its port before the client notices; the retried
    round found 8-12 MiB held and reported that, after 13 MiB."""
    addr, proc, data = start_node(tmp_path, "n", evaluators=None)
    box = {"proc": proc}
    content = os.urandom(20 * MiB)
    seen: list[int] = []

    def restart() -> None:
        stop_node(box["proc"], signal.SIGKILL)
        box["proc"] = subprocess.Popen([FABRIC, "node", "--data", str(data), "--listen", addr, "--secret-file",
                                        str(tmp_path / "secret")], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                       text=True, cwd=str(ROOT))
        assert _readline(box["proc"], 30).startswith(f"listening on {addr} ")

    def progress(n: int) -> None:
        if n == 13 * MiB and 13 * MiB not in seen:
            restart()
        seen.append(n)

    try:
        with fabric.open(addr, secret=SECRET) as f:
            ref = f.put(content, progress=progress)
            assert f.chunks_uploaded > 20  # the retried round sent again what the kill lost
            assert f.get(ref) == content
    finally:
        stop_node(box["proc"])
    assert all(a < b for a, b in zip(seen, seen[1:])), seen
    assert seen[0] == 0 and seen[-1] == len(content)
    _verify_clean(data)


@contextmanager
def _node_thread(path: Path, limits: StreamFrameLimits):
    """An embedded fabric at ``path`` served with ``limits`` by a trio run in its own thread
    (so sync clients in this thread and in callbacks can all use it); yields its address."""
    addr: queue.SimpleQueue = queue.SimpleQueue()
    stop: list = []

    async def main() -> None:
        with Fabric(path, durability="fast") as fab:
            async with in_process_node(fab, limits) as (at, _):
                done = trio.Event()
                stop.append((trio.lowlevel.current_trio_token(), done))
                addr.put(at)
                await done.wait()

    t = threading.Thread(target=trio.run, args=(main,), daemon=True)
    t.start()
    try:
        yield addr.get(timeout=10)
    finally:
        token, done = stop[0]
        trio.from_thread.run_sync(done.set, trio_token=token)
        t.join(10)


def test_progress_ends_at_the_size_when_another_client_completes_the_artifact_meanwhile(tmp_path):
    """A's first round may push only 15 of 49 chunks; B puts the whole artifact before A
    pushes any, so the node answers A complete after that round: A's progress stopped at
    its 15 chunks instead of ending at the content's size."""
    content = os.urandom(3 * MiB)
    seen: list[int] = []
    with _node_thread(tmp_path / "n", SMALL_LIMITS) as addr, fabric.open(addr, secret=SECRET) as a, \
            fabric.open(addr, secret=SECRET) as b:

        def progress(n: int) -> None:  # on A's portal thread: B puts from a thread of its own
            if not seen:
                t = threading.Thread(target=b.put, args=(content,))  # all of it, before A pushes a chunk
                t.start()
                t.join(30)
            seen.append(n)

        ref = a.put(content, progress=progress)
        assert b.chunks_uploaded == ref.chunks == 49 and 0 < a.chunks_uploaded < 49
        assert a.get(ref) == content
    assert seen[0] == 0 and seen[-1] == len(content), seen
    assert all(x < y for x, y in zip(seen, seen[1:])), seen


# ------------------------------------------------------------------ gets of damaged data
def test_a_get_through_a_node_of_damaged_data_is_data_loss_naming_what_is_damaged(tmp_path):
    """What a node recorded and then lost to damage is DATA_LOSS through a node, as it is
    embedded (``artifacts.get``): a rotted chunk of a held artifact, a reply row that fails its
    check, a rotted blob.  Was NOT_FOUND "not held by this node" for all three.  A key never
    held stays NOT_FOUND, and the node keeps serving what is intact."""
    chunks = [os.urandom(8192) for _ in range(3)]
    text = "the quick brown fox " * 40
    with node(tmp_path, "n", "--durability", "fast") as (addr, _, data), fabric.open(addr, secret=SECRET) as f:
        ref = f.put(b"".join(chunks), chunk_size=8192)
        intact = f.put(os.urandom(5000))
        rep = f.realize(fabric.Request("text.stats", {"text": text}))
        assert rep.source == "computed"
        reply_row = f.get(rep.key)
    flip_in_file(data / "data.mdb", chunks[2][100:200])
    from cassette import codec

    flip_in_file(data / "data.mdb", codec.encode(reply_row))
    with node(tmp_path, "n", "--durability", "fast") as (addr, proc, _), fabric.open(addr, secret=SECRET) as f:
        err = _status(f.get, ref)
        assert err.status_code is StatusCode.DATA_LOSS and err.key == str(ref.key) and "chunk" in err.message
        err = _status(f.get, ContentKey.of("blob", chunks[2]))
        assert err.status_code is StatusCode.DATA_LOSS and "corrupt" in err.message
        err = _status(f.get, rep.key)
        assert err.status_code is StatusCode.DATA_LOSS and err.key == str(rep.key)
        assert _status(f.get, ContentKey.of("blob", b"never stored")).status_code is StatusCode.NOT_FOUND
        assert f.get(intact) is not None and f.get(ContentKey.of("blob", chunks[0])) == chunks[0]
        assert f.realize(fabric.Request("text.stats", {"text": text})).value == reply_row  # recorded afresh
        assert f.get(rep.key) == reply_row
        assert proc.poll() is None
