"""Audit of the embedded fabric (fabric/local.py, fabric/api.py): compute-once across
threads and processes, timeouts, interrupts, cancellation, fork — real LMDB dirs and
real processes."""

from __future__ import annotations

import collections
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import trio

import fabric
from fabric.errors import FabricError, StatusCode
from fabric.registry import load_evaluators
from tests.conftest import ROOT, child_env

load_evaluators("examples.evaluators")  # slow.square logs each run to $FABRIC_EVAL_LOG (O_APPEND)

_HOLD = r"""
import sys
import fabric
from fabric.registry import load_evaluators

load_evaluators("examples.evaluators")
with fabric.open(sys.argv[1]) as fab:
    rep = fab.realize(fabric.Request("slow.square", {"x": int(sys.argv[2]), "delay": float(sys.argv[3])}))
    print(rep.source, rep.value, flush=True)
"""


def _wait_for(what, seconds: float, why: str) -> None:
    deadline = time.monotonic() + seconds
    while not what():
        assert time.monotonic() < deadline, why
        time.sleep(0.02)


def _runs(log) -> collections.Counter:
    return collections.Counter(line.rsplit(" ", 1)[0] for line in log.read_text().splitlines()) if log.exists() else collections.Counter()


def _start_holder(tmp_path, data, log, x: int, delay: float) -> subprocess.Popen:
    """A process computing slow.square(x) on ``data``, returned once its evaluator runs."""
    env = child_env(tmp_path / "home", FABRIC_EVAL_LOG=str(log))
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(data), str(x), str(delay)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: _runs(log)[f"slow.square x={x}"] or proc.poll() is not None, 15, "the holder never started")
        assert proc.poll() is None, proc.communicate()
    except BaseException:
        proc.kill()
        proc.communicate()
        raise
    return proc


def test_timeout_bounds_the_wait_on_another_process_computing_the_key(tmp_path, monkeypatch):
    """``realize(timeout=)`` bounds waiting on an identical computation in another process,
    as it does on one in this process: it waited for the other process's evaluator to end,
    however long, and the timeout was ignored."""
    data, log = tmp_path / "data", tmp_path / "eval.log"
    monkeypatch.setenv("FABRIC_EVAL_LOG", str(log))
    proc = _start_holder(tmp_path, data, log, 7, 6.0)
    try:
        with fabric.open(data) as fab:
            t0 = time.monotonic()
            with pytest.raises(FabricError) as ei:
                fab.realize(fabric.Request("slow.square", {"x": 7, "delay": 6.0}), timeout=0.5)
            waited = time.monotonic() - t0
            assert ei.value.status_code is StatusCode.DEADLINE_EXCEEDED
            assert "another process" in ei.value.message and ei.value.key is not None
            assert 0.4 < waited < 3.0, waited
            proc.kill()  # the holder dies: a caller without a timeout takes over and computes
            proc.communicate()
            rep = fab.realize(fabric.Request("slow.square", {"x": 7, "delay": 6.0}), timeout=15)
            assert (rep.source, rep.value) == ("computed", 49)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert _runs(log)["slow.square x=7"] == 2  # the killed holder's run and ours


def test_a_leader_that_times_out_on_the_lock_hands_the_key_to_its_waiters(tmp_path, monkeypatch):
    """In-process waiters with no timeout of their own behind a leader whose timeout runs out
    on another process's lock keep waiting (one takes over); they do not inherit its
    DEADLINE_EXCEEDED."""
    data, log = tmp_path / "data", tmp_path / "eval.log"
    monkeypatch.setenv("FABRIC_EVAL_LOG", str(log))
    proc = _start_holder(tmp_path, data, log, 8, 2.0)
    req = fabric.Request("slow.square", {"x": 8, "delay": 2.0})
    out: dict = {}
    try:
        with fabric.open(data) as fab:
            def follow(i: int) -> None:
                try:
                    rep = fab.realize(req, timeout=20)
                    out[i] = (rep.source, rep.value)
                except Exception as exc:  # noqa: BLE001 - recorded for the assertion
                    out[i] = repr(exc)

            leader_err: list = []

            def lead() -> None:
                try:
                    fab.realize(req, timeout=0.6)
                except FabricError as exc:
                    leader_err.append(exc.status_code)

            t_lead = threading.Thread(target=lead)
            t_lead.start()
            _wait_for(lambda: req.key in fab._flights, 5, "the leader never started")
            followers = [threading.Thread(target=follow, args=(i,)) for i in range(2)]
            for t in followers:
                t.start()
            for t in [t_lead, *followers]:
                t.join(20)
            assert leader_err == [StatusCode.DEADLINE_EXCEEDED]
            assert out == {0: ("local", 64), 1: ("local", 64)}, out
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert _runs(log)["slow.square x=8"] == 1


_interrupts: list[str] = []
_gate = threading.Event()


@fabric.evaluator("e5.interrupted", version="1")
def interrupted(x: int, exc: str) -> int:
    """The first run waits for the gate and raises ``exc`` (an interrupt of its caller); later runs answer."""
    _interrupts.append(threading.current_thread().name)
    if len(_interrupts) == 1:
        assert _gate.wait(10)
        raise {"KeyboardInterrupt": KeyboardInterrupt, "SystemExit": SystemExit}[exc]()
    return x + 1


