"""Acceptance: the public contract of DESIGN.md, used exactly by its names, as a user would.

Real cassettes, a real ``fabric node`` subprocess on 127.0.0.1 (tests/_nodes.py), and
child processes for the default fabric made from the environment (``$FABRIC_HOME``,
``FABRIC_NODE`` + ``FABRIC_SECRET`` / ``FABRIC_SECRET_FILE``).  DESIGN's own
``@fabric.evaluator("embed", version="2")`` is registered only in those children: the
registry is per process, and another test module of this session may register its own.
"""

from __future__ import annotations

import importlib
import io
import json
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from prometheus_client import REGISTRY

import fabric
from _nodes import SECRET, node
from conftest import child_env

PUBLIC = ["Request", "Reply", "ContentKey", "ArtifactRef", "FabricError", "StatusCode", "Fabric",
          "evaluator", "realize", "arealize", "open", "put", "get", "get_into"]
GRPC_NAMES = {"INVALID_ARGUMENT", "FAILED_PRECONDITION", "NOT_FOUND", "RESOURCE_EXHAUSTED", "UNAVAILABLE",
              "DEADLINE_EXCEEDED", "ABORTED", "DATA_LOSS", "UNAUTHENTICATED", "PERMISSION_DENIED",
              "UNIMPLEMENTED", "INTERNAL"}

_runs: dict[str, int] = {}


@fabric.evaluator("audit3.embed", version="2")
def embed(text: str, dim: int = 8) -> np.ndarray:
    _runs["embed"] = _runs.get("embed", 0) + 1
    v = np.zeros(dim, dtype=np.float32)
    for w in text.split():
        v[len(w) % dim] += 1
    return v


@fabric.evaluator("audit3.versions", version="1")
def versions_v1(x: int) -> str:
    return f"v1:{x}"


@fabric.evaluator("audit3.versions", version="2")
def versions_v2(x: int) -> str:
    return f"v2:{x}"


@fabric.evaluator("audit3.explode", version="1")
def explode(what: str) -> None:
    _runs["explode"] = _runs.get("explode", 0) + 1
    raise ValueError(f"cannot evaluate {what}")


def _error(fn, *args, **kw) -> fabric.FabricError:
    with pytest.raises(fabric.FabricError) as ei:
        fn(*args, **kw)
    return ei.value


