"""When a durable put may be acknowledged (specs/cassette-format.md, section 5.1).

``durability="sync"`` runs LMDB with MDB_NOMETASYNC: a commit fdatasyncs its
data pages, then writes its meta page without syncing it.  A put may return
only after an fdatasync of the data file that *began after its commit
returned*: the data sync inside a later commit that wrote pages, or an explicit
``env.sync``.  A power loss cannot be staged in a test, so these tests check
the order of what the writer does, on real LMDB files: the writer reports each
commit (and whether it wrote pages, so that LMDB's commit ran an fdatasync),
each explicit sync, and each acknowledgement just before it releases the
waiters, and every acknowledgement must come after a durable point covering
its commit.  The kill -9 side of the contract is tests/test_crash.py.
"""

from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from cassette import codec
from cassette.keys import ContentKey
from cassette.record import pack_record, payload_digest
from cassette.store import Cassette, _Job


def rkey(i) -> ContentKey:
    return ContentKey.of("request", f"test_durability item {i}".encode())


def payload_of(i) -> bytes:
    return codec.encode({"item": str(i)})


class Trace:
    """Collects the writer's ("commit" | "sync" | "ack", n, x) events (thread-safe)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int, object]] = []
        self._lock = threading.Lock()
        self.on_commit = None  # optional hook run in the writer thread after a commit event

    def __call__(self, event: str, n: int, x: object) -> None:
        with self._lock:
            self.events.append((event, n, x))
        if event == "commit" and self.on_commit is not None:
            self.on_commit(n, x)


def check_acks(events) -> int:
    """Assert the acknowledgement rule on an event log; returns the jobs acknowledged.

    ``synced`` is the highest commit known durable: an explicit sync covers every
    commit before it; a commit that wrote pages ran an fdatasync after every
    earlier commit had returned, so it covers all of those (not itself).
    """
    synced = last = acked = 0
    for event, n, x in events:
        if event == "commit":
            assert n == last + 1, events
            if x:
                synced = max(synced, last)
            last = n
        elif event == "sync":
            assert n == last, events  # reported with the number of commits before it began
            synced = n
        elif event == "ack":
            assert 1 <= n <= synced, f"commit {n} acknowledged before a durable point ({events})"
            acked += x
    return acked


def traced(cas: Cassette) -> Trace:
    trace = Trace()
    cas._on_trace = trace
    return trace


def queue_during_commit_1(cas: Cassette, trace: Trace, start, count: int) -> None:
    """Right after commit 1 returns (in the writer thread), run ``start`` and hold the
    writer until ``count`` jobs are queued, so that they form the next batch."""

    def hold(n, wrote):
        if n == 1:
            start()
            deadline = time.monotonic() + 10
            while cas._queue.qsize() < count:
                assert time.monotonic() < deadline, "jobs were not queued"
                time.sleep(0.001)

    trace.on_commit = hold


def test_sync_mode_runs_lmdb_without_metasync_and_fast_mode_is_unchanged(tmp_path):
    with Cassette(tmp_path / "s") as cas:
        assert (cas._env.flags()["sync"], cas._env.flags()["metasync"]) == (True, False)
    with Cassette(tmp_path / "f", durability="fast") as cas:
        trace = traced(cas)
        assert (cas._env.flags()["sync"], cas._env.flags()["metasync"]) == (False, False)
        for i in range(5):
            assert cas.put(rkey(i), payload_of(i)).appended
        assert cas.syncs == 0 and not any(e == "sync" for e, _, _ in trace.events)


def test_lone_put_is_acknowledged_promptly_after_an_explicit_sync(tmp_path):
    with Cassette(tmp_path / "c") as cas:
        trace = traced(cas)
        t0 = time.perf_counter()
        r = cas.put(rkey(0), payload_of(0))
        elapsed = time.perf_counter() - t0
        assert r.appended and r.seq == 1
        # no follower will carry the meta page to disk: the writer syncs it at once
        assert trace.events == [("commit", 1, True), ("sync", 1, True), ("ack", 1, 1)]
        assert cas.syncs == 1
        assert elapsed < 2.0  # two fdatasyncs, not a wait for company
    with Cassette(tmp_path / "c") as cas:
        assert cas.lookup_value(rkey(0)) == {"item": "0"}


def test_a_queued_commit_carries_the_previous_meta_page_to_disk(tmp_path):
    """Commit 2's data fdatasync begins after commit 1 returned: it acknowledges batch 1
    without a sync of its own; only the last batch needs the explicit sync."""
    with Cassette(tmp_path / "c") as cas:
        trace = traced(cas)
        second: list = []
        helper = threading.Thread(target=lambda: second.append(cas.put(rkey(2), payload_of(2))))
        queue_during_commit_1(cas, trace, helper.start, 1)
        assert cas.put(rkey(1), payload_of(1)).seq == 1
        helper.join(10)
        assert second and second[0].appended and second[0].seq == 2
        assert trace.events == [
            ("commit", 1, True),
            ("commit", 2, True),
            ("ack", 1, 1),  # durable through commit 2's data fdatasync
            ("sync", 2, True),
            ("ack", 2, 1),
        ]
        assert (cas.commits, cas.syncs) == (2, 1)
        check_acks(trace.events)


def test_a_commit_that_writes_nothing_is_not_a_durable_point(tmp_path):
    """A batch of no-op puts commits no pages, so LMDB runs no fdatasync for it; and its
    answer (the row of batch 1) is only as durable as batch 1.  Both wait for a sync."""
    with Cassette(tmp_path / "c") as cas:
        trace = traced(cas)
        again: list = []
        helper = threading.Thread(target=lambda: again.append(cas.put(rkey(1), payload_of("other"))))
        queue_during_commit_1(cas, trace, helper.start, 1)
        first = cas.put(rkey(1), payload_of(1))
        helper.join(10)
        assert first.appended and again and not again[0].appended and again[0].seq == first.seq == 1
        assert trace.events == [
            ("commit", 1, True),
            ("commit", 2, False),
            ("sync", 2, True),
            ("ack", 2, 2),  # both batches, in commit order, after the sync
        ]
        check_acks(trace.events)


def test_concurrent_puts_are_acknowledged_only_after_a_durable_point(tmp_path):
    threads, per_thread = 16, 30
    start = threading.Barrier(threads)
    with Cassette(tmp_path / "c") as cas:
        trace = traced(cas)

        def work(t: int) -> dict[ContentKey, int]:
            start.wait(10)
            seqs = {}
            for i in range(per_thread):
                k = rkey(f"{t}/{i}")
                seqs[k] = cas.put(k, payload_of(f"{t}/{i}")).seq
                if i % 7 == 3:  # re-recording: a no-op resting on an earlier row
                    assert cas.put(k, payload_of("again")).seq == seqs[k]
                if i % 11 == 5:
                    cas.put_blob(f"blob {t} {i}".encode())
            return seqs

        with ThreadPoolExecutor(threads) as pool:
            results = {k: v for seqs in pool.map(work, range(threads), timeout=60) for k, v in seqs.items()}
        jobs = threads * (per_thread + len(range(3, per_thread, 7)) + len(range(5, per_thread, 11)))
        assert check_acks(list(trace.events)) == jobs
    assert sorted(results.values()) == list(range(1, threads * per_thread + 1))
    with Cassette(tmp_path / "c") as cas:
        assert all(cas.get_record(k).seq == seq for k, seq in results.items())
        assert cas.verify().ok


def test_waiters_are_released_even_if_one_of_them_never_waits(tmp_path):
    """Waiters are woken in a relay (each wakes the next); a thread that was told to
    wait but never does (interrupted) must not strand the others behind it."""
    with Cassette(tmp_path / "c") as cas:
        trace = traced(cas)
        orphan = _Job("blobs", ([],), 0, waited=True)  # but nobody will wait on it
        done: list = []

        def put(i):
            done.append(cas.put(rkey(i), payload_of(i)))

        others = [threading.Thread(target=put, args=(i,)) for i in range(1, 5)]

        def start():  # the orphan first in the queue, then four real waiters: one batch
            cas._submit(orphan)
            for th in others:
                th.start()

        queue_during_commit_1(cas, trace, start, 5)
        put(0)
        t0 = time.monotonic()
        for th in others:
            th.join(10)
        assert not any(th.is_alive() for th in others)
        assert time.monotonic() - t0 < 5
        assert orphan.done and sorted(r.seq for r in done) == [1, 2, 3, 4, 5]
        assert ("commit", 2, True) in trace.events  # orphan and the four shared commit 2
        check_acks(trace.events)
        assert cas.put(rkey(9), payload_of(9)).seq == 6  # and the writer carries on


@pytest.mark.parametrize("n", [1, 40])
def test_close_makes_every_queued_put_durable_before_it_returns(tmp_path, n):
    cas = Cassette(tmp_path / "c")
    trace = traced(cas)
    jobs = []
    for i in range(n):  # queued without anyone waiting, then closed at once
        value = pack_record(rkey(i), payload_of(i), evaluator="e", version="1", created=1.0, compute_s=0.0, node="n")
        jobs.append(cas._submit(_Job("raw", (rkey(i), value, payload_digest(payload_of(i))), len(value))))
    cas.close()
    assert all(j.done and j.error is None for j in jobs)
    assert check_acks(trace.events) == n
    assert trace.events[-2][0] == "sync" and trace.events[-1][0] == "ack"
    with Cassette(tmp_path / "c") as cas:
        assert len(cas) == n


def test_signals_delivered_to_the_writer_thread_do_not_stall_it(tmp_path):
    """The writer never sleeps in ``SimpleQueue.get(timeout=...)``: on CPython 3.11 a
    signal that interrupts that wait near its deadline turns it into a wait without
    timeout, and a writer gathering the puts of threads that all wait for it then
    waits forever (SIGTERM to a node is such a signal; the writer before this test
    stalled within a few dozen puts here)."""
    threads, per_thread = 8, 150
    done: list[int] = []
    old = signal.signal(signal.SIGUSR1, lambda *_: None)
    try:
        cas = Cassette(tmp_path / "c")

        def work(t: int) -> None:
            for i in range(per_thread):
                cas.put(rkey(f"{t}/{i}"), payload_of(i))
            done.append(t)

        workers = [threading.Thread(target=work, args=(t,), daemon=True) for t in range(threads)]
        for w in workers:
            w.start()
        deadline = time.monotonic() + 60
        while len(done) < threads:
            if time.monotonic() > deadline:  # leave the stuck cassette open: close() would hang too
                pytest.fail(f"the writer stalled: {len(cas)} puts recorded")
            signal.pthread_kill(cas._writer.ident, signal.SIGUSR1)
            time.sleep(0.0002)
        assert len(cas) == threads * per_thread
        cas.close()
    finally:
        signal.signal(signal.SIGUSR1, old)
