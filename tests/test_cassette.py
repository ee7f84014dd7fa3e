"""The cassette: append-only LMDB ledger on real files (specs/cassette-format.md).

Every test works on real LMDB environments under ``tmp_path``; corruption is
real bytes flipped in ``data.mdb`` with the environment closed.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import blake3
import lmdb
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import fabric
from cassette import codec
from cassette.errors import FabricError, StatusCode
from cassette.keys import ContentKey
from cassette.record import pack_record, payload_digest, unpack_record
from cassette.store import FORMAT_VERSION, MISS, Cassette
from conftest import ROOT, child_env, flip_in_file

SPEC = ROOT / "specs" / "cassette-format.md"


def rkey(i: int | str) -> ContentKey:
    """A request-kind key for test item ``i``."""
    return ContentKey.of("request", f"test_cassette item {i}".encode())


def payload_of(i: int | str, pad: int = 0) -> bytes:
    return codec.encode({"item": str(i), "pad": "p" * pad})


def dump_env(path: Path) -> dict[str, dict[bytes, bytes]]:
    """Every entry of every named DB, read with py-lmdb directly (no Cassette open on ``path``)."""
    env = lmdb.open(str(path), max_dbs=8, subdir=True, create=False)
    try:
        out = {}
        for name in (b"ledger", b"index", b"blobs", b"meta"):
            db = env.open_db(name, create=False)
            with env.begin(db=db) as txn:
                out[name.decode()] = {bytes(k): bytes(v) for k, v in txn.cursor()}
        return out
    finally:
        env.close()


# ----------------------------------------------------------------- spec vectors
def _spec_vectors() -> dict:
    text = SPEC.read_text(encoding="utf-8")
    for block in re.findall(r"```json\n(.*?)```", text, flags=re.S):
        data = json.loads(block)
        if data.get("vectors") == "evalfabric/cassette-format/v1":
            return data
    raise AssertionError(f"no evalfabric/cassette-format/v1 vector block in {SPEC}")


def test_spec_record_vector_is_byte_exact():
    vec = _spec_vectors()
    assert vec["format_version"] == FORMAT_VERSION
    r = vec["record"]
    key = ContentKey.parse(r["key"])
    req = r["request"]
    assert ContentKey.for_request(req["evaluator"], req["version"], req["args"]) == key
    payload = bytes.fromhex(r["payload_hex"])
    assert payload == codec.encode({"top": [["a", 2], ["b", 1]], "words": 3})
    created = float(r["created"])
    compute_s = float(r["compute_s"])
    assert struct.pack(">d", created).hex() == r["created_f64_bits"]
    assert struct.pack(">d", compute_s).hex() == r["compute_s_f64_bits"]

    value = pack_record(
        key, payload, evaluator=r["evaluator"], version=r["version"], created=created, compute_s=compute_s, node=r["node"]
    )
    assert value.hex() == r["record_hex"]

    # the layout, field by field, independently of pack_record
    meta = bytes.fromhex(r["meta_hex"])
    assert payload_digest(payload).hex() == r["digest_hex"] == blake3.blake3(payload).hexdigest()
    assert value[:4].hex() == r["check_hex"]
    assert struct.unpack(">I", value[:4])[0] == zlib.crc32(value[4:])
    assert struct.unpack(">I", value[4:8])[0] == len(meta)
    assert value[8 : 8 + len(meta)] == meta
    assert value[8 + len(meta) :] == payload
    assert codec.decode(meta) == {
        "key": key,
        "digest": bytes.fromhex(r["digest_hex"]),
        "evaluator": r["evaluator"],
        "version": r["version"],
        "created": created,
        "compute_s": compute_s,
        "node": r["node"],
        "size": len(payload),
    }
    assert codec.is_canonical(meta)

    rec = unpack_record(value, 7)
    assert (rec.key, rec.payload, rec.evaluator, rec.version, rec.created, rec.compute_s, rec.node, rec.seq) == (
        key, payload, r["evaluator"], r["version"], created, compute_s, r["node"], 7,
    )
    assert rec.value() == {"top": [["a", 2], ["b", 1]], "words": 3}


def test_spec_ledger_file_vector_is_byte_exact(tmp_path):
    vec = _spec_vectors()
    record = bytes.fromhex(vec["record"]["record_hex"])
    lf = vec["ledger_file"]
    blob = bytes.fromhex(lf["blob_hex"])
    with Cassette(tmp_path / "src") as cas:
        assert cas.put_raw(record).appended
        assert str(cas.put_blob(blob)) == lf["blob_key"]
        assert cas.export(tmp_path / "out.ledger") == 1
    data = (tmp_path / "out.ledger").read_bytes()
    assert data.hex() == lf["file_hex"]
    assert data[-32:] == blake3.blake3(data[:-49]).digest()
    # and it replays into a new cassette byte for byte
    with Cassette.from_ledger(tmp_path / "dst", tmp_path / "out.ledger") as dst:
        key = ContentKey.parse(vec["record"]["key"])
        assert dst.get_raw(key) == record
        assert dst.get_blob(ContentKey.parse(lf["blob_key"])) == blob


# ------------------------------------------------------------ append-only rule
def test_put_is_append_only_and_idempotent(tmp_path):
    with Cassette(tmp_path / "c") as cas:
        k = rkey(1)
        first = cas.put(k, payload_of(1), evaluator="ev", version="3", compute_s=0.5)
        assert (first.seq, first.appended, first.key) == (1, True, k)
        assert first.digest == payload_digest(payload_of(1))

        again = cas.put(k, payload_of(1))
        assert (again.seq, again.appended, again.digest) == (1, False, first.digest)
        # a different payload for a held key is a no-op too: the first reply stays
        other = cas.put(k, payload_of("different"))
        assert (other.seq, other.appended, other.digest) == (1, False, first.digest)

        st_ = cas.stats()
        assert (st_["ledger_rows"], st_["records"]) == (1, 1)
        assert st_["ledger_bytes"] == len(cas.get_raw(k))
        assert cas.lookup_value(k) == {"item": "1", "pad": ""}
        rec = cas.get_record(k)
        assert (rec.evaluator, rec.version, rec.compute_s, rec.node, rec.seq) == ("ev", "3", 0.5, cas.node_id, 1)

        second = cas.put(rkey(2), payload_of(2))
        assert (second.seq, second.appended) == (2, True)
        assert cas.lookup_value(rkey(3)) is MISS
        assert cas.missing([rkey(1), rkey(2), rkey(3)]) == [rkey(3)]
        assert cas.verify().ok


def test_put_rejects_non_key(tmp_path):
    with Cassette(tmp_path / "c") as cas:
        with pytest.raises(FabricError) as ei:
            cas.put(b"\x01" + bytes(32), payload_of(1))
        assert ei.value.status_code is StatusCode.INVALID_ARGUMENT
        assert cas.stats()["ledger_rows"] == 0


def test_concurrent_puts_from_many_threads_are_durable_with_distinct_seqs(tmp_path):
    threads, per_thread = 16, 40
    results: dict[ContentKey, int] = {}
    lock = threading.Lock()
    errors: list[BaseException] = []
    barrier = threading.Barrier(threads)

    with Cassette(tmp_path / "c") as cas:

        def work(t: int) -> None:
            try:
                barrier.wait(10)
                for i in range(per_thread):
                    k = rkey(f"{t}/{i}")
                    r = cas.put(k, payload_of(f"{t}/{i}"))
                    assert r.appended and r.key == k
                    with lock:
                        results[k] = r.seq
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        ts = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
        assert not any(t.is_alive() for t in ts)
        assert not errors, errors
    n = threads * per_thread
    assert len(results) == n
    assert sorted(results.values()) == list(range(1, n + 1))  # distinct and contiguous

    with Cassette(tmp_path / "c") as cas:  # durable: all there after close + reopen
        st_ = cas.stats()
        assert (st_["ledger_rows"], st_["records"]) == (n, n)
        for k, seq in results.items():
            rec = cas.get_record(k)
            assert rec is not None and rec.seq == seq
            assert rec.payload == payload_of(rec.value()["item"])
        assert cas.verify().ok


def test_concurrent_puts_of_one_key_append_exactly_once(tmp_path):
    threads = 12
    barrier = threading.Barrier(threads)
    out: list = [None] * threads
    with Cassette(tmp_path / "c") as cas:
        k = rkey("contended")

        def work(t: int) -> None:
            barrier.wait(10)
            out[t] = cas.put(k, payload_of(f"writer {t}"))

        ts = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(30)
        assert all(isinstance(r, type(out[0])) for r in out)
        winners = [i for i, r in enumerate(out) if r.appended]
        assert len(winners) == 1
        assert {r.seq for r in out} == {1}
        assert {r.digest for r in out} == {payload_digest(payload_of(f"writer {winners[0]}"))}
        assert cas.lookup_value(k)["item"] == f"writer {winners[0]}"
        assert cas.stats()["ledger_rows"] == 1


def test_aput_under_trio(tmp_path):
    import trio

    async def main(cas: Cassette):
        results = []

        async def one(i):
            results.append(await cas.aput(rkey(i), payload_of(i)))

        async with trio.open_nursery() as n:
            for i in range(20):
                n.start_soon(one, i)
        return results

    with Cassette(tmp_path / "c") as cas:
        res = trio.run(main, cas)
        assert sorted(r.seq for r in res) == list(range(1, 21))
        assert all(cas.lookup_value(rkey(i)) == {"item": str(i), "pad": ""} for i in range(20))


# ----------------------------------------------------------------- durability
def test_durability_modes(tmp_path):
    with pytest.raises(FabricError) as ei:
        Cassette(tmp_path / "bad", durability="eventually")
    assert ei.value.status_code is StatusCode.INVALID_ARGUMENT

    with Cassette(tmp_path / "fast", durability="fast") as cas:
        flags = cas._env.flags()
        assert (flags["sync"], flags["metasync"]) == (False, False)
        assert cas.stats()["durability"] == "fast"
        for i in range(50):
            assert cas.put(rkey(i), payload_of(i)).appended
    with Cassette(tmp_path / "fast") as cas:  # committed rows are there after reopen
        assert cas.stats()["records"] == 50
        assert all(cas.lookup_value(rkey(i)) == {"item": str(i), "pad": ""} for i in range(50))
        flags = cas._env.flags()
        # sync mode: data pages fdatasync'd at commit, meta page by the next fdatasync,
        # before the put is acknowledged (specs/cassette-format.md section 5; tests/test_durability.py)
        assert (flags["sync"], flags["metasync"]) == (True, False)
        assert cas.stats()["durability"] == "sync"


# ----------------------------------------------------------------- map growth
def test_a_full_map_grows_while_busy_readers_never_pause(tmp_path):
    """py-lmdb 3.0 aborts a write transaction only once no other thread is inside an LMDB
    call; three readers looping without a pause used to hold off the abort after a map-full,
    and with it every put, indefinitely (the writer now aborts with the readers held out)."""
    n, pad = 160, 16_000  # ~2.6 MB of ledger values: the 1 MiB map doubles twice
    stop = threading.Event()
    reader_errors: list[str] = []
    with Cassette(tmp_path / "c", map_size=1 << 20, durability="fast") as cas:
        cas.put(rkey(0), payload_of(0, 1))  # small: the readers spend their time in LMDB calls

        def reader() -> None:
            try:
                while not stop.is_set():
                    if cas.lookup_value(rkey(0)) != {"item": "0", "pad": "p"}:
                        reader_errors.append("wrong value")
            except BaseException as exc:  # noqa: BLE001
                reader_errors.append(repr(exc))

        def writer() -> None:
            for i in range(1, n):
                assert cas.put(rkey(i), payload_of(i, pad)).appended

        rs = [threading.Thread(target=reader) for _ in range(3)]
        w = threading.Thread(target=writer)
        for t in (*rs, w):
            t.start()
        w.join(120)  # a hang shows as a writer still running (then released by stopping the readers)
        hung = w.is_alive()
        stop.set()
        for t in (*rs, w):
            t.join(60)
        assert not hung, "puts stalled behind busy readers after the map filled"
        assert not reader_errors, reader_errors[:5]
        assert cas.stats()["map_size"] >= 4 << 20 and len(cas) == n
        assert cas.verify().ok


def test_map_grows_from_one_mib_while_readers_read(tmp_path):
    path = tmp_path / "c"
    n, pad = 240, 16_000  # ~3.8 MB of ledger values
    stop = threading.Event()
    reader_errors: list[str] = []
    reads = [0]

    big = random.Random(1).randbytes(3 << 20)  # one blob bigger than the whole initial map
    with Cassette(path, map_size=1 << 20, durability="fast") as cas:
        assert cas.stats()["map_size"] == 1 << 20
        cas.put(rkey(0), payload_of(0, pad))

        def reader(seed: int) -> None:
            rng = random.Random(seed)
            try:
                while not stop.is_set():
                    i = rng.randrange(n)
                    v = cas.lookup_value(rkey(i))
                    if v is not MISS and v != {"item": str(i), "pad": "p" * pad}:
                        reader_errors.append(f"wrong value for {i}")
                    reads[0] += 1
                    # yield the GIL now and then: readers that never pause make every put wait
                    # for GIL hand-offs (slow, not stuck: see the test above)
                    time.sleep(0.0002)
            except BaseException as exc:  # noqa: BLE001
                reader_errors.append(repr(exc))

        rs = [threading.Thread(target=reader, args=(s,)) for s in range(2)]
        for r in rs:
            r.start()
        try:
            for i in range(1, n):
                assert cas.put(rkey(i), payload_of(i, pad)).appended
            bkey = cas.put_blob(big)
        finally:
            stop.set()
            for r in rs:
                r.join(30)
        assert not reader_errors, reader_errors[:5]
        assert reads[0] > 0
        size = cas.stats()["map_size"]
        assert size >= 8 << 20 and size & (size - 1) == 0  # doubled from 1 MiB, a power of two
        assert cas.get_blob(bkey) == big
        assert cas.verify().ok

    with Cassette(path, map_size=1 << 20) as cas:  # reopen with the small size: LMDB keeps what is used
        assert cas.stats()["records"] == n
        assert all(cas.lookup_value(rkey(i))["item"] == str(i) for i in range(n))
        assert cas.put(rkey("after reopen"), payload_of("x", pad)).appended  # grows again if it must
        assert cas.verify().ok


_GROW_CHILD = """
import sys
from cassette import codec
from cassette.keys import ContentKey
from cassette.store import Cassette
with Cassette(sys.argv[1], map_size=1 << 20) as cas:
    for i in range(200):
        k = ContentKey.of("request", f"child {i}".encode())
        cas.put(k, codec.encode({"i": i, "pad": "c" * 20000}))
    print(cas.stats()["map_size"])
