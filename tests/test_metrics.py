"""fabric_* metrics: each family moves by exactly what one operation should move it by.

Samples are read from prometheus_client's REGISTRY (this process) or, for a node
subprocess, from its own REGISTRY as its stats answer carries it (``metrics``).
"""

from __future__ import annotations

import socket
from typing import Callable

import numpy as np
import pytest
import trio
from prometheus_client import REGISTRY

import fabric
from fabric import metrics
from fabric.errors import FabricError
from fabric.remote import RemoteFabric

from _nodes import SECRET, in_process_node, node

HITS = ("fabric_cache_hits_total", "fabric_cache_misses_total")


def _samples(prefixes: tuple[str, ...]) -> dict[str, float]:
    return {k: v for k, v in metrics.snapshot().items() if k.startswith(prefixes)}


def _delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """The samples that moved, and by how much."""
    keys = set(before) | set(after)
    moved = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in keys}
    return {k: d for k, d in moved.items() if d}


def _moves(prefixes: tuple[str, ...], fn: Callable[[], object], read: Callable[[], dict[str, float]] | None = None) -> dict[str, float]:
    read = read or (lambda: _samples(prefixes))
    before = read()
    fn()
    return _delta(before, read())


@fabric.evaluator("m.double", version="1")
def double(x: int) -> int:
    return 2 * x


# ------------------------------------------------------------------ cache answers
def test_an_embedded_miss_counts_one_miss_and_a_hit_one_local_hit(tmp_path):
    with fabric.open(tmp_path / "c") as fab:
        req = fabric.Request("m.double", {"x": 21})
        assert _moves(HITS, lambda: fab.realize(req)) == {"fabric_cache_misses_total": 1}
        assert _moves(HITS, lambda: fab.realize(req)) == {'fabric_cache_hits_total{source="local"}': 1}
    # the two sources are one family, whose peer sample exists before any peer hit
    assert REGISTRY.get_sample_value("fabric_cache_hits_total", {"source": "peer"}) is not None
    assert REGISTRY.get_sample_value("fabric_cache_source_hits_total", {"source": "computed"}) is None


def test_a_relay_counts_what_its_upstream_answered_as_one_peer_hit(tmp_path):
    req = fabric.Request("linalg.spectrum", {"seed": 5, "n": 8}, version="1")
    with node(tmp_path, "upstream") as (up, _, _), node(tmp_path, "relay", "--relay", up) as (relay, _, _):
        with fabric.open(relay, secret=SECRET) as f:
            def node_hits() -> dict[str, float]:
                return {k: v for k, v in f.stats()["node"]["metrics"].items() if k.startswith(HITS)}

            first = _moves(HITS, lambda: f.realize(req), node_hits)
            second = _moves(HITS, lambda: f.realize(req), node_hits)
    assert first == {'fabric_cache_hits_total{source="peer"}': 1}
    assert second == {'fabric_cache_hits_total{source="local"}': 1}


# ------------------------------------------------------------------------ latency
LATENCY = ("fabric_operation_latency_seconds_count",)


def _client_ops(samples: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in samples.items() if 'op="node_' not in k}


def test_embedded_operations_off_the_hit_path_are_timed_once_and_a_local_hit_is_not(tmp_path):
    with fabric.open(tmp_path / "c") as fab:
        req = fabric.Request("m.double", {"x": 4})
        assert _moves(LATENCY, lambda: fab.realize(req)) == {'fabric_operation_latency_seconds_count{op="realize"}': 1}
        assert _moves(LATENCY, lambda: fab.realize(req)) == {}  # a local hit: counted as a hit, never timed
        data = np.arange(1000, dtype=np.float32)
        ref = None

        def put():
            nonlocal ref
            ref = fab.put(data)

        assert _moves(LATENCY, put) == {'fabric_operation_latency_seconds_count{op="put"}': 1}
        assert _moves(LATENCY, lambda: fab.get(ref.key)) == {'fabric_operation_latency_seconds_count{op="get"}': 1}
        out = np.empty_like(data)
        assert _moves(LATENCY, lambda: fab.get_into(ref.key, out)) == {'fabric_operation_latency_seconds_count{op="get_into"}': 1}
        assert (out == data).all()


