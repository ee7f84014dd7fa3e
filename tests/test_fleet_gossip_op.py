"""The ``gossip`` op of a fleet node: the peer-supplied ``from`` (where replies go) is checked.

It used to be taken as the reply address as it came: any string, of any length, with or
without a port, queued for the runner, which then dialled it.  Now a ``from`` that is not
``HOST:PORT`` (port 1-65535, at most 255 bytes, HOST an IP address or a DNS name) is refused
with INVALID_ARGUMENT and nothing is queued; the node goes on serving.
"""

from __future__ import annotations

import pytest
import trio

import fabric
from cassette.errors import FabricError, StatusCode
from fabric.fleet import reply_address
from fabric.net import open_connection
from fabric.remote import parse_address
from gossip.messages import Ping, encode_message
from _nodes import SECRET, node

BAD_FROM = [
    "", "127.0.0.1", "127.0.0.1:", ":7000", "127.0.0.1:0", "127.0.0.1:65536", "127.0.0.1:99999999999",
    "h:\u00b2", "h:-1", "h: 7000", "x..y:7000", "a" * 64 + ":7000", "-lead:7000", "host name:7000",
    "evil\n:7000", "h\x00:7000", "a:b:7000", "b\u00fccher.de:7000", "n" * 250 + ".io:7000",
]
GOOD_FROM = ["127.0.0.1:7000", "10.0.0.1:1", "[::1]:7000", "::1:7000", "node-1.fleet.example:65535", "a_b:7000",
             "localhost:7000", "a" * 63 + ":7000"]


@pytest.mark.parametrize("addr", BAD_FROM)
def test_a_from_that_is_no_reply_address_is_invalid_argument(addr):
    with pytest.raises(FabricError) as e:
        reply_address(addr)
    assert e.value.status_code is StatusCode.INVALID_ARGUMENT and "'from' must be HOST:PORT" in e.value.message
    assert len(e.value.message) < 200  # a long 'from' is not echoed whole


@pytest.mark.parametrize("addr", GOOD_FROM)
def test_host_port_forms_a_node_advertises_are_accepted(addr):
    assert reply_address(addr) == addr


def test_a_real_node_refuses_a_bad_from_and_keeps_serving_its_peers(tmp_path):
    with node(tmp_path, "a") as (addr, proc, _):
        host, port = parse_address(addr)
        ping = encode_message(Ping("peer", 1, None))

        async def hostile() -> list:
            codes = []
            async with await open_connection(host, port, SECRET) as client:
                for bad in BAD_FROM:
                    try:
                        await client.request("gossip", {"from": bad, "msg": ping})
                        codes.append((bad, "OK"))
                    except FabricError as exc:
                        codes.append((bad, exc.status_code))
                # the same connection still carries a well-formed gossip message
                await client.request("gossip", {"from": "127.0.0.1:9", "msg": ping})
            return codes

        codes = trio.run(hostile)
        assert codes == [(bad, StatusCode.INVALID_ARGUMENT) for bad in BAD_FROM]
        with fabric.open(addr, secret=SECRET) as f:  # still serving clients
            assert f.stats()["node"]["node_id"]
        assert proc.poll() is None


@pytest.mark.trio
async def test_the_fleet_transport_warns_once_of_a_peer_it_cannot_reach(caplog):
    """Replies to a peer whose port is closed: every send fails (UNAVAILABLE over a real socket
    on 127.0.0.1); the node says so in one WARNING line naming the address, not per send."""
    import logging
    import socket

    from fabric.fleet import PeerPool, WireTransport
    from gossip.membership import MembershipConfig
    from gossip.node import GossipConfig, GossipNode
    from gossip.runner import FAIL_WARN_AFTER, GossipRunner

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        gone = f"127.0.0.1:{s.getsockname()[1]}"  # closed once the block ends
    quiet = GossipConfig(membership=MembershipConfig(member_sync_interval=None, reconnect_interval=None))
    pool = PeerPool(SECRET)
    runner = GossipRunner(GossipNode("a", addr="127.0.0.1:9", config=quiet), WireTransport(pool, "127.0.0.1:9"))
    with caplog.at_level(logging.WARNING, logger="evalfabric.gossip"):
        async with trio.open_nursery() as nursery:
            await nursery.start(runner.run)
            for seq in range(2 * FAIL_WARN_AFTER):  # each ping is answered with an ack to `gone`
                await runner.deliver(gone, encode_message(Ping("peer", seq, None)))
            with trio.fail_after(10):
                while runner.send_failures < 2 * FAIL_WARN_AFTER:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    await pool.aclose()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert f"sends to '{gone}' keep failing ({FAIL_WARN_AFTER} in a row; last: UNAVAILABLE" in warnings[0]