"""


def test_map_grown_by_another_process_is_adopted(tmp_path):
    path = tmp_path / "c"
    with Cassette(path, map_size=1 << 20) as cas:
        cas.put(rkey("parent before"), payload_of("before"))
        assert cas.lookup_value(rkey("parent before")) is not MISS
        proc = subprocess.run(
            [sys.executable, "-c", _GROW_CHILD, str(path)],
            cwd=ROOT, env=child_env(tmp_path / "home"), capture_output=True, text=True, timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        assert int(proc.stdout.strip()) > 1 << 20
        # this process still maps 1 MiB: reads and writes must adopt the bigger map
        for i in range(200):
            v = cas.lookup_value(ContentKey.of("request", f"child {i}".encode()))
            assert v == {"i": i, "pad": "c" * 20000}
        assert cas.put(rkey("parent after"), payload_of("after", 30000)).appended
        assert cas.stats()["records"] == 202
        assert cas.verify().ok


def test_replay_grows_a_full_map(tmp_path):
    path = tmp_path / "c"
    n = 3000
    with Cassette(path, durability="fast") as cas:
        for i in range(n):
            cas.put(rkey(i), payload_of(i, 200))
    # reopening with a small map_size leaves LMDB's map exactly as big as the data
    cas = Cassette.from_ledger(path, map_size=1 << 20)
    try:
        assert cas.last_replay.indexed == n
        assert cas.stats()["records"] == n
    finally:
        cas.close()


# ------------------------------------------------------------ refusing to open
def _set_meta(path: Path, key: bytes, value: bytes) -> None:
    env = lmdb.open(str(path), max_dbs=8, subdir=True, create=False)
    try:
        meta = env.open_db(b"meta", create=False)
        with env.begin(write=True, db=meta) as txn:
            txn.put(key, value)
    finally:
        env.close()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("mark", [str(FORMAT_VERSION + 1).encode(), b"99", b"one"])
def test_newer_or_unreadable_format_mark_is_refused(tmp_path, mark):
    path = tmp_path / "c"
    with Cassette(path) as cas:
        cas.put(rkey(1), payload_of(1))
    _set_meta(path, b"format", mark)
    before = _sha(path / "data.mdb")
    with pytest.raises(FabricError) as ei:
        Cassette(path)
    err = ei.value
    assert err.status_code is StatusCode.FAILED_PRECONDITION
    assert mark.decode() in err.message
    if mark.isdigit():
        assert "newer" in err.message and str(FORMAT_VERSION) in err.message
    assert _sha(path / "data.mdb") == before  # nothing was written


def test_older_or_equal_format_mark_opens(tmp_path):
    path = tmp_path / "c"
    with Cassette(path) as cas:
        cas.put(rkey(1), payload_of(1))
    assert dump_env(path)["meta"][b"format"] == str(FORMAT_VERSION).encode()
    with Cassette(path) as cas:
        assert cas.lookup_value(rkey(1)) == {"item": "1", "pad": ""}


def test_non_cassette_directories_are_refused(tmp_path):
    other = tmp_path / "someone-elses"
    other.mkdir()
    (other / "notes.txt").write_text("not a cassette")
    with pytest.raises(FabricError) as ei:
        Cassette(other)
    assert ei.value.status_code is StatusCode.FAILED_PRECONDITION
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]  # untouched

    a_file = tmp_path / "plain-file"
    a_file.write_bytes(b"x")
    with pytest.raises(FabricError) as ei:
        Cassette(a_file)
    assert ei.value.status_code is StatusCode.FAILED_PRECONDITION
    assert a_file.read_bytes() == b"x"

    with pytest.raises(FabricError) as ei:
        Cassette(tmp_path / "absent", create=False)
    assert ei.value.status_code is StatusCode.NOT_FOUND
    assert not (tmp_path / "absent").exists()

    # an LMDB environment with data but no cassette format mark
    foreign = tmp_path / "foreign-lmdb"
    env = lmdb.open(str(foreign), max_dbs=8, subdir=True)
    db = env.open_db(b"ledger")
    with env.begin(write=True, db=db) as txn:
        txn.put(b"\x00" * 8, b"something else")
    env.close()
    with pytest.raises(FabricError) as ei:
        Cassette(foreign)
    assert ei.value.status_code is StatusCode.FAILED_PRECONDITION

    empty = tmp_path / "empty"
    empty.mkdir()
    with Cassette(empty) as cas:  # an empty directory becomes a new cassette
        assert cas.stats()["records"] == 0
    meta = dump_env(empty)["meta"]
    assert meta[b"format"] == b"1"
    assert re.fullmatch(rb"n[0-9a-f]{12}", meta[b"node_id"])
    float(meta[b"created"])


_CLOSED_CALLS = {
    "lookup_value": lambda c, k, t: c.lookup_value(k),
    "get_record": lambda c, k, t: c.get_record(k),
    "get_raw": lambda c, k, t: c.get_raw(k),
    "get_raw_many": lambda c, k, t: c.get_raw_many([k], 1 << 20),
    "contains": lambda c, k, t: c.contains(k),
    "missing": lambda c, k, t: c.missing([k]),
    "get_blob": lambda c, k, t: c.get_blob(ContentKey.of("blob", b"b")),
    "stats": lambda c, k, t: c.stats(),
    "len": lambda c, k, t: len(c),
    "iter_ledger": lambda c, k, t: list(c.iter_ledger()),
    "scrub": lambda c, k, t: list(c.scrub()),
    "verify": lambda c, k, t: c.verify(),
    "export": lambda c, k, t: c.export(t / "out.ledger"),
    "rebuild_index": lambda c, k, t: c.rebuild_index(),
    "put": lambda c, k, t: c.put(k, payload_of(9)),
    "put_blob": lambda c, k, t: c.put_blob(b"b"),
}


@pytest.mark.parametrize("call", sorted(_CLOSED_CALLS))
def test_every_use_of_a_closed_cassette_is_failed_precondition(tmp_path, call):
    """specs/errors.md: a closed cassette is FAILED_PRECONDITION, never a raw lmdb.Error."""
    cas = Cassette(tmp_path / "c")
    cas.put(rkey(1), payload_of(1))
    assert cas.lookup_value(rkey(1)) == {"item": "1", "pad": ""}  # this thread's slot exists
    cas.close()
    with pytest.raises(FabricError) as ei:
        _CLOSED_CALLS[call](cas, rkey(1), tmp_path)
    assert ei.value.status_code is StatusCode.FAILED_PRECONDITION
    assert "is closed" in ei.value.message
    assert not (tmp_path / "out.ledger").exists()
    assert not cas._writer.is_alive()  # (rebuild_index did not start a writer on the closed cassette)


def test_reads_racing_close_finish_or_see_failed_precondition(tmp_path):
    """Reads on other threads while the cassette closes: each returns its value or raises
    FAILED_PRECONDITION; none sees LMDB's closed-object error."""
    cas = Cassette(tmp_path / "c", durability="fast")
    cas.put(rkey(1), payload_of(1))
    bad: list[BaseException] = []
    started = threading.Barrier(5)

    def reader(read) -> None:
        started.wait()
        while True:
            try:
                read()
            except FabricError as exc:
                if exc.status_code is not StatusCode.FAILED_PRECONDITION:
                    bad.append(exc)
                return
            except BaseException as exc:  # noqa: BLE001 - what the test is looking for
                bad.append(exc)
                return

    reads = [lambda: cas.lookup_value(rkey(1)), lambda: cas.get_raw(rkey(1)), lambda: cas.get_record(rkey(1)), lambda: cas.stats()]
    threads = [threading.Thread(target=reader, args=(r,)) for r in reads]
    for t in threads:
        t.start()
    started.wait()
    time.sleep(0.05)
    cas.close()
    for t in threads:
        t.join(10)
    assert not bad, bad


