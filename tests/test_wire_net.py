"""fabric.net over real TCP on 127.0.0.1 (port 0 only), under pytest-trio.

Every test runs inside ``trio.fail_after`` so a hang fails instead of stalling
the suite; nothing asserts on timing.  Pipelining is proven with a barrier
(all 64 handlers must be running at once, or the test times out), and
cancellation with events the handler sets from its ``finally``.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

import numpy as np
import pytest
import trio

from cassette.errors import FabricError, StatusCode
from cassette.keys import ContentKey
from fabric import net
from fabric.wire import NEED_DATA, Authenticated, Closed, Fault, Request, StreamFrameLimits, WireConnection

SECRET = b"net test secret"
HOST = "127.0.0.1"
TIME_LIMIT = 15


@asynccontextmanager
async def running(handler, limits=None, **kwargs):
    """A server on 127.0.0.1:0 for the duration of the block; yields its address."""
    async with trio.open_nursery() as nursery:
        addr = await nursery.start(lambda task_status: net.serve(
            HOST, 0, SECRET, handler, limits, task_status=task_status, **kwargs))
        try:
            yield addr
        finally:
            nursery.cancel_scope.cancel()


async def echo(call):
    return call.body


def _net_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "fabric.net"]


# --------------------------------------------------------------------------- basics


@pytest.mark.trio
async def test_echo_values_stats_and_welcome():
    values = [None, 1, "text", b"\x00\xff" * 10, {"a": [1, 2.5, {"b": None}]},
              ContentKey.of("blob", b"x"), np.arange(6, dtype=np.float32).reshape(2, 3)]
    with trio.fail_after(TIME_LIMIT):
        async with running(echo, node_id="srv-1", welcome={"caps": ["serve"]}) as addr:
            async with await net.open_connection(addr.host, addr.port, SECRET, node_id="cli-1") as client:
                assert client.peer_node_id == "srv-1" and client.welcome == {"caps": ["serve"]}
                for v in values:
                    got = await client.request("echo", v)
                    if isinstance(v, np.ndarray):
                        assert got.dtype == v.dtype and np.array_equal(got, v)
                    else:
                        assert got == v and type(got) is type(v)
                stats = await client.stats()
                assert stats["wire"]["frames_received"] >= len(values) and stats["server"]["connections"] == 1
            assert client.closed
            with pytest.raises(FabricError) as ei:
                await client.request("echo", 1)
            assert ei.value.status_code is StatusCode.UNAVAILABLE


class _Barrier:
    """Holds each arriving handler until ``n`` have arrived, then lets them all through;
    ``reset()`` re-arms it for another round."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.reset()

    def reset(self) -> None:
        self.arrived = 0
        self.all_in = trio.Event()

    async def arrive(self) -> None:
        self.arrived += 1
        if self.arrived == self.n:
            self.all_in.set()
        await self.all_in.wait()


@pytest.mark.trio
async def test_64_concurrent_pipelined_requests_on_one_connection():
    n = 64
    gate = _Barrier(n)

    async def barrier(call):
        await gate.arrive()  # only returns if all 64 are in flight at once
        return {"i": call.body, "req": call.req_id}

    results: dict[int, dict] = {}
    with trio.fail_after(TIME_LIMIT):
        async with running(barrier) as addr:
            async with await net.open_connection(addr.host, addr.port, SECRET) as client:
                async def one(i):
                    results[i] = await client.request("barrier", i)

                async with trio.open_nursery() as nursery:
                    for i in range(n):
                        nursery.start_soon(one, i)
    assert sorted(results) == list(range(n))
    assert all(r["i"] == i for i, r in results.items())
    assert len({r["req"] for r in results.values()}) == n  # one id each, one connection


@pytest.mark.trio
async def test_streaming_download_and_upload():
    async def handler(call):
        if call.op == "count":
            await call.send_metadata({"n": call.body})
            for i in range(call.body):
                await call.send(b"%d" % i)
            return "done"
        if call.op == "sum":
            total = 0
            async for item in call:
                total += item
            return {"total": total, "meta": call.metadata}
        raise FabricError(StatusCode.UNIMPLEMENTED, f"no op {call.op}")

    with trio.fail_after(TIME_LIMIT):
        async with running(handler) as addr:
            async with await net.open_connection(addr.host, addr.port, SECRET) as client:
                async with client.stream("count", 50, credit=2) as call:  # 50 items through a window of 2
                    items = [x async for x in call]
                assert items == [b"%d" % i for i in range(50)]
                assert call.metadata == [{"n": 50}] and call.response == "done"
                async with client.stream("sum", None, upload=True) as call:
                    await call.send_metadata("hello")
                    for i in range(100):  # more than the server's upload window
                        await call.send(i)
                    await call.end()
                    assert await call.result() == {"total": sum(range(100)), "meta": ["hello"]}


