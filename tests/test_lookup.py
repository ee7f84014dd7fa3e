"""Op ``lookup`` (specs/wire.md section 13) and how ``arealize_many`` uses it.

A node answers a batch of request keys with the records it holds, at once and
counted as local hits, and never computes; the client verifies every record as
a realize hit is verified and realizes whatever came back nil.
"""

from __future__ import annotations

import pytest
import trio

import fabric
from cassette import codec
from cassette.keys import ContentKey
from cassette.record import pack_record
from fabric.errors import FabricError, StatusCode
from fabric.net import open_connection, serve
from fabric.remote import RemoteFabric
from fabric.serve import LOOKUP_MAX, verify_record

from _nodes import SECRET, node


def _split(addr: str) -> tuple[str, int]:
    host, port = addr.rsplit(":", 1)
    return host, int(port)


def test_lookup_answers_held_records_in_order_within_the_budget_and_never_computes(tmp_path):
    log = tmp_path / "evals.log"
    held = [fabric.Request("text.stats", {"text": f"held {i}"}, version="1") for i in range(3)]
    unheld = fabric.Request("text.stats", {"text": "never asked to compute"}, version="1")
    with node(tmp_path, env={"FABRIC_EVAL_LOG": str(log)}) as (addr, proc, data):
        with fabric.open(addr, secret=SECRET) as f:
            assert [f.realize(r).source for r in held] == ["computed"] * 3
            node_id = f.node_id
            hits_before = f.stats()["node"]["local_hits"]

        async def ask(body):
            async with await open_connection(*_split(addr), SECRET) as client:
                reply, items = await client.call("lookup", body)
                assert items == []
                return reply

        keys = [held[0].key, unheld.key, held[1].key, held[2].key]
        reply = trio.run(ask, {"keys": keys, "max_bytes": 1 << 20})
        assert reply["holder"] == node_id
        got = reply["records"]
        assert got[1] is None
        raws = [got[0], got[2], got[3]]
        assert [verify_record(raw, r.key).key for raw, r in zip(raws, held)] == [r.key for r in held]
        assert codec.decode(verify_record(raws[0], held[0].key).payload)["words"] == 2

        # the budget: a record is answered only while the answered ones fit max_bytes
        assert trio.run(ask, {"keys": keys, "max_bytes": len(raws[0])})["records"] == [raws[0], None, None, None]
        assert trio.run(ask, {"keys": keys, "max_bytes": 0})["records"] == [None] * 4
        assert trio.run(ask, {"keys": [], "max_bytes": 0})["records"] == []

        with fabric.open(addr, secret=SECRET) as f:
            assert f.stats()["node"]["local_hits"] == hits_before + 3 + 1
        assert [ln.split()[0] for ln in log.read_text().splitlines()] == ["text.stats"] * 3  # unheld never computed


@pytest.mark.parametrize("body, where", [
    (None, "body"),
    ({"keys": "nope", "max_bytes": 10}, "body.keys"),
    ({"keys": [ContentKey.of("blob", b"x")], "max_bytes": 10}, "body.keys[0]"),
    ({"keys": [ContentKey.of("request", b"x")] * (LOOKUP_MAX + 1), "max_bytes": 10}, "body.keys"),
    ({"keys": [], "max_bytes": -1}, "body.max_bytes"),
    ({"keys": []}, "body.max_bytes"),
])
def test_a_malformed_lookup_is_invalid_argument_and_the_node_keeps_serving(tmp_path, body, where):
    with node(tmp_path) as (addr, proc, data):
        async def main():
            async with await open_connection(*_split(addr), SECRET) as client:
                with pytest.raises(FabricError) as ei:
                    await client.call("lookup", body)
                assert ei.value.status_code is StatusCode.INVALID_ARGUMENT
                assert ei.value.message.startswith(where)
                assert (await client.call("lookup", {"keys": [], "max_bytes": 0}))[0]["records"] == []

        trio.run(main)


def test_realize_many_answers_held_requests_by_lookup_and_realizes_the_rest(tmp_path):
    """Through a real node: held keys come back as local hits without a realize each."""
    reqs = [fabric.Request("text.stats", {"text": f"batch text {i}"}, version="1") for i in range(40)]
    with node(tmp_path) as (addr, proc, data):
        with fabric.open(addr, secret=SECRET) as f:
            for r in reqs[:25]:
                f.realize(r)
            reps = f.realize_many(reqs + [fabric.Request("text.stats", {"text": "no version given"})])
            assert [r.source for r in reps] == ["local"] * 25 + ["computed"] * 16
            assert [r.value["words"] for r in reps[:40]] == [3] * 40
            assert all(r.holder == f.node_id for r in reps)
            assert [r.source for r in f.realize_many(reqs)] == ["local"] * 40