@pytest.fixture
def fab(tmp_path):
    with fabric.open(tmp_path / "cassette") as f:
        yield f


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A running node (examples/evaluators.py loaded): ``(address, secret file, tmp dir)``."""
    tmp = tmp_path_factory.mktemp("audit-api3-node")
    with node(tmp, "node", "--durability", "fast", env={"FABRIC_EVAL_LOG": str(tmp / "evals.log")}) as (addr, proc, _):
        yield addr, tmp / "secret", tmp
        assert proc.poll() is None


# --------------------------------------------------------------------------- names


def test_fabric_re_exports_exactly_the_public_names():
    from cassette.errors import FabricError as CasError, StatusCode as CasCode
    from fabric import api, artifacts, errors, local, registry, request

    assert sorted(fabric.__all__) == sorted(PUBLIC)
    star: dict = {}
    exec("from fabric import *", star)
    assert sorted(k for k in star if not k.startswith("__")) == sorted(PUBLIC)
    assert fabric.FabricError is errors.FabricError is CasError
    assert fabric.StatusCode is errors.StatusCode is CasCode
    assert fabric.Request is request.Request and fabric.Reply is request.Reply
    assert fabric.ArtifactRef is artifacts.ArtifactRef and fabric.Fabric is local.Fabric
    assert fabric.evaluator is registry.evaluator
    for name in ("realize", "arealize", "open", "put", "get", "get_into"):
        assert getattr(fabric, name) is getattr(api, name)
    assert issubclass(fabric.FabricError, Exception)
    assert fabric.ContentKey.parse(str(fabric.Request("audit3.embed", {"text": "a"}).key)).kind == "request"


def test_status_code_names_are_the_grpc_names():
    assert {c.name for c in fabric.StatusCode} == GRPC_NAMES
    assert fabric.StatusCode.NOT_FOUND.value == 5 and fabric.StatusCode.UNAVAILABLE.value == 14


def test_fabric_error_fields():
    key = fabric.Request("audit3.embed", {"text": "k"}).key
    e = fabric.FabricError(fabric.StatusCode.ABORTED, "lost the race", True, key)
    assert (e.status_code, e.message, e.retryable, e.key) == (fabric.StatusCode.ABORTED, "lost the race", True, key)
    e = fabric.FabricError(status_code=fabric.StatusCode.NOT_FOUND, message="gone", retryable=False)
    assert (e.status_code.name, e.message, e.retryable, e.key) == ("NOT_FOUND", "gone", False, None)
    assert str(e).startswith("NOT_FOUND: gone")


def test_retry_defaults_are_the_designed_ones():
    from fabric.errors import DEFAULT_POLICIES

    got = {op: (DEFAULT_POLICIES[op].deadline_s, DEFAULT_POLICIES[op].attempts) for op in ("realize", "put", "get", "get_into")}
    assert got == {"realize": (40, 3), "put": (45, 2), "get": (40, 3), "get_into": (40, 3)}


def _retries(op: str) -> float:
    return REGISTRY.get_sample_value("fabric_operation_retries_total", {"op": op, "status": "UNAVAILABLE"}) or 0.0


def test_a_node_that_is_down_is_tried_as_often_as_the_policy_says(tmp_path):
    """realize/get/get_into: 3 attempts (2 retries), put: 2 attempts (1 retry), then UNAVAILABLE."""
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        addr = f"127.0.0.1:{s.getsockname()[1]}"
    key = fabric.ContentKey.of("artifact", b"not held anywhere")
    calls = {
        "realize": lambda f: f.realize(fabric.Request("audit3.embed", {"text": "down"})),
        "put": lambda f: f.put(b"payload"),
        "get": lambda f: f.get(key),
        "get_into": lambda f: f.get_into(key, np.zeros(3)),
    }
    with fabric.open(addr, secret=SECRET) as f:
        for op, call in calls.items():
            before = _retries(op)
            e = _error(call, f)
            assert e.status_code is fabric.StatusCode.UNAVAILABLE, (op, e)
            assert _retries(op) - before == {"put": 1}.get(op, 2), op


# -------------------------------------------------------------------- requests


def test_request_takes_the_latest_registered_version_or_the_one_named():
    assert fabric.Request("audit3.embed", {"text": "hi", "dim": 8}).version == "2"
    assert fabric.Request("audit3.versions", {"x": 1}).version == "2"
    v1 = fabric.Request("audit3.versions", {"x": 1}, version="1")
    v2 = fabric.Request("audit3.versions", {"x": 1}, version="2")
    assert v1.key != v2.key and v2.key == fabric.Request("audit3.versions", {"x": 1}).key
    assert isinstance(v2.key, fabric.ContentKey) and str(v2.key).startswith("request:")
    # insertion order of args does not change the key
    assert fabric.Request("audit3.embed", {"text": "hi", "dim": 8}).key == fabric.Request("audit3.embed", {"dim": 8, "text": "hi"}).key


@pytest.mark.parametrize("args, path", [
    ({"text": "x", "opts": {"tags": {1, 2}}}, "opts.tags"),
    ({"text": "x", "opts": [{1: "a"}]}, "opts[0]"),
    ({"text": "x", "obj": object()}, "obj"),
])
def test_bad_args_are_invalid_argument_at_key_with_a_path(args, path):
    req = fabric.Request("audit3.embed", args)
    e = _error(lambda: req.key)
    assert e.status_code is fabric.StatusCode.INVALID_ARGUMENT
    assert path in e.message, e.message


def test_registering_a_different_function_under_a_taken_name_and_version_is_an_error():
    def other(text: str, dim: int = 8):
        return None

    e = _error(fabric.evaluator("audit3.embed", version="2"), other)
    assert e.status_code is fabric.StatusCode.FAILED_PRECONDITION and "audit3.embed" in e.message
    assert fabric.evaluator("audit3.embed", version="2")(embed) is embed  # the same function again is fine


def test_reloading_a_module_of_evaluators_registers_them_again(tmp_path, monkeypatch):
    (tmp_path / "audit3_evals.py").write_text(textwrap.dedent("""
        import fabric

        @fabric.evaluator("audit3.reloaded", version="1")
        def twice(x: int) -> int:
            return 2 * x
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = importlib.import_module("audit3_evals")
    try:
        importlib.reload(mod)
        with fabric.open(tmp_path / "c") as f:
            assert f.realize(fabric.Request("audit3.reloaded", {"x": 4})).value == 8
    finally:
        sys.modules.pop("audit3_evals", None)


