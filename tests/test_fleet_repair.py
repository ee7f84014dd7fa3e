"""How a fleet member obtains records and chunks it lacks, or holds corrupt, from other holders.

Real ``fabric node`` subprocesses on 127.0.0.1 (``--join``), each data dir seeded before its
node starts and, where a test says so, a byte flipped in a stored row while the node is
stopped (``flip_in_file``): a member whose own copy rotted repairs it from a live holder and
answers; one with no good copy anywhere still answers DATA_LOSS; a holder serving a corrupt
chunk is counted and passed over; a holder killed but not yet DEAD is a retryable failure,
not NOT_FOUND; two clients asking for one artifact at once share one fetch.
"""

from __future__ import annotations

import signal
import threading

import numpy as np
import pytest

import fabric
from cassette import codec
from cassette.errors import FabricError, StatusCode
from cassette.keys import ContentKey
from conftest import flip_in_file
from _nodes import SECRET, start_node, stop_node
from test_fleet import _stats, _wait

CHUNKS = 8
CHUNK = 1 << 17


def _reply_key(x: int) -> ContentKey:
    return ContentKey.for_request("slow.square", "1", {"x": x})


def _seed(path, data: bytes, replies: dict[int, int]):
    """Put ``data`` (an artifact) and the reply ``x -> x*x`` records into a fresh data dir; its ref."""
    with fabric.open(path, durability="fast") as f:
        ref = f.put(data, chunk_size=CHUNK)
        for x in replies:
            f.cassette.put(_reply_key(x), codec.encode(x * x), evaluator="slow.square", version="1")
        return ref


def _digest(path, key: ContentKey) -> bytes:
    with fabric.open(path) as f:
        return f.cassette.get_record(key).digest


def _data(seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 255, size=CHUNKS * CHUNK, dtype=np.uint8).tobytes()


class _Nodes:
    """Started nodes by name: (addr, proc, data_dir, node_id); the first is every other's seed."""

    def __init__(self, tmp_path) -> None:
        self.tmp, self.n = tmp_path, {}

    def start(self, name: str, *extra: str) -> str:
        join = ["--join", next(iter(self.n.values()))[0]] if self.n else []
        addr, proc, d = start_node(self.tmp, name, "--gossip-interval", "0.3", "--durability", "fast", *join, *extra)
        self.n[name] = (addr, proc, d, _stats(addr)["node_id"])
        return addr

    def knows(self, at: str, key: ContentKey, *holders: str) -> None:
        """Wait until node ``at`` lists every one of ``holders`` as a holder of ``key``."""
        ids = {self.n[h][3] for h in holders}
        with fabric.open(self.n[at][0], secret=SECRET) as f:
            _wait(lambda: ids <= set(f.holders(key)), 15, f"{at} to learn {holders} hold {key.short()}")

    def stop(self) -> None:
        for _, proc, _, _ in self.n.values():
            stop_node(proc)


@pytest.fixture
def nodes(tmp_path):
    ns = _Nodes(tmp_path)
    try:
        yield ns
    finally:
        ns.stop()


def _get_error(addr: str, key: ContentKey) -> FabricError:
    with fabric.open(addr, secret=SECRET) as f, pytest.raises(FabricError) as ei:
        f.get(key)
    return ei.value


def test_a_member_whose_own_record_is_corrupt_repairs_it_from_a_live_holder(tmp_path, nodes):
    """B's copies of a reply and of an artifact's manifest rotted while it was stopped; A holds
    good ones.  ``get`` through B used to answer DATA_LOSS; it fetches, verifies and records
    them afresh and answers.  A reply only B held (rotted too) is still DATA_LOSS."""
    data = _data(1)
    ref = _seed(tmp_path / "a", data, {7: 49})
    _seed(tmp_path / "b", data, {7: 49, 8: 64})
    for key in (ref.key, _reply_key(7), _reply_key(8)):
        assert flip_in_file(tmp_path / "b" / "data.mdb", _digest(tmp_path / "b", key)) >= 1
    nodes.start("a")
    b = nodes.start("b")
    nodes.knows("b", ref.key, "a")
    nodes.knows("b", _reply_key(7), "a")
    with fabric.open(b, secret=SECRET) as fb:
        assert fb.get(_reply_key(7)) == 49
        assert bytes(fb.get(ref.key)) == data
    err = _get_error(b, _reply_key(8))
    assert err.status_code is StatusCode.DATA_LOSS and "no live member of the fleet holds a good copy" in err.message
    stop_node(nodes.n["b"][1])
    with fabric.open(tmp_path / "b") as fb:  # recorded afresh: the rows read back now
        assert fb.cassette.get_raw(_reply_key(7)) is not None and fb.cassette.get_raw(ref.key) is not None
        assert fb.cassette.get_raw(_reply_key(8)) is None