# --------------------------------------------------------- a fake node, in process
def _record(req: fabric.Request, value) -> bytes:
    return pack_record(req.key, codec.encode(value), evaluator=req.evaluator, version=req.version,
                       created=0.0, compute_s=0.0, node="fake")


def _serve_fake(lookup=None, realize_delay=0.0):
    """A handler for an in-process server: ``lookup`` answers held keys (``lookup(body)``, or
    all held), ``realize`` answers truthfully as computed; ops and lookup sizes are logged."""
    log: list[tuple[str, int]] = []
    held: dict[ContentKey, bytes] = {}

    async def handler(call):
        if call.op == "lookup":
            log.append(("lookup", len(call.body["keys"])))
            if lookup is not None:
                return await lookup(call.body)
            return {"holder": "fake", "records": [held.get(k) for k in call.body["keys"]]}
        log.append(("realize", 1))
        await trio.sleep(realize_delay)
        b = call.body
        req = fabric.Request(b["evaluator"], b["args"], version=b["version"])
        return {"key": req.key, "source": "computed", "holder": "fake", "record": _record(req, {"n": req.args["n"]})}

    return handler, log, held


async def _with_server(handler, fn):
    async with trio.open_nursery() as nursery:
        at = await nursery.start(lambda task_status: serve("127.0.0.1", 0, SECRET, handler, task_status=task_status))
        try:
            return await fn(RemoteFabric(f"{at.host}:{at.port}", SECRET))
        finally:
            nursery.cancel_scope.cancel()


def _run_fake(reqs, answer_lookup):
    """``arealize_many(reqs)`` against an in-process server that answers ``lookup`` with
    ``answer_lookup(body)`` and every ``realize`` truthfully; returns (result or error, ops seen)."""
    async def lookup(body):
        return answer_lookup(body)

    handler, log, _ = _serve_fake(lookup=lookup)

    async def many(rf):
        try:
            return await rf.arealize_many(reqs)
        except FabricError as exc:
            return exc

    return trio.run(_with_server, handler, many), [op for op, _ in log]


REQS = [fabric.Request("text.stats", {"n": i}, version="1") for i in range(3)]


def test_a_lookup_answering_another_requests_record_is_data_loss():
    swapped = {"holder": "fake", "records": [_record(REQS[1], {"n": 1}), None, None]}
    got, ops = _run_fake(REQS, lambda body: swapped)
    assert isinstance(got, FabricError) and got.status_code is StatusCode.DATA_LOSS
    assert f"record of {REQS[1].key.short()}" in got.message and got.key == REQS[0].key
    assert ops == ["lookup", "realize", "realize"]  # the others were still answered


def test_a_lookup_record_with_an_altered_byte_is_data_loss():
    raw = bytearray(_record(REQS[2], {"n": 2}))
    raw[-1] ^= 1
    got, _ = _run_fake(REQS, lambda body: {"holder": "fake", "records": [None, None, bytes(raw)]})
    assert isinstance(got, FabricError) and got.status_code is StatusCode.DATA_LOSS and got.key == REQS[2].key


def test_verified_lookup_hits_are_local_and_only_nils_are_realized():
    got, ops = _run_fake(REQS, lambda body: {"holder": "fake", "records": [_record(REQS[0], {"n": 0}), None, None]})
    assert [(r.source, r.holder, r.value) for r in got] == [("local", "fake", {"n": 0}), ("computed", "fake", {"n": 1}),
                                                            ("computed", "fake", {"n": 2})]
    assert ops == ["lookup", "realize", "realize"]


@pytest.mark.parametrize("answer", [
    lambda body: (_ for _ in ()).throw(FabricError(StatusCode.UNIMPLEMENTED, "unknown op 'lookup'")),  # an older node
    lambda body: {"holder": "fake", "records": [None]},  # a malformed reply: one entry for three keys
    lambda body: ["not", "a", "map"],
])
def test_a_refused_or_malformed_lookup_falls_back_to_realize(answer):
    got, ops = _run_fake(REQS, answer)
    assert [(r.source, r.value) for r in got] == [("computed", {"n": i}) for i in range(3)]
    assert ops == ["lookup"] + ["realize"] * 3