@pytest.mark.trio
async def test_handler_errors_become_faults_and_the_connection_survives(caplog):
    caplog.set_level(logging.DEBUG, logger="fabric.net")
    async def handler(call):
        if call.op == "missing":
            raise FabricError(StatusCode.NOT_FOUND, "key not held", key="blob:" + "0" * 64)
        if call.op == "bug":
            raise ValueError("boom")
        if call.op == "huge":
            return b"x" * 10_000  # over the client's frame limit
        return "ok"

    small = StreamFrameLimits(max_frame_bytes=4096)
    with trio.fail_after(TIME_LIMIT):
        async with running(handler) as addr:
            async with await net.open_connection(addr.host, addr.port, SECRET, small) as client:
                with pytest.raises(FabricError) as ei:
                    await client.request("missing")
                assert ei.value.status_code is StatusCode.NOT_FOUND and ei.value.key == "blob:" + "0" * 64
                with pytest.raises(FabricError) as ei:
                    await client.request("bug")
                assert ei.value.status_code is StatusCode.INTERNAL and "ValueError: boom" in ei.value.message
                with pytest.raises(FabricError) as ei:
                    await client.request("huge")
                assert ei.value.status_code is StatusCode.RESOURCE_EXHAUSTED
                with pytest.raises(FabricError) as ei:  # refused locally, nothing sent
                    await client.request("echo", b"y" * 10_000_000)
                assert ei.value.status_code is StatusCode.RESOURCE_EXHAUSTED
                assert await client.request("fine") == "ok"
    lines = _net_lines(caplog)
    assert any("'bug'" in line and "ValueError" in line for line in lines)
    assert not any("boom" in line for line in lines), "exception messages (may hold payloads) are not logged"


# --------------------------------------------------------------------------- authentication


@pytest.mark.trio
async def test_wrong_secret_is_unauthenticated_and_the_server_keeps_serving(caplog):
    caplog.set_level(logging.DEBUG, logger="fabric.net")
    with trio.fail_after(TIME_LIMIT):
        async with running(echo) as addr:
            good = await net.open_connection(addr.host, addr.port, SECRET)
            with pytest.raises(FabricError) as ei:
                await net.open_connection(addr.host, addr.port, b"guessed-password-123")
            assert ei.value.status_code is StatusCode.UNAUTHENTICATED and not ei.value.retryable
            assert await good.request("echo", "still here") == "still here"
            async with await net.open_connection(addr.host, addr.port, SECRET) as again:
                assert await again.request("echo", 2) == 2
            await good.aclose()
    lines = _net_lines(caplog)
    rejected = [line for line in lines if "UNAUTHENTICATED" in line]
    assert len(rejected) == 1 and "proof does not verify" in rejected[0]
    assert not any("guessed-password" in line or SECRET.decode() in line for line in lines)


async def _raw_handshake(port: int, secret: bytes):
    """Dial with a bare WireConnection; return (stream, conn, every byte the server sent)."""
    stream = await trio.open_tcp_stream(HOST, port)
    conn = WireConnection("client", secret)
    received = bytearray()
    await stream.send_all(conn.data_to_send())
    while True:
        data = await stream.receive_some(65536)
        received += data
        conn.receive_data(data)
        out = conn.data_to_send()
        if out:
            await stream.send_all(out)
        events = []
        while (ev := conn.next_event()) is not NEED_DATA:
            events.append(ev)
            if isinstance(ev, Closed):
                break
        if any(isinstance(e, (Authenticated, Closed)) for e in events) or not data:
            return stream, conn, bytes(received), events


@pytest.mark.trio
async def test_an_unauthenticated_peer_receives_nothing_but_the_server_hello():
    with trio.fail_after(TIME_LIMIT):
        async with running(echo, welcome={"caps": ["secret capability"]}) as addr:
            stream, conn, received, events = await _raw_handshake(addr.port, b"guess")
            # read until the server hangs up: every byte it ever sent us
            while data := await stream.receive_some(65536):
                received += data
            await stream.aclose()
    n = int.from_bytes(received[:4], "big")
    assert len(received) == 4 + n, "the server sent more than one frame"
    assert b"hello" in received and b"capability" not in received and b"auth" not in received