def test_rebuild_index_racing_close_completes_or_is_failed_precondition(tmp_path, monkeypatch):
    """rebuild_index() and close() on two threads at once, started together with a random
    stagger, many times over real LMDB: the rebuild either completes (every key indexed) or
    raises FAILED_PRECONDITION "closed"; close() returns; no thread hangs or dies; no writer
    thread outlives the close, and the directory reopens with every record.  Was: a raw
    lmdb.Error from the rebuild (its final sync ran on the closed environment), and close()
    raising RuntimeError "cannot join thread before it is started" (it joined the writer the
    rebuild was about to start) with the LMDB environment left open in the process."""
    died: list[str] = []
    monkeypatch.setattr(threading, "excepthook", lambda a: died.append(f"{a.thread.name}: {a.exc_value!r}"))
    rng = random.Random(20240611)
    seen = set()
    for round_ in range(40):
        path = tmp_path / f"c{round_}"
        cas = Cassette(path, durability="sync" if round_ % 2 else "fast")
        for i in range(12):
            cas.put(rkey(i), payload_of(i))
        together = threading.Barrier(2)
        outcome: dict[str, object] = {}

        def run(name: str, call, stagger: float) -> None:
            together.wait()
            time.sleep(stagger)
            try:
                outcome[name] = call()
            except BaseException as exc:  # noqa: BLE001 - what the test is looking for
                outcome[name] = exc

        threads = [threading.Thread(target=run, args=("rebuild", cas.rebuild_index, rng.random() * 0.002)),
                   threading.Thread(target=run, args=("close", cas.close, rng.random() * 0.002))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert not any(t.is_alive() for t in threads), f"round {round_}: hung ({outcome})"
        assert outcome["close"] is None, f"round {round_}: close raised {outcome['close']!r}"
        rebuilt = outcome["rebuild"]
        if isinstance(rebuilt, FabricError):
            assert rebuilt.status_code is StatusCode.FAILED_PRECONDITION and "is closed" in rebuilt.message, rebuilt
            seen.add("refused")
        else:
            assert (getattr(rebuilt, "rows", None), getattr(rebuilt, "indexed", None)) == (12, 12), rebuilt
            seen.add("rebuilt")
        assert not cas._writer.is_alive(), f"round {round_}: a writer outlived close()"
        with Cassette(path) as again:  # (an environment left open in this process refuses this)
            assert again.stats()["records"] == 12
            assert again.lookup_value(rkey(11)) == {"item": "11", "pad": ""}
    assert not died, died
    assert seen == {"rebuilt", "refused"}  # both orders were met


def _main_db(path: Path) -> dict[bytes, bytes]:
    """The main database of the LMDB environment at ``path`` (read with py-lmdb directly)."""
    env = lmdb.open(str(path), subdir=True, create=False, readonly=True, lock=False)
    try:
        with env.begin() as txn:
            return {bytes(k): bytes(v) for k, v in txn.cursor()}
    finally:
        env.close()


def _plain_env(path: Path, items: dict[bytes, bytes]) -> None:
    env = lmdb.open(str(path))
    with env.begin(write=True) as txn:
        for k, v in items.items():
            txn.put(k, v)
    env.close()


@pytest.mark.parametrize(
    "items",
    [
        {b"hello": b"world"},  # some program's plain key-value store
        {b"hello": b"world", b"meta": b"x"},
        {b"ledger": b"not a database"},  # was a raw lmdb.IncompatibleError
        {b"index": b"not a database"},  # (ledger absent: must not be created on the way)
    ],
    ids=["plain", "plain+meta-key", "ledger-not-a-db", "index-not-a-db"],
)
def test_a_foreign_lmdb_environment_is_refused_untouched(tmp_path, items):
    """specs/cassette-format.md section 1: another program's LMDB directory is
    FAILED_PRECONDITION and not a byte of its data changes (it used to be adopted)."""
    path = tmp_path / "theirs"
    _plain_env(path, items)
    before = _sha(path / "data.mdb")
    with pytest.raises(FabricError) as ei:
        Cassette(path)
    assert ei.value.status_code is StatusCode.FAILED_PRECONDITION
    assert "another program" in ei.value.message
    assert _sha(path / "data.mdb") == before
    assert _main_db(path) == items
    with pytest.raises(FabricError) as ei:  # and again: nothing half-done by the first try
        Cassette(path, durability="fast")
    assert ei.value.status_code is StatusCode.FAILED_PRECONDITION
    assert _sha(path / "data.mdb") == before


def test_an_lmdb_environment_with_data_but_no_mark_is_refused_untouched(tmp_path):
    """Section 7: ledger entries without a format mark are refused, and the other named
    databases are not created on the way (they used to be, one commit each)."""
    path = tmp_path / "foreign"
    env = lmdb.open(str(path), max_dbs=8, subdir=True)
    db = env.open_db(b"ledger")
    with env.begin(write=True, db=db) as txn:
        txn.put(b"\x00" * 8, b"something else")
    env.close()
    before = _sha(path / "data.mdb")
    with pytest.raises(FabricError) as ei:
        Cassette(path)
    assert ei.value.status_code is StatusCode.FAILED_PRECONDITION
    assert "format mark" in ei.value.message
    assert _sha(path / "data.mdb") == before
    assert list(_main_db(path)) == [b"ledger"]


@pytest.mark.parametrize("names", [(), ("ledger",), ("ledger", "index", "blobs", "meta")], ids=["no-db", "ledger", "all-dbs"])
def test_an_empty_environment_of_ours_becomes_a_fresh_cassette(tmp_path, names):
    """Section 7: no format mark, empty ledger and index, a main database holding only
    our database names (a crash right after creation): a fresh cassette."""
    path = tmp_path / "c"
    env = lmdb.open(str(path), max_dbs=8, subdir=True)
    for n in names:
        env.open_db(n.encode())
    env.close()
    with Cassette(path, node_id="fresh") as cas:
        cas.put(rkey(1), payload_of(1))
    with Cassette(path) as cas:
        assert cas.node_id == "fresh" and cas.lookup_value(rkey(1)) == {"item": "1", "pad": ""}
    assert sorted(_main_db(path)) == [b"blobs", b"index", b"ledger", b"meta"]


def test_a_directory_holding_only_subdirectories_becomes_a_cassette(tmp_path):
    """Section 1: subdirectories do not make a directory foreign (``fabric demo --nodes N``
    puts ``$FABRIC_HOME/demo-fleet/`` beside the default cassette, which then could not
    be created: 'it has files but no data.mdb')."""
    home = tmp_path / "home"
    (home / "demo-fleet" / "n0").mkdir(parents=True)
    (home / "demo-fleet" / "secret").write_text("s")
    with fabric.open(home) as fab:
        assert fab.stats()["records"] == 0
    with Cassette(home) as cas:
        assert cas.stats()["records"] == 0
    assert (home / "demo-fleet" / "secret").read_text() == "s"
    assert sorted(p.name for p in (home / "demo-fleet").iterdir()) == ["n0", "secret"]


def test_a_stray_file_beside_subdirectories_is_still_refused(tmp_path):
    other = tmp_path / "theirs"
    (other / "sub").mkdir(parents=True)
    (other / "notes.txt").write_text("not a cassette")
    with pytest.raises(FabricError) as ei:
        Cassette(other)
    assert ei.value.status_code is StatusCode.FAILED_PRECONDITION
    assert "notes.txt" in ei.value.message
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt", "sub"]  # untouched
    assert not any((other / "sub").iterdir())


def test_node_id_is_kept(tmp_path):
    with Cassette(tmp_path / "c", node_id="node-a") as cas:
        assert cas.node_id == "node-a"
    with Cassette(tmp_path / "c", node_id="ignored-for-existing") as cas:
        assert cas.node_id == "node-a"


# --------------------------------------------------------------- bit rot
_RUNS: dict[str, int] = {}


@fabric.evaluator("tc.marker", version="1")
def _marker(n: int) -> dict:
    """A reply whose payload holds a long unique marker we can find in data.mdb."""
    _RUNS["tc.marker"] = _RUNS.get("tc.marker", 0) + 1
    return {"n": n, "marker": _marker_bytes(n)}


def _marker_bytes(n: int) -> bytes:
    return b"TC-MARKER-" + hashlib.sha256(f"marker {n}".encode()).digest() * 3


def test_flipped_payload_byte_is_data_loss_never_a_wrong_value(tmp_path):
    path = tmp_path / "node"
    req = fabric.Request("tc.marker", {"n": 7})
    other = fabric.Request("tc.marker", {"n": 8})
    key = req.key
    _RUNS.clear()
    with fabric.open(path) as fab:
        assert fab.realize(req).source == "computed"
        assert fab.realize(other).source == "computed"
        assert fab.realize(req).source == "local"
        assert fab.verify().ok
    assert _RUNS["tc.marker"] == 2

    assert flip_in_file(path / "data.mdb", _marker_bytes(7)) >= 1

    corrupt_seen: list[ContentKey] = []
    with Cassette(path) as cas:
        cas.on_corrupt = corrupt_seen.append
        with pytest.raises(FabricError) as ei:
            cas.verify()
        assert ei.value.status_code is StatusCode.DATA_LOSS
        assert ei.value.key == key
        rep = cas.verify(raise_errors=False)
        assert not rep.ok and rep.records == 2 and rep.indexed == 2
        assert {p.key for p in rep.problems} == {key}
        assert all(p.status_code is StatusCode.DATA_LOSS for p in rep.problems)
        # a read never returns the bad bytes
        assert cas.lookup_value(key) is MISS
        assert cas.get_record(key) is None
        assert cas.get_raw(key) is None
        assert cas.get_raw_many([key, other.key], 1 << 20) == [None, cas.get_raw(other.key)]
        assert corrupt_seen and set(corrupt_seen) == {key}
        # the other key is untouched
        assert cas.lookup_value(other.key)["marker"] == _marker_bytes(8)
        # export leaves the bad row out
        assert cas.export(tmp_path / "x.ledger") == 1

    with fabric.open(path) as fab:
        rep1 = fab.realize(req)  # recomputes and appends a fresh row
        assert rep1.source == "computed"
        assert rep1.value == {"n": 7, "marker": _marker_bytes(7)}
        assert _RUNS["tc.marker"] == 3
        cas = fab.cassette
        st_ = cas.stats()
        assert (st_["ledger_rows"], st_["records"]) == (3, 2)
        assert cas.get_record(key).seq == 3  # the index now points to the fresh row
        rep = cas.verify(raise_errors=False)
        assert len(rep.problems) == 1 and rep.problems[0].key == key  # the old row is still reported
        assert "ledger row 1" in rep.problems[0].message
        rep2 = fab.realize(req)
        assert (rep2.source, rep2.value) == ("local", {"n": 7, "marker": _marker_bytes(7)})
        assert _RUNS["tc.marker"] == 3


def test_get_raw_many_answers_in_order_within_a_byte_budget(tmp_path):
    with Cassette(tmp_path / "c", durability="fast") as cas:
        keys = [ContentKey.of("request", f"k{i}".encode()) for i in range(4)]
        for i, k in enumerate(keys[:3]):
            cas.put(k, codec.encode(b"x" * (100 * (i + 1))), evaluator="e", version="1")
        raws = [cas.get_raw(k) for k in keys]
        assert raws[3] is None and all(r is not None for r in raws[:3])
        assert cas.get_raw_many(keys, 1 << 20) == raws
        assert cas.get_raw_many(keys[::-1], 1 << 20) == raws[::-1]
        # a row that does not fit what is left is skipped; a later, smaller one may still fit
        assert cas.get_raw_many([keys[1], keys[2], keys[0]], len(raws[1]) + len(raws[0])) == [raws[1], None, raws[0]]
        assert cas.get_raw_many(keys, 0) == [None] * 4
        assert cas.get_raw_many([], 10) == []


def test_corrupt_indexed_row_then_put_appends_fresh_row(tmp_path):
    path = tmp_path / "c"
    payload = codec.encode({"marker": _marker_bytes(100)})
    with Cassette(path) as cas:
        cas.put(rkey("a"), payload)
    flip_in_file(path / "data.mdb", _marker_bytes(100))
    with Cassette(path) as cas:
        r = cas.put(rkey("a"), payload)
        assert (r.appended, r.seq) == (True, 2)
        again = cas.put(rkey("a"), payload)
        assert (again.appended, again.seq) == (False, 2)
        assert cas.lookup_value(rkey("a")) == {"marker": _marker_bytes(100)}


def test_a_row_that_goes_bad_after_a_hit_is_a_miss_and_its_fresh_row_is_served(tmp_path):
    """Hits remember a key's ledger seq; a remembered row is checked like any other."""
    path = tmp_path / "c"
    payload = codec.encode({"marker": _marker_bytes(101)})
    with Cassette(path) as cas:
        cas.put(rkey("a"), payload)
        assert cas.lookup_value(rkey("a")) == {"marker": _marker_bytes(101)}  # now remembered
        flip_in_file(path / "data.mdb", _marker_bytes(101))  # bit rot under the open cassette
        assert cas.put(rkey("a"), payload).seq == 2  # the fresh row the index now points to
        # the remembered row fails its check: the index is asked and the fresh row served
        assert cas.lookup_value(rkey("a")) == {"marker": _marker_bytes(101)}
        assert cas.lookup_value(rkey("a")) == {"marker": _marker_bytes(101)}
        b = codec.encode({"marker": _marker_bytes(102)})
        cas.put(rkey("b"), b)
        assert cas.lookup_value(rkey("b")) == {"marker": _marker_bytes(102)}
        flip_in_file(path / "data.mdb", _marker_bytes(102))
        assert cas.lookup_value(rkey("b")) is MISS  # remembered, index and row all say: bad
        assert cas.corrupt_reads == 1


def test_lookup_never_serves_another_keys_row(tmp_path):
    path = tmp_path / "c"
    with Cassette(path) as cas:
        assert cas.put(rkey("A"), payload_of("A")).seq == 1
        assert cas.put(rkey("B"), payload_of("B")).seq == 2
    # bit rot in the index value: A's seq 1 becomes 2 (B's row)
    needle = bytes(rkey("A")) + struct.pack(">Q", 1)
    flip_in_file(path / "data.mdb", needle, at=len(needle) - 1, xor=0x03)
    with Cassette(path) as cas:
        rep = cas.verify(raise_errors=False)
        assert [p.key for p in rep.problems] == [rkey("A")]  # scrub sees it...
        assert cas.get_record(rkey("A")) is None  # ...and so does get_record
        assert cas.lookup_value(rkey("A")) is MISS  # but the hit path serves B's value


# ------------------------------------------------------------------- replay
def _index_snapshot(path: Path) -> dict[bytes, bytes]:
    return dump_env(path)["index"]


def _drop_index(path: Path) -> None:
    env = lmdb.open(str(path), max_dbs=8, subdir=True, create=False)
    try:
        idx = env.open_db(b"index", create=False)
        with env.begin(write=True) as txn:
            txn.drop(idx, delete=True)
    finally:
        env.close()


def test_replay_rebuilds_a_deleted_index_identically(tmp_path):
    path = tmp_path / "c"
    n = 300
    with Cassette(path, durability="fast") as cas:
        for i in range(n):
            cas.put(rkey(i), payload_of(i, i % 50))
        cas.put(rkey("rot"), codec.encode({"marker": _marker_bytes(5)}))
    flip_in_file(path / "data.mdb", _marker_bytes(5))
    with Cassette(path) as cas:  # fresh row for the rotted key, seq n+2
        assert cas.put(rkey("rot"), codec.encode({"marker": _marker_bytes(5)})).seq == n + 2
        for i in range(n, n + 20):
            cas.put(rkey(i), payload_of(i))
    before = _index_snapshot(path)
    assert len(before) == n + 21
    assert before[bytes(rkey("rot"))] == struct.pack(">Q", n + 2)

    _drop_index(path)
    env = lmdb.open(str(path), max_dbs=8, subdir=True, create=False)
    with env.begin() as txn:  # the index DB is really gone
        assert txn.get(b"index") is None
    env.close()
    with Cassette(path) as cas:
        assert cas.lookup_value(rkey(0)) is MISS  # nothing indexed now
        assert cas.stats()["ledger_rows"] == n + 22
        # with no index, a put appends a second row that verifies for an existing key
        assert cas.put(rkey(0), payload_of("second row")).seq == n + 23

    cas = Cassette.from_ledger(path)
    try:
        rep = cas.last_replay
        assert (rep.rows, rep.indexed, rep.corrupt_rows) == (n + 23, n + 21, [n + 1])
        assert cas.lookup_value(rkey(3)) == {"item": "3", "pad": "p" * 3}
        assert cas.lookup_value(rkey(0)) == {"item": "0", "pad": ""}  # the first verifying row wins
    finally:
        cas.close()
    assert _index_snapshot(path) == before

    # rebuild_index on an open cassette gives the same index again, and writes keep working
    with Cassette(path) as cas:
        rep = cas.rebuild_index()
        assert rep.indexed == n + 21
        assert cas.put(rkey("after"), payload_of("after")).seq == n + 24
    after = _index_snapshot(path)
    assert {k: v for k, v in after.items() if k != bytes(rkey("after"))} == before


# ------------------------------------------------------------ export / import
def _populate(cas: Cassette, n: int = 60) -> None:
    from fabric import artifacts

    rng = random.Random(3)
    for i in range(n):
        size = rng.choice([0, 10, 1000, 5000, 70_000])
        cas.put(rkey(i), codec.encode({"i": i, "blob": rng.randbytes(size)}), evaluator="ev", version="2", compute_s=i / 10)
    cas.put_blobs([rng.randbytes(100), rng.randbytes(9000)])
    artifacts.put(cas, rng.randbytes(300_000), chunk_size=64 << 10)
    artifacts.put(cas, np.arange(1000, dtype=">i4").reshape(10, 100), chunk_size=1000)


def test_export_import_serves_every_key_with_identical_bytes(tmp_path):
    src_path = tmp_path / "src"
    with Cassette(src_path) as src:
        _populate(src)
        n = src.export(tmp_path / "all.ledger")
        assert n == src.stats()["records"]
    src_dump = dump_env(src_path)

    with Cassette.from_ledger(tmp_path / "dst", tmp_path / "all.ledger") as dst:
        assert dst.last_replay.indexed == n
        assert dst.verify().ok
        with Cassette(src_path) as src:
            for kb, seqb in src_dump["index"].items():
                key = ContentKey.from_bytes(kb)
                assert dst.get_raw(key) == src_dump["ledger"][seqb]  # the value, byte for byte
                assert dst.lookup_value(key) is not MISS
            for kb, data in src_dump["blobs"].items():
                assert dst.get_blob(ContentKey.from_bytes(kb)) == data
            from fabric import artifacts

            for kb in src_dump["index"]:
                key = ContentKey.from_bytes(kb)
                if key.kind == "artifact":
                    a, b = artifacts.get(src, key), artifacts.get(dst, key)
                    if isinstance(a, np.ndarray):
                        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
                    else:
                        assert a == b
        st_ = dst.stats()
        assert (st_["records"], st_["ledger_rows"], st_["blobs"]) == (n, n, len(src_dump["blobs"]))
        # importing again is a no-op
        assert dst.import_(tmp_path / "all.ledger") == 0
        assert dst.stats()["ledger_rows"] == n


def test_import_into_existing_cassette_skips_held_keys(tmp_path):
    with Cassette(tmp_path / "a") as a:
        for i in range(10):
            a.put(rkey(i), payload_of(i))
        a.export(tmp_path / "a.ledger")
    with Cassette(tmp_path / "b") as b:
        for i in range(5, 15):
            b.put(rkey(i), payload_of(f"b's own {i}"))
        assert b.import_(tmp_path / "a.ledger") == 5
        assert b.stats()["records"] == 15
        assert b.lookup_value(rkey(7))["item"] == "b's own 7"  # held keys keep their reply
        assert b.lookup_value(rkey(2))["item"] == "2"


@pytest.fixture
def exported(tmp_path):
    """(ledger file bytes, target cassette path with its own data, dump of the target)."""
    with Cassette(tmp_path / "src") as src:
        _populate(src, 30)
        src.export(tmp_path / "good.ledger")
    target = tmp_path / "target"
    with Cassette(target) as t:
        for i in range(100, 105):
            t.put(rkey(i), payload_of(i))
    return (tmp_path / "good.ledger").read_bytes(), target, dump_env(target)


def _import_bytes(tmp_path: Path, target: Path, data: bytes, name: str = "bad.ledger") -> FabricError:
    f = tmp_path / name
    f.write_bytes(data)
    with Cassette(target) as t:
        with pytest.raises(FabricError) as ei:
            t.import_(f)
    return ei.value


def test_truncated_ledger_file_is_data_loss_and_target_unchanged(tmp_path, exported):
    data, target, before = exported
    rng = random.Random(11)
    header = len(b"EVALFABRIC-LEDGER\n") + 4
    cuts = {header, header + 1, header + 9, len(data) - 1, len(data) - 40, len(data) - 49}
    cuts |= {rng.randrange(header, len(data)) for _ in range(12)}
    for cut in sorted(cuts):
        err = _import_bytes(tmp_path, target, data[:cut])
        assert err.status_code is StatusCode.DATA_LOSS, (cut, err)
        assert "offset" in err.message
    with pytest.raises(FabricError) as ei:
        Cassette.from_ledger(target, _write(tmp_path / "t.ledger", data[: len(data) // 2]))
    assert ei.value.status_code is StatusCode.DATA_LOSS
    assert dump_env(target) == before


def _write(p: Path, data: bytes) -> Path:
    p.write_bytes(data)
    return p


def test_altered_ledger_file_is_data_loss_and_target_unchanged(tmp_path, exported):
    data, target, before = exported
    rng = random.Random(12)
    header = len(b"EVALFABRIC-LEDGER\n") + 4
    count_field = range(len(data) - 40, len(data) - 32)
    offsets = {header, header + 8, header + 9, len(data) - 49, len(data) - 1}
    offsets |= {rng.randrange(header, len(data)) for _ in range(25)}
    for off in sorted(offsets - set(count_field)):
        bad = bytearray(data)
        bad[off] ^= 0x5A
        err = _import_bytes(tmp_path, target, bytes(bad))
        assert err.status_code is StatusCode.DATA_LOSS, (off, err)
    err = _import_bytes(tmp_path, target, data + b"\x00")
    assert err.status_code is StatusCode.DATA_LOSS

    bad_magic = b"X" + data[1:]
    assert _import_bytes(tmp_path, target, bad_magic).status_code is StatusCode.INVALID_ARGUMENT
    newer = data[: header - 4] + struct.pack(">I", 2) + data[header:]
    assert _import_bytes(tmp_path, target, newer).status_code is StatusCode.FAILED_PRECONDITION
    with Cassette(target) as t:
        with pytest.raises(FabricError) as ei:
            t.import_(tmp_path / "does-not-exist.ledger")
        assert ei.value.status_code is StatusCode.NOT_FOUND
    assert dump_env(target) == before


def _ledger_file(entries: list[tuple[bytes, bytes]]) -> bytes:
    """A ledger file built from the spec alone: header, (tag, body) entries, trailer."""
    out = b"EVALFABRIC-LEDGER\n" + struct.pack(">I", 1)
    for tag, body in entries:
        out += tag + struct.pack(">Q", len(body)) + body
    records = sum(tag == b"R" for tag, _ in entries)
    return out + b"E" + struct.pack(">Q", 40) + struct.pack(">Q", records) + blake3.blake3(out).digest()


def _record(i: int) -> bytes:
    return pack_record(rkey(f"lf {i}"), payload_of(f"lf {i}"), evaluator="ev", version="1", created=1.5, compute_s=0.0, node="n-test")


def test_hand_built_ledger_file_imports(tmp_path):
    blob = b"a blob built by hand"
    data = _ledger_file([(b"R", _record(1)), (b"B", bytes(ContentKey.of("blob", blob)) + blob), (b"R", _record(2))])
    with Cassette(tmp_path / "t") as t:
        assert t.import_(_write(tmp_path / "ok.ledger", data)) == 2
        assert t.get_raw(rkey("lf 1")) == _record(1) and t.get_raw(rkey("lf 2")) == _record(2)
        assert t.get_blob(ContentKey.of("blob", blob)) == blob


def test_well_formed_file_with_bad_contents_is_data_loss_and_target_unchanged(tmp_path, exported):
    _, target, before = exported
    good_blob = b"good blob"
    bad_record = bytearray(_record(2))
    bad_record[-3] ^= 0x20  # payload byte: the CRC no longer matches
    forged = bytearray(_record(3))
    forged[-3] ^= 0x20  # payload byte, with the CRC recomputed: only the BLAKE3 digest catches it
    forged[:4] = struct.pack(">I", zlib.crc32(bytes(forged[4:])))
    cases = {
        "bad record": [(b"R", _record(1)), (b"R", bytes(bad_record)), (b"B", bytes(ContentKey.of("blob", good_blob)) + good_blob)],
        "forged record": [(b"R", _record(1)), (b"R", bytes(forged)), (b"B", bytes(ContentKey.of("blob", good_blob)) + good_blob)],
        "blob not matching its key": [(b"B", bytes(ContentKey.of("blob", good_blob)) + good_blob), (b"B", bytes(ContentKey.of("blob", b"other")) + b"0ther")],
        "blob entry with a request key": [(b"B", bytes(rkey(1)) + b"x")],
        "short blob entry": [(b"B", b"\x02" * 10)],
        "unknown tag": [(b"R", _record(1)), (b"Z", b"")],
    }
    for name, entries in cases.items():
        err = _import_bytes(tmp_path, target, _ledger_file(entries), name=name.replace(" ", "_") + ".ledger")
        assert err.status_code is StatusCode.DATA_LOSS, (name, err)
        assert "offset" in err.message, name
    assert dump_env(target) == before


def test_import_rejects_altered_trailer_record_count(tmp_path, exported):
    data, target, before = exported
    bad = bytearray(data)
    bad[len(data) - 33] ^= 0x01  # low byte of the trailer's records u64
    err = _import_bytes(tmp_path, target, bytes(bad))
    assert err.status_code is StatusCode.DATA_LOSS
    assert dump_env(target) == before


# ------------------------------------------------------- hypothesis stateful
class CassetteMachine(RuleBasedStateMachine):
    """A cassette under random put / re-put / conflicting put / reopen / lookup.

    Invariants after every step: every acknowledged key reads back its exact
    payload, re-puts never add rows, ledger rows == distinct keys == index entries.
    """

    KEYS = [rkey(f"sm {i}") for i in range(8)]

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="cassette-sm-")
        self.cas = Cassette(self.dir, durability="fast")
        self.model: dict[ContentKey, tuple[int, bytes]] = {}

    def teardown(self) -> None:
        self.cas.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    values = st.one_of(st.integers(), st.text(max_size=20), st.binary(max_size=600), st.lists(st.integers(), max_size=5))

    @rule(i=st.integers(0, 7), v=values)
    def put(self, i, v):
        k = self.KEYS[i]
        payload = codec.encode(v)
        r = self.cas.put(k, payload)
        if k in self.model:
            assert not r.appended
            assert r.seq == self.model[k][0]
            assert r.digest == payload_digest(self.model[k][1])
        else:
            assert r.appended and r.seq == len(self.model) + 1
            self.model[k] = (r.seq, payload)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def reput_same(self, data):
        k = data.draw(st.sampled_from(sorted(self.model)))
        seq, payload = self.model[k]
        r = self.cas.put(k, payload)
        assert (r.appended, r.seq) == (False, seq)

    @rule()
    def reopen(self):
        self.cas.close()
        self.cas = Cassette(self.dir, durability="fast")

    @rule(i=st.integers(0, 7))
    def lookup(self, i):
        k = self.KEYS[i]
        v = self.cas.lookup_value(k)
        if k in self.model:
            assert v == codec.decode(self.model[k][1])
        else:
            assert v is MISS

    @invariant()
    def every_acknowledged_key_reads_back_exactly(self):
        for k, (seq, payload) in self.model.items():
            rec = self.cas.get_record(k)
            assert rec is not None and rec.seq == seq and rec.payload == payload

    @invariant()
    def rows_equal_distinct_keys(self):
        st_ = self.cas.stats()
        assert st_["ledger_rows"] == st_["records"] == len(self.model)


TestCassetteMachine = CassetteMachine.TestCase
TestCassetteMachine.settings = settings(
    max_examples=30, stateful_step_count=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def test_scrub_in_small_steps_checks_everything_and_lets_the_map_grow_between_steps(tmp_path, monkeypatch):
    """verify() runs as scrub() steps of short read transactions: with steps of 3 rows
    every row, index entry and blob is still checked once, a corrupt row is found in
    whichever step holds it, and a map resize (which waits for every open
    transaction of the process) completes while a scrub is paused between steps."""
    import cassette.store as store

    monkeypatch.setattr(store, "SCRUB_ROWS", 3)
    path = tmp_path / "c"
    keys = [ContentKey.for_request("scrub", "1", {"i": i}) for i in range(10)]
    with Cassette(path, durability="fast") as cas:
        for i, k in enumerate(keys):
            cas.put(k, codec.encode({"i": i, "marker": _marker_bytes(100 + i)}), evaluator="scrub", version="1")
        cas.put_verified_blobs([(ContentKey.of("blob", bytes([i]) * 100), bytes([i]) * 100) for i in range(7)])
        steps = list(cas.scrub())
        rep = steps[-1]
        assert (rep.records, rep.indexed, rep.blobs, rep.problems) == (10, 10, 7, [])
        assert len(steps) == 4 + 4 + 3  # ceil(10/3) + ceil(10/3) + ceil(7/3): one read txn each

        it = cas.scrub()
        next(it)  # paused after the first step: no transaction is open now
        before = cas._env.info()["map_size"]
        done = threading.Event()
        t = threading.Thread(target=lambda: (cas._resize(before * 2), done.set()))
        t.start()
        assert done.wait(10), "a map resize waited on a paused scrub"
        t.join()
        assert cas._env.info()["map_size"] == before * 2
        assert list(it)[-1].records == 10
    assert flip_in_file(path / "data.mdb", _marker_bytes(107)) >= 1
    with Cassette(path) as cas:
        rep = cas.verify(raise_errors=False)
        assert rep.records == 10 and rep.blobs == 7
        assert {p.key for p in rep.problems} == {keys[7]}


def test_aput_blobs_checks_each_blob_unless_the_caller_just_did(tmp_path):
    """aput_blobs hashes every blob against its key (DATA_LOSS, nothing stored);
    verified=True (a fetch or upload that checked each on arrival) skips that second
    hash, and even then a blob that does not match its key is never read back."""
    import trio

    good = b"g" * 1000
    kg = ContentKey.of("blob", good)
    kb = ContentKey.of("blob", b"other bytes")
    with Cassette(tmp_path / "c", durability="fast") as cas:

        async def main():
            with pytest.raises(FabricError) as ei:
                await cas.aput_blobs([(kg, good), (kb, b"not the bytes of kb")])
            assert ei.value.status_code is StatusCode.DATA_LOSS and ei.value.key == kb
            assert cas.missing([kg, kb]) == [kg, kb]  # nothing of a refused batch is stored
            with pytest.raises(FabricError):  # a key that is not a blob key is refused either way
                await cas.aput_blobs([(ContentKey.for_request("x", "1", {}), good)], verified=True)
            await cas.aput_blobs([(kg, good), (kb, b"not the bytes of kb")], verified=True)

        trio.run(main)
        assert cas.get_blob(kg) == good
        assert cas.get_blob(kb) is None  # the caller's broken promise reads as a miss, never as bytes


def test_embedded_fabric_export_and_replay_match_the_node_ops(tmp_path):
    """Fabric.export / Fabric.replay on the embedded fabric: the file round-trips, the
    counts have the shape RemoteFabric.replay returns, and a second replay appends nothing."""
    import numpy as np

    src = tmp_path / "src"
    with fabric.open(src, durability="fast") as fab:
        keys = []
        for i in range(5):
            k = ContentKey.for_request("tc.export", "1", {"i": i})
            fab.cassette.put(k, codec.encode({"i": i}), evaluator="tc.export", version="1")
            keys.append(k)
        ref = fab.put(np.arange(50_000, dtype=np.int32), chunk_size=1 << 16)
        assert fab.export(tmp_path / "x.ledger") == 6
    with fabric.open(tmp_path / "dst", durability="fast") as dst:
        first = dst.replay(tmp_path / "x.ledger")
        assert first == {"records": 6, "appended": 6, "blobs": ref.chunks}
        assert dst.replay(tmp_path / "x.ledger") == {"records": 6, "appended": 0, "blobs": ref.chunks}
        assert [dst.cassette.lookup_value(k) for k in keys] == [{"i": i} for i in range(5)]
        np.testing.assert_array_equal(dst.get(ref.key), np.arange(50_000, dtype=np.int32))
        bad = tmp_path / "bad.ledger"
        raw = bytearray((tmp_path / "x.ledger").read_bytes())
        raw[len(raw) // 2] ^= 0x40
        bad.write_bytes(bytes(raw))
    with fabric.open(tmp_path / "dst2", durability="fast") as dst2:
        with pytest.raises(FabricError) as ei:
            dst2.replay(bad)
        assert ei.value.status_code in (StatusCode.DATA_LOSS, StatusCode.INVALID_ARGUMENT)
        assert dst2.stats()["records"] == 0 and dst2.stats()["blobs"] == 0  # nothing appended


# ------------------------------------------------------------- replay upload parsing


def _entries_stream(n: int) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    from cassette.ledgerfile import entry_header

    entries = []
    for i in range(n):
        if i % 3 == 2:
            data = bytes([i % 251]) * (i * 7 % 300)
            entries.append((b"B", bytes(ContentKey.of("blob", data)) + data))
        else:
            k = ContentKey.for_request("tc.reader", "1", {"i": i})
            entries.append((b"R", pack_record(k, codec.encode(i), evaluator="tc.reader", version="1", created=1.0,
                                              compute_s=0.0, node="n")))
    return b"".join(entry_header(t, len(b)) + b for t, b in entries), entries


@given(st.lists(st.integers(min_value=0, max_value=20_000), max_size=30), st.integers(min_value=0, max_value=12))
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_entry_reader_yields_the_same_entries_however_the_stream_is_cut(cuts, n):
    """A replay upload may cut entries anywhere: EntryReader gives back exactly the
    entries, with their offsets, whatever the pieces, and close() accepts the end."""
    from cassette.ledgerfile import EntryReader

    stream, entries = _entries_stream(n)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    r = EntryReader()
    got = []
    for a, b in zip(points, points[1:]):
        got.extend(r.feed(stream[a:b]))
    r.close()
    assert [(t, b) for t, b, _ in got] == entries
    offsets, off = [], 0
    for t, b in entries:
        offsets.append(off)
        off += 9 + len(b)
    assert [o for _, _, o in got] == offsets


@given(st.binary(max_size=400), st.integers(min_value=1, max_value=64))
@settings(max_examples=300, deadline=None)
def test_entry_reader_refuses_garbage_with_one_clear_error(garbage, piece):
    """Arbitrary bytes either parse into entries of a known tag or raise INVALID_ARGUMENT
    (bad header, or ending inside an entry): never another exception, never a huge buffer."""
    from cassette.ledgerfile import EntryReader

    r = EntryReader(max_entry=1 << 16)
    try:
        for i in range(0, len(garbage), piece):
            for tag, body, _ in r.feed(garbage[i : i + piece]):
                assert tag in (b"R", b"B") and len(body) <= 1 << 16
        r.close()
    except FabricError as exc:
        assert exc.status_code is StatusCode.INVALID_ARGUMENT


def test_ledger_and_blob_scans_hold_a_bounded_number_of_bytes_whatever_the_row_sizes(tmp_path):
    """An export (and any ledger or blob scan) copies rows out of short read transactions in
    batches capped by bytes as well as by count: 40 rows and 40 blobs of 1 MiB never sit in
    memory together (the count caps alone, 1024 rows / 64 blobs, would hold all 40 MiB)."""
    import os
    import tracemalloc

    from cassette import store
    from cassette.ledgerfile import iter_ledger_file_bytes

    n, size = 40, 1 << 20
    with Cassette(tmp_path / "c", durability="fast") as cas:
        for i in range(n):
            cas.put(ContentKey.of("request", f"big{i}".encode()), codec.encode(os.urandom(size)), evaluator="e", version="1")
        cas.put_blobs([os.urandom(size) for _ in range(n)])
        for scan in (lambda: sum(1 for _ in cas.iter_ledger()), lambda: sum(len(c) for c in iter_ledger_file_bytes(cas))):
            tracemalloc.start()
            try:
                got = scan()
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert got >= n
            assert peak < store.SCAN_BATCH_BYTES + 8 * size, f"a scan peaked at {peak >> 20} MiB"


def test_a_replay_of_large_entries_stores_them_in_batches_of_bounded_bytes(tmp_path):
    import os
    import tracemalloc

    from cassette.ledgerfile import REPLAY_BATCH_BYTES, read_ledger_file, write_ledger_file

    n, size = 40, 1 << 20
    with Cassette(tmp_path / "src", durability="fast") as cas:
        keys = [ContentKey.of("request", f"big{i}".encode()) for i in range(n)]
        for k in keys:
            cas.put(k, codec.encode(os.urandom(size)), evaluator="e", version="1")
        blobs = cas.put_blobs([os.urandom(size) for _ in range(n)])
        write_ledger_file(cas, tmp_path / "l.efl")
        want = {k: cas.get_raw(k) for k in keys}
    with Cassette(tmp_path / "dst", durability="fast") as dst:
        commits = dst.commits
        tracemalloc.start()
        try:
            counts: dict = {}
            assert read_ledger_file(dst, tmp_path / "l.efl", counts=counts) == n
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert counts == {"records": n, "blobs": n}
        assert all(dst.get_raw(k) == v for k, v in want.items()) and all(dst.get_blob(b) is not None for b in blobs)
        assert peak < 2 * REPLAY_BATCH_BYTES + 8 * size, f"the replay peaked at {peak >> 20} MiB"  # a batch, its commit, the file reads
        assert dst.commits - commits <= 2 * n * size // REPLAY_BATCH_BYTES + 2  # a batch per ~8 MiB, not a commit per blob


def test_submit_raw_many_applies_batches_in_the_order_queued_and_refuses_a_bad_one_whole(tmp_path):
    """Two batches queued before either is waited for land in queue order (their rows
    follow each other), already-held records answer ``appended=False`` with their row, and
    a batch holding one invalid value raises at once and queues nothing."""
    first = [_record(i) for i in range(5)]
    second = [_record(i) for i in range(5, 9)] + [first[0]]
    with Cassette(tmp_path / "c") as cas:
        a = cas.submit_raw_many(first)
        b = cas.submit_raw_many(second)
        got_b, got_a = b.wait(), a.wait()
        assert [r.seq for r in got_a] == [1, 2, 3, 4, 5] and all(r.appended for r in got_a)
        assert [r.seq for r in got_b] == [6, 7, 8, 9, 1] and [r.appended for r in got_b] == [True] * 4 + [False]
        assert [r.key for r in got_a + got_b] == [unpack_record(v).key for v in first + second]
        bad = bytearray(_record(20))
        bad[-1] ^= 0x01
        with pytest.raises(FabricError) as ei:
            cas.submit_raw_many([_record(21), bytes(bad)])
        assert ei.value.status_code is StatusCode.DATA_LOSS
        assert cas.stats()["ledger_rows"] == 9 and not cas.contains(unpack_record(_record(21)).key)
        assert cas.submit_raw_many([]).wait() == []
    with Cassette(tmp_path / "c") as again:
        assert again.verify().ok and [r.key for r in again.iter_ledger()] == [unpack_record(v).key for v in first + second[:4]]


def test_put_under_a_blob_key_is_invalid_argument_and_records_nothing(tmp_path):
    """A blob is stored by put_blob under its own key and never recorded: a ledger row under a
    blob key is what import and replay refuse (DATA_LOSS) and a scrub reports as damage, so
    the local put refuses to write one."""
    with Cassette(tmp_path / "c", durability="fast") as cas:
        key = ContentKey.of("blob", b"some bytes")
        with pytest.raises(FabricError) as ei:
            cas.put(key, b"\xa1x")
        assert ei.value.status_code is StatusCode.INVALID_ARGUMENT and "put_blob" in ei.value.message
        assert cas.stats()["ledger_rows"] == 0 and cas.verify().ok
