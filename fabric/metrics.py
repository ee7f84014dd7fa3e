"""Prometheus metrics, all named ``fabric_*`` (default registry).

Cache answers.  Every realize a fabric owning a cassette answers (embedded, or a
node for its clients) is counted exactly once, by where the answer came from:

* ``fabric_cache_hits_total{source="local"}``: from this fabric's own cassette;
* ``fabric_cache_hits_total{source="peer"}``: recorded here from another node
  that held it (a fleet holder, the key's home answering from its cassette, a
  relay's upstream);
* ``fabric_cache_misses_total``: answered by a computation — run here, or at
  the key's home for a fleet member that forwarded the request (each node
  counts the realize it answered; ``fabric_evaluator_runs_total{evaluator}``
  counts the evaluator calls this process made).

A request that waited on an identical in-flight one is counted as the answer it
got, plus ``fabric_singleflight_coalesced_total``.  A :class:`fabric.remote.RemoteFabric`
client counts none of these (its node does).

Local hits are the hot path and must not take a lock, so they are plain
per-fabric counters (``Fabric.local_hits``) that :class:`_HitCollector` reads at
scrape time, adding them to the peer hits of an ordinary counter.

Operations.  ``fabric_operation_latency_seconds{op}`` and
``fabric_operation_errors_total{op,status}`` cover every call of the public
API that leaves the local-hit path, one observation per outermost public call
(:func:`observed`; a public method calling another is not counted twice):

* embedded :class:`fabric.local.Fabric`: ``realize`` (its misses: a local hit
  is counted above but not timed, since a clock read and a histogram update
  would double its ~9 µs), ``put``, ``get``, ``get_into``, ``artifact_stream``,
  ``holders``, ``verify``, ``export``, ``replay`` (``realize_many`` is
  ``realize`` per request);
* :class:`fabric.remote.RemoteFabric`: every public call, hits included (each
  is a round trip): ``realize`` (``arealize``, ``arealize_record``),
  ``realize_many``, ``fetch``, ``get``, ``get_into``, ``artifact_stream``,
  ``put``, ``holders``, ``stats``, ``verify``, ``export``, ``replay``;
* a node, per wire op its async handler runs: ``op="node_OP"`` (``node_realize``,
  ``node_get``, ``node_put``, ...; an op name it does not know is ``node_other``).
  Requests the node answers inline (realize hits, small fetches, ``holders``,
  ``lookup``) are not timed; their faults are counted.

An error's ``status`` is the :class:`~cassette.errors.StatusCode` name of the
``FabricError`` that reached the caller (or that a node answered as a fault),
with one addition: ``EVALUATOR``, an evaluator's own exception (embedded: any
non-``FabricError`` out of a realize; a node's INTERNAL fault "evaluator raised
..." and what a client re-raises from it).  It is not gRPC's ``UNKNOWN``:
evalfabric's codes have no UNKNOWN, and an evaluator failing is the caller's
code failing, never retried, which a dashboard wants apart from the fabric's
own faults.  Any other non-``FabricError`` (a bug) counts as ``INTERNAL``, as a
node reports one.  Cancellation is not an error.

The other families:

* ``fabric_operation_retries_total{op,status}``: each retry the retry helper
  (:mod:`fabric.errors`) takes, ``op`` as in the latency and errors of the public
  call retrying (a ``holders`` call retried under the ``get`` policy is ``holders``),
  ``status`` the retried error's code;
* ``fabric_singleflight_coalesced_total``: realizes that waited on an identical
  in-flight one instead of computing or fetching it again (embedded, and a node's
  clients waiting on one fetch, forward or relay);
* ``fabric_evaluator_runs_total{evaluator}``: evaluator calls this process made;
* ``fabric_gossip_rounds_total``, ``fabric_gossip_bytes_total`` (gossip payload
  bytes sent), ``fabric_gossip_facts_total`` (holding facts learned from peers):
  a node's gossip, exported from its gossip counters every second;
* ``fabric_peer_fetch_bytes_total``: verified record and chunk bytes a node received
  from other members: from holders, and the record a home answered a forwarded realize
  with (a relay's upstream is not a member: not counted);
* ``fabric_layout_mismatch_total``: ``get_into`` calls whose target took a staged
  copy (the process that filled it: for a node's client, the client);
* ``fabric_corrupt_reads_total``, ``fabric_determinism_violations_total``,
  ``fabric_peer_connections`` (gauge);
* ``fabric_ledger_records{node}``, ``fabric_ledger_bytes{node}`` (gauges): records
  indexed and ledger bytes of each cassette open in this process, read from the
  cassette at scrape time (so they survive a restart), one sample per cassette
  (:data:`CASSETTE_FAMILIES`; every other family counts this process's work).

Reading a snapshot.  :func:`histograms` folds a :func:`snapshot` (or the ``metrics`` of
a node's stats answer) into one :class:`HistogramSeries` per histogram series, with
count, sum and p50/p99 estimated from the buckets (``fabric stats`` shows those rows
instead of every bucket).
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import math
import os
import re
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, TypeVar

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

__all__ = [
    "PEER_HITS",
    "MISSES",
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
    "EVALUATOR",
    "track_fabric",
    "retire_fabric",
    "current_op",
    "count_answer",
    "count_error",
    "error_status",
    "observed",
    "snapshot",
    "CASSETTE_FAMILIES",
    "HistogramSeries",
    "histograms",
]

#: Peer hits: not registered on its own; :class:`_HitCollector` exports it as
#: ``fabric_cache_hits_total{source="peer"}`` next to the lock-free local hits.
PEER_HITS = Counter("fabric_cache_hits", "Realizes answered from another node's record", registry=None)
MISSES = Counter("fabric_cache_misses", "Realizes answered by a computation (here, or at the key's home)")
LATENCY = Histogram(
    "fabric_operation_latency_seconds",
    "Latency of public operations that leave the local hit path, and of a node's async wire ops",
    ["op"],
    buckets=(0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30),
)
ERRORS = Counter("fabric_operation_errors", "Operations that ended in an error, by op and status", ["op", "status"])
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

#: The ``status`` of an evaluator's own (non-FabricError) exception.
EVALUATOR = "EVALUATOR"

_fabrics: "weakref.WeakSet" = weakref.WeakSet()
#: Guards :data:`_fabrics` with :data:`_retired_hits`: a fabric's hits move from one to the other at once.
#: Reentrant: a garbage collection inside a scrape may retire a fabric on the same thread.
_fabrics_lock = threading.RLock()
#: Local hits of fabrics already collected (kept, so the counter never goes down).
_retired_hits = 0


def _after_fork_in_child() -> None:
    """A forked child makes :data:`_fabrics_lock` anew: a parent thread may have held it at
    the fork, and the child's copy would stay held forever (a new fabric there hung)."""
    global _fabrics_lock
    _fabrics_lock = threading.RLock()


