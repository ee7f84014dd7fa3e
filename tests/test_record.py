"""The ledger record's meta map is packed directly on the write path: it must equal the codec's bytes."""

from __future__ import annotations

from hypothesis import given, strategies as st

from cassette import codec
from cassette.keys import ContentKey
from cassette.record import _pack_meta, pack_record, unpack_record

texts = st.text(max_size=40)
floats = st.floats(allow_nan=True, allow_infinity=True)


@given(st.binary(min_size=1, max_size=40), st.binary(min_size=32, max_size=32), texts, texts, floats, floats, texts, st.integers(0, 2**40))
def test_direct_meta_pack_is_the_canonical_encoding(material, digest, evaluator, version, created, compute_s, node, size):
    key = ContentKey.of("request", material)
    expect = codec.encode({"key": key, "digest": digest, "evaluator": evaluator, "version": version,
                           "created": float(created), "compute_s": float(compute_s), "node": node, "size": size})
    assert _pack_meta(key, digest, evaluator, version, created, compute_s, node, size) == expect


@given(st.binary(max_size=300), texts, texts, texts)
def test_pack_unpack_round_trip(payload, evaluator, version, node):
    key = ContentKey.of("request", payload + b"k")
    rec = unpack_record(pack_record(key, payload, evaluator=evaluator, version=version, created=1.0, compute_s=2.0, node=node))
    assert (rec.key, rec.payload, rec.evaluator, rec.version, rec.node) == (key, payload, evaluator, version, node)
