"""The ``fabric`` console script, run as real subprocesses on real data dirs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cassette.errors import FabricError, StatusCode
from cassette.keys import ContentKey
from cassette.store import Cassette
from conftest import ROOT, child_env, flip_in_file


def _fabric_script() -> str:
    beside = Path(sys.executable).parent / "fabric"
    if beside.is_file():
        return str(beside)
    found = shutil.which("fabric")
    assert found, "the fabric console script is not installed (pip install -e .)"
    return found


FABRIC = _fabric_script()
EVALUATORS = "examples/evaluators.py"
COMMANDS = ["demo", "node", "realize", "put", "get", "holders", "stats", "verify", "replay", "export", "bench"]


@pytest.fixture
def cli(tmp_path):
    """``cli(*args, log=None, timeout=120)`` runs the console script in the repo root with an isolated FABRIC_HOME."""

    def run(*args: str, log: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        extra = {"FABRIC_EVAL_LOG": str(log)} if log else {}
        return subprocess.run(
            [FABRIC, *map(str, args)], cwd=ROOT, env=child_env(tmp_path / "home", **extra),
            capture_output=True, timeout=timeout,
        )

    return run


def _one_error_line(proc: subprocess.CompletedProcess, status: str) -> str:
    err = proc.stderr.decode()
    assert proc.returncode != 0, (proc.returncode, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert status in lines[0], err
    return lines[0]


def test_realize_prints_json_computed_then_local(cli, tmp_path):
    data, log = tmp_path / "data", tmp_path / "eval.log"
    args = ["realize", "text.stats", '{"text": "a b a"}', "--evaluators", EVALUATORS, "--data", data]
    first = cli(*args, log=log)
    assert first.returncode == 0, first.stderr.decode()
    out1 = json.loads(first.stdout)
    assert out1["source"] == "computed"
    assert out1["key"] == str(ContentKey.for_request("text.stats", "1", {"text": "a b a"}))
    assert out1["value"]["words"] == 3 and out1["value"]["top"] == [["a", 2], ["b", 1]]

    second = cli(*args, log=log)
    assert second.returncode == 0, second.stderr.decode()
    out2 = json.loads(second.stdout)
    assert out2["source"] == "local"
    assert (out2["key"], out2["value"], out2["holder"]) == (out1["key"], out1["value"], out1["holder"])
    assert len(log.read_text().splitlines()) == 1

    # module-path form of --evaluators, explicit --version, and $FABRIC_HOME as the default data dir
    home = cli("realize", "text.embed", '{"text": "x y", "dim": 4}', "--evaluators", "examples.evaluators", "--version", "1")
    assert home.returncode == 0, home.stderr.decode()
    out3 = json.loads(home.stdout)
    assert out3["source"] == "computed" and len(out3["value"]) == 4
    assert (tmp_path / "home" / "data.mdb").is_file()


def test_export_replay_and_verify(cli, tmp_path):
    data = tmp_path / "data"
    keys = []
    for text in ["one two", "three four four", "five"]:
        p = cli("realize", "text.stats", json.dumps({"text": text}), "--evaluators", EVALUATORS, "--data", data)
        assert p.returncode == 0, p.stderr.decode()
        keys.append(json.loads(p.stdout)["key"])
    put = cli("put", ROOT / "README.md", "--data", data)
    assert put.returncode == 0, put.stderr.decode()

    exp = cli("export", tmp_path / "x.ledger", "--data", data)
    assert exp.returncode == 0, exp.stderr.decode()
    assert "exported 4 records" in exp.stdout.decode()

    rep = cli("replay", tmp_path / "x.ledger", "--data", tmp_path / "new")
    assert rep.returncode == 0, rep.stderr.decode()
    assert "4 keys indexed" in rep.stdout.decode()
    with Cassette(data) as a, Cassette(tmp_path / "new") as b:
        for k in keys + [json.loads(put.stdout)["key"]]:
            key = ContentKey.parse(k)
            assert a.get_raw(key) is not None and a.get_raw(key) == b.get_raw(key)
        assert b.stats()["blobs"] == a.stats()["blobs"] >= 1

    ok = cli("verify", "--data", tmp_path / "new")
    assert ok.returncode == 0, ok.stderr.decode()
    assert ok.stderr.decode() == ""
    assert "0 problem(s)" in ok.stdout.decode()

    # flip one payload byte of the first reply: verify exits 1 with a DATA_LOSS line naming it
    with Cassette(data) as cas:
        payload = cas.get_record(ContentKey.parse(keys[0])).payload
    flip_in_file(data / "data.mdb", payload)
    bad = cli("verify", "--data", data)
    assert bad.returncode == 1
    lines = bad.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "DATA_LOSS" in lines[0] and keys[0] in lines[0], lines
    assert "1 problem(s)" in bad.stdout.decode()

    # a corrupt ledger file does not replay: DATA_LOSS, one line
    blob = bytearray((tmp_path / "x.ledger").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (tmp_path / "bad.ledger").write_bytes(bytes(blob))
    _one_error_line(cli("replay", tmp_path / "bad.ledger", "--data", tmp_path / "new2"), "DATA_LOSS")


def test_put_get_round_trip_bytes(cli, tmp_path):
    data = tmp_path / "data"
    src = tmp_path / "input.bin"
    content = os.urandom(3 << 20) + b"tail"  # several 1 MiB chunks
    src.write_bytes(content)
    put = cli("put", src, "--data", data)
    assert put.returncode == 0, put.stderr.decode()
    info = json.loads(put.stdout)
    assert info["size_bytes"] == len(content) and info["chunks"] == 4
    assert info["key"].startswith("artifact:")

    got = cli("get", info["key"], "-o", tmp_path / "out.bin", "--data", data)
    assert got.returncode == 0, got.stderr.decode()
    assert (tmp_path / "out.bin").read_bytes() == content

    to_stdout = cli("get", info["key"], "--data", data)
    assert to_stdout.returncode == 0 and to_stdout.stdout == content

    again = cli("put", src, "--data", data)  # content-addressed: same key, nothing new
    assert json.loads(again.stdout)["key"] == info["key"]

    holders = cli("holders", info["key"], "--data", data)
    assert holders.returncode == 0 and holders.stdout.decode().strip()

    # a reply key prints its value as JSON
    r = cli("realize", "text.stats", '{"text": "q"}', "--evaluators", EVALUATORS, "--data", data)
    rk = json.loads(r.stdout)["key"]
    g = cli("get", rk, "--data", data)
    assert g.returncode == 0 and json.loads(g.stdout)["words"] == 1

    stats = cli("stats", "--json", "--data", data)
    assert stats.returncode == 0, stats.stderr.decode()
    st = json.loads(stats.stdout)
    assert st["records"] == 2 and st["blobs"] == 4


@pytest.mark.parametrize("cmd", [None] + COMMANDS)
def test_every_command_has_help(cli, cmd):
    p = cli(*([cmd] if cmd else []), "--help", timeout=60)
    assert p.returncode == 0, p.stderr.decode()
    out = p.stdout.decode()
    assert "usage: fabric" in out
    if cmd:
        assert "--data" in out and "--node" in out
        # a flag is offered only where the command uses it
        assert ("--evaluators" in out) == (cmd in ("realize", "node")), out
        assert ("--secret-file" in out) == (cmd != "bench"), out


@pytest.mark.parametrize(
    "args,status",
    [
        (["realize", "text.stats", "{not json", "--evaluators", EVALUATORS], "INVALID_ARGUMENT"),
        (["realize", "text.stats", "[1, 2]", "--evaluators", EVALUATORS], "INVALID_ARGUMENT"),
        (["realize", "no.such.evaluator", "{}", "--evaluators", EVALUATORS], "NOT_FOUND"),
        (["realize", "text.stats", '{"text": "a"}', "--evaluators", EVALUATORS, "--version", "9"], "NOT_FOUND"),
        (["realize", "text.stats", "{}", "--evaluators", "examples/no_such_file.py"], "NOT_FOUND"),
        (["realize", "text.stats", "{}", "--evaluators", "no_such_module_xyz"], "NOT_FOUND"),
        (["get", "not-a-key"], "INVALID_ARGUMENT"),
        (["get", "artifact:" + "AB" * 32], "INVALID_ARGUMENT"),
        (["get", "request:" + "00" * 32], "NOT_FOUND"),
        (["holders", "blob:123"], "INVALID_ARGUMENT"),
        (["put", "/no/such/file.bin"], "NOT_FOUND"),
        (["replay", "/no/such/file.ledger"], "NOT_FOUND"),
        (["realize", "text.stats", "{}", "--node", "not an address"], "INVALID_ARGUMENT"),
        (["demo", "--nodes", "-1", "--agents", "1", "--requests", "1"], "INVALID_ARGUMENT"),
        (["demo", "--agents", "0"], "INVALID_ARGUMENT"),
        (["demo", "--distinct", "-3"], "INVALID_ARGUMENT"),
        (["demo", "--node", "garbage", "--secret-file", "/dev/null"], "INVALID_ARGUMENT"),
        (["demo", "--node", "127.0.0.1:1", "--nodes", "2"], "INVALID_ARGUMENT"),
        (["demo", "--node", "127.0.0.1:1"], "UNAUTHENTICATED"),  # no secret: as every --node command says
        (["demo", "--agents", "100000"], "INVALID_ARGUMENT"),  # would start 100k processes
        (["demo", "--nodes", "500"], "INVALID_ARGUMENT"),
        (["demo", "--distinct", "1000000000"], "INVALID_ARGUMENT"),  # the pool is built in memory
        (["stats", "--node", "127.0.0.1:1"], "UNAUTHENTICATED"),  # no secret: says to give --secret-file
    ],
    ids=lambda v: v if isinstance(v, str) else " ".join(v)[:40],
)
def test_bad_input_is_one_line_with_the_status(cli, tmp_path, args, status):
    p = cli(*args, "--data", tmp_path / "data")
    assert p.returncode == 1
    line = _one_error_line(p, status)
    assert line.startswith(f"fabric {args[0]}: error: {status}: ")
    assert p.stdout == b""
    if status == "UNAUTHENTICATED":
        assert "--secret-file" in line


def test_data_dir_that_is_not_a_cassette(cli, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    _one_error_line(cli("verify", "--data", other), "FAILED_PRECONDITION")
    _one_error_line(cli("stats", "--data", tmp_path / "other" / "keep.txt"), "FAILED_PRECONDITION")
    assert sorted(p.name for p in other.iterdir()) == ["keep.txt"]


def test_usage_errors_are_one_line(cli, tmp_path):
    for args in (["realize"], ["get"], ["no-such-command"], ["put", "a", "--bogus-flag"]):
        p = cli(*args)
        assert p.returncode == 2, args
        lines = p.stderr.decode().strip().splitlines()
        assert len(lines) == 1 and "error" in lines[0], (args, lines)


def test_evaluator_exception_reaches_the_user_with_type_and_message(cli, tmp_path):
    p = cli("realize", "fail.always", '{"message": "kaput 42"}', "--evaluators", EVALUATORS, "--data", tmp_path / "d")
    assert p.returncode == 1
    lines = p.stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("fabric realize: error: ") and "ValueError" in lines[0] and "kaput 42" in lines[0]


def test_wrong_evaluator_arguments_are_invalid_argument(cli, tmp_path):
    p = cli("realize", "text.stats", '{"bogus": 1}', "--evaluators", EVALUATORS, "--data", tmp_path / "d")
    line = _one_error_line(p, "INVALID_ARGUMENT")
    assert "bogus" in line


def test_export_to_missing_directory_is_one_line(cli, tmp_path):
    p = cli("export", tmp_path / "no" / "such" / "dir" / "x.ledger", "--data", tmp_path / "d")
    assert p.returncode == 1
    lines = p.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fabric export: error: "), lines
    assert not (tmp_path / "no").exists()


def test_get_output_to_missing_directory_is_one_line(cli, tmp_path):
    data = tmp_path / "d"
    src = tmp_path / "f.bin"
    src.write_bytes(b"payload")
    key = json.loads(cli("put", src, "--data", data).stdout)["key"]
    p = cli("get", key, "-o", tmp_path / "no" / "such" / "out.bin", "--data", data)
    assert p.returncode == 1
    lines = p.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fabric get: error: "), lines


def test_get_of_a_rotted_artifact_is_data_loss_and_writes_no_file(cli, tmp_path):
    data = tmp_path / "d"
    content = os.urandom(300_000)
    (tmp_path / "in.bin").write_bytes(content)
    key = json.loads(cli("put", tmp_path / "in.bin", "--data", data).stdout)["key"]
    flip_in_file(data / "data.mdb", content[150_000:150_100])
    p = cli("get", key, "-o", tmp_path / "out.bin", "--data", data)
    line = _one_error_line(p, "DATA_LOSS")  # the cassette's warning naming the corrupt row is not printed before it
    assert p.returncode == 1
    assert line.startswith("fabric get: error: DATA_LOSS: ") and key in line
    assert not (tmp_path / "out.bin").exists()  # no partial output
    v = cli("verify", "--data", data)
    assert v.returncode == 1 and "DATA_LOSS" in v.stderr.decode()


def test_get_of_an_artifact_rotted_past_its_first_chunks_leaves_the_old_file_and_no_partial_one(cli, tmp_path):
    data = tmp_path / "d"
    content = os.urandom(3 << 20) + b"tail"  # 4 chunks of 1 MiB (the last short)
    (tmp_path / "in.bin").write_bytes(content)
    key = json.loads(cli("put", tmp_path / "in.bin", "--data", data).stdout)["key"]
    flip_in_file(data / "data.mdb", content[(2 << 20) + 5000 : (2 << 20) + 5100])  # inside chunk 3
    out = tmp_path / "out.bin"
    out.write_bytes(b"what was there before")
    p = cli("get", key, "-o", out, "--data", data)
    line = _one_error_line(p, "DATA_LOSS")  # and no warning line before it
    assert p.returncode == 1
    assert line.startswith("fabric get: error: DATA_LOSS: ") and key in line
    assert out.read_bytes() == b"what was there before"  # two verified chunks were written, then dropped
    assert sorted(x.name for x in tmp_path.iterdir()) == ["d", "in.bin", "out.bin"]  # no .part left behind
    # to stdout the verified chunks stream out before the bad one is found: a prefix of the content, then the error
    p = cli("get", key, "--data", data)
    assert p.returncode == 1 and _one_error_line(p, "DATA_LOSS")
    assert content.startswith(p.stdout) and len(p.stdout) == 2 << 20


def test_warnings_logged_on_the_way_are_written_when_the_command_succeeds(cli, tmp_path):
    """Held warnings are dropped only when the command fails: a realize that finds its
    record rotted recomputes it, exits 0 and still says what it found."""
    data = tmp_path / "d"
    args = ["realize", "text.stats", '{"text": "zq zq rotted reply"}', "--evaluators", EVALUATORS, "--data", data]
    assert cli(*args).returncode == 0
    flip_in_file(data / "data.mdb", b"entropy_bits")
    p = cli(*args)
    assert p.returncode == 0, p.stderr.decode()
    assert json.loads(p.stdout)["source"] == "computed"
    err = p.stderr.decode()
    assert f"cassette {data}: corrupt row for {json.loads(p.stdout)['key']} reads as a miss" in err, err


def test_node_and_bench_refuse_node_instead_of_ignoring_it(cli, tmp_path):
    """`fabric node` and `fabric bench` talk to no node: their --node was taken and ignored
    (the node served, the bench ran).  It is one INVALID_ARGUMENT line naming it, before
    anything starts: --data is not created."""
    import socket

    (tmp_path / "secret").write_bytes(b"s" * 32)
    with socket.socket() as busy:  # with --node ignored, the node fails at once on this port (not serving on)
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        extra = {"node": ["--listen", f"127.0.0.1:{busy.getsockname()[1]}", "--secret-file", tmp_path / "secret"],
                 "bench": ["--only", "no-such-benchmark"]}
        for cmd in ("node", "bench"):
            p = cli(cmd, "--node", "127.0.0.1:7001", "--data", tmp_path / "d", *extra[cmd], timeout=30)
            line = _one_error_line(p, "INVALID_ARGUMENT")
            assert line.startswith(f"fabric {cmd}: error: INVALID_ARGUMENT: --node '127.0.0.1:7001': "), line
            assert p.stdout == b"" and ("--listen" in line) == (cmd == "node")  # a node's flag for what it may have meant
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize(
    "args",
    [["demo", "--agents", "0"], ["put", "in.bin"], ["get", "request:" + "00" * 32], ["holders", "request:" + "00" * 32],
     ["stats"], ["verify"], ["replay", "in.ledger"], ["export", "out.ledger"], ["bench", "--only", "no-such-benchmark"]],
    ids=lambda v: v[0],
)
def test_a_flag_the_command_would_ignore_is_not_offered(cli, tmp_path, args):
    """--evaluators (and, on bench, --secret-file) did nothing on these commands; argparse
    now refuses it as it refuses any unknown flag: one usage line, exit 2, nothing opened."""
    flag = ["--secret-file", tmp_path / "secret"] if args[0] == "bench" else ["--evaluators", EVALUATORS]
    args = [tmp_path / a if a.startswith(("in.", "out.")) else a for a in args]
    p = cli(*args, *flag, "--data", tmp_path / "d", timeout=60)
    lines = p.stderr.decode().strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1, lines
    assert f"error: unrecognized arguments: {flag[0]}" in lines[0], lines
    assert p.stdout == b"" and not (tmp_path / "d").exists()


def test_get_to_a_file_in_a_missing_directory_names_the_file_before_any_transfer(cli, tmp_path):
    data = tmp_path / "d"
    (tmp_path / "in.bin").write_bytes(b"x" * 10)
    key = json.loads(cli("put", tmp_path / "in.bin", "--data", data).stdout)["key"]
    target = tmp_path / "missing" / "out.bin"
    line = _one_error_line(cli("get", key, "-o", target, "--data", data), "FAILED_PRECONDITION")
    assert f"cannot write {target}" in line and ".part" not in line


def test_output_and_input_paths_that_are_directories_or_missing_are_one_status_line(cli, tmp_path):
    data, folder = tmp_path / "d", tmp_path / "folder"
    folder.mkdir()
    (tmp_path / "in.bin").write_bytes(b"bytes")
    art = json.loads(cli("put", tmp_path / "in.bin", "--data", data).stdout)["key"]
    rep = cli("realize", "text.stats", '{"text": "a b"}', "--evaluators", EVALUATORS, "--data", data)
    req = json.loads(rep.stdout)["key"]
    for key in (req, art):
        line = _one_error_line(cli("get", key, "-o", tmp_path / "no" / "dir" / "x", "--data", data), "FAILED_PRECONDITION")
        assert line.startswith("fabric get: error: FAILED_PRECONDITION: cannot write ") and str(tmp_path / "no") in line
        line = _one_error_line(cli("get", key, "-o", folder, "--data", data), "FAILED_PRECONDITION")
        assert f"cannot write {folder}: it is a directory" in line
    line = _one_error_line(cli("export", folder, "--data", data), "FAILED_PRECONDITION")
    assert line.startswith("fabric export: error: FAILED_PRECONDITION: ") and f"{folder}: it is a directory" in line
    line = _one_error_line(cli("put", folder, "--data", data), "INVALID_ARGUMENT")  # as fabric.put says
    assert f"{folder} is a directory" in line
    assert list(folder.iterdir()) == []  # nothing written into, or beside, the directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "folder", "in.bin"]
    ok = cli("get", req, "-o", tmp_path / "out.json", "--data", data)  # a reply to a file still works
    assert ok.returncode == 0 and json.loads((tmp_path / "out.json").read_text())["words"] == 2


@pytest.mark.parametrize(
    "raised,expected",
    [
        (FileNotFoundError(2, "No such file or directory", "/x/y"), "NOT_FOUND: /x/y: No such file or directory"),
        (PermissionError(13, "Permission denied", "/x/y"), "PERMISSION_DENIED: /x/y: Permission denied"),
        (PermissionError(1, "Operation not permitted", "/a", None, "/b"), "PERMISSION_DENIED: /a -> /b: Operation not permitted"),
        (IsADirectoryError(21, "Is a directory", "/x"), "FAILED_PRECONDITION: /x: Is a directory"),
        (ConnectionRefusedError(111, "Connection refused"), "UNAVAILABLE: Connection refused"),
        (ExceptionGroup("Exceptions from Trio nursery", [ExceptionGroup("inner", [OSError(98, "Address already in use", "p")])]),
         "FAILED_PRECONDITION: p: Address already in use"),
        (ExceptionGroup("Exceptions from Trio nursery", [FabricError(StatusCode.UNAVAILABLE, "cannot listen")]),
         "UNAVAILABLE: cannot listen"),
        (ExceptionGroup("g", [ValueError("kaput")]), "ValueError: kaput"),
    ],
    ids=lambda v: v if isinstance(v, str) else type(v).__name__,
)
def test_stray_os_errors_and_single_exception_groups_become_one_status_line(monkeypatch, capsys, raised, expected):
    from fabric import cli as cli_mod

    def command(args):
        raise raised

    monkeypatch.setitem(cli_mod.COMMANDS, "stats", command)
    assert cli_mod.main(["stats"]) == 1
    assert capsys.readouterr().err == f"fabric stats: error: {expected}\n"


def test_demo_through_a_node_runs_its_agents_there_and_leaves_the_embedded_cassette_alone(cli, tmp_path):
    from _nodes import SECRET, node

    import fabric

    args = ["--agents", "2", "--requests", "6", "--distinct", "5", "--seed", "3"]
    with node(tmp_path) as (addr, _, _):
        first = cli("demo", "--node", addr, "--secret-file", tmp_path / "secret", *args, timeout=300)
        assert first.returncode == 0, first.stderr.decode()
        out = " ".join(first.stdout.decode().split())  # rich wraps at the terminal width
        assert f"through node {addr}" in out and "requests: 12" in out
        with fabric.open(addr, secret=SECRET) as f:
            st = f.stats()["node"]
        held = st["records"]
        assert 1 <= held <= 5  # the agents' requests were realized by the node, each distinct one once
        assert f"evaluator runs on the node: {held} new records on the node: {held}" in out
        again = cli("demo", "--node", addr, "--secret-file", tmp_path / "secret", *args, timeout=300)
        assert again.returncode == 0, again.stderr.decode()
        assert "evaluator runs on the node: 0 new records on the node: 0" in " ".join(again.stdout.decode().split())
    assert not (tmp_path / "home").exists()  # the embedded default was never opened


def test_stats_table_of_an_offline_directory_is_readable_and_json_keeps_every_sample(tmp_path, cli):
    """``fabric stats --data`` printed ~150 rows: every bucket of every latency series, and this
    command's own process counters (hits, misses, latencies, errors), which read 0 for any
    offline directory whatever it holds.  The table now shows what the directory holds (counts,
    ledger gauges) and says the process counters do not apply; ``--json`` is unchanged."""
    data = tmp_path / "d"
    for text in ("a b", "c d e"):
        assert cli("realize", "text.stats", json.dumps({"text": text}), "--evaluators", EVALUATORS, "--data", data).returncode == 0
    table = subprocess.run([FABRIC, "stats", "--data", str(data)], cwd=ROOT, capture_output=True, text=True, timeout=60,
                           env=child_env(tmp_path / "home", COLUMNS="200"))
    assert table.returncode == 0, table.stderr
    out = table.stdout
    assert "_bucket" not in out and "fabric_operation_latency_seconds" not in out
    for process_counter in ("fabric_cache_misses_total", "fabric_cache_hits_total", "fabric_gossip_rounds_total", "local_hits"):
        assert process_counter not in out
    assert "not applicable" in out and "fabric stats --node" in out
    node = json.loads(cli("stats", "--json", "--data", data).stdout)["node_id"]
    assert f'fabric_ledger_records{{node="{node}"}}' in out and "records" in out
    assert len(out.splitlines()) < 30
    # --json: the whole answer, buckets and process counters included, as before
    st = json.loads(cli("stats", "--json", "--data", data).stdout)
    assert st["records"] == 2 and st["local_hits"] == 0
    assert st["metrics"]["fabric_cache_misses_total"] == 0
    assert any(k.startswith("fabric_operation_latency_seconds_bucket{") for k in st["metrics"])


def test_node_flag_defaults_are_the_node_and_wire_defaults():
    """The CLI spells its node defaults as literals (a light parser); they must be the ones
    the node and the wire use, and the help must say them."""
    from fabric import cli as fabric_cli
    from fabric import node
    from fabric.wire import StreamFrameLimits

    p = fabric_cli.build_parser()
    args = p.parse_args(["node"])
    assert args.drain_s == node.DRAIN_S
    assert args.idle_timeout == StreamFrameLimits().idle_timeout_s
    assert args.gossip_interval is None  # node.GOSSIP_INTERVAL applied after the relay check
    text = p._subparsers._group_actions[0].choices["node"].format_help()
    for value in (node.DRAIN_S, node.GOSSIP_INTERVAL, StreamFrameLimits().idle_timeout_s):
        assert f"default {value:g}" in " ".join(text.split())
