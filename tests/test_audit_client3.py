"""Audit of the client side of a node connection (issue #4 item 5): ``RemoteFabric``'s sync API
(one portal thread, one reused connection) and trio API (one connection per trio run), close(),
reconnects through the retry helper, and deadlines / cancellation that reach the node.  Real
``fabric node`` subprocesses on 127.0.0.1; ``slow.square`` runs are counted in FABRIC_EVAL_LOG.
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import trio
from prometheus_client import REGISTRY

import fabric
from fabric.errors import FabricError, StatusCode

from _nodes import EVALUATORS, FABRIC, ROOT, SECRET, _readline, start_node, stop_node


def _sq(x: int, delay: float = 0.0) -> fabric.Request:
    return fabric.Request("slow.square", {"x": x, "delay": delay}, version="1")


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _portal_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("fabric-remote:")]


def _retries(op: str, status: str = "UNAVAILABLE") -> float:
    return REGISTRY.get_sample_value("fabric_operation_retries_total", {"op": op, "status": status}) or 0.0


class _Node:
    """A node whose evaluator runs are logged (``runs(x)``), restartable on its port."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.log = tmp / "eval.log"
        self.addr, self.proc, self.data = start_node(tmp, env={"FABRIC_EVAL_LOG": str(self.log)})

    def runs(self, x: int) -> int:
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        return sum(1 for line in lines if line.startswith(f"slow.square x={x} "))

    def restart(self, sig: int) -> None:
        stop_node(self.proc, sig)
        self.proc = subprocess.Popen(
            [FABRIC, "node", "--data", str(self.data), "--listen", self.addr, "--secret-file", str(self.tmp / "secret"),
             "--evaluators", EVALUATORS], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=str(ROOT),
            env=dict(os.environ, FABRIC_EVAL_LOG=str(self.log)))
        assert _readline(self.proc, 30).startswith(f"listening on {self.addr} ")

    def connections(self) -> int:
        """Authenticated connections the node has open, the asking one included."""
        with fabric.open(self.addr, secret=SECRET) as f:
            return f.stats()["server"]["connections"]


@pytest.fixture(scope="module")
def nd(tmp_path_factory):
    n = _Node(tmp_path_factory.mktemp("client3"))
    try:
        yield n
    finally:
        if n.proc.poll() is None:
            os.kill(n.proc.pid, signal.SIGCONT)
        stop_node(n.proc)


def _in_threads(n: int, fn) -> list:
    """``fn(i)`` in ``n`` threads at once; each one's result or exception, in order."""
    out: list = [None] * n

    def run(i: int) -> None:
        try:
            out[i] = fn(i)
        except BaseException as exc:  # noqa: BLE001 - returned to the test
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
        assert not t.is_alive()
    return out


# ------------------------------------------------------------------ sharing one client
def test_sixteen_threads_share_one_sync_client_over_one_connection(nd):
    with fabric.open(nd.addr, secret=SECRET) as f:
        got = _in_threads(16, lambda i: [f.realize(_sq(1000 + 16 * j + i)).value for j in range(10)])
        assert got == [[(1000 + 16 * j + i) ** 2 for j in range(10)] for i in range(16)]
        assert f.stats()["server"]["connections"] == 1  # this client's one connection
        assert len(_portal_threads()) == 1


def test_one_client_serves_two_trio_runs_in_two_threads_at_once(nd):
    with fabric.open(nd.addr, secret=SECRET) as f:

        async def run(i: int) -> list:
            out = [0] * 8
            async with trio.open_nursery() as nursery:
                for j in range(8):
                    async def one(j=j):
                        out[j] = (await f.arealize(_sq(2000 + 10 * i + j))).value
                    nursery.start_soon(one)
            return out

        got = _in_threads(2, lambda i: trio.run(run, i))
        assert got == [[(2000 + 10 * i + j) ** 2 for j in range(8)] for i in range(2)]
        assert f.realize(_sq(2000)).source == "local"


# -------------------------------------------------------------------------- close()
def test_close_while_sync_calls_are_in_flight_fails_them_with_failed_precondition(nd):
    """They used to get trio's Cancelled (a BaseException a caller's ``except Exception`` misses)."""
    f = fabric.open(nd.addr, secret=SECRET)
    f.stats()
    t0 = time.monotonic()
    timer = threading.Timer(0.5, f.close)
    timer.start()
    got = _in_threads(4, lambda i: f.realize(_sq(3000 + i, delay=2.0)))
    timer.join()
    for e in got:
        assert isinstance(e, FabricError) and e.status_code is StatusCode.FAILED_PRECONDITION, e
        assert "is closed" in e.message
    assert time.monotonic() - t0 < 1.8  # at close, not when the node answers
    assert _portal_threads() == []


