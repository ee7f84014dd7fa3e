"""Prometheus metrics, all named ``fabric_*`` (default registry).

Local cache hits are the hot path and must not take a lock, so they are plain
per-fabric counters that :class:`_HitCollector` reads at scrape time; everything
else is an ordinary prometheus_client metric.
"""

from __future__ import annotations

import weakref
from typing import Iterator

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

__all__ = [
    "MISSES",
    "SOURCE_HITS",
    "LATENCY",
    "ERRORS",
    "RETRIES",
    "COALESCED",
    "EVALUATOR_RUNS",
    "GOSSIP_ROUNDS",
    "GOSSIP_BYTES",
    "GOSSIP_FACTS",
    "PEER_FETCH_BYTES",
    "LAYOUT_MISMATCH",
    "CORRUPT_READS",
    "DETERMINISM_VIOLATIONS",
    "track_fabric",
    "snapshot",
]

SOURCE_HITS = Counter("fabric_cache_source_hits", "Replies served from a peer or a fresh computation", ["source"])
MISSES = Counter("fabric_cache_misses", "Lookups the local cassette could not answer")
LATENCY = Histogram(
    "fabric_operation_latency_seconds",
    "Latency of fabric operations that leave the local hit path",
    ["op"],
    buckets=(0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30),
)
ERRORS = Counter("fabric_operation_errors", "Operations that failed, by status", ["op", "status"])
RETRIES = Counter("fabric_operation_retries", "Retries taken by the retry helper", ["op", "status"])
COALESCED = Counter("fabric_singleflight_coalesced", "Realizes that waited on an identical in-flight one")
EVALUATOR_RUNS = Counter("fabric_evaluator_runs", "Evaluator invocations on this process", ["evaluator"])
GOSSIP_ROUNDS = Counter("fabric_gossip_rounds", "Gossip rounds run")
GOSSIP_BYTES = Counter("fabric_gossip_bytes", "Gossip bytes sent")
GOSSIP_FACTS = Counter("fabric_gossip_facts", "Holding facts learned from peers")
PEER_FETCH_BYTES = Counter("fabric_peer_fetch_bytes", "Verified bytes fetched from peers")
LAYOUT_MISMATCH = Counter("fabric_layout_mismatch", "get_into calls that fell back to a staged copy")
CORRUPT_READS = Counter("fabric_corrupt_reads", "Stored rows that failed their hash and read as a miss")
DETERMINISM_VIOLATIONS = Counter("fabric_determinism_violations", "Keys whose holders claim different digests")
CONNECTIONS = Gauge("fabric_peer_connections", "Open authenticated peer connections")

_fabrics: "weakref.WeakSet" = weakref.WeakSet()


def track_fabric(fab) -> None:
    """Include ``fab``'s lock-free hit counter and ledger size in scrapes."""
    _fabrics.add(fab)


class _HitCollector:
    def collect(self) -> Iterator:
        hits = CounterMetricFamily("fabric_cache_hits", "Replies served from the local cassette", labels=["source"])
        hits.add_metric(["local"], sum(f.local_hits for f in list(_fabrics)))
        yield hits
        recs = GaugeMetricFamily("fabric_ledger_records", "Records indexed in open cassettes", labels=["node"])
        nbytes = GaugeMetricFamily("fabric_ledger_bytes", "Ledger bytes in open cassettes", labels=["node"])
        for f in list(_fabrics):
            try:
                st = f.cassette.stats()
            except Exception:  # noqa: BLE001 - a closed cassette is skipped, not fatal to a scrape
                continue
            recs.add_metric([st["node_id"]], st["records"])
            nbytes.add_metric([st["node_id"]], st["ledger_bytes"])
        yield recs
        yield nbytes


REGISTRY.register(_HitCollector())


def snapshot() -> dict[str, float]:
    """Every ``fabric_*`` sample as ``{"name{labels}": value}`` (for ``fabric stats``)."""
    out: dict[str, float] = {}
    for fam in REGISTRY.collect():
        if not fam.name.startswith("fabric_"):
            continue
        for s in fam.samples:
            if s.name.endswith("_created"):
                continue
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out
