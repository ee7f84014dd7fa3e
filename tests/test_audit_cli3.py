"""Audit of the ``fabric`` command line against DESIGN.md's CLI line: hostile input gives
exit 1 and one status line on stderr, and nothing on disk is replaced, created or left
half-written.  Real subprocesses of the console script on real data dirs (and one real node)."""

from __future__ import annotations

import json
import os
import resource
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import ROOT, child_env

FABRIC = str(Path(sys.executable).parent / "fabric")
EVALUATORS = "examples/evaluators.py"
ZERO_KEY = "0" * 64


def _run(tmp_path: Path, *args, cwd: Path = ROOT, env: dict | None = None, limit_as: int | None = None,
         timeout: float = 20) -> subprocess.CompletedProcess:
    """The console script in ``cwd`` with an isolated FABRIC_HOME (and ``env`` on top);
    ``limit_as`` caps its address space (bytes), so a runaway read fails instead of eating RAM."""

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit_as, limit_as))

    return subprocess.run([FABRIC, *map(str, args)], cwd=cwd, env=child_env(tmp_path / "home", **(env or {})),
                          capture_output=True, timeout=timeout, preexec_fn=cap if limit_as else None)


def _one_line(p: subprocess.CompletedProcess, cmd: str, status: str) -> str:
    """Exit 1, nothing on stdout, exactly one ``fabric CMD: error: STATUS: ...`` line on stderr."""
    lines = p.stderr.decode().strip().splitlines()
    assert p.returncode == 1, (p.returncode, lines)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"fabric {cmd}: error: {status}: "), lines
    assert p.stdout == b""
    return lines[0]


def _put(tmp_path: Path, data: Path, content: bytes) -> str:
    src = tmp_path / "in.bin"
    src.write_bytes(content)
    p = _run(tmp_path, "put", src, "--data", data)
    assert p.returncode == 0, p.stderr.decode()
    return json.loads(p.stdout)["key"]


def _is_fifo(path: Path) -> bool:
    return stat.S_ISFIFO(os.lstat(path).st_mode)


def test_get_and_export_refuse_a_fifo_or_device_instead_of_replacing_it(tmp_path):
    # was: `get KEY -o /dev/null` (or a fifo) renamed its temporary file over the device node,
    # and `export /dev/null` likewise: as root this replaced /dev/null with a regular file
    data = tmp_path / "d"
    key = _put(tmp_path, data, b"payload " * 100)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    line = _one_line(_run(tmp_path, "get", key, "-o", fifo, "--data", data), "get", "FAILED_PRECONDITION")
    assert f"cannot write {fifo}: it is not a regular file" in line
    line = _one_line(_run(tmp_path, "export", fifo, "--data", data), "export", "FAILED_PRECONDITION")
    assert f"cannot write ledger file {fifo}: it is not a regular file" in line
    assert _is_fifo(fifo)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "fifo", "in.bin"]  # no temporary file left
    assert _run(tmp_path, "verify", "--data", data).returncode == 0


def test_get_and_export_through_a_symlink_replace_its_target_and_keep_the_link(tmp_path):
    data = tmp_path / "d"
    content = b"artifact bytes " * 50
    key = _put(tmp_path, data, content)
    target, link = tmp_path / "target", tmp_path / "link"
    target.write_bytes(b"old")
    link.symlink_to(target)
    assert _run(tmp_path, "get", key, "-o", link, "--data", data).returncode == 0
    assert link.is_symlink() and target.read_bytes() == content  # was: the link replaced by a new file
    assert _run(tmp_path, "export", link, "--data", data).returncode == 0
    assert link.is_symlink() and target.read_bytes().startswith(b"EVALFABRIC")


def test_get_o_dash_is_stdout_and_an_empty_o_is_invalid(tmp_path):
    data = tmp_path / "d"
    content = b"to stdout " * 20
    key = _put(tmp_path, data, content)
    p = _run(tmp_path, "get", key, "-o", "-", "--data", data, cwd=tmp_path)
    assert p.returncode == 0, p.stderr.decode()
    assert p.stdout == content and not (tmp_path / "-").exists()  # was: a file named '-' in the cwd
    line = _one_line(_run(tmp_path, "get", key, "-o", "", "--data", data, cwd=tmp_path), "get", "INVALID_ARGUMENT")
    assert "-o FILE must not be empty" in line  # was: "cannot write : it is a directory"


@pytest.mark.parametrize("cmd", ["stats", "verify", "get", "holders", "export"])
def test_read_only_commands_on_a_missing_data_dir_are_not_found_and_create_nothing(tmp_path, cmd):
    # was: an empty cassette was created there; verify said "0 problem(s)" and export
    # replaced an existing ledger file with an empty one
    missing = tmp_path / "typo"
    keep = tmp_path / "backup.ledger"
    keep.write_bytes(b"a previous export")
    extra = {"get": ["request:" + ZERO_KEY], "holders": ["blob:" + ZERO_KEY], "export": [keep]}.get(cmd, [])
    line = _one_line(_run(tmp_path, cmd, *extra, "--data", missing), cmd, "NOT_FOUND")
    assert f"no cassette at {missing}" in line
    assert not missing.exists()
    assert keep.read_bytes() == b"a previous export"


def test_holders_of_a_key_nobody_holds_is_one_not_found_line(tmp_path):
    data = tmp_path / "d"
    _put(tmp_path, data, b"x")
    line = _one_line(_run(tmp_path, "holders", "artifact:" + ZERO_KEY, "--data", data), "holders", "NOT_FOUND")
    assert "artifact:" + ZERO_KEY in line  # was: exit 1 with nothing on stderr