@pytest.mark.trio
async def test_malformed_frame_after_auth_closes_only_that_connection(caplog):
    caplog.set_level(logging.INFO, logger="fabric.net")
    with trio.fail_after(TIME_LIMIT):
        async with running(echo) as addr:
            bystander = await net.open_connection(addr.host, addr.port, SECRET)
            stream, conn, _, events = await _raw_handshake(addr.port, SECRET)
            assert any(isinstance(e, Authenticated) for e in events)
            await stream.send_all(b"\x00\x00\x00\x03abc")  # not an envelope
            while data := await stream.receive_some(65536):
                conn.receive_data(data)
            reasons = []
            while not isinstance(ev := conn.next_event(), Closed):
                reasons.append(ev)
            assert ev.reason.status_code is StatusCode.INVALID_ARGUMENT  # the server's fault tells us why
            await stream.aclose()
            assert await bystander.request("echo", "unaffected") == "unaffected"
            await bystander.aclose()
    assert any("INVALID_ARGUMENT" in line and "envelope" in line for line in _net_lines(caplog))


@pytest.mark.trio
async def test_handshake_timeout_closes_a_silent_socket(caplog):
    caplog.set_level(logging.INFO, logger="fabric.net")
    limits = StreamFrameLimits(handshake_timeout_s=0.2)
    with trio.fail_after(TIME_LIMIT):
        async with running(echo, limits) as addr:
            stream = await trio.open_tcp_stream(HOST, addr.port)
            assert await stream.receive_some(100) == b""  # closed by the server, nothing sent
            await stream.aclose()
    assert any("DEADLINE_EXCEEDED" in line and "handshake" in line for line in _net_lines(caplog))


# --------------------------------------------------------------------------- cancellation, deadlines, idle


@pytest.mark.trio
async def test_cancel_propagates_to_the_server_handler():
    started = trio.Event()
    cancelled = trio.Event()

    async def handler(call):
        if call.op == "forever":
            started.set()
            try:
                await trio.sleep_forever()
            finally:
                cancelled.set()
        return call.body

    with trio.fail_after(TIME_LIMIT):
        async with running(handler) as addr:
            async with await net.open_connection(addr.host, addr.port, SECRET) as client:
                async with trio.open_nursery() as nursery:
                    async def ask():
                        await client.request("forever")
                    nursery.start_soon(ask)
                    await started.wait()
                    nursery.cancel_scope.cancel()
                await cancelled.wait()  # the server's handler task was cancelled
                assert await client.request("echo", "after") == "after"
                # a cancelled stream behaves the same way
                started, cancelled = trio.Event(), trio.Event()
                async with client.stream("forever") as call:
                    await started.wait()
                    await call.cancel()
                await cancelled.wait()


@pytest.mark.trio
async def test_caller_deadline_travels_as_the_request_timeout():
    seen = []

    async def handler(call):
        seen.append(call.timeout_s)
        return "ok"

    with trio.fail_after(TIME_LIMIT):
        async with running(handler) as addr:
            async with await net.open_connection(addr.host, addr.port, SECRET) as client:
                assert await client.request("a") == "ok"  # under the test's fail_after
                with trio.move_on_after(3):
                    assert await client.request("b") == "ok"
    assert 3 < seen[0] <= TIME_LIMIT and 0 < seen[1] <= 3


@pytest.mark.trio
async def test_server_applies_the_request_timeout():
    async def handler(call):
        await trio.sleep_forever()

    with trio.fail_after(TIME_LIMIT):
        async with running(handler) as addr:
            stream, conn, _, events = await _raw_handshake(addr.port, SECRET)
            assert any(isinstance(e, Authenticated) for e in events)
            # a bare client that does not cancel by itself: the server's deadline must fire
            await stream.send_all(conn.send(Request(1, "wait", None, True, 0, 0.05)))
            fault = None
            while fault is None:
                data = await stream.receive_some(65536)
                assert data, "server hung up instead of faulting the request"
                conn.receive_data(data)
                while (ev := conn.next_event()) is not NEED_DATA:
                    assert not isinstance(ev, Closed), ev.reason
                    if isinstance(ev, Fault):
                        fault = ev
            assert fault.req_id == 1 and fault.error.status_code is StatusCode.DEADLINE_EXCEEDED
            await stream.aclose()


