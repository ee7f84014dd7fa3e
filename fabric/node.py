"""``fabric node``: one peer node process.

``fabric node --data DIR --listen HOST:PORT --secret-file F [--evaluators M ...]
[--relay HOST:PORT] [--metrics-port N] [--idle-timeout S]`` serves the wire ops of
:mod:`fabric.serve` until SIGTERM or SIGINT.  Its first line on stdout is
``listening on HOST:PORT node=NODE_ID``.  Shutdown: stop accepting, answer new
requests UNAVAILABLE, let the requests in flight finish and send their replies
(:func:`fabric.net.serve`'s ``drain``), let in-flight computations finish and
their records commit (all bounded by ``--drain-s``; a second signal stops
waiting), close LMDB, exit 0.

Bad flags fail before anything is opened (:func:`check_args`); a port that
cannot be bound (``--listen``, ``--metrics-port``) fails as one status line
(:func:`fabric.net.bind_error`) before anything is created in ``--data``.  A
``--node-id`` other than that of the existing cassette in ``--data`` is refused.

Logs (stderr, logger names ``fabric.*``) carry one line per connection event
and name keys, never payloads or secrets.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import math
import os
import signal
import sys
from pathlib import Path

import trio

from cassette.errors import FabricError, StatusCode
from fabric.wire import MAX_NODE_ID_BYTES, StreamFrameLimits

__all__ = ["main", "run_node", "check_args"]

log = logging.getLogger("fabric.node")
DRAIN_S = 30.0
#: Seconds between gossip rounds and probes unless ``--gossip-interval`` says otherwise.
GOSSIP_INTERVAL = 0.5


async def run_node(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit status."""
    from fabric import api, metrics
    from fabric.fleet import ContentAddressedFabric, Fleet
    from fabric.local import Fabric
    from fabric.net import listen, serve
    from fabric.placement import node_capabilities
    from fabric.registry import load_evaluators, registered
    from fabric.remote import RemoteFabric, parse_address
    from fabric.serve import NodeService

    forms = api.secret_file_forms(args.secret_file) if args.secret_file else api._secret_forms_from_env()
    if not forms:
        raise FabricError(StatusCode.INVALID_ARGUMENT, "a node needs --secret-file F (or FABRIC_SECRET / FABRIC_SECRET_FILE)")
    secret = forms[0]
    if len(secret) < api.SECRET_ADVISED_BYTES:
        log.warning("the shared secret is %d bytes: anyone who sees one handshake can test guesses of it offline; "
                    "use %d or more random bytes", len(secret), api.SECRET_ADVISED_BYTES * 2)
    host, port = parse_address(args.listen, listen=True)
    limits = StreamFrameLimits(idle_timeout_s=args.idle_timeout)
    for spec in args.evaluators:
        load_evaluators(spec)
    data = Path(args.data) if args.data else api.default_home()
    listeners = await listen(host, port)  # before anything is created on disk: a taken port leaves --data as it was
    fab = relay = metrics_server = None
    lock_fd = -1
    try:
        metrics_server = _serve_metrics(args.metrics_port, host)  # likewise
        fab = Fabric(data, durability=args.durability, node_id=args.node_id)
        lock_fd = _hold_node_lock(data)
        if args.node_id is not None and args.node_id != fab.node_id:
            raise FabricError(StatusCode.FAILED_PRECONDITION, f"--node-id {args.node_id!r}: {data} is the cassette of node "
                              f"{fab.node_id} (a node id is set only when its data directory is new)")
        relay = RemoteFabric(args.relay, secret) if args.relay else None
        service = NodeService(fab, relay=relay)
        caps = node_capabilities(registered(), compute=not args.relay)  # a relay forwards misses, never computes
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                drain, served = trio.Event(), trio.Event()

                async def serving(task_status) -> None:
                    try:
                        await serve(
                            host, port, secret, service.handle, limits, node_id=fab.node_id, fast=service.handle_now,
                            stats=lambda: _node_stats(fab, service), welcome={"node": fab.node_id, "capabilities": caps},
                            accept=forms[1:], drain=drain, listeners=listeners, task_status=task_status,
                        )
                    finally:
                        served.set()

                listening = await nursery.start(serving)
                fleet = None
                if not args.relay:
                    fleet = Fleet(fab, f"{listening.host}:{listening.port}", secret, caps, interval=args.gossip_interval)
                    facts = fleet.replay_ledger()
                    service.fleet, service.caf = fleet, ContentAddressedFabric(fab, fleet)
                    await nursery.start(fleet.run, list(args.join))
                    log.info("node %s: gossip running, %d holdings replayed from the ledger, seeds=%s", fab.node_id, facts, args.join)
                print(f"listening on {listening.host}:{listening.port} node={fab.node_id}", flush=True)
                log.info("node %s serving %s on %s:%d (relay=%s)", fab.node_id, data, listening.host, listening.port, args.relay)
                signum = await _first_signal(signals, getattr(args, "early_signals", ()))
                log.info("node %s: %s received, shutting down", fab.node_id, signal.Signals(signum).name)
                drain_end = trio.current_time() + args.drain_s
                drain.set()  # no new connections or requests; those in flight finish and are answered
                await _until_served(served, signals, drain_end)
                if fleet is not None:
                    await fleet.aclose()
                nursery.cancel_scope.cancel()
        for sig, handler in getattr(args, "signal_handlers", {}).items():
            signal.signal(sig, handler)  # a second signal while draining acts as it would have before start-up
        # in-flight computations finish and their records commit before LMDB closes
        with trio.move_on_at(drain_end):
            await service.idle.wait()
        if service.active_computations:
            log.warning("node %s: %d computations still running after %.0f s; closing anyway", fab.node_id, service.active_computations, args.drain_s)
    finally:
        for listener in listeners:
            listener.socket.close()  # (already closed once served)
        if lock_fd >= 0:
            os.close(lock_fd)  # (the lock goes with it; a kill -9 lets it go too)
        if metrics_server is not None:
            metrics_server.shutdown()
            metrics_server.server_close()
        if relay is not None:
            relay.close()
        if fab is not None:
            fab.close()
        metrics.CONNECTIONS.set(0)
    log.info("node %s stopped cleanly", fab.node_id)
    return 0


