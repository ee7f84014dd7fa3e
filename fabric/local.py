"""The embedded fabric: a node living inside this process over one cassette directory.

Lookup order here is local cassette → compute → record (the fleet adds peers
and home sites on top of the same pieces).  Compute-once holds across threads
and trio tasks of this process (single-flight) and across processes sharing the
directory (a POSIX byte-range lock per key in ``compute.lock``, re-checking the
cassette after taking it).
"""

from __future__ import annotations

import abc
import errno
import fcntl
import logging
import os
import threading
import time
import weakref
from pathlib import Path
from typing import Any

from cassette import codec
from cassette.errors import FabricError, StatusCode
from cassette.keys import ContentKey
from cassette.store import MISS, Cassette
from fabric import metrics, registry
from fabric.request import Reply, Request

__all__ = ["Fabric", "open_cassette", "release_cassette"]

log = logging.getLogger("fabric")

#: Realizes that leave the hit path (a local hit is counted, not timed: see :mod:`fabric.metrics`).
_REALIZE_TIMER = metrics.LATENCY.labels(op="realize")

# LMDB must not be opened twice in one process: share one Cassette per directory.
_shared_lock = threading.Lock()
_shared: dict[str, list] = {}  # realpath -> [cassette, refcount, flights, flights_lock, lockfd]


def open_cassette(path: str | os.PathLike, **kwargs: Any) -> list:
    """The process-wide shared entry for ``path``: ``[cassette, refs, flights, flights_lock, lockfd]``.

    A directory already open in this process is shared as it is: ``durability=None``
    takes whatever it was opened with; ``"fast"`` of a ``"sync"`` one gets ``"sync"``
    (more durable than asked); ``"sync"`` of a ``"fast"`` one is FAILED_PRECONDITION
    (its puts would not be durable).
    """
    real = os.path.realpath(os.fspath(path))
    with _shared_lock:
        entry = _shared.get(real)
        if entry is not None and kwargs.get("durability") == "sync" and entry[0].durability != "sync":
            raise FabricError(StatusCode.FAILED_PRECONDITION,
                              f"{real} is already open in this process with durability={entry[0].durability!r}; "
                              "close it first, or open it without asking for durability='sync'")
        if entry is None:
            _drop_inherited(real)  # (a forked child opening its parent's directory)
            kwargs = {k: v for k, v in kwargs.items() if v is not None or k != "durability"}
            cas = Cassette(real, **kwargs)
            fd = os.open(os.path.join(real, "compute.lock"), os.O_RDWR | os.O_CREAT, 0o644)
            entry = _shared[real] = [cas, 0, {}, threading.Lock(), fd]
        entry[1] += 1
        return entry


def release_cassette(path: str | os.PathLike) -> None:
    """Drop one reference; the last one closes the cassette."""
    real = os.path.realpath(os.fspath(path))
    with _shared_lock:
        entry = _shared.get(real)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            del _shared[real]
            entry[0].close()
            os.close(entry[4])


class _Flight:
    """One in-process computation of a key and the callers waiting on it.

    It ends with ``reply`` or ``error`` (the evaluation's answer, which every waiter
    shares), or ``handed_over``: its leader stopped without an answer of the key's own
    (it was interrupted — KeyboardInterrupt, SystemExit — or its ``timeout`` ran out
    waiting for another process), and the waiters ask again, one of them leading.
    """

    __slots__ = ("event", "reply", "error", "handed_over", "waiters")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.reply: Reply | None = None
        self.error: BaseException | None = None
        self.handed_over = False
        self.waiters = 0


