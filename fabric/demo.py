"""``fabric demo``: several agent processes realize overlapping requests.

Each agent is a separate Python process that draws requests from one shared
pool of the example evaluators (seeded linear algebra, text statistics,
hashed embeddings) and realizes them on the embedded default fabric (one
cassette directory shared by all agents).  The table shows, per agent, how
many replies came from the cassette and how many it computed; the fleet
total of evaluator runs equals the number of distinct requests that were not
already recorded, whatever the overlap.

``--node HOST:PORT`` (or ``$FABRIC_NODE``) runs the agents through that running
node instead (it must have the example evaluators); ``--nodes N`` starts a
local fleet of N nodes for them.  The integer flags are checked first
(:data:`LIMITS`: ``--agents`` 1-64, ``--requests`` 1-1,000,000, ``--distinct``
1-100,000, ``--nodes`` 0-16), and ``--node`` excludes ``--nodes``;
INVALID_ARGUMENT otherwise.  Through a node, a missing secret is UNAUTHENTICATED
as for every ``--node`` command.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

EXAMPLES = "examples.evaluators"
#: (flag, attribute, least, most) of demo's integer flags: each agent and node is a process
#: and the request pool is built in memory, so a typo cannot start thousands of them
LIMITS = (("--agents", "agents", 1, 64), ("--requests", "requests", 1, 1_000_000),
          ("--distinct", "distinct", 1, 100_000), ("--nodes", "nodes", 0, 16))

_TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "content addressed storage never computes the same thing twice",
    "agents keep asking for the same expensive evaluations",
    "a grow only index of who holds what needs no consensus",
    "to be or not to be that is the question",
    "every byte is verified against its hash before use",
    "gossip spreads facts like rumours through a crowd",
    "replay the ledger and the node remembers everything",
]


def request_pool(distinct: int, seed: int) -> list[tuple[str, dict]]:
    """``distinct`` deterministic (evaluator, args) pairs across the example evaluators."""
    rng = random.Random(seed)
    pool: list[tuple[str, dict]] = []
    i = 0
    while len(pool) < distinct:
        kind = i % 3
        if kind == 0:
            pool.append(("linalg.spectrum", {"seed": rng.randrange(1 << 30), "n": 96}))
        elif kind == 1:
            pool.append(("text.stats", {"text": " ".join(rng.sample(_TEXTS, 3)), "top": 3}))
        else:
            pool.append(("text.embed", {"text": rng.choice(_TEXTS) + f" #{i}", "dim": 32}))
        i += 1
    return pool


def _examples_spec() -> str:
    """``examples.evaluators`` when importable from here, else the file beside the package."""
    if Path("examples/evaluators.py").is_file():
        return EXAMPLES
    beside = Path(__file__).resolve().parent.parent / "examples" / "evaluators.py"
    if beside.is_file():
        return str(beside)
    from cassette.errors import FabricError, StatusCode

    raise FabricError(StatusCode.FAILED_PRECONDITION, "cannot find examples/evaluators.py: run the demo from the repository root")


def agent_main(argv: list[str]) -> int:
    """One agent process: realize its requests and print one JSON line of counts."""
    ap = argparse.ArgumentParser(prog="fabric-demo-agent")
    ap.add_argument("--data", required=True)
    ap.add_argument("--agent", type=int, required=True)
    ap.add_argument("--requests", type=int, required=True)
    ap.add_argument("--distinct", type=int, required=True)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--evaluators", required=True)
    ap.add_argument("--node", default=None)
    ap.add_argument("--secret-file", default=None)
    a = ap.parse_args(argv)
    try:
        return _agent(a)
    except Exception as exc:  # noqa: BLE001 - one line per failed agent, not a traceback
        from cassette.errors import FabricError

        text = str(exc) if isinstance(exc, FabricError) else f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        print(f"fabric demo: agent {a.agent}: error: {text}", file=sys.stderr, flush=True)
        return 1


def _agent(a: argparse.Namespace) -> int:
    import fabric
    from fabric import api
    from fabric.registry import load_evaluators

    load_evaluators(a.evaluators)
    pool = request_pool(a.distinct, a.seed)
    rng = random.Random(a.seed * 1000 + a.agent)
    picks = [pool[rng.randrange(len(pool))] for _ in range(a.requests)]
    if a.node:  # the secret: --secret-file, else FABRIC_SECRET / FABRIC_SECRET_FILE
        fab = api.open(a.node, secret=api.read_secret_file(a.secret_file) if a.secret_file else None)
    else:
        fab = fabric.open(a.data)
    counts = {"local": 0, "peer": 0, "computed": 0}
    t0 = time.perf_counter()
    for name, args in picks:
        rep = fab.realize(fabric.Request(name, args))
        counts[rep.source] += 1
    elapsed = time.perf_counter() - t0
    fab.close()
    print(json.dumps({"agent": a.agent, "pid": os.getpid(), "elapsed_s": elapsed, **counts}), flush=True)
    return 0


def main(args: argparse.Namespace) -> int:
    """Run the demo described in the module docstring; prints a rich table."""
    from rich.console import Console
    from rich.table import Table

    from cassette.errors import FabricError, StatusCode
    from fabric import api

    from fabric.cli import _node_address, _node_secret

    for flag, attr, least, most in LIMITS:
        value = getattr(args, attr)
        if not least <= value <= most:  # checked before anything is started (a negative --nodes divided by zero)
            raise FabricError(StatusCode.INVALID_ARGUMENT, f"{flag} must be {least}-{most}, got {value}")
    node = _node_address(args)
    if node and args.nodes:
        raise FabricError(StatusCode.INVALID_ARGUMENT, "--node (or $FABRIC_NODE) and --nodes exclude each other")
    if node:
        return node_main(args, node, _node_secret(args, node))
    data = Path(args.data) if args.data else api.default_home()
    if args.nodes:
        return fleet_main(args, data)
    api.open(data).close()  # a file, or another program's LMDB, is refused before anything is printed or started
    spec = _examples_spec()
    console = Console()
    console.print(f"[bold]evalfabric demo[/]: {args.agents} agents × {args.requests} requests over {args.distinct} distinct, embedded cassette at {data}")
    before = _records(data)
    procs = []
    for i in range(args.agents):
        cmd = [
            sys.executable, "-m", "fabric.demo", "--data", str(data), "--agent", str(i),
            "--requests", str(args.requests), "--distinct", str(args.distinct),
            "--seed", str(args.seed), "--evaluators", spec,
        ]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True))
    rows, failed = _collect(procs)
    after = _records(data)
    table = Table(title="per-agent results")
    for col in ("agent", "pid", "requests", "hits (local)", "computed", "seconds"):
        table.add_column(col, justify="right")
    for r in sorted(rows, key=lambda r: r["agent"]):
        table.add_row(str(r["agent"]), str(r["pid"]), str(r["local"] + r["peer"] + r["computed"]), str(r["local"] + r["peer"]), str(r["computed"]), f"{r['elapsed_s']:.2f}")
    console.print(table)
    runs = sum(r["computed"] for r in rows)
    total = sum(r["local"] + r["peer"] + r["computed"] for r in rows)
    console.print(
        f"requests: {total}   evaluator runs: {runs}   new records: {after - before}   "
        f"hit rate: {(total - runs) / max(total, 1):.0%}   (distinct requests in pool: {args.distinct})"
    )
    if runs != after - before:
        console.print("[red]evaluator runs differ from new ledger records: compute-once was violated[/]")
        return 1
    return 1 if failed else 0


def node_main(args: argparse.Namespace, node: str, secret: bytes) -> int:
    """``fabric demo --node HOST:PORT``: the agents realize through that running node.

    The summary counts evaluator runs on the node from its ``fabric_evaluator_runs``
    metric and new records from its stats; a run that left no new record there
    means compute-once was violated (exit 1), as does a failed agent.
    """
    import tempfile

    from rich.console import Console
    from rich.table import Table

    from fabric import api

    spec = _examples_spec()
    console = Console()
    with api.open(node, secret=secret) as fab:  # an unreachable node or a wrong secret fails here, once
        before = _node_counts(fab.stats())
        node_id = fab.node_id
    console.print(f"[bold]evalfabric demo[/]: {args.agents} agents × {args.requests} requests over {args.distinct} distinct, "
                  f"through node {node} (id {node_id})")
    with tempfile.TemporaryDirectory(prefix="fabric-demo-") as unused:  # agents take --data; through a node they never open it
        procs = []
        for i in range(args.agents):
            cmd = [sys.executable, "-m", "fabric.demo", "--data", unused, "--agent", str(i), "--requests", str(args.requests),
                   "--distinct", str(args.distinct), "--seed", str(args.seed), "--evaluators", spec, "--node", node]
            if args.secret_file:
                cmd += ["--secret-file", str(args.secret_file)]
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True))
        rows, failed = _collect(procs)
    with api.open(node, secret=secret) as fab:
        after = _node_counts(fab.stats())
    table = Table(title="per-agent results")
    for col in ("agent", "pid", "requests", "local", "peer", "computed", "seconds"):
        table.add_column(col, justify="right")
    for r in sorted(rows, key=lambda r: r["agent"]):
        table.add_row(str(r["agent"]), str(r["pid"]), str(r["local"] + r["peer"] + r["computed"]), str(r["local"]),
                      str(r["peer"]), str(r["computed"]), f"{r['elapsed_s']:.2f}")
    console.print(table)
    total = sum(r["local"] + r["peer"] + r["computed"] for r in rows)
    runs, new = after[0] - before[0], after[1] - before[1]
    console.print(f"requests: {total}   evaluator runs on the node: {runs:g}   new records on the node: {new}   "
                  f"hit rate: {(total - sum(r['computed'] for r in rows)) / max(total, 1):.0%}   "
                  f"(distinct requests in pool: {args.distinct})")
    if failed:
        console.print(f"[red]{failed} agent(s) failed; see their errors above[/]")
    if runs > new:
        console.print("[red]more evaluator runs than new records on the node: compute-once was violated[/]")
        return 1
    return 1 if failed else 0


def _node_counts(stats: dict) -> tuple[float, int]:
    """(evaluator runs, records) of a node's stats answer."""
    node = stats["node"]
    runs = sum(v for k, v in node.get("metrics", {}).items() if k.startswith("fabric_evaluator_runs_total"))
    return runs, node["records"]


