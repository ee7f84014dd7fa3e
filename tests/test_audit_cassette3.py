"""Audit of the cassette (issue #3 item 4) against real LMDB files and real processes.

Each test here failed before the fix it names; corruption is real bytes changed in
``data.mdb`` with the environment closed, dead readers are real processes killed -9.
"""

from __future__ import annotations

import json
import linecache
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import lmdb
import pytest

from cassette import codec
from cassette.errors import FabricError, StatusCode
from cassette.keys import ContentKey
from cassette.store import MISS, Cassette
from conftest import ROOT, child_env, flip_in_file


def rkey(i: int | str) -> ContentKey:
    """A request-kind key for test item ``i``."""
    return ContentKey.of("request", f"audit-cassette3 item {i}".encode())


def value_of(i: int | str) -> bytes:
    return codec.encode({"item": str(i), "pad": "a" * 64})


def filled(path: Path, n: int = 8, **kw) -> Path:
    """A closed cassette at ``path`` holding items 0..n-1 at seqs 1..n."""
    with Cassette(path, **kw) as cas:
        for i in range(n):
            assert cas.put(rkey(i), value_of(i)).seq == i + 1
    return path


# ------------------------------------------------- index entry naming another key's row
def test_put_of_a_key_whose_index_entry_rotted_to_another_row_appends_and_serves_it(tmp_path):
    """A rotted seq in the index (row 4 -> row 5, another key's, which verifies) made every
    later put of that key a no-op answered with the other key's digest: the key stayed a miss
    for good (realize recomputed it on every call).  Now the put appends a fresh row."""
    path = filled(tmp_path / "c")
    k = rkey(3)
    flip_in_file(path / "data.mdb", bytes(k) + struct.pack(">Q", 4), at=33 + 7, xor=0x01)
    with Cassette(path) as cas:
        assert cas.lookup_value(k) is MISS  # row 5 is item 4's: never served for item 3
        res = cas.put(k, value_of(3))
        assert res.appended and res.seq == 9
        assert cas.lookup_value(k) == codec.decode(value_of(3))
        assert cas.put(k, value_of(3)).appended is False  # and held from now on
        assert cas.get_record(k).seq == 9


def test_put_after_a_lost_tail_row_whose_seq_was_reused(tmp_path):
    """The tail row of item 7 lost (seq 8); seq 8 is then taken by item 9: item 7's index
    entry names item 9's row.  Putting item 7 again records it (was a no-op for good)."""
    path = filled(tmp_path / "c")
    env = lmdb.open(str(path), max_dbs=8, subdir=True, create=False)
    with env.begin(write=True, db=env.open_db(b"ledger", create=False)) as txn:
        assert txn.delete(struct.pack(">Q", 8))
    env.close()
    with Cassette(path) as cas:
        assert cas.put(rkey(9), value_of(9)).seq == 8
        res = cas.put(rkey(7), value_of(7))
        assert res.appended and res.seq == 9
        assert cas.lookup_value(rkey(7)) == codec.decode(value_of(7))


# ------------------------------------------------------------ reader slots of dead processes
_HOLD_EVERY_SLOT = r"""
import sys, threading, time
from cassette.store import Cassette
cas = Cassette(sys.argv[1])
held = []
lock = threading.Lock()
full = threading.Event()
def hold():
    try:
        with cas._reading():
            with lock:
                held.append(1)
            time.sleep(120)
    except Exception:  # the reader table is full (lmdb's error, or the cassette's)
        full.set()
while not full.is_set():
    threading.Thread(target=hold, daemon=True).start()
    time.sleep(0.0005)
time.sleep(0.2)
print(len(held), flush=True)
time.sleep(120)
"""


