"""Remote: a client against real ``fabric node`` subprocesses, next to raw trio floors.

Every figure here crosses a process boundary over loopback, ours and the
floor alike: the nodes are ``fabric node`` subprocesses (logs to a file in the
scratch dir, stopped with SIGTERM), and the floors talk to a raw trio TCP
server subprocess running :func:`fabric.bench._net._raw_server` (a 4-byte
length prefix, no auth, no MAC, no msgpack, no verification).  The client
side of both runs in one trio run of this process, batches interleaved, GC
off inside a batch.

``remote-hit`` (one node, 1 KiB replies already recorded on it):

* latency p50 / p99 of sequential ``RemoteFabric.arealize`` hits vs the raw
  request/reply RTT p50 / p99 (the same request body out, a reply as long as
  the 1 KiB reply's record back).  ratio = ours / floor (a cost: lower is
  better), goal p50 ≤ 2× (issue 4); p99 is informational.
* pipelined hits: N (4, and 32) concurrent ``arealize`` tasks sharing one
  ``RemoteFabric`` (one connection) vs sequential hits on the same connection.
  ratio = pipelined / sequential, goal ≥ 5×.  And one task calling
  ``arealize_many`` of 32 requests, all held: the node answers them in one
  ``lookup`` request (specs/wire.md section 13), each record verified.

``remote-fetch`` (holders joined with ``--join``; the artifact is put into
each holder's data dir *before* the node starts, since ``RemoteFabric.put`` is
not built).  Fleet X has holders A and B; fleet Y has one holder S of the same
artifact:

* verified fetch of a 256 MiB artifact (``--quick``: 16 MiB) with ``aget``
  through a client connected to holder A vs the raw trio stream of the same
  bytes, and vs that stream plus one BLAKE3 pass (the least a verified fetch
  must compute).
* from 2 holders in parallel (fabric): per timed round a fresh member that
  lacks the artifact joins fleet X; once its gossip shows A and B live
  holders, the clock covers one ``aget`` through it: the member stripes the
  chunks over both holders (``fabric.fleet.FETCH_PER_HOLDER`` in flight each,
  every chunk verified, stored in batches), records the manifest, then streams
  the artifact to the client, which checks it.  The same through a fresh
  member of fleet Y (1 holder live), and the ratio of the two: what a second
  holder buys.  Since that clock also covers the member serving the
  artifact, the ratio row notes the fetch part alone too: the first ``aget``
  less a second one through the same member (now a holder).  The 2-holder
  row notes each holder's share of the chunk bytes (the member's
  ``peer_fetch_bytes_by_node``).  Members are stopped and their data dirs
  removed after their round; 3 rounds (``--quick``: 1), best kept.
* 2 holders by hand: the manifest from one holder, its chunks fetched as blob
  keys from both holders at once by the client, each chunk verified
  (informational: what the public API allows without a fleet member).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import signal
import statistics
import subprocess
import sys
import time
from typing import Any, Awaitable, Callable, Iterator

from fabric.bench._core import Ctx, Row, compare

__all__ = ["bench_remote_hit", "bench_remote_fetch", "raw_server_main"]

#: Reply bytes the floor's request/reply sends back: a 1 KiB reply's record (payload plus record header).
FLOOR_REPLY = 1024 + 160
#: Concurrent tasks of the pipelined rows: a few agents, and many.
PIPELINE_TASKS = (4, 32)
#: Requests per ``arealize_many`` call in the batched pipelining row.
MANY_BATCH = 32
_START_S = 30.0
_PY = [sys.executable, "-c"]
_NODE_MAIN = "import sys; from fabric.cli import main; sys.exit(main())"
_RAW_MAIN = "from fabric.bench._remote import raw_server_main; raw_server_main()"


# ------------------------------------------------------------- subprocesses
def raw_server_main() -> None:
    """Entry point of the floor's server subprocess: print ``listening on HOST:PORT``, serve until killed."""
    import trio

    from fabric.bench._net import _raw_server

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(lambda task_status: trio.serve_tcp(_raw_server, 0, host="127.0.0.1", task_status=task_status))
            print(f"listening on 127.0.0.1:{listeners[0].socket.getsockname()[1]}", flush=True)

    with contextlib.suppress(KeyboardInterrupt):
        trio.run(main)