os.register_at_fork(after_in_child=_after_fork_in_child)

#: The op of the outermost public call in progress in this context (None outside one).
_CALL: contextvars.ContextVar[str | None] = contextvars.ContextVar("fabric_metrics_call", default=None)

F = TypeVar("F", bound=Callable[..., Any])


def track_fabric(fab) -> None:
    """Include ``fab``'s lock-free hit counter and ledger size in scrapes."""
    with _fabrics_lock:
        _fabrics.add(fab)


def retire_fabric(fab) -> None:
    """``fab`` is going away (its ``__del__``): keep its local hits in
    ``fabric_cache_hits_total{source="local"}``, which must never go down, and stop scraping it."""
    global _retired_hits
    with _fabrics_lock:
        _retired_hits += getattr(fab, "local_hits", 0)
        _fabrics.discard(fab)


def current_op() -> str | None:
    """The op of the outermost :func:`observed` public call in progress here, or None."""
    return _CALL.get()


def count_answer(source: str) -> None:
    """Count a realize answered with a reply from ``source`` ``"peer"`` or ``"computed"``
    (a ``"local"`` answer is counted lock-free on its fabric instead)."""
    if source == "computed":
        MISSES.inc()
    else:
        PEER_HITS.inc()


def error_status(exc: BaseException, *, evaluates: bool = False) -> str:
    """The ``status`` label of ``exc`` (module docstring); ``evaluates``: it came out of a
    call that runs an evaluator, so a non-FabricError is the evaluator's own."""
    from cassette.errors import FabricError, StatusCode

    if isinstance(exc, FabricError):
        if exc.status_code is StatusCode.INTERNAL:
            from fabric.serve import EVALUATOR_ERROR  # only on this rare path: serve imports trio

            if exc.message.startswith(EVALUATOR_ERROR):
                return EVALUATOR
        return exc.status_code.name
    return EVALUATOR if evaluates else "INTERNAL"


