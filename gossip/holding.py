"""HoldingIndex: the grow-only set of "node N holds key K with reply digest D" facts.

Normative text: ``specs/gossip.md`` ("Holding facts", "Anti-entropy", "Merge rules").

Contract
--------
* A fact is :class:`HeldContent` ``(node_id, key, digest, seq)``.  ``node_id`` is the
  fact's *origin*: the only node that ever authors facts in its name.  The origin
  numbers its facts ``1, 2, 3, ...`` in its ledger order, so ``(node_id, seq)``
  names one ledger entry forever.  A node id names one ledger; a node whose ledger
  is wiped must take a new id.
* The index is a G-Set of facts: :meth:`HoldingIndex.merge` is a set union, so it
  is idempotent, commutative and associative for *any* facts, and nothing is ever
  removed.  Merging returns exactly the facts that were new.
* Per origin the index keeps the contiguous prefix ``1..hw`` (the *high-water*
  seq) in one packed ``bytearray`` of 65-byte records (33-byte key, 32-byte
  digest), facts above a gap in a small dict until the gap fills, and facts that
  reuse an occupied ``(origin, seq)`` with other content (*equivocations*, an
  origin bug) in a side table, surfaced by :meth:`HoldingIndex.equivocations`.
* :meth:`summary` is ``{origin: hw}``: its size depends on the number of origins,
  never on the number of keys.  :meth:`missing_runs` answers a peer's summary
  with the facts above the peer's high-water marks, slicing the packed log, so
  its cost is O(origins + d) for d missing facts.  :meth:`summary_digest` is a
  16-byte digest of the whole fact set (per origin: hw, fact count and an XOR of
  64-bit fact fingerprints), maintained incrementally, so two replicas in sync
  find out with one 16-byte comparison.
* Two different digests claimed for one key is a *determinism violation*: both
  facts are kept, :meth:`conflicts` reports them, :meth:`digest_conflicts` lists
  the keys and :meth:`preferred_digest` chooses the digest to serve (majority of
  holders; ties go to the home's digest, then to the smallest digest).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, NamedTuple

from cassette.errors import FabricError, StatusCode
from cassette.keys import ContentKey

__all__ = [
    "HeldContent",
    "HoldingIndex",
    "FactRun",
    "RECORD_SIZE",
    "KEY_SIZE",
    "DIGEST_SIZE",
    "MAX_SEQ",
    "MAX_NODE_ID_BYTES",
    "facts_to_runs",
    "runs_to_facts",
    "fact_fingerprint",
]

#: Bytes of a binary ContentKey (kind byte + 32-byte digest).
KEY_SIZE = 33
#: Bytes of a reply digest (BLAKE3-256 of the payload).
DIGEST_SIZE = 32
#: Bytes of one packed fact record: key then digest.
RECORD_SIZE = KEY_SIZE + DIGEST_SIZE
#: Largest sequence number a fact may carry (2**40 - 1: a trillion ledger entries).
MAX_SEQ = (1 << 40) - 1
#: Longest node id, in UTF-8 bytes.
MAX_NODE_ID_BYTES = 255

_SEQ_BITS = 40
_SEQ_MASK = MAX_SEQ
_VALID_KIND = frozenset((1, 2, 3))
_new_key = bytes.__new__
_blake2b = hashlib.blake2b


def _bad(message: str) -> FabricError:
    return FabricError(StatusCode.INVALID_ARGUMENT, message)


def check_node_id(node_id: object, where: str = "node_id") -> str:
    """Return ``node_id`` if it is a non-empty str of at most 255 UTF-8 bytes, else INVALID_ARGUMENT."""
    if type(node_id) is not str or not node_id:
        raise _bad(f"{where}: expected a non-empty str, got {type(node_id).__name__} {node_id!r:.60}")
    try:
        n = len(node_id.encode("utf-8"))
    except UnicodeEncodeError:
        raise _bad(f"{where}: not valid Unicode text") from None
    if n > MAX_NODE_ID_BYTES:
        raise _bad(f"{where}: {n} UTF-8 bytes, at most {MAX_NODE_ID_BYTES} allowed")
    return node_id


@dataclass(frozen=True, slots=True)
class HeldContent:
    """One holder fact: ``node_id`` holds ``key`` whose reply digest is ``digest``.

    ``seq`` (1..MAX_SEQ) is the fact's position in ``node_id``'s ledger; a fact
    made without one (``HeldContent(node_id, key, digest)``) gets the next seq of
    ``node_id`` when an index merges it, unless that index already has ``node_id``
    holding ``key`` with ``digest`` (then it is not new).  Wire forms
    (:func:`facts_to_runs`) need a seq.  Fields are validated on construction: a
    bad one raises ``FabricError(INVALID_ARGUMENT)`` naming it.  Facts compare and
    hash by all four fields.
    """

    node_id: str
    key: ContentKey
    digest: bytes
    seq: int | None = None

    def __post_init__(self) -> None:
        check_node_id(self.node_id)
        key = self.key
        if type(key) is not ContentKey:
            if isinstance(key, (bytes, bytearray)) and len(key) == KEY_SIZE and key[0] in _VALID_KIND:
                object.__setattr__(self, "key", ContentKey.from_bytes(bytes(key)))
            else:
                raise _bad(f"key: expected a ContentKey, got {type(key).__name__}")
        d = self.digest
        if type(d) is not bytes:
            if isinstance(d, (bytearray, memoryview)):
                object.__setattr__(self, "digest", bytes(d))
                d = self.digest
            else:
                raise _bad(f"digest: expected {DIGEST_SIZE} bytes, got {type(d).__name__}")
        if len(d) != DIGEST_SIZE:
            raise _bad(f"digest: expected {DIGEST_SIZE} bytes, got {len(d)}")
        s = self.seq
        if s is not None and (type(s) is not int or not 1 <= s <= MAX_SEQ):
            raise _bad(f"seq: expected int in 1..{MAX_SEQ}, got {s!r:.40}")

    @property
    def record(self) -> bytes:
        """The packed 65-byte record: ``bytes(key) + digest``."""
        return bytes(self.key) + self.digest


def _fact(origin: str, seq: int, rec: bytes) -> HeldContent:
    """Build a fact from trusted parts (already validated) without re-validating."""
    f = object.__new__(HeldContent)
    object.__setattr__(f, "node_id", origin)
    object.__setattr__(f, "key", _new_key(ContentKey, rec[:KEY_SIZE]))
    object.__setattr__(f, "digest", bytes(rec[KEY_SIZE:]))
    object.__setattr__(f, "seq", seq)
    return f


class FactRun(NamedTuple):
    """Facts ``start, start+1, ...`` of one origin, packed as consecutive 65-byte records.

    This is the wire and bulk form of facts (see ``specs/gossip.md``): a run of
    ``len(records) // 65`` facts costs 65 bytes each plus a small constant.
    """

    origin: str
    start: int
    records: bytes

    @property
    def count(self) -> int:
        """Number of facts in the run."""
        return len(self.records) // RECORD_SIZE


def _key_bytes(key: Any) -> bytes:
    """A key as the index stores it: a ContentKey's bytes; text (``kind:hex``) is parsed
    (INVALID_ARGUMENT if it is not a key)."""
    return bytes(ContentKey.parse(key)) if isinstance(key, str) else bytes(key)


def facts_to_runs(facts: Iterable[HeldContent]) -> list[FactRun]:
    """Pack facts into runs (grouped by origin, then maximal consecutive-seq runs).

    Output is deterministic: origins sorted by UTF-8 bytes, seqs ascending;
    duplicate facts are dropped, two facts at one ``(origin, seq)`` (an
    equivocation) become separate runs.
    """
    by_origin: dict[str, dict[tuple[int, bytes], None]] = {}
    for f in facts:
        if f.seq is None:
            raise _bad(f"facts_to_runs: a fact of {f.node_id!r} has no seq (merge it into an index first)")
        by_origin.setdefault(f.node_id, {})[(f.seq, bytes(f.key) + f.digest)] = None
    runs: list[FactRun] = []
    for origin in sorted(by_origin, key=lambda o: o.encode("utf-8")):
        items = sorted(by_origin[origin])
        start, prev, buf = None, None, []
        for seq, rec in items:
            if start is not None and seq == prev + 1:
                buf.append(rec)
            else:
                if start is not None:
                    runs.append(FactRun(origin, start, b"".join(buf)))
                start, buf = seq, [rec]
            prev = seq
        if start is not None:
            runs.append(FactRun(origin, start, b"".join(buf)))
    return runs


def runs_to_facts(runs: Iterable[FactRun]) -> list[HeldContent]:
    """Unpack runs into validated facts (inverse of :func:`facts_to_runs`)."""
    out: list[HeldContent] = []
    for origin, start, records in runs:
        for i in range(0, len(records), RECORD_SIZE):
            rec = records[i : i + RECORD_SIZE]
            out.append(HeldContent(origin, ContentKey.from_bytes(rec[:KEY_SIZE]), rec[KEY_SIZE:], start + i // RECORD_SIZE))
    return out


def fact_fingerprint(origin: str, seq: int, record: bytes) -> int:
    """64-bit fingerprint of one fact, as folded (XOR) into the summary digest.

    ``blake2b(u16be(len(origin_utf8)) || origin_utf8 || u64be(seq) || record,
    digest_size=8, person=b"ef-gossip-fact")`` read as a big-endian integer.
    """
    ob = origin.encode("utf-8")
    return _fingerprint(len(ob).to_bytes(2, "big") + ob, seq, record)


def _fingerprint(prefix: bytes, seq: int, record: bytes) -> int:
    return int.from_bytes(
        _blake2b(prefix + seq.to_bytes(8, "big") + record, digest_size=8, person=b"ef-gossip-fact").digest(), "big"
    )


class _Origin:
    """Per-origin state: packed prefix log, out-of-order extras, set fingerprint."""

    __slots__ = ("name", "idx", "prefix", "log", "hw", "extras", "fp", "count")

    def __init__(self, name: str, idx: int) -> None:
        ob = name.encode("utf-8")
        self.name = name
        self.idx = idx
        self.prefix = len(ob).to_bytes(2, "big") + ob  # fingerprint prefix
        self.log = bytearray()  # records 1..hw, 65 bytes each
        self.hw = 0
        self.extras: dict[int, bytes] = {}  # seq > hw + 1 -> record
        self.fp = 0  # XOR of fingerprints of every fact of this origin
        self.count = 0  # facts of this origin, equivocations included

    def record_at(self, seq: int) -> bytes | None:
        """The primary record at ``seq``, or None."""
        if seq <= self.hw:
            off = (seq - 1) * RECORD_SIZE
            return bytes(self.log[off : off + RECORD_SIZE])
        return self.extras.get(seq)


class HoldingIndex:
    """The grow-only set of holder facts, with compact per-origin storage.

    ``HoldingIndex(node_id=None)``: ``node_id`` is the owning node, needed only
    for :meth:`add_local`.  Not thread-safe (one owner, like every sans-I/O
    machine here).
    """

    __slots__ = (
        "node_id",
        "_origins",
        "_by_idx",
        "_by_key",
        "_alts",
        "_alt_store",
        "_conflicts",
        "_new_conflicts",
        "_count",
        "_digest",
    )

    def __init__(self, node_id: str | None = None) -> None:
        if node_id is not None:
            check_node_id(node_id)
        self.node_id = node_id
        self._origins: dict[str, _Origin] = {}
        self._by_idx: list[_Origin] = []
        # key bytes -> ref or list of refs; ref >= 0: (origin idx << 40) | seq of a
        # primary record; ref < 0: -(i + 1) into _alt_store
        self._by_key: dict[bytes, int | list[int]] = {}
        self._alts: dict[tuple[int, int], list[bytes]] = {}
        self._alt_store: list[tuple[int, int, bytes]] = []
        self._conflicts: dict[bytes, None] = {}
        self._new_conflicts: list[ContentKey] = []
        self._count = 0
        self._digest: bytes | None = None

    # -- size and iteration ------------------------------------------------------
    def __len__(self) -> int:
        """Number of distinct facts held."""
        return self._count

    def __contains__(self, fact: object) -> bool:
        """Whether exactly this fact (all four fields; for a fact without a seq, its
        node holding its key with its digest at any seq) is in the index."""
        if not isinstance(fact, HeldContent):
            return False
        o = self._origins.get(fact.node_id)
        if o is None:
            return False
        rec = bytes(fact.key) + fact.digest
        if fact.seq is None:
            return self._held_seq(o, rec) is not None
        if o.record_at(fact.seq) == rec:
            return True
        return rec in self._alts.get((o.idx, fact.seq), ())

    def facts(self) -> Iterator[HeldContent]:
        """Every fact: per origin (in first-seen order) prefix, extras, then equivocations."""
        for o in self._by_idx:
            log = o.log
            for i in range(o.hw):
                yield _fact(o.name, i + 1, bytes(log[i * RECORD_SIZE : (i + 1) * RECORD_SIZE]))
            for seq in sorted(o.extras):
                yield _fact(o.name, seq, o.extras[seq])
        for oidx, seq, rec in self._alt_store:
            yield _fact(self._by_idx[oidx].name, seq, rec)

    def keys(self) -> Iterator[ContentKey]:
        """Every key with at least one holder fact."""
        for k in self._by_key:
            yield _new_key(ContentKey, k)

    def knows(self, key: bytes) -> bool:
        """Whether at least one holder fact about ``key`` is known."""
        return _key_bytes(key) in self._by_key

    def origins(self) -> list[str]:
        """Origins with at least one fact, in first-seen order."""
        return [o.name for o in self._by_idx if o.count]

    def high_water(self, origin: str) -> int:
        """Contiguous high-water seq of ``origin`` (0 when none)."""
        o = self._origins.get(origin)
        return 0 if o is None else o.hw

    # -- local facts -------------------------------------------------------------
    def add_local(self, key: ContentKey, digest: bytes, seq: int | None = None) -> HeldContent:
        """Record that this node holds ``key`` with ``digest``; return the fact.

        ``seq`` defaults to the next seq after this node's high-water mark; pass
        the ledger seq explicitly when replaying a ledger.  Re-adding a key this
        node already holds with the same digest returns the existing fact (as
        re-recording a key in the cassette is a no-op).  A different digest for a
        key this node already holds, or a ``seq`` already naming other content,
        is ``FAILED_PRECONDITION``.  Needs ``node_id``.
        """
        if self.node_id is None:
            raise FabricError(StatusCode.FAILED_PRECONDITION, "holding: add_local needs an index with a node_id")
        origin = self.node_id
        checked = HeldContent(origin, key, digest, 1 if seq is None else seq)  # validates the fields
        key, digest = checked.key, checked.digest
        o = self._origins.get(origin)
        kb = bytes(key)
        refs = self._by_key.get(kb)
        if refs is not None and o is not None:
            for ref in refs if type(refs) is list else (refs,):
                oidx, rseq, rec = self._resolve(ref)
                if oidx == o.idx:
                    if rec[KEY_SIZE:] == digest and (seq is None or seq == rseq):
                        return _fact(origin, rseq, rec)
                    raise FabricError(
                        StatusCode.FAILED_PRECONDITION,
                        f"holding: {_key_text(kb)} already held by this node at seq {rseq} "
                        f"with digest {rec[KEY_SIZE:].hex()[:16]}",
                    )
        if seq is None:
            seq = (o.hw if o is not None else 0) + 1
        fact = HeldContent(origin, key, digest, seq)
        if o is not None:
            existing = o.record_at(seq)
            if existing is not None and existing != fact.record:
                raise FabricError(
                    StatusCode.FAILED_PRECONDITION,
                    f"holding: seq {seq} of {origin!r} already names {_key_text(existing[:KEY_SIZE])}; "
                    "a node id names one ledger (was this node's ledger wiped? take a new node id)",
                )
        self._insert(self._origin(origin), seq, fact.record)
        return fact

    # -- merging -----------------------------------------------------------------
    def merge(self, facts: Iterable[HeldContent]) -> list[HeldContent]:
        """Union ``facts`` into the index; return those that were new, in input order.

        Idempotent, commutative and associative (a set union).  Anything that is
        not a :class:`HeldContent` is INVALID_ARGUMENT.
        """
        new: list[HeldContent] = []
        for f in facts:
            if not isinstance(f, HeldContent):
                raise _bad(f"holding.merge: expected HeldContent, got {type(f).__name__}")
            if f.seq is None:  # sequence it as the next fact of its origin, unless already held
                o = self._origins.get(f.node_id)
                rec = bytes(f.key) + f.digest
                if o is not None and self._held_seq(o, rec) is not None:
                    continue
                last = 0 if o is None else max(o.hw, max(o.extras, default=0))
                f = _fact(f.node_id, last + 1, rec)
            if self._insert(self._origin(f.node_id), f.seq, bytes(f.key) + f.digest):
                new.append(f)
        return new

    def _held_seq(self, o: "_Origin", rec: bytes) -> int | None:
        """The seq at which origin ``o`` holds ``rec`` (key + digest), or None."""
        refs = self._by_key.get(rec[:KEY_SIZE])
        if refs is None:
            return None
        for ref in refs if type(refs) is list else (refs,):
            oidx, rseq, r = self._resolve(ref)
            if oidx == o.idx and r == rec:
                return rseq
        return None

    def merge_runs(self, runs: Iterable[FactRun]) -> list[HeldContent]:
        """Union packed runs (wire form) into the index; return the new facts.

        Runs are validated (origin id, seq range, record size and key kind byte);
        a bad one is INVALID_ARGUMENT naming it, and facts of earlier runs stay
        merged (merging is monotone, so a partial merge is still a valid state).
        """
        out: list[HeldContent] = []
        self._merge_runs(runs, out)
        return out

    def absorb_runs(self, runs: Iterable[FactRun]) -> int:
        """Like :meth:`merge_runs` but return only how many facts were new (no fact objects)."""
        return self._merge_runs(runs, None)

    def _merge_runs(self, runs: Iterable[FactRun], out: list | None) -> int:
        new = 0
        person = b"ef-gossip-fact"
        for i, run in enumerate(runs):
            origin, start, records = run
            _check_run(origin, start, records, f"runs[{i}]")
            records = bytes(records)
            o = self._origin(origin)
            by_key = self._by_key
            prefix = o.prefix
            oref = o.idx << _SEQ_BITS
            for j in range(0, len(records), RECORD_SIZE):
                rec = records[j : j + RECORD_SIZE]
                seq = start + j // RECORD_SIZE
                if seq == o.hw + 1 and not o.extras:
                    # fast path: the record extends the contiguous prefix
                    kb = rec[:KEY_SIZE]
                    if kb in by_key:
                        added = self._insert(o, seq, rec)
                    else:
                        o.log += rec
                        o.hw = seq
                        by_key[kb] = oref | seq
                        o.fp ^= int.from_bytes(
                            _blake2b(prefix + seq.to_bytes(8, "big") + rec, digest_size=8, person=person).digest(), "big"
                        )
                        o.count += 1
                        self._count += 1
                        self._digest = None
                        added = True
                else:
                    added = self._insert(o, seq, rec)
                if added:
                    new += 1
                    if out is not None:
                        out.append(_fact(origin, seq, rec))
        return new

    # -- queries -----------------------------------------------------------------
    def holders(self, key: bytes) -> list[tuple[str, bytes]]:
        """Distinct ``(node_id, digest)`` pairs claimed for ``key`` (a ContentKey, its
        33 bytes or its text form), sorted; [] if none."""
        refs = self._by_key.get(_key_bytes(key))
        if refs is None:
            return []
        if type(refs) is not list:
            oidx, _, rec = self._resolve(refs)
            return [(self._by_idx[oidx].name, rec[KEY_SIZE:])]
        pairs = set()
        for ref in refs:
            oidx, _, rec = self._resolve(ref)
            pairs.add((self._by_idx[oidx].name, rec[KEY_SIZE:]))
        return sorted(pairs)

    def facts_of(self, key: bytes) -> list[HeldContent]:
        """Every fact about ``key``, sorted by (node_id, seq, digest)."""
        refs = self._by_key.get(_key_bytes(key))
        if refs is None:
            return []
        out = []
        for ref in refs if type(refs) is list else (refs,):
            oidx, seq, rec = self._resolve(ref)
            out.append(_fact(self._by_idx[oidx].name, seq, rec))
        out.sort(key=lambda f: (f.node_id, f.seq, f.digest))
        return out

    def digest_conflicts(self) -> list[ContentKey]:
        """Keys for which holders claim two or more different digests (first-seen order)."""
        return [_new_key(ContentKey, k) for k in self._conflicts]

    def conflicts(self, key: bytes) -> list[HeldContent]:
        """All facts about ``key`` if they disagree on the digest, else []."""
        if _key_bytes(key) not in self._conflicts:
            return []
        return self.facts_of(key)

    def take_new_conflicts(self) -> list[ContentKey]:
        """Keys that became conflicted since the last call (for logs and metrics)."""
        out, self._new_conflicts = self._new_conflicts, []
        return out

    def preferred_digest(self, key: bytes, home: str | None = None) -> bytes | None:
        """The digest to serve for ``key``: the one claimed by most distinct holders.

        A tie goes to ``home``'s digest when ``home`` holds one of the tied
        digests, otherwise to the smallest tied digest.  None if nobody holds
        ``key``.
        """
        votes: dict[bytes, set[str]] = {}
        for node, digest in self.holders(key):
            votes.setdefault(digest, set()).add(node)
        if not votes:
            return None
        best = max(len(v) for v in votes.values())
        tied = sorted(d for d, v in votes.items() if len(v) == best)
        if len(tied) > 1 and home is not None:
            for d in tied:
                if home in votes[d]:
                    return d
        return tied[0]

    def equivocations(self) -> list[HeldContent]:
        """Facts that reuse an occupied ``(origin, seq)`` with other content (origin bugs)."""
        return [_fact(self._by_idx[oidx].name, seq, rec) for oidx, seq, rec in self._alt_store]

    # -- anti-entropy ------------------------------------------------------------
    def summary(self) -> dict[str, int]:
        """``{origin: contiguous high-water seq}`` for origins with hw >= 1.

        Cost and size: O(number of origins), independent of the number of keys.
        """
        return {o.name: o.hw for o in self._by_idx if o.hw}

    def summary_digest(self) -> bytes:
        """16-byte digest of the whole fact set (cached; see ``specs/gossip.md``).

        ``blake2b(digest_size=16, person=b"ef-gossip-sum")`` over, for every
        origin with a fact, sorted by UTF-8 bytes: ``u16be(len) || origin ||
        u64be(hw) || u64be(count) || u64be(xor of fact fingerprints)``.  Equal
        fact sets give equal digests on every node.
        """
        d = self._digest
        if d is None:
            h = _blake2b(digest_size=16, person=b"ef-gossip-sum")
            for o in sorted((o for o in self._by_idx if o.count), key=lambda o: o.prefix[2:]):
                h.update(o.prefix + o.hw.to_bytes(8, "big") + o.count.to_bytes(8, "big") + o.fp.to_bytes(8, "big"))
            d = self._digest = h.digest()
        return d

    def missing_runs(self, summary: Mapping[str, int], limit: int | None = None) -> list[FactRun]:
        """Facts the side that sent ``summary`` lacks, as packed runs.

        Per origin (sorted by UTF-8 bytes): the prefix above the peer's
        high-water mark (a slice of the packed log), then extras and
        equivocations above it.  At most ``limit`` facts (None: all).  Cost
        O(origins + d) for d facts returned.
        """
        remaining = MAX_SEQ if limit is None else int(limit)
        runs: list[FactRun] = []
        if remaining <= 0:
            return runs
        for o in sorted(self._by_idx, key=lambda o: o.prefix[2:]):
            if not o.count:
                continue
            theirs = summary.get(o.name, 0)
            if o.hw > theirs:
                take = min(o.hw - theirs, remaining)
                runs.append(FactRun(o.name, theirs + 1, bytes(o.log[theirs * RECORD_SIZE : (theirs + take) * RECORD_SIZE])))
                remaining -= take
                if not remaining:
                    return runs
            if o.extras:
                for seq in sorted(o.extras):
                    if seq > theirs:
                        runs.append(FactRun(o.name, seq, o.extras[seq]))
                        remaining -= 1
                        if not remaining:
                            return _coalesce(runs)
        for oidx, seq, rec in self._alt_store:
            name = self._by_idx[oidx].name
            if seq > summary.get(name, 0):
                runs.append(FactRun(name, seq, rec))
                remaining -= 1
                if not remaining:
                    break
        return _coalesce(runs)

    def missing_for(self, summary: Mapping[str, int], limit: int | None = None) -> list[HeldContent]:
        """Facts the side that sent ``summary`` lacks (see :meth:`missing_runs`), unpacked."""
        out: list[HeldContent] = []
        for origin, start, records in self.missing_runs(summary, limit):
            for j in range(0, len(records), RECORD_SIZE):
                out.append(_fact(origin, start + j // RECORD_SIZE, records[j : j + RECORD_SIZE]))
        return out

    def copy(self) -> "HoldingIndex":
        """An independent copy (cheap: packed logs and dicts are copied, records shared)."""
        c = HoldingIndex.__new__(HoldingIndex)
        c.node_id = self.node_id
        c._by_idx = []
        c._origins = {}
        for o in self._by_idx:
            n = _Origin.__new__(_Origin)
            n.name, n.idx, n.prefix, n.hw, n.fp, n.count = o.name, o.idx, o.prefix, o.hw, o.fp, o.count
            n.log = bytearray(o.log)
            n.extras = dict(o.extras)
            c._by_idx.append(n)
            c._origins[n.name] = n
        c._by_key = {k: (list(v) if type(v) is list else v) for k, v in self._by_key.items()}
        c._alts = {k: list(v) for k, v in self._alts.items()}
        c._alt_store = list(self._alt_store)
        c._conflicts = dict(self._conflicts)
        c._new_conflicts = list(self._new_conflicts)
        c._count = self._count
        c._digest = self._digest
        return c

    # -- internals ---------------------------------------------------------------
    def _origin(self, name: str) -> _Origin:
        o = self._origins.get(name)
        if o is None:
            check_node_id(name, "node_id")
            o = _Origin(name, len(self._by_idx))
            self._origins[name] = o
            self._by_idx.append(o)
        return o

    def _resolve(self, ref: int) -> tuple[int, int, bytes]:
        """(origin idx, seq, record) of a key-index reference."""
        if ref < 0:
            return self._alt_store[-ref - 1]
        oidx, seq = ref >> _SEQ_BITS, ref & _SEQ_MASK
        rec = self._by_idx[oidx].record_at(seq)
        assert rec is not None
        return oidx, seq, rec

    def _insert(self, o: _Origin, seq: int, rec: bytes) -> bool:
        """Add one fact; True when it was new.  ``rec`` is a 65-byte bytes record."""
        if seq <= o.hw:
            off = (seq - 1) * RECORD_SIZE
            if o.log[off : off + RECORD_SIZE] == rec:
                return False
            return self._insert_alt(o, seq, rec)
        extras = o.extras
        if seq in extras:
            if extras[seq] == rec:
                return False
            return self._insert_alt(o, seq, rec)
        if seq == o.hw + 1:
            o.log += rec
            o.hw = seq
            while extras:
                nxt = extras.pop(o.hw + 1, None)
                if nxt is None:
                    break
                o.log += nxt
                o.hw += 1
        else:
            extras[seq] = rec
        self._index_key(rec, (o.idx << _SEQ_BITS) | seq)
        self._account(o, seq, rec)
        return True

    def _insert_alt(self, o: _Origin, seq: int, rec: bytes) -> bool:
        slot = self._alts.setdefault((o.idx, seq), [])
        if rec in slot:
            return False
        slot.append(rec)
        self._alt_store.append((o.idx, seq, rec))
        self._index_key(rec, -len(self._alt_store))
        self._account(o, seq, rec)
        return True

    def _account(self, o: _Origin, seq: int, rec: bytes) -> None:
        o.fp ^= _fingerprint(o.prefix, seq, rec)
        o.count += 1
        self._count += 1
        self._digest = None

    def _index_key(self, rec: bytes, ref: int) -> None:
        kb = rec[:KEY_SIZE]
        by_key = self._by_key
        refs = by_key.get(kb)
        if refs is None:
            by_key[kb] = ref
            return
        if type(refs) is list:
            first = refs[0]
            refs.append(ref)
        else:
            first = refs
            by_key[kb] = [refs, ref]
        if kb not in self._conflicts and self._resolve(first)[2][KEY_SIZE:] != rec[KEY_SIZE:]:
            self._conflicts[kb] = None
            self._new_conflicts.append(_new_key(ContentKey, kb))


def _coalesce(runs: list[FactRun]) -> list[FactRun]:
    """Join adjacent runs of one origin whose seqs continue each other."""
    out: list[FactRun] = []
    for r in runs:
        if out:
            p = out[-1]
            if p.origin == r.origin and p.start + len(p.records) // RECORD_SIZE == r.start:
                out[-1] = FactRun(p.origin, p.start, p.records + r.records)
                continue
        out.append(r)
    return out


def _check_run(origin: object, start: object, records: object, where: str) -> None:
    """Validate one run's fields; INVALID_ARGUMENT naming ``where`` otherwise."""
    check_node_id(origin, f"{where}.origin")
    if type(start) is not int or not 1 <= start <= MAX_SEQ:
        raise _bad(f"{where}.start: expected int in 1..{MAX_SEQ}, got {start!r:.40}")
    if type(records) not in (bytes, bytearray, memoryview):
        raise _bad(f"{where}.records: expected bytes, got {type(records).__name__}")
    n = len(records)
    if n == 0 or n % RECORD_SIZE:
        raise _bad(f"{where}.records: length {n} is not a positive multiple of {RECORD_SIZE}")
    if start + n // RECORD_SIZE - 1 > MAX_SEQ:
        raise _bad(f"{where}.start: run of {n // RECORD_SIZE} facts from {start} passes seq {MAX_SEQ}")
    mv = memoryview(records)
    for j in range(0, n, RECORD_SIZE):
        if mv[j] not in _VALID_KIND:
            raise _bad(f"{where}.records[{j // RECORD_SIZE}]: key kind byte {mv[j]} is not 1..3")


def _key_text(kb: bytes) -> str:
    try:
        return ContentKey.from_bytes(bytes(kb)).short()
    except FabricError:
        return bytes(kb[:8]).hex()
