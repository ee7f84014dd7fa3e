"""The ``fabric`` command line.

Every command has ``--help``, accepts ``--data DIR`` / ``--node HOST:PORT``
(``fabric node`` and ``fabric bench`` refuse ``--node``: they talk to no node), and
on bad input exits non-zero with one line on stderr:
``fabric <cmd>: error: <STATUS>: <message>``.  A flag a command would not use is
not offered to it (``--evaluators`` only where evaluators run, ``--secret-file``
only where a secret is used).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
from logging.handlers import MemoryHandler
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from cassette.errors import FabricError, StatusCode
from fabric import allocator

EXIT_ERROR = 1
EXIT_USAGE = 2


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but usage errors are one line (and exit 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


DATA_HELP = "cassette directory of the embedded node (default: $FABRIC_HOME or the user cache dir)"


def _common(p: argparse.ArgumentParser, *, client: bool = True, secret: bool = True, evaluators: bool = False,
            data: str = DATA_HELP, no_node: str = "") -> None:
    """The shared flags, each only where the command uses it (argparse refuses the others):
    ``--data`` everywhere; ``--node`` where the command can talk to a running node (``client``);
    ``--secret-file`` where a secret is used (``secret``); ``--evaluators`` where evaluators
    run.  A command that cannot talk to a node still takes ``--node`` (else argparse would
    read it as an abbreviation, ``--node`` for ``--node-id``), only to refuse it with
    ``no_node``, the reason (:func:`_refuse_node`)."""
    p.add_argument("--data", metavar="DIR", help=data)
    if client:
        p.add_argument("--node", metavar="HOST:PORT", help="talk to a running node instead (default: $FABRIC_NODE)")
    else:
        p.add_argument("--node", metavar="HOST:PORT", help=f"refused (INVALID_ARGUMENT): {no_node}")
        p.set_defaults(no_node=no_node)
    if secret:
        text = "the node's shared secret" if not client else "shared secret for --node"
        p.add_argument("--secret-file", metavar="F", help=f"{text} (default: $FABRIC_SECRET / $FABRIC_SECRET_FILE)")
    if evaluators:
        p.add_argument("--evaluators", metavar="MODULE", action="append", default=[],
                       help="import evaluators from a module path or .py file (repeatable)")


def _refuse_node(args: argparse.Namespace) -> None:
    """INVALID_ARGUMENT for ``--node`` on a command that cannot talk to a node (``fabric node``,
    ``fabric bench``): it would otherwise be taken and ignored."""
    why = getattr(args, "no_node", None)
    if why and args.node is not None:
        raise FabricError(StatusCode.INVALID_ARGUMENT, f"--node {args.node!r}: {why}")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every ``fabric`` subcommand."""
    ap = _OneLineParser(prog="fabric", description="evalfabric: realize each evaluation once for the whole fleet.")
    sub = ap.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=_OneLineParser)

    p = sub.add_parser("demo", help="agents realize overlapping requests on the embedded default, through --node, or on a "
                                    "local fleet (--nodes N); prints hits, misses, evaluator runs")
    _common(p)  # its agents load the example evaluators themselves
    p.add_argument("--agents", type=int, default=4, help="agent processes (default 4)")
    p.add_argument("--requests", type=int, default=24, help="requests per agent (default 24)")
    p.add_argument("--distinct", type=int, default=32, help="distinct requests in the shared pool (default 32)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--nodes", type=int, default=0, help="run a local fleet of N nodes instead of the embedded default (not with --node)")

    p = sub.add_parser("node", help="run one peer node until SIGTERM/SIGINT")
    _common(p, client=False, evaluators=True, data="the node's cassette directory (default: $FABRIC_HOME or the user cache dir)",
            no_node="a node listens on --listen and joins peers with --join (or forwards to --relay)")
    p.add_argument("--listen", metavar="HOST:PORT", default="127.0.0.1:0")
    p.add_argument("--join", metavar="HOST:PORT", action="append", default=[],
                   help="a fleet member to join (repeatable; not with --relay)")
    p.add_argument("--relay", metavar="HOST:PORT", help="forward misses to this upstream node and record what comes back")
    p.add_argument("--metrics-port", type=int, default=None)
    p.add_argument("--node-id", default=None, help="node id for a new data dir (default: random)")
    p.add_argument("--durability", choices=("sync", "fast"), default="sync")
    # (literals, so that every command's parser stays light: tests hold them to fabric.node.DRAIN_S,
    # fabric.node.GOSSIP_INTERVAL and StreamFrameLimits.idle_timeout_s)
    p.add_argument("--drain-s", type=float, default=30.0, help="on shutdown, wait this long for in-flight computations (default 30)")
    p.add_argument("--gossip-interval", type=float, default=None, metavar="S",
                   help="seconds between gossip rounds (default 0.5); failure-detector probes run every max(1, S) s; not with --relay")
    p.add_argument("--idle-timeout", type=float, default=300.0, metavar="S",
                   help="close a client connection with no request in flight that sent nothing for S seconds (default 300)")

    p = sub.add_parser("realize", help="realize EVALUATOR on JSON_ARGS and print the reply as JSON")
    _common(p, evaluators=True)
    p.add_argument("evaluator")
    p.add_argument("json_args", metavar="JSON_ARGS")
    p.add_argument("--version", dest="ev_version", default=None, help="evaluator version (default: latest registered)")

    p = sub.add_parser("put", help="store FILE as an artifact and print its key")
    _common(p)
    p.add_argument("file")

    p = sub.add_parser("get", help="fetch KEY (artifact bytes, or a reply as JSON)",
                       description="Fetch KEY: an artifact's bytes (streamed chunk by chunk, each verified before it "
                                   "is written; FILE appears only once the whole artifact is in and verified), "
                                   "a blob's bytes, or a reply's value as JSON.")
    _common(p)
    p.add_argument("key")
    p.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout (- is stdout)")

    p = sub.add_parser("holders", help="list the nodes known to hold KEY")
    _common(p)
    p.add_argument("key")

    p = sub.add_parser("stats", help="print cassette counts and fabric_* metrics")
    _common(p)
    p.add_argument("--json", action="store_true", help="print JSON")

    text = "scrub every record and blob of the --data cassette, or of a running --node's (done by the node); exit 1 on DATA_LOSS"
    p = sub.add_parser("verify", help=text, description=text)
    _common(p)

    text = ("seed or rebuild the cassette in --data DIR from LEDGER_FILE, or append its records and blobs to a running "
            "--node (the whole file is validated here first, then verified again by the node)")
    p = sub.add_parser("replay", help=text, description=text)
    _common(p)
    p.add_argument("ledger_file")

    text = ("write the --data cassette's ledger, or a running --node's, to FILE (portable, replayable; "
            "FILE appears only once complete and checked)")
    p = sub.add_parser("export", help=text, description=text)
    _common(p)
    p.add_argument("file")

    p = sub.add_parser("bench", help="run the benchmarks and print ratios against raw floors")
    _common(p, client=False, secret=False, data="where the benchmarks make their scratch directories (default: the system temp dir)",
            no_node="the benchmarks measure nodes they start themselves")
    p.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    p.add_argument("--json", metavar="FILE", help="also write the table as JSON")
    p.add_argument("--only", action="append", default=[], help="run only benchmarks whose name contains this (repeatable)")
    return ap