class _Proc:
    """A subprocess whose stdout and stderr go to files (never an unread pipe)."""

    def __init__(self, name: str, argv: list[str], d: str) -> None:
        self.name = name
        self.out_path = os.path.join(d, f"{name}.out")
        self.log_path = os.path.join(d, f"{name}.log")
        with open(self.out_path, "wb") as out, open(self.log_path, "wb") as err:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        self.address = ""
        self.node_id = ""

    def wait_listening(self, timeout: float = _START_S) -> "_Proc":
        """Wait for the ``listening on HOST:PORT [node=ID]`` line; RuntimeError with the log's tail otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with open(self.out_path) as f:
                line = f.readline()
            if line.endswith("\n"):
                if not line.startswith("listening on "):
                    break
                parts = line.split()
                self.address = parts[2]
                self.node_id = parts[3].partition("=")[2] if len(parts) > 3 else ""
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        with open(self.log_path, errors="replace") as f:
            tail = f.read()[-400:].strip().replace("\n", " | ")
        raise RuntimeError(f"{self.name} did not start (exit {self.proc.poll()}): {tail or 'no log'}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@contextlib.contextmanager
def _procs() -> Iterator[Callable[[str, list[str], str], _Proc]]:
    """``start(name, argv, dir)`` inside; every process started is stopped on the way out."""
    started: list[_Proc] = []

    def start(name: str, argv: list[str], d: str) -> _Proc:
        p = _Proc(name, argv, d)
        started.append(p)
        return p

    try:
        yield start
    finally:
        for p in reversed(started):
            p.stop()


def _node_argv(data: str, secret_file: str, *extra: str) -> list[str]:
    return [*_PY, _NODE_MAIN, "node", "--data", data, "--listen", "127.0.0.1:0", "--secret-file", secret_file,
            "--evaluators", "fabric.bench._local", "--durability", "fast", "--drain-s", "5", *extra]


def _secret_file(d: str) -> str:
    from fabric.bench._net import SECRET

    path = os.path.join(d, "secret")
    with open(path, "wb") as f:
        f.write(SECRET)
    return path


# ------------------------------------------------------------------ helpers
def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def _pct(xs: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``xs``, nearest rank."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


class _RawClient:
    """The floor's client: one trio TCP stream to the raw server subprocess."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.buf = bytearray()

    @classmethod
    async def connect(cls, address: str) -> "_RawClient":
        import trio

        host, port = _split(address)
        return cls(await trio.open_tcp_stream(host, port))

    async def rpc(self, msg: bytes, reply_len: int) -> None:
        from fabric.bench._net import _read_exact

        await self.stream.send_all(msg)
        await _read_exact(self.stream, self.buf, 4 + reply_len)

    async def bulk(self, total: int, on_data: Callable[[bytes], Any] | None = None) -> None:
        from fabric.bench._net import _LEN, RAW_BULK

        await self.stream.send_all(_LEN.pack(RAW_BULK) + total.to_bytes(8, "big"))
        got = 0
        while got < total:
            data = await self.stream.receive_some(min(1 << 20, total - got))
            if not data:
                raise EOFError("raw bulk server closed")
            if on_data is not None:
                on_data(data)
            got += len(data)

    async def aclose(self) -> None:
        await self.stream.aclose()