def _start_fleet(n: int, root: Path, secret_file: Path, spec: str, env: dict) -> list[tuple[str, subprocess.Popen]]:
    """``n`` node processes under ``root`` (the first is the others' seed); returns (address, process)."""
    import selectors

    nodes: list[tuple[str, subprocess.Popen]] = []
    for i in range(n):
        cmd = [sys.executable, "-m", "fabric.cli", "node", "--data", str(root / f"node{i}"), "--listen", "127.0.0.1:0",
               "--secret-file", str(secret_file), "--evaluators", spec, "--gossip-interval", "0.3"]
        if nodes:
            cmd += ["--join", nodes[0][0]]
        log = open(root / f"node{i}.log", "a")
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        log.close()
        sel = selectors.DefaultSelector()
        sel.register(p.stdout, selectors.EVENT_READ)
        line = p.stdout.readline().strip() if sel.select(30) else ""
        if not line.startswith("listening on "):
            p.kill()
            _stop_fleet(nodes)
            from cassette.errors import FabricError, StatusCode

            raise FabricError(StatusCode.UNAVAILABLE, f"demo node {i} did not start; see {root / f'node{i}.log'}")
        nodes.append((line.split()[2], p))
    return nodes


def _stop_fleet(nodes: list[tuple[str, subprocess.Popen]]) -> None:
    import signal

    for _, p in nodes:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for _, p in nodes:
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()


