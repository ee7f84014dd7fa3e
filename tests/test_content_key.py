"""ContentKey against its spec.

The request/blob/artifact vectors are read from ``specs/content-key.md`` itself
(its ``evalfabric/content-key/v1`` JSON block), so the published text and the
code cannot drift apart.  Our BLAKE3 binding is checked against the official
BLAKE3 ``derive_key`` test vectors (``tests/vectors/blake3_derive_key.json``).
"""

from __future__ import annotations

import copy
import itertools
import json
import pickle
import re
from pathlib import Path

import blake3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cassette import codec
from cassette.errors import FabricError, StatusCode
from cassette.keys import CONTEXTS, KINDS, ContentKey, request_material
from _vectors import build, spec_vectors

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "specs" / "content-key.md"
BLAKE3_VECTORS = Path(__file__).resolve().parent / "vectors" / "blake3_derive_key.json"



V = spec_vectors(SPEC, "evalfabric/content-key/v1")
REQUEST = V["request"]
CONTENT = V["content"]
BY_NAME = {v["name"]: v for v in REQUEST}


def _invalid(excinfo) -> None:
    assert excinfo.value.status_code is StatusCode.INVALID_ARGUMENT


# -- the spec itself -----------------------------------------------------------------


def test_spec_publishes_the_context_strings_verbatim():
    assert V["contexts"] == CONTEXTS
    assert tuple(CONTEXTS) == KINDS == ("request", "blob", "artifact")
    text = SPEC.read_text(encoding="utf-8")
    for kind, ctx in CONTEXTS.items():
        assert f"| `{kind}`" in text and f"`{ctx}`" in text, ctx
    assert len(set(CONTEXTS.values())) == 3


def test_spec_vectors_are_many_and_well_named():
    assert len(REQUEST) >= 12
    names = [v["name"] for v in REQUEST + CONTENT]
    assert len(names) == len(set(names))
    for group in V["equal_keys"]:
        assert all(n in BY_NAME for n in group), group
    assert {v["kind"] for v in CONTENT} == set(KINDS)


# -- request vectors ----------------------------------------------------------------


@pytest.mark.parametrize("vec", REQUEST, ids=[v["name"] for v in REQUEST])
def test_request_vector(vec):
    args = build(vec["args"])
    material = codec.encode_request(vec["evaluator"], vec["version"], args)
    assert material.hex() == vec["material_hex"]
    assert request_material(vec["evaluator"], vec["version"], args) == material
    assert codec.encode([vec["evaluator"], vec["version"], args]) == material

    key = ContentKey.for_request(vec["evaluator"], vec["version"], args)
    assert str(key) == vec["key"]
    assert key.kind == "request"
    assert ContentKey.of("request", material) == key
    assert ContentKey.parse(vec["key"]) == key

    # the material is canonical: strict decode accepts it and re-encodes it byte for byte
    decoded = codec.decode(material, strict=True)
    assert decoded[:2] == [vec["evaluator"], vec["version"]]
    assert codec.encode(decoded) == material
    assert ContentKey.for_request(*decoded) == key


def test_equal_key_groups_and_all_other_keys_distinct():
    group_of = {}
    for i, group in enumerate(V["equal_keys"]):
        for name in group:
            group_of[name] = i
        assert len({BY_NAME[n]["key"] for n in group}) == 1, group
        assert len({BY_NAME[n]["material_hex"] for n in group}) == 1, group
    for a, b in itertools.combinations(REQUEST, 2):
        ga, gb = group_of.get(a["name"], a["name"]), group_of.get(b["name"], b["name"])
        if ga != gb:
            assert a["key"] != b["key"], (a["name"], b["name"])


def test_one_float_true_str_bytes_are_five_keys():
    keys = {ContentKey.for_request("embed", "1", {"x": v}) for v in (1, 1.0, True, "1", b"1")}
    assert len(keys) == 5
    assert {str(k) for k in keys} == {BY_NAME[n]["key"] for n in ("int-1", "float-1", "bool-true", "str-1", "bytes-1")}


def test_request_key_ignores_insertion_order_rebuilt_live():
    a = {"text": "hi", "opts": {"dim": 8, "norm": True}, "tags": ["x", {"b": 2, "a": 1}]}
    b = {"tags": ["x", {"a": 1, "b": 2}], "opts": {"norm": True, "dim": 8}, "text": "hi"}
    assert ContentKey.for_request("embed", "1", a) == ContentKey.for_request("embed", "1", b)
    assert str(ContentKey.for_request("embed", "1", a)) == BY_NAME["nested-maps-order-a"]["key"]


# -- blob / artifact vectors --------------------------------------------------------