async def _timed(fn: Callable[[], Awaitable[Any]]) -> tuple[float, Any]:
    """``(seconds, result)`` of ``await fn()`` with GC off."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        t0 = time.perf_counter()
        got = await fn()
        return time.perf_counter() - t0, got
    finally:
        if enabled:
            gc.enable()


# ---------------------------------------------------------------- remote-hit
async def _hit_client(ctx: Ctx, node_addr: str, raw_addr: str) -> dict[str, Any]:
    import msgpack
    import trio

    import fabric
    from fabric.bench._local import NAME_1K, VERSION, _args
    from fabric.bench._net import _LEN, _RPC, RAW_RPC, SECRET

    k = 16 if ctx.quick else 64
    args = _args(k)
    reqs = [fabric.Request(NAME_1K, a, version=VERSION) for a in args]
    rf = fabric.open(node_addr, secret=SECRET)
    raw = await _RawClient.connect(raw_addr)
    try:
        for r in reqs:  # computed once on the node and recorded there; every call below is a hit
            await rf.arealize(r)
        rep = await rf.arealize(reqs[0])
        if rep.source != "local" or not isinstance(rep.value, bytes) or len(rep.value) != 1024:
            raise AssertionError(f"expected a local 1 KiB hit, got source={rep.source} value={type(rep.value).__name__}")
        bodies = [msgpack.packb({"evaluator": NAME_1K, "version": VERSION, "args": a}, use_bin_type=True) for a in args]
        msgs = [_LEN.pack(RAW_RPC) + _RPC.pack(len(b), FLOOR_REPLY) + b for b in bodies]
        for m in msgs:  # warm the floor's connection as ours was warmed
            await raw.rpc(m, FLOOR_REPLY)
        hits_before = (await rf.astats())["node"]["local_hits"]

        # -- latency: sequential calls, each timed; batches interleaved
        lat: dict[str, list[float]] = {"ours": [], "floor": []}
        batch = 25 if ctx.quick else 100

        async def ours_batch() -> None:
            out = lat["ours"]
            for i in range(batch):
                t0 = time.perf_counter()
                await rf.arealize(reqs[i % k])
                out.append(time.perf_counter() - t0)

        async def floor_batch() -> None:
            out = lat["floor"]
            for i in range(batch):
                t0 = time.perf_counter()
                await raw.rpc(msgs[i % k], FLOOR_REPLY)
                out.append(time.perf_counter() - t0)

        budget = 0.4 if ctx.quick else 4.0  # seconds of our calls; the floor gets as many calls
        spent = {"ours": 0.0, "floor": 0.0}
        rounds = 0
        while rounds < 4 or spent["ours"] < budget:
            spent["ours"] += (await _timed(ours_batch))[0]
            spent["floor"] += (await _timed(floor_batch))[0]
            rounds += 1
            if rounds >= 10_000:
                break

        # -- pipelined: N tasks on the one connection vs sequential on the same connection
        window = 0.25 if ctx.quick else 1.0

        async def sequential() -> float:
            n = 0
            t0 = time.perf_counter()
            end = t0 + window
            while time.perf_counter() < end:
                await rf.arealize(reqs[n % k])
                n += 1
            return n / (time.perf_counter() - t0)

        async def pipelined(tasks: int) -> float:
            counts = [0] * tasks
            t0 = time.perf_counter()
            end = t0 + window

            async def worker(j: int) -> None:
                n = 0
                while time.perf_counter() < end:
                    await rf.arealize(reqs[(j + n) % k])
                    n += 1
                counts[j] = n

            async with trio.open_nursery() as nursery:
                for j in range(tasks):
                    nursery.start_soon(worker, j)
            return sum(counts) / (time.perf_counter() - t0)

        async def batched() -> float:
            n = 0
            t0 = time.perf_counter()
            end = t0 + window
            while time.perf_counter() < end:
                got = await rf.arealize_many([reqs[(n + j) % k] for j in range(MANY_BATCH)])
                if len(got) != MANY_BATCH or got[0].source != "local":
                    raise AssertionError("arealize_many did not answer every request as a hit")
                n += MANY_BATCH
            return n / (time.perf_counter() - t0)

        contenders: dict[Any, Callable[[], Awaitable[float]]] = {"seq": sequential}
        for tasks in PIPELINE_TASKS:
            contenders[tasks] = functools.partial(pipelined, tasks)
        contenders["many"] = batched
        rates: dict[Any, list[float]] = {name: [] for name in contenders}
        for _ in range(2 if ctx.quick else 3):
            for name, fn in contenders.items():
                rates[name].append((await _timed(fn))[1])
        hits = (await rf.astats())["node"]["local_hits"] - hits_before
        if hits < len(lat["ours"]):
            raise AssertionError(f"the node counted {hits} local hits for {len(lat['ours'])} timed calls: not all were hits")
    finally:
        await raw.aclose()
        rf.close()
    return {"lat": lat, "rates": rates, "keys": k, "batch": batch}


def bench_remote_hit(ctx: Ctx) -> None:
    """Remote 1 KiB hit latency (p50, p99) vs raw RTT; pipelined vs sequential hits on one connection."""
    import trio

    bench = "remote-hit"
    with ctx.tempdir("remote-hit") as d, _procs() as start:
        secret_file = _secret_file(d)
        node = start("node", _node_argv(os.path.join(d, "node"), secret_file), d)
        rawp = start("raw", [*_PY, _RAW_MAIN], d)
        node.wait_listening()
        rawp.wait_listening()
        r = trio.run(_hit_client, ctx, node.address, rawp.address)
    lat = r["lat"]
    us = {name: {q: _pct(xs, q) * 1e6 for q in (0.5, 0.99)} for name, xs in lat.items()}
    n_ours, n_floor = len(lat["ours"]), len(lat["floor"])
    # machine state drifts (this VM's loopback RTT swings ~2x with process placement): the
    # ratio of each ours batch's p50 to the adjacent floor batch's p50, medianed, resists that
    b = r["batch"]
    paired = statistics.median(_pct(lat["ours"][i : i + b], 0.5) / _pct(lat["floor"][i : i + b], 0.5) for i in range(0, min(n_ours, n_floor), b))
    floor_label = "floor: raw trio TCP request/reply (server subprocess)"
    m = "hit latency p50, 1 KiB reply, sequential arealize (node subprocess, loopback)"
    ctx.add(Row(bench, m, us["ours"][0.5], "µs", us["floor"][0.5], floor_label, None, us["ours"][0.5] / us["floor"][0.5], "<=", 2.0,
                note=f"latency rows: ratio = ours / floor (a cost: lower is better); goal from issue 4: p50 ≤ 2× the raw RTT; "
                     f"median of per-batch ratios (adjacent batches of {b}, robust to drift in machine state): {paired:.2f}×",
                extra={"samples": n_ours, "floor_samples": n_floor, "keys": r["keys"], "paired_batch_ratio": paired}))
    ctx.add(Row(bench, "hit latency p99, same calls", us["ours"][0.99], "µs", us["floor"][0.99], floor_label, None,
                us["ours"][0.99] / us["floor"][0.99], extra={"samples": n_ours, "floor_samples": n_floor}))
    seq = max(r["rates"]["seq"])
    for tasks in PIPELINE_TASKS:
        ctx.add(compare(bench, f"pipelined hits, {tasks} arealize tasks sharing one RemoteFabric (one connection)", max(r["rates"][tasks]), seq,
                        unit="ops/s", other_label="same connection, sequential", goal_op=">=", goal=5.0,
                        seq_rates=r["rates"]["seq"], pipe_rates=r["rates"][tasks], tasks=tasks))
    ctx.add(compare(bench, f"pipelined hits, arealize_many of {MANY_BATCH} requests (one connection, one task; held records in one lookup)", max(r["rates"]["many"]), seq,
                    unit="ops/s", other_label="same connection, sequential", goal_op=">=", goal=5.0,
                    seq_rates=r["rates"]["seq"], pipe_rates=r["rates"]["many"], batch=MANY_BATCH))


# -------------------------------------------------------------- remote-fetch
def _put_artifact(data_dir: str, data: Any) -> Any:
    """Store ``data`` in a node's data dir before the node starts (``RemoteFabric.put`` is not built)."""
    import fabric

    with fabric.open(data_dir, durability="fast") as fab:
        return fab.put(data)


