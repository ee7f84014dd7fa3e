"""The cassette: one node's append-only LMDB ledger of replies and blobs.

Normative format: ``specs/cassette-format.md``.  One LMDB environment per node
directory with named DBs ``ledger`` (u64 BE seq -> record), ``index``
(ContentKey bytes -> u64 BE seq), ``blobs`` (blob key -> bytes) and ``meta``.

Contract:

* Append-only.  A key is recorded once; recording it again is a no-op that
  returns the existing row.  The one exception: if the indexed row no longer
  verifies (bit rot), the new reply is appended as a fresh row and the index
  points to it.  Nothing is ever deleted or rewritten in place.
* All writes go through one writer thread that group-commits whatever puts are
  waiting into one transaction.  A put returns only after its transaction has
  committed; with ``durability="sync"`` (default) only once it is on stable
  storage (data pages fdatasync'd by the commit, meta page by the next
  fdatasync: specs/cassette-format.md section 5.1), with ``durability="fast"``
  at commit (a process crash loses nothing, an OS crash may lose the last
  commits).
* The map grows (doubling) on ``MDB_MAP_FULL`` instead of failing, and adopts a
  size grown by another process.  Readers never block the writer.
* A read never returns bytes that fail their hash: a corrupt row reads as a
  miss (and ``on_corrupt`` is called with its key).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import queue
import secrets
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import lmdb

from cassette import codec
from cassette.errors import FabricError, StatusCode
from cassette.keys import ContentKey, derive
from cassette.record import Record, check_ok, check_recordable, pack_record, payload_digest, record_key, unpack_record

__all__ = ["Cassette", "PendingPuts", "PutResult", "VerifyReport", "ReplayReport", "FORMAT_VERSION", "MISS"]

log = logging.getLogger("cassette")

#: On-disk format version written to ``meta[b"format"]``.
FORMAT_VERSION = 1
DURABILITIES = ("sync", "fast")
MISS: Any = object()  # sentinel returned by lookup_value on a miss

_decode = codec.decode
_crc32 = zlib.crc32
_RHDR = struct.Struct(">II")  # record header: check, meta_len (cassette.record)
# the meta map's first entry is always "key" (canonical order), so the key's 33 bytes
# sit at a fixed offset: 8-byte header, map header, "key", ext8 header (specs/cassette-format.md)
_KEY_AT = 8 + 1 + 4 + 3
_KEY_END = _KEY_AT + 33
_SEQ = struct.Struct(">Q")
_pack_seq = _SEQ.pack
_unpack_seq = _SEQ.unpack
_MAX_BATCH = 4096
#: Index entries (key -> ledger seq) a cassette keeps in memory for hits; cleared when full.
_SEQ_CACHE_MAX = 16384
_MAX_BATCH_BYTES = 64 << 20
_RELAY_S = 0.005  # a relay of wake-ups that stalls this long is finished by the writer
_GATHER_MIN_S = 0.0005  # how long the writer waits for released writers to come back:
_GATHER_MAX_S = 0.002  # one commit's time, within these bounds
_DEFAULT_MAP = 1 << 30
#: LMDB reader slots (one per read transaction in flight, in all processes together)
_MAX_READERS = 512
#: LMDB's errors for a damaged file (B-tree pages that are not what they should be; after
#: one of them the transaction is blocked, so its next call is MDB_BAD_TXN): DATA_LOSS
_DAMAGE = (lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.PanicError, lmdb.BadTxnError)
#: ...and, while opening, a named database that the main database lists but LMDB cannot open
#: (MDB_NOTFOUND, MDB_INVALID "not an LMDB file"): its record in the main database is damaged
_OPEN_DAMAGE = _DAMAGE + (lmdb.NotFoundError, lmdb.InvalidError)
#: ledger rows read, at most, when looking for a cassette's signature (see Cassette._signed)
_SIGNATURE_ROWS = 8
#: the named databases of a cassette: the only keys its LMDB main database may hold
_DB_NAMES = (b"ledger", b"index", b"blobs", b"meta")
#: files of ours that may sit in a cassette directory before its data.mdb does
_OWN_FILES = ("data.mdb", "lock.mdb", "compute.lock", "node.lock")


@dataclass(frozen=True)
class PutResult:
    """Outcome of recording one reply: its ledger ``seq`` and whether a row was appended."""

    key: ContentKey
    seq: int
    digest: bytes
    appended: bool


@dataclass
class VerifyReport:
    """What a scrub found: counts, and one DATA_LOSS FabricError per problem."""

    records: int = 0
    blobs: int = 0
    indexed: int = 0
    problems: list[FabricError] = field(default_factory=list)
    _seq: int = field(default=0, repr=False, compare=False)  # last ledger seq scrubbed (gap check)

    @property
    def ok(self) -> bool:
        """True when nothing was found wrong."""
        return not self.problems


@dataclass
class ReplayReport:
    """What a replay did: rows read, keys indexed, corrupt rows skipped (by seq)."""

    rows: int = 0
    indexed: int = 0
    corrupt_rows: list[int] = field(default_factory=list)


class _Job:
    """One write waiting for the writer thread.  A put waits on ``lock`` (held from
    creation until the job is acknowledged); trio waiters register ``callbacks``.

    ``waited`` marks a job whose submitting thread blocks on ``lock``: the writer
    releases those in a relay (:meth:`Cassette._ack`) instead of all at once."""

    __slots__ = ("op", "args", "result", "error", "done", "lock", "callbacks", "size", "batch", "waited", "relay")

    def __init__(self, op: str, args: tuple, size: int, waited: bool = False) -> None:
        self.op = op
        self.args = args
        self.size = size
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = False
        self.lock = threading.Lock()
        self.lock.acquire()
        self.callbacks: list[Callable[[], None]] = []
        self.batch = 0  # number of the commit that applied it (set by the writer)
        self.waited = waited
        self.relay: collections.deque[_Job] | None = None


class PendingPuts:
    """Records queued by :meth:`Cassette.submit_raw_many`; :meth:`wait` once, from the thread that queued them."""

    __slots__ = ("_job",)

    def __init__(self, job: "_Job | None") -> None:
        self._job = job

    def wait(self) -> list[PutResult]:
        """Their results in order once durable; the first record's error, if any failed (the rest are still applied)."""
        if self._job is None:
            return []
        outcomes = Cassette._wait(self._job)
        for o in outcomes:
            if isinstance(o, BaseException):
                raise o
        return outcomes


class _Slot:
    __slots__ = ("active",)

    def __init__(self) -> None:
        self.active = False



#: rows (or bytes) one :meth:`Cassette.scrub` step checks in one read transaction
SCRUB_ROWS = 4096
SCRUB_BYTES = 64 << 20
#: bytes of rows (or blobs) a scan copies out of one short read transaction before it yields
#: them (at least one): what a ledger or blob scan holds in memory at once, whatever the sizes
SCAN_BATCH_BYTES = 8 << 20


def _scrub_row(txn: Any, k: Any, v: Any, rep: "VerifyReport") -> None:
    rep.records += 1
    if len(k) != _SEQ.size:
        rep.problems.append(FabricError(StatusCode.DATA_LOSS, f"ledger row under {bytes(k)[:16]!r}, not a u64 seq", key=record_key(v)))
        return
    seq = _unpack_seq(k)[0]
    if seq != rep._seq + 1:  # rows are never deleted: seqs run 1..n
        rep.problems.append(FabricError(StatusCode.DATA_LOSS, f"ledger rows {rep._seq + 1}..{seq - 1} are missing"))
    rep._seq = seq
    try:
        unpack_record(v, seq)
    except FabricError as exc:
        rep.problems.append(FabricError(StatusCode.DATA_LOSS, exc.message, key=record_key(v)))