@pytest.mark.trio
async def test_idle_timeout_closes_the_connection(caplog):
    caplog.set_level(logging.INFO, logger="fabric.net")
    limits = StreamFrameLimits(idle_timeout_s=0.2)
    with trio.fail_after(TIME_LIMIT):
        async with running(echo, limits) as addr:
            client = await net.open_connection(addr.host, addr.port, SECRET)
            assert await client.request("echo", 1) == 1
            err = await client.wait_closed()
            assert err.status_code is StatusCode.UNAVAILABLE and err.retryable
            with pytest.raises(FabricError) as ei:
                await client.request("echo", 2)
            assert ei.value.status_code is StatusCode.UNAVAILABLE and ei.value.retryable
            await client.aclose()
    assert any("idle" in line for line in _net_lines(caplog))


@pytest.mark.trio
async def test_reusable_takes_in_the_goodbye_of_a_connection_the_server_closed_as_idle(monkeypatch):
    monkeypatch.setattr(net, "REUSE_CHECK_AFTER_S", 0.05)
    limits = StreamFrameLimits(idle_timeout_s=0.4)
    with trio.fail_after(TIME_LIMIT):
        async with running(echo, limits) as addr:
            client = await net.open_connection(addr.host, addr.port, SECRET)
            assert await client.request("echo", 1) == 1
            await trio.sleep(0.1)
            assert client.reusable() and not client.closed  # quiet, still open at the server: nothing taken away
            assert await client.request("echo", 2) == 2
            while client.reusable():  # until the server's idle goodbye is there
                await trio.sleep(0.02)
            assert client.closed and client._link.stream.socket.fileno() == -1  # our socket closed too
            with pytest.raises(FabricError) as ei:
                await client.request("echo", 3)
            assert ei.value.status_code is StatusCode.UNAVAILABLE and ei.value.retryable
            await client.aclose()


@pytest.mark.trio
async def test_a_peer_pool_redials_a_connection_the_peer_closed_as_idle(monkeypatch):
    from fabric.fleet import PeerPool

    monkeypatch.setattr(net, "REUSE_CHECK_AFTER_S", 0.05)
    with trio.fail_after(TIME_LIMIT):
        async with running(echo, StreamFrameLimits(idle_timeout_s=0.2)) as addr:
            where = f"{addr.host}:{addr.port}"
            pool = PeerPool(SECRET)
            first = await pool.client(where)
            assert await pool.request(where, "echo", 1) == 1
            assert await pool.client(where) is first
            await trio.lowlevel.wait_readable(first._link.stream.socket)  # the server's goodbye is there, unread
            assert not first.closed
            assert await pool.request(where, "echo", 2) == 2  # on a new connection, at the first attempt
            assert await pool.client(where) is not first
            await (await pool.client(where)).aclose()


@pytest.mark.trio
async def test_a_long_request_is_not_idle():
    limits = StreamFrameLimits(idle_timeout_s=0.1)

    async def slow(call):
        await trio.sleep(0.5)  # several idle periods with a live request
        return "finished"

    with trio.fail_after(TIME_LIMIT):
        async with running(slow, limits) as addr:
            async with await net.open_connection(addr.host, addr.port, SECRET) as client:
                assert await client.request("slow") == "finished"


# --------------------------------------------------------------------------- limits and failures


@pytest.mark.trio
async def test_max_connections():
    limits = StreamFrameLimits(max_connections=1)
    with trio.fail_after(TIME_LIMIT):
        async with running(echo, limits) as addr:
            first = await net.open_connection(addr.host, addr.port, SECRET)
            with pytest.raises(FabricError) as ei:
                await net.open_connection(addr.host, addr.port, SECRET)
            assert ei.value.status_code is StatusCode.RESOURCE_EXHAUSTED and "connection limit" in ei.value.message
            assert await first.request("echo", "first still served") == "first still served"
            await first.aclose()
            while True:  # the server frees the slot once it has seen the goodbye
                try:
                    second = await net.open_connection(addr.host, addr.port, SECRET)
                    break
                except FabricError as exc:
                    assert exc.status_code is StatusCode.RESOURCE_EXHAUSTED
                    await trio.sleep(0.01)
            assert await second.request("echo", 2) == 2
            await second.aclose()