async def _wait_holders(rf: Any, key: Any, want: set[str], timeout: float) -> list[str]:
    import trio

    got: list[str] = []
    with trio.move_on_after(timeout):
        while True:
            got = await rf.aholders(key)
            if want <= set(got):
                break
            await trio.sleep(0.1)
    return got


async def _striped_get(rfs: list[Any], key: Any, per_holder: int = 4) -> bytes:
    """Today's API by hand: the manifest from the first holder, the chunks from every holder at once.

    Each chunk is fetched by its blob key (``aget`` verifies it against the
    key) and the whole against the manifest's digest.
    """
    import blake3
    import trio

    from cassette import codec

    rec = await rfs[0].afetch(key)
    manifest = codec.decode(rec.payload)
    chunks = manifest["chunks"]
    offs = [0]
    for s in manifest["sizes"]:
        offs.append(offs[-1] + s)
    buf = bytearray(manifest["size"])

    async def lane(rf: Any, idx: list[int]) -> None:
        async def one(i: int) -> None:
            data = await rf.aget(chunks[i])
            if len(data) != offs[i + 1] - offs[i]:
                raise AssertionError(f"chunk {i} has {len(data)} bytes, the manifest says {offs[i + 1] - offs[i]}")
            buf[offs[i] : offs[i + 1]] = data

        limit = trio.CapacityLimiter(per_holder)

        async def limited(i: int) -> None:
            async with limit:
                await one(i)

        async with trio.open_nursery() as nursery:
            for i in idx:
                nursery.start_soon(limited, i)

    async with trio.open_nursery() as nursery:
        for h, rf in enumerate(rfs):
            nursery.start_soon(lane, rf, list(range(h, len(chunks), len(rfs))))
    if blake3.blake3(buf).digest() != manifest["digest"]:
        raise AssertionError("striped fetch does not match the manifest digest")
    return bytes(buf) if manifest["dtype"] is None else buf


