"""Benchmark plumbing: result rows, same-run timing, scratch directories, the table.

Every row pairs OUR figure with a FLOOR (the raw libraries doing the least work
that could answer the same question) or a PEER (another library answering it),
both measured in the same process, interleaved, so machine noise hits both.
A row's ``ratio`` is oriented so that the goal reads naturally: for rates it is
``ours / other`` (higher is better, goal ``>=``); for costs such as rounds or
bytes it is defined per row and the goal says ``<=``.  Verdicts are
informational: a miss never fails the run.
"""

from __future__ import annotations

import gc
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

__all__ = ["Row", "Ctx", "best_rates", "threaded_rate", "machine_info", "fmt_num", "render", "rows_to_json"]

#: Verdict strings (rows that compare) and statuses (rows that cannot).
MEETS, MISSES, INFO = "meets", "misses", "info"
NOT_BUILT, SKIPPED, ERROR = "not built", "skipped", "error"


@dataclass
class Row:
    """One line of the table (and of the JSON file)."""

    bench: str  # benchmark name, what --only matches
    measure: str  # what is measured, in words
    ours: float | None = None
    unit: str = ""
    other: float | None = None
    other_label: str = ""  # "floor: ..." or "peer: ..."
    other_unit: str | None = None  # defaults to ``unit``
    ratio: float | None = None
    goal_op: str | None = None  # ">=" or "<="
    goal: float | None = None
    verdict: str = INFO
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.verdict == INFO and self.ratio is not None and self.goal_op is not None and self.goal is not None:
            ok = self.ratio >= self.goal if self.goal_op == ">=" else self.ratio <= self.goal
            self.verdict = MEETS if ok else MISSES

    @property
    def goal_text(self) -> str:
        """The goal as the table prints it (``≥ 5×``), or ``—`` when the row has none."""
        if self.goal_op is None or self.goal is None:
            return "—"
        return f"{'≥' if self.goal_op == '>=' else '≤'} {fmt_num(self.goal)}×"


def compare(bench: str, measure: str, ours: float, other: float, *, unit: str, other_label: str,
            goal_op: str | None = None, goal: float | None = None, note: str = "", **extra: Any) -> Row:
    """A rate row: ``ratio = ours / other`` (both higher-is-better)."""
    ratio = ours / other if other > 0 else math.inf
    return Row(bench, measure, ours, unit, other, other_label, None, ratio, goal_op, goal, INFO, note, dict(extra))


class Ctx:
    """What one benchmark run shares: size (quick/full), where scratch dirs go, its rows."""

    def __init__(self, *, quick: bool, base_dir: str | None = None) -> None:
        self.quick = quick
        self.base_dir = base_dir
        self.rows: list[Row] = []
        self.timings: dict[str, float] = {}  # seconds each benchmark took, for the JSON file
        #: seconds of timed work per measured figure (split over interleaved rounds)
        self.budget = 0.15 if quick else 1.0

    def add(self, row: Row) -> Row:
        """Append ``row`` to this run's table; returns it."""
        self.rows.append(row)
        return row

    @contextmanager
    def tempdir(self, tag: str) -> Iterator[str]:
        """A fresh scratch directory, removed afterwards whatever happens."""
        if self.base_dir:
            os.makedirs(self.base_dir, exist_ok=True)
        d = tempfile.mkdtemp(prefix=f"fabric-bench-{tag}-", dir=self.base_dir)
        try:
            yield d
        finally:
            shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------- timing
def _timed(fn: Callable[[int], Any], n: int) -> float:
    enabled = gc.isenabled()
    gc.disable()
    try:
        t0 = time.perf_counter()
        fn(n)
        return time.perf_counter() - t0
    finally:
        if enabled:
            gc.enable()


def _calibrate(fn: Callable[[int], Any], target: float, cap: int) -> int:
    """Smallest power-of-two batch (≤ cap) that takes at least ``target`` seconds."""
    n = 1
    while n < cap:
        if _timed(fn, n) >= target:
            return n
        n *= 2
    return cap


def best_rates(fns: dict[str, Callable[[int], Any]], budget: float, *, min_rounds: int = 3, cap: int = 1 << 20) -> dict[str, float]:
    """Best ops/s of each ``fn(n)`` (which does ``n`` operations), batches interleaved.

    Each function is calibrated to a batch of ~``budget/10`` seconds; then rounds
    run every function once, in turn, until ``budget`` seconds per function are
    spent.  The best batch wins (as ``timeit`` advises: slower batches measure
    interference, not the code).  GC is off inside a batch for every contender.
    """
    target = max(budget / 10, 0.002)
    sizes = {name: _calibrate(fn, target, cap) for name, fn in fns.items()}
    best = {name: 0.0 for name in fns}
    spent = {name: 0.0 for name in fns}
    rounds = 0
    while rounds < min_rounds or min(spent.values()) < budget:
        for name, fn in fns.items():
            n = sizes[name]
            t = _timed(fn, n)
            spent[name] += t
            if t > 0:
                best[name] = max(best[name], n / t)
        rounds += 1
        if rounds > 10_000:
            break
    return best