@pytest.mark.trio
async def test_server_going_away_is_unavailable_and_retryable():
    started = trio.Event()

    async def handler(call):
        started.set()
        await trio.sleep_forever()

    with trio.fail_after(TIME_LIMIT):
        async with trio.open_nursery() as outer:
            server_scope = trio.CancelScope()

            async def run_server(task_status):
                with server_scope:
                    await net.serve(HOST, 0, SECRET, handler, task_status=task_status)

            addr = await outer.start(run_server)
            client = await net.open_connection(addr.host, addr.port, SECRET)
            errors = []

            async def ask():
                try:
                    await client.request("hang")
                except FabricError as exc:
                    errors.append(exc)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask)
                await started.wait()
                server_scope.cancel()  # the whole server goes away mid-request
    assert len(errors) == 1
    assert errors[0].status_code is StatusCode.UNAVAILABLE and errors[0].retryable


@pytest.mark.trio
async def test_nothing_listening_is_unavailable():
    listener = (await trio.open_tcp_listeners(0, host=HOST))[0]
    port = listener.socket.getsockname()[1]
    await listener.aclose()
    with trio.fail_after(TIME_LIMIT):
        with pytest.raises(FabricError) as ei:
            await net.open_connection(HOST, port, SECRET)
    assert ei.value.status_code is StatusCode.UNAVAILABLE and ei.value.retryable


# --------------------------------------------------------------------------- inline (fast) handler


@pytest.mark.trio
async def test_fast_handler_answers_inline_defers_and_reports_errors_like_a_handler():
    """serve(fast=...): replies, faults and handler bugs as the async handler gives them; DEFER falls through."""
    inline: list[int] = []
    handled: list[str] = []

    def fast(op, body):
        if op == "echo":
            inline.append(body)
            return body
        if op == "refuse":
            raise FabricError(StatusCode.NOT_FOUND, "not here")
        if op == "bug":
            raise ZeroDivisionError("oops")
        return net.DEFER

    async def handler(call):
        handled.append(call.op)
        await trio.sleep(0)
        return {"slow": call.body}

    with trio.fail_after(TIME_LIMIT):
        async with running(handler, fast=fast) as addr:
            async with await net.open_connection(addr.host, addr.port, SECRET) as client:
                got: dict[int, object] = {}

                async def one(i):
                    got[i] = await client.request("echo", i)

                async with trio.open_nursery() as nursery:  # pipelined: many inline answers per read
                    for i in range(40):
                        nursery.start_soon(one, i)
                assert got == {i: i for i in range(40)} and sorted(inline) == list(range(40))
                assert await client.request("slow", 7) == {"slow": 7} and handled == ["slow"]
                with pytest.raises(FabricError) as ei:
                    await client.request("refuse")
                assert ei.value.status_code is StatusCode.NOT_FOUND and ei.value.message == "not here"
                with pytest.raises(FabricError) as ei:
                    await client.request("bug")
                assert ei.value.status_code is StatusCode.INTERNAL and "ZeroDivisionError: oops" in ei.value.message
                assert await client.request("echo", "still serving") == "still serving"
                # an upload never goes to the fast handler
                async with client.stream("echo", "up", upload=True) as call:
                    await call.end()
                    assert await call.result() == {"slow": "up"}
                assert handled == ["slow", "echo"]


# --------------------------------------------------------------------------- call_many


@pytest.mark.trio
async def test_call_many_pipelines_keeps_order_and_fails_only_the_faulting_request():
    """All requests of call_many are in flight at once (the barrier handler answers only
    when 40 are in), replies come back in request order with their pushed items, a fault
    or an unsendable body fails only its own position, and the connection stays usable."""
    n = 40
    gate = _Barrier(n - 1)  # every sendable body (one is refused before sending)

    async def handler(call):
        await gate.arrive()
        if call.body == 13:
            raise FabricError(StatusCode.NOT_FOUND, "no 13 here")
        if call.body % 5 == 0:
            await call.send(b"pushed %d" % call.body)
        return {"i": call.body}

    bodies: list = list(range(n))
    bodies[7] = {1, 2}  # a set cannot be encoded: refused locally, never sent
    with trio.fail_after(TIME_LIMIT):
        async with running(handler) as addr:
            async with await net.open_connection(addr.host, addr.port, SECRET) as client:
                got = await client.call_many("op", bodies)
                assert (await client.request("op", 41)) == {"i": 41}

                def then(i, reply, items):  # runs per reply as it is taken in, told its index
                    if i == 3:
                        raise FabricError(StatusCode.DATA_LOSS, "the caller refuses reply 3")
                    return ("seen", i, reply["i"], len(items))

                gate.reset()
                mapped = await client.call_many("op", bodies, then=then)
    assert len(got) == n
    for i, r in enumerate(got):
        if i == 7:
            assert isinstance(r, FabricError) and r.status_code is StatusCode.INVALID_ARGUMENT
        elif i == 13:
            assert isinstance(r, FabricError) and r.status_code is StatusCode.NOT_FOUND and "no 13" in r.message
        else:
            assert r == ({"i": i}, [b"pushed %d" % i] if i % 5 == 0 else [])
    for i, r in enumerate(mapped):
        if i in (3, 7, 13):
            assert isinstance(r, FabricError) and r.status_code is {3: StatusCode.DATA_LOSS, 7: StatusCode.INVALID_ARGUMENT,
                                                                     13: StatusCode.NOT_FOUND}[i]
        else:
            assert r == ("seen", i, i, 1 if i % 5 == 0 else 0)


