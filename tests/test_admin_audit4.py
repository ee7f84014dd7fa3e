"""Audit of node administration over the wire (fabric/admin.py, the ``--node`` forms of
``fabric verify / export / replay``, and cassette/ledgerfile.py where they meet it), against
real `fabric node` subprocesses, real files and real sockets on 127.0.0.1."""

from __future__ import annotations

import resource
import subprocess
from pathlib import Path

from cassette import codec
from cassette.keys import ContentKey
from cassette.store import Cassette
from conftest import ROOT, child_env
from fabric.remote import RemoteFabric

from _nodes import FABRIC, SECRET, node

#: Address space a CLI client gets in tests that must not allocate what a damaged file claims.
CLIENT_AS_LIMIT = 3 << 30


def _ledger(tmp_path: Path, n: int = 5) -> Path:
    """A ledger file of ``n`` small records and one blob, made by a local cassette."""
    with Cassette(tmp_path / "origin") as cas:
        for i in range(n):
            cas.put(ContentKey.for_request("e", "1", {"i": i}), codec.encode({"i": i}), evaluator="e", version="1")
        cas.put_blob(b"a blob")
        assert cas.export(tmp_path / "seed.ledger") == n
    return tmp_path / "seed.ledger"


def _limited_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """``fabric ARGS`` in a process whose address space is capped at CLIENT_AS_LIMIT."""

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (CLIENT_AS_LIMIT, CLIENT_AS_LIMIT))

    return subprocess.run([FABRIC, *map(str, args)], cwd=ROOT, env=child_env(tmp_path / "home"), capture_output=True,
                          text=True, timeout=60, preexec_fn=cap)


# ------------------------------------------------------------- replay: damaged length
def test_replay_of_a_file_whose_entry_length_is_damaged_is_data_loss_not_a_huge_read(tmp_path):
    """A flipped byte in an entry's length field (here +12 GiB, under the 16 GiB cap) is
    DATA_LOSS naming the offset, found before the body is read: the reader used to ask for
    the claimed length at once (a 12 GiB allocation: MemoryError on a smaller machine)."""
    ledger = _ledger(tmp_path)
    bad = tmp_path / "bad.ledger"
    data = bytearray(ledger.read_bytes())
    data[22 + 1 + 3] ^= 0x03  # the first entry's length u64 BE: + 3 * 2**32
    bad.write_bytes(bytes(data))
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    with node(tmp_path) as (addr, proc, _):
        r = _limited_cli(tmp_path, "replay", bad, "--node", addr, "--secret-file", secret)
        assert r.returncode == 1 and r.stdout == "", r
        lines = r.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("fabric replay: error: DATA_LOSS: ") and "offset 22" in lines[0], lines
        with RemoteFabric(addr, SECRET) as f:  # nothing was sent
            st = f.stats()["node"]
            assert (st["records"], st["ledger_rows"], st["blobs"]) == (0, 0, 0)
        # the same file seeding a --data directory: the same line, no cassette left behind
        r = _limited_cli(tmp_path, "replay", bad, "--data", tmp_path / "seeded")
        assert r.returncode == 1 and r.stderr.startswith("fabric replay: error: DATA_LOSS: ") and "offset 22" in r.stderr, r
        assert not (tmp_path / "seeded").exists()
        # and the undamaged file replays whole
        r = _limited_cli(tmp_path, "replay", ledger, "--node", addr, "--secret-file", secret)
        assert r.returncode == 0 and "5 appended" in r.stdout, r
