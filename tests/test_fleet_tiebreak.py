"""Which digest a member serves when two holders of a request key disagree 1 to 1.

specs/gossip.md 3.4 and 6: the tie goes to the digest held by the key's home, the home
among the live members *advertising the evaluator*.  The member lookup used to take the home
among all live members instead, so a member serving a ``get`` or a ``realize`` picked the
digest of a holder that does not even run the evaluator.

Real pieces throughout: two holders are in-process nodes over real cassettes on 127.0.0.1,
the member is a real :class:`fabric.fleet.Fleet` (its gossip machine told the membership and
the holder facts directly, so no timing is involved) behind a real node, asked by a real
client.
"""

from __future__ import annotations

import pytest
import trio

import fabric
from cassette import codec
from cassette.keys import ContentKey
from cassette.record import payload_digest
from fabric.fleet import ContentAddressedFabric, Fleet
from fabric.placement import evaluator_capability
from gossip.holding import HeldContent
from gossip.messages import MemberState, MemberUpdate
from gossip.node import rendezvous_home
from _nodes import SECRET, in_process_node

EV, VER = "tie.break.nowhere", "1"  # registered in no process: the member routes it
CAP = evaluator_capability(EV, VER)
RUNS_IT, LACKS_IT, BYSTANDER = "holder-runs-it", "holder-lacks-it", "bystander"
ANSWERS = {RUNS_IT: {"answer": "the home's"}, LACKS_IT: {"answer": "another"}}


def _tied_request(member: str) -> fabric.Request:
    """A request whose home among *all* live members is the holder lacking the evaluator (so
    the old lookup took that holder's digest), while only the other holder advertises it."""
    everyone = [RUNS_IT, LACKS_IT, BYSTANDER, member]
    for i in range(1000):
        req = fabric.Request(EV, {"i": i}, version=VER)
        if rendezvous_home(req.key, everyone) == LACKS_IT:
            return req
    raise AssertionError("no request homed on the holder lacking the evaluator")


async def _member_view(fab, addrs: dict[str, str], key: ContentKey) -> Fleet:
    """A member's fleet that sees both holders live (only one advertising the evaluator), a
    bystander, and one fact per holder with different digests for ``key``."""
    fleet = Fleet(fab, "127.0.0.1:1", SECRET, [])
    now = trio.current_time()
    fleet.gossip.membership.apply_updates([
        MemberUpdate(RUNS_IT, 1, MemberState.ALIVE, addrs[RUNS_IT], frozenset({"serve", "compute", CAP})),
        MemberUpdate(LACKS_IT, 1, MemberState.ALIVE, addrs[LACKS_IT], frozenset({"serve"})),
        MemberUpdate(BYSTANDER, 1, MemberState.ALIVE, "127.0.0.1:9", frozenset({"serve"})),
    ], now)
    fleet.gossip.index.merge([HeldContent(n, key, payload_digest(codec.encode(ANSWERS[n])), 1) for n in ANSWERS])
    # the holder lacking the evaluator answers first, so a get reads the evaluator from its record
    fleet.pool.rtt[addrs[LACKS_IT]] = 0.001
    return fleet


@pytest.mark.parametrize("op", ["get", "realize"])
def test_a_tie_between_two_holders_goes_to_the_home_among_members_advertising_the_evaluator(tmp_path, op):
    member = f"member-{op}"
    req = _tied_request(member)
    cap_home = rendezvous_home(req.key, [RUNS_IT])  # the only live member advertising it
    assert cap_home == RUNS_IT
    fabs = {n: fabric.open(tmp_path / n, durability="fast", node_id=n) for n in (*ANSWERS, member)}
    for n, answer in ANSWERS.items():
        fabs[n].cassette.put(req.key, codec.encode(answer), evaluator=EV, version=VER)

    async def go():
        async with in_process_node(fabs[RUNS_IT]) as (a_addr, _), in_process_node(fabs[LACKS_IT]) as (b_addr, _):
            fleet = await _member_view(fabs[member], {RUNS_IT: a_addr, LACKS_IT: b_addr}, req.key)
            async with in_process_node(fabs[member]) as (m_addr, service):
                service.fleet, service.caf = fleet, ContentAddressedFabric(fabs[member], fleet)
                client = fabric.open(m_addr, secret=SECRET)
                try:
                    if op == "get":
                        return await client.aget(req.key), None
                    reply = await client.arealize(req)
                    return reply.value, reply.holder
                finally:
                    client.close()
                    await fleet.pool.aclose()

    try:
        value, holder = trio.run(go)
        assert value == ANSWERS[RUNS_IT]  # the old lookup served ANSWERS[LACKS_IT]
        assert holder in (None, RUNS_IT)
        rec = fabs[member].cassette.get_record(req.key)
        assert rec.digest == payload_digest(codec.encode(ANSWERS[RUNS_IT]))  # and recorded the home's
    finally:
        for f in fabs.values():
            f.close()