class _KeyLock:
    """Exclusive POSIX byte-range lock on one byte of ``compute.lock`` chosen by the key.

    ``deadline`` (``time.monotonic()``), if not None, bounds the wait in :meth:`acquire`:
    past it, DEADLINE_EXCEEDED (another process is computing the key).  The kernel lets the lock
    go when its holder dies, even by kill -9, so a waiter takes over.
    """

    __slots__ = ("fd", "offset", "key", "deadline", "timeout")

    def __init__(self, fd: int, key: ContentKey, deadline: float | None = None, timeout: float | None = None) -> None:
        self.fd = fd
        self.offset = int.from_bytes(key[1:8], "big")
        self.key = key
        self.deadline = deadline
        self.timeout = timeout

    def acquire(self) -> None:
        """Wait for the lock.  The kernel's deadlock check sees processes, not threads: thread 1
        of A holding key x while thread 2 waits for y, held by B, whose other thread waits for x,
        is EDEADLK though each holder finishes on its own.  So EDEADLK waits a little and asks
        again (a true cycle would be an evaluator waiting on itself, which single-flight already
        blocks within a process).  With a deadline the wait polls (non-blocking tries, backing off
        to 50 ms), as a blocking lockf cannot be given one."""
        flags = fcntl.LOCK_EX if self.deadline is None else fcntl.LOCK_EX | fcntl.LOCK_NB
        pause = 0.001
        while True:
            try:
                fcntl.lockf(self.fd, flags, 1, self.offset, os.SEEK_SET)
                return
            except OSError as exc:
                if exc.errno not in (errno.EDEADLK, errno.EAGAIN, errno.EACCES):
                    raise
            if self.deadline is not None:
                left = self.deadline - time.monotonic()
                if left <= 0:
                    raise FabricError(StatusCode.DEADLINE_EXCEEDED,
                                      f"waited {self.timeout:g} s for an identical realize computing in another process", key=self.key)
                pause = min(pause, left)
            time.sleep(pause)
            pause = min(pause * 2, 0.05)

    def release(self) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, self.offset, os.SEEK_SET)


def on_device(rep: Reply, device: Any) -> Reply:
    """``rep`` with its numpy values moved to CuPy arrays on ``device`` (:func:`gpu.to_device`)."""
    from gpu import to_device

    rep.value = to_device(rep.value, device)
    return rep