def test_a_member_whose_own_chunk_is_corrupt_repairs_it_while_sending(tmp_path, nodes):
    """One chunk of an artifact B holds rotted; A holds it intact.  ``get`` through B used to
    fail with DATA_LOSS after the manifest; B fetches the chunk from A, verifies it, stores it
    (repairing its copy) and sends it."""
    data = _data(2)
    ref = _seed(tmp_path / "a", data, {})
    _seed(tmp_path / "b", data, {})
    assert flip_in_file(tmp_path / "b" / "data.mdb", data[3 * CHUNK : 3 * CHUNK + 32]) >= 1
    nodes.start("a")
    b = nodes.start("b")
    nodes.knows("b", ref.key, "a")
    with fabric.open(b, secret=SECRET) as fb:
        assert bytes(fb.get(ref.key)) == data
    assert _stats(b)["peer_fetch_bytes_by_node"] == {nodes.n["a"][3]: CHUNK}  # that chunk only
    stop_node(nodes.n["b"][1])
    with fabric.open(tmp_path / "b") as fb:
        assert fb.cassette.verify(raise_errors=False).problems == []


def test_a_chunk_no_holder_has_intact_is_still_data_loss(tmp_path, nodes):
    """The same chunk rotted on both holders: ``get`` through B answers DATA_LOSS naming it."""
    data = _data(3)
    ref = _seed(tmp_path / "a", data, {})
    _seed(tmp_path / "b", data, {})
    for name in ("a", "b"):
        flip_in_file(tmp_path / name / "data.mdb", data[5 * CHUNK : 5 * CHUNK + 32])
    nodes.start("a")
    b = nodes.start("b")
    nodes.knows("b", ref.key, "a")
    err = _get_error(b, ref.key)
    assert err.status_code is StatusCode.DATA_LOSS and "is missing or corrupt" in err.message


def _metric(port: int, name: str, **labels: str) -> float:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def _metrics_port(proc) -> int:
    import re

    from _nodes import wait_until

    found = wait_until(lambda: re.findall(r"metrics on http://[^ ]+:(\d+)/metrics", proc.log_path.read_text()), 10,
                       "the node to log its metrics address")
    return int(found[-1])


def test_a_holder_serving_corrupt_chunks_is_counted_and_passed_over(tmp_path, nodes):
    """A's chunks rotted, B's are intact: C's fetch completes from B, A's DATA_LOSS is counted
    (``peer_fetch``), and C stores only verified bytes.  Two clients asking C at once share
    one fetch."""
    data = _data(4)
    ref = _seed(tmp_path / "a", data, {})
    _seed(tmp_path / "b", data, {})
    for i in range(CHUNKS):
        flip_in_file(tmp_path / "a" / "data.mdb", data[i * CHUNK : i * CHUNK + 32])
    nodes.start("a")
    nodes.start("b")
    c = nodes.start("c", "--metrics-port", "0")
    nodes.knows("c", ref.key, "a", "b")
    got: list = []

    def ask() -> None:
        with fabric.open(c, secret=SECRET) as fc:
            got.append(bytes(fc.get(ref.key)))

    threads = [threading.Thread(target=ask) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert got == [data, data]
    served = _stats(c)["peer_fetch_bytes_by_node"]
    # every chunk once (one fetch for both clients), from B; A served at most the manifest record
    assert CHUNKS * CHUNK <= sum(served.values()) < (CHUNKS + 1) * CHUNK and served.get(nodes.n["a"][3], 0) < CHUNK, served
    assert _metric(_metrics_port(nodes.n["c"][1]), "fabric_operation_errors_total", op="peer_fetch", status="DATA_LOSS") >= 1
    stop_node(nodes.n["c"][1])
    with fabric.open(tmp_path / "c") as fc:
        assert fc.cassette.verify(raise_errors=False).problems == [] and fc.stats()["blobs"] == CHUNKS


def test_holders_killed_before_the_member_holds_them_dead_is_a_retryable_error(tmp_path, nodes):
    """A, the only holder, is killed with SIGKILL; C's failure detector still holds it live.
    ``get`` through C used to answer NOT_FOUND (as if no member held it); it is a retryable
    UNAVAILABLE, and nothing is recorded at C."""
    data = _data(5)
    ref = _seed(tmp_path / "a", data, {7: 49})
    nodes.start("a")
    c = nodes.start("c")
    nodes.knows("c", ref.key, "a")
    nodes.knows("c", _reply_key(7), "a")
    a = nodes.n["a"][1]
    a.send_signal(signal.SIGKILL)
    a.wait(10)
    for key in (_reply_key(7), ref.key):
        err = _get_error(c, key)
        assert err.status_code is StatusCode.UNAVAILABLE and err.retryable, (key, err)
        assert "could not serve it" in err.message
    st = _stats(c)
    assert st["records"] == 0 and st["blobs"] == 0


def test_a_chunk_every_holder_holds_corrupt_is_data_loss_for_a_member_lacking_it(tmp_path, nodes):
    """Chunk 5 rotted on both holders: C, which lacks the artifact, answers DATA_LOSS naming the
    chunk (it used to be a retryable UNAVAILABLE, retried in vain), and records no manifest."""
    data = _data(6)
    ref = _seed(tmp_path / "a", data, {})
    _seed(tmp_path / "b", data, {})
    for name in ("a", "b"):
        flip_in_file(tmp_path / name / "data.mdb", data[5 * CHUNK : 5 * CHUNK + 32])
    nodes.start("a")
    nodes.start("b")
    c = nodes.start("c")
    nodes.knows("c", ref.key, "a", "b")
    err = _get_error(c, ref.key)
    assert err.status_code is StatusCode.DATA_LOSS and "no live holder has an intact copy of chunk" in err.message, err
    assert _stats(c)["records"] == 0
