"""``fabric verify / export / replay --node``: the admin ops over the authenticated wire
(specs/wire.md section 13, fabric/admin.py), against real `fabric node` subprocesses on 127.0.0.1."""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
from pathlib import Path

import blake3
import pytest
import trio

import fabric
from cassette import codec
from cassette.keys import ContentKey
from cassette.ledgerfile import entry_header, iter_ledger_file_bytes
from cassette.record import pack_record
from cassette.store import Cassette
from conftest import ROOT, child_env, flip_in_file
from fabric import cli
from fabric.artifacts import ChunkPlan
from fabric.errors import FabricError, StatusCode
from fabric.net import open_connection, serve
from fabric.registry import load_evaluators
from fabric.remote import RemoteFabric

from _nodes import EVALUATORS, FABRIC, SECRET, node, start_node, stop_node

# a word that appears once, in one reply's payload (text.stats lists its top words)
MARKER = "qzxvmarkerwordforthecorruptiontest"
TEXTS = ["to be or not to be", f"{MARKER} {MARKER} appears twice", "the quick brown fox", "a b a"]


def _requests() -> list[fabric.Request]:
    return [fabric.Request("text.stats", {"text": t}, version="1") for t in TEXTS]


def _content() -> bytes:
    return blake3.blake3(b"admin test content").digest(length=300_000)  # 4 distinct chunks of up to 80,000 bytes


def _secret_file(tmp_path: Path) -> Path:
    p = tmp_path / "secret"
    p.write_bytes(SECRET)
    return p