def test_reader_slots_of_a_process_killed_9_are_freed_without_reopening(tmp_path):
    """A process killed -9 with every free reader slot held in read transactions left them
    taken: a cassette opened before it died then failed every concurrent read with a raw
    lmdb.ReadersFullError (reader_check ran only at open).  Now a full table is checked
    and the read goes on."""
    path = filled(tmp_path / "c")
    with Cassette(path) as cas:
        assert cas.lookup_value(rkey(1)) is not MISS
        child = subprocess.Popen([sys.executable, "-c", _HOLD_EVERY_SLOT, str(path)], cwd=ROOT,
                                 env=child_env(tmp_path / "home"), stdout=subprocess.PIPE, text=True)
        try:
            assert int(child.stdout.readline()) > 400  # it took every slot this process did not hold
        finally:
            os.kill(child.pid, signal.SIGKILL)
            child.wait(10)
            child.stdout.close()
        out: list = []
        with cas._reading():  # this thread holds one slot: the reads below need another
            t = threading.Thread(target=lambda: out.extend([cas.lookup_value(rkey(2)), cas.get_record(rkey(3)).seq, len(cas)]))
            t.start()
            t.join(10)
        assert out == [codec.decode(value_of(2)), 4, 8]


# ---------------------------------------------- damage outside the ledger payloads
def test_scrub_reports_malformed_index_and_blob_keys_and_export_stays_importable(tmp_path):
    """An index key whose kind byte rotted made verify() raise INVALID_ARGUMENT (not a
    DATA_LOSS report); a blob key whose kind byte rotted passed verify(), and the export,
    paging the blobs with set_range over the now out-of-order page, never ended (it would
    also have written the key, which every import refuses whole)."""
    path = filled(tmp_path / "c")
    with Cassette(path) as cas:
        blob = cas.put_blob(b"audit blob " * 8)
        other = cas.put_blob(b"another blob " * 8)
    flip_in_file(path / "data.mdb", bytes(rkey(3)) + struct.pack(">Q", 4), at=0, xor=0x40)
    flip_in_file(path / "data.mdb", bytes(blob), at=0, xor=0x40)
    with Cassette(path) as cas:
        problems = cas.verify(raise_errors=False).problems
        assert [p.status_code for p in problems] == [StatusCode.DATA_LOSS] * 2
        assert "not a record key" in problems[0].message and "not a blob key" in problems[1].message
        out: list = []  # (the export of the blobs never ended over the out-of-order key)
        t = threading.Thread(target=lambda: out.append(cas.export(tmp_path / "out.ledger")), daemon=True)
        t.start()
        t.join(10)
        assert out == [8]
    with Cassette(tmp_path / "d") as fresh:
        assert fresh.import_(tmp_path / "out.ledger") == 8
        assert fresh.get_blob(other) == b"another blob " * 8
        assert fresh.get_blob(blob) is None


def test_scrub_reports_a_ledger_gap_and_a_malformed_index_seq(tmp_path):
    """Rows are never deleted, so a missing seq is data loss even when no index entry names
    it; an index value that is not 8 bytes broke verify() with a raw struct.error."""
    path = filled(tmp_path / "c")
    with Cassette(path) as cas:
        assert cas.put(rkey(3), value_of(3)).appended is False
    env = lmdb.open(str(path), max_dbs=8, subdir=True, create=False)
    with env.begin(write=True) as txn:
        ledger, index = env.open_db(b"ledger", txn=txn, create=False), env.open_db(b"index", txn=txn, create=False)
        txn.put(bytes(rkey(5)), b"\x00\x06", db=index)  # a short seq
        txn.delete(bytes(rkey(2)), db=index)
        txn.delete(struct.pack(">Q", 3), db=ledger)  # item 2's row, no longer indexed
    env.close()
    with Cassette(path) as cas:
        messages = sorted(p.message for p in cas.verify(raise_errors=False).problems)
        assert messages == ["index entry holds 2 bytes, not a u64 seq", "ledger rows 3..3 are missing"]
        assert cas.lookup_value(rkey(5)) is MISS


