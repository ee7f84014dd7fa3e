"""``fabric bench``: every figure of ours next to a floor or a peer measured in the same run.

A *floor* is the raw libraries doing the least work that could answer the same
question (msgpack + BLAKE3 + one LMDB get for a hit; one sync LMDB transaction
per durable put; a cursor scan for a replay; a pinned ``memcpy`` for a GPU
copy).  A *peer* is another library doing the same job (diskcache, joblib).
Each row prints ours, the floor/peer, their ratio, the goal and a verdict
(``meets`` / ``misses``).  Verdicts are information for engineers, never an
exit failure; the run fails only if a benchmark itself breaks.

``fabric bench [--quick] [--json FILE] [--only NAME ...] [--data DIR]``:
``--quick`` runs small sizes (seconds); ``--only`` keeps benchmarks whose name
contains any of the given strings; ``--data`` puts the scratch stores under
DIR (default: the system temp dir); every store is removed afterwards.

Benchmarks (``--only`` names): ``local-hit-1k``, ``local-hit-1m``,
``durable-write``, ``replay``, ``gossip``, ``net`` (the wire in one
process), ``remote-hit`` and ``remote-fetch`` (real ``fabric node``
subprocesses; ``--only remote`` runs both), ``gpu-materialize``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any, Callable, Sequence

from cassette.ledgerfile import check_write_target
from fabric.bench._core import ERROR, Ctx, Row, render, rows_to_json

__all__ = ["main", "run", "BENCHMARKS", "Row"]

log = logging.getLogger("fabric.bench")


def _hit_1k(ctx: Ctx) -> None:
    from fabric.bench._local import bench_hit_1k

    bench_hit_1k(ctx)


def _hit_1m(ctx: Ctx) -> None:
    from fabric.bench._local import bench_hit_1m

    bench_hit_1m(ctx)


def _durable(ctx: Ctx) -> None:
    from fabric.bench._durable import bench_durable

    bench_durable(ctx)


def _replay(ctx: Ctx) -> None:
    from fabric.bench._replay import bench_replay

    bench_replay(ctx)


def _gossip(ctx: Ctx) -> None:
    from fabric.bench._gossip import bench_gossip

    bench_gossip(ctx)


def _net(ctx: Ctx) -> None:
    from fabric.bench._net import bench_net

    bench_net(ctx)


def _remote_hit(ctx: Ctx) -> None:
    from fabric.bench._remote import bench_remote_hit

    bench_remote_hit(ctx)


def _remote_fetch(ctx: Ctx) -> None:
    from fabric.bench._remote import bench_remote_fetch

    bench_remote_fetch(ctx)


def _gpu(ctx: Ctx) -> None:
    from fabric.bench._gpu import bench_gpu

    bench_gpu(ctx)


#: ``(name, function)`` in run order; ``--only`` matches substrings of the name.
BENCHMARKS: list[tuple[str, Callable[[Ctx], None]]] = [
    ("local-hit-1k", _hit_1k),
    ("local-hit-1m", _hit_1m),
    ("durable-write", _durable),
    ("replay", _replay),
    ("gossip", _gossip),
    ("net", _net),
    ("remote-hit", _remote_hit),
    ("remote-fetch", _remote_fetch),
    ("gpu-materialize", _gpu),
]


def selected(only: Sequence[str] | None) -> list[tuple[str, Callable[[Ctx], None]]]:
    """The benchmarks ``--only`` keeps (all when it is empty)."""
    if not only:
        return list(BENCHMARKS)
    return [(n, f) for n, f in BENCHMARKS if any(o in n for o in only)]


def run(*, quick: bool = False, only: Sequence[str] | None = None, base_dir: str | None = None,
        progress: Callable[[str], None] | None = None) -> list[Row]:
    """Run the selected benchmarks; returns their rows (a broken benchmark gives an ``error`` row)."""
    return _run(quick=quick, only=only, base_dir=base_dir, progress=progress).rows


def _run(*, quick: bool, only: Sequence[str] | None, base_dir: str | None, progress: Callable[[str], None] | None) -> Ctx:
    ctx = Ctx(quick=quick, base_dir=base_dir)
    for name, fn in selected(only):
        if progress is not None:
            progress(name)
        start = len(ctx.rows)
        t0 = time.perf_counter()
        try:
            fn(ctx)
        except Exception as exc:  # noqa: BLE001 - one broken benchmark must not hide the others
            log.exception("benchmark %s failed", name)
            del ctx.rows[start:]
            ctx.add(Row(name, "benchmark failed", verdict=ERROR, note=f"{name}: {type(exc).__name__}: {exc}"))
        ctx.timings[name] = round(time.perf_counter() - t0, 3)
    return ctx


def main(args: Any) -> int:
    """``fabric bench``: print the table; exit 0 unless a benchmark broke (1) or the selection is empty (2)."""
    from rich.console import Console

    quick = bool(getattr(args, "quick", False))
    only = list(getattr(args, "only", None) or [])
    json_path = getattr(args, "json", None)
    base_dir = getattr(args, "data", None)
    console = Console() if Console().is_terminal else Console(width=160)
    err = Console(stderr=True)
    if not selected(only):  # one plain line (a rich console would wrap it at 80 columns)
        names = ", ".join(n for n, _ in BENCHMARKS)
        print(f"fabric bench: error: INVALID_ARGUMENT: --only {' '.join(only)} matches no benchmark; names: {names}",
              file=sys.stderr)
        return 2
    if json_path:  # before minutes of benchmarking, not after
        json_path = check_write_target(json_path, what="JSON file")
    t0 = time.perf_counter()
    with err.status("benchmarking…") as status:
        ctx = _run(quick=quick, only=only, base_dir=base_dir, progress=lambda n: status.update(f"benchmarking {n}…"))
    rows = ctx.rows
    elapsed = time.perf_counter() - t0
    render(rows, title=f"fabric bench{' --quick' if quick else ''} ({os.cpu_count()} CPUs, {elapsed:.1f} s)", console=console)
    if json_path:
        doc = rows_to_json(rows, quick=quick, elapsed_s=elapsed)
        doc["benchmark_s"] = ctx.timings
        tmp = f"{json_path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
        os.replace(tmp, json_path)
        console.print(f"wrote {json_path}", highlight=False)
    return 1 if any(r.verdict == ERROR for r in rows) else 0
