"""Local hits: ``Fabric.realize`` answered from this node's cassette.

Floor: what any content-addressed LMDB cache must do for the same hit —
canonical ``msgpack.packb([evaluator, version, args])``, BLAKE3 ``derive_key``,
one LMDB read transaction with one ``get``, ``msgpack.unpackb`` of the stored
reply — and nothing else (no verification, no Request/Reply objects).  Peers:
``diskcache.Cache.memoize`` and ``joblib.Memory`` over the same function, and a
plain dict memo (the in-process ceiling: no hashing, no storage).
"""

from __future__ import annotations

import importlib.util
import zlib

import blake3
import lmdb
import msgpack
import numpy as np

import fabric
from cassette import codec
from cassette.keys import CONTEXTS
from fabric.bench._core import Ctx, Row, best_rates, compare

__all__ = ["bench_hit_1k", "bench_hit_1m"]

NAME_1K = "bench.reply_1k"
NAME_1M = "bench.reply_1m"
VERSION = "1"
_REQ_CTX = CONTEXTS["request"]


@fabric.evaluator(NAME_1K, version=VERSION)
def reply_1k(a: int, b: str, c: float) -> bytes:
    """A deterministic 1 KiB reply."""
    return blake3.blake3(f"{a}|{b}|{c!r}".encode()).digest(length=1024)


@fabric.evaluator(NAME_1M, version=VERSION)
def reply_1m(a: int, b: str, c: float) -> np.ndarray:
    """A deterministic 1 MiB reply: 262,144 float32."""
    raw = blake3.blake3(f"{a}|{b}|{c!r}".encode()).digest(length=1 << 18)
    return np.frombuffer(raw, dtype=np.uint8).astype(np.float32).reshape(512, 512)


def _args(k: int) -> list[dict]:
    """``k`` distinct three-argument requests (an int, a str, a float)."""
    return [{"a": i, "b": f"prompt number {i}: summarise the abstract", "c": 0.25 + i / 1024} for i in range(k)]


def _raw_key(evaluator: str, version: str, args: dict) -> bytes:
    """The floor's request key: canonical packb + derive_key (same digest as ours)."""
    material = msgpack.packb([evaluator, version, dict(sorted(args.items()))], use_bin_type=True)
    return blake3.blake3(material, derive_key_context=_REQ_CTX).digest()


class _Floor:
    """A bare LMDB env holding the same replies under the same digests."""

    def __init__(self, path: str, evaluator: str, args: list[dict], payloads: list[bytes]) -> None:
        total = sum(len(p) for p in payloads)
        self.env = lmdb.open(path, map_size=max(64 << 20, 4 * total), sync=False, metasync=False, readahead=False)
        self.evaluator = evaluator
        with self.env.begin(write=True) as txn:
            for a, p in zip(args, payloads):
                txn.put(_raw_key(evaluator, VERSION, a), p)

    def loop(self, args: list[dict], verify: bool = False):
        env, ev, k = self.env, self.evaluator, len(args)
        packb = msgpack.Packer(use_bin_type=True).pack
        unpackb = msgpack.unpackb
        derive = blake3.blake3
        crc32 = zlib.crc32
        ctx = _REQ_CTX

        def run(n: int) -> None:
            for i in range(n):
                a = args[i % k]
                key = derive(packb([ev, VERSION, dict(sorted(a.items()))]), derive_key_context=ctx).digest()
                with env.begin(buffers=True) as txn:
                    v = txn.get(key)
                    if verify:
                        crc32(v)
                    unpackb(v)

        return run

    def close(self) -> None:
        self.env.close()


def _ours_loop(fab, evaluator: str, args: list[dict]):
    Request = fabric.Request
    k = len(args)

    def run(n: int) -> None:
        for i in range(n):
            fab.realize(Request(evaluator, args[i % k])).value

    return run


def _check_hits(fab, evaluator: str, args: list[dict]) -> None:
    before = fab.local_hits
    for a in args[:8]:
        rep = fab.realize(fabric.Request(evaluator, a))
        if rep.source != "local":
            raise AssertionError(f"expected a local hit, got {rep.source}")
    assert fab.local_hits == before + min(8, len(args))