def test_an_unreadable_ledger_bytes_counter_is_recounted_not_fatal(tmp_path):
    """A rotted digit in meta's ledger_bytes made stats() (and so every /metrics scrape) raise
    a raw ValueError and failed every later put with INTERNAL, for good."""
    path = filled(tmp_path / "c")
    with Cassette(path) as cas:
        before = cas.stats()["ledger_bytes"]
    flip_in_file(path / "data.mdb", b"ledger_bytes" + str(before).encode(), at=12, xor=0x40)
    with Cassette(path) as cas:
        assert cas.stats()["ledger_bytes"] == before
        res = cas.put(rkey(8), value_of(8))
        assert res.appended
        after = cas.stats()["ledger_bytes"]
        assert after == before + len(cas.get_raw(rkey(8)))
        assert cas.put(rkey(9), value_of(9)).appended
        assert cas.stats()["ledger_bytes"] == after + len(cas.get_raw(rkey(9)))


def test_an_unreadable_node_id_mark_is_failed_precondition(tmp_path):
    """Was a raw UnicodeDecodeError from the constructor."""
    path = filled(tmp_path / "c", node_id="nodeABC")
    flip_in_file(path / "data.mdb", b"nodeABC", at=0, xor=0x80)
    with pytest.raises(FabricError) as ei:
        Cassette(path)
    assert ei.value.status_code is StatusCode.FAILED_PRECONDITION
    assert "node_id" in ei.value.message


def _damage_ledger_page(path: Path, key: ContentKey) -> None:
    """Change the page-type flags of every page of data.mdb that holds ``key``'s record (its
    live ledger leaf and any stale copy), as a torn or rotted page would."""
    data = bytearray((path / "data.mdb").read_bytes())
    needle = b"\xc7\x21\x02" + bytes(key)  # the ext8 header of the key in the record meta
    pages = set()
    at = data.find(needle)
    while at >= 0:
        pages.add(at - at % 4096)
        at = data.find(needle, at + 1)
    assert pages
    for page in pages:
        data[page + 10] ^= 0x5A
    (path / "data.mdb").write_bytes(bytes(data))


def test_a_damaged_lmdb_page_is_data_loss_everywhere_never_a_raw_lmdb_error(tmp_path):
    """Reads, stats, puts and verify() on a cassette whose ledger B-tree page is damaged raised
    raw lmdb.BadTxnError / CorruptedError (or INTERNAL); now each is DATA_LOSS naming the
    cassette, and verify(raise_errors=False) reports it instead of raising."""
    path = filled(tmp_path / "c")
    _damage_ledger_page(path, rkey(3))
    with Cassette(path) as cas:
        calls = [lambda: cas.lookup_value(rkey(3)), lambda: cas.get_raw(rkey(3)), lambda: cas.get_record(rkey(3)),
                 lambda: cas.get_raw_many([rkey(3)], 1 << 20), cas.stats, lambda: cas.put(rkey(99), value_of(99))]
        for call in calls:
            with pytest.raises(FabricError) as ei:
                call()
            assert ei.value.status_code is StatusCode.DATA_LOSS, ei.value
            assert "damaged" in ei.value.message
        rep = cas.verify(raise_errors=False)
        assert rep.problems and all(p.status_code is StatusCode.DATA_LOSS for p in rep.problems)


# ------------------------------------------------------------ damaged LMDB main database
def _main_db_node(name: bytes) -> bytes:
    """The head of ``name``'s node in a main-database leaf page: data size 48 (u32 LE, as
    two u16), flags F_SUBDATA, key size; the key follows, then its 48-byte MDB_db record."""
    return struct.pack("<HHHH", 48, 0, 0x02, len(name)) + name


def _misdirect_meta_to_ledger(path: Path) -> None:
    """In every copy of the main database's leaf page, point the ``meta`` database's root
    (md_root, the last u64 of its MDB_db record) at the ``ledger`` database's root, as a
    rotted page number would: ``meta`` then reads as a tree without a format mark."""
    data = bytearray((path / "data.mdb").read_bytes())
    meta_node, ledger_node = _main_db_node(b"meta"), _main_db_node(b"ledger")
    at, done = data.find(meta_node), 0
    while at >= 0:
        page = at - at % 4096
        ledger_at = data.find(ledger_node, page, page + 4096)
        if ledger_at >= 0:
            root = ledger_at + len(ledger_node) + 40
            data[at + len(meta_node) + 40: at + len(meta_node) + 48] = data[root:root + 8]
            done += 1
        at = data.find(meta_node, at + 1)
    assert done
    (path / "data.mdb").write_bytes(bytes(data))