class Fabric(metaclass=abc.ABCMeta):
    """An evaluation fabric over a cassette directory (embedded node).

    ``Fabric(path, durability=None, node_id=None, create=True)``: ``durability`` ``"sync"``
    (the default for a directory not yet open in this process) or ``"fast"``; a
    directory already open here is shared (see :func:`open_cassette`); ``create=False``
    opens only an existing cassette (NOT_FOUND otherwise, with nothing created).  Use :meth:`realize`
    (sync) or :meth:`arealize` (trio); artifacts with :meth:`put`,
    :meth:`get`, :meth:`get_into`.  Close with :meth:`close` or ``with``.

    ``Fabric`` is also the type of every fabric :func:`fabric.open` gives: a
    node's client (:class:`fabric.remote.RemoteFabric`, same methods, served by
    the node) is registered as a virtual subclass, so ``isinstance(f, Fabric)``
    holds for both.
    """

    def __init__(self, path: str | os.PathLike, *, durability: str | None = None, node_id: str | None = None, map_size: int | None = None,
                 create: bool = True) -> None:
        kw: dict[str, Any] = {"durability": durability, "node_id": node_id}
        if map_size is not None:
            kw["map_size"] = map_size
        if not create:
            kw["create"] = False
        self.path = Path(path)
        self._open_kw = kw
        self._attach()
        self.node_id = self.cassette.node_id
        self.local_hits = 0
        self._closed = False
        with _live_lock:
            _live.add(self)
        metrics.track_fabric(self)

    def _attach(self) -> None:
        """Take a reference on this process's shared cassette entry for :attr:`path`."""
        self._entry = open_cassette(self.path, **self._open_kw)
        self.cassette: Cassette = self._entry[0]
        self._flights: dict[ContentKey, _Flight] = self._entry[2]
        self._flights_lock: threading.Lock = self._entry[3]
        self._lockfd: int = self._entry[4]
        self.cassette.on_corrupt = _count_corrupt

    def _reattach_after_fork(self) -> Any:
        """The cassette, opened anew in this forked child on its first use (see :func:`_after_fork_in_child`)."""
        with _live_lock:
            if isinstance(self.cassette, _ForkedCassette):
                _drop_inherited(os.path.realpath(self.path))
                self._attach()
            return self.cassette

    # ------------------------------------------------------------------ realize
    def realize(self, req: Request, *, timeout: float | None = None, device: Any = None) -> Reply:
        """Answer ``req``: from the cassette if held, else compute once and record.

        An evaluator's exception reaches the caller unchanged (type and message)
        and nothing is recorded.  ``timeout`` bounds waiting on another
        caller's identical in-flight computation, in this process or in another
        one sharing the directory (DEADLINE_EXCEEDED); a caller that stops waiting, or
        whose evaluator run is interrupted (KeyboardInterrupt, SystemExit), leaves the
        key to the callers still waiting on it.
        ``device="cuda:0"`` returns numpy values as CuPy arrays on that device
        (:func:`gpu.to_device`; FAILED_PRECONDITION without CuPy, after recording).
        """
        try:  # a try costs the hit path nothing (zero-cost exceptions); only a failure counts
            key = req.key
            value = self.cassette.lookup_value(key)
            if value is not MISS:
                self.local_hits += 1
                rep = Reply(key, value, "local", self.node_id)
            else:
                rep = self._realize_miss(req, key, timeout)
            return rep if device is None else on_device(rep, device)
        except Exception as exc:
            metrics.count_error("realize", exc, evaluates=True)
            raise

    async def arealize(self, req: Request, *, timeout: float | None = None, device: Any = None) -> Reply:
        """:meth:`realize` under trio: hits answer inline, misses compute in a worker thread.

        Cancelling it returns at once (a miss no longer waits for its evaluator to end);
        the computation goes on in its thread, is recorded as usual and answers the
        callers waiting on it, so the next realize of the key is a hit.
        """
        try:
            key = req.key
            value = self.cassette.lookup_value(key)
            if value is not MISS:
                self.local_hits += 1
                rep = Reply(key, value, "local", self.node_id)
            else:
                import trio

                rep = await trio.to_thread.run_sync(self._realize_miss, req, key, timeout, abandon_on_cancel=True)
            return rep if device is None else on_device(rep, device)
        except Exception as exc:
            metrics.count_error("realize", exc, evaluates=True)
            raise

    def _realize_miss(self, req: Request, key: ContentKey, timeout: float | None) -> Reply:
        """A realize the hit path could not answer: compute once (single-flight), timed as
        op ``realize`` and counted by the answer's source (:mod:`fabric.metrics`)."""
        t0 = time.perf_counter()
        try:
            rep = self._compute_or_wait(req, key, timeout)
        finally:
            _REALIZE_TIMER.observe(time.perf_counter() - t0)
        if rep.source == "local":  # recorded meanwhile by another process (or the leader we waited on found it so)
            self.local_hits += 1
        else:
            metrics.MISSES.inc()
        return rep

    def _compute_or_wait(self, req: Request, key: ContentKey, timeout: float | None) -> Reply:
        """Lead the key's computation in this process, or wait for the one under way (see
        :class:`_Flight`); ``timeout`` bounds the waiting, on this process's leader and on
        another process's lock alike (DEADLINE_EXCEEDED)."""
        ev = registry.lookup(req.evaluator, req.version)
        deadline = None if timeout is None else time.monotonic() + timeout
        coalesced = False
        while True:
            with self._flights_lock:
                flight = self._flights.get(key)
                leader = flight is None
                if leader:
                    flight = self._flights[key] = _Flight()
                else:
                    flight.waiters += 1
            assert flight is not None
            if leader:
                return self._lead(flight, req, key, ev, deadline, timeout)
            if not coalesced:
                coalesced = True
                metrics.COALESCED.inc()
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not flight.event.wait(left):
                raise FabricError(StatusCode.DEADLINE_EXCEEDED, f"waited {timeout:g} s for an identical in-flight realize", key=key)
            if flight.handed_over:
                continue  # its leader stopped without an answer: ask again (one of us leads)
            if flight.error is not None:
                raise flight.error
            assert flight.reply is not None
            # the leader recorded it here: a follower is served from this cassette, so "computed"
            # replies count evaluator runs exactly (and each caller gets its own decoded value)
            value = self.cassette.lookup_value(key)
            return Reply(key, flight.reply.value if value is MISS else value, "local", self.node_id)

    def _lead(self, flight: _Flight, req: Request, key: ContentKey, ev: registry.Evaluator,
              deadline: float | None, timeout: float | None) -> Reply:
        """Compute ``key`` for ``flight`` and end it: with the reply, with the evaluation's
        error, or handed over to its waiters (an interrupt, or this caller's deadline ran out
        on another process's lock)."""
        try:
            lock = _KeyLock(self._lockfd, key, deadline, timeout)
            try:
                lock.acquire()
            except BaseException:
                flight.handed_over = True  # nothing was computed: the deadline is this caller's own
                raise
            try:
                reply = self._compute_locked(req, key, ev)
            finally:
                lock.release()
            flight.reply = reply
            return reply
        except Exception as exc:
            if not flight.handed_over:
                flight.error = exc
            raise
        except BaseException:
            flight.handed_over = True  # KeyboardInterrupt, SystemExit...: this caller's, not the key's answer
            raise
        finally:
            with self._flights_lock:
                del self._flights[key]
            flight.event.set()

    def _compute_locked(self, req: Request, key: ContentKey, ev: registry.Evaluator) -> Reply:
        """Under the key's lock: the cassette's reply if another process recorded it
        meanwhile, else evaluate, encode (INVALID_ARGUMENT naming the path; nothing
        recorded) and record."""
        value = self.cassette.lookup_value(key)  # another process may have recorded it meanwhile
        if value is not MISS:
            return Reply(key, value, "local", self.node_id)  # counted by _realize_miss
        t0 = time.perf_counter()
        result = ev.call(req.args)
        compute_s = time.perf_counter() - t0
        metrics.EVALUATOR_RUNS.labels(evaluator=ev.name).inc()
        payload = codec.encode(result, root="reply")
        self.cassette.put(key, payload, evaluator=ev.name, version=ev.version, compute_s=compute_s)
        # hand back exactly what later hits will return (tuples as lists, read-only arrays)
        return Reply(key, codec.decode(payload), "computed", self.node_id)

    def realize_many(self, reqs: list[Request]) -> list[Reply]:
        """Realize several requests (in order); hits are answered without computing.

        As :meth:`RemoteFabric.realize_many <fabric.remote.RemoteFabric.realize_many>`: if
        any request fails, every one is still realized (what computes is recorded) and the
        error of the first failing one, in order, is raised (an evaluator's unchanged)."""
        replies: list[Reply] = []
        first: Exception | None = None
        for r in reqs:
            try:
                replies.append(self.realize(r))
            except Exception as exc:  # noqa: BLE001 - raised below, once the rest are realized
                first = exc if first is None else first
        if first is not None:
            raise first
        return replies

    # --------------------------------------------------------------- artifacts
    @metrics.observed("put")
    def put(self, data: Any, *, progress: Any = None, **kw: Any):
        """Store bytes, a numpy array, a file or an iterator of bytes; returns an :class:`ArtifactRef`.

        ``progress(n)`` (a ``Callable[[int], None]``): ``n`` bytes of the content stored so
        far, increasing; the last call has its ``size_bytes`` (:func:`fabric.artifacts.put`).
        """
        from fabric import artifacts

        return artifacts.put(self.cassette, data, progress=progress, **kw)

    @metrics.observed("get")
    def get(self, key: ContentKey | str, *, progress: Any = None):
        """An artifact as bytes or a numpy array, or a recorded reply's value (``key``: a key, its text, or an ArtifactRef).

        ``progress(n)``, for an artifact: ``n`` bytes of it read and verified so far, per chunk,
        as :meth:`RemoteFabric.get <fabric.remote.RemoteFabric.get>` reports them (:func:`fabric.artifacts.get`).
        """
        from fabric import artifacts

        return artifacts.get(self.cassette, key, progress=progress)

    @metrics.observed("get_into")
    def get_into(self, key: ContentKey | str, out: Any):
        """Fill the preallocated numpy (or CuPy) array ``out`` with the artifact (its key, key text or ArtifactRef); returns ``out``."""
        from fabric import artifacts

        return artifacts.get_into(self.cassette, key, out)

    @metrics.observed("artifact_stream")
    def artifact_stream(self, key: ContentKey | str):
        """``(manifest, iterator of verified chunk bytes)`` for a held artifact (used by :mod:`gpu`)."""
        from fabric import artifacts

        return artifacts._stream_artifact(self.cassette, artifacts.key_of(key))

    @metrics.observed("holders")
    def holders(self, key: ContentKey | str) -> list[str]:
        """Nodes known to hold ``key`` (or an ArtifactRef's): this node if its cassette does (embedded mode knows no peers)."""
        from fabric import artifacts

        key = artifacts.key_of(key)
        return [self.node_id] if self.cassette.contains(key) else []

    # -------------------------------------------------------------------- admin
    def stats(self) -> dict[str, Any]:
        """Cassette counts plus this process's fabric_* metrics."""
        st = dict(self.cassette.stats())
        st["local_hits"] = self.local_hits
        st["metrics"] = metrics.snapshot()
        return st

    @metrics.observed("verify")
    def verify(self, **kw: Any):
        """Scrub the cassette (see :meth:`cassette.Cassette.verify`)."""
        return self.cassette.verify(**kw)

    @metrics.observed("export")
    def export(self, path: str | os.PathLike, *, progress: Any = None) -> int:
        """Write the cassette's portable ledger file to ``path`` (as ``fabric export``); returns
        the records written.  The same bytes a node's client gets from :meth:`RemoteFabric.export`."""
        return self.cassette.export(path, progress=progress)

    @metrics.observed("replay")
    def replay(self, path: str | os.PathLike, *, progress: Any = None) -> dict:
        """Append the records and blobs of the ledger file at ``path`` (validated whole
        first: a bad file is DATA_LOSS / INVALID_ARGUMENT and nothing is appended);
        returns ``{"records", "appended", "blobs"}`` as :meth:`RemoteFabric.replay` does."""
        from cassette.ledgerfile import read_ledger_file

        counts: dict = {}
        appended = read_ledger_file(self.cassette, path, progress=progress, counts=counts)
        return {"records": counts["records"], "appended": appended, "blobs": counts["blobs"]}

    def close(self) -> None:
        """Release this fabric's hold on the cassette (the last holder closes it).

        Afterwards every method that needs the cassette (realize, get, put, verify,
        stats...) raises ``FabricError(FAILED_PRECONDITION, "fabric ... is closed")``,
        even while other fabrics keep the shared cassette open.
        """
        with _live_lock:
            if self._closed:
                return
            self._closed = True
            attached = not isinstance(self.cassette, _ForkedCassette)  # (a forked child's copy holds no reference here)
            self.cassette = _ClosedCassette(f"fabric at {self.path}")  # type: ignore[assignment]
            _live.discard(self)
        if attached:
            release_cassette(self.path)

    def __del__(self) -> None:
        metrics.retire_fabric(self)  # its local hits stay counted once it is gone

    def __enter__(self) -> "Fabric":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Fabric embedded node={self.node_id} at {self.path}>"