def test_a_secret_file_that_never_ends_is_refused_without_reading_it_whole(tmp_path):
    # was: /dev/zero was read until memory ran out (MemoryError under this 3 GiB cap)
    big = tmp_path / "big-secret"
    big.write_bytes(b"s" * (70 << 10))
    for secret, env in (("/dev/zero", {}), (big, {}), (None, {"FABRIC_SECRET_FILE": "/dev/zero"})):
        args = ["--secret-file", secret] if secret else []
        p = _run(tmp_path, "stats", "--node", "127.0.0.1:1", *args, env=env, limit_as=3 << 30)
        assert "is larger than 65536 bytes" in _one_line(p, "stats", "INVALID_ARGUMENT")


def test_replay_of_a_bad_file_into_a_new_dir_leaves_no_cassette(tmp_path):
    data = tmp_path / "d"
    _put(tmp_path, data, b"some content")
    good = tmp_path / "good.ledger"
    assert _run(tmp_path, "export", good, "--data", data).returncode == 0
    (tmp_path / "trunc.ledger").write_bytes(good.read_bytes()[:-7])
    (tmp_path / "garbage.ledger").write_bytes(os.urandom(500))
    for name, status in (("trunc.ledger", "DATA_LOSS"), ("garbage.ledger", "INVALID_ARGUMENT")):
        new = tmp_path / f"new-{name}"
        _one_line(_run(tmp_path, "replay", tmp_path / name, "--data", new), "replay", status)
        assert not new.exists()  # was: an empty cassette created before the file was found bad
    # into an existing cassette a bad file appends nothing, and the cassette still verifies
    _one_line(_run(tmp_path, "replay", tmp_path / "trunc.ledger", "--data", data), "replay", "DATA_LOSS")
    assert _run(tmp_path, "verify", "--data", data).returncode == 0


def test_replay_of_a_directory_or_fifo_names_what_it_is(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    line = _one_line(_run(tmp_path, "replay", tmp_path, "--data", tmp_path / "n"), "replay", "INVALID_ARGUMENT")
    assert f"{tmp_path} is a directory" in line  # was: NOT_FOUND "no such ledger file"
    line = _one_line(_run(tmp_path, "replay", tmp_path / "fifo", "--data", tmp_path / "n"), "replay", "INVALID_ARGUMENT")
    assert "is not a regular file" in line


def test_node_addresses_name_their_source_and_the_port_range(tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(b"0123456789abcdef0123")
    for addr in ("127.0.0.1:0", "127.0.0.1:70000"):
        line = _one_line(_run(tmp_path, "stats", "--node", addr, "--secret-file", secret), "stats", "INVALID_ARGUMENT")
        assert line.endswith(f"--node must be HOST:PORT (port 1-65535), got '{addr}'")
    p = _run(tmp_path, "stats", env={"FABRIC_NODE": "no-port", "FABRIC_SECRET": "x"})
    assert _one_line(p, "stats", "INVALID_ARGUMENT").endswith("$FABRIC_NODE must be HOST:PORT (port 1-65535), got 'no-port'")


def test_an_evaluators_file_that_is_not_python_says_so(tmp_path):
    notpy = tmp_path / "evaluators.txt"
    notpy.write_text("x = 1\n")
    p = _run(tmp_path, "realize", "text.stats", "{}", "--evaluators", notpy, "--data", tmp_path / "d")
    assert f"evaluator file {notpy} is not a Python source file" in _one_line(p, "realize", "INVALID_ARGUMENT")


def test_demo_refuses_a_data_file_with_the_cassette_message(tmp_path):
    f = tmp_path / "afile"
    f.write_text("mine")
    p = _run(tmp_path, "demo", "--data", f, "--agents", "1", "--requests", "1")
    assert "is not a directory, so it cannot hold a cassette" in _one_line(p, "demo", "FAILED_PRECONDITION")
    assert f.read_text() == "mine"


def test_bench_with_an_unknown_only_is_one_status_line(tmp_path):
    p = _run(tmp_path, "bench", "--only", "no-such-benchmark")
    lines = p.stderr.decode().strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1, lines  # was: wrapped over 3 lines, no status
    assert lines[0].startswith("fabric bench: error: INVALID_ARGUMENT: --only no-such-benchmark matches no benchmark")


def test_bench_json_target_is_checked_before_any_benchmark_runs(tmp_path, monkeypatch):
    from cassette.errors import FabricError
    from fabric import bench

    ran = []
    monkeypatch.setattr(bench, "BENCHMARKS", [("probe", lambda ctx: ran.append(1))])
    for target in (tmp_path / "missing" / "b.json", tmp_path):
        with pytest.raises(FabricError, match="FAILED_PRECONDITION: cannot write JSON file"):
            bench.main(SimpleNamespace(quick=True, json=str(target), only=[], data=str(tmp_path / "s")))
    assert ran == []  # was: the whole run, then a failure writing the table


def test_through_a_node_export_refuses_a_fifo_and_holders_says_not_found(tmp_path):
    from _nodes import node

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with node(tmp_path) as (addr, _, _):
        via = ["--node", addr, "--secret-file", tmp_path / "secret"]
        line = _one_line(_run(tmp_path, "export", fifo, *via), "export", "FAILED_PRECONDITION")
        assert "it is not a regular file" in line
        assert _is_fifo(fifo)
        _one_line(_run(tmp_path, "holders", "request:" + ZERO_KEY, *via), "holders", "NOT_FOUND")