def test_close_from_another_thread_fails_the_arealize_calls_of_a_trio_run(nd):
    f = fabric.open(nd.addr, secret=SECRET)
    errors: list = []

    async def run() -> None:
        async def one(i: int) -> None:
            try:
                await f.arealize(_sq(3100 + i, delay=2.0))
            except FabricError as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            for i in range(3):
                nursery.start_soon(one, i)
            await trio.sleep(0.5)
            await trio.to_thread.run_sync(f.close)  # from a thread that is not this run's

    t0 = time.monotonic()
    trio.run(run)
    assert time.monotonic() - t0 < 1.8
    assert [e.status_code for e in errors] == [StatusCode.FAILED_PRECONDITION] * 3, errors


def test_use_after_close_is_failed_precondition_sync_and_async(nd):
    f = fabric.open(nd.addr, secret=SECRET)
    assert f.realize(_sq(7)).value == 49
    f.close()
    for call in (lambda: f.realize(_sq(7)), lambda: trio.run(f.arealize, _sq(7)), lambda: f.put(b"x"), lambda: f.stats()):
        with pytest.raises(FabricError) as ei:
            call()
        assert ei.value.status_code is StatusCode.FAILED_PRECONDITION and "is closed" in ei.value.message
    f.close()  # idempotent


def test_close_inside_a_trio_run_closes_its_connection_at_once(nd):
    before = nd.connections()

    async def run() -> None:
        f = fabric.open(nd.addr, secret=SECRET)
        await f.arealize(_sq(8))
        assert await trio.to_thread.run_sync(nd.connections) == before + 1
        f.close()
        with pytest.raises(FabricError) as ei:
            await f.arealize(_sq(8))
        assert ei.value.status_code is StatusCode.FAILED_PRECONDITION
        await trio.sleep(0.2)
        assert await trio.to_thread.run_sync(nd.connections) == before  # not kept open until the run ends

    trio.run(run)


# ------------------------------------------------------------------------- no leaks
def test_a_trio_run_closes_its_connections_when_it_ends(nd):
    """Without close(): each run's connection used to stay open until the garbage collector
    found it (one fd per run with the collector off)."""
    f = fabric.open(nd.addr, secret=SECRET)
    try:
        trio.run(f.arealize, _sq(9))
        gc.collect()
        fds = _fds()
        gc.disable()
        try:
            for _ in range(30):
                assert trio.run(f.arealize, _sq(9)).value == 81
            assert _fds() == fds
        finally:
            gc.enable()
    finally:
        f.close()


def test_200_open_close_cycles_leak_no_thread_or_fd(nd):
    """Sync cycles (a portal thread each), and cycles inside one trio run (a connection each)."""
    with fabric.open(nd.addr, secret=SECRET) as f:
        f.realize(_sq(10))
    gc.collect()
    fds, threads = _fds(), threading.active_count()
    for _ in range(200):
        f = fabric.open(nd.addr, secret=SECRET)
        assert f.realize(_sq(10)).value == 100
        f.close()
    assert _portal_threads() == []
    assert _fds() == fds
    assert threading.active_count() <= threads + 1  # at most an idle worker of trio's thread cache

    async def cycles() -> None:
        in_run = _fds()  # a trio run has descriptors of its own
        for _ in range(200):
            f = fabric.open(nd.addr, secret=SECRET)
            assert (await f.arealize(_sq(10))).value == 100
            f.close()
            assert _fds() == in_run

    gc.disable()
    try:
        trio.run(cycles)
    finally:
        gc.enable()
    assert _fds() == fds


# ------------------------------------------------------------- deadlines and cancel
def test_deadlines_and_cancel_on_a_hung_node_are_honoured_and_reach_the_node(nd):
    """SIGSTOP: realize(timeout=1) is DEADLINE_EXCEEDED at 1 s; aget/aput under a trio deadline
    and an arealize whose cancel scope is cancelled end on time; after SIGCONT the node reads
    each request with its cancel behind it, and never runs those evaluations."""
    f = fabric.open(nd.addr, secret=SECRET)
    ref = f.put(b"z" * (3 << 20))
    assert f.realize(_sq(11)).value == 121  # connections up before the node hangs

    async def run() -> dict:
        took: dict = {}
        await f.arealize(_sq(11))
        os.kill(nd.proc.pid, signal.SIGSTOP)
        t0 = trio.current_time()
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(f.arealize, _sq(4001, delay=0.5))
                await trio.sleep(0.5)
                scope.cancel()
        took["cancel"] = trio.current_time() - t0
        for name, call in (("aget", lambda: f.aget(ref)), ("aput", lambda: f.aput(b"q" * (2 << 20)))):
            t0 = trio.current_time()
            with pytest.raises(trio.TooSlowError):
                with trio.fail_after(1):
                    await call()
            took[name] = trio.current_time() - t0
        return took

    try:
        took = trio.run(run)
        t0 = time.monotonic()
        with pytest.raises(FabricError) as ei:
            f.realize(_sq(4002, delay=0.5), timeout=1)
        took["realize"] = time.monotonic() - t0
        assert ei.value.status_code is StatusCode.DEADLINE_EXCEEDED
    finally:
        os.kill(nd.proc.pid, signal.SIGCONT)
    assert took["cancel"] < 0.8 and all(0.95 < took[k] < 1.6 for k in ("aget", "aput", "realize")), took
    time.sleep(1.0)  # the node takes in what waited in its socket
    assert (nd.runs(4001), nd.runs(4002)) == (0, 0)
    assert f.realize(_sq(4002)).source == "computed"  # nothing was recorded under the cancelled call
    f.close()