@pytest.mark.parametrize("exc", ["KeyboardInterrupt", "SystemExit"])
def test_an_interrupted_leader_hands_the_key_to_its_waiters(tmp_path, exc):
    """A KeyboardInterrupt / SystemExit in the leader's evaluator run is its caller's (Ctrl-C,
    sys.exit), not the key's answer: the caller gets it, the key stays unlocked, and the
    threads waiting on it compute it once among themselves.  They were each raised the
    leader's KeyboardInterrupt / SystemExit (a SystemExit silently ends a worker thread)."""
    _interrupts.clear()
    _gate.clear()
    req = fabric.Request("e5.interrupted", {"x": 1, "exc": exc})
    out: dict = {}

    def go(i: int) -> None:
        try:
            rep = fab.realize(req, timeout=10)
            out[i] = (rep.source, rep.value)
        except BaseException as e:  # noqa: BLE001 - recorded for the assertion
            out[i] = type(e).__name__

    with fabric.open(tmp_path / "data") as fab:
        threads = [threading.Thread(target=go, args=(i,), name=f"t{i}") for i in range(3)]
        threads[0].start()
        _wait_for(lambda: _interrupts, 5, "the leader never ran")
        threads[1].start()
        threads[2].start()
        _wait_for(lambda: fab._flights[req.key].waiters == 2, 5, "the waiters never waited")
        _gate.set()
        for t in threads:
            t.join(10)
        assert out[0] == exc
        assert sorted(out[i] for i in (1, 2)) == [("computed", 2), ("local", 2)], out
        assert len(_interrupts) == 2
        assert fab.realize(req).source == "local"


def test_cancelling_arealize_returns_at_once_and_the_computation_is_still_recorded(tmp_path, monkeypatch):
    """A cancelled ``arealize`` of a miss waited for the evaluator's whole run (its worker thread
    could not be abandoned).  Now it returns at once; the run goes on, is recorded, answers a
    caller that was waiting on it, and the next realize is a hit (one evaluator run in all)."""
    log = tmp_path / "eval.log"
    monkeypatch.setenv("FABRIC_EVAL_LOG", str(log))
    req = fabric.Request("slow.square", {"x": 9, "delay": 2.0})
    waiter: dict = {}
    with fabric.open(tmp_path / "data") as fab:
        async def main() -> float:
            t0 = trio.current_time()
            with trio.move_on_after(0.3) as scope:
                await fab.arealize(req)
            assert scope.cancelled_caught
            return trio.current_time() - t0

        def wait_on_it() -> None:
            _wait_for(lambda: req.key in fab._flights, 5, "the computation never started")
            rep = fab.realize(req, timeout=10)
            waiter["rep"] = (rep.source, rep.value)

        t = threading.Thread(target=wait_on_it)
        t.start()
        took = trio.run(main)
        assert took < 1.0, took
        t.join(10)
        assert waiter["rep"] == ("local", 81)
        assert fab.cassette.contains(req.key)
        assert fab.realize(req).source == "local"
    assert _runs(log)["slow.square x=9"] == 1


_forked: dict = {}


def _realize_in_child(x: int) -> tuple:
    """Run in a forked pool worker: realize on the fabric the parent opened, and on the default."""
    fab = _forked["fab"]
    a = fab.realize(fabric.Request("slow.square", {"x": x}))
    b = fabric.realize(fabric.Request("slow.square", {"x": x + 100}))
    c = fabric.open(_forked["path"])  # a fresh open of the parent's directory, in the child
    try:
        d = c.realize(fabric.Request("slow.square", {"x": x}))
    finally:
        c.close()
    return a.source, a.value, b.value, d.source


def test_fabrics_opened_before_a_fork_work_in_the_forked_children(tmp_path, monkeypatch):
    """A multiprocessing (fork) worker using a fabric its parent opened — an explicit one or the
    default — hung: the child used the parent's LMDB environment (which LMDB forbids) and its
    put waited forever for the cassette's writer thread, which a fork does not copy.  Now the
    child opens the directory anew on first use; each key is still computed once."""
    from fabric import api

    log = tmp_path / "eval.log"
    monkeypatch.setenv("FABRIC_EVAL_LOG", str(log))
    monkeypatch.setenv("FABRIC_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("FABRIC_NODE", raising=False)
    old = api.set_default(None)
    fab = fabric.open(tmp_path / "data")
    _forked.update(fab=fab, path=tmp_path / "data")
    try:
        assert fab.realize(fabric.Request("slow.square", {"x": 1})).source == "computed"
        assert fabric.realize(fabric.Request("slow.square", {"x": 101})).source == "computed"
        pool = multiprocessing.get_context("fork").Pool(2)
        try:
            results = pool.map_async(_realize_in_child, [1, 2, 3, 2]).get(timeout=15)
        finally:
            pool.terminate()
            pool.join()
        assert [r[1:3] for r in results] == [(1, 10201), (4, 10404), (9, 10609), (4, 10404)]
        assert all(r[3] == "local" for r in results)
        assert fab.realize(fabric.Request("slow.square", {"x": 3})).source == "local"  # the parent sees the children's records
        assert fabric.realize(fabric.Request("slow.square", {"x": 103})).source == "local"
    finally:
        fab.close()
        api.set_default(old).close()
    runs = _runs(log)
    assert {k: v for k, v in runs.items() if v != 1} == {}, runs
    assert len(runs) == 6