def count_error(op: str, exc: BaseException, *, evaluates: bool = False) -> None:
    """Count ``exc`` reaching the caller of public operation ``op`` — unless it happens
    inside another public call (:func:`observed`), which counts it under its own op."""
    if _CALL.get() is None:
        ERRORS.labels(op=op, status=error_status(exc, evaluates=evaluates)).inc()


def observed(op: str, *, evaluates: bool = False) -> Callable[[F], F]:
    """Decorate a public method (sync or async): time it in ``fabric_operation_latency_seconds{op}``
    and count an exception it raises in ``fabric_operation_errors_total{op,status}``, once per
    outermost public call (a decorated call made inside another runs unobserved)."""

    def deco(fn: F) -> F:
        timer = LATENCY.labels(op=op)

        def enter() -> tuple[contextvars.Token, float]:
            return _CALL.set(op), time.perf_counter()

        def leave(token: contextvars.Token, t0: float, exc: BaseException | None) -> None:
            _CALL.reset(token)
            timer.observe(time.perf_counter() - t0)
            if isinstance(exc, Exception):  # not a cancellation
                ERRORS.labels(op=op, status=error_status(exc, evaluates=evaluates)).inc()

        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def awrapper(*args: Any, **kwargs: Any) -> Any:
                if _CALL.get() is not None:
                    return await fn(*args, **kwargs)
                token, t0 = enter()
                try:
                    result = await fn(*args, **kwargs)
                except BaseException as exc:
                    leave(token, t0, exc)
                    raise
                leave(token, t0, None)
                return result

            return awrapper  # type: ignore[return-value]

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if _CALL.get() is not None:
                return fn(*args, **kwargs)
            token, t0 = enter()
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:
                leave(token, t0, exc)
                raise
            leave(token, t0, None)
            return result

        return wrapper  # type: ignore[return-value]

    return deco


def _peer_hits() -> float:
    for fam in PEER_HITS.collect():
        for s in fam.samples:
            if s.name == "fabric_cache_hits_total":
                return s.value
    return 0.0


class _HitCollector:
    def collect(self) -> Iterator:
        hits = CounterMetricFamily("fabric_cache_hits", "Realizes answered from a record: this node's cassette (local) or another node's (peer)",
                                   labels=["source"])
        with _fabrics_lock:
            fabs = list(_fabrics)
            local = sum(f.local_hits for f in fabs)
            local += _retired_hits  # (read last: a fabric retired meanwhile is counted here)
        hits.add_metric(["local"], local)
        hits.add_metric(["peer"], _peer_hits())
        yield hits
        recs = GaugeMetricFamily("fabric_ledger_records", "Records indexed in open cassettes", labels=["node"])
        nbytes = GaugeMetricFamily("fabric_ledger_bytes", "Ledger bytes in open cassettes", labels=["node"])
        seen: set[int] = set()
        for f in fabs:
            cas = f.cassette
            if id(cas) in seen:  # fabrics of one directory share its cassette: one sample for it
                continue
            seen.add(id(cas))
            try:
                st = cas.stats()
            except Exception:  # noqa: BLE001 - a closed cassette is skipped, not fatal to a scrape
                continue
            recs.add_metric([st["node_id"]], st["records"])
            nbytes.add_metric([st["node_id"]], st["ledger_bytes"])
        yield recs
        yield nbytes


REGISTRY.register(_HitCollector())