@pytest.mark.trio
async def test_call_many_beyond_the_in_flight_limit_and_concurrently_does_not_deadlock():
    """With a server allowing 4 requests in flight, two concurrent call_many of 50 each
    (and a plain request beside them) all complete: a caller at the limit takes in its
    oldest replies before sending more, and never waits on the limit holding permits."""
    limits = StreamFrameLimits(max_inflight_requests=4)
    peak = 0
    live = 0

    async def handler(call):
        nonlocal peak, live
        live += 1
        peak = max(peak, live)
        await trio.sleep(0.001)
        live -= 1
        return call.body * 2

    out: dict[str, list] = {}
    with trio.fail_after(TIME_LIMIT):
        async with running(handler, limits) as addr:
            async with await net.open_connection(addr.host, addr.port, SECRET) as client:
                async def many(tag, base):
                    out[tag] = await client.call_many("op", [base + i for i in range(50)])

                async def single():
                    out["one"] = [await client.request("op", 1000)]

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(many, "a", 0)
                    nursery.start_soon(many, "b", 100)
                    nursery.start_soon(single)
    assert out["a"] == [((i) * 2, []) for i in range(50)]
    assert out["b"] == [((100 + i) * 2, []) for i in range(50)]
    assert out["one"] == [2000]
    assert peak <= 4


@pytest.mark.trio
async def test_cancelling_call_many_cancels_its_live_requests_on_the_server():
    started = 0
    cancelled = 0
    all_started = trio.Event()

    async def handler(call):
        nonlocal started, cancelled
        if call.op == "after":
            return "still serving"
        started += 1
        if started == 5:
            all_started.set()
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            cancelled += 1
            raise

    with trio.fail_after(TIME_LIMIT):
        async with running(handler) as addr:
            async with await net.open_connection(addr.host, addr.port, SECRET) as client:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(client.call_many, "op", list(range(5)))
                    await all_started.wait()
                    nursery.cancel_scope.cancel()
                while cancelled < 5:  # each live request was cancelled at the server
                    await trio.sleep(0.01)
                assert await client.request("after", None) == "still serving"
                assert client._slots == {}  # nothing of the cancelled batch is left behind


@pytest.mark.trio
async def test_a_bug_escaping_one_connection_ends_that_connection_only(monkeypatch, caplog):
    """An internal error that escapes a connection's read loop (here: injected into the
    dispatch of one op) must not end the server: that connection closes, is logged once at
    ERROR and counted, and the other connections — open before it and new ones — are served."""
    real = net._ServerConnection._dispatch

    def dispatch(self, ev):
        if isinstance(ev, Request) and ev.op == "boom":
            raise RuntimeError("injected bug")
        return real(self, ev)

    monkeypatch.setattr(net._ServerConnection, "_dispatch", dispatch)
    caplog.set_level(logging.INFO, logger="fabric.net")
    with trio.fail_after(TIME_LIMIT):
        async with running(echo) as addr:
            bystander = await net.open_connection(addr.host, addr.port, SECRET)
            victim = await net.open_connection(addr.host, addr.port, SECRET)
            with pytest.raises(FabricError) as ei:
                await victim.request("boom", 1)
            assert ei.value.status_code is StatusCode.UNAVAILABLE
            assert await bystander.request("echo", "still served") == "still served"
            async with await net.open_connection(addr.host, addr.port, SECRET) as fresh:
                assert await fresh.request("echo", 7) == 7
                stats = await fresh.stats()
            assert stats["server"]["internal_errors"] == 1
            await bystander.aclose()
            await victim.aclose()
    errors = [r for r in caplog.records if r.name == "fabric.net" and r.levelno == logging.ERROR]
    assert len(errors) == 1 and "injected bug" in errors[0].getMessage() and errors[0].exc_info