def fleet_main(args: argparse.Namespace, data: Path) -> int:
    """``fabric demo --nodes N``: a local fleet of N nodes; agents each talk to one node."""
    import secrets as _secrets

    from rich.console import Console
    from rich.table import Table

    from fabric import api

    console = Console()
    root = data / "demo-fleet"
    root.mkdir(parents=True, exist_ok=True)
    secret_file = root / "secret"
    if not secret_file.exists():
        secret_file.write_text(_secrets.token_urlsafe(32))
    runs_log = root / "evaluator-runs.log"
    runs_before = len(runs_log.read_text().splitlines()) if runs_log.exists() else 0
    env = dict(os.environ, FABRIC_EVAL_LOG=str(runs_log))
    spec = _examples_spec()
    console.print(f"[bold]evalfabric fleet demo[/]: {args.nodes} nodes, {args.agents} agents × {args.requests} requests over {args.distinct} distinct (data under {root})")
    nodes = _start_fleet(args.nodes, root, secret_file, spec, env)
    try:
        secret = api.read_secret_file(secret_file)
        _wait_converged([a for a, _ in nodes], secret, args.nodes)
        procs = []
        for i in range(args.agents):
            cmd = [sys.executable, "-m", "fabric.demo", "--data", str(root), "--agent", str(i), "--requests", str(args.requests),
                   "--distinct", str(args.distinct), "--seed", str(args.seed), "--evaluators", spec,
                   "--node", nodes[i % len(nodes)][0], "--secret-file", str(secret_file)]
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True))
        rows, failed = _collect(procs)
        table = Table(title="per-agent results")
        for col in ("agent", "node", "requests", "local", "peer", "computed", "seconds"):
            table.add_column(col, justify="right")
        for r in sorted(rows, key=lambda r: r["agent"]):
            table.add_row(str(r["agent"]), str(r["agent"] % len(nodes)), str(r["local"] + r["peer"] + r["computed"]),
                          str(r["local"]), str(r["peer"]), str(r["computed"]), f"{r['elapsed_s']:.2f}")
        console.print(table)
        ntable = Table(title="per-node view")
        for col in ("node", "id", "records", "facts", "live members", "gossip rounds"):
            ntable.add_column(col, justify="right")
        for i, (addr, _) in enumerate(nodes):
            with api.open(addr, secret=secret) as f:
                st = f.stats()["node"]
            ntable.add_row(str(i), st["node_id"], str(st["records"]), str(st.get("facts", "")), str(st.get("members_live", "")), str(st.get("gossip_rounds", "")))
        console.print(ntable)
    finally:
        _stop_fleet(nodes)
    runs = len(runs_log.read_text().splitlines()) - runs_before if runs_log.exists() else 0
    total = sum(r["local"] + r["peer"] + r["computed"] for r in rows)
    console.print(f"requests: {total}   evaluator runs fleet-wide: {runs}   (distinct requests in pool: {args.distinct}; "
                  f"a second run computes nothing)")
    return 1 if failed else 0


