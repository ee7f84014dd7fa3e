"""Audit of fork safety beyond the embedded fabric: a RemoteFabric made (and used) before a
``fork()`` — multiprocessing's default start method on Linux — and the module-level locks
of ``fabric`` that a parent thread may hold at the fork.  Real ``fabric node`` subprocesses,
real forked pool workers; every wait is bounded."""

from __future__ import annotations

import collections
import multiprocessing
import threading

import fabric
from fabric import api, metrics, registry
from fabric.registry import load_evaluators
from fabric.remote import RemoteFabric
from tests._nodes import SECRET, node

load_evaluators("examples.evaluators")  # slow.square logs each run to $FABRIC_EVAL_LOG (O_APPEND)

#: what the forked pool workers use: set by the test before the pool forks
_forked: dict = {}

#: overlapping keys, so concurrent children ask the node for the same ones
XS = [1, 2, 3, 2, 4, 3, 1, 4]
DELAY = 0.2


def _runs(log) -> collections.Counter:
    return collections.Counter(line.rsplit(" ", 1)[0] for line in log.read_text().splitlines()) if log.exists() else collections.Counter()


def _square(x: int) -> fabric.Request:
    return fabric.Request("slow.square", {"x": x, "delay": DELAY})


def _realize_remote_in_child(x: int) -> tuple:
    """In a forked pool worker: realize on the RemoteFabric the parent made, and on the default
    fabric (FABRIC_NODE: also a RemoteFabric the parent made)."""
    a = _forked["remote"].realize(_square(x), timeout=10)
    b = fabric.realize(_square(x + 100), timeout=10)
    return a.value, b.value


def _portal_client(fab):
    """The connection ``fab``'s sync calls use now (white-box: to see that it was kept)."""
    conns = fab._runs.get(fab._portal_token)
    return None if conns is None else conns.client


def _pool_map(fn, items, workers: int, timeout: float) -> list:
    """``fn`` over ``items`` in a fork pool of ``workers``; multiprocessing.TimeoutError after ``timeout`` s."""
    pool = multiprocessing.get_context("fork").Pool(workers)
    try:
        return pool.map_async(fn, items, chunksize=1).get(timeout=timeout)
    finally:
        pool.terminate()
        pool.join()


def test_a_remote_fabric_made_before_a_fork_works_in_the_forked_children(tmp_path, monkeypatch):
    """A forked worker using a RemoteFabric its parent had used — an explicit one or the
    FABRIC_NODE default — hung: its sync call handed the work to the parent's portal thread,
    which a fork does not copy, over the parent's connection.  Now the child drops what it
    inherited (closing only its own copy of each socket: no goodbye) and dials its own; every
    key is still computed once on the node, and the parent's connection goes on."""
    log = tmp_path / "eval.log"
    with node(tmp_path, "node", "--durability", "fast", env={"FABRIC_EVAL_LOG": str(log)}) as (addr, proc, _):
        monkeypatch.setenv("FABRIC_NODE", addr)
        monkeypatch.setenv("FABRIC_SECRET", SECRET.decode())
        old = api.set_default(None)
        rem = fabric.open(addr, secret=SECRET)
        _forked["remote"] = rem
        try:
            assert rem.realize(_square(1), timeout=10).source == "computed"
            assert fabric.realize(_square(101), timeout=10).source == "computed"
            default = api.default()
            assert isinstance(default, RemoteFabric) and default is not rem
            kept, kept_default = _portal_client(rem), _portal_client(default)
            assert kept is not None and kept_default is not None

            results = _pool_map(_realize_remote_in_child, XS, workers=3, timeout=15)

            assert results == [(x * x, (x + 100) ** 2) for x in XS]
            assert rem.realize(_square(4), timeout=10).source == "local"  # the parent's client still works
            assert fabric.realize(_square(104), timeout=10).source == "local"
            assert _portal_client(rem) is kept and not kept.closed  # on the connection it had before the fork
            assert _portal_client(default) is kept_default and not kept_default.closed
        finally:
            rem.close()
            made = api.set_default(old)
            if made is not None:
                made.close()
        assert proc.poll() is None
    runs = _runs(log)
    assert {k: v for k, v in runs.items() if v != 1} == {}, runs  # each distinct key evaluated once
    assert len(runs) == 8, runs


def _use_locked_modules_in_child(x: int) -> tuple:
    """In a forked pool worker: what takes :data:`registry._lock` (the evaluator listing),
    :data:`metrics._fabrics_lock` (a new fabric) and :data:`api._lock` (the default fabric, made anew)."""
    assert ("slow.square", "1") in registry.registered()
    with fabric.open(_forked["path"]) as fab:
        value = fab.realize(fabric.Request("slow.square", {"x": x, "delay": 0})).value
    api.set_default(None)
    default = api.default()
    try:
        return value, isinstance(default, fabric.Fabric)
    finally:
        default.close()


def test_module_locks_held_by_a_parent_thread_at_the_fork_are_free_in_the_child(tmp_path, monkeypatch):
    """A lock a parent thread held at the fork stays held forever in the child (the thread is
    not copied): a forked worker deadlocked on the evaluator registry's, the metrics' or the
    default fabric's module lock.  Now each module makes its lock anew in a forked child."""
    monkeypatch.setenv("FABRIC_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("FABRIC_NODE", raising=False)
    _forked["path"] = tmp_path / "data"
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with registry._lock, metrics._fabrics_lock, api._lock:
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    pool = None
    try:
        assert held.wait(5)
        pool = multiprocessing.get_context("fork").Pool(2)  # the workers fork while the locks are held
        release.set()
        results = pool.map_async(_use_locked_modules_in_child, [2, 3], chunksize=1).get(timeout=15)
        assert results == [(4, True), (9, True)]
    finally:
        release.set()
        holder.join(5)
        if pool is not None:
            pool.terminate()
            pool.join()


def _next_inherited_chunk(_: int) -> str:
    """In a forked pool worker: read the artifact stream the parent opened; the error's status."""
    try:
        next(_forked["chunks"])
    except fabric.FabricError as exc:
        return exc.status_code.name
    return "read a chunk"


def test_an_artifact_stream_opened_before_a_fork_refuses_the_child_and_goes_on_in_the_parent(tmp_path):
    """A forked child reading an artifact_stream iterator its parent opened waited forever on the
    parent's portal; now it is FAILED_PRECONDITION there, and the parent reads the stream whole."""
    data = bytes(range(256)) * 1024
    with node(tmp_path, "node", "--durability", "fast") as (addr, proc, _), fabric.open(addr, secret=SECRET) as rem:
        ref = rem.put(data, chunk_size=64 << 10)
        manifest, chunks = rem.artifact_stream(ref)
        _forked["chunks"] = chunks
        try:
            first = next(chunks)
            assert _pool_map(_next_inherited_chunk, [0], workers=1, timeout=10) == ["FAILED_PRECONDITION"]
            assert first + b"".join(chunks) == data
        finally:
            chunks.close()
            _forked.pop("chunks")
        assert proc.poll() is None