class _Members:
    """Fresh fleet members for the fetch rounds: each joins a seed lacking the artifact, and is
    stopped and its data dir removed after its one timed fetch."""

    def __init__(self, start: Callable[[str, list[str], str], _Proc], d: str, secret_file: str, gossip: tuple[str, ...]) -> None:
        self.start, self.d, self.secret_file, self.gossip = start, d, secret_file, gossip
        self.n = 0

    async def fetch(self, seed: str, holder_ids: set[str], key: Any, check: Callable[[Any, str], None]) -> tuple[float, float, dict[str, int]]:
        """Seconds of one ``aget(key)`` through a new member joined to ``seed`` once its gossip shows
        exactly ``holder_ids`` and itself live; seconds of a second ``aget`` through it (now a holder:
        the serving part alone); the member's verified bytes fetched per holder."""
        import shutil

        import trio

        import fabric
        from fabric.bench._net import SECRET

        self.n += 1
        name = f"member-{self.n}"
        data = os.path.join(self.d, name)
        m = self.start(name, _node_argv(data, self.secret_file, *self.gossip, "--join", seed), self.d)
        try:
            await trio.to_thread.run_sync(m.wait_listening)
            rf = fabric.open(m.address, secret=SECRET)
            try:
                await _wait_fleet_view(rf, key, holder_ids, _START_S)
                dt, got = await _timed(lambda: rf.aget(key))
                check(got, f"aget through a member fetching from {len(holder_ids)} holder(s)")
                del got
                again, got = await _timed(lambda: rf.aget(key))
                del got
                served = (await rf.astats())["node"].get("peer_fetch_bytes_by_node", {})
            finally:
                rf.close()
        finally:
            await trio.to_thread.run_sync(m.stop)
            shutil.rmtree(data, ignore_errors=True)
        return dt, again, served


async def _wait_fleet_view(rf: Any, key: Any, holder_ids: set[str], timeout: float) -> None:
    """Until the node sees exactly ``holder_ids`` plus itself live and knows them as holders of ``key``."""
    import trio

    want = len(holder_ids) + 1
    live = -1
    with trio.move_on_after(timeout):
        while True:
            live = (await rf.astats())["node"]["members_live"]
            if live == want and holder_ids <= set(await rf.aholders(key)):
                return
            await trio.sleep(0.05)
    raise RuntimeError(f"a fresh member saw {live} live members (want {want}) or not every holder within {timeout:g} s")


