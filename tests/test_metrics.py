"""fabric_* metrics: each family moves by exactly what one operation should move it by.

Samples are read from prometheus_client's REGISTRY (this process) or, for a node
subprocess, from its own REGISTRY as its stats answer carries it (``metrics``).
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import REGISTRY

import fabric
from fabric import metrics

from _nodes import SECRET, node

HITS = ("fabric_cache_hits_total", "fabric_cache_misses_total")


def _samples(prefixes: tuple[str, ...]) -> dict[str, float]:
    return {k: v for k, v in metrics.snapshot().items() if k.startswith(prefixes)}


def _delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """The samples that moved, and by how much."""
    keys = set(before) | set(after)
    moved = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in keys}
    return {k: d for k, d in moved.items() if d}


def _moves(prefixes: tuple[str, ...], fn: Callable[[], object], read: Callable[[], dict[str, float]] | None = None) -> dict[str, float]:
    read = read or (lambda: _samples(prefixes))
    before = read()
    fn()
    return _delta(before, read())


@fabric.evaluator("m.double", version="1")
def double(x: int) -> int:
    return 2 * x


# ------------------------------------------------------------------ cache answers
def test_an_embedded_miss_counts_one_miss_and_a_hit_one_local_hit(tmp_path):
    with fabric.open(tmp_path / "c") as fab:
        req = fabric.Request("m.double", {"x": 21})
        assert _moves(HITS, lambda: fab.realize(req)) == {"fabric_cache_misses_total": 1}
        assert _moves(HITS, lambda: fab.realize(req)) == {'fabric_cache_hits_total{source="local"}': 1}
    # the two sources are one family, whose peer sample exists before any peer hit
    assert REGISTRY.get_sample_value("fabric_cache_hits_total", {"source": "peer"}) is not None
    assert REGISTRY.get_sample_value("fabric_cache_source_hits_total", {"source": "computed"}) is None


def test_a_relay_counts_what_its_upstream_answered_as_one_peer_hit(tmp_path):
    req = fabric.Request("linalg.spectrum", {"seed": 5, "n": 8}, version="1")
    with node(tmp_path, "upstream") as (up, _, _), node(tmp_path, "relay", "--relay", up) as (relay, _, _):
        with fabric.open(relay, secret=SECRET) as f:
            def node_hits() -> dict[str, float]:
                return {k: v for k, v in f.stats()["node"]["metrics"].items() if k.startswith(HITS)}

            first = _moves(HITS, lambda: f.realize(req), node_hits)
            second = _moves(HITS, lambda: f.realize(req), node_hits)
    assert first == {'fabric_cache_hits_total{source="peer"}': 1}
    assert second == {'fabric_cache_hits_total{source="local"}': 1}
