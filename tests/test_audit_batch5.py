"""Batched realize (``realize_many``, shared lookups of concurrent ``arealize``): every
request answered in order, each distinct request evaluated once, the first error raised."""

from __future__ import annotations

import pytest
import trio

import fabric
from fabric.remote import RemoteFabric

from _nodes import SECRET, in_process_node

RUNS: list = []


@fabric.evaluator("batch5.double", version="1")
def double(n: int) -> int:
    RUNS.append(n)
    return 2 * n


@fabric.evaluator("batch5.fail", version="1")
def fail(n: int) -> int:
    RUNS.append(("fail", n))
    raise ValueError(f"bad {n}")


def _req(n: int) -> fabric.Request:
    return fabric.Request("batch5.double", {"n": n}, version="1")


def _mixed() -> list[fabric.Request]:
    """A hit (``_req(1)``, once realized), a miss, an unknown evaluator, a raising one, a miss."""
    return [_req(1), _req(2), fabric.Request("batch5.nope", {"n": 0}, version="1"),
            fabric.Request("batch5.fail", {"n": 3}, version="1"), _req(4)]


def test_embedded_realize_many_realizes_every_request_and_raises_the_first_error(tmp_path):
    """As through a node: a failing request does not stop the ones after it (they are
    computed and recorded), and the first error in order is what the caller gets."""
    with fabric.open(tmp_path / "cas") as f:
        f.realize(_req(1))
        RUNS.clear()
        with pytest.raises(fabric.FabricError) as ei:
            f.realize_many(_mixed())
        assert ei.value.status_code is fabric.StatusCode.NOT_FOUND and "batch5.nope" in ei.value.message
        assert RUNS == [2, ("fail", 3), 4]
        assert [r.source for r in f.realize_many([_req(1), _req(2), _req(4)])] == ["local"] * 3
        with pytest.raises(ValueError, match="bad 3"):  # an evaluator's error, unchanged
            f.realize_many([_req(5), fabric.Request("batch5.fail", {"n": 3}, version="1"), _req(6)])
        assert f.cassette.contains(_req(6).key) and RUNS[-1] == 6


def test_embedded_and_remote_realize_many_agree_on_a_mixed_batch(tmp_path):
    """The same mixed batch through an in-process node: the same error, the same runs."""
    async def main():
        with fabric.open(tmp_path / "node") as nf:
            async with in_process_node(nf) as (addr, _):
                rf = RemoteFabric(addr, SECRET)
                await rf.arealize(_req(1))
                RUNS.clear()
                with pytest.raises(fabric.FabricError) as ei:
                    await rf.arealize_many(_mixed())
                assert ei.value.status_code is fabric.StatusCode.NOT_FOUND and "batch5.nope" in ei.value.message
                assert sorted(RUNS, key=str) == sorted([2, ("fail", 3), 4], key=str)
                assert nf.cassette.contains(_req(4).key)

    trio.run(main)


def test_remote_realize_many_duplicates_empty_and_over_one_lookup(tmp_path):
    """Duplicates are evaluated once and both answered; an empty batch is []; a batch of
    more than 256 keys (several lookups) comes back whole and in order."""
    async def main():
        with fabric.open(tmp_path / "node") as nf:
            async with in_process_node(nf) as (addr, _):
                rf = RemoteFabric(addr, SECRET)
                assert await rf.arealize_many([]) == []
                RUNS.clear()
                reps = await rf.arealize_many([_req(10), _req(11), _req(10)])
                assert [r.value for r in reps] == [20, 22, 20] and sorted(RUNS) == [10, 11]
                reqs = [_req(100 + i) for i in range(600)]
                await rf.arealize_many(reqs[::2])
                RUNS.clear()
                reps = await rf.arealize_many(reqs)
                assert [r.value for r in reps] == [2 * (100 + i) for i in range(600)]
                assert [r.source for r in reps] == ["local", "computed"] * 300 and len(RUNS) == 300

    trio.run(main)


def test_sixteen_tasks_of_a_hundred_overlapping_requests_evaluate_each_once(tmp_path):
    """Concurrent ``arealize`` calls sharing lookups, duplicates in each: one run per key."""
    async def main():
        with fabric.open(tmp_path / "node") as nf:
            async with in_process_node(nf) as (addr, _):
                rf = RemoteFabric(addr, SECRET)
                RUNS.clear()

                async def agent(j):
                    for k in range(100):
                        n = 1000 + (j * 7 + k) % 60
                        assert (await rf.arealize(_req(n))).value == 2 * n

                with trio.fail_after(15):
                    async with trio.open_nursery() as nursery:
                        for j in range(16):
                            nursery.start_soon(agent, j)
                assert sorted(RUNS) == list(range(1000, 1060))
                assert rf._conns().busy == 0 and rf._conns().gathering is None

    trio.run(main)


def test_remote_realize_many_with_unencodable_args_realizes_the_others(tmp_path):
    """A request whose args cannot be encoded fails alone (INVALID_ARGUMENT, raised as the
    first error); the requests around it are still realized and recorded."""
    async def main():
        with fabric.open(tmp_path / "node") as nf:
            async with in_process_node(nf) as (addr, _):
                rf = RemoteFabric(addr, SECRET)
                RUNS.clear()
                batch = [_req(20), fabric.Request("batch5.double", {"n": {1}}, version="1"),
                         fabric.Request("batch5.double", {"n": {2}}), _req(21)]
                with pytest.raises(fabric.FabricError) as ei:
                    await rf.arealize_many(batch)
                assert ei.value.status_code is fabric.StatusCode.INVALID_ARGUMENT and "args.n" in ei.value.message
                assert sorted(RUNS) == [20, 21] and nf.cassette.contains(_req(21).key)

    trio.run(main)