async def _fetch_client(ctx: Ctx, size: int, key: Any, digest: str, holders: list[Any], solo: Any, raw_addr: str,
                        members: _Members) -> dict[str, Any]:
    import blake3
    import numpy as np

    import fabric
    from fabric.bench._net import SECRET

    rfs = [fabric.open(h.address, secret=SECRET) for h in holders]
    raw = await _RawClient.connect(raw_addr)
    out: dict[str, Any] = {"served": {"member-2": [], "member-1": []}, "holder_ids": [h.node_id for h in holders]}
    try:
        ids = {h.node_id for h in holders}
        out["gossip_holders"] = sorted(await _wait_holders(rfs[1], key, ids, 15.0))

        def check(got: Any, what: str) -> None:
            view = memoryview(np.ascontiguousarray(got)).cast("B") if not isinstance(got, (bytes, bytearray)) else memoryview(got)
            if view.nbytes != size or blake3.blake3(view).hexdigest() != digest:
                raise AssertionError(f"{what}: fetched bytes do not match the artifact")

        # warm every path once (connections, page cache) and check the bytes
        check(await rfs[0].aget(key), "aget from 1 holder")
        check(await _striped_get(rfs, key), "striped get from 2 holders")
        await raw.bulk(size)

        hasher: list[Any] = [None]

        async def raw_verified() -> None:
            h = hasher[0] = blake3.blake3()
            await raw.bulk(size, h.update)

        async def via_member(seed: Any, holder_ids: set[str], tag: str) -> float:
            dt, again, served = await members.fetch(seed.address, holder_ids, key, check)
            out["served"][tag].append(served)
            if dt > again:  # the fetch part alone: the first aget less the serving that a second one costs
                best[f"{tag}-fetch"] = max(best[f"{tag}-fetch"], size / 2**30 / (dt - again))
            return dt

        contenders: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
            ("aget-1", lambda: rfs[0].aget(key)),
            ("raw", lambda: raw.bulk(size)),
            ("striped-2", lambda: _striped_get(rfs, key)),
            ("raw+blake3", raw_verified),
        ]
        member_rounds = 1 if ctx.quick else 3  # a fresh member (process, gossip join) per timed fetch
        best: dict[str, float] = {name: 0.0 for name, _ in contenders} | {m: 0.0 for m in ("member-2", "member-1", "member-2-fetch", "member-1-fetch")}
        for rnd in range(max(member_rounds, 2 if ctx.quick else 3)):
            for name, fn in contenders:
                dt, got = await _timed(fn)
                del got  # freed outside the clock
                best[name] = max(best[name], size / 2**30 / dt)
            if rnd < member_rounds:
                for tag, seed, holder_ids in (("member-2", holders[0], ids), ("member-1", solo, {solo.node_id})):
                    best[tag] = max(best[tag], size / 2**30 / await via_member(seed, holder_ids, tag))
        out["gib_s"] = best
    finally:
        await raw.aclose()
        for rf in rfs:
            rf.close()
    return out


