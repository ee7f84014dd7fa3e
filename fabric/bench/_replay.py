"""Replay: seed an empty node from an exported ledger file (``Cassette.from_ledger``).

Ours: validate the whole file, append every record (verified), rebuild the
index, close.  Floor: a raw LMDB cursor scan over the same ledger DB (the
least any replay must read), and the same scan plus one BLAKE3 pass per row
(the least a *verifying* replay must compute).
"""

from __future__ import annotations

import os
import time

import blake3
import lmdb

from cassette.keys import ContentKey
from cassette.record import pack_record
from cassette.store import Cassette
from fabric.bench._core import Ctx, compare

__all__ = ["bench_replay", "build_source"]

PAYLOAD_SIZE = 64
_BATCH = 4096


def build_source(path: str, n: int) -> None:
    """A cassette at ``path`` holding ``n`` records (64-byte payloads), written in group commits."""
    now = time.time()
    with Cassette(path, durability="fast", map_size=max(64 << 20, n * 600)) as cas:
        for start in range(0, n, _BATCH):
            values = []
            for i in range(start, min(n, start + _BATCH)):
                seed = i.to_bytes(8, "big")
                key = ContentKey("request", blake3.blake3(b"replay-key" + seed).digest())
                payload = blake3.blake3(seed).digest(length=PAYLOAD_SIZE)
                values.append(pack_record(key, payload, evaluator="bench.replay", version="1", created=now, compute_s=0.001, node=cas.node_id))
            cas.put_raw_many(values)


def _scan(path: str, verify: bool) -> int:
    env = lmdb.open(path, readonly=True, lock=False, max_dbs=8, subdir=True, readahead=False)
    try:
        db = env.open_db(b"ledger", create=False)
        n = 0
        with env.begin(buffers=True) as txn:
            if verify:
                for _, v in txn.cursor(db=db):
                    blake3.blake3(v[32:]).digest()
                    n += 1
            else:
                for _, v in txn.cursor(db=db):
                    len(v)
                    n += 1
        return n
    finally:
        env.close()


def bench_replay(ctx: Ctx) -> None:
    """Records/s of ``from_ledger`` into an empty directory vs raw cursor scans."""
    bench = "replay"
    n = 20_000 if ctx.quick else 1_000_000
    with ctx.tempdir("replay") as d:
        src, dst, ledger = f"{d}/src", f"{d}/dst", f"{d}/ledger.evf"
        t0 = time.perf_counter()
        build_source(src, n)
        build_s = time.perf_counter() - t0
        with Cassette(src) as cas:
            t0 = time.perf_counter()
            exported = cas.export(ledger)
            export_s = time.perf_counter() - t0
        if exported != n:
            raise AssertionError(f"exported {exported} records, expected {n}")
        file_bytes = os.path.getsize(ledger)
        # floors first (page cache warm for both sides: the export just read every row)
        t0 = time.perf_counter()
        scanned = _scan(src, verify=False)
        scan_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        _scan(src, verify=True)
        scan_verify_s = time.perf_counter() - t0
        if scanned != n:
            raise AssertionError(f"scanned {scanned} rows, expected {n}")
        t0 = time.perf_counter()
        cas = Cassette.from_ledger(dst, ledger)
        try:
            records = cas.stats()["records"]
        finally:
            cas.close()
        replay_s = time.perf_counter() - t0
        if records != n:
            raise AssertionError(f"replayed {records} records, expected {n}")
    m = f"replay {n:,} records (export file → empty dir)"
    ours = n / replay_s
    ctx.add(compare(bench, m, ours, n / scan_s, unit="rec/s", other_label="floor: raw LMDB cursor scan",
                    replay_s=replay_s, scan_s=scan_s, export_s=export_s, build_s=build_s, file_bytes=file_bytes, records=n))
    ctx.add(compare(bench, m, ours, n / scan_verify_s, unit="rec/s", other_label="floor: cursor scan + BLAKE3 per row",
                    note=f"replay {replay_s:.2f} s; export of the same ledger {export_s:.2f} s ({n / export_s:,.0f} rec/s); ledger file {file_bytes / 2**20:.1f} MiB; informational (no goal set)"))