class _ClosedCassette:
    """What a closed :class:`Fabric` holds instead of its cassette: any use of it is
    FAILED_PRECONDITION.  (A swap at close, so the hit path checks nothing.)"""

    __slots__ = ("_what",)

    def __init__(self, what: str) -> None:
        self._what = what

    def __getattr__(self, name: str) -> Any:
        raise FabricError(StatusCode.FAILED_PRECONDITION, f"{self._what} is closed")


class _ForkedCassette:
    """What an open :class:`Fabric` holds in a forked child (``multiprocessing``, a
    ``fork()``): its first use opens the cassette anew in the child and answers from
    it, so a fabric made before the fork (the default one included) keeps working."""

    __slots__ = ("_fab",)

    def __init__(self, fab: Fabric) -> None:
        self._fab = fab

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fab._reattach_after_fork(), name)


#: open fabrics of this process (a forked child re-attaches them: :func:`_after_fork_in_child`)
_live: "weakref.WeakSet[Fabric]" = weakref.WeakSet()
_live_lock = threading.Lock()
#: a parent's cassette entries a forked child inherited, by realpath, until it opens the directory again
_inherited: dict[str, list] = {}


def _drop_inherited(real: str) -> None:
    """Close, in this forked child, the LMDB environment inherited for ``real`` (LMDB refuses a
    second open of it in one process).  Only the child's mapping and descriptors go: no
    transaction of it ran here, and its fcntl locks are the parent's (per process)."""
    entry = _inherited.pop(real, None)
    if entry is not None:
        entry[0]._env.close()


def _after_fork_in_child() -> None:
    """A forked child must not touch its parent's LMDB environment (LMDB forbids it) and
    has none of its threads (the cassette's writer, other threads' in-flight computations):
    a put waited forever on the missing writer.  So the child forgets the parent's shared
    entries (:func:`_drop_inherited` lets go of one when its directory is opened again) and
    each open fabric opens its directory anew on first use (:class:`_ForkedCassette`)."""
    global _shared_lock, _live_lock
    _shared_lock, _live_lock = threading.Lock(), threading.Lock()  # a parent thread may have held them
    _inherited.update(_shared)
    _shared.clear()
    for fab in list(_live):
        fab.cassette = _ForkedCassette(fab)  # type: ignore[assignment]
        fab._flights, fab._flights_lock = {}, threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _count_corrupt(key: ContentKey) -> None:
    metrics.CORRUPT_READS.inc()
    metrics.ERRORS.labels(op="lookup", status="DATA_LOSS").inc()
