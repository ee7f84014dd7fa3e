"""Real `fabric node` subprocesses for tests (loopback only, always stopped)."""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EVALUATORS = str(ROOT / "examples" / "evaluators.py")
FABRIC = str(Path(sys.executable).parent / "fabric")
SECRET = b"test-secret-0123456789abcdef-XYZ"


def start_node(tmp_path: Path, name: str = "node", *extra: str, env: dict | None = None,
               evaluators: str | None = EVALUATORS) -> tuple[str, subprocess.Popen, Path]:
    """Start a node (loading ``evaluators`` unless None; ``extra`` may add more); returns
    (address, process, data_dir) once it printed its listening line."""
    secret_file = tmp_path / "secret"
    secret_file.write_bytes(SECRET)
    data = tmp_path / name
    cmd = [FABRIC, "node", "--data", str(data), "--listen", "127.0.0.1:0", "--secret-file", str(secret_file),
           *(["--evaluators", evaluators] if evaluators else []), "--drain-s", "10", *extra]
    # logs go to a file: a pipe nobody reads would block a chatty node once full
    log = open(tmp_path / f"{name}.log", "a")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True,
                            env=dict(os.environ, **(env or {})), cwd=str(ROOT))
    log.close()
    proc.log_path = tmp_path / f"{name}.log"  # type: ignore[attr-defined]
    try:
        line = _readline(proc, 30)
        assert line.startswith("listening on "), line
        assert line.split()[3].startswith("node=")
    except BaseException:
        stop_node(proc)
        raise
    return line.split()[2], proc, data


def stop_node(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> int | None:
    """Stop a node (SIGTERM, then SIGKILL after 20 s); returns its exit status."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    for f in (proc.stdout, proc.stderr):
        if f and not f.closed:
            f.close()
    return proc.returncode


@contextmanager
def node(tmp_path: Path, name: str = "node", *extra: str, env: dict | None = None):
    """A `fabric node` subprocess; yields (address, proc, data_dir); always stopped."""
    addr, proc, data = start_node(tmp_path, name, *extra, env=env)
    try:
        yield addr, proc, data
    finally:
        stop_node(proc)


def _readline(proc: subprocess.Popen, timeout: float) -> str:
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    if not sel.select(timeout):
        proc.kill()
        raise AssertionError(f"node did not start in {timeout}s")
    return proc.stdout.readline().strip()


@asynccontextmanager
async def in_process_node(fab, limits=None):
    """A node serving the embedded ``fab`` inside this trio run (127.0.0.1, ``limits`` or the
    defaults), for tests that need node limits a subprocess does not take; yields
    ``(address, service)`` and stops serving on exit."""
    import trio

    from fabric.net import serve
    from fabric.serve import NodeService

    service = NodeService(fab)
    async with trio.open_nursery() as nursery:
        at = await nursery.start(lambda task_status: serve("127.0.0.1", 0, SECRET, service.handle, limits,
                                                           node_id=fab.node_id, task_status=task_status))
        try:
            yield f"{at.host}:{at.port}", service
        finally:
            nursery.cancel_scope.cancel()


def realize_at_once(addr: str, req, n: int, timeout: float = 30.0) -> list:
    """``n`` clients, each on its own connection and thread, realize ``req`` through the node
    at ``addr`` at the same time; their replies (AssertionError if any failed)."""
    import threading

    import fabric

    replies, errors = [], []

    def ask() -> None:
        try:
            with fabric.open(addr, secret=SECRET) as f:
                replies.append(f.realize(req, timeout=timeout))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=ask) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(2 * timeout)
    assert not errors and len(replies) == n, errors
    return replies


def wait_until(pred, timeout: float, what: str, interval: float = 0.05):
    """``pred()``'s first truthy value, polling every ``interval`` s; AssertionError naming
    ``what`` (and the last value) after ``timeout`` s."""
    import time

    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


@contextmanager
def embedded_and_remote(tmp: Path):
    """``{"embedded": Fabric, "remote": RemoteFabric, "addr": node address, "tmp": tmp}``: an
    embedded fabric in ``tmp/embedded`` and a client of a real node subprocess (durability
    fast) on ``tmp/node``, for tests that hold both to one behaviour; the node must still be
    serving when the block ends."""
    import fabric

    with node(tmp, "node", "--durability", "fast") as (addr, proc, _), fabric.open(tmp / "embedded") as emb, \
            fabric.open(addr, secret=SECRET) as rem:
        yield {"embedded": emb, "remote": rem, "addr": addr, "tmp": tmp}
        assert proc.poll() is None  # every test left it serving
