"""Audit of node administration over the wire (fabric/admin.py, the ``--node`` forms of
``fabric verify / export / replay``, and cassette/ledgerfile.py where they meet it), against
real `fabric node` subprocesses, real files and real sockets on 127.0.0.1."""

from __future__ import annotations

import resource
import struct
import subprocess
from pathlib import Path

import blake3
import pytest
import trio

from cassette import codec
from cassette.keys import ContentKey
from cassette.ledgerfile import LEDGER_FILE_VERSION, MAGIC, entry_header
from cassette.record import pack_record
from cassette.store import Cassette
from conftest import ROOT, child_env
from fabric.errors import FabricError, StatusCode
from fabric.net import open_connection
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


# ------------------------------------------------------- replay: a row under a blob key
def _ledger_bytes(*entries: tuple[bytes, bytes]) -> bytes:
    """A well-formed ledger file (header, ``entries``, trailer with a matching check)."""
    out = bytearray(MAGIC + struct.pack(">I", LEDGER_FILE_VERSION))
    for tag, body in entries:
        out += entry_header(tag, len(body)) + body
    records = sum(tag == b"R" for tag, _ in entries)
    out += entry_header(b"E", 40) + struct.pack(">Q", records) + blake3.blake3(bytes(out)).digest()
    return bytes(out)


def _row(key: ContentKey, value: object) -> bytes:
    return pack_record(key, codec.encode(value), evaluator="e", version="1", created=1.0e9, compute_s=0.0, node="n-test")


def test_a_record_under_a_blob_key_is_refused_by_replay_and_left_out_of_export(tmp_path):
    """A ledger row answers a request or artifact key; one under a blob key used to pass a
    replay (client and node), after which the node's own verify reported its index entry as
    DATA_LOSS ("not a record key") for good.  Now the file is refused before anything is
    sent, the node refuses the entry itself (keeping what came before it), and an export
    leaves such a row out."""
    good_key = ContentKey.for_request("e", "1", {"i": 0})
    blob_key = ContentKey.of("blob", b"some chunk")
    bad = tmp_path / "bad.ledger"
    bad.write_bytes(_ledger_bytes((b"R", _row(good_key, 0)), (b"R", _row(blob_key, 1))))
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    with node(tmp_path) as (addr, proc, _):
        r = _limited_cli(tmp_path, "replay", bad, "--node", addr, "--secret-file", secret)
        assert r.returncode == 1, r
        lines = r.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("fabric replay: error: DATA_LOSS: ") and str(blob_key) in lines[0], lines
        with RemoteFabric(addr, SECRET) as f:
            st = f.stats()["node"]
            assert (st["records"], st["ledger_rows"]) == (0, 0)  # nothing was sent

            # a client that skips the local validation: the node refuses the entry itself
            entries = bad.read_bytes()[22:-49]
            host, port = addr.rsplit(":", 1)

            async def upload() -> dict:
                async with await open_connection(host, int(port), SECRET) as client:
                    async with client.stream("replay", None, upload=True, credit=0) as call:
                        await call.send(entries)
                        await call.end()
                        return await call.result()

            with pytest.raises(FabricError) as ei:
                trio.run(upload)
            assert ei.value.status_code is StatusCode.DATA_LOSS and ei.value.key == str(blob_key), ei.value
            assert f.get(good_key) == 0  # what came before the bad entry is kept
            rep = f.verify()
            assert rep.ok and (rep.records, rep.indexed) == (1, 1), rep.problems

    # an export leaves such a row out, so the file it writes imports and verifies clean
    with Cassette(tmp_path / "holder") as cas:
        cas.put(good_key, codec.encode(0), evaluator="e", version="1")
        # a row under a blob key, as an older version's put wrote one (put refuses it now)
        from cassette.record import payload_digest
        from cassette.store import _Job

        payload = codec.encode(1)
        row = pack_record(blob_key, payload, evaluator="e", version="1", created=0.0, compute_s=0.0, node=cas.node_id,
                          digest=payload_digest(payload))
        cas._wait(cas._submit(_Job("raw", (blob_key, row, payload_digest(payload)), len(row), True)))
        assert cas.export(tmp_path / "out.ledger") == 1
    with Cassette.from_ledger(tmp_path / "seeded", tmp_path / "out.ledger") as cas:
        assert cas.verify(raise_errors=False).ok and cas.stats()["records"] == 1