@pytest.mark.parametrize("vec", CONTENT, ids=[v["name"] for v in CONTENT])
def test_content_vector(vec):
    material = bytes.fromhex(vec["material_hex"]) * vec.get("repeat", 1)
    key = ContentKey.of(vec["kind"], material)
    assert str(key) == vec["key"]
    assert key.kind == vec["kind"]
    assert key.digest == blake3.blake3(material, derive_key_context=CONTEXTS[vec["kind"]]).digest()


def test_request_key_is_not_the_blob_key_of_its_material():
    v = BY_NAME["empty-map"]
    material = bytes.fromhex(v["material_hex"])
    req = ContentKey.for_request("embed", "1", {})
    blob = ContentKey.of("blob", material)
    art = ContentKey.of("artifact", material)
    assert len({req, blob, art}) == 3
    assert len({req.digest, blob.digest, art.digest}) == 3


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2048))
def test_equal_bytes_never_share_a_key_across_kinds(material):
    keys = [ContentKey.of(kind, material) for kind in KINDS]
    assert [k.kind for k in keys] == list(KINDS)
    # separation comes from the context strings, not only from the kind byte
    assert len({k.digest for k in keys}) == 3
    assert len({str(k) for k in keys}) == 3


# -- binary and text forms ------------------------------------------------------------

SAMPLE = ContentKey.parse(BY_NAME["content-key-ref"]["key"])
DIGEST_HEX = str(SAMPLE).split(":", 1)[1]


@pytest.mark.parametrize("kind,code", [("request", 1), ("blob", 2), ("artifact", 3)])
def test_binary_form_is_kind_byte_then_digest(kind, code):
    digest = bytes(range(32))
    key = ContentKey(kind, digest)
    assert isinstance(key, bytes) and len(key) == 33
    assert bytes(key) == bytes([code]) + digest
    assert key.kind == kind and key.digest == digest
    assert key.hex == digest.hex()  # the digest, not the 33 bytes
    assert str(key) == f"{kind}:{digest.hex()}"
    assert ContentKey.from_bytes(bytes(key)) == key
    assert type(ContentKey.from_bytes(bytes(key))) is ContentKey
    assert ContentKey.parse(str(key)) == key
    assert repr(key) == f"ContentKey('{key}')"
    assert key.short() == f"{kind}:{digest[:6].hex()}"
    assert f"{key:>80}".strip() == str(key)


def test_keys_hash_compare_copy_and_pickle_as_their_bytes():
    a = ContentKey("blob", b"\x00" * 32)
    b = ContentKey("blob", b"\x00" * 31 + b"\x01")
    c = ContentKey("request", b"\xff" * 32)
    assert sorted([b, c, a]) == [c, a, b]  # kind byte first
    assert a == ContentKey.parse(str(a)) and hash(a) == hash(ContentKey.parse(str(a)))
    assert len({a, ContentKey.from_bytes(bytes(a)), b}) == 2
    for clone in (copy.copy(a), copy.deepcopy(a), pickle.loads(pickle.dumps(a))):
        assert clone == a and type(clone) is ContentKey


@given(st.sampled_from(KINDS), st.binary(min_size=32, max_size=32))
def test_text_and_binary_round_trip(kind, digest):
    key = ContentKey(kind, digest)
    text = str(key)
    assert re.fullmatch(r"(request|blob|artifact):[0-9a-f]{64}", text)
    assert ContentKey.parse(text) == key
    assert str(ContentKey.parse(text)) == text
    assert ContentKey.from_bytes(bytes(key)) == key
    assert ContentKey.parse(key) is key


BAD_TEXT = {
    "uppercase hex": "blob:" + DIGEST_HEX.upper(),
    "one uppercase digit": "blob:" + "A" + "0" * 63,
    "63 digits": "blob:" + "0" * 63,
    "65 digits": "blob:" + "0" * 65,
    "empty digest": "blob:",
    "128 digits": "blob:" + "0" * 128,
    "unknown kind": "chunk:" + "0" * 64,
    "capitalised kind": "Blob:" + "0" * 64,
    "empty kind": ":" + "0" * 64,
    "missing colon": "blob" + "0" * 64,
    "bare digest": "0" * 64,
    "empty string": "",
    "other separator": "blob/" + "0" * 64,
    "second colon": "blob::" + "0" * 63,
    "leading space": " blob:" + "0" * 64,
    "trailing newline": "blob:" + "0" * 64 + "\n",
    "space before digest": "blob: " + "0" * 63,
    "0x prefix": "blob:0x" + "0" * 62,
    "non-hex digit": "blob:" + "g" * 64,
    "fullwidth digits": "blob:" + "\uff10" * 64,
    "66 digits": "request:" + "0" * 66,
}