def _serve_metrics(port: int | None, host: str):
    """Start the Prometheus endpoint on ``host:port`` (none when ``port`` is None); returns its
    server, to be shut down when the node stops.  A port that cannot be bound is one status
    line (:func:`fabric.net.bind_error`)."""
    if port is None:
        return None
    from prometheus_client import start_http_server

    from fabric.net import bind_error

    try:
        server, _ = start_http_server(port, addr=host)
    except OSError as exc:
        raise bind_error("serve metrics", host, port, exc) from None
    log.info("metrics on http://%s:%d/metrics", host, server.server_address[1])
    return server


#: Characters a log message may not carry as they are: C0/C1 controls and Unicode line breaks.
_UNPRINTABLE = {c: f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"
                for c in [*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029]}


class OneLineFormatter(logging.Formatter):
    """Each log record is one line: control characters and line breaks in its message (a
    node id, an address or an evaluator name a peer chose) are written escaped (``\\x0a``),
    so a peer cannot forge log lines.  A traceback, when one is logged, follows as usual."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = record.message.translate(_UNPRINTABLE)
        return super().formatMessage(record)


#: In a node's data directory: held (``flock``) by the one ``fabric node`` serving it.
NODE_LOCK = "node.lock"


def _hold_node_lock(data: Path) -> int:
    """Take the node lock of ``data`` (returns its fd, to be closed when the node stops);
    FAILED_PRECONDITION if another ``fabric node`` serves that directory: two nodes on one
    cassette would gossip under one node id.  Embedded fabrics and CLI commands that open
    the directory are not affected."""
    path = data / NODE_LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
        finally:
            os.close(fd)
        raise FabricError(StatusCode.FAILED_PRECONDITION, f"another fabric node (pid {holder}) is serving {data}; "
                          "run one node per data directory") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


async def _until_served(served: trio.Event, signals, end: float) -> None:
    """Wait until the drained server has answered what was in flight and closed (``served``),
    at most until ``end``; a second SIGTERM/SIGINT stops the wait at once."""
    with trio.move_on_at(end):
        async with trio.open_nursery() as nursery:

            async def second_signal() -> None:
                async for _ in signals:
                    log.info("second signal: not waiting for requests in flight")
                    nursery.cancel_scope.cancel()

            nursery.start_soon(second_signal)
            await served.wait()
            nursery.cancel_scope.cancel()


async def _first_signal(signals, early) -> int:
    """The first shutdown signal: one caught before the receiver was open (``early``), else the next."""
    if early:
        return early[0]
    async for signum in signals:
        return signum
    raise AssertionError("a signal receiver never ends")


def check_args(args: argparse.Namespace) -> None:
    """INVALID_ARGUMENT, before anything is opened, for a malformed ``--listen``, ``--relay``
    or ``--join`` address (each HOST:PORT, port 1-65535; 0 allowed for ``--listen``) or a
    ``--metrics-port`` outside 0-65535.  Only the form is checked: a ``--join`` peer that is
    not up yet is fine, its seeds are asked again every probe period.  A relay gossips with no
    fleet, so ``--join`` or ``--gossip-interval`` with ``--relay`` is INVALID_ARGUMENT too.
    A ``--node-id`` must be one both protocols carry: non-empty Unicode text (gossip.md
    section 2) of at most :data:`~fabric.wire.MAX_NODE_ID_BYTES` UTF-8 bytes (the wire's
    ``auth``, wire.md section 3); else a new ``--data`` would become the cassette of a node
    that cannot serve."""
    from fabric.remote import parse_address
    from gossip.holding import check_node_id

    node_id = getattr(args, "node_id", None)
    if node_id is not None:
        check_node_id(node_id, "--node-id")
        if len(node_id.encode("utf-8")) > MAX_NODE_ID_BYTES:
            raise FabricError(StatusCode.INVALID_ARGUMENT, f"--node-id: {len(node_id.encode('utf-8'))} UTF-8 bytes, at most "
                              f"{MAX_NODE_ID_BYTES} allowed (a node's id travels in the wire handshake)")

    relay = getattr(args, "relay", None)
    fleet_flags = (("--join", bool(getattr(args, "join", None))),
                   ("--gossip-interval", getattr(args, "gossip_interval", None) is not None))
    for flag, given in fleet_flags:
        if relay and given:
            raise FabricError(StatusCode.INVALID_ARGUMENT, f"{flag} with --relay: a relay forwards to its upstream and joins no fleet")
    named = [("--listen", args.listen, True)] + ([("--relay", relay, False)] if relay else [])
    named += [("--join", seed, False) for seed in getattr(args, "join", None) or ()]
    for flag, address, listen in named:
        try:
            parse_address(address, listen=listen)
        except FabricError:
            port = "0-65535" if listen else "1-65535"
            raise FabricError(StatusCode.INVALID_ARGUMENT, f"{flag} must be HOST:PORT (port {port}), got {address!r}") from None
    mport = getattr(args, "metrics_port", None)
    if mport is not None and not 0 <= mport < 65536:
        raise FabricError(StatusCode.INVALID_ARGUMENT, f"--metrics-port must be 0-65535, got {mport}")
    interval = getattr(args, "gossip_interval", None)
    if interval is not None and not (math.isfinite(interval) and interval > 0):  # 0 gossiped in a busy loop
        raise FabricError(StatusCode.INVALID_ARGUMENT, f"--gossip-interval must be a positive number of seconds, got {interval:g}")
    drain = getattr(args, "drain_s", None)
    if drain is not None and not (math.isfinite(drain) and drain >= 0):
        raise FabricError(StatusCode.INVALID_ARGUMENT, f"--drain-s must be 0 or more seconds, got {drain:g}")


def _node_stats(fab, service) -> dict:
    """The ``node`` part of a stats answer: cassette counts, gossip counters and, under
    ``metrics``, every ``fabric_*`` sample of this process (:func:`fabric.metrics.snapshot`,
    as the embedded ``stats()`` has them)."""
    from fabric import metrics

    st = fab.cassette.stats()
    extra = service.fleet.stats() if service.fleet is not None else {}
    return extra | {
        "node_id": fab.node_id,
        "records": st["records"],
        "ledger_rows": st["ledger_rows"],
        "blobs": st["blobs"],
        "ledger_bytes": st["ledger_bytes"],
        "local_hits": fab.local_hits,
        "active_computations": service.active_computations,
        "metrics": metrics.snapshot(),
    }


def main(args: argparse.Namespace) -> int:
    """Entry point for ``fabric node`` (argparse namespace from :mod:`fabric.cli`).

    SIGTERM/SIGINT are caught from here on: one that arrives while the node is
    still starting (opening its cassette, loading evaluators) shuts it down
    cleanly, exit 0, as soon as it serves."""
    early: list[int] = []
    args.early_signals = early
    args.signal_handlers = {sig: signal.signal(sig, lambda signum, _frame: early.append(signum))
                            for sig in (signal.SIGTERM, signal.SIGINT)}  # put back once the node stops serving
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    if not hasattr(args, "drain_s"):
        args.drain_s = DRAIN_S
    if not hasattr(args, "idle_timeout"):
        args.idle_timeout = StreamFrameLimits.idle_timeout_s
    check_args(args)
    if getattr(args, "gossip_interval", None) is None:  # (after the check: given, it is refused on a relay)
        args.gossip_interval = GOSSIP_INTERVAL
    return trio.run(run_node, args)
