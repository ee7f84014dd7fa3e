"""Durable record throughput: ``Cassette.put`` (durability ``sync``) from 1 and 16 threads.

Floor: raw LMDB opened with ``sync=True``, one write transaction (so one
durable commit) per put, driven by the same threads.  Peer: ``diskcache``
``Cache.set`` from the same 16 threads, both with SQLite ``synchronous=FULL``
(durable on power loss, like ours) and with diskcache's default
``synchronous=NORMAL`` in WAL mode (a committed set may roll back on power
loss: comparable to our ``durability="fast"``).
"""

from __future__ import annotations

import importlib.util
import statistics

import blake3
import lmdb

from cassette.keys import ContentKey
from cassette.store import Cassette
from fabric.bench._core import Ctx, Row, compare, threaded_rate

__all__ = ["bench_durable"]

PAYLOAD = bytes(range(256)) * 4  # 1 KiB reply payload


def _key(i: int, salt: bytes) -> ContentKey:
    return ContentKey("request", blake3.blake3(salt + i.to_bytes(8, "big")).digest())


def _ours(path: str, durability: str = "sync"):
    cas = Cassette(path, durability=durability, map_size=256 << 20)
    salt = path.encode()

    def op(i: int) -> None:
        cas.put(_key(i, salt), PAYLOAD, evaluator="bench.durable", version="1")

    return op, cas.close


def _floor(path: str):
    env = lmdb.open(path, map_size=256 << 20, sync=True, metasync=True, readahead=False, max_readers=64)
    salt = path.encode()

    def op(i: int) -> None:
        with env.begin(write=True) as txn:
            txn.put(bytes(_key(i, salt)), PAYLOAD)

    return op, env.close


def _diskcache(path: str, synchronous: int):
    import diskcache

    cache = diskcache.Cache(path, sqlite_synchronous=synchronous)
    salt = path.encode()

    def op(i: int) -> None:
        cache.set(bytes(_key(i, salt)), PAYLOAD)

    return op, cache.close


def bench_durable(ctx: Ctx) -> None:
    """Group-committed durable puts vs one sync transaction per put, and vs diskcache."""
    bench = "durable-write"
    duration = 0.2 if ctx.quick else 1.0
    rounds = 1 if ctx.quick else 3
    have_dc = importlib.util.find_spec("diskcache") is not None
    contenders: list[tuple[str, int, object]] = [
        ("ours", 1, lambda d: _ours(d)),
        ("floor", 1, _floor),
        ("ours", 16, lambda d: _ours(d)),
        ("floor", 16, _floor),
        ("ours-fast", 16, lambda d: _ours(d, "fast")),
    ]
    if have_dc:
        contenders += [("dc-full", 16, lambda d: _diskcache(d, 2)), ("dc-normal", 16, lambda d: _diskcache(d, 1))]
    results: dict[tuple[str, int], list[float]] = {}
    for r in range(rounds):
        for name, threads, make in contenders:
            with ctx.tempdir(f"dur-{name}") as d:
                op, close = make(d)  # type: ignore[operator]
                try:
                    op(10_000_000 + r)  # warm: first commit creates the DBs
                    results.setdefault((name, threads), []).append(threaded_rate(op, threads, duration))
                finally:
                    close()
    rate = {k: statistics.median(v) for k, v in results.items()}
    floor_label = "floor: raw LMDB, 1 sync txn per put"
    ctx.add(compare(bench, "durable put (sync), 1 KiB, 1 thread", rate["ours", 1], rate["floor", 1], unit="puts/s", other_label=floor_label))
    ctx.add(compare(bench, "durable put (sync), 1 KiB, 16 threads", rate["ours", 16], rate["floor", 16], unit="puts/s", other_label=floor_label, goal_op=">=", goal=10.0))
    if have_dc:
        ctx.add(compare(bench, "durable put (sync), 1 KiB, 16 threads", rate["ours", 16], rate["dc-full", 16], unit="puts/s",
                        other_label="peer: diskcache set, synchronous=FULL", goal_op=">=", goal=5.0,
                        note="diskcache with SQLite synchronous=FULL: durable on power loss, the like-for-like peer of durability='sync'"))
        ctx.add(compare(bench, "durable put (sync), 1 KiB, 16 threads", rate["ours", 16], rate["dc-normal", 16], unit="puts/s",
                        other_label="peer: diskcache set, default (WAL, NORMAL)",
                        note="diskcache defaults (WAL, synchronous=NORMAL) do not fsync each commit: a set may roll back on power loss; informational"))
        ctx.add(compare(bench, "put (durability=fast), 1 KiB, 16 threads", rate["ours-fast", 16], rate["dc-normal", 16], unit="puts/s",
                        other_label="peer: diskcache set, default (WAL, NORMAL)"))
    else:
        ctx.add(Row(bench, "durable put (sync), 1 KiB, 16 threads", rate["ours", 16], "puts/s", other_label="peer: diskcache set",
                    verdict="skipped", note="diskcache is not installed (pip install evalfabric[bench])"))