def _lower_bound_of_main_db_pages(path: Path) -> None:
    """Change mp_lower (the page header's free-space start) of every leaf page that holds the
    main database's ``ledger`` node: LMDB then finds no named database in it."""
    data = bytearray((path / "data.mdb").read_bytes())
    pages = set()
    at = data.find(_main_db_node(b"ledger"))
    while at >= 0:
        pages.add(at - at % 4096)
        at = data.find(_main_db_node(b"ledger"), at + 1)
    for page in pages:
        data[page + 12] ^= 0x5A
    (path / "data.mdb").write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [
    lambda p: flip_in_file(p / "data.mdb", _main_db_node(b"ledger"), at=8),  # key 'ledger' rots to 'medger'
    lambda p: flip_in_file(p / "data.mdb", _main_db_node(b"meta"), at=9),  # 'meta' rots to 'mdta'
    _misdirect_meta_to_ledger,
    _lower_bound_of_main_db_pages,
], ids=["ledger-name", "meta-name", "meta-root", "page-bounds"])
def test_a_cassette_whose_main_database_is_damaged_is_data_loss_not_foreign(tmp_path, damage):
    """A damaged main-database page (real bytes changed in data.mdb) read as "an LMDB
    environment of another program", "without a cassette format mark" (both FAILED_PRECONDITION:
    not a cassette, use another directory) or a raw lmdb.NotFoundError.  The environment still
    holds records that verify, so it is a damaged cassette: DATA_LOSS naming the directory and
    the way back, and nothing written.  A directory that is not a cassette keeps its refusal."""
    path = filled(tmp_path / "c")
    damage(path)
    before = (path / "data.mdb").read_bytes()
    for _ in range(2):  # and again: the refusal changed nothing
        with pytest.raises(FabricError) as ei:
            Cassette(path)
        assert ei.value.status_code is StatusCode.DATA_LOSS, ei.value
        assert str(path) in ei.value.message and "damaged" in ei.value.message
        assert "replay an export" in ei.value.message and "peer" in ei.value.message
        assert (path / "data.mdb").read_bytes() == before

    # another program's environment with our ledger name and rows that are not records
    theirs = tmp_path / "theirs"
    env = lmdb.open(str(theirs), max_dbs=8, subdir=True)
    for name in (b"ledger", b"journal"):
        with env.begin(write=True, db=env.open_db(name)) as txn:
            txn.put(struct.pack(">Q", 1), b"their row")
    env.close()
    with pytest.raises(FabricError) as ei:
        Cassette(theirs)
    assert ei.value.status_code is StatusCode.FAILED_PRECONDITION and "another program" in ei.value.message


# ------------------------------------------------------------------ put racing close
def test_a_put_that_passed_the_closed_check_as_close_ran_does_not_hang(tmp_path):
    """A put that had checked "not closed" but not yet queued its job when close() queued the
    writer's stop marker and joined it was queued behind the marker: no writer ever took it
    and the put blocked for ever.  The put is paused there (a line trace on its own thread)
    until close() has stopped the writer, or for 1 s if close() cannot get that far first."""
    cas = Cassette(tmp_path / "c", durability="fast")
    cas.put(rkey(1), value_of(1))
    paused, outcome = threading.Event(), []

    def trace(frame, event, arg):
        if frame.f_code.co_name != "_submit":
            return None
        def line(frame, event, arg):
            if event == "line" and "put(job)" in linecache.getline(frame.f_code.co_filename, frame.f_lineno):
                paused.set()
                deadline = time.monotonic() + 1.0
                while cas._writer.is_alive() and time.monotonic() < deadline:
                    time.sleep(0.01)
            return line
        return line

    def put() -> None:
        sys.settrace(trace)
        try:
            outcome.append(cas.put(rkey(2), value_of(2)).seq)
        except FabricError as exc:
            outcome.append(exc.status_code)
        finally:
            sys.settrace(None)

    t = threading.Thread(target=put, daemon=True)
    t.start()
    assert paused.wait(5)
    cas.close()
    t.join(5)
    assert not t.is_alive(), "the put never returned"
    assert outcome in ([2], [StatusCode.FAILED_PRECONDITION])