def _cli_sub(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([FABRIC, *map(str, args)], cwd=ROOT, env=child_env(tmp_path / "home"), capture_output=True,
                          text=True, timeout=60)


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0


def _seed(addr: str) -> tuple[list, object]:
    """Realize TEXTS and put _content() through the node; returns (replies, artifact ref)."""
    with fabric.open(addr, secret=SECRET) as f:
        reps = [f.realize(r) for r in _requests()]
        assert [r.source for r in reps] == ["computed"] * len(TEXTS)
        ref = f.put(_content(), chunk_size=80_000)
    return reps, ref


# ----------------------------------------------------------------------- verify
def test_verify_through_node_counts_then_names_a_corrupt_key(tmp_path):
    secret = _secret_file(tmp_path)
    addr, proc, data = start_node(tmp_path)
    try:
        reps, ref = _seed(addr)
        ok = _cli_sub(tmp_path, "verify", "--node", addr, "--secret-file", secret)
        assert ok.returncode == 0, ok.stderr
        assert ok.stdout.strip() == "verified 5 ledger rows, 5 index entries, 4 blobs: 0 problem(s)"
        assert ok.stderr == ""
        _stop(proc)

        bad_key = reps[1].key
        assert flip_in_file(data / "data.mdb", MARKER.encode()) >= 1
        addr, proc, _ = start_node(tmp_path)  # same data dir
        bad = _cli_sub(tmp_path, "verify", "--node", addr, "--secret-file", secret)
        assert bad.returncode == 1, bad.stderr
        assert bad.stdout.strip() == "verified 5 ledger rows, 5 index entries, 4 blobs: 1 problem(s)"
        lines = bad.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("fabric verify: DATA_LOSS: ") and str(bad_key) in lines[0], lines

        with RemoteFabric(addr, SECRET) as f:
            rep = f.verify()
            assert not rep.ok and rep.problem_count == 1 and (rep.records, rep.indexed, rep.blobs) == (5, 5, 4)
            assert [(p.status_code, p.key) for p in rep.problems] == [(StatusCode.DATA_LOSS, bad_key)]
            assert rep.node_id == f.node_id
            # the node keeps serving: the other keys are hits, the corrupt one is recomputed
            assert f.realize(_requests()[0]).source == "local"
            assert f.realize(_requests()[1]).source == "computed"
    finally:
        stop_node(proc)


# ----------------------------------------------------------------------- export
def test_export_through_node_is_byte_identical_to_a_local_export_and_imports(tmp_path, capsys):
    secret = _secret_file(tmp_path)
    with node(tmp_path) as (addr, proc, data):
        reps, ref = _seed(addr)
        with RemoteFabric(addr, SECRET) as f:
            assert f.export(tmp_path / "api.ledger") == 5
            node_id = f.node_id
        assert cli.main(["export", str(tmp_path / "cli.ledger"), "--node", addr, "--secret-file", str(secret)]) == 0
        assert capsys.readouterr().out.strip() == f"exported 5 records from node {node_id} to {tmp_path / 'cli.ledger'}"
        _stop(proc)
    with Cassette(data) as cas:
        assert cas.export(tmp_path / "local.ledger") == 5
    local = (tmp_path / "local.ledger").read_bytes()
    assert (tmp_path / "api.ledger").read_bytes() == local
    assert (tmp_path / "cli.ledger").read_bytes() == local
    assert sorted(p.name for p in tmp_path.iterdir() if ".tmp-" in p.name) == []

    # the exported file seeds an empty dir that serves every key without computing
    load_evaluators(EVALUATORS)
    with Cassette.from_ledger(tmp_path / "seeded", tmp_path / "api.ledger") as cas:
        assert cas.last_replay.rows == 5 and cas.verify().ok
    with fabric.open(tmp_path / "seeded") as f:
        for req, want in zip(_requests(), reps):
            got = f.realize(req)
            assert got.source == "local" and codec.encode(got.value) == codec.encode(want.value)
        assert f.get(ref.key) == _content()


def _failed_export(target: Path, handler) -> FabricError:
    """Export into ``target`` from an in-process server whose handler is ``handler(call)``; the error it fails with."""
    errors = []

    async def main():
        async with trio.open_nursery() as n:
            listening = await n.start(functools.partial(serve, "127.0.0.1", 0, SECRET, handler, node_id="fake"))
            rf = RemoteFabric(f"127.0.0.1:{listening.port}", SECRET)
            try:
                await rf.aexport(target)
            except FabricError as exc:
                errors.append(exc)
            n.cancel_scope.cancel()

    trio.run(main)
    assert len(errors) == 1, "the export did not fail"
    return errors[0]


def test_a_broken_or_altered_export_stream_leaves_nothing_behind(tmp_path):
    with Cassette(tmp_path / "src") as cas:
        for i in range(20):
            cas.put(ContentKey.of("request", b"%d" % i), codec.encode({"i": i, "pad": "x" * 500}), evaluator="e", version="1")
        cas.put_blob(b"hello, cassette")
        chunks = list(iter_ledger_file_bytes(cas, chunk_size=1000))
    good = b"".join(chunks)
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 1

    def pusher(data: bytes, records: int = 20, nbytes: int | None = None, fail_after: int | None = None):
        async def handler(call):
            for i, off in enumerate(range(0, len(data), 1000)):
                if fail_after is not None and i == fail_after:
                    raise FabricError(StatusCode.INTERNAL, "node broke off")
                await call.send(data[off : off + 1000])
            return {"records": records, "bytes": len(data) if nbytes is None else nbytes}

        return handler

    cases = [
        (pusher(bytes(flipped)), StatusCode.DATA_LOSS, "trailer check"),
        (pusher(good[:-1], nbytes=len(good)), StatusCode.DATA_LOSS, "received"),
        (pusher(good, records=21), StatusCode.DATA_LOSS, "counts 20 records"),
        (pusher(good, fail_after=3), StatusCode.INTERNAL, "broke off"),
        (pusher(b"NOT-A-LEDGER" + good[12:]), StatusCode.DATA_LOSS, "bad magic"),
    ]
    out = tmp_path / "out"
    out.mkdir()
    for handler, status, text in cases:
        err = _failed_export(out / "x.ledger", handler)
        assert err.status_code is status and text in err.message, err
        assert list(out.iterdir()) == [], "a failed export left a file behind"

    # the whole file arrives, but FILE cannot take it (it is a directory): the temp file goes
    (out / "x.ledger").mkdir()
    (out / "x.ledger" / "keep").write_bytes(b"k")
    err = _failed_export(out / "x.ledger", pusher(good))
    assert err.status_code is StatusCode.FAILED_PRECONDITION and "cannot write ledger file" in err.message, err
    assert [p.name for p in out.iterdir()] == ["x.ledger"] and os.listdir(out / "x.ledger") == ["keep"]

    # a destination that cannot be written fails before the node is asked
    asked = []

    async def never(call):
        asked.append(call.op)
        return {}

    err = _failed_export(tmp_path / "no" / "such" / "dir" / "x.ledger", never)
    assert err.status_code is StatusCode.FAILED_PRECONDITION and "cannot write ledger file" in err.message and not asked


# ----------------------------------------------------------------------- replay
def _local_ledger(tmp_path: Path) -> tuple[Path, list, object]:
    """A ledger file made in this process (no node): TEXTS realized, _content() put."""
    load_evaluators(EVALUATORS)
    with fabric.open(tmp_path / "origin") as f:
        reps = [f.realize(r) for r in _requests()]
        ref = f.put(_content(), chunk_size=80_000)
        assert f.cassette.export(tmp_path / "seed.ledger") == 5
    return tmp_path / "seed.ledger", reps, ref


def test_replay_through_node_serves_every_key_without_computing(tmp_path, capsys):
    secret = _secret_file(tmp_path)
    ledger, reps, ref = _local_ledger(tmp_path)
    bad = tmp_path / "bad.ledger"
    shutil.copy(ledger, bad)
    flip_in_file(bad, MARKER.encode())
    log = tmp_path / "eval.log"
    with node(tmp_path, "target", env={"FABRIC_EVAL_LOG": str(log)}) as (addr, proc, data):
        with RemoteFabric(addr, SECRET) as f:
            # a file with a flipped byte is refused before anything is sent
            assert cli.main(["replay", str(bad), "--node", addr, "--secret-file", str(secret)]) == 1
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith("fabric replay: error: DATA_LOSS: ") and "offset" in err[0], err
            st = f.stats()["node"]
            assert (st["records"], st["ledger_rows"], st["blobs"]) == (0, 0, 0)

            assert cli.main(["replay", str(ledger), "--node", addr, "--secret-file", str(secret)]) == 0
            node_id = f.node_id
            assert capsys.readouterr().out.strip() == \
                f"replayed 5 ledger rows into node {node_id}: 5 appended, 0 already held; 4 blobs"
            for req, r in zip(_requests(), reps):
                got = f.realize(req)
                assert (got.source, got.holder, got.key) == ("local", node_id, r.key)
                assert codec.encode(got.value) == codec.encode(r.value)
                assert f.holders(r.key) == [node_id]  # announced to the node's fleet index
            assert f.get(ref.key) == _content() and f.holders(ref.key) == [node_id]
            assert not log.exists(), "an evaluator ran on the node"

            # idempotent: a second replay appends nothing
            assert f.replay(ledger) == {"records": 5, "appended": 0, "blobs": 4}
            st = f.stats()["node"]
            assert (st["records"], st["ledger_rows"], st["blobs"]) == (5, 5, 4)
            assert f.verify().ok
        _stop(proc)
    with Cassette(data) as cas:
        cas.export(tmp_path / "back.ledger")
    assert (tmp_path / "back.ledger").read_bytes() == ledger.read_bytes()


def _entries(*items: tuple[bytes, bytes]) -> bytes:
    return b"".join(entry_header(tag, len(body)) + body for tag, body in items)


def _record(text: str, node_id: str = "n-test") -> tuple[ContentKey, bytes]:
    key = ContentKey.for_request("text.stats", "1", {"text": text})
    return key, pack_record(key, codec.encode({"text": text}), evaluator="text.stats", version="1", created=1.0e9,
                            compute_s=0.0, node=node_id)


def test_the_node_verifies_every_replayed_entry_itself(tmp_path):
    """A client that skips the local validation gets DATA_LOSS / FAILED_PRECONDITION / INVALID_ARGUMENT
    from the node, and what came before the bad entry stays stored (a fault's key travels as text)."""
    (k1, r1), (k2, r2), (k3, r3) = _record("one"), _record("two"), _record("three")
    r2_bad = bytearray(r2)
    r2_bad[-3] ^= 1
    plan = ChunkPlan(_content(), chunk_size=100_000)
    manifest = pack_record(plan.key, plan.payload, evaluator="", version="", created=1.0e9, compute_s=0.0, node="n-test")
    blobs = [(b"B", bytes(k) + plan.chunk(i)) for i, k in enumerate(plan.manifest["chunks"])]

    with node(tmp_path) as (addr, proc, data):
        host, port = addr.rsplit(":", 1)

        async def replay(payload: bytes, piece: int = 7000):
            async with await open_connection(host, int(port), SECRET) as client:
                async with client.stream("replay", None, upload=True, credit=0) as call:
                    for off in range(0, len(payload), piece):
                        await call.send(payload[off : off + piece])
                    await call.end()
                    return await call.result()

        def refused(payload: bytes) -> FabricError:
            with pytest.raises(FabricError) as ei:
                trio.run(replay, payload)
            return ei.value

        err = refused(_entries((b"R", r1), (b"R", bytes(r2_bad)), (b"R", r3)))
        assert err.status_code is StatusCode.DATA_LOSS and err.key == str(k2) and "offset 194" in err.message, err
        err = refused(_entries((b"R", manifest)))  # a manifest whose chunks the node lacks
        assert err.status_code is StatusCode.FAILED_PRECONDITION and err.key in map(str, plan.manifest["chunks"]), err
        bad_blob = (b"B", bytes(plan.manifest["chunks"][0]) + b"not the chunk")
        err = refused(_entries(blobs[1], bad_blob))
        assert err.status_code is StatusCode.DATA_LOSS and err.key == str(plan.manifest["chunks"][0]), err
        err = refused(_entries((b"R", r3))[:-5])  # the stream ends inside an entry
        assert err.status_code is StatusCode.INVALID_ARGUMENT, err
        err = refused(b"X" + bytes(8))
        assert err.status_code is StatusCode.INVALID_ARGUMENT and "bad entry header" in err.message, err

        # an entry cut into 1-byte pieces, and pieces holding several entries, parse alike;
        # the chunks first, then the manifest that names them
        assert trio.run(replay, _entries((b"R", r3)), 1) == {"records": 1, "appended": 1, "blobs": 0}
        n = len(blobs)
        assert n == 3 and trio.run(replay, _entries(*blobs, (b"R", manifest), (b"R", r3)), 150_001) == \
            {"records": 2, "appended": 1, "blobs": n}
        with RemoteFabric(addr, SECRET) as f:
            assert f.get(plan.key) == _content()
            assert f.get(k1) == {"text": "one"}
            assert f.get(k3) == {"text": "three"}
            with pytest.raises(FabricError) as ei:
                f.get(k2)
            assert ei.value.status_code is StatusCode.NOT_FOUND
            st = f.stats()["node"]
            assert (st["records"], st["blobs"]) == (3, 3)  # one, three and the manifest; its chunks


def test_replay_goes_in_rounds_and_export_fits_small_frames(tmp_path):
    """In-process node with a small per-request byte budget: a replay takes several ``replay``
    requests; an export to a client with small frames and a small per-stream limit still arrives whole."""
    from fabric.local import Fabric
    from fabric.serve import NodeService
    from fabric.wire import StreamFrameLimits

    ledger, reps, ref = _local_ledger(tmp_path)  # 3 chunks of 80,000 bytes and more
    big = tmp_path / "big-origin"
    with Cassette(big) as cas:
        plan = ChunkPlan(_content(), chunk_size=200_000)
        cas.put_blobs([plan.chunk(i) for i in range(len(plan.manifest["chunks"]))])
        cas.export(tmp_path / "big.ledger")
    fab = Fabric(tmp_path / "served")
    service = NodeService(fab)
    opened: list[str] = []

    async def handler(call):
        opened.append(call.op)
        return await service.handle(call)

    async def main():
        limits = StreamFrameLimits(max_frame_bytes=64 * 1024, max_bytes_per_stream=150_000)
        async with trio.open_nursery() as n:
            listening = await n.start(functools.partial(serve, "127.0.0.1", 0, SECRET, handler, limits, node_id=fab.node_id))
            addr = f"127.0.0.1:{listening.port}"
            rf = RemoteFabric(addr, SECRET, limits=StreamFrameLimits(max_frame_bytes=4096, max_bytes_per_stream=10_000))
            assert await rf.areplay(ledger) == {"records": 5, "appended": 5, "blobs": 4}
            assert opened.count("replay") >= 3  # every 80 kB chunk needs a request of its own
            assert await rf.aexport(tmp_path / "small-frames.ledger") == 5
            # an entry larger than the node's whole per-request budget cannot travel: one clear error
            with pytest.raises(FabricError) as ei:
                await rf.areplay(tmp_path / "big.ledger")
            assert ei.value.status_code is StatusCode.RESOURCE_EXHAUSTED and "--data" in ei.value.message
            n.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        fab.close()
    # replayed in file order, the node's ledger exports to the very file it was seeded from
    assert (tmp_path / "small-frames.ledger").read_bytes() == ledger.read_bytes()


def test_concurrent_verifies_on_one_node_run_one_scrub_at_a_time(tmp_path):
    """Two verify requests at once: both get the full report, and the node never runs two
    scrubs together (its scrub lock serializes them)."""
    import threading

    import trio

    import fabric
    from fabric import admin
    from fabric.serve import NodeService

    with fabric.open(tmp_path / "d", durability="fast") as fab:
        for i in range(50):
            fab.cassette.put(ContentKey.for_request("tc.v", "1", {"i": i}), codec.encode(i), evaluator="tc.v", version="1")
        service = NodeService(fab)
        live, peak = 0, 0
        lock = threading.Lock()
        real_scrub = fab.cassette.scrub

        def counting_scrub(*a, **kw):
            nonlocal live, peak
            with lock:
                live += 1
                peak = max(peak, live)
            try:
                yield from real_scrub(*a, **kw)
            finally:
                with lock:
                    live -= 1

        fab.cassette.scrub = counting_scrub

        class Call:
            op, body, peer = "verify", None, "test"

        async def main():
            out = []
            async with trio.open_nursery() as n:
                for _ in range(3):
                    n.start_soon(lambda: _append(out, admin.serve_admin(Call(), service)))
            return out

        async def _append(out, coro):
            out.append(await coro)

        reports = trio.run(main)
    assert [r["records"] for r in reports] == [50, 50, 50] and all(r["problem_count"] == 0 for r in reports)
    assert peak == 1


def test_an_export_the_node_finishes_while_it_shuts_down_reaches_the_client(tmp_path):
    """SIGTERM during an export: the node finishes it (the drain waits for requests in flight),
    says goodbye and closes.  The client still had the last pushes to read and grants credit
    for them as it does; its write to the closed socket failed, and that failure used to drop
    what it had not read yet (UNAVAILABLE, no file).  A failed write now fails only what was
    being written: what the node sent before it closed is read, and the export completes."""
    from fabric import net
    from fabric.local import Fabric

    from cassette.ledgerfile import EXPORT_CHUNK

    data = tmp_path / "n"
    with Fabric(data, durability="fast") as fab:
        for _ in range(64):
            fab.put(os.urandom(1 << 20), chunk_size=1 << 20)
        fab.cassette.export(tmp_path / "local.ledger")
    pushes = -(-(tmp_path / "local.ledger").stat().st_size // EXPORT_CHUNK)  # the node's pushes: 1 MiB each
    with node(tmp_path, "n", "--durability", "fast") as (addr, proc, _), fabric.open(addr, secret=SECRET) as f:
        seen, gone_at = [], []

        def progress(n):
            if not seen:
                proc.send_signal(signal.SIGTERM)
            seen.append(n)
            if len(seen) >= pushes - net.DEFAULT_CREDIT - 2 and not gone_at:
                # near the end, with credit granted for every push taken: the node may send the
                # rest, its reply and goodbye, and exit; give it the time to, so that pushes are
                # still to be read here once it has gone
                try:
                    proc.wait(0.5)
                    gone_at.append(len(seen))
                except subprocess.TimeoutExpired:
                    pass

        assert f.export(tmp_path / "out.ledger", progress=progress) == 64
        assert gone_at and len(seen) - gone_at[0] >= 2 and proc.returncode == 0  # read after it had gone
    with Fabric(tmp_path / "replayed", durability="fast") as fab:
        assert fab.cassette.import_(tmp_path / "out.ledger") == 64


def test_sigterm_to_an_export_client_stops_it_as_ctrl_c_does_and_leaves_nothing(tmp_path):
    """``fabric export --node`` killed with SIGTERM (a supervisor, ``timeout``, ``kill``) exits 143
    and leaves neither FILE nor its temporary file: the CLI takes SIGTERM as Ctrl-C, so the
    export's cleanup runs.  Python's default SIGTERM ended the process on the spot, leaving
    ``FILE.tmp-PID`` behind.  The node serves on."""
    import time

    from fabric.local import Fabric

    with Fabric(tmp_path / "n", durability="fast") as fab:
        for _ in range(160):
            fab.put(os.urandom(1 << 20), chunk_size=1 << 20)
    secret = _secret_file(tmp_path)
    out = tmp_path / "out.ledger"
    with node(tmp_path, "n", "--durability", "fast") as (addr, proc, _):
        client = subprocess.Popen([FABRIC, "export", str(out), "--node", addr, "--secret-file", str(secret)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env(tmp_path / "home"))
        try:
            deadline = time.monotonic() + 30
            while not any(".tmp-" in p.name for p in tmp_path.iterdir()):
                assert client.poll() is None and time.monotonic() < deadline, "the export never started"
                time.sleep(0.005)
            client.send_signal(signal.SIGTERM)
            assert client.wait(20) == 143, client.stderr.read()
        finally:
            if client.poll() is None:
                client.kill()
            client.communicate()
        assert not out.exists() and not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]
        assert proc.poll() is None
        with RemoteFabric(addr, SECRET) as f:
            assert f.export(out) == 160