def _series_name(base: str, labels: Mapping[str, str]) -> str:
    """A :func:`snapshot` key: ``base{k="v",...}``, labels sorted (none: ``base``)."""
    text = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return f"{base}{{{text}}}" if text else base


def snapshot() -> dict[str, float]:
    """Every ``fabric_*`` sample as ``{"name{labels}": value}`` (for ``fabric stats``)."""
    out: dict[str, float] = {}
    for fam in REGISTRY.collect():
        if not fam.name.startswith("fabric_"):
            continue
        for s in fam.samples:
            if s.name.endswith("_created"):
                continue
            out[_series_name(s.name, s.labels)] = s.value
    return out


#: The families read from a cassette at scrape time (they describe the directory, so an
#: offline ``fabric stats --data`` shows them truly); every other family counts the work of
#: the process that serves it.
CASSETTE_FAMILIES = frozenset({"fabric_ledger_records", "fabric_ledger_bytes"})

_LABEL = re.compile(r'(\w+)="([^"]*)"')


def _parse_sample(name: str) -> tuple[str, dict[str, str]]:
    """``'family{k="v",...}'`` (a :func:`snapshot` key) as ``(family, {k: v})``."""
    base, brace, rest = name.partition("{")
    return base, dict(_LABEL.findall(rest)) if brace else {}


@dataclass(frozen=True)
class HistogramSeries:
    """One histogram series of a :func:`snapshot`: ``series`` is its key without ``le``
    (``fabric_operation_latency_seconds{op="get"}``), ``buckets`` its cumulative
    ``(upper bound, count)`` pairs in ascending order, ``+Inf`` last."""

    series: str
    count: float
    sum: float
    buckets: tuple[tuple[float, float], ...]

    @property
    def mean(self) -> float | None:
        """``sum / count``, or None for a series with no observation."""
        return self.sum / self.count if self.count else None

    @property
    def top(self) -> float:
        """The largest finite bucket bound (0.0 when there is none)."""
        return max((le for le, _ in self.buckets if le != math.inf), default=0.0)

    def quantile(self, q: float) -> float | None:
        """An estimate of the ``q``-quantile from the buckets, as Prometheus's
        ``histogram_quantile`` makes it: linear within the bucket that holds it (the
        first bucket starts at 0).  ``math.inf`` when it lies beyond the largest finite
        bound (only "more than :attr:`top`" is known); None with no observation."""
        total = self.buckets[-1][1] if self.buckets else 0.0
        if not total:
            return None
        rank = q * total
        lower, below = 0.0, 0.0
        for le, cum in self.buckets:
            if cum >= rank and cum > below:
                if le == math.inf:
                    return math.inf
                return lower + (le - lower) * (rank - below) / (cum - below)
            lower, below = le, cum
        return math.inf


def histograms(samples: Mapping[str, float]) -> tuple[list[HistogramSeries], dict[str, float]]:
    """Fold every histogram of ``samples`` (a :func:`snapshot`, or the ``metrics`` of a
    node's stats answer) into one :class:`HistogramSeries` per series, sorted by series;
    returns them and every other sample, unchanged.  A family is a histogram when it has
    ``_bucket`` samples with an ``le`` label; its ``_count`` and ``_sum`` samples go with it."""
    parsed = {key: _parse_sample(key) for key in samples}
    bases = {name[: -len("_bucket")] for name, labels in parsed.values() if name.endswith("_bucket") and "le" in labels}
    parts: dict[str, dict[str, Any]] = {}
    rest: dict[str, float] = {}
    for key, value in samples.items():
        name, labels = parsed[key]
        base, _, part = name.rpartition("_")
        if base not in bases or part not in ("bucket", "count", "sum"):
            rest[key] = value
            continue
        le = labels.pop("le", None)
        acc = parts.setdefault(_series_name(base, labels), {"count": 0.0, "sum": 0.0, "buckets": []})
        if part == "bucket":
            acc["buckets"].append((float(le), value))  # float("+Inf") is inf
        else:
            acc[part] = value
    series = [HistogramSeries(name, acc["count"], acc["sum"], tuple(sorted(acc["buckets"])))
              for name, acc in sorted(parts.items())]
    return series, rest