def test_reloading_a_module_does_not_change_which_version_is_latest(tmp_path, monkeypatch):
    """A module of v1 reloaded after another module registered v2: v2 stays the latest
    (re-registering the same function changes nothing; it must not bring back the old version)."""
    (tmp_path / "audit3_old.py").write_text(textwrap.dedent("""
        import fabric

        @fabric.evaluator("audit3.order", version="1")
        def old(x: int) -> str:
            return "old"
    """))
    (tmp_path / "audit3_new.py").write_text(textwrap.dedent("""
        import fabric

        @fabric.evaluator("audit3.order", version="2")
        def new(x: int) -> str:
            return "new"
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        old = importlib.import_module("audit3_old")
        importlib.import_module("audit3_new")
        assert fabric.Request("audit3.order", {"x": 1}).version == "2"
        importlib.reload(old)
        assert fabric.Request("audit3.order", {"x": 1}).version == "2"
        with fabric.open(tmp_path / "c") as f:
            assert f.realize(fabric.Request("audit3.order", {"x": 1})).value == "new"
    finally:
        sys.modules.pop("audit3_old", None)
        sys.modules.pop("audit3_new", None)


# --------------------------------------------------------------------- realize


def test_reply_fields_and_numpy_values(fab):
    _runs.clear()
    req = fabric.Request("audit3.embed", {"text": "hi there", "dim": 8})
    rep = fab.realize(req)
    assert isinstance(rep, fabric.Reply)
    assert (rep.key, rep.source, rep.holder) == (req.key, "computed", fab.node_id)
    assert isinstance(rep.value, np.ndarray) and rep.value.dtype == np.float32
    assert np.array_equal(rep.value, embed("hi there", 8)) and not rep.value.flags.writeable
    again = fab.realize(fabric.Request("audit3.embed", {"dim": 8, "text": "hi there"}))
    assert (again.source, again.holder) == ("local", fab.node_id)
    assert isinstance(again.value, np.ndarray) and not again.value.flags.writeable
    assert np.array_equal(again.value, rep.value)
    assert _runs["embed"] == 2  # one through realize, one called directly above


def test_an_evaluator_exception_reaches_the_caller_and_is_not_recorded(fab):
    _runs.clear()
    req = fabric.Request("audit3.explode", {"what": "this"})
    for _ in range(2):
        with pytest.raises(ValueError, match="^cannot evaluate this$"):
            fab.realize(req)
    assert _runs["explode"] == 2
    e = _error(fab.get, req.key)
    assert e.status_code is fabric.StatusCode.NOT_FOUND


def test_an_unknown_evaluator_is_not_found_naming_it_and_listing_registered(fab):
    e = _error(fab.realize, fabric.Request("audit3.nope", {"x": 1}))
    assert e.status_code is fabric.StatusCode.NOT_FOUND
    assert "audit3.nope" in e.message and "audit3.embed" in e.message and "audit3.versions" in e.message


def test_device_without_cupy_is_failed_precondition_naming_the_extra(fab):
    import gpu

    if gpu.available():
        pytest.skip("CuPy and a CUDA device are usable here")
    e = _error(fab.realize, fabric.Request("audit3.embed", {"text": "gpu"}), device="cuda:0")
    assert e.status_code is fabric.StatusCode.FAILED_PRECONDITION and "evalfabric[gpu]" in e.message
    assert fab.realize(fabric.Request("audit3.embed", {"text": "gpu"})).value.shape == (8,)  # CPU still works


@pytest.fixture
def default_fabric(fabric_home):
    """The module-level calls on a default fabric in a fresh ``$FABRIC_HOME`` (closed after)."""
    from fabric import api

    old = api.set_default(None)
    try:
        yield fabric_home
    finally:
        made = api.set_default(old)
        if made is not None:
            made.close()


@pytest.mark.trio
async def test_arealize_under_trio(default_fabric):
    req = fabric.Request("audit3.versions", {"x": 7})
    rep = await fabric.arealize(req)
    assert (rep.value, rep.source, rep.key) == ("v2:7", "computed", req.key)
    assert (await fabric.arealize(req)).source == "local"
    assert fabric.realize(req).source == "local"  # the same default cassette, sync
    assert (default_fabric / "data.mdb").exists()


@pytest.mark.trio
async def test_an_evaluator_exception_reaches_an_arealize_caller(default_fabric):
    _runs.clear()
    for _ in range(2):
        with pytest.raises(ValueError, match="^cannot evaluate async$"):
            await fabric.arealize(fabric.Request("audit3.explode", {"what": "async"}))
    assert _runs["explode"] == 2


def test_module_level_realize_on_a_device_without_cupy_names_the_extra(default_fabric):
    import gpu

    if gpu.available():
        pytest.skip("CuPy and a CUDA device are usable here")
    e = _error(fabric.realize, fabric.Request("audit3.embed", {"text": "gpu default"}), device="cuda:0")
    assert e.status_code is fabric.StatusCode.FAILED_PRECONDITION and "evalfabric[gpu]" in e.message


# ------------------------------------------------- the default fabric (subprocess)

_CHILD = """
import json, sys
import numpy as np
import trio
import fabric
{register}
req = fabric.Request({evaluator!r}, {args!r})
reps = [fabric.realize(req) for _ in range(2)]
reps.append(trio.run(fabric.arealize, req))
print(json.dumps([[r.source, r.holder, str(r.key), req.version] for r in reps]))
"""

_EMBED = """
@fabric.evaluator("embed", version="2")
def embed(text: str, dim: int = 8):
    return np.full(dim, len(text), dtype=np.float32)
"""


def _child(env: dict, evaluator: str, args: dict, register: str = "") -> list:
    code = _CHILD.format(register=register, evaluator=evaluator, args=args)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_default_fabric_is_embedded_in_fabric_home(tmp_path):
    home = tmp_path / "home"
    env = child_env(home)
    first = _child(env, "embed", {"text": "hi"}, _EMBED)
    assert [r[0] for r in first] == ["computed", "local", "local"]
    # DESIGN's own snippet: @fabric.evaluator("embed", version="2"), then a Request naming no version
    assert {(r[2], r[3]) for r in first} == {(str(fabric.Request("embed", {"text": "hi"}, version="2").key), "2")}
    assert len({r[1] for r in first}) == 1
    assert (home / "data.mdb").exists()
    second = _child(env, "embed", {"text": "hi"}, _EMBED)  # another process, same cassette
    assert [r[0] for r in second] == ["local"] * 3 and second[0][1] == first[0][1]


@pytest.mark.parametrize("how", ["FABRIC_SECRET", "FABRIC_SECRET_FILE"])
def test_fabric_node_makes_the_same_call_go_through_a_node(served, tmp_path, how):
    addr, secret_file, _ = served
    with fabric.open(addr, secret=SECRET) as f:
        node_id = f.realize(fabric.Request("text.stats", {"text": "warm"})).holder
    extra = {"FABRIC_SECRET": SECRET.decode()} if how == "FABRIC_SECRET" else {"FABRIC_SECRET_FILE": str(secret_file)}
    home = tmp_path / "unused-home"
    got = _child(child_env(home, FABRIC_NODE=addr, **extra), "text.stats", {"text": f"a b a {how}"})
    assert [r[0] for r in got] == ["computed", "local", "local"]
    key = str(fabric.Request("text.stats", {"text": f"a b a {how}"}, version="1").key)
    assert all(r[1] == node_id and r[2] == key for r in got)
    assert not (home / "data.mdb").exists()  # nothing embedded


# -------------------------------------------------------- open(path | address)


def test_open_path_and_open_address_give_fabrics_with_the_same_methods(served, tmp_path):
    addr, _, _ = served
    with fabric.open(tmp_path / "c") as emb, fabric.open(addr, secret=SECRET) as rem:
        for f in (emb, rem):
            assert isinstance(f, fabric.Fabric)
            for m in ("realize", "arealize", "put", "get", "get_into"):
                assert callable(getattr(f, m)), m
            rep = f.realize(fabric.Request("text.stats", {"text": "x y x"}, version="1") if f is rem
                            else fabric.Request("audit3.versions", {"x": 2}))
            assert rep.source == "computed" and rep.holder == f.node_id
            arr = np.arange(24, dtype=np.int16).reshape(4, 6)
            ref = f.put(arr)
            got = f.get(ref.key)
            assert isinstance(got, np.ndarray) and np.array_equal(got, arr)
            out = np.empty((4, 6), np.int16)
            assert f.get_into(ref.key, out) is out and np.array_equal(out, arr)


def test_unknown_evaluator_through_a_node_is_not_found_naming_it(served):
    addr, _, _ = served
    with fabric.open(addr, secret=SECRET) as f:
        e = _error(f.realize, fabric.Request("audit3.remote.nope", {"x": 1}))
    assert e.status_code is fabric.StatusCode.NOT_FOUND
    assert "audit3.remote.nope" in e.message and "text.stats" in e.message


def test_an_evaluator_exception_through_a_node_keeps_its_type_and_message(served):
    addr, _, tmp = served
    req = fabric.Request("fail.always", {"message": "kaboom-remote"}, version="1")
    with fabric.open(addr, secret=SECRET) as f:
        for _ in range(2):
            with pytest.raises(ValueError, match="^kaboom-remote$"):
                f.realize(req)
    runs = (tmp / "evals.log").read_text().splitlines()
    assert sum(line.startswith("fail.always ") for line in runs) == 2  # not recorded: run again


@pytest.mark.trio
async def test_arealize_through_a_node_under_trio(served):
    addr, _, _ = served
    with fabric.open(addr, secret=SECRET) as f:
        req = fabric.Request("text.stats", {"text": "trio trio"}, version="1")
        first = await f.arealize(req)
        assert first.source == "computed" and first.key == req.key
        assert (await f.arealize(req)).source == "local"


# ---------------------------------------------------------------------- artifacts


def _mismatches() -> float:
    return REGISTRY.get_sample_value("fabric_layout_mismatch_total") or 0.0


def test_put_accepts_bytes_numpy_files_file_objects_and_iterators(fab, tmp_path):
    raw = bytes(range(256)) * 40
    path = tmp_path / "blob.bin"
    path.write_bytes(raw)
    refs = [fab.put(raw), fab.put(str(path)), fab.put(path), fab.put(io.BytesIO(raw)),
            fab.put(iter([raw[:1000], raw[1000:]]))]
    with open(path, "rb") as fh:
        refs.append(fab.put(fh))
    for ref in refs:
        assert isinstance(ref, fabric.ArtifactRef)
        assert ref.key == refs[0].key and ref.key.kind == "artifact"
        assert ref.size_bytes == len(raw) and isinstance(ref.digest, str) and ref.digest
    got = fab.get(refs[0].key)
    assert isinstance(got, bytes) and got == raw
    arr = np.linspace(0, 1, 1000, dtype=np.float64).reshape(10, 100)
    aref = fab.put(arr)
    assert aref.size_bytes == arr.nbytes and aref.key != refs[0].key
    back = fab.get(aref.key)
    assert isinstance(back, np.ndarray) and back.dtype == arr.dtype and back.shape == arr.shape
    assert np.array_equal(back, arr)


def test_get_into_checks_dtype_and_shape_and_stages_a_non_contiguous_target(fab):
    arr = np.arange(60, dtype=np.float32).reshape(6, 10)
    key = fab.put(arr).key
    for bad in (np.zeros((6, 10), np.float64), np.zeros((10, 6), np.float32)):
        bad_before = bad.copy()
        e = _error(fab.get_into, key, bad)
        assert e.status_code is fabric.StatusCode.INVALID_ARGUMENT
        assert np.array_equal(bad, bad_before)
    before = _mismatches()
    out = np.zeros((6, 10), np.float32)
    assert fab.get_into(key, out) is out and np.array_equal(out, arr)
    assert _mismatches() == before
    big = np.zeros((6, 20), np.float32)
    view = big[:, ::2]  # non-contiguous: a staged copy
    assert fab.get_into(key, view) is view and np.array_equal(view, arr) and not big[:, 1::2].any()
    assert _mismatches() == before + 1


def test_module_level_put_get_get_into_use_the_default_fabric(default_fabric):
    ref = fabric.put(np.arange(5, dtype=np.int64))
    assert np.array_equal(fabric.get(ref.key), np.arange(5))
    out = np.empty(5, np.int64)
    assert fabric.get_into(ref.key, out) is out and np.array_equal(out, np.arange(5))
    assert fabric.realize(fabric.Request("audit3.embed", {"text": "default"})).source == "computed"
    assert (default_fabric / "data.mdb").exists()