def bench_hit_1k(ctx: Ctx) -> None:
    """Local-hit realize of a 1 KiB reply vs the raw floor, diskcache, joblib and a dict memo."""
    bench = "local-hit-1k"
    k = 256 if ctx.quick else 2048
    args = _args(k)
    with ctx.tempdir("hit1k") as d:
        fab = fabric.open(f"{d}/ours", durability="fast")  # hits read the same bytes whatever the durability
        try:
            for a in args:
                fab.realize(fabric.Request(NAME_1K, a))
            _check_hits(fab, NAME_1K, args)
            payloads = [codec.encode(reply_1k(**a)) for a in args]
            floor = _Floor(f"{d}/floor", NAME_1K, args, payloads)
            got = fabric.Request(NAME_1K, args[0]).key
            if bytes(got)[1:] != _raw_key(NAME_1K, VERSION, args[0]):
                raise AssertionError("floor key differs from ContentKey.for_request: the floor is not doing our work")
            closers = [floor.close]
            try:
                fns = {"ours": _ours_loop(fab, NAME_1K, args), "floor": floor.loop(args)}
                fns.update(_peers(d, args, closers))
                rates = best_rates(fns, ctx.budget)
            finally:
                for close in closers:
                    close()
        finally:
            fab.close()
    ours = rates["ours"]
    m = "realize hit, 1 KiB reply, 3 args, new Request per call"
    ctx.add(compare(bench, m, ours, rates["floor"], unit="ops/s", other_label="floor: packb+derive_key+LMDB get+unpackb",
                    goal_op=">=", goal=0.5, keys=k))
    if "diskcache" in rates:
        ctx.add(compare(bench, m, ours, rates["diskcache"], unit="ops/s", other_label="peer: diskcache.Cache.memoize", goal_op=">=", goal=5.0))
    else:
        ctx.add(Row(bench, m, ours, "ops/s", other_label="peer: diskcache.Cache.memoize", verdict="skipped", note="diskcache is not installed (pip install evalfabric[bench])"))
    if "joblib" in rates:
        ctx.add(compare(bench, m, ours, rates["joblib"], unit="ops/s", other_label="peer: joblib.Memory.cache"))
    else:
        ctx.add(Row(bench, m, ours, "ops/s", other_label="peer: joblib.Memory.cache", verdict="skipped", note="joblib is not installed (pip install evalfabric[bench])"))
    ctx.add(compare(bench, m, ours, rates["dict"], unit="ops/s", other_label="ceiling: in-process dict memo",
                    note="dict memo: the in-process ceiling (no hashing, no storage, no durability); informational"))


def _peers(d: str, args: list[dict], closers: list) -> dict:
    """Batch functions for the peers that are installed (warmed: every call below is a hit).

    Appends what must be closed afterwards to ``closers``.
    """
    fns = {}
    k = len(args)
    if importlib.util.find_spec("diskcache") is not None:
        import diskcache

        cache = diskcache.Cache(f"{d}/diskcache")
        closers.append(cache.close)
        dc = cache.memoize(name="reply_1k")(reply_1k)
        for a in args:
            dc(**a)

        def run_dc(n: int) -> None:
            for i in range(n):
                dc(**args[i % k])

        fns["diskcache"] = run_dc
    if importlib.util.find_spec("joblib") is not None:
        import joblib

        mem = joblib.Memory(f"{d}/joblib", verbose=0)
        jl = mem.cache(reply_1k)
        kj = min(k, 64)  # joblib hits cost milliseconds: warm fewer keys
        for a in args[:kj]:
            jl(**a)

        def run_jl(n: int) -> None:
            for i in range(n):
                jl(**args[i % kj])

        fns["joblib"] = run_jl
    memo: dict = {}

    def memoized(**kw):
        key = tuple(sorted(kw.items()))
        v = memo.get(key)
        if v is None:
            v = memo[key] = reply_1k(**kw)
        return v

    for a in args:
        memoized(**a)

    def run_dict(n: int) -> None:
        for i in range(n):
            memoized(**args[i % k])

    fns["dict"] = run_dict
    return fns


def bench_hit_1m(ctx: Ctx) -> None:
    """Local-hit realize of a 1 MiB numpy reply vs the raw floor (and the floor plus a CRC-32 check)."""
    bench = "local-hit-1m"
    k = 8 if ctx.quick else 32
    args = _args(k)
    with ctx.tempdir("hit1m") as d:
        fab = fabric.open(f"{d}/ours", durability="fast")
        try:
            for a in args:
                fab.realize(fabric.Request(NAME_1M, a))
            _check_hits(fab, NAME_1M, args)
            payloads = [codec.encode(reply_1m(**a)) for a in args]
            floor = _Floor(f"{d}/floor", NAME_1M, args, payloads)
            try:
                rates = best_rates(
                    {"ours": _ours_loop(fab, NAME_1M, args), "floor": floor.loop(args), "floor+verify": floor.loop(args, verify=True)},
                    ctx.budget,
                )
            finally:
                floor.close()
        finally:
            fab.close()
    m = "realize hit, 1 MiB numpy reply"
    mib = 1 << 20
    ctx.add(compare(bench, m, rates["ours"], rates["floor"], unit="ops/s", other_label="floor: packb+derive_key+LMDB get+unpackb",
                    ours_gib_s=rates["ours"] * mib / 2**30, floor_gib_s=rates["floor"] * mib / 2**30,
                    note="issue 6 asks for this measure without a goal (issue 3's ≥ 0.5× is for the 1 KiB reply); "
                         "the gap is the CRC-32 every hit checks over the whole stored row (next row)"))
    ctx.add(compare(bench, m, rates["ours"], rates["floor+verify"], unit="ops/s", other_label="floor + CRC-32 of the value",
                    note="floor + check: the floor plus one CRC-32 pass over the stored value, the integrity check our hit path makes on every read; informational"))