# ------------------------------------------- concurrent arealize calls share lookups
async def _all_at_once(rf, reqs) -> dict[int, fabric.Reply]:
    """``rf.arealize`` of every request, each in its own task, all started in one pass."""
    got: dict[int, fabric.Reply] = {}

    async def one(i):
        got[i] = await rf.arealize(reqs[i])

    async with trio.open_nursery() as nursery:
        for i in range(len(reqs)):
            nursery.start_soon(one, i)
    return got


def test_concurrent_arealize_hits_share_lookups_and_each_gets_its_own_verified_reply():
    reqs = [fabric.Request("text.stats", {"n": i}, version="1") for i in range(32)]
    handler, log, held = _serve_fake()
    held.update({r.key: _record(r, {"n": r.args["n"]}) for r in reqs})

    got = trio.run(_with_server, handler, lambda rf: _all_at_once(rf, reqs))
    assert [got[i].value for i in range(32)] == [{"n": i} for i in range(32)]
    assert [got[i].key for i in range(32)] == [r.key for r in reqs]
    assert {got[i].source for i in range(32)} <= {"local", "computed"}
    asked = sum(n for op, n in log if op == "lookup")
    realized = sum(1 for op, _ in log if op == "realize")
    assert asked + realized == 32 and realized < 4  # the calls of one pass went out as one lookup
    assert max(n for op, n in log if op == "lookup") >= 16


def test_concurrent_arealize_misses_are_realized_each_after_a_shared_lookup():
    reqs = [fabric.Request("text.stats", {"n": i}, version="1") for i in range(8)]
    handler, log, _ = _serve_fake()

    got = trio.run(_with_server, handler, lambda rf: _all_at_once(rf, reqs))
    assert [(got[i].source, got[i].value) for i in range(8)] == [("computed", {"n": i}) for i in range(8)]
    assert sum(1 for op, _ in log if op == "realize") == 8


def test_a_cancelled_lookup_sender_never_strands_the_calls_that_joined_it():
    """The call sending a shared lookup is cancelled while the node sits on it: the calls
    that joined realize on their own and get their replies."""
    reqs = [fabric.Request("text.stats", {"n": i}, version="1") for i in range(4)]
    stuck = trio.Event()

    async def lookup(body):
        stuck.set()
        await trio.sleep_forever()

    handler, log, _ = _serve_fake(lookup=lookup, realize_delay=0.05)

    async def main(rf):
        scopes: dict = {}
        got: dict[int, fabric.Reply] = {}

        async def one(i):
            with trio.CancelScope() as cs:
                scopes[trio.lowlevel.current_task()] = cs
                got[i] = await rf.arealize(reqs[i])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(one, 0)  # a lone call: one realize, in flight for 50 ms
            await trio.sleep(0.01)
            for i in (1, 2, 3):  # these find a call in progress: they share one lookup
                nursery.start_soon(one, i)
            with trio.fail_after(10):
                await stuck.wait()
            batch = rf._conns().sending
            assert batch is not None and len(batch.reqs) == 3
            scopes[batch.leader].cancel()
        return got, batch

    got, batch = trio.run(_with_server, handler, main)
    cancelled = [i for i in (1, 2, 3) if reqs[i] is batch.reqs[0]]
    assert len(cancelled) == 1 and sorted(got) == sorted({0, 1, 2, 3} - set(cancelled))
    assert all(got[i].value == {"n": i} for i in got)
    assert [op for op, _ in log].count("lookup") == 1


def test_many_tasks_on_one_remote_fabric_evaluate_each_distinct_request_once(tmp_path):
    """Through a real node: 16 tasks, overlapping requests, hits and misses mixed in shared lookups."""
    log = tmp_path / "evals.log"
    texts = [f"shared text {i}" for i in range(24)]
    with node(tmp_path, env={"FABRIC_EVAL_LOG": str(log)}) as (addr, proc, data):
        async def main():
            rf = RemoteFabric(addr, SECRET)
            got: list[tuple[str, int]] = []

            async def agent(j):
                for n in range(30):
                    t = texts[(j * 7 + n) % len(texts)]
                    rep = await rf.arealize(fabric.Request("text.stats", {"text": t}, version="1"))
                    got.append((t, rep.value["words"]))

            async with trio.open_nursery() as nursery:
                for j in range(16):
                    nursery.start_soon(agent, j)
            return got

        got = trio.run(main)
        assert len(got) == 16 * 30 and all(words == 3 for _, words in got)
        assert sorted(ln.split()[0] for ln in log.read_text().splitlines()) == ["text.stats"] * len(texts)
