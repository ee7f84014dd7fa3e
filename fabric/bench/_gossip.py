"""Gossip: rounds to full dissemination, anti-entropy cost in sync, catch-up cost.

Every number comes from a run of the deterministic in-memory simulator
(``gossip.sim``: virtual clock, real wire encoding for byte counts, fixed
seed), through its measurement helpers ``dissemination_rounds``,
``anti_entropy_bytes`` and ``catchup_bytes``.  Rows say "not built" while the
simulator or a helper is missing; nothing is estimated.

* dissemination: rounds until a fact added at one node is known by all N
  nodes (fanout 3, 5 % loss), against the bound ``2·log2(N)``; ratio =
  rounds / bound, goal ≤ 1.
* anti-entropy in sync: bytes per round per node when every node already holds
  the same K facts; ratio = bytes at the large K / bytes at 10k keys, goal ≤ 1.1
  (cost independent of how many keys exist).
* catch-up: bytes for one node to learn d facts it lacks, against the floor of
  d packed fact records (65 B each: key + digest); the O(d) check compares bytes
  per fact at the largest d with bytes per fact at d = 1k, goal ≤ 1.1.
"""

from __future__ import annotations

import importlib
import importlib.util
import math

from fabric.bench._core import NOT_BUILT, Ctx, Row

__all__ = ["bench_gossip"]

_HELPERS = ("dissemination_rounds", "anti_entropy_bytes", "catchup_bytes")


def _sim():
    try:
        if importlib.util.find_spec("gossip.sim") is None:
            return None
    except ImportError:
        return None
    return importlib.import_module("gossip.sim")


def bench_gossip(ctx: Ctx) -> None:
    """Rounds, in-sync bytes growth and catch-up bytes from ``gossip.sim``."""
    sim = _sim()
    missing = [h for h in _HELPERS if sim is None or not callable(getattr(sim, h, None))]
    if missing:
        why = "gossip.sim is not built yet" if sim is None else f"gossip.sim has no {', '.join(missing)}"
        for i, m in enumerate(("rounds to full dissemination (1k, 10k nodes)", "anti-entropy bytes in sync, 10k → 1M keys", "catch-up bytes for d = 10, 1k, 100k missing facts")):
            ctx.add(Row("gossip", m, verdict=NOT_BUILT, note=why if i == 0 else ""))
        return
    bench = "gossip"
    # -- dissemination
    for n in ((1000,) if ctx.quick else (1000, 10_000)):
        rounds = sim.dissemination_rounds(n, fanout=3, loss=0.05, seed=1)
        bound = 2 * math.log2(n)
        ctx.add(Row(bench, f"rounds to full dissemination, {n:,} nodes (fanout 3, 5% loss)", rounds, "rounds",
                    bound, "bound: 2·log2(N)", None, rounds / bound, "<=", 1.0, extra={"nodes": n}))
    if ctx.quick:
        ctx.add(Row(bench, "rounds to full dissemination, 10,000 nodes", verdict="skipped", note="10k-node dissemination runs in the full bench only (about 6 s)"))
    # -- anti-entropy in sync
    small, large = 10_000, (100_000 if ctx.quick else 1_000_000)
    b_small = sim.anti_entropy_bytes(small)
    b_large = sim.anti_entropy_bytes(large)
    ratio = b_large / b_small if b_small > 0 else math.inf
    ctx.add(Row(bench, f"anti-entropy bytes/round/node in sync, {small // 1000}k → {large:,} keys", b_large, "B", b_small,
                f"same at {small // 1000}k keys", None, ratio, "<=", 1.1, extra={"small_keys": small, "large_keys": large},
                note="" if not ctx.quick else "quick size grows to 100k keys; the full bench grows to 1M"))
    # -- catch-up
    record = getattr(importlib.import_module("gossip.holding"), "RECORD_SIZE", 65)
    ds = (10, 1000, 10_000) if ctx.quick else (10, 1000, 100_000)
    per_fact = {}
    for d in ds:
        nbytes = sim.catchup_bytes(d)
        per_fact[d] = nbytes / d
        ctx.add(Row(bench, f"catch-up bytes, d = {d:,} missing facts", nbytes, "B", d * record, f"floor: d × {record} B records", None,
                    nbytes / (d * record), extra={"d": d}))
    big = ds[-1]
    growth = per_fact[big] / per_fact[1000]
    ctx.add(Row(bench, f"catch-up is O(d): bytes/fact at d = {big:,} vs d = 1,000", per_fact[big], "B/fact", per_fact[1000],
                "at d = 1,000", None, growth, "<=", 1.1))