def _stored_key(k: Any) -> ContentKey | None:
    """The ContentKey a database entry is stored under, or ``None`` if those bytes are not one."""
    try:
        return ContentKey.from_bytes(bytes(k))
    except FabricError:
        return None


def _scrub_blob(txn: Any, k: Any, v: Any, rep: "VerifyReport") -> None:
    rep.blobs += 1
    key = _stored_key(k)
    if key is None or key[0] != 2:
        rep.problems.append(FabricError(StatusCode.DATA_LOSS, f"blob stored under {bytes(k)[:40].hex()}, not a blob key"))
    elif derive("blob", bytes(v)) != key[1:]:
        rep.problems.append(FabricError(StatusCode.DATA_LOSS, "blob bytes do not match their key", key=key))


class Cassette:
    """An append-only reply ledger in one directory (see module docstring).

    ``Cassette(path, durability="sync", map_size=1 GiB, node_id=None,
    create=True)``.  Opening a directory that is not a cassette, or one of a
    newer format, raises FAILED_PRECONDITION; a cassette whose LMDB main database
    is damaged, DATA_LOSS.  Safe to share between threads
    and between processes (LMDB locking); close with :meth:`close` or ``with``.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        durability: str = "sync",
        map_size: int = _DEFAULT_MAP,
        node_id: str | None = None,
        create: bool = True,
    ) -> None:
        if durability not in DURABILITIES:
            raise FabricError(StatusCode.INVALID_ARGUMENT, f"durability must be one of {DURABILITIES}, got {durability!r}")
        self.path = Path(path)
        self.durability = durability
        self.on_corrupt: Callable[[ContentKey], None] | None = None
        self.corrupt_reads = 0
        self.conflicts = 0  # puts of a held key with a different reply, since opened here (see _conflict)
        self._check_directory(create)
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            self._env = lmdb.open(
                str(self.path),
                map_size=max(int(map_size), 1 << 20),
                max_dbs=8,
                subdir=True,
                sync=durability == "sync",
                # sync mode: the commit fdatasyncs data pages; the meta page is made durable
                # by the next fdatasync, before anyone is told (see _write_loop).  Never
                # MDB_WRITEMAP: the argument of specs/cassette-format.md 5.1 assumes pwrite.
                metasync=False,
                readahead=False,
                max_readers=_MAX_READERS,
                lock=True,
            )
        except lmdb.Error as exc:
            raise FabricError(StatusCode.FAILED_PRECONDITION, f"cannot open cassette at {self.path}: {exc}") from None
        try:
            self._env.reader_check()  # clear reader slots left by killed processes
            self._refuse_foreign_env()  # before anything is written
            self.node_id = self._init_meta(node_id)
        except BaseException as exc:
            self._env.close()  # a refused directory leaves nothing open
            if isinstance(exc, _OPEN_DAMAGE):
                raise self._damaged(exc) from None
            raise
        # key -> ledger seq of a row that verified: ledger rows never move or change,
        # and a cached row is checked on every read like any other (see lookup_value)
        self._seqs: dict[ContentKey, bytes] = {}
        # resize gate: see _read / _resize
        self._local = threading.local()
        self._slots: list[_Slot] = []
        self._slots_lock = threading.Lock()
        self._resizing = False
        self._resize_done = threading.Event()
        self._resize_done.set()
        self._resize_lock = threading.Lock()
        # the one writer
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self.commits = 0  # write transactions committed by the writer
        self.syncs = 0  # explicit fdatasyncs (sync mode: no queued commit could carry the meta page)
        #: test hook, called by the writer: ("commit", n, wrote) after commit n returned,
        #: ("sync", n, True) after an fdatasync begun once commit n had returned,
        #: ("ack", n, count) before releasing jobs whose latest commit is n
        self._on_trace: Callable[[str, int, Any], None] | None = None
        self._closed = False
        self._open_lock = threading.Lock()  # orders a job's queueing against close() (see _submit)
        #: held by whoever stops the writer (rebuild_index for its replay, close for good): a
        #: close waits out a rebuild, and a rebuild never starts on a closing cassette
        self._writer_lock = threading.Lock()
        self._released = 0  # jobs acknowledged since the writer last gathered (they tend to come back)
        self._want = 0  # while the writer gathers: how many queued jobs should wake it
        self._gate = threading.Event()
        self._relay: collections.deque[_Job] = collections.deque()  # acknowledged, not yet woken (see _ack)
        self._writer = threading.Thread(target=self._write_loop, name=f"cassette-writer:{self.path.name}", daemon=True)
        self._writer.start()

    # ------------------------------------------------------------------ opening
    def _check_directory(self, create: bool) -> None:
        p = self.path
        if p.exists() and not p.is_dir():
            raise FabricError(StatusCode.FAILED_PRECONDITION, f"{p} is not a directory, so it cannot hold a cassette")
        has_data = (p / "data.mdb").exists()
        if p.exists() and not has_data:
            # subdirectories do not make it foreign ($FABRIC_HOME/demo-fleet/ beside the
            # default cassette); any other entry but our own lock files does
            stray = next((e.name for e in p.iterdir() if e.name not in _OWN_FILES and not e.is_dir()), None)
            if stray is not None:
                raise FabricError(
                    StatusCode.FAILED_PRECONDITION,
                    f"{p} is not a cassette directory (it holds {stray!r} but no data.mdb); use an empty or new directory",
                )
        if not has_data and not create:
            raise FabricError(StatusCode.NOT_FOUND, f"no cassette at {p}")

    def _refuse_foreign_env(self) -> None:
        """FAILED_PRECONDITION, with nothing written, for another program's LMDB environment:
        one whose main database holds a key that is not one of our database names, or
        holds one of them as something other than a named database (specs/cassette-format.md
        section 1).  Checked in a read transaction before any database is created."""
        with self._env.begin() as txn:
            for name in txn.cursor().iternext(values=False):
                name = bytes(name)
                if name not in _DB_NAMES:
                    raise self._refusal(txn, f"its main database has the key {name[:64]!r}", "holds an LMDB environment of another program")
                try:
                    self._env.open_db(name, txn=txn, create=False)
                except lmdb.IncompatibleError:
                    raise self._refusal(txn, f"{name.decode()!r} in its main database is not a named database",
                                        "holds an LMDB environment of another program") from None

    def _refusal(self, txn: lmdb.Transaction, found: str, verdict: str) -> FabricError:
        """What opening an environment that fails the checks of specs/cassette-format.md
        section 1 or 7 raises: FAILED_PRECONDITION "``path`` ``verdict`` (``found``)", the
        directory is not a cassette — unless the environment holds a cassette's signature
        all the same (:meth:`_signed`): then it is a cassette whose main database (or meta)
        is damaged, and DATA_LOSS says so and how to get its records back."""
        if self._signed(txn):
            return self._damaged(f"{found}, yet it holds cassette records")
        return FabricError(StatusCode.FAILED_PRECONDITION, f"{self.path} {verdict} ({found}); use an empty or new directory")

    def _signed(self, txn: lmdb.Transaction) -> bool:
        """Whether the environment read in ``txn`` holds a cassette's signature: a format
        mark in ``meta``, or one of the first ledger rows that verifies as a record (its
        check and digest).  Only reads; a database that cannot be opened or read adds nothing."""

        def format_mark() -> bool:
            return txn.get(b"format", db=self._env.open_db(b"meta", txn=txn, create=False)) is not None

        def verified_row() -> bool:
            rows = txn.cursor(db=self._env.open_db(b"ledger", txn=txn, create=False))
            for (k, v), _ in zip(rows, range(_SIGNATURE_ROWS)):
                try:
                    unpack_record(v, _unpack_seq(k)[0] if len(k) == _SEQ.size else 0)
                    return True
                except FabricError:
                    continue
            return False

        for probe in (format_mark, verified_row):
            try:
                if probe():
                    return True
            except lmdb.Error:
                continue
        return False

    def _init_meta(self, node_id: str | None) -> str:
        """Open the named databases and check (or, for a new cassette, write) the format
        marks, all in one write transaction: a refused environment is left as it was."""
        with self._env.begin(write=True) as txn:
            self._ledger = self._env.open_db(b"ledger", txn=txn)
            self._index = self._env.open_db(b"index", txn=txn)
            self._blobs = self._env.open_db(b"blobs", txn=txn)
            self._meta = self._env.open_db(b"meta", txn=txn)
            fmt = txn.get(b"format", db=self._meta)
            if fmt is None:
                if txn.stat(self._ledger)["entries"] or txn.stat(self._index)["entries"]:
                    raise self._refusal(txn, "entries but no cassette format mark", "holds an LMDB environment that is not a cassette")
                txn.put(b"format", str(FORMAT_VERSION).encode(), db=self._meta)
                txn.put(b"node_id", (node_id or f"n{secrets.token_hex(6)}").encode(), db=self._meta)
                txn.put(b"created", repr(time.time()).encode(), db=self._meta)
            else:
                try:
                    version = int(fmt)
                except ValueError:
                    raise FabricError(StatusCode.FAILED_PRECONDITION, f"{self.path}: unreadable cassette format mark {fmt!r}") from None
                if version > FORMAT_VERSION:
                    raise FabricError(
                        StatusCode.FAILED_PRECONDITION,
                        f"{self.path}: cassette format {version} is newer than this evalfabric supports ({FORMAT_VERSION}); upgrade evalfabric",
                    )
            stored = txn.get(b"node_id", db=self._meta)
            if stored is None:
                raise FabricError(StatusCode.FAILED_PRECONDITION, f"{self.path}: cassette without a node_id mark")
            try:
                stored = stored.decode()
            except UnicodeDecodeError:
                raise FabricError(StatusCode.FAILED_PRECONDITION, f"{self.path}: unreadable cassette node_id mark {bytes(stored)[:64]!r}") from None
        if fmt is None and self.durability == "sync":
            self._env.sync(True)  # the new cassette's marks, meta page included (metasync is off)
        return stored

    # ------------------------------------------------------------ resize gate
    def _slot(self) -> _Slot:
        slot = getattr(self._local, "slot", None)
        if slot is None:
            slot = self._local.slot = _Slot()
            with self._slots_lock:
                self._slots.append(slot)
        return slot

    def _enter(self) -> _Slot:
        """Mark this thread as inside an LMDB transaction (waits out a resize)."""
        slot = self._slot()
        while True:
            slot.active = True
            if not self._resizing:
                return slot
            slot.active = False
            self._resize_done.wait()

    def _resize(self, new_size: int) -> None:
        """Change the map size (0 = adopt another process's size) with no txn active in this process.

        The calling thread must not be inside a transaction (see :meth:`_readers_held`).
        """
        with self._readers_held():
            self._env.set_mapsize(new_size)

    @contextlib.contextmanager
    def _readers_held(self) -> Iterator[None]:
        """Run the body with no other thread of this process inside an LMDB transaction.

        Readers mark a per-thread slot active before ``begin``; under the GIL the
        flag store and the ``_resizing`` check are sequentially consistent, so
        either the reader sees the gate closed and waits, or the closer sees the
        reader and waits for it to finish.  The calling thread's own slot must be
        inactive.
        """
        with self._resize_lock:
            self._resize_done.clear()
            self._resizing = True
            try:
                while any(s.active for s in self._slots):
                    time.sleep(0.0005)
                yield
            finally:
                self._resizing = False
                self._resize_done.set()

    def _write(self, body: Callable[[lmdb.Transaction], Any], what: str) -> Any:
        """``body(txn)`` in one write transaction, committed; a full map is doubled and the
        body run again (``what`` names the work in the log line).

        A transaction that fails is aborted with the readers held out: py-lmdb 3.0
        aborts a write transaction only once no other thread is inside an LMDB call,
        which readers busy on other threads could put off indefinitely (a writer hung
        for minutes after a map-full).  Other errors propagate.
        """
        while True:
            slot = self._enter()
            try:
                txn = self._env.begin(write=True)
            except lmdb.MapResizedError:
                slot.active = False
                self._resize(0)
                continue
            except BaseException as exc:
                slot.active = False
                if self._closed and isinstance(exc, lmdb.Error):
                    raise self._closed_error() from None
                raise
            try:
                out = body(txn)
                txn.commit()
            except BaseException as exc:
                slot.active = False
                with self._readers_held():
                    txn.abort()  # after a failed commit LMDB has freed it: nothing left to do
                    if isinstance(exc, lmdb.MapFullError):
                        new = self._env.info()["map_size"] * 2
                        log.info("cassette %s: map full %s, growing to %d bytes", self.path, what, new)
                        self._env.set_mapsize(new)
                    elif isinstance(exc, lmdb.MapResizedError):
                        self._env.set_mapsize(0)
                if isinstance(exc, (lmdb.MapFullError, lmdb.MapResizedError)):
                    continue
                raise
            slot.active = False
            return out

    @contextlib.contextmanager
    def _reading(self) -> Iterator[lmdb.Transaction]:
        """A read transaction (buffers=True) inside the resize gate; values are valid only inside."""
        slot, txn = self._begin_read()
        try:
            yield txn
        except _DAMAGE as exc:
            raise self._damaged(exc) from None
        finally:
            txn.abort()
            slot.active = False

    def _begin_read(self):
        """``(slot, read txn)``: the slow way in, taken by every read but the hit path's
        first try.  After :meth:`close` LMDB's "closed object" error becomes
        FAILED_PRECONDITION (checked only once ``begin`` has failed: no cost to a read)."""
        slot = self._enter()
        try:
            try:
                return slot, self._env.begin(buffers=True)
            except lmdb.MapResizedError:
                slot.active = False
                self._resize(0)
                slot = self._enter()
                return slot, self._env.begin(buffers=True)
            except lmdb.ReadersFullError:
                return slot, self._begin_after_reader_check()
        except BaseException as exc:
            slot.active = False
            if self._closed and isinstance(exc, lmdb.Error):
                raise self._closed_error() from None
            if isinstance(exc, _DAMAGE):
                raise self._damaged(exc) from None
            raise

    def _begin_after_reader_check(self) -> lmdb.Transaction:
        """A read transaction once LMDB's reader table was found full: free the slots of
        processes that died holding them (killed -9 after this cassette was opened, so the
        ``reader_check`` at open could not see them) and try again.  RESOURCE_EXHAUSTED
        when live readers really hold every slot."""
        cleared = self._env.reader_check()
        try:
            return self._env.begin(buffers=True)
        except lmdb.ReadersFullError:
            raise FabricError(
                StatusCode.RESOURCE_EXHAUSTED,
                f"cassette {self.path}: all {_MAX_READERS} LMDB reader slots are held by live readers "
                f"({cleared} stale ones cleared); retry once some finish",
            ) from None

    def _damaged(self, what: BaseException | str) -> FabricError:
        """DATA_LOSS for damage to the data file itself: an LMDB error that means so
        (``_DAMAGE``), or ``what`` opening found: no value is served from it; the way back
        is a replay of an export or of a peer."""
        detail = what if isinstance(what, str) else f"{type(what).__name__}: {what}"
        return FabricError(
            StatusCode.DATA_LOSS,
            f"cassette {self.path}: its LMDB file is damaged ({detail}); move it aside and replay an export "
            "into a new directory (fabric replay FILE --data DIR; Cassette.from_ledger) or refetch from a peer",
        )

    def _closed_error(self) -> FabricError:
        """What any use of a closed cassette raises."""
        return FabricError(StatusCode.FAILED_PRECONDITION, f"cassette {self.path} is closed")

    def _check_open(self) -> None:
        if self._closed:
            raise self._closed_error()

    # ----------------------------------------------------------------- reading
    def lookup_value(self, key: ContentKey) -> Any:
        """The decoded reply recorded under ``key``, or :data:`MISS`.

        The hot path: one read transaction, the key's ledger seq from memory
        once a row of it verified (ledger rows never move), one CRC over the
        record, one decode.  A row that fails its check reads as a miss.
        """
        try:
            slot = self._local.slot
        except AttributeError:
            slot = self._slot()
        slot.active = True
        if self._resizing:
            slot.active = False
            slot = self._enter()
        try:
            txn = self._env.begin(buffers=True)
        except BaseException:
            slot.active = False
            slot, txn = self._begin_read()  # handles MapResizedError
        try:
            row = self._row(txn, key)
            if row is None:
                return MISS
            return _decode(row[0][8 + row[1] :])
        except _DAMAGE as exc:
            raise self._damaged(exc) from None
        finally:
            txn.abort()
            slot.active = False

    def _row(self, txn: lmdb.Transaction, key: ContentKey) -> tuple[Any, int] | None:
        """``(ledger value, meta_len)`` of ``key``'s row if it passes its check and is
        the row of ``key``; else ``None`` (a failing row is reported corrupt).

        The seq comes from memory once a row of the key verified (ledger rows never
        move); a remembered row that fails is forgotten and the index asked again,
        as it may point to a fresh row (specs/cassette-format.md section 11).
        """
        seqs = self._seqs
        seq = seqs.get(key)
        cached = seq is not None
        while True:
            if seq is None:
                seq = txn.get(key, db=self._index)
                if seq is None:
                    return None
            value = txn.get(seq, db=self._ledger)
            if value is not None and len(value) >= _KEY_END:
                check, meta_len = _RHDR.unpack_from(value)
                if _crc32(value[4:]) == check and 8 + meta_len <= len(value) and value[_KEY_AT:_KEY_END] == key:
                    if not cached:
                        if len(seqs) >= _SEQ_CACHE_MAX:
                            seqs.clear()
                        seqs[key] = bytes(seq)
                    return value, meta_len
            if not cached:
                self._corrupt(key)
                return None
            seqs.pop(key, None)
            seq, cached = None, False

    def get_record(self, key: ContentKey) -> Record | None:
        """The verified record for ``key``, or ``None`` if absent or corrupt."""
        with self._reading() as txn:
            seqb = txn.get(key, db=self._index)
            if seqb is None:
                return None
            value = txn.get(seqb, db=self._ledger)
            if value is None:
                self._corrupt(key)
                return None
            try:
                rec = unpack_record(value, _unpack_seq(seqb)[0])
            except FabricError:
                self._corrupt(key)
                return None
            if rec.key != key:
                self._corrupt(key)
                return None
            return rec

    def get_raw(self, key: ContentKey) -> bytes | None:
        """The verified ledger value bytes for ``key`` (as sent to peers), or ``None``."""
        slot, txn = self._begin_read()
        try:
            row = self._row(txn, key)
            return None if row is None else bytes(row[0])
        except _DAMAGE as exc:
            raise self._damaged(exc) from None
        finally:
            txn.abort()
            slot.active = False

    def get_raw_many(self, keys: Sequence[ContentKey], max_bytes: int) -> list[bytes | None]:
        """:meth:`get_raw` of each of ``keys`` in one read transaction, in order.

        A held row is returned while the rows returned so far plus it stay within
        ``max_bytes``; a key not held, whose row fails its check, or whose row no
        longer fits gives ``None`` (later, smaller rows may still fit).
        """
        out: list[bytes | None] = []
        left = max_bytes
        slot, txn = self._begin_read()
        try:
            for key in keys:
                row = self._row(txn, key)
                if row is None or len(row[0]) > left:
                    out.append(None)
                    continue
                left -= len(row[0])
                out.append(bytes(row[0]))
            return out
        except _DAMAGE as exc:
            raise self._damaged(exc) from None
        finally:
            txn.abort()
            slot.active = False

    def contains(self, key: ContentKey) -> bool:
        """Whether ``key`` is indexed (without verifying its row)."""
        with self._reading() as txn:
            db = self._index if key[0] != 2 else self._blobs
            return txn.get(key, db=db) is not None

    def missing(self, keys: Iterable[ContentKey], *, verify_blobs: bool = False) -> list[ContentKey]:
        """Of ``keys``, those this cassette does not hold (one batched read; blobs and records).

        With ``verify_blobs`` a blob whose bytes no longer match its key counts as missing
        (so storing it again repairs it).
        """
        with self._reading() as txn:
            out = []
            for k in keys:
                db = self._blobs if k[0] == 2 else self._index
                v = txn.get(k, db=db)
                if v is None or (verify_blobs and k[0] == 2 and derive("blob", v) != k[1:]):
                    out.append(k)
            return out

    def get_blob(self, key: ContentKey) -> bytes | None:
        """The blob's bytes, verified against its key, or ``None`` (absent or corrupt)."""
        with self._reading() as txn:
            v = txn.get(key, db=self._blobs)
            if v is None:
                return None
            data = bytes(v)
        if derive("blob", data) != key[1:]:
            self._corrupt(key)
            return None
        return data

    def _corrupt(self, key: ContentKey) -> None:
        self.corrupt_reads += 1
        log.warning("cassette %s: corrupt row for %s reads as a miss", self.path, key)
        cb = self.on_corrupt
        if cb is not None:
            cb(key)

    def _iter_rows(self, start: int = 1) -> Iterator[tuple[int, bytes]]:
        """Raw ``(seq, ledger value)`` rows in order from ``start``, read in short transactions.

        A row under a key that is not a u64 seq is passed over (``verify()`` reports it), and
        each transaction starts past the highest seq read so far, so a scan ends even over a
        damaged (out of order) B-tree page."""
        seq = start
        while True:
            batch: list[tuple[int, bytes]] = []
            nbytes = 0
            with self._reading() as txn:
                cur = txn.cursor(db=self._ledger)
                floor = seq
                if cur.set_range(_pack_seq(floor)):
                    for k, v in cur:
                        if len(k) != _SEQ.size or _unpack_seq(k)[0] < floor:
                            continue
                        batch.append((_unpack_seq(k)[0], bytes(v)))
                        seq = max(seq, batch[-1][0] + 1)
                        nbytes += len(v)
                        if len(batch) >= 1024 or nbytes >= SCAN_BATCH_BYTES:
                            break
            if not batch:
                return
            yield from batch

    def iter_ledger(self, start: int = 1, *, verify: bool = True) -> Iterator[Record]:
        """Records in ledger order from ``start``.

        A corrupt row raises DATA_LOSS when ``verify`` is true and is skipped otherwise.
        """
        for seq, value in self._iter_rows(start):
            if verify:
                yield unpack_record(value, seq)
                continue
            try:
                yield unpack_record(value, seq)
            except FabricError:
                continue

    def stats(self) -> dict[str, Any]:
        """Counts and sizes: records (indexed keys), ledger_rows, blobs, bytes, map_size, node_id;
        ``conflicts``: puts and imports, since this process opened the cassette, that offered a
        held key a reply with another digest (kept out: see :meth:`_conflict`)."""
        with self._reading() as txn:
            ledger_rows = txn.stat(self._ledger)["entries"]
            indexed = txn.stat(self._index)["entries"]
            blobs = txn.stat(self._blobs)["entries"]
            nbytes = self._ledger_bytes(txn)
        return {
            "node_id": self.node_id,
            "path": str(self.path),
            "records": indexed,
            "ledger_rows": ledger_rows,
            "blobs": blobs,
            "ledger_bytes": nbytes,
            "map_size": self._env.info()["map_size"],
            "durability": self.durability,
            "format": FORMAT_VERSION,
            "conflicts": self.conflicts,
        }

    def __len__(self) -> int:
        return self.stats()["records"]

    def _ledger_bytes(self, txn: lmdb.Transaction) -> int:
        """``meta[ledger_bytes]`` (0 before the first row); recounted from the ledger if its
        text is unreadable (bit rot in a counter must not fail stats or a scrape)."""
        total = _counter(txn.get(b"ledger_bytes", db=self._meta))
        return self._recount_bytes(txn) if total is None else total

    def _recount_bytes(self, txn: lmdb.Transaction) -> int:
        """The sum of the lengths of all ledger values, counted in ``txn`` (what ``ledger_bytes`` counts)."""
        log.warning("cassette %s: meta ledger_bytes is unreadable; recounting it from the ledger", self.path)
        return sum(len(v) for v in txn.cursor(db=self._ledger).iternext(keys=False))

    # ----------------------------------------------------------------- writing
    def put(
        self,
        key: ContentKey,
        payload: bytes,
        *,
        evaluator: str = "",
        version: str = "",
        compute_s: float = 0.0,
        created: float | None = None,
        node: str | None = None,
    ) -> PutResult:
        """Record ``payload`` (canonical bytes of a reply) under ``key``; returns once durable.

        Recording a key that is already held (and verifies) appends nothing and
        returns the existing row with ``appended=False``.
        """
        return self._wait(self._submit_put(key, payload, evaluator, version, compute_s, created, node, True))

    async def aput(self, key: ContentKey, payload: bytes, **kw: Any) -> PutResult:
        """:meth:`put` for trio: awaits the group commit without blocking the event loop."""
        job = self._submit_put(
            key, payload, kw.get("evaluator", ""), kw.get("version", ""), kw.get("compute_s", 0.0), kw.get("created"), kw.get("node"), False
        )
        return await self._await(job)

    async def aput_record(self, rec: Record) -> PutResult:
        """Record a verified :class:`Record` obtained elsewhere (a peer, an upstream node),
        keeping its original metadata (producing node, times); from trio."""
        return await self.aput(rec.key, rec.payload, evaluator=rec.evaluator, version=rec.version,
                               compute_s=rec.compute_s, created=rec.created, node=rec.node)

    def put_blob(self, data: bytes) -> ContentKey:
        """Store a blob; returns its key (``ContentKey.of("blob", data)``) once durable."""
        return self.put_blobs([data])[0]

    def put_blobs(self, datas: Iterable[bytes]) -> list[ContentKey]:
        """Store several blobs in one group commit; returns their keys in order."""
        items = []
        for d in datas:
            d = bytes(d)
            items.append((ContentKey.of("blob", d), d))
        if not items:
            return []
        self._wait(self._submit(_Job("blobs", (items,), sum(len(d) for _, d in items), True)))  # keys computed here
        return [k for k, _ in items]

    def put_verified_blobs(self, items: list[tuple[ContentKey, bytes]]) -> None:
        """Store pre-keyed blobs (e.g. fetched from a peer) after checking each against its key."""
        self._wait(self._submit(_blob_job(items, True)))

    async def aput_blobs(self, items: list[tuple[ContentKey, bytes]], *, verified: bool = False) -> None:
        """:meth:`put_verified_blobs` for trio.  ``verified=True``: the caller has just
        checked every blob against its key (as a fetch or an upload does on arrival),
        so they are not hashed a second time here."""
        await self._await(self._submit(_blob_job(items, verified=verified)))

    def put_raw(self, value: bytes) -> PutResult:
        """Append a ledger value received from elsewhere (a peer, an export) after verifying it fully."""
        return self.put_raw_many([value])[0]

    def put_raw_many(self, values: Iterable[bytes]) -> list[PutResult]:
        """:meth:`put_raw` for many values: all verified first, then group-committed together."""
        return self.submit_raw_many(values).wait()

    def submit_raw_many(self, values: Iterable[bytes]) -> "PendingPuts":
        """:meth:`put_raw_many` without waiting: every value is verified, and its key must be a
        request or artifact key (an invalid one raises here and none is queued), then all are queued as one write; ``.wait()`` on the
        returned :class:`PendingPuts` gives their results once durable.  Writes queued one
        after another are applied in that order, so a caller may read and verify its next
        batch while this one is written."""
        items = []
        size = 0
        for value in values:
            rec = check_recordable(unpack_record(value))
            items.append((rec.key, bytes(value), rec.digest))
            size += len(value)
        return PendingPuts(self._submit(_Job("raws", (items,), size, True)) if items else None)

    def _submit_put(self, key, payload, evaluator, version, compute_s, created, node, waited) -> _Job:
        if type(key) is not ContentKey:
            raise FabricError(StatusCode.INVALID_ARGUMENT, f"put: key must be a ContentKey, got {type(key).__name__}")
        if key.kind == "blob":  # (import and replay refuse such a row, and a scrub reports one as damage)
            raise FabricError(StatusCode.INVALID_ARGUMENT, "put: a blob is stored with put_blob, never recorded under its key", key=key)
        payload = bytes(payload)
        digest = payload_digest(payload)
        value = pack_record(
            key,
            payload,
            evaluator=evaluator,
            version=version,
            created=time.time() if created is None else created,
            compute_s=compute_s,
            node=node or self.node_id,
            digest=digest,
        )
        return self._submit(_Job("raw", (key, value, digest), len(value), waited))

    def _submit(self, job: _Job) -> _Job:
        q = self._queue
        with self._open_lock:  # queued ahead of close()'s stop marker, or refused: never behind it
            if self._closed:
                raise self._closed_error()
            q.put(job)
        want = self._want
        if want and q.qsize() >= want:
            self._gate.set()  # the writer is gathering and this completes its batch
        return job

    @staticmethod
    def _wait(job: _Job) -> Any:
        job.lock.acquire()  # released once the job is acknowledged (see _ack)
        relay = job.relay
        if relay:  # pass the wake-up on to the next acknowledged waiter
            try:
                relay.popleft().lock.release()
            except IndexError:
                pass
        if job.error is not None:
            raise job.error
        return job.result

    @staticmethod
    async def _await(job: _Job) -> Any:
        import trio

        if not job.done:
            token = trio.lowlevel.current_trio_token()
            done = trio.Event()
            job.callbacks.append(lambda: token.run_sync_soon(done.set))
            if not job.done:  # the writer may have finished before the callback was added
                await done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def _write_loop(self) -> None:
        """The one writer: group-commit queued jobs, acknowledge each only once durable.

        ``durability="fast"``: a batch is acknowledged once committed.  ``"sync"``:
        LMDB runs with MDB_NOMETASYNC, so a commit fdatasyncs its data pages and
        then writes its meta page without syncing it.  A batch is acknowledged
        at the first fdatasync of the data file that *starts* after its commit
        returned: the data sync inside the next commit that writes pages, or an
        explicit ``env.sync`` as soon as no queued job could start such a commit
        (specs/cassette-format.md, section 5.1).  ``unsynced`` holds the jobs of
        committed batches still waiting for that point, in commit order.
        """
        sync = self.durability == "sync"
        q = self._queue
        unsynced: list[_Job] = []
        last_commit_s = 0.0
        while True:
            if unsynced and (q.empty() or len(unsynced) >= _MAX_BATCH):
                # nothing queued whose commit would carry the meta page (or a run of
                # commits that wrote nothing kept it from being carried): sync it now
                self._settle(unsynced)
                unsynced = []
            if self._relay and q.empty():
                # wake-ups are still being relayed: wait for work, but at most _RELAY_S,
                # then finish the relay (a waiter that never waited stalled it).  Not
                # q.get(timeout=...): on CPython 3.11 a SimpleQueue.get whose wait a
                # signal interrupts near its deadline blocks forever.
                if not self._wait_gate(1, _RELAY_S):
                    self._drain_relay()
                    continue
            job = q.get()
            if job is None:
                break
            batch, stop = self._gather(job, sync, last_commit_s)
            t0 = time.perf_counter()
            wrote = self._commit(batch)
            last_commit_s = time.perf_counter() - t0
            self.commits += 1
            if not sync or wrote is None:
                self._ack(batch)  # fast mode promises no more than committed; a failed batch wrote nothing
            elif wrote:
                # this commit's data fdatasync began after every earlier commit had
                # written its meta page: those are durable now, this one is not yet
                self._trace("commit", self.commits, True)
                self._ack(unsynced)
                unsynced = batch
            else:
                # nothing written, so no fdatasync ran; its results may rest on unsynced rows
                self._trace("commit", self.commits, False)
                unsynced.extend(batch)
            if stop:
                break
        self._settle(unsynced)
        self._drain_relay()

    def _gather(self, job: _Job, sync: bool, last_commit_s: float) -> tuple[list[_Job], bool]:
        """The next batch: ``job``, whatever is queued, and (sync mode) the puts of the
        writers released by the last acknowledgement, which are coming back: wait for
        them (at most a commit's time) so they share the next fsync.  Returns the
        batch and whether the close marker was met."""
        q = self._queue
        batch = [job]
        size = job.size
        expect, self._released = self._released, 0
        deadline = 0.0
        while True:
            while len(batch) < _MAX_BATCH and size < _MAX_BATCH_BYTES:
                try:
                    nxt = q.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    return batch, True
                batch.append(nxt)
                size += nxt.size
            if not sync or len(batch) >= expect or len(batch) >= _MAX_BATCH or size >= _MAX_BATCH_BYTES:
                return batch, False
            # sleep until enough are queued (the producer that completes the count sets
            # the gate), instead of waking for every single arrival
            now = time.perf_counter()
            if not deadline:
                deadline = now + min(_GATHER_MAX_S, max(last_commit_s, _GATHER_MIN_S))
            left = deadline - now
            if left <= 0:
                return batch, False
            self._wait_gate(expect - len(batch), left)

    def _wait_gate(self, want: int, timeout: float) -> bool:
        """Sleep until ``want`` jobs are queued (the submitting producer sets the gate)
        or ``timeout`` passes; returns whether they are there."""
        q = self._queue
        self._gate.clear()
        self._want = want
        try:
            if q.qsize() < want:
                self._gate.wait(timeout)
        finally:
            self._want = 0
        return q.qsize() >= want

    def _settle(self, unsynced: list[_Job]) -> None:
        """fdatasync the data file (every commit so far, data and meta page, becomes
        durable), then acknowledge ``unsynced``.  If the OS cannot promise that,
        every one of them hears INTERNAL instead: none may be told it is durable."""
        if not unsynced:
            return
        slot = self._enter()  # never while a resize remaps the environment
        try:
            self._env.sync(True)
        except Exception as exc:  # noqa: BLE001 - every waiter must hear about it
            log.error("cassette %s: sync failed: %s", self.path, exc)
            err = FabricError(StatusCode.INTERNAL, f"cassette sync failed: {type(exc).__name__}: {exc}")
            for job in unsynced:
                job.result, job.error = None, err
        else:
            self.syncs += 1
            self._trace("sync", self.commits, True)
        finally:
            slot.active = False
        self._ack(unsynced)

    def _ack(self, jobs: list[_Job]) -> None:
        """Acknowledge ``jobs`` (in commit order): results are final, waiters may go.

        Threads blocked in :meth:`_wait` are woken in a relay: acknowledged
        waiters join a FIFO, this wakes one, and each waiter wakes the next as it
        wakes, so released threads do not all fight for the GIL at once
        (measured on 2 cores: 8 to 14% more durable puts/s with 16 writers).  Each
        waiter is popped, so released, exactly once; popping one more than
        needed only starts a second relay.  If the relay stalls (a waiter that
        never waits) the writer empties it after ``_RELAY_S`` (:meth:`_write_loop`).
        """
        if not jobs:
            return
        if self._on_trace is not None:
            self._on_trace("ack", jobs[-1].batch, len(jobs))
        self._released += len(jobs)
        relay = self._relay
        for j in jobs:
            j.done = True
            if j.waited:
                j.relay = relay
                relay.append(j)
            else:
                j.lock.release()
            for cb in j.callbacks:
                cb()
        try:
            relay.popleft().lock.release()
        except IndexError:
            pass

    def _drain_relay(self) -> None:
        """Wake every acknowledged waiter still in the relay."""
        relay = self._relay
        while relay:
            try:
                relay.popleft().lock.release()
            except IndexError:
                break

    def _trace(self, event: str, commit: int, flag: Any) -> None:
        if self._on_trace is not None:
            self._on_trace(event, commit, flag)

    def _commit(self, batch: list[_Job]) -> bool | None:
        """Apply ``batch`` in one write transaction, growing the map as needed.

        Returns whether the transaction wrote anything (then LMDB's commit
        fdatasync'd the data file), or ``None`` if it failed (every job has its error).
        """
        try:
            return self._write(lambda txn: self._apply_batch(txn, batch), "while writing")
        except Exception as exc:  # noqa: BLE001 - every waiter must hear about it
            if isinstance(exc, _DAMAGE):
                err = self._damaged(exc)
            else:
                err = FabricError(StatusCode.INTERNAL, f"cassette write failed: {type(exc).__name__}: {exc}")
            for job in batch:
                job.result, job.error = None, err
            return None

    def _apply_batch(self, txn: lmdb.Transaction, batch: list[_Job]) -> bool:
        """Apply every job of ``batch`` in ``txn``; results and per-job errors go on the jobs.

        The common case, a new key, is two LMDB calls: an index insert that
        fails if the key is held, and an append to the ledger.
        """
        ledger = txn.cursor(db=self._ledger)
        index = txn.cursor(db=self._index)
        seq = _unpack_seq(ledger.key())[0] if ledger.last() else 0
        added = 0
        wrote = False
        commit_no = self.commits + 1
        for job in batch:
            job.batch = commit_no
            job.error = None
            if job.op == "raw":
                job.result, job.error, seq, n = self._apply_raw(txn, index, ledger, seq, *job.args)
                added += n
            elif job.op == "raws":  # many records, one job: a result or an error each
                (items,) = job.args
                outcomes = []
                for key, value, digest in items:
                    result, error, seq, n = self._apply_raw(txn, index, ledger, seq, key, value, digest)
                    outcomes.append(result if error is None else error)
                    added += n
                job.result = outcomes
            elif job.op == "blobs":
                (items,) = job.args
                for k, d in items:
                    if txn.put(k, d, db=self._blobs, overwrite=False):
                        wrote = True
                        continue
                    old = txn.get(k, db=self._blobs)
                    if old is not None and derive("blob", old) != k[1:]:
                        log.warning("cassette %s: repairing rotted blob %s with verified bytes", self.path, k)
                        txn.put(k, d, db=self._blobs)  # same content, correct bytes: a repair, not a mutation
                        wrote = True
                job.result = None
            else:
                job.result, job.error = None, FabricError(StatusCode.INTERNAL, f"unknown write op {job.op!r}")
        if added:
            total = _counter(txn.get(b"ledger_bytes", db=self._meta))
            total = self._recount_bytes(txn) if total is None else total + added  # (a recount has this batch's rows)
            txn.put(b"ledger_bytes", str(total).encode(), db=self._meta)
            wrote = True
        return wrote

    def _apply_raw(self, txn: lmdb.Transaction, index: Any, ledger: Any, seq: int, key: ContentKey, value: bytes,
                   digest: bytes) -> tuple[PutResult | None, FabricError | None, int, int]:
        """Append one verified record after ledger row ``seq`` unless ``key`` is held by a row
        that verifies: ``(result, error, last seq, bytes appended)``.  An index insert that
        fails if the key is held, and an append to the ledger: two LMDB calls for a new key.
        An index entry held by a row that fails its check, is missing, or is the row of another
        key (a rotted or stale seq) does not hold the key: the record is appended and indexed."""
        seqb = _pack_seq(seq + 1)
        if not index.put(key, seqb, overwrite=False):  # held already
            held = txn.get(key, db=self._index)
            existing = txn.get(held, db=self._ledger)
            if existing is not None and check_ok(existing) and existing[_KEY_AT:_KEY_END] == key:
                try:
                    held_digest = _existing_digest(existing)
                except FabricError as exc:  # CRC matches but the record does not verify
                    return None, exc, seq, 0
                if held_digest != digest:
                    self._conflict(key, held_digest, digest)
                return PutResult(key, _unpack_seq(held)[0], held_digest, False), None, seq, 0
            log.warning("cassette %s: indexed row for %s is corrupt or not its row; appending a fresh row", self.path, key)
            txn.put(key, seqb, db=self._index)
        if not ledger.put(seqb, value, append=True):  # seq is last + 1, so this cannot refuse
            raise RuntimeError(f"ledger append refused at seq {seq + 1}")
        return PutResult(key, seq + 1, digest, True), None, seq + 1, len(value)

    def _conflict(self, key: ContentKey, held: bytes, offered: bytes) -> None:
        """A reply offered for a held key differs from the recorded one: the evaluator is not
        deterministic (or its version was not bumped).  The recorded reply stays (section 4);
        the conflict is logged and counted (``stats()["conflicts"]``), never silent."""
        self.conflicts += 1
        log.warning("cassette %s: determinism conflict for %s: recorded reply has digest %s, a different one (%s) was offered "
                    "and not recorded", self.path, key, held.hex()[:16], offered.hex()[:16])

    # ------------------------------------------------------- scrub and replay
    def verify(self, *, raise_errors: bool = True, progress: Callable[[int], None] | None = None) -> VerifyReport:
        """Scrub every ledger row, index entry and blob.

        Every mismatch becomes a ``FabricError(DATA_LOSS)`` naming the key in
        the report.  With ``raise_errors`` (default) the first problem is raised,
        its message counting the rest and ``err.report`` holding the report.
        ``progress(ledger rows checked)`` is called as the scrub goes.  It runs
        in short read transactions (:meth:`scrub`), so writers, map growth
        included, go on meanwhile.
        """
        rep = VerifyReport()
        for _ in self.scrub(rep):
            if progress is not None:
                progress(rep.records)
        if rep.problems and raise_errors:
            first = rep.problems[0]
            err = FabricError(
                StatusCode.DATA_LOSS,
                f"{len(rep.problems)} problem(s) in {self.path}; first: {first.message}",
                key=first.key,
            )
            err.report = rep  # type: ignore[attr-defined]
            raise err
        return rep

    def scrub(self, rep: VerifyReport | None = None) -> Iterator[VerifyReport]:
        """:meth:`verify` in steps: each step checks up to :data:`SCRUB_ROWS` rows (or
        :data:`SCRUB_BYTES` bytes) of the ledger, then the index, then the blobs, in a
        read transaction of its own, and yields the report so far (``rep``, or a new one).

        Between steps no transaction is held, so a caller may stop at any step (closing
        the generator) and a long scrub never keeps the map from growing.  Rows appended
        meanwhile may or may not be counted; each index entry is checked against the
        ledger row it points to in the same transaction.
        """
        if rep is None:
            rep = VerifyReport()
        for db, check in ((self._ledger, _scrub_row), (self._index, self._scrub_entry), (self._blobs, _scrub_blob)):
            after: bytes | None = None
            more = True
            while more:
                try:
                    more, after = self._scrub_step(db, check, after, rep)
                except FabricError as exc:
                    if exc.status_code is not StatusCode.DATA_LOSS:
                        raise
                    rep.problems.append(exc)  # a damaged B-tree: the rest of this database cannot be walked
                    more = False
                yield rep

    def _scrub_step(self, db: Any, check: Callable, after: bytes | None, rep: VerifyReport) -> tuple[bool, bytes | None]:
        """Check the entries of ``db`` after key ``after`` (from the first if ``None``), up to
        SCRUB_ROWS / SCRUB_BYTES, in one read transaction: ``(more to check, last key checked)``."""
        with self._reading() as txn:
            cur = txn.cursor(db=db)
            floor = after
            more = cur.first() if floor is None else cur.set_range(floor)
            rows = nbytes = 0
            while more and rows < SCRUB_ROWS and nbytes < SCRUB_BYTES:
                k, v = cur.item()
                # the next step starts past the highest key checked: a scrub ends even over
                # a damaged (out of order) page
                if floor is None or bytes(k) > floor:
                    check(txn, k, v, rep)
                    after = bytes(k) if after is None else max(after, bytes(k))
                    rows += 1
                    nbytes += len(v)
                more = cur.next()
            return more, after

    def _scrub_entry(self, txn: lmdb.Transaction, k: Any, v: Any, rep: VerifyReport) -> None:
        rep.indexed += 1
        key = _stored_key(k)
        if key is None or key[0] == 2:
            rep.problems.append(FabricError(StatusCode.DATA_LOSS, f"index entry under {bytes(k)[:40].hex()}, not a record key"))
            return
        if len(v) != _SEQ.size:
            rep.problems.append(FabricError(StatusCode.DATA_LOSS, f"index entry holds {len(v)} bytes, not a u64 seq", key=key))
            return
        row = txn.get(bytes(v), db=self._ledger)
        if row is None:
            rep.problems.append(FabricError(StatusCode.DATA_LOSS, "index points to a missing ledger row", key=key))
            return
        try:
            rec = unpack_record(row, _unpack_seq(v)[0])
        except FabricError:
            if not any(p.key == key for p in rep.problems):
                rep.problems.append(FabricError(StatusCode.DATA_LOSS, "indexed record fails verification", key=key))
            return
        if rec.key != key:
            rep.problems.append(FabricError(StatusCode.DATA_LOSS, f"index points to row {rec.seq} of another key", key=key))

    def rebuild_index(self, *, progress: Callable[[int], None] | None = None) -> ReplayReport:
        """Drop the index and rebuild it by replaying the ledger, verifying every row.

        For each key the index points to the first row of that key that
        verifies (the same row live appends would have chosen).  Racing
        :meth:`close` on another thread, it either completes (the close waits for
        it) or raises FAILED_PRECONDITION "closed" having done nothing.  Not to be
        called from ``progress`` or another callback of this cassette.
        """
        with self._writer_lock:
            self._check_open()  # (a closed cassette must not get a writer thread back)
            self._queue.put(None)  # quiesce the writer: replay writes directly
            self._writer.join()
            try:
                return self._rebuild(progress)
            finally:
                self._writer = threading.Thread(target=self._write_loop, name=self._writer.name, daemon=True)
                self._writer.start()

    def _rebuild(self, progress: Callable[[int], None] | None) -> ReplayReport:
        """:meth:`rebuild_index` in a single write transaction."""

        def rebuild(txn: lmdb.Transaction) -> ReplayReport:
            rep = ReplayReport()
            txn.drop(self._index, delete=False)
            cur = txn.cursor(db=self._ledger)
            for k, v in cur:
                rep.rows += 1
                seq = _unpack_seq(k)[0]
                try:
                    rec = unpack_record(v, seq)
                except FabricError:
                    rep.corrupt_rows.append(seq)
                    continue
                if txn.put(rec.key, bytes(k), db=self._index, overwrite=False):
                    rep.indexed += 1
                if progress is not None and rep.rows % 4096 == 0:
                    progress(rep.rows)
            return rep

        rep = self._write(rebuild, "during replay")
        if self.durability == "sync":
            slot = self._enter()
            try:
                self._env.sync(True)  # metasync is off: make the rebuilt index's meta page durable
            finally:
                slot.active = False
        return rep

    @classmethod
    def from_ledger(
        cls,
        path: str | os.PathLike,
        ledger_file: str | os.PathLike | None = None,
        *,
        progress: Callable[[int], None] | None = None,
        **kwargs: Any,
    ) -> "Cassette":
        """Recover a cassette by replay.

        Without ``ledger_file``: rebuild the index of the cassette at ``path``
        from its own ledger.  With it: seed the cassette at ``path`` (new or
        existing) from an exported ledger file, verifying every record.  The
        replay report is at ``cassette.last_replay``.
        """
        cas = cls(path, **kwargs)
        try:
            if ledger_file is not None and cas.stats()["ledger_rows"] == 0:
                # into an empty cassette, appends in file order build exactly the index
                # a replay would (first verifying row per key); every row was verified
                n = cas.import_(ledger_file, progress=progress)
                cas.last_replay = ReplayReport(rows=n, indexed=cas.stats()["records"])
                return cas
            if ledger_file is not None:
                cas.import_(ledger_file, progress=progress)
            cas.last_replay = cas.rebuild_index(progress=progress)
        except BaseException:
            cas.close()
            raise
        return cas

    def export(self, path: str | os.PathLike, *, progress: Callable[[int], None] | None = None) -> int:
        """Write every verified record and blob to a portable ledger file; returns records written."""
        from cassette.ledgerfile import write_ledger_file

        self._check_open()
        return write_ledger_file(self, path, progress=progress)

    def import_(self, path: str | os.PathLike, *, progress: Callable[[int], None] | None = None) -> int:
        """Append the records and blobs of a ledger file (validated whole first); returns records appended."""
        from cassette.ledgerfile import read_ledger_file

        self._check_open()
        return read_ledger_file(self, path, progress=progress)

    def _iter_blobs(self) -> Iterator[tuple[bytes, bytes]]:
        """``(key, bytes)`` of every blob entry in key order, read in short transactions.
        Each transaction starts past the highest key read so far, so a scan ends even over a
        damaged (out of order) B-tree page."""
        after = b""
        while True:
            batch: list[tuple[bytes, bytes]] = []
            nbytes = 0
            with self._reading() as txn:
                cur = txn.cursor(db=self._blobs)
                floor = after
                found = cur.set_range(floor) if floor else cur.first()
                while found:
                    k = bytes(cur.key())
                    if k > floor or not floor:
                        batch.append((k, bytes(cur.value())))
                        after = max(after, k)
                        nbytes += len(batch[-1][1])
                        if len(batch) >= 64 or nbytes >= SCAN_BATCH_BYTES:
                            break
                    found = cur.next()
            if not batch:
                return
            yield from batch

    # ------------------------------------------------------------------ closing
    def close(self) -> None:
        """Finish queued writes, stop the writer and close LMDB.  Idempotent.

        Reads running on other threads finish first, and so does a
        :meth:`rebuild_index` under way; afterwards every public method (reads,
        writes, scrub, export, import, iteration, rebuild) raises
        ``FabricError(FAILED_PRECONDITION, "cassette ... is closed")``.
        """
        with self._writer_lock:  # (a rebuild under way has stopped the writer and will start another)
            with self._open_lock:  # every job queued before the stop marker, none after it
                if self._closed:
                    return
                self._closed = True
                self._queue.put(None)
            self._writer.join()  # returns once every write is committed and acknowledged
        own = getattr(self._local, "slot", None)
        if own is not None and own.active:  # closed from inside a read (an on_corrupt callback)
            self._env.close()
            return
        with self._readers_held():  # no txn of another thread is cut off mid-read
            self._env.close()

    def __enter__(self) -> "Cassette":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Cassette {self.path} node={self.node_id} durability={self.durability}>"


def _blob_job(items: list[tuple[ContentKey, bytes]], waited: bool = False, verified: bool = False) -> _Job:
    """A write job for pre-keyed blobs; any blob that does not match its key is DATA_LOSS
    (not hashed again when the caller has ``verified`` them)."""
    for k, d in items:
        if k[0] != 2 or (not verified and derive("blob", d) != k[1:]):
            raise FabricError(StatusCode.DATA_LOSS, "blob bytes do not match their key", key=k)
    return _Job("blobs", (items,), sum(len(d) for _, d in items), waited)


def _counter(text: bytes | memoryview | None) -> int | None:
    """A decimal meta counter: 0 when absent, ``None`` when not a decimal number."""
    if text is None:
        return 0
    text = bytes(text)
    return int(text) if text.isdigit() else None


def _existing_digest(value: bytes | memoryview) -> bytes:
    rec = unpack_record(value)
    return rec.digest