# ------------------------------------------------------------------ helpers
def _load(args: argparse.Namespace) -> None:
    from fabric.registry import load_evaluators

    for spec in args.evaluators:
        load_evaluators(spec)


def _node_address(args: argparse.Namespace) -> str | None:
    """The node to talk to: ``--node``, else ``$FABRIC_NODE`` unless ``--data`` is given."""
    return getattr(args, "node", None) or (None if getattr(args, "data", None) else os.environ.get("FABRIC_NODE")) or None


def _node_secret(args: argparse.Namespace, node: str) -> bytes:
    """The secret for talking to ``node``: ``--secret-file``, else ``$FABRIC_SECRET(_FILE)``.
    INVALID_ARGUMENT for an address that is not HOST:PORT with a port 1-65535 (naming
    ``--node`` or ``$FABRIC_NODE``, whichever gave it), UNAUTHENTICATED when no secret is given."""
    from fabric import api
    from fabric.remote import parse_address

    try:
        if not api.is_address(node):
            raise FabricError(StatusCode.INVALID_ARGUMENT, node)
        parse_address(node)
    except FabricError:
        flag = "--node" if getattr(args, "node", None) else "$FABRIC_NODE"
        raise FabricError(StatusCode.INVALID_ARGUMENT, f"{flag} must be HOST:PORT (port 1-65535), got {node!r}") from None
    secret = api.read_secret_file(args.secret_file) if getattr(args, "secret_file", None) else api._secret_from_env()
    if secret is None:
        raise FabricError(StatusCode.UNAUTHENTICATED, f"talking to node {node} needs --secret-file F (or FABRIC_SECRET / FABRIC_SECRET_FILE)")
    return secret