def test_a_remote_call_is_one_observation_of_its_op_sync_or_async_nested_or_not(tmp_path):
    with fabric.open(tmp_path / "n") as fab:
        req = fabric.Request("m.double", {"x": 7})
        fab.realize(req)  # held: the node answers the client's realizes as hits (timed on the client)
        ref = fab.put(b"remote bytes" * 100)

        async def main():
            async with in_process_node(fab) as (addr, _):
                client = RemoteFabric(addr, SECRET)
                try:
                    moves = []
                    for call in (lambda: client.arealize(req),  # arealize calls arealize_record: still one
                                 lambda: client.arealize_many([req, req]),
                                 lambda: client.aget(ref.key),
                                 lambda: client.aput(b"other bytes" * 50),
                                 lambda: trio.to_thread.run_sync(client.realize, req)):  # sync: through the portal
                        before = _samples(LATENCY)
                        await call()
                        moves.append(_client_ops(_delta(before, _samples(LATENCY))))
                    return moves
                finally:
                    await trio.to_thread.run_sync(client.close)

        moves = trio.run(main)
    op = 'fabric_operation_latency_seconds_count{{op="{}"}}'.format
    assert moves == [{op("realize"): 1}, {op("realize_many"): 1}, {op("get"): 1}, {op("put"): 1}, {op("realize"): 1}]


# ------------------------------------------------------------------------- errors
ERRORS = ("fabric_operation_errors_total",)


def _error(op: str, status: str) -> str:
    return f'fabric_operation_errors_total{{op="{op}",status="{status}"}}'


def _raises(fn: Callable[[], object], exc: type = FabricError) -> Callable[[], None]:
    def go() -> None:
        with pytest.raises(exc):
            fn()
    return go


@fabric.evaluator("m.fails", version="1")
def fails(msg: str) -> None:
    raise KeyError(msg)


def test_every_error_reaching_an_embedded_caller_is_counted_once_by_op_and_status(tmp_path):
    with fabric.open(tmp_path / "c") as fab:
        missing = fabric.ContentKey.of("artifact", b"never put")
        assert _moves(ERRORS, _raises(lambda: fab.get(missing))) == {_error("get", "NOT_FOUND"): 1}
        assert _moves(ERRORS, _raises(lambda: fab.realize(fabric.Request("no.such", {})))) == {_error("realize", "NOT_FOUND"): 1}
        assert _moves(ERRORS, _raises(lambda: fab.realize(fabric.Request("no.such", {}, version="1")))) == {_error("realize", "NOT_FOUND"): 1}
        ref = fab.put(np.arange(64, dtype=np.float32))
        out = np.empty(64, dtype=np.int64)
        assert _moves(ERRORS, _raises(lambda: fab.get_into(ref.key, out))) == {_error("get_into", "INVALID_ARGUMENT"): 1}
        # an evaluator's own exception: its own type for the caller, status EVALUATOR here
        assert _moves(ERRORS, _raises(lambda: fab.realize(fabric.Request("m.fails", {"msg": "x"})), KeyError)) == {_error("realize", "EVALUATOR"): 1}

        async def arealize_fails():
            with pytest.raises(KeyError):
                await fab.arealize(fabric.Request("m.fails", {"msg": "y"}))

        assert _moves(ERRORS, lambda: trio.run(arealize_fails)) == {_error("realize", "EVALUATOR"): 1}
    # a closed fabric's FAILED_PRECONDITION reaches the caller too
    assert _moves(ERRORS, _raises(lambda: fab.get(ref.key))) == {_error("get", "FAILED_PRECONDITION"): 1}


def test_a_remote_realize_to_a_dead_port_counts_one_unavailable_after_its_retries():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with fabric.open(f"127.0.0.1:{port}", secret=SECRET) as f:
        moved = _moves(ERRORS + ("fabric_operation_retries_total",),
                       _raises(lambda: f.realize(fabric.Request("m.double", {"x": 1}))))
    retries = moved.pop('fabric_operation_retries_total{op="realize",status="UNAVAILABLE"}')
    assert retries >= 1 and moved == {_error("realize", "UNAVAILABLE"): 1}


def test_errors_through_a_node_are_counted_by_the_client(tmp_path):
    with node(tmp_path) as (addr, _, _), fabric.open(addr, secret=SECRET) as f:
        fail = fabric.Request("fail.always", {"message": "kaput"}, version="1")
        assert _moves(ERRORS, _raises(lambda: f.realize(fail), ValueError)) == {_error("realize", "EVALUATOR"): 1}
        missing = fabric.ContentKey.of("artifact", b"never put")
        assert _moves(ERRORS, _raises(lambda: f.get(missing))) == {_error("get", "NOT_FOUND"): 1}
        out = np.empty(4, dtype=np.float32)
        assert _moves(ERRORS, _raises(lambda: f.get_into(missing, out))) == {_error("get_into", "NOT_FOUND"): 1}


