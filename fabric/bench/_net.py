"""Wire: loopback echo RTT and bulk stream over the authenticated wire vs raw trio.

Ours: :func:`fabric.net.serve` + :func:`fabric.net.open_connection` (trio TCP,
mutual handshake, MAC'd length-prefixed frames) in one trio run over
127.0.0.1.  Floors: the same exchange over a bare trio TCP stream (a 4-byte
length prefix, no auth, no MAC, no msgpack) served by :func:`_raw_server`,
which :mod:`fabric.bench._remote` also runs as a subprocess for the floors of
the remote rows (real ``fabric node`` processes).  Rows say "not built" while
``fabric.net`` is missing.
"""

from __future__ import annotations

import functools
import importlib.util
import struct
import time
from typing import Any

from fabric.bench._core import NOT_BUILT, Ctx, Row, compare

__all__ = ["bench_net"]

SECRET = b"evalfabric-bench-secret-0123456789"
ECHO_BODY = {"key": b"\x01" + bytes(range(32)), "op": "realize"}
_LEN = struct.Struct(">I")
_RPC = struct.Struct(">II")
#: Length-prefix values the raw server reads as commands instead of an echo length.
RAW_BULK, RAW_RPC = 0xFFFFFFFF, 0xFFFFFFFE


def _has(mod: str) -> bool:
    try:
        return importlib.util.find_spec(mod) is not None
    except (ImportError, ValueError):
        return False


def _net_usable() -> str | None:
    """None if fabric.net has what we need, else why not."""
    if not _has("fabric.net"):
        return "fabric.net is not built yet"
    import fabric.net as net

    missing = [n for n in ("serve", "open_connection") if not callable(getattr(net, n, None))]
    return f"fabric.net has no {', '.join(missing)}" if missing else None


# ------------------------------------------------------------------- raw floors
async def _read_exact(stream: Any, buf: bytearray, n: int) -> bytes:
    while len(buf) < n:
        data = await stream.receive_some(1 << 20)
        if not data:
            raise EOFError("peer closed")
        buf += data
    out = bytes(buf[:n])
    del buf[:n]
    return out


async def _raw_server(stream: Any) -> None:
    buf = bytearray()
    try:
        while True:
            hdr = await _read_exact(stream, buf, 4)
            (n,) = _LEN.unpack(hdr)
            if n == RAW_RPC:  # request/reply: u32 body length, u32 reply length, body; answer a reply that long
                body_len, reply_len = _RPC.unpack(await _read_exact(stream, buf, 8))
                await _read_exact(stream, buf, body_len)
                await stream.send_all(_LEN.pack(reply_len) + bytes(reply_len))
                continue
            if n == RAW_BULK:  # bulk: next 8 bytes say how many bytes to stream back
                total = int.from_bytes(await _read_exact(stream, buf, 8), "big")
                chunk = bytes(1 << 20)
                sent = 0
                while sent < total:
                    piece = chunk[: min(len(chunk), total - sent)]
                    await stream.send_all(piece)
                    sent += len(piece)
                continue
            body = await _read_exact(stream, buf, n)
            await stream.send_all(hdr + body)
    except (EOFError, Exception):  # noqa: BLE001 - the client hung up
        return


