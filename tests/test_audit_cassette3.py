"""Audit of the cassette (issue #3 item 4) against real LMDB files and real processes.

Each test here failed before the fix it names; corruption is real bytes changed in
``data.mdb`` with the environment closed, dead readers are real processes killed -9.
"""

from __future__ import annotations

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