def bench_remote_fetch(ctx: Ctx) -> None:
    """Verified bulk fetch from 1 holder; a fresh member pulling from 2 holders at once vs 1; by-hand striping."""
    import numpy as np
    import trio

    bench = "remote-fetch"
    size = (16 << 20) if ctx.quick else (256 << 20)
    mib = size >> 20
    with ctx.tempdir("remote-fetch") as d, _procs() as start:
        secret_file = _secret_file(d)
        data = np.random.default_rng(11).integers(0, 255, size=size, dtype=np.uint8)
        refs = [_put_artifact(os.path.join(d, name), data) for name in ("holder-a", "holder-b", "holder-solo")]
        del data
        if len({r.key for r in refs}) != 1:
            raise AssertionError("the same bytes gave different artifact keys")
        ref = refs[0]
        gossip = ("--gossip-interval", "0.3")
        rawp = start("raw", [*_PY, _RAW_MAIN], d)
        a = start("holder-a", _node_argv(os.path.join(d, "holder-a"), secret_file, *gossip), d).wait_listening()
        b = start("holder-b", _node_argv(os.path.join(d, "holder-b"), secret_file, *gossip, "--join", a.address), d)
        # a fleet of its own: a member joined to it has exactly 1 live holder
        solo = start("holder-solo", _node_argv(os.path.join(d, "holder-solo"), secret_file, *gossip), d)
        for p in (b, solo, rawp):
            p.wait_listening()
        members = _Members(start, d, secret_file, gossip)
        r = trio.run(_fetch_client, ctx, size, ref.key, ref.digest, [a, b], solo, rawp.address, members)
    g = r["gib_s"]
    floor_label = "floor: raw trio TCP stream (server subprocess)"
    ctx.add(compare(bench, f"verified fetch, {mib} MiB artifact, 1 holder (aget)", g["aget-1"], g["raw"], unit="GiB/s",
                    other_label=floor_label, size_bytes=size, chunks=ref.chunks))
    ctx.add(compare(bench, f"verified fetch, {mib} MiB artifact, 1 holder (aget)", g["aget-1"], g["raw+blake3"], unit="GiB/s",
                    other_label="floor: raw stream + BLAKE3 of every byte",
                    note="floor + hash: the raw stream plus one single-threaded BLAKE3 pass, the least a verified fetch computes; informational"))
    shares = [_shares(s, r["holder_ids"]) for s in r["served"]["member-2"]]
    ctx.add(compare(bench, f"verified fetch, {mib} MiB artifact, 2 holders in parallel (fabric): aget through a member lacking it",
                    g["member-2"], g["raw"], unit="GiB/s", other_label=floor_label, rounds=len(shares), holder_shares=shares,
                    note="a fresh member per round joins a fleet where 2 nodes hold the artifact; the clock covers its aget: the member "
                         "stripes the missing chunks over both holders (4 in flight each, every chunk verified and stored), records "
                         "the manifest, then streams the artifact to the client; share of chunk bytes per holder: "
                         + "; ".join("/".join(f"{x:.0%}" for x in sh) for sh in shares)))
    ctx.add(compare(bench, f"verified fetch through a fleet member that lacks the artifact, {mib} MiB, 1 holder live", g["member-1"], g["raw"],
                    unit="GiB/s", other_label=floor_label, rounds=len(r["served"]["member-1"]),
                    note="as the 2-holder row, in a fleet where 1 node holds the artifact"))
    ctx.add(compare(bench, f"what a second holder buys: member fetch from 2 holders / from 1, {mib} MiB", g["member-2"], g["member-1"],
                    unit="GiB/s", other_label="same fetch, 1 holder live (same run)",
                    fetch_part_gib_s={"2 holders": g["member-2-fetch"], "1 holder": g["member-1-fetch"]},
                    note="both sides fetch, store and then serve the whole artifact, so the second holder speeds only the fetch part; "
                         "the fetch part alone (first aget less a second aget through the same member, now a holder): "
                         f"{_fmt_rate(g['member-2-fetch'])} from 2 holders, {_fmt_rate(g['member-1-fetch'])} from 1"
                         + (f" ({g['member-2-fetch'] / g['member-1-fetch']:.2f}×)" if g["member-1-fetch"] > 0 and g["member-2-fetch"] > 0 else "")))
    ctx.add(compare(bench, f"2 holders by hand: manifest + blob gets striped over both, {mib} MiB", g["striped-2"], g["raw"], unit="GiB/s",
                    other_label=floor_label, gossip_holders=r["gossip_holders"],
                    note="client-side striping with the public API: afetch of the manifest, then aget of each chunk's blob key alternating between the 2 holders (4 in flight each), every chunk and the whole verified; informational"))


def _fmt_rate(gib_s: float) -> str:
    return f"{gib_s:.3g} GiB/s" if gib_s > 0 else "not measurable (second aget no faster)"


def _shares(served: dict[str, int], holder_ids: list[str]) -> list[float]:
    """Each holder's share of the bytes a member fetched, in ``holder_ids`` order."""
    total = sum(served.get(h, 0) for h in holder_ids) or 1
    return [served.get(h, 0) / total for h in holder_ids]
