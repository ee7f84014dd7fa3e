"""realize(): lookup order, compute-once, errors, registry — on real cassettes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import trio

import fabric
from fabric import registry
from fabric.errors import FabricError, StatusCode

ROOT = Path(__file__).resolve().parent.parent

_runs: dict[str, int] = {}
_gate = threading.Event()


def _count(name: str) -> None:
    _runs[name] = _runs.get(name, 0) + 1


@fabric.evaluator("t.square", version="1")
def square(x: int) -> int:
    _count("t.square")
    return x * x


@fabric.evaluator("t.gated", version="1")
def gated(x: int) -> list:
    """Blocks until the test opens the gate, so every concurrent caller arrives first."""
    _count("t.gated")
    assert _gate.wait(10)
    return [x, x + 1]


@fabric.evaluator("t.boom", version="1")
def boom(msg: str) -> None:
    _count("t.boom")
    raise KeyError(msg)


@fabric.evaluator("t.arr", version="1")
def arr(n: int) -> dict:
    return {"a": np.arange(n, dtype=np.float64), "t": (1, 2), "k": fabric.ContentKey.of("blob", b"x")}


@pytest.fixture
def fab(tmp_path):
    _runs.clear()
    _gate.clear()
    f = fabric.open(tmp_path / "node")
    yield f
    f.close()


def test_computed_then_local_same_value(fab):
    req = fabric.Request("t.square", {"x": 12})
    first = fab.realize(req)
    assert (first.source, first.value, first.holder) == ("computed", 144, fab.node_id)
    second = fab.realize(fabric.Request("t.square", {"x": 12}))
    assert (second.source, second.value) == ("local", 144)
    assert second.key == first.key == req.key
    assert _runs["t.square"] == 1


def test_reply_values_are_the_same_whether_computed_or_local(fab):
    computed = fab.realize(fabric.Request("t.arr", {"n": 5}))
    local = fab.realize(fabric.Request("t.arr", {"n": 5}))
    for rep in (computed, local):
        assert rep.value["t"] == [1, 2]  # tuples come back as lists, both times
        np.testing.assert_array_equal(rep.value["a"], np.arange(5, dtype=np.float64))
        assert rep.value["a"].flags.writeable is False
        assert rep.value["k"] == fabric.ContentKey.of("blob", b"x")


def test_reopen_serves_from_cassette(tmp_path):
    _runs.clear()
    with fabric.open(tmp_path / "n") as f:
        assert f.realize(fabric.Request("t.square", {"x": 3})).source == "computed"
    with fabric.open(tmp_path / "n") as f:
        rep = f.realize(fabric.Request("t.square", {"x": 3}))
    assert (rep.source, rep.value, _runs["t.square"]) == ("local", 9, 1)


def test_evaluator_exception_reaches_caller_and_is_not_recorded(fab):
    with pytest.raises(KeyError) as ei:
        fab.realize(fabric.Request("t.boom", {"msg": "no such row"}))
    assert ei.value.args == ("no such row",)
    with pytest.raises(KeyError):
        fab.realize(fabric.Request("t.boom", {"msg": "no such row"}))
    assert _runs["t.boom"] == 2  # not recorded, so not served from the cassette
    assert fab.cassette.stats()["records"] == 0


def test_unknown_evaluator_is_not_found_listing_registered(fab):
    with pytest.raises(FabricError) as ei:
        fab.realize(fabric.Request("t.nope", {}))
    err = ei.value
    assert err.status_code is StatusCode.NOT_FOUND
    assert "'t.nope'" in err.message and "t.square@1" in err.message


def test_unknown_version_is_not_found(fab):
    with pytest.raises(FabricError) as ei:
        fab.realize(fabric.Request("t.square", {"x": 1}, version="9"))
    assert ei.value.status_code is StatusCode.NOT_FOUND and "'9'" in ei.value.message


def test_bad_args_raise_invalid_argument_with_path_at_key():
    req = fabric.Request("t.square", {"x": {"deep": [1, {2, 3}]}})
    with pytest.raises(FabricError) as ei:
        req.key
    assert ei.value.status_code is StatusCode.INVALID_ARGUMENT
    assert str(ei.value) == "INVALID_ARGUMENT: args.x.deep[1]: set is not encodable"


def test_args_must_be_a_dict():
    with pytest.raises(FabricError) as ei:
        fabric.Request("t.square", [1, 2])
    assert ei.value.status_code is StatusCode.INVALID_ARGUMENT


def test_version_is_part_of_the_key_and_latest_is_default():
    @fabric.evaluator("t.versioned", version="1")
    def v1(x):
        return ("v1", x)

    @fabric.evaluator("t.versioned", version="2")
    def v2(x):
        return ("v2", x)

    assert fabric.Request("t.versioned", {"x": 1}).version == "2"
    k1 = fabric.Request("t.versioned", {"x": 1}, version="1").key
    k2 = fabric.Request("t.versioned", {"x": 1}, version="2").key
    assert k1 != k2
    assert fabric.Request("t.versioned", {"x": 1}).key == k2


def test_registering_a_different_function_under_same_name_version_fails():
    with pytest.raises(FabricError) as ei:

        @fabric.evaluator("t.square", version="1")
        def impostor(x):
            return -x

    assert ei.value.status_code is StatusCode.FAILED_PRECONDITION
    # the original is still registered
    assert registry.lookup("t.square", "1").fn is square


def test_reregistering_the_same_function_is_idempotent():
    fabric.evaluator("t.square", version="1")(square)
    assert registry.lookup("t.square", "1").fn is square


class _Scaled:
    def __init__(self, k):
        self.k = k

    def __call__(self, x):
        return self.k * x


def _times(x, k):
    return k * x


def _definitions(body: str):
    """Two functions defined from ``body`` as a module reload would: one per exec."""
    made = []
    for _ in range(2):
        ns: dict = {"__name__": "t_redef"}
        exec(compile(body, "t_redef.py", "exec"), ns)
        made.append(ns["f"])
    return made


@pytest.mark.parametrize("what", ["redefined", "lambdas", "partials", "instances", "closures"])
def test_a_different_function_with_the_same_qualified_name_is_refused(what):
    import functools

    name = f"t.redef.{what}"
    if what == "redefined":  # the same name in one module, another body
        first, second = _definitions("def f(x):\n    return 1\n")[0], _definitions("def f(x):\n    return 2\n")[0]
    elif what == "lambdas":
        first, second = (lambda x: 1), (lambda x: 2)
    elif what == "partials":
        first, second = functools.partial(_times, k=1), functools.partial(_times, k=2)
    elif what == "instances":
        first, second = _Scaled(1), _Scaled(2)
    else:
        first, second = [(lambda k: (lambda x: k * x))(k) for k in (1, 2)]
    fabric.evaluator(name, version="1")(first)
    with pytest.raises(FabricError) as ei:
        fabric.evaluator(name, version="1")(second)
    assert ei.value.status_code is StatusCode.FAILED_PRECONDITION and "bump the version" in ei.value.message
    assert registry.lookup(name, "1").fn is first


@pytest.mark.parametrize("what", ["reloaded", "partials", "instances"])
def test_the_same_definition_made_anew_registers_again(what):
    import functools

    name = f"t.same.{what}"
    if what == "reloaded":
        first, second = _definitions("def f(x, k=3):\n    return k * x\n")
    elif what == "partials":
        first, second = functools.partial(_times, k=2), functools.partial(_times, k=2)
    else:
        first, second = _Scaled(2), _Scaled(2)
    fabric.evaluator(name, version="1")(first)
    fabric.evaluator(name, version="1")(second)
    assert registry.lookup(name, "1").fn is second


def test_bare_evaluator_decorator_registers_under_the_function_name():
    @fabric.evaluator
    def t_bare(x):
        return x + 1

    assert callable(t_bare) and t_bare(1) == 2  # still the function
    assert registry.lookup("t_bare", "1").fn is t_bare


def test_a_request_made_before_its_evaluator_was_registered_takes_its_version_when_keyed(fab):
    req = fabric.Request("t.late", {"x": 4})
    assert req.version is None

    @fabric.evaluator("t.late", version="3")
    def late(x):
        return x * 10

    assert fab.realize(req).source == "computed"
    assert req.version == "3" and req.key == fabric.Request("t.late", {"x": 4}).key
    assert fab.realize(fabric.Request("t.late", {"x": 4})).source == "local"  # computed once


def test_single_flight_threads_run_evaluator_once(fab):
    n = 24
    results: list = [None] * n
    errors: list = []

    def worker(i):
        try:
            results[i] = fab.realize(fabric.Request("t.gated", {"x": 7}))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    # wait until the leader is inside the evaluator and the rest are queued behind it
    deadline = threading.Event()
    for _ in range(200):
        if _runs.get("t.gated") == 1:
            break
        deadline.wait(0.01)
    deadline.wait(0.2)
    _gate.set()
    for t in threads:
        t.join(10)
    assert not errors
    assert _runs["t.gated"] == 1
    assert all(r.value == [7, 8] for r in results)
    assert [r.source for r in results].count("computed") == 1  # the leader; its followers read what it recorded
    assert {r.source for r in results} == {"computed", "local"}
    assert len({id(r.value) for r in results}) == n  # each caller its own value, not the leader's list
    assert fab.cassette.stats()["ledger_rows"] == 1


def test_single_flight_trio_tasks_and_threads_together(fab):
    replies: list = []

    async def main():
        async with trio.open_nursery() as nursery:
            for _ in range(16):

                async def one():
                    replies.append(await fab.arealize(fabric.Request("t.gated", {"x": 1})))

                nursery.start_soon(one)
            thread = threading.Thread(target=lambda: replies.append(fab.realize(fabric.Request("t.gated", {"x": 1}))))
            thread.start()
            await trio.sleep(0.3)
            _gate.set()
            await trio.to_thread.run_sync(thread.join, 10)

    trio.run(main)
    assert len(replies) == 17
    assert _runs["t.gated"] == 1
    assert {tuple(r.value) for r in replies} == {(1, 2)}
    assert [r.source for r in replies].count("computed") == 1


def test_single_flight_waiters_get_the_evaluator_error(fab):
    errs = []

    @fabric.evaluator("t.slowboom", version="1")
    def slowboom():
        _count("t.slowboom")
        assert _gate.wait(10)
        raise RuntimeError("exploded")

    def worker():
        try:
            fab.realize(fabric.Request("t.slowboom", {}))
        except RuntimeError as e:
            errs.append(str(e))

    ts = [threading.Thread(target=worker) for _ in range(6)]
    for t in ts:
        t.start()
    threading.Event().wait(0.3)
    _gate.set()
    for t in ts:
        t.join(10)
    assert errs == ["exploded"] * 6
    assert _runs["t.slowboom"] == 1


def test_default_fabric_uses_fabric_home(tmp_path, monkeypatch):
    from fabric import api

    monkeypatch.setenv("FABRIC_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("FABRIC_NODE", raising=False)
    old = api.set_default(None)
    try:
        rep = fabric.realize(fabric.Request("t.square", {"x": 5}))
        assert rep.value == 25
        assert (tmp_path / "home" / "data.mdb").exists()
        assert fabric.realize(fabric.Request("t.square", {"x": 5})).source == "local"
    finally:
        api.set_default(old).close()


def test_arealize_on_default(tmp_path, monkeypatch):
    from fabric import api

    monkeypatch.setenv("FABRIC_HOME", str(tmp_path / "home2"))
    old = api.set_default(None)
    try:
        rep = trio.run(fabric.arealize, fabric.Request("t.square", {"x": 6}))
        assert (rep.value, rep.source) == (36, "computed")
    finally:
        api.set_default(old).close()


def test_default_fabric_follows_fabric_home_when_it_changes(tmp_path, monkeypatch):
    """A suite that sets FABRIC_HOME per test gets a fresh default cassette in each."""
    from cassette.store import Cassette
    from fabric import api

    monkeypatch.delenv("FABRIC_NODE", raising=False)
    req = fabric.Request("t.square", {"x": 7})
    try:
        for home in ("first", "second"):
            monkeypatch.setenv("FABRIC_HOME", str(tmp_path / home))
            assert fabric.realize(req).source == "computed"  # not the other home's "local"
            assert fabric.realize(req).source == "local"
            assert (tmp_path / home / "data.mdb").exists()
        # the first default was closed when the second was made: its directory opens again here
        Cassette(tmp_path / "first").close()
        # one installed by set_default stays whatever the environment says
        mine = fabric.open(tmp_path / "mine")
        api.set_default(mine).close()
        monkeypatch.setenv("FABRIC_HOME", str(tmp_path / "third"))
        assert api.default() is mine and fabric.realize(req).source == "computed"
        assert not (tmp_path / "third").exists()
    finally:
        left = api.set_default(None)
        if left is not None:
            left.close()


def test_open_twice_in_one_process_shares_one_environment(tmp_path):
    a = fabric.open(tmp_path / "shared")
    b = fabric.open(tmp_path / "shared")
    try:
        assert a.cassette is b.cassette
        a.realize(fabric.Request("t.square", {"x": 2}))
        assert b.realize(fabric.Request("t.square", {"x": 2})).source == "local"
    finally:
        a.close()
    assert b.realize(fabric.Request("t.square", {"x": 2})).value == 4  # still open for b
    b.close()


def test_a_second_open_never_gets_less_durability_than_it_asks_for(tmp_path):
    with fabric.open(tmp_path / "fast", durability="fast") as fast:
        with fabric.open(tmp_path / "fast") as same:  # no durability asked: shared as it is
            assert same.cassette is fast.cassette and same.cassette.durability == "fast"
        with pytest.raises(FabricError) as ei:
            fabric.open(tmp_path / "fast", durability="sync")
        assert ei.value.status_code is StatusCode.FAILED_PRECONDITION and "durability='fast'" in ei.value.message
    with fabric.open(tmp_path / "sync") as sync, fabric.open(tmp_path / "sync", durability="fast") as also:
        assert sync.cassette.durability == also.cassette.durability == "sync"  # more durable than asked
    with fabric.open(tmp_path / "fast", durability="sync") as reopened:  # once closed, any durability
        assert reopened.cassette.durability == "sync"


def test_open_rejects_a_directory_that_is_not_a_cassette(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hi")
    with pytest.raises(FabricError) as ei:
        fabric.open(tmp_path / "junk")
    assert ei.value.status_code is StatusCode.FAILED_PRECONDITION


_CHILD = textwrap.dedent(
    """
    import sys, fabric
    from fabric.registry import load_evaluators
    load_evaluators(sys.argv[2])
    f = fabric.open(sys.argv[1])
    rep = f.realize(fabric.Request("slow.square", {"x": 11, "delay": 0.5}))
    print(rep.source, rep.value)
    f.close()
    """
)


def test_concurrent_processes_on_one_dir_compute_once(tmp_path):
    log = tmp_path / "runs.log"
    env = dict(os.environ, FABRIC_EVAL_LOG=str(log))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(tmp_path / "d"), str(ROOT / "examples" / "evaluators.py")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        for _ in range(4)
    ]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0, err
            outs.append(out.split())
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert sorted(o[0] for o in outs) == ["computed", "local", "local", "local"]
    assert {o[1] for o in outs} == {"121"}
    assert log.read_text().count("slow.square") == 1


@pytest.mark.parametrize("shared", [False, True], ids=["last-holder", "cassette-still-shared"])
def test_a_closed_fabric_is_failed_precondition(tmp_path, shared):
    """realize / get / verify / stats / put after close: FAILED_PRECONDITION, never a raw
    lmdb.Error, and also while another fabric keeps the same cassette open."""
    f = fabric.open(tmp_path / "node")
    other = fabric.open(tmp_path / "node") if shared else None
    req = fabric.Request("t.square", {"x": 3})
    assert f.realize(req).value == 9
    ref = f.put(b"bytes")
    f.close()
    f.close()  # idempotent
    calls = [lambda: f.realize(req), lambda: f.get(ref.key), lambda: f.verify(), lambda: f.stats(),
             lambda: f.put(b"more"), lambda: f.holders(req.key)]
    for call in calls:
        with pytest.raises(FabricError) as ei:
            call()
        assert ei.value.status_code is StatusCode.FAILED_PRECONDITION
        assert "closed" in ei.value.message
    with pytest.raises(FabricError) as ei:
        trio.run(f.arealize, req)
    assert ei.value.status_code is StatusCode.FAILED_PRECONDITION
    if other is not None:
        assert other.realize(req).value == 9  # the other holder is unaffected
        other.close()


@pytest.mark.parametrize("first", ["module", "path"])
def test_an_evaluator_file_loaded_by_module_name_and_by_path_is_one_module(tmp_path, monkeypatch, first):
    """``--evaluators pkg/evals.py`` in a process that imported ``pkg.evals`` (a test suite, a
    notebook, a node given both spellings), or the reverse, is that module again: executed once,
    its evaluators registered once.  The file ran a second time under another module name, whose
    functions then clashed with the registered ones (FAILED_PRECONDITION "already registered to
    another function")."""
    import builtins

    from fabric import registry

    name = f"samefile_{first}"
    pkg = tmp_path / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "evals.py").write_text(
        "import builtins\n"
        "import fabric\n"
        f"builtins.{name.upper()}_RUNS += 1\n"
        f"@fabric.evaluator('{name}.double', version='1')\n"
        "def double(x: int) -> int:\n"
        "    return 2 * x\n"
    )
    monkeypatch.setattr(builtins, f"{name.upper()}_RUNS", 0, raising=False)  # counts across module copies; removed after
    monkeypatch.chdir(tmp_path)
    spellings = {"module": f"{name}.evals", "path": str(pkg / "evals.py")}
    registry.load_evaluators(spellings[first])
    for spelling in (*spellings.values(), f"{name}/evals.py"):  # both, and a path relative to the current directory
        registry.load_evaluators(spelling)
    assert getattr(builtins, f"{name.upper()}_RUNS") == 1
    assert registry.lookup(f"{name}.double", "1").fn(x=2) == 4