# ----------------------------------------------------------------- restarts, retries
def test_sync_and_trio_clients_reconnect_to_a_restarted_node(tmp_path):
    n = _Node(tmp_path)
    f = fabric.open(n.addr, secret=SECRET)
    try:
        async def ask(x: int) -> int:
            return (await f.arealize(_sq(x))).value

        async def run() -> None:
            assert await ask(5) == 25 and await trio.to_thread.run_sync(lambda: f.realize(_sq(6)).value) == 36
            for sig in (signal.SIGTERM, signal.SIGKILL):
                before = _retries("realize")
                await trio.to_thread.run_sync(n.restart, sig)
                assert await ask(5) == 25 and await trio.to_thread.run_sync(lambda: f.realize(_sq(6)).value) == 36
                assert _retries("realize") - before <= 2  # at most one failed attempt per connection

        trio.run(run)
    finally:
        f.close()
        stop_node(n.proc)


def test_a_put_cut_off_by_a_kill_9_is_resumed_not_broken_by_the_next_put(tmp_path):
    n = _Node(tmp_path)
    f = fabric.open(n.addr, secret=SECRET)
    try:
        data = np.random.default_rng(3).integers(0, 255, 48 << 20, dtype=np.uint8)
        killed: list = []

        def progress(held: int) -> None:
            if held >= (32 << 20) and not killed:  # past what socket buffers hold: some chunks are stored
                killed.append(held)
                n.proc.kill()

        before = _retries("put")
        with pytest.raises(FabricError) as ei:
            f.put(data, progress=progress)
        assert ei.value.status_code is StatusCode.UNAVAILABLE
        assert _retries("put") - before == 1  # put: 2 attempts
        first = f.chunks_uploaded
        n.proc.wait(10)
        n.restart(signal.SIGKILL)
        ref = f.put(data)
        assert f.chunks_uploaded - first < ref.chunks  # resumed: what the node kept is not sent again
        assert np.array_equal(f.get(ref), data)
    finally:
        f.close()
        stop_node(n.proc)


def test_an_unavailable_answer_from_the_node_keeps_the_connection(tmp_path):
    """A relay whose upstream is down answers UNAVAILABLE (retryable) over a healthy
    connection: the client retries on that connection; it used to drop it unclosed at every
    attempt and dial another (8 more connections open on the relay after 4 calls)."""
    up, up_proc, _ = start_node(tmp_path, "up")
    relay, relay_proc, _ = start_node(tmp_path, "relay", "--relay", up, evaluators=None)
    try:
        stop_node(up_proc)
        with fabric.open(relay, secret=SECRET) as f:
            f.stats()
            gc.collect()
            fds = _fds()
            gc.disable()
            try:
                before = _retries("realize")
                for x in range(4):
                    with pytest.raises(FabricError) as ei:
                        f.realize(_sq(x), timeout=10)
                    assert ei.value.status_code is StatusCode.UNAVAILABLE
                assert _retries("realize") - before == 8  # 3 attempts each
                assert _fds() == fds
                assert f.stats()["server"]["connections"] == 1
            finally:
                gc.enable()
    finally:
        stop_node(relay_proc)
        stop_node(up_proc)


@pytest.mark.parametrize("timeout", [-1, float("nan"), "5"])
def test_a_bad_timeout_is_invalid_argument(nd, timeout):
    """It used to be trio's ValueError (or a TypeError) from deep inside the call."""
    with fabric.open(nd.addr, secret=SECRET) as f:
        with pytest.raises(FabricError) as ei:
            f.realize(_sq(12), timeout=timeout)
        assert ei.value.status_code is StatusCode.INVALID_ARGUMENT and "timeout" in ei.value.message
        assert f.realize(_sq(12), timeout=5).value == 144