# -------------------------------------------------------------------------- a node
def test_a_node_times_its_async_ops_and_counts_every_fault_by_op_and_status(tmp_path):
    """Read from the node subprocess's own registry (its stats answer)."""
    with node(tmp_path) as (addr, _, _), fabric.open(addr, secret=SECRET) as f:
        def node_samples() -> dict[str, float]:
            return {k: v for k, v in f.stats()["node"]["metrics"].items() if k.startswith(LATENCY + ERRORS)}

        def moves(fn: Callable[[], object]) -> dict[str, float]:
            return _moves((), fn, node_samples)

        req = fabric.Request("text.stats", {"text": "node metrics"}, version="1")
        # a miss runs in the async handler: timed as node_realize (and its embedded miss as realize)
        assert moves(lambda: f.realize(req)) == {'fabric_operation_latency_seconds_count{op="node_realize"}': 1,
                                                  'fabric_operation_latency_seconds_count{op="realize"}': 1}
        assert moves(lambda: f.realize(req)) == {}  # a hit answered inline: counted as a hit, not timed
        missing = fabric.ContentKey.of("artifact", b"never put")
        assert moves(_raises(lambda: f.get(missing))) == {'fabric_operation_latency_seconds_count{op="node_get"}': 1,
                                                          _error("node_get", "NOT_FOUND"): 1}
        # an inline fault (fetch of a key not held) is counted, not timed
        assert moves(_raises(lambda: trio.run(RemoteFabric(addr, SECRET).afetch, missing))) == {_error("node_fetch", "NOT_FOUND"): 1}
        fail = fabric.Request("fail.always", {"message": "kaput"}, version="1")
        assert moves(_raises(lambda: f.realize(fail), ValueError)) == {
            'fabric_operation_latency_seconds_count{op="node_realize"}': 1, _error("node_realize", "EVALUATOR"): 1,
            'fabric_operation_latency_seconds_count{op="realize"}': 1, _error("realize", "EVALUATOR"): 1}


def test_a_node_op_cut_off_by_its_deadline_counts_deadline_exceeded_and_a_peer_cancel_nothing(tmp_path):
    from fabric.serve import NodeService

    class Call:
        op, body = "get", {}

        def __init__(self, deadline: float) -> None:
            self.deadline = deadline

    async def main() -> list[dict[str, float]]:
        with fabric.open(tmp_path / "n") as fab:
            service = NodeService(fab)

            async def forever(call):
                await trio.sleep_forever()

            service._dispatch = forever
            out = []
            for deadline_in, cancel_in in ((0.05, None), (60.0, 0.05)):  # the deadline fires; the client cancels
                before = _samples(ERRORS)
                call = Call(trio.current_time() + deadline_in)
                with trio.CancelScope(deadline=call.deadline) as scope:
                    if cancel_in is not None:
                        scope.deadline = trio.current_time() + cancel_in  # as a peer's cancel: before the deadline
                    await service.handle(call)
                out.append(_delta(before, _samples(ERRORS)))
            return out

    assert trio.run(main) == [{_error("node_get", "DEADLINE_EXCEEDED"): 1}, {}]


def test_histograms_fold_each_series_into_count_sum_and_bucket_estimates_of_p50_p99():
    """``fabric stats`` showed every bucket of every latency series (~150 rows); it now shows one
    row per series, folded from a real snapshot by :func:`metrics.histograms`.  The estimates are
    Prometheus's ``histogram_quantile``: linear within the bucket that holds the rank."""
    timer = metrics.LATENCY.labels(op="test_histogram_fold")
    for _ in range(50):
        timer.observe(0.002)  # bucket (0.001, 0.005]
    for _ in range(49):
        timer.observe(0.02)  # bucket (0.01, 0.05]
    timer.observe(40.0)  # past the largest finite bound, 30 s
    snap = metrics.snapshot()
    series, rest = metrics.histograms(snap)
    name = 'fabric_operation_latency_seconds{op="test_histogram_fold"}'
    (h,) = [s for s in series if s.series == name]
    assert (h.count, h.sum) == (100, pytest.approx(50 * 0.002 + 49 * 0.02 + 40.0))
    assert h.mean == pytest.approx(h.sum / 100)
    assert h.quantile(0.5) == pytest.approx(0.005)  # rank 50: the top of (0.001, 0.005]
    assert h.quantile(0.9) == pytest.approx(0.01 + 0.04 * 40 / 49)  # rank 90: 40 of 49 into (0.01, 0.05]
    assert h.quantile(0.999) == float("inf") and h.top == 30  # only "more than 30 s" is known
    # every bucket, _count and _sum sample is folded away; the other samples pass unchanged
    assert not any(k.partition("{")[0].startswith("fabric_operation_latency_seconds") for k in rest)
    assert rest == {k: v for k, v in snap.items() if not k.startswith("fabric_operation_latency_seconds")}
    assert len(series) == sum(k.startswith("fabric_operation_latency_seconds_count") for k in snap)  # one per series
    empty = [s for s in series if s.count == 0]
    assert all(s.mean is None and s.quantile(0.5) is None for s in empty)