def _open(args: argparse.Namespace, *, create: bool = True):
    """The fabric a command works on: the ``--node`` (or ``$FABRIC_NODE``), else the embedded
    cassette in ``--data`` (or the default home).  ``create=False`` (commands that only read:
    get, holders, stats, verify, export) opens only an existing cassette: a mistyped
    ``--data`` is NOT_FOUND, not a new empty cassette that verifies clean or exports nothing."""
    from fabric import api

    node = _node_address(args)
    if node:
        return api.open(node, secret=_node_secret(args, node))
    return api.open(Path(args.data) if args.data else api.default_home(), create=create)


def _jsonable(v: Any) -> Any:
    import numpy as np

    from cassette.keys import ContentKey

    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, ContentKey):
        return str(v)
    if isinstance(v, bytes):
        return {"bytes_hex": v.hex()}
    if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))):
        return repr(v)
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    return v


def _progress(total: int | None, what: str, *, nbytes: bool = False):
    """A rich progress bar on stderr when it is a TTY, nothing otherwise; returns (callback, close).

    Drawn on stderr, never stdout: stdout carries the command's output (``fabric get KEY >
    FILE`` writes the artifact's bytes there, ``fabric put`` its JSON line).
    ``callback(completed)`` may be called from any thread (rich's Progress takes a lock).
    ``nbytes``: completed and total are byte counts (shown as sizes and a rate).
    """
    if not sys.stderr.isatty():
        return None, lambda: None
    from rich.console import Console
    from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

    columns = (*Progress.get_default_columns(), DownloadColumn(), TransferSpeedColumn()) if nbytes else ()
    prog = Progress(*columns, transient=True, console=Console(stderr=True))
    task = prog.add_task(what, total=total)
    prog.start()
    return (lambda n: prog.update(task, completed=n)), prog.stop


# ----------------------------------------------------------------- commands
def cmd_realize(args: argparse.Namespace) -> int:
    """``fabric realize``: realize one request, print ``{"key", "source", "holder", "value"}`` as one JSON line."""
    from fabric.request import Request

    _load(args)
    try:
        call_args = json.loads(args.json_args)
    except json.JSONDecodeError as exc:
        raise FabricError(StatusCode.INVALID_ARGUMENT, f"JSON_ARGS is not valid JSON: {exc.msg} at char {exc.pos}") from None
    if not isinstance(call_args, dict):
        raise FabricError(StatusCode.INVALID_ARGUMENT, f"JSON_ARGS must be a JSON object of keyword arguments, got {type(call_args).__name__}")
    with _open(args) as fab:
        rep = fab.realize(Request(args.evaluator, call_args, version=args.ev_version))
    print(json.dumps({"key": str(rep.key), "source": rep.source, "holder": rep.holder, "value": _jsonable(rep.value)}))
    return 0


def cmd_put(args: argparse.Namespace) -> int:
    """``fabric put FILE``: store FILE as an artifact, print its key, size, digest and chunk count as JSON."""
    from fabric.artifacts import source_file

    path = source_file(args.file)  # before connecting: one status line for a bad FILE
    with _open(args) as fab:
        cb, stop = _progress(path.stat().st_size, f"putting {args.file}", nbytes=True)
        try:
            ref = fab.put(path, progress=cb)
        finally:
            stop()
    print(json.dumps({"key": str(ref.key), "size_bytes": ref.size_bytes, "digest": ref.digest, "chunks": ref.chunks}))
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    """``fabric get KEY``: an artifact's bytes, a blob, or a reply as JSON, to stdout or ``-o FILE``."""
    import numpy as np

    from cassette.keys import ContentKey
    from fabric import artifacts

    key = ContentKey.parse(args.key)
    sink = _Sink(args.output)  # before any transfer: a bad -o fails at once
    try:
        if key.kind == "artifact":
            with _open(args, create=False) as fab:
                _stream_to(sink, fab, key)
        else:
            with _open(args, create=False) as fab:
                value = fab.get(key) if _node_address(args) else artifacts.get(fab.cassette, key)
            if key.kind == "request":
                sink.write((json.dumps(_jsonable(value)) + "\n").encode())
            elif isinstance(value, np.ndarray):
                sink.write(np.ascontiguousarray(value).tobytes())
            else:
                sink.write(value)
        sink.commit()
    finally:
        sink.discard()
    return 0