# -------------------------------------------------------- determinism conflicts on import
def test_importing_a_different_reply_for_a_held_key_keeps_the_recorded_one_and_reports_it(tmp_path, caplog):
    """Importing a ledger whose record for a held key has other bytes (a non-deterministic
    evaluator on another node) was a silent no-op; it still records nothing and serves the
    held reply, and now logs the conflict and counts it in stats()."""
    k = rkey("same")
    with Cassette(tmp_path / "a", node_id="na") as a:
        a.put(k, codec.encode({"v": "from a"}))
        a.put(rkey("only a"), value_of("only a"))
        a.export(tmp_path / "a.ledger")
    with Cassette(tmp_path / "b", node_id="nb") as b:
        b.put(k, codec.encode({"v": "from b"}))
        assert b.import_(tmp_path / "a.ledger") == 1
        assert b.lookup_value(k) == {"v": "from b"}
        assert b.stats()["conflicts"] == 1
        assert b.import_(tmp_path / "a.ledger") == 0
        assert b.stats()["conflicts"] == 2
        assert b.put(k, codec.encode({"v": "from b"})).appended is False
        assert b.stats()["conflicts"] == 2  # the same reply again is no conflict
        assert b.verify().ok
    assert any("determinism conflict" in r.getMessage() and str(k) in r.getMessage() for r in caplog.records)


# ------------------------------------------------ the cross-process compute lock (fabric/local.py)
_CROSSED = r"""
import json, sys, threading
import fabric
from fabric.registry import load_evaluators

load_evaluators("examples.evaluators")
out = {}
with fabric.open(sys.argv[1]) as fab:
    def go(x):
        try:
            rep = fab.realize(fabric.Request("slow.square", {"x": x, "delay": 3.0}))
            out[x] = [rep.source, rep.value]
        except Exception as exc:
            out[x] = repr(exc)
    first = threading.Thread(target=go, args=(int(sys.argv[2]),))
    first.start()
    sys.stdin.readline()
    second = threading.Thread(target=go, args=(int(sys.argv[3]),))
    second.start()
    first.join()
    second.join()
print(json.dumps(out), flush=True)
"""


def test_crossed_waits_of_two_processes_are_no_deadlock_error(tmp_path):
    """A computes x=1 and B x=2 (each holding its key's byte lock); then A's second thread waits
    for x=2 and B's for x=1.  Nothing is stuck (each computation ends), but the kernel's
    per-process deadlock check answered B's wait with EDEADLK, raised from realize as a raw
    OSError.  Now both get both values, and each key is computed once."""
    data, log = tmp_path / "data", tmp_path / "eval.log"
    env = child_env(tmp_path / "home", FABRIC_EVAL_LOG=str(log))
    procs = []

    def start(first: int, second: int) -> None:
        procs.append(subprocess.Popen([sys.executable, "-c", _CROSSED, str(data), str(first), str(second)], cwd=ROOT, env=env,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        deadline = time.monotonic() + 15
        while f"x={first}" not in (log.read_text() if log.exists() else ""):
            assert time.monotonic() < deadline and procs[-1].poll() is None, "the evaluator never started"
            time.sleep(0.02)

    try:
        start(1, 2)
        start(2, 1)
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
            time.sleep(0.3)  # A's second thread is waiting before B's asks
        outs = [p.communicate(timeout=30) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert results == [{"1": ["computed", 1], "2": ["local", 4]}, {"2": ["computed", 4], "1": ["local", 1]}], results
    assert sorted(line.rsplit(" ", 1)[0] for line in log.read_text().splitlines()) == ["slow.square x=1", "slow.square x=2"]