def _wait_converged(addrs: list[str], secret: bytes, n: int, timeout: float = 30.0) -> None:
    from fabric import api

    deadline = time.monotonic() + timeout
    for a in addrs:
        while True:
            with api.open(a, secret=secret) as f:
                if f.stats()["node"].get("members_live") == n:
                    break
            if time.monotonic() > deadline:
                from cassette.errors import FabricError, StatusCode

                raise FabricError(StatusCode.DEADLINE_EXCEEDED, f"demo fleet did not converge to {n} members in {timeout:g} s")
            time.sleep(0.2)


def _collect(procs: list[subprocess.Popen]) -> tuple[list[dict], int]:
    """Each agent's JSON counts line, and how many agents failed."""
    rows, failed = [], 0
    for p in procs:
        out, _ = p.communicate(timeout=600)
        if p.returncode != 0:
            failed += 1
            continue
        rows.append(json.loads(out.strip().splitlines()[-1]))
    return rows, failed


def _records(path: Path) -> int:
    from cassette.store import Cassette

    if not (path / "data.mdb").exists():
        return 0
    from fabric.local import open_cassette, release_cassette

    entry = open_cassette(path)
    try:
        cas: Cassette = entry[0]
        return cas.stats()["records"]
    finally:
        release_cassette(path)


if __name__ == "__main__":
    raise SystemExit(agent_main(sys.argv[1:]))
