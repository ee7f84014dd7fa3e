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


def _run_fake(reqs, answer_lookup):
    """``arealize_many(reqs)`` against an in-process server that answers ``lookup`` with
    ``answer_lookup(body)`` and every ``realize`` truthfully; returns (result or error, ops seen)."""
    by_key = {r.key: r for r in reqs}
    ops: list[str] = []

    async def handler(call):
        ops.append(call.op)
        if call.op == "lookup":
            return answer_lookup(call.body)
        req = by_key[call.body["key"]]
        return {"key": req.key, "source": "computed", "holder": "fake", "record": _record(req, {"n": req.args["n"]})}

    async def main():
        async with trio.open_nursery() as nursery:
            at = await nursery.start(lambda task_status: serve("127.0.0.1", 0, SECRET, handler, task_status=task_status))
            try:
                return await RemoteFabric(f"{at.host}:{at.port}", SECRET).arealize_many(reqs)
            except FabricError as exc:
                return exc
            finally:
                nursery.cancel_scope.cancel()

    return trio.run(main), ops


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