async def _measure(ctx: Ctx) -> dict[str, float]:
    import msgpack
    import trio

    import fabric.net as net

    out: dict[str, float] = {}
    body_bytes = msgpack.packb(ECHO_BODY, use_bin_type=True)
    bulk_total = (16 << 20) if ctx.quick else (256 << 20)
    item = bytes(1 << 20)
    budget = ctx.budget

    async def handler(call: Any) -> Any:
        if call.op == "echo":
            return call.body
        if call.op == "bulk":
            n = int(call.body["n"])
            for _ in range(n):
                await call.send(item)
            return n
        raise ValueError(f"unknown op {call.op}")

    async with trio.open_nursery() as nursery:
        listening = await nursery.start(functools.partial(net.serve, "127.0.0.1", 0, SECRET, handler, node_id="bench-server"))
        raw_listeners = await nursery.start(functools.partial(trio.serve_tcp, _raw_server, 0, host="127.0.0.1"))
        raw_port = raw_listeners[0].socket.getsockname()[1]
        client = await net.open_connection("127.0.0.1", listening.port, SECRET, node_id="bench-client")
        raw = await trio.open_tcp_stream("127.0.0.1", raw_port)
        rbuf = bytearray()
        try:
            got = await client.request("echo", ECHO_BODY)
            if got != ECHO_BODY:
                raise AssertionError(f"echo returned {got!r}")

            async def ours_echo(n: int) -> None:
                for _ in range(n):
                    await client.request("echo", ECHO_BODY)

            async def raw_echo(n: int) -> None:
                msg = _LEN.pack(len(body_bytes)) + body_bytes
                for _ in range(n):
                    await raw.send_all(msg)
                    await _read_exact(raw, rbuf, len(msg))

            async def ours_bulk(total: int) -> None:
                got_bytes = 0
                async with client.stream("bulk", {"n": total // len(item)}) as call:
                    async for data in call:
                        got_bytes += len(data)
                if got_bytes != total:
                    raise AssertionError(f"bulk stream gave {got_bytes} bytes, expected {total}")

            async def raw_bulk(total: int) -> None:
                await raw.send_all(_LEN.pack(RAW_BULK) + total.to_bytes(8, "big"))
                got_bytes = 0
                while got_bytes < total:
                    data = await raw.receive_some(1 << 20)
                    if not data:
                        raise EOFError("raw bulk peer closed")
                    got_bytes += len(data)

            best = {"echo": 0.0, "raw-echo": 0.0, "bulk": 0.0, "raw-bulk": 0.0}
            spent = dict.fromkeys(best, 0.0)
            runs = dict.fromkeys(best, 0)
            n_echo = 200
            min_rounds = 2 if ctx.quick else 3
            # rounds interleave every contender still short of its budget; one that has had
            # min_rounds and its budget drops out (a fast floor does not keep a slow one running)
            for _ in range(50):
                todo = [(name, fn, n) for name, fn, n in (("echo", ours_echo, n_echo), ("raw-echo", raw_echo, n_echo),
                                                         ("bulk", ours_bulk, bulk_total), ("raw-bulk", raw_bulk, bulk_total))
                        if runs[name] < min_rounds or spent[name] < budget]
                if not todo:
                    break
                for name, fn, n in todo:
                    t0 = time.perf_counter()
                    await fn(n)
                    dt = time.perf_counter() - t0
                    spent[name] += dt
                    runs[name] += 1
                    best[name] = max(best[name], n / dt)
            out.update(best)
        finally:
            await client.aclose()
            await raw.aclose()
            nursery.cancel_scope.cancel()
    return out


def bench_net(ctx: Ctx) -> None:
    """Echo RTT and bulk throughput over fabric.net vs raw trio, in one process."""
    bench = "net"
    why = _net_usable()
    if why is not None:
        ctx.add(Row(bench, "echo round trips over loopback (authenticated frames)", other_label="floor: raw trio TCP echo", verdict=NOT_BUILT, note=why))
        ctx.add(Row(bench, "bulk stream over loopback", other_label="floor: raw trio TCP stream", verdict=NOT_BUILT))
        return
    import trio

    r = trio.run(_measure, ctx)
    ctx.add(compare(bench, "echo round trips over loopback (authenticated, MAC'd frames)", r["echo"], r["raw-echo"], unit="RTT/s",
                    other_label="floor: raw trio TCP echo", ours_rtt_us=1e6 / r["echo"], floor_rtt_us=1e6 / r["raw-echo"]))
    ctx.add(compare(bench, "bulk stream over loopback, 1 MiB items", r["bulk"] / 2**30, r["raw-bulk"] / 2**30, unit="GiB/s",
                    other_label="floor: raw trio TCP stream"))