def threaded_rate(op: Callable[[int], Any], threads: int, duration: float) -> float:
    """Ops/s of ``op(i)`` called in a loop by ``threads`` threads for ``duration`` seconds.

    ``i`` is a process-wide unique counter (so every call can use a fresh key).
    The clock stops when the last thread has finished its last call.
    """
    import itertools
    import threading

    counter = itertools.count()
    nxt = counter.__next__  # atomic under the GIL
    done = [0] * threads
    start = threading.Barrier(threads + 1)
    errors: list[BaseException] = []
    deadline = [0.0]

    def worker(w: int) -> None:
        start.wait()
        n = 0
        try:
            while time.perf_counter() < deadline[0]:
                op(nxt())
                n += 1
        except BaseException as exc:  # noqa: BLE001 - reported to the caller
            errors.append(exc)
        done[w] = n

    ts = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(threads)]
    for t in ts:
        t.start()
    t0 = time.perf_counter()
    deadline[0] = t0 + duration
    start.wait()
    for t in ts:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return sum(done) / elapsed


# --------------------------------------------------------------------- reporting
def machine_info() -> dict[str, Any]:
    """Where the numbers came from."""
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
    }
    try:
        info["cpus_usable"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions = {}
    from importlib import metadata

    for dist in ("evalfabric", "lmdb", "msgpack", "blake3", "numpy", "trio", "diskcache", "joblib", "cupy-cuda12x"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    info["versions"] = versions
    return info


def fmt_num(x: float | None) -> str:
    """Compact human number: 3 significant digits, k/M/G suffixes for large values."""
    if x is None:
        return "—"
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return str(x)
    ax = abs(x)
    for div, suf in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if ax >= div * 0.9995 and ax >= 10_000:
            return f"{x / div:.3g}{suf}"
    if ax >= 100 or float(x).is_integer():
        return f"{x:,.0f}"
    return f"{x:.3g}"


def _cell(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    return f"{fmt_num(value)} {unit}".strip()


def render(rows: list[Row], *, title: str, console: Any = None) -> None:
    """Print the rows as one rich table (notes as numbered footnotes)."""
    from rich.console import Console
    from rich.table import Table

    from rich.markup import escape

    console = console or Console()
    table = Table(title=title, show_lines=False, header_style="bold")
    table.add_column("measure", overflow="fold")
    table.add_column("ours", justify="right")
    table.add_column("floor / peer", overflow="fold")
    table.add_column("ratio", justify="right")
    table.add_column("goal", justify="right")
    table.add_column("verdict")
    style = {MEETS: "green", MISSES: "red", INFO: "cyan", NOT_BUILT: "yellow", SKIPPED: "yellow", ERROR: "bold red"}
    notes: list[str] = []
    group = None
    for r in rows:
        if r.bench != group:
            if group is not None:
                table.add_section()
            group = r.bench
            measure = f"[bold]{escape(r.bench)}[/bold]: {escape(r.measure)}"
        else:
            measure = escape(r.measure)
        if r.note:
            notes.append(r.note)
            measure += f" [dim]({len(notes)})[/dim]"
        other = "—" if not r.other_label else (f"{r.other_label}: {_cell(r.other, r.other_unit or r.unit)}" if r.other is not None else r.other_label)
        ratio = "—" if r.ratio is None else f"{fmt_num(r.ratio)}×"
        verdict = r.verdict
        if verdict == SKIPPED and r.note:
            verdict = f"{verdict}: {r.note.split(' (')[0]}"
        table.add_row(measure, _cell(r.ours, r.unit), escape(other), ratio, r.goal_text, f"[{style.get(r.verdict, '')}]{escape(verdict)}[/]")
    console.print(table)
    for i, n in enumerate(notes, 1):
        console.print(f"  [dim]({i}) {escape(n)}[/dim]", highlight=False)


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def rows_to_json(rows: list[Row], *, quick: bool, elapsed_s: float) -> dict[str, Any]:
    """The JSON document ``--json FILE`` writes."""
    out = []
    for r in rows:
        d = asdict(r)
        d["goal_text"] = r.goal_text
        d["other_unit"] = r.other_unit or r.unit
        out.append(_jsonable(d))
    return {
        "schema": "evalfabric-bench/1",
        "quick": quick,
        "created": time.time(),
        "elapsed_s": round(elapsed_s, 3),
        "machine": machine_info(),
        "rows": out,
    }