@pytest.mark.parametrize("text", list(BAD_TEXT.values()), ids=list(BAD_TEXT))
def test_parse_rejects_malformed_text(text):
    with pytest.raises(FabricError) as ei:
        ContentKey.parse(text)
    _invalid(ei)
    assert "\n" not in ei.value.message


@pytest.mark.parametrize(
    "value",
    [None, 1, 1.5, b"blob:" + b"0" * 64, bytes(SAMPLE), bytearray(bytes(SAMPLE)), ["blob:" + "0" * 64], object()],
    ids=["None", "int", "float", "text as bytes", "binary form", "bytearray", "list", "object"],
)
def test_parse_rejects_non_str(value):
    with pytest.raises(FabricError) as ei:
        ContentKey.parse(value)
    _invalid(ei)


@pytest.mark.parametrize(
    "data",
    [b"", bytes(32), bytes([1]) + bytes(31), bytes([1]) + bytes(33), bytes([0]) + bytes(32), bytes([4]) + bytes(32)],
    ids=["empty", "32 bytes", "too short", "too long", "kind 0", "kind 4"],
)
def test_from_bytes_rejects_bad_binary(data):
    with pytest.raises(FabricError) as ei:
        ContentKey.from_bytes(data)
    _invalid(ei)


def test_constructor_rejects_unknown_kind_and_bad_digest():
    for kind, digest in [("chunk", bytes(32)), ("Request", bytes(32)), ("blob", bytes(31)), ("blob", bytes(33))]:
        with pytest.raises(FabricError) as ei:
            ContentKey(kind, digest)
        _invalid(ei)


def test_of_rejects_unknown_kind():
    with pytest.raises(FabricError) as ei:
        ContentKey.of("chunk", b"x")
    _invalid(ei)


@pytest.mark.parametrize(
    "evaluator,version",
    [("", "1"), ("embed", ""), (None, "1"), ("embed", 1), (b"embed", "1")],
    ids=["empty evaluator", "empty version", "None evaluator", "int version", "bytes evaluator"],
)
def test_for_request_rejects_bad_evaluator_or_version(evaluator, version):
    with pytest.raises(FabricError) as ei:
        ContentKey.for_request(evaluator, version, {})
    _invalid(ei)


def test_for_request_names_the_bad_argument_path():
    with pytest.raises(FabricError) as ei:
        ContentKey.for_request("embed", "1", {"items": [0, 1, 2, {3}]})
    _invalid(ei)
    assert ei.value.message == "args.items[3]: set is not encodable"


# -- BLAKE3 itself, against the official test vectors ---------------------------------

_B3 = json.loads(BLAKE3_VECTORS.read_text(encoding="utf-8"))
_B3_CASES = _B3["cases"]
_REQUIRED_LENGTHS = {0, 1, 1023, 1024, 1025, 2048, 2049, 3072, 3073, 4096, 4097, 5120, 5121,
                     6144, 6145, 7168, 7169, 8192, 8193, 16384, 31744, 102400}


def _b3_input(n: int) -> bytes:
    return bytes(i % 251 for i in range(n))


def test_blake3_vector_file_is_the_official_one():
    assert "BLAKE3-team/BLAKE3" in _B3["_origin"]
    assert _B3["context_string"] == "BLAKE3 2019-12-27 16:29:52 test vectors context"
    assert _REQUIRED_LENGTHS <= {c["input_len"] for c in _B3_CASES}
    assert all(len(c["derive_key"]) == 2 * 131 for c in _B3_CASES)


@pytest.mark.parametrize("case", _B3_CASES, ids=[f"len{c['input_len']}" for c in _B3_CASES])
def test_blake3_derive_key_official_vectors(case):
    ctx = _B3["context_string"]
    data = _b3_input(case["input_len"])
    expected = bytes.fromhex(case["derive_key"])
    h = blake3.blake3(data, derive_key_context=ctx)
    assert h.digest() == expected[:32]
    assert h.digest(length=len(expected)) == expected
    assert h.hexdigest(length=len(expected)) == case["derive_key"]
    # incremental updates (split off a chunk boundary) and the multithreaded path agree
    h2 = blake3.blake3(derive_key_context=ctx)
    cut = min(len(data), 1000)
    h2.update(data[:cut])
    h2.update(data[cut:])
    assert h2.digest(length=len(expected)) == expected
    h3 = blake3.blake3(data, derive_key_context=ctx, max_threads=blake3.blake3.AUTO)
    assert h3.digest() == expected[:32]
