"""Crash safety: kill -9 a writer mid-burst, and compute-once across processes.

The writer child acknowledges each put by appending the item number to a
per-thread side file with ``os.write`` *after* ``put`` returned; the kernel
keeps those bytes through kill -9, so after the kill the side files are the
exact list of puts the child was told were durable.
"""

from __future__ import annotations

import json
import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cassette.store import Cassette
from conftest import ROOT, child_env

THREADS = 8
PER_THREAD = 1250  # 10k records per burst

# shared by the child and the parent (exec'd in both), so both agree on keys and payloads
COMMON = """
from cassette import codec
from cassette.keys import ContentKey

def item_key(t, i):
    return ContentKey.of("request", f"crash burst {t} {i}".encode())

def item_payload(t, i):
    return codec.encode({"t": t, "i": i, "pad": bytes([i % 251]) * (i % 300)})
"""

WRITER = COMMON + """
import os, sys, threading
from cassette.store import Cassette

path, side, durability = sys.argv[1], sys.argv[2], sys.argv[3]
threads, per = int(sys.argv[4]), int(sys.argv[5])
cas = Cassette(path, durability=durability)
fds = [os.open(os.path.join(side, f"acked-{t}"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) for t in range(threads)]
go = threading.Event()

def work(t):
    go.wait()
    for i in range(per):
        cas.put(item_key(t, i), item_payload(t, i))
        os.write(fds[t], b"%d\\n" % i)   # the acknowledgement, after put returned

ts = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
for th in ts:
    th.start()
print("started", flush=True)
go.set()
for th in ts:
    th.join()
cas.close()
print("done", flush=True)
"""

_common: dict = {}
exec(COMMON, _common)
item_key = _common["item_key"]
item_payload = _common["item_payload"]


def _acked_counts(side: Path) -> list[int]:
    out = []
    for t in range(THREADS):
        p = side / f"acked-{t}"
        out.append(p.read_bytes().count(b"\n") if p.exists() else 0)
    return out


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "child did not report in time"
    return proc.stdout.readline().decode().strip()


@pytest.mark.parametrize(
    "seed,durability",
    [(1, "sync"), (2, "sync"), (3, "sync"), (4, "sync"), (5, "sync"), (6, "fast")],
)
def test_kill_9_mid_burst_loses_no_acknowledged_put_and_leaves_nothing_half_written(tmp_path, seed, durability):
    rng = random.Random(seed)
    path, side = tmp_path / "cassette", tmp_path / "acks"
    side.mkdir()
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    target = rng.randint(1, 8000)  # kill once this many puts were acknowledged (of 10,000)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(path), str(side), durability, str(THREADS), str(PER_THREAD)],
        cwd=ROOT, env=child_env(tmp_path / "home"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        assert _read_line(proc, 60) == "started"
        deadline = time.monotonic() + 60
        while sum(_acked_counts(side)) < target:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "writer made no progress"
            time.sleep(0.001)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL  # it really died mid-burst

    acked = _acked_counts(side)
    for t in range(THREADS):  # each thread acknowledges 0, 1, 2, ... in order
        lines = (side / f"acked-{t}").read_bytes().split(b"\n") if acked[t] else [b""]
        assert lines[-1] == b"" and [int(x) for x in lines[:-1]] == list(range(acked[t]))
    assert sum(acked) >= target

    with Cassette(path) as cas:
        for t in range(THREADS):
            for i in range(acked[t]):  # every acknowledged put is there and verifies
                rec = cas.get_record(item_key(t, i))
                assert rec is not None, (t, i)
                assert rec.payload == item_payload(t, i)
            # at most the one put in flight per thread may have committed unacknowledged
            for i in range(acked[t] + 1, PER_THREAD):
                assert not cas.contains(item_key(t, i)), (t, i)
        rep = cas.verify()  # raises on any problem
        st = cas.stats()
        assert rep.ok and rep.records == rep.indexed == st["ledger_rows"] == st["records"]
        assert sum(acked) <= st["records"] <= sum(acked) + THREADS
        # every row present is one of the burst's items with its exact payload
        seen = set()
        for rec in cas.iter_ledger():
            t, i = rec.value()["t"], rec.value()["i"]
            assert rec.key == item_key(t, i) and rec.payload == item_payload(t, i)
            seen.add((t, i))
        assert len(seen) == st["records"]
        assert st["ledger_bytes"] == sum(len(cas.get_raw(item_key(t, i))) for t, i in seen)
        # and the cassette keeps working
        r = cas.put(item_key(99, 0), item_payload(99, 0))
        assert r.appended and r.seq == st["ledger_rows"] + 1


# ---------------------------------------------------- two processes, one dir
REALIZER = """
import json, sys
import fabric
from fabric.registry import load_evaluators

load_evaluators("examples.evaluators")
with fabric.open(sys.argv[1]) as fab:
    rep = fab.realize(fabric.Request(sys.argv[2], json.loads(sys.argv[3])))
    print(json.dumps({"source": rep.source, "holder": rep.holder, "key": str(rep.key), "value": rep.value}))
"""


def _realizer(tmp_path: Path, data: Path, log: Path, evaluator: str, args: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", REALIZER, str(data), evaluator, json.dumps(args)],
        cwd=ROOT, env=child_env(tmp_path / "home", FABRIC_EVAL_LOG=str(log)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _finish(proc: subprocess.Popen) -> dict:
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def _log_lines(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def test_second_process_gets_the_first_processes_reply_without_recomputing(tmp_path):
    data, log = tmp_path / "data", tmp_path / "eval.log"
    args = {"text": "the cat and the hat", "top": 2}
    a = _finish(_realizer(tmp_path, data, log, "text.stats", args))
    assert a["source"] == "computed"
    assert len(_log_lines(log)) == 1 and _log_lines(log)[0].startswith("text.stats ")
    b = _finish(_realizer(tmp_path, data, log, "text.stats", args))
    assert b["source"] == "local"
    assert (b["key"], b["value"], b["holder"]) == (a["key"], a["value"], a["holder"])
    assert b["value"]["top"] == [["the", 2], ["and", 1]]
    assert len(_log_lines(log)) == 1  # the evaluator did not run again


def test_concurrent_processes_compute_once(tmp_path):
    data, log = tmp_path / "data", tmp_path / "eval.log"
    args = {"x": 12, "delay": 0.5}
    procs = [_realizer(tmp_path, data, log, "slow.square", args) for _ in range(3)]
    outs = [_finish(p) for p in procs]
    assert sorted(o["source"] for o in outs) == ["computed", "local", "local"]
    assert {o["value"] for o in outs} == {144}
    assert len(_log_lines(log)) == 1