class _Sink:
    """Where ``fabric get`` writes: stdout (no ``-o``, or ``-o -``), or ``FILE`` through a
    temporary file beside it (``.FILE.<random>.part``) that replaces ``FILE`` only once
    every byte is in and verified; :meth:`discard` removes it otherwise.  A ``FILE`` that
    cannot be written (a directory, a device or a fifo, which the rename would replace, or
    in a missing or read-only directory) is FAILED_PRECONDITION naming it, raised by the
    constructor, before anything is fetched (:func:`cassette.ledgerfile.check_write_target`);
    a write that fails later likewise.  A symlink ``FILE`` stays a link to the new file."""

    def __init__(self, output: str | None) -> None:
        self.final: Path | None = None
        self.tmp: Path | None = None
        if output is None or output == "-":
            self.f = sys.stdout.buffer
            return
        import secrets

        from cassette.ledgerfile import check_write_target, write_error

        if not output:
            raise FabricError(StatusCode.INVALID_ARGUMENT, "-o FILE must not be empty (use -o - or no -o for stdout)")
        self.name = output
        self.final = Path(check_write_target(output, what=""))
        self.tmp = self.final.with_name(f".{self.final.name}.{secrets.token_hex(4)}.part")
        try:
            self.f = os.fdopen(os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb")
        except OSError as exc:
            self.tmp = None
            raise write_error(output, exc, what="") from None

    def write(self, data: bytes) -> None:
        try:
            self.f.write(data)
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise self._error(exc) from None

    def commit(self) -> None:
        """Flush stdout, or move the finished temporary file onto ``FILE``."""
        if self.tmp is None:
            self.f.flush()
            return
        try:
            self.f.close()
            os.replace(self.tmp, self.final)
        except OSError as exc:
            raise self._error(exc) from None
        self.tmp = None

    def _error(self, exc: OSError) -> FabricError:
        from cassette.ledgerfile import write_error

        return write_error(self.name if self.final else "stdout", exc, what="")

    def discard(self) -> None:
        """Remove the temporary file if :meth:`commit` did not happen (idempotent)."""
        if self.tmp is not None:
            self.f.close()
            self.tmp.unlink(missing_ok=True)
            self.tmp = None


def _stream_to(sink: _Sink, fab: Any, key: Any) -> None:
    """Write artifact ``key``'s content to ``sink`` chunk by chunk, each verified against its key
    before it is written and the whole against the manifest digest at the end (DATA_LOSS
    otherwise): a few chunks in memory at a time, whatever the artifact's size."""
    manifest, chunks = fab.artifact_stream(key)
    cb, stop = _progress(manifest["size"], f"getting {key.short()}", nbytes=True)
    with contextlib.closing(chunks):  # a stream through a node ends there at once
        try:
            done = 0
            for data in chunks:
                sink.write(data)
                done += len(data)
                if cb is not None:
                    cb(done)
        finally:
            stop()


def cmd_holders(args: argparse.Namespace) -> int:
    """``fabric holders KEY``: the node ids known to hold KEY, one a line; NOT_FOUND (exit 1,
    one line naming KEY) when none is."""
    from cassette.keys import ContentKey

    key = ContentKey.parse(args.key)
    with _open(args, create=False) as fab:
        holders = fab.holders(key)
    if not holders:
        raise FabricError(StatusCode.NOT_FOUND, "no node is known to hold it", key=key)
    for h in holders:
        print(h)
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    """``fabric stats``: the node's counters and ``fabric_*`` metrics, as a table or ``--json``.

    ``--json`` prints the answer whole (every sample, histogram buckets included).  The
    table shows one row per histogram series (count, sum, mean and bucket estimates of
    p50/p99) instead of every bucket.  Offline (``--data``, not a running node) it shows
    only what the directory holds: this command's own process counters (hits, misses,
    latencies, errors, gossip...) would all read 0, so they are left out and a caption
    says where to read a node's."""
    with _open(args, create=False) as fab:
        st = fab.stats()
    offline = not isinstance(st.get("node"), dict)
    if not offline:  # a remote node's answer: {"node": ..., "wire": ..., "server": ...}
        flat = dict(st["node"])
        for part in ("server", "wire"):
            for k, v in (st.get(part) or {}).items():
                if not isinstance(v, (dict, list)):
                    flat[f"{part}.{k}"] = v
        st = flat
    if args.json:
        print(json.dumps(_jsonable(st), indent=2, sort_keys=True))
        return 0
    from rich.console import Console

    console = Console()
    for table in _stats_tables(st, offline):
        console.print(table)
    return 0


#: Keys of an embedded ``stats()`` that count this process's work (0 in a fresh ``fabric stats``).
_PROCESS_STATS = frozenset({"local_hits", "conflicts"})


def _stats_tables(st: dict[str, Any], offline: bool) -> list:
    """The rich tables of ``fabric stats``: counts and plain samples, then (when any are
    shown) one row per histogram series.  ``offline``: drop the process counters."""
    from rich.table import Table

    from fabric import metrics

    samples = st.get("metrics", {})
    if offline:
        samples = {k: v for k, v in samples.items() if k.partition("{")[0] in metrics.CASSETTE_FAMILIES}
    series, rest = metrics.histograms(samples)
    table = Table(title=f"fabric stats — node {st.get('node_id')}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for k, v in st.items():
        if k != "metrics" and not isinstance(v, (dict, list)) and not (offline and k in _PROCESS_STATS):
            table.add_row(k, str(v))
    for k, v in sorted(rest.items()):
        table.add_row(k, f"{v:g}")
    if offline:
        table.caption = ("offline directory: process counters (hits, misses, latencies, errors, gossip) "
                         "not applicable; a node shows its own: fabric stats --node HOST:PORT")
    return [table, _histogram_table(series)] if series else [table]


def _histogram_table(series: list) -> Any:
    """One row per histogram series: count, sum, mean, p50 and p99 (bucket estimates)."""
    from rich.table import Table

    table = Table(title="histograms (p50/p99: estimates from the bucket bounds, linear within a bucket)")
    for name, justify in (("series", "left"), ("count", "right"), ("sum", "right"), ("mean", "right"),
                          ("p50 ≈", "right"), ("p99 ≈", "right")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for h in series:
        unit = _seconds if h.series.partition("{")[0].endswith("_seconds") else _number
        table.add_row(h.series, f"{h.count:g}", unit(h.sum) if h.count else "-",
                      *(_estimate(v, h.top, unit) for v in (h.mean, h.quantile(0.5), h.quantile(0.99))))
    return table


def _estimate(v: float | None, top: float, unit: Callable[[float], str]) -> str:
    """``v`` formatted by ``unit``; ``-`` for none; ``> top`` past the largest finite bucket."""
    if v is None:
        return "-"
    return f"> {unit(top)}" if v == float("inf") else unit(v)


def _seconds(v: float) -> str:
    return f"{v * 1e3:.3g} ms" if v < 1 else f"{v:.3g} s"


def _number(v: float) -> str:
    return f"{v:.4g}"


def cmd_verify(args: argparse.Namespace) -> int:
    """``fabric verify``: scrub every record and blob; each problem on stderr, exit 1 if any."""
    from fabric import api

    if _node_address(args):
        with _open(args) as fab:
            _, stop = _progress(None, f"verifying on node {_node_address(args)}")
            try:
                rep = fab.verify()  # a NodeVerifyReport: problems capped, problem_count exact
            finally:
                stop()
        count = rep.problem_count
    else:
        path = Path(args.data) if args.data else api.default_home()
        fab = api.open(path, create=False)
        try:
            cb, stop = _progress(None, "verifying")
            try:
                rep = fab.cassette.verify(raise_errors=False, progress=cb)
            finally:
                stop()
        finally:
            fab.close()
        count = len(rep.problems)
    for p in rep.problems:
        print(f"fabric verify: {p}", file=sys.stderr)
    if count > len(rep.problems):
        print(f"fabric verify: ... and {count - len(rep.problems)} more problem(s)", file=sys.stderr)
    print(f"verified {rep.records} ledger rows, {rep.indexed} index entries, {rep.blobs} blobs: {count} problem(s)")
    return 0 if rep.ok else EXIT_ERROR


def cmd_replay(args: argparse.Namespace) -> int:
    """``fabric replay LEDGER_FILE``: replay a ledger file into ``--data DIR`` or a node, verifying each row.

    LEDGER_FILE must be a regular file (:func:`fabric.artifacts.source_file`).  Seeding a
    ``--data DIR`` that holds no cassette yet validates the whole file first, so a bad file
    leaves no new empty cassette behind (into an existing one, the import validates it
    whole before appending anything)."""
    from cassette.ledgerfile import validate_ledger_file
    from cassette.store import Cassette
    from fabric import api
    from fabric.artifacts import source_file

    source_file(args.ledger_file, what="replay")
    if _node_address(args):
        with _open(args) as fab:
            cb, stop = _progress(None, "replaying")
            try:
                res = fab.replay(args.ledger_file, progress=cb)
            finally:
                stop()
            node_id = fab.node_id
        print(f"replayed {res['records']} ledger rows into node {node_id}: {res['appended']} appended, "
              f"{res['records'] - res['appended']} already held; {res['blobs']} blobs")
        return 0
    path = Path(args.data) if args.data else api.default_home()
    if not (path / "data.mdb").exists():
        validate_ledger_file(args.ledger_file)
    cb, stop = _progress(None, "replaying")
    try:
        cas = Cassette.from_ledger(path, args.ledger_file, progress=cb)
    finally:
        stop()
    rep = cas.last_replay
    st = cas.stats()
    cas.close()
    print(f"replayed {rep.rows} ledger rows into {path}: {rep.indexed} keys indexed, {len(rep.corrupt_rows)} corrupt rows skipped; {st['records']} records held")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """``fabric export FILE``: write the whole ledger (and blobs) as a portable ledger file.
    FILE is checked first (:func:`cassette.ledgerfile.check_write_target`), then the cassette
    must exist: an existing FILE is replaced only by a complete export of a real cassette."""
    from cassette.ledgerfile import check_write_target

    check_write_target(args.file)
    with _open(args, create=False) as fab:
        if _node_address(args):
            cb, stop = _progress(None, "exporting")
            try:
                n = fab.export(args.file, progress=cb)
            finally:
                stop()
            print(f"exported {n} records from node {fab.node_id} to {args.file}")
            return 0
        n = fab.cassette.export(args.file)
    print(f"exported {n} records to {args.file}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """``fabric demo``: the main job (:mod:`fabric.demo`)."""
    from fabric import demo

    return demo.main(args)


def cmd_node(args: argparse.Namespace) -> int:
    """``fabric node``: run a peer node until SIGTERM / SIGINT (:mod:`fabric.node`)."""
    from fabric import node

    return node.main(args)


def cmd_bench(args: argparse.Namespace) -> int:
    """``fabric bench``: every benchmark, ratios against floors measured in the same run (:mod:`fabric.bench`)."""
    from fabric import bench

    return bench.main(args)


COMMANDS = {
    "realize": cmd_realize,
    "put": cmd_put,
    "get": cmd_get,
    "holders": cmd_holders,
    "stats": cmd_stats,
    "verify": cmd_verify,
    "replay": cmd_replay,
    "export": cmd_export,
    "demo": cmd_demo,
    "node": cmd_node,
    "bench": cmd_bench,
}


def _leaf(exc: BaseException) -> BaseException:
    """The one exception inside (nested) exception groups of one member each, such as a
    trio nursery wraps a single failure in; ``exc`` itself otherwise."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def os_error_status(exc: OSError) -> FabricError:
    """A stray ``OSError`` as one status line naming its path(s): ENOENT is NOT_FOUND,
    EACCES / EPERM PERMISSION_DENIED, a lost or refused connection UNAVAILABLE,
    anything else FAILED_PRECONDITION."""
    import errno

    if exc.errno == errno.ENOENT:
        code = StatusCode.NOT_FOUND
    elif exc.errno in (errno.EACCES, errno.EPERM):
        code = StatusCode.PERMISSION_DENIED
    elif isinstance(exc, (ConnectionError, TimeoutError)):
        code = StatusCode.UNAVAILABLE
    else:
        code = StatusCode.FAILED_PRECONDITION
    reason = exc.strerror or str(exc) or type(exc).__name__
    paths = [os.fsdecode(f) for f in (exc.filename, exc.filename2) if f is not None]
    return FabricError(code, f"{' -> '.join(paths)}: {reason}" if paths else reason)


#: Commands that log as they please: a node its own log lines, the bench each broken benchmark
#: as it goes, the demo what its agents and nodes meet while it runs (minutes, maybe).
_OWN_LOGS = ("node", "bench", "demo")


@contextlib.contextmanager
def _warnings_held(cmd: str) -> Iterator[None]:
    """Hold the warnings the library logs while command ``cmd`` runs (such as the cassette's
    "corrupt row ... reads as a miss" before a DATA_LOSS): written to stderr as Python would
    (their message alone) once the command returns, dropped when it raises, so that a
    failure is its one error line.  Held in batches of at most 1,000 (a full batch is
    written at once): memory stays bounded.  Not for the commands in :data:`_OWN_LOGS`."""
    if cmd in _OWN_LOGS:
        yield
        return
    held = MemoryHandler(1000, flushLevel=logging.CRITICAL + 1, target=logging.StreamHandler(sys.stderr))
    held.setLevel(logging.WARNING)
    root = logging.getLogger()
    root.addHandler(held)
    try:
        yield
    except BaseException:
        with held.lock:
            held.buffer.clear()
        raise
    else:
        held.flush()
    finally:
        root.removeHandler(held)


@contextlib.contextmanager
def _sigterm_as_interrupt(cmd: str, terminated: list[int]) -> Iterator[None]:
    """While command ``cmd`` runs, SIGTERM stops it as Ctrl-C does (re-raised as SIGINT, so
    whoever handles that — Python, or trio inside ``trio.run`` — stops it, and its cleanups run:
    an export's temporary file is removed), and ``main`` exits 143.  Not for ``node``, which
    drains on SIGTERM itself, and only in the main thread (where signal handlers live)."""
    if cmd == "node" or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum: int, frame: Any) -> None:
        terminated.append(signum)
        if callable(signal.getsignal(signal.SIGINT)):
            signal.raise_signal(signal.SIGINT)
        else:  # SIGINT ignored (a background job of a shell): stop all the same
            raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fabric`` console script; returns the exit status.

    Every failure ends as one stderr line ``fabric <cmd>: error: <what>``, exit 1: a
    :class:`FabricError` as its status line; a stray ``OSError`` mapped to one by
    :func:`os_error_status`; any other exception (an evaluator's own) as its type and
    message.  A trio exception group holding a single exception reports that exception.
    Warnings the library logs on the way are held until the command returns, and dropped
    when it fails (:func:`_warnings_held`).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.cmd:
        parser.print_help()
        return EXIT_USAGE
    if args.cmd != "bench":  # the bench measures the library as it runs inside anyone's process
        allocator.keep_freed_memory()
    terminated: list[int] = []
    try:
        with _warnings_held(args.cmd), _sigterm_as_interrupt(args.cmd, terminated):
            _refuse_node(args)
            return COMMANDS[args.cmd](args)
    except BaseException as raised:  # noqa: BLE001 - every failure is one line, not a traceback
        exc = _leaf(raised)
        if isinstance(exc, KeyboardInterrupt):
            return 128 + signal.SIGTERM if terminated else 130
        if isinstance(exc, BrokenPipeError):
            return EXIT_ERROR
        if isinstance(exc, OSError):
            exc = os_error_status(exc)
        if isinstance(exc, FabricError):
            print(f"fabric {args.cmd}: error: {exc}", file=sys.stderr)
            return EXIT_ERROR
        if not isinstance(exc, Exception):  # SystemExit, a group of several: not ours to flatten
            raise
        text = " ".join(str(exc).split())  # an evaluator's own error: its type and message
        print(f"fabric {args.cmd}: error: {type(exc).__name__}: {text}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
