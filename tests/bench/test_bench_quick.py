"""``fabric bench --quick`` keeps working: structure only, never timing.

One in-process quick run (module-scoped) feeds the structural checks: every
benchmark has rows, every compared row carries finite positive figures and a
verdict that agrees with its goal, the table has its columns, and ``--json``
writes a parseable document with machine info.  Whether a goal is met is for
engineers to read, not for this suite to assert.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

from fabric import bench
from fabric.bench import _core
from fabric.bench._core import Ctx, Row, compare, fmt_num

pytestmark = pytest.mark.slow

COMPARED = {"meets", "misses", "info"}
STATUSES = {"meets", "misses", "info", "not built", "skipped", "error"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """``fabric bench --quick --json FILE --data DIR`` through the CLI entry point, once."""
    import contextlib
    import io

    from fabric.cli import main

    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "bench.json"
    scratch = tmp / "scratch"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["bench", "--quick", "--json", str(out), "--data", str(scratch)])
    return SimpleNamespace(rc=rc, stdout=buf.getvalue(), json_path=out, scratch=scratch)


def _finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def test_quick_run_exits_zero_and_prints_one_table(quick_run):
    assert quick_run.rc == 0, quick_run.stdout
    for col in ("measure", "ours", "floor / peer", "ratio", "goal", "verdict"):
        assert col in quick_run.stdout
    assert "wrote " in quick_run.stdout


def test_json_has_machine_info_and_rows_for_every_benchmark(quick_run):
    doc = json.loads(quick_run.json_path.read_text())
    assert doc["schema"] == "evalfabric-bench/1"
    assert doc["quick"] is True
    m = doc["machine"]
    assert isinstance(m["cpu_count"], int) and m["cpu_count"] >= 1
    assert m["platform"] and m["python"]
    names = {r["bench"] for r in doc["rows"]}
    for name, _ in bench.BENCHMARKS:
        assert name in names, f"no row for benchmark {name}"


def test_compared_rows_have_finite_positive_figures(quick_run):
    doc = json.loads(quick_run.json_path.read_text())
    compared = [r for r in doc["rows"] if r["verdict"] in COMPARED]
    assert compared, "no benchmark compared anything"
    for r in doc["rows"]:
        assert r["verdict"] in STATUSES, r
        if r["verdict"] not in COMPARED:
            continue
        assert _finite_positive(r["ours"]), r
        assert _finite_positive(r["other"]), r
        assert _finite_positive(r["ratio"]), r
        assert r["other_label"], r


def test_verdicts_agree_with_goals(quick_run):
    doc = json.loads(quick_run.json_path.read_text())
    for r in doc["rows"]:
        if r["verdict"] not in COMPARED:
            continue
        if r["goal_op"] is None:
            assert r["verdict"] == "info", r
            continue
        ok = r["ratio"] >= r["goal"] if r["goal_op"] == ">=" else r["ratio"] <= r["goal"]
        assert r["verdict"] == ("meets" if ok else "misses"), r


def test_the_local_floors_and_peers_are_all_present(quick_run):
    doc = json.loads(quick_run.json_path.read_text())
    labels = {(r["bench"], r["other_label"].split(":")[0]) for r in doc["rows"]}
    assert ("local-hit-1k", "floor") in labels
    assert ("local-hit-1k", "peer") in labels
    assert ("local-hit-1m", "floor") in labels
    assert ("durable-write", "floor") in labels
    assert ("replay", "floor") in labels
    assert ("net", "floor") in labels
    assert ("remote-hit", "floor") in labels
    assert ("remote-fetch", "floor") in labels


def _rows(quick_run, bench_name: str) -> list[dict]:
    doc = json.loads(quick_run.json_path.read_text())
    return [r for r in doc["rows"] if r["bench"] == bench_name]


def _one(rows: list[dict], starts: str) -> dict:
    found = [r for r in rows if r["measure"].startswith(starts)]
    assert len(found) == 1, (starts, [r["measure"] for r in rows])
    return found[0]


def _measured(r: dict) -> None:
    assert r["verdict"] in COMPARED, r
    for field in ("ours", "other", "ratio"):
        assert _finite_positive(r[field]), (field, r)


def test_remote_hit_latency_rows_sit_next_to_the_raw_rtt(quick_run):
    rows = _rows(quick_run, "remote-hit")
    p50, p99 = _one(rows, "hit latency p50"), _one(rows, "hit latency p99")
    for r in (p50, p99):
        _measured(r)
        assert r["unit"] == "µs" and r["other_label"].startswith("floor: raw trio")
        assert r["ratio"] == pytest.approx(r["ours"] / r["other"])  # a cost: ours / floor
        assert r["extra"]["samples"] > 0 and r["extra"]["floor_samples"] > 0
    assert (p50["goal_op"], p50["goal"]) == ("<=", 2.0)
    assert p99["ours"] >= p50["ours"] and p99["other"] >= p50["other"]


def test_remote_pipelined_rows_compare_with_sequential_on_the_same_connection(quick_run):
    rows = [r for r in _rows(quick_run, "remote-hit") if r["measure"].startswith("pipelined hits")]
    assert rows
    for r in rows:
        _measured(r)
        assert r["other_label"] == "same connection, sequential"
        assert (r["goal_op"], r["goal"]) == (">=", 5.0)
        assert r["extra"].get("tasks", 0) > 1 or r["extra"].get("batch", 0) > 1  # tasks sharing it, or one arealize_many
        assert r["ratio"] == pytest.approx(r["ours"] / r["other"])
    assert any("arealize_many" in r["measure"] for r in rows)


def test_remote_fetch_rows_measure_1_and_2_holders(quick_run):
    rows = _rows(quick_run, "remote-fetch")
    one = [r for r in rows if "1 holder" in r["measure"]]
    assert one and all("16 MiB" in r["measure"] for r in one)
    for r in one:
        _measured(r)
        assert r["unit"] == "GiB/s" and r["other_label"].startswith("floor: raw")
    _measured(_one(rows, "verified fetch, 16 MiB artifact, 2 holders in parallel (fabric)"))
    _measured(_one(rows, "verified fetch through a fleet member that lacks the artifact, 16 MiB, 1 holder live"))
    second = _one(rows, "what a second holder buys")
    _measured(second)
    assert second["ratio"] == pytest.approx(second["ours"] / second["other"])
    _measured(_one(rows, "2 holders by hand"))
    assert not [r for r in rows if r["verdict"] == "not built"]


def test_scratch_stores_are_removed(quick_run):
    left = list(quick_run.scratch.iterdir()) if quick_run.scratch.exists() else []
    assert left == []


# ----------------------------------------------------------------- plumbing
def test_only_selects_by_substring_and_rejects_no_match(capsys):
    assert [n for n, _ in bench.selected(["hit"])] == ["local-hit-1k", "local-hit-1m", "remote-hit"]
    assert [n for n, _ in bench.selected(["local-hit"])] == ["local-hit-1k", "local-hit-1m"]
    assert [n for n, _ in bench.selected(["remote"])] == ["remote-hit", "remote-fetch"]
    assert [n for n, _ in bench.selected([])] == [n for n, _ in bench.BENCHMARKS]
    rc = bench.main(SimpleNamespace(quick=True, json=None, only=["no-such-benchmark"], data=None))
    assert rc == 2
    assert "matches no benchmark" in capsys.readouterr().err


def test_a_broken_benchmark_becomes_an_error_row_and_exit_1(monkeypatch, tmp_path, capsys):
    def boom(ctx: Ctx) -> None:
        ctx.add(Row("boom", "half a row"))
        raise RuntimeError("kaput")

    def fine(ctx: Ctx) -> None:
        ctx.add(compare("fine", "x", 2.0, 1.0, unit="ops/s", other_label="floor: y", goal_op=">=", goal=1.5))

    monkeypatch.setattr(bench, "BENCHMARKS", [("boom", boom), ("fine", fine)])
    out = tmp_path / "b.json"
    rc = bench.main(SimpleNamespace(quick=True, json=str(out), only=[], data=str(tmp_path / "s")))
    assert rc == 1
    rows = json.loads(out.read_text())["rows"]
    assert [(r["bench"], r["verdict"]) for r in rows] == [("boom", "error"), ("fine", "meets")]
    assert "kaput" in rows[0]["note"]


def test_row_verdicts_follow_the_goal_direction():
    assert compare("b", "m", 3.0, 1.0, unit="u", other_label="floor", goal_op=">=", goal=2.0).verdict == "meets"
    assert compare("b", "m", 1.0, 1.0, unit="u", other_label="floor", goal_op=">=", goal=2.0).verdict == "misses"
    assert Row("b", "m", 5, "rounds", 10, "bound", None, 0.5, "<=", 1.0).verdict == "meets"
    assert Row("b", "m", 15, "rounds", 10, "bound", None, 1.5, "<=", 1.0).verdict == "misses"
    assert compare("b", "m", 1.0, 2.0, unit="u", other_label="peer").verdict == "info"
    assert Row("b", "m", verdict="not built").verdict == "not built"


def test_best_rates_returns_a_positive_rate_per_contender():
    rates = _core.best_rates({"a": lambda n: sum(range(n)), "b": lambda n: [0] * n}, 0.02, min_rounds=2, cap=1 << 12)
    assert set(rates) == {"a", "b"}
    assert all(_finite_positive(v) for v in rates.values())


def test_threaded_rate_counts_calls_from_every_thread():
    seen = set()
    rate = _core.threaded_rate(seen.add, 4, 0.02)
    assert rate > 0 and len(seen) > 0


@pytest.mark.parametrize(
    "x, text",
    [(None, "—"), (3, "3"), (0.5, "0.5"), (1234.0, "1,234"), (12_345.0, "12.3k"), (2.5e6, "2.5M"), (float("inf"), "inf")],
)
def test_fmt_num(x, text):
    assert fmt_num(x) == text
