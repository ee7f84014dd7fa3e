"""The canonical codec against specs/codec.md.

Three layers:

* the vectors published in ``specs/codec.md`` (read from the spec file itself);
* hypothesis properties: round-trip, insertion-order independence, idempotence,
  strict decode accepting exactly the canonical bytes, an independent reference
  encoder written from the spec's rules (``ref_encode``), and fuzzing that
  malformed input only ever raises ``FabricError(INVALID_ARGUMENT)``;
* located error messages for unencodable values.

Known codec bugs are pinned with ``xfail(strict=True)`` so they flip when fixed.
"""

from __future__ import annotations

import collections
import datetime
import decimal
import enum
import fractions
import math
import struct
import warnings
from pathlib import Path

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from cassette import codec
from cassette.errors import FabricError, StatusCode
from cassette.keys import KINDS, ContentKey
from _vectors import build, spec_vectors

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "specs" / "codec.md"


# Bugs found while writing this module (see the xfail tests at the bottom).
_BUG_BIGINT = "bug: negative powers of two -2**(8n-1), n >= 9, encode with one redundant leading 0xff byte (not minimal)"
_BUG_DECODE_DOMAIN = "bug: non-strict decode returns a value outside the codec's domain instead of INVALID_ARGUMENT"
KNOWN_BUGS = {
}
# Lenient decode does not re-walk values (specs/codec.md section 5, rule 3): only strict rejects these.
# (entries marked "strict_only" in the spec)


def _params(group: str, vectors: list[dict]) -> list:
    out = []
    for v in vectors:
        reason = KNOWN_BUGS.get((group, v["name"]))
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        out.append(pytest.param(v, id=v["name"], marks=marks))
    return out


def _invalid(excinfo) -> None:
    assert excinfo.value.status_code is StatusCode.INVALID_ARGUMENT, excinfo.value


V = spec_vectors(SPEC, "evalfabric/codec/v1")

# -- spec vectors --------------------------------------------------------------------


def test_spec_vector_names_are_unique():
    for group in ("encode", "noncanonical", "malformed"):
        names = [v["name"] for v in V[group]]
        assert len(names) == len(set(names)), group
    assert len(V["encode"]) >= 50


@pytest.mark.parametrize("vec", _params("encode", V["encode"]))
def test_encode_vector(vec):
    data = bytes.fromhex(vec["hex"])
    value = build(vec["value"])
    assert codec.encode(value).hex() == vec["hex"]
    decoded = codec.decode(data, strict=True)
    assert codec.encode(decoded) == data
    assert codec.is_canonical(data)
    assert ref_encode(model(value)) == data


@pytest.mark.parametrize("vec", _params("noncanonical", V["noncanonical"]))
def test_noncanonical_vector(vec):
    data = bytes.fromhex(vec["hex"])
    with pytest.raises(FabricError) as ei:
        codec.decode(data, strict=True)
    _invalid(ei)
    assert not codec.is_canonical(data)
    value = codec.decode(data)
    assert codec.encode(value).hex() == vec["canonical_hex"]
    canonical = bytes.fromhex(vec["canonical_hex"])
    assert codec.encode(codec.decode(canonical, strict=True)) == canonical


_MALFORMED = [
    pytest.param(
        v,
        strict,
        id=f"{v['name']}-{'strict' if strict else 'lenient'}",
        marks=(
            [pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[("malformed/non-strict", v["name"])])]
            if not strict and ("malformed/non-strict", v["name"]) in KNOWN_BUGS
            else []
        ),
    )
    for v in V["malformed"]
    for strict in (False, True)
    if strict or not v.get("strict_only")
]


@pytest.mark.parametrize("vec,strict", _MALFORMED)
def test_malformed_vector(vec, strict):
    with pytest.raises(FabricError) as ei:
        codec.decode(bytes.fromhex(vec["hex"]), strict=strict)
    _invalid(ei)
    assert ei.value.message.startswith("codec: ") or "content key" in ei.value.message
    assert not codec.is_canonical(bytes.fromhex(vec["hex"]))


# -- an independent reference encoder, written from specs/codec.md ---------------------

def model(x):
    """What ``decode(encode(x))`` must return, computed from the spec without the codec."""
    t = type(x)
    if x is None or t in (bool, int, str, bytes, ContentKey):
        return x
    if t is float:
        return float("nan") if math.isnan(x) else x
    if t in (bytearray, memoryview):
        return bytes(x)
    if t in (list, tuple):
        return [model(i) for i in x]
    if t is dict:
        return {k: model(v) for k, v in x.items()}
    if t is np.ndarray:
        dt = x.dtype.newbyteorder("<") if x.dtype.itemsize > 1 else x.dtype
        a = np.array(x, dtype=dt, order="C", copy=True)
        if dt.kind == "b":  # any non-zero element byte is true; canonical bytes are 00 / 01
            a = np.array(a.view(np.uint8) != 0)  # (a is a C-order copy; 0-d stays 0-d)
        elif dt.kind == "f":
            a[np.isnan(a)] = np.nan
        elif dt.kind == "c":
            re_, im = a.real.copy(), a.imag.copy()
            re_[np.isnan(re_)] = np.nan
            im[np.isnan(im)] = np.nan
            a = np.empty(a.shape, dt)
            a.real, a.imag = re_, im
        return a
    if isinstance(x, (np.bool_, np.integer, np.floating)):
        return model(x.item())
    raise TypeError(t)


def _head(n: int, fix: int | None, fix_max: int, codes: tuple[int, ...]) -> bytes:
    if fix is not None and n <= fix_max:
        return bytes([fix | n])
    for code, width in zip(codes, (1, 2, 4)):
        if width == 1 and code in (0xDC, 0xDE):  # array/map have no 8-bit form
            continue
        if n < 1 << (8 * width):
            return bytes([code]) + n.to_bytes(width, "big")
    raise AssertionError("too long")


def _ext(code: int, payload: bytes) -> bytes:
    n = len(payload)
    fixed = {1: 0xD4, 2: 0xD5, 4: 0xD6, 8: 0xD7, 16: 0xD8}
    if n in fixed:
        return bytes([fixed[n], code]) + payload
    for head, width in ((0xC7, 1), (0xC8, 2), (0xC9, 4)):
        if n < 1 << (8 * width):
            return bytes([head]) + n.to_bytes(width, "big") + bytes([code]) + payload
    raise AssertionError("too long")


def minimal_twos_complement(v: int) -> bytes:
    n = 1
    while not -(1 << (8 * n - 1)) <= v < 1 << (8 * n - 1):
        n += 1
    return v.to_bytes(n, "big", signed=True)


def ref_int(v: int) -> bytes:
    if 0 <= v <= 0x7F:
        return bytes([v])
    if -32 <= v < 0:
        return bytes([v & 0xFF])
    if 0 <= v < 1 << 64:
        for code, n in ((0xCC, 1), (0xCD, 2), (0xCE, 4), (0xCF, 8)):
            if v < 1 << (8 * n):
                return bytes([code]) + v.to_bytes(n, "big")
    if -(1 << 63) <= v < 0:
        for code, n in ((0xD0, 1), (0xD1, 2), (0xD2, 4), (0xD3, 8)):
            if v >= -(1 << (8 * n - 1)):
                return bytes([code]) + v.to_bytes(n, "big", signed=True)
    return _ext(3, minimal_twos_complement(v))


def ref_encode(x) -> bytes:
    """Encode a *model* value by the rules of specs/codec.md section 3 and 4."""
    t = type(x)
    if x is None:
        return b"\xc0"
    if t is bool:
        return b"\xc3" if x else b"\xc2"
    if t is int:
        return ref_int(x)
    if t is float:
        return b"\xcb" + (bytes.fromhex("7ff8000000000000") if math.isnan(x) else struct.pack(">d", x))
    if t is str:
        b = x.encode("utf-8")
        return _head(len(b), 0xA0, 31, (0xD9, 0xDA, 0xDB)) + b
    if t is ContentKey:
        return _ext(2, bytes(x))
    if t is bytes:
        return _head(len(x), None, 0, (0xC4, 0xC5, 0xC6)) + x
    if t is list:
        return _head(len(x), 0x90, 15, (0xDC, 0xDC, 0xDD)) + b"".join(ref_encode(i) for i in x)
    if t is dict:
        entries = sorted((ref_encode(k), ref_encode(v)) for k, v in x.items())
        return _head(len(x), 0x80, 15, (0xDE, 0xDE, 0xDF)) + b"".join(k + v for k, v in entries)
    if t is np.ndarray:
        dt = x.dtype
        dstr = ("|" if dt.itemsize == 1 else "<") + dt.kind + str(dt.itemsize)
        return _ext(1, ref_encode([dstr, list(x.shape), x.tobytes(order="C")]))
    raise TypeError(t)


def test_reference_encoder_agrees_on_headers():
    assert _head(31, 0xA0, 31, (0xD9, 0xDA, 0xDB)) == b"\xbf"
    assert _head(32, 0xA0, 31, (0xD9, 0xDA, 0xDB)) == b"\xd9\x20"
    assert _head(16, 0x90, 15, (0xDC, 0xDC, 0xDD)) == b"\xdc\x00\x10"
    assert _head(70000, 0x80, 15, (0xDE, 0xDE, 0xDF)) == b"\xdf\x00\x01\x11\x70"
    assert minimal_twos_complement(-(2**71)) == b"\x80" + bytes(8)
    assert minimal_twos_complement(2**71) == b"\x00\x80" + bytes(8)


# -- strategies ------------------------------------------------------------------------

INT_EDGES = [0, 1, 127, 128, 255, 256, 2**16 - 1, 2**16, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1,
             2**64, 2**71 - 1, 2**71, 2**120, -1, -32, -33, -128, -129, -(2**15), -(2**15) - 1, -(2**31),
             -(2**31) - 1, -(2**63), -(2**63) - 1, -(2**64), -(2**71) - 1, 10**40, -(10**40)]


def hits_bigint_bug(v: int) -> bool:
    """-2**(8n-1) for n >= 9: see test_bigint_negative_powers_of_two_are_minimal (xfail)."""
    return v < -(2**63) and (-v & (-v - 1)) == 0 and (-v).bit_length() % 8 == 0


ints = st.one_of(st.integers(), st.sampled_from(INT_EDGES), st.integers(-(2**300), 2**300)).filter(
    lambda v: True
)
floats = st.one_of(
    st.floats(),
    st.integers(0, 2**64 - 1).map(lambda b: struct.unpack(">d", b.to_bytes(8, "big"))[0]),  # any bits, NaN payloads too
    st.sampled_from([0.0, -0.0, math.inf, -math.inf, math.nan]),
)
texts = st.text(st.characters(codec="utf-8"), max_size=20)
map_keys = st.one_of(
    st.text(st.characters(codec="utf-8"), max_size=8),
    st.sampled_from(["", "a", "b", "z", "aa", "ab", "é", "😀", "k" * 31, "k" * 32, "ä" * 16]),
)
content_keys = st.builds(ContentKey, st.sampled_from(KINDS), st.binary(min_size=32, max_size=32))
ARRAY_DTYPES = ["|b1", "|i1", "|u1", "<i2", ">i2", "<u2", "<i4", ">u4", "<i8", ">u8",
                "<f2", ">f2", "<f4", ">f4", "<f8", ">f8", "<c8", ">c16"]


def _layout(a: np.ndarray, how: str) -> np.ndarray:
    if how == "F":
        return np.asfortranarray(a)
    if how == "T":
        return a.T
    if how == "step" and a.ndim:
        return a[::2]
    return a


array_shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)
#: bool arrays holding element bytes other than 00 / 01 (a uint8 array viewed as bool)
odd_bools = hnp.arrays(np.uint8, array_shapes).map(lambda a: a.view(np.bool_))
arrays = st.tuples(
    st.one_of(hnp.arrays(dtype=st.sampled_from(ARRAY_DTYPES).map(np.dtype), shape=array_shapes), odd_bools),
    st.sampled_from(["C", "F", "T", "step"]),
).map(lambda t: _layout(*t))
np_scalars = st.one_of(
    st.integers(-(2**63), 2**63 - 1).map(np.int64),
    st.integers(0, 2**64 - 1).map(np.uint64),
    st.integers(-128, 127).map(np.int8),
    st.booleans().map(np.bool_),
    st.floats(width=16).map(np.float16),
    st.floats(width=32).map(np.float32),
    st.floats().map(np.float64),
)
leaves = st.one_of(
    st.none(), st.booleans(), ints, floats, texts, st.binary(max_size=20),
    st.binary(max_size=8).map(bytearray), content_keys, arrays, np_scalars,
)
values = st.recursive(
    leaves,
    lambda kids: st.one_of(
        st.lists(kids, max_size=5),
        st.lists(kids, max_size=5).map(tuple),
        st.dictionaries(map_keys, kids, max_size=6),
    ),
    max_leaves=16,
)
# values without numpy, for the heavier properties
plain = st.recursive(
    st.one_of(st.none(), st.booleans(), ints, floats, texts, st.binary(max_size=20), content_keys),
    lambda kids: st.one_of(st.lists(kids, max_size=5), st.dictionaries(map_keys, kids, max_size=6)),
    max_leaves=24,
)

PROPS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def assert_same(got, want, path="$"):
    """Type-exact structural equality; floats by their bits, arrays by dtype/shape/values/bytes."""
    assert type(got) is type(want), f"{path}: {type(got).__name__} != {type(want).__name__}"
    if type(want) is float:
        # every NaN is one value (its canonical bits are checked by the encoding tests)
        if not (math.isnan(got) and math.isnan(want)):
            assert struct.pack(">d", got) == struct.pack(">d", want), f"{path}: {got!r} != {want!r}"
    elif type(want) is list:
        assert len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{path}[{i}]")
    elif type(want) is dict:
        assert set(got) == set(want), path
        for k in want:
            assert_same(got[k], want[k], f"{path}.{k}")
    elif type(want) is np.ndarray:
        assert got.dtype == want.dtype and got.dtype.str == want.dtype.str, path
        assert got.shape == want.shape, path
        assert np.array_equal(got, want, equal_nan=want.dtype.kind in "fc"), path
        assert got.tobytes() == want.tobytes(), path
        assert not got.flags.writeable, f"{path}: decoded array is writeable"
    else:
        assert got == want, f"{path}: {got!r} != {want!r}"


def reshuffle(x, rnd):
    """The same value with every dict rebuilt in a random insertion order."""
    if type(x) is dict:
        items = list(x.items())
        rnd.shuffle(items)
        return {k: reshuffle(v, rnd) for k, v in items}
    if type(x) in (list, tuple):
        return type(x)(reshuffle(i, rnd) for i in x)
    return x


# -- properties ----------------------------------------------------------------------


@PROPS
@given(values)
def test_round_trip(x):
    data = codec.encode(x)
    assert_same(codec.decode(data), model(x))
    assert_same(codec.decode(data, strict=True), model(x))
    assert_same(codec.decode(memoryview(data)), model(x))


@PROPS
@given(values)
def test_encode_is_idempotent_through_decode(x):
    data = codec.encode(x)
    assert codec.encode(codec.decode(data)) == data
    assert codec.is_canonical(data)


@PROPS
@given(values)
def test_encode_matches_the_reference_encoder(x):
    assert codec.encode(x) == ref_encode(model(x))


@PROPS
@given(values, st.randoms(use_true_random=False))
def test_dict_insertion_order_never_changes_bytes(x, rnd):
    assert codec.encode(reshuffle(x, rnd)) == codec.encode(x)


@PROPS
@given(st.dictionaries(map_keys, st.none(), min_size=2, max_size=12))
def test_map_entries_are_sorted_by_encoded_key_bytes(d):
    pairs = msgpack.unpackb(codec.encode(d), object_pairs_hook=list, raw=False)
    keys = [k for k, _ in pairs]
    assert keys == sorted(d, key=lambda k: msgpack.packb(k))
    assert keys == sorted(d, key=lambda k: (len(k.encode()), k.encode()))


@PROPS
@given(plain, st.text(st.characters(codec="utf-8"), min_size=1), st.text(st.characters(codec="utf-8"), min_size=1))
def test_encode_request_is_encode_of_the_triple(args, evaluator, version):
    assert codec.encode_request(evaluator, version, args) == codec.encode([evaluator, version, args])


@PROPS
@given(ints)
def test_ints_are_minimal(v):
    assert codec.encode(v) == ref_int(v)
    assert codec.decode(ref_int(v), strict=True) == v


@PROPS
@given(floats)
def test_floats_are_always_float64_with_one_nan(f):
    data = codec.encode(f)
    assert len(data) == 9 and data[0] == 0xCB
    if math.isnan(f):
        assert data.hex() == "cb7ff8000000000000"
    else:
        assert struct.unpack(">d", data[1:])[0] == f
        assert math.copysign(1, struct.unpack(">d", data[1:])[0]) == math.copysign(1, f)


# -- strict decode accepts exactly the canonical bytes --------------------------------


def _rejects_strict_but_decodes(data: bytes, value) -> None:
    with pytest.raises(FabricError) as ei:
        codec.decode(data, strict=True)
    _invalid(ei)
    assert not codec.is_canonical(data)
    # the lenient decode gives the same value: same type and the same canonical bytes
    decoded = codec.decode(data)
    assert type(decoded) is type(model(value))
    assert codec.encode(decoded) == ref_encode(model(value))


@PROPS
@given(st.dictionaries(map_keys, st.integers(0, 9), min_size=2, max_size=8), st.randoms(use_true_random=False))
def test_strict_rejects_unsorted_maps(d, rnd):
    items = list(d.items())
    rnd.shuffle(items)
    data = msgpack.packb(dict(items), use_bin_type=True)
    assume(data != codec.encode(d))
    _rejects_strict_but_decodes(data, d)


@PROPS
@given(st.floats(width=32))
def test_strict_rejects_float32(f):
    data = msgpack.packb(f, use_single_float=True)
    assert data[0] == 0xCA
    _rejects_strict_but_decodes(data, f)


@PROPS
@given(st.integers(-(2**31), 2**32 - 1))
def test_strict_rejects_non_minimal_ints(v):
    wide = b"\xcf" + v.to_bytes(8, "big") if v >= 0 else b"\xd3" + v.to_bytes(8, "big", signed=True)
    _rejects_strict_but_decodes(wide, v)
    big = _ext(3, minimal_twos_complement(v))  # an int64 value in the bigint ext
    _rejects_strict_but_decodes(big, v)


@PROPS
@given(st.text(st.characters(codec="utf-8"), max_size=10))
def test_strict_rejects_str_as_bin_and_long_headers(s):
    b = s.encode()
    with pytest.raises(FabricError):
        codec.decode(b"\x81" + b"\xc4" + bytes([len(b)]) + b + b"\x01", strict=True)  # key as bin
    _rejects_strict_but_decodes(b"\xda" + len(b).to_bytes(2, "big") + b, s)  # str16 header
    _rejects_strict_but_decodes(b"\xc5" + len(b).to_bytes(2, "big") + b, b)  # bin16 header


@PROPS
@given(hnp.arrays(np.uint8, array_shapes), st.sampled_from(["C", "F", "T", "step"]))
def test_equal_bool_arrays_encode_to_equal_bytes(raw, how):
    """specs/codec.md section 4: numpy reads every non-zero byte of a bool array as
    true, so element bytes are written as 00 / 01 whatever numpy holds; equal arrays
    give equal bytes and equal request keys (a uint8 array viewed as bool kept its 2s)."""
    odd = _layout(raw.view(np.bool_), how)
    plain = _layout(np.array(raw != 0), how)
    assert np.array_equal(odd, plain)
    enc = codec.encode(odd)
    assert enc == codec.encode(plain)
    assert codec.is_canonical(enc)
    assert set(codec.decode(enc, strict=True).view(np.uint8).ravel().tolist()) <= {0, 1}
    assert ContentKey.for_request("e", "1", {"m": odd}) == ContentKey.for_request("e", "1", {"m": plain})


@given(hnp.arrays(np.uint8, array_shapes.filter(lambda s: math.prod(s) > 0)), st.data())
@PROPS
def test_strict_rejects_bool_element_bytes_other_than_0_and_1(raw, data):
    raw = raw.copy()
    i = data.draw(st.integers(0, raw.size - 1))
    raw.flat[i] = data.draw(st.integers(2, 255))
    bad = _ext(1, msgpack.packb(["|b1", list(raw.shape), raw.tobytes()]))
    _rejects_strict_but_decodes(bad, raw.view(np.bool_))
    assert codec.encode(codec.decode(bad)) == codec.encode(np.array(raw != 0))


def test_strict_rejects_non_canonical_array_payload():
    good = codec.encode(np.array([1.0, np.nan], "<f4"))
    snan = np.frombuffer(np.array([1.0], "<f4").tobytes() + bytes.fromhex("0100807f"), "<f4")  # signalling NaN
    bad = _ext(1, msgpack.packb(["<f4", [2], snan.tobytes()]))
    assert bad != good
    _rejects_strict_but_decodes(bad, snan)
    assert codec.encode(codec.decode(bad)) == good


# -- malformed input never escapes as another exception type --------------------------


def _decode_only_fabric_errors(data: bytes) -> None:
    for strict in (False, True):
        try:
            value = codec.decode(data, strict=strict)
        except FabricError as e:
            _invalid_err(e)
        else:
            if strict:  # strict acceptance means: these are exactly the canonical bytes
                assert codec.encode(value) == data


def _invalid_err(e: FabricError) -> None:
    assert e.status_code is StatusCode.INVALID_ARGUMENT, e
    assert "\n" not in e.message


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=64))
def test_random_bytes_only_raise_invalid_argument(data):
    _decode_only_fabric_errors(data)


@PROPS
@given(values, st.data())
def test_mutated_encodings_only_raise_invalid_argument(x, data):
    enc = bytearray(codec.encode(x))
    op = data.draw(st.sampled_from(["flip", "truncate", "insert", "delete"]))
    i = data.draw(st.integers(0, max(len(enc) - 1, 0)))
    if op == "flip" and enc:
        enc[i] ^= data.draw(st.integers(1, 255))
    elif op == "truncate":
        del enc[i:]
    elif op == "insert":
        enc.insert(i, data.draw(st.integers(0, 255)))
    elif enc:
        del enc[i]
    _decode_only_fabric_errors(bytes(enc))


@pytest.mark.parametrize("data", ["c6ffffffff", "ddffffffff", "dfffffffff", "c9ffffffff01", "91" * 100000])
def test_huge_or_deep_headers_fail_cleanly(data):
    for strict in (False, True):
        with pytest.raises(FabricError) as ei:
            codec.decode(bytes.fromhex(data), strict=strict)
        _invalid(ei)


@pytest.mark.parametrize("data", ["x", 12, None, ["\x01"]], ids=["str", "int", "None", "list"])
def test_decode_of_non_bytes_is_invalid_argument(data):
    with pytest.raises(FabricError) as ei:
        codec.decode(data)
    _invalid(ei)


# -- one encoding per value, and what counts as different ------------------------------


def test_one_float_true_str_bytes_are_distinct():
    vals = [1, 1.0, True, "1", b"1"]
    encs = [codec.encode(v) for v in vals]
    assert [e.hex() for e in encs] == ["01", "cb3ff0000000000000", "c3", "a131", "c40131"]
    assert [type(codec.decode(e)) for e in encs] == [int, float, bool, str, bytes]


def test_falsy_values_are_distinct():
    vals = [None, False, 0, 0.0, -0.0, "", b"", [], {}]
    assert len({codec.encode(v) for v in vals}) == len(vals)


def test_content_key_is_not_its_bytes():
    key = ContentKey.of("blob", b"x")
    assert key == bytes(key)  # Python equality ...
    assert codec.encode(key) != codec.encode(bytes(key))  # ... but not the same value here
    assert type(codec.decode(codec.encode(key))) is ContentKey
    assert type(codec.decode(codec.encode(bytes(key)))) is bytes
    assert codec.encode(key) == b"\xc7\x21\x02" + bytes(key)


def test_tuples_encode_as_lists():
    assert codec.encode((1, (2, "a"), ())) == codec.encode([1, [2, "a"], []])
    assert codec.decode(codec.encode((1, (2,)))) == [1, [2]]
    assert type(codec.decode(codec.encode(()))) is list


def test_bytes_like_values_encode_as_bytes():
    for v in (b"ab", bytearray(b"ab"), memoryview(b"ab")):
        assert codec.encode(v) == b"\xc4\x02ab"
        assert type(codec.decode(codec.encode(v))) is bytes
    assert codec.encode(memoryview(np.arange(2, dtype="<i2"))) == b"\xc4\x04\x00\x00\x01\x00"


@pytest.mark.parametrize(
    "scalar,expected",
    [
        (np.float32(1.5), 1.5),
        (np.float32(0.1), 0.10000000149011612),
        (np.float16(np.nan), math.nan),
        (np.float64(-0.0), -0.0),
        (np.int64(-5), -5),
        (np.int8(-100), -100),
        (np.uint64(2**64 - 1), 2**64 - 1),
        (np.bool_(True), True),
        (np.bool_(False), False),
    ],
    ids=lambda v: f"{type(v).__name__}({v})" if isinstance(v, np.generic) else None,
)
def test_numpy_scalars_encode_as_the_python_value(scalar, expected):
    data = codec.encode(scalar)
    assert data == codec.encode(expected)
    assert_same(codec.decode(data), model(expected))


def test_decoded_arrays_are_read_only_little_endian_copies():
    a = np.arange(6, dtype=">i4").reshape(2, 3)
    out = codec.decode(codec.encode({"a": a, "l": [a.T]}))
    for got, want in ((out["a"], a), (out["l"][0], a.T)):
        assert got.dtype == np.dtype("<i4")
        assert np.array_equal(got, want)
        assert not got.flags.writeable
        assert got.flags.c_contiguous
        with pytest.raises(ValueError):
            got[0, 0] = 1
    b = out["a"].copy()
    b[0, 0] = 7
    assert b[0, 0] == 7


def test_array_layouts_give_identical_bytes():
    a = np.arange(12, dtype="<f8").reshape(3, 4)
    c = codec.encode(a)
    assert codec.encode(np.asfortranarray(a)) == c
    assert codec.encode(a.astype(">f8")) == c
    wide = np.zeros((3, 8))
    wide[:, ::2] = a
    strided = wide[:, ::2]
    assert not strided.flags.c_contiguous and np.array_equal(strided, a)
    assert codec.encode(strided) == c
    assert codec.encode(a.T) != c  # a transpose is a different value (shape 4x3)


# -- errors name the location ------------------------------------------------------------

ERROR_CASES = [
    (lambda: codec.encode_request("e", "1", {"items": [0, 1, 2, {1}]}), "args.items[3]: set is not encodable"),
    (lambda: codec.encode({"items": [0, 1, 2, {1}]}, root="args"), "args.items[3]: set is not encodable"),
    (lambda: codec.encode(object()), "value: object is not encodable"),
    (lambda: codec.encode({"a": {1: 2}}), "value.a: map key 1 (int) is not a str"),
    (lambda: codec.encode({"a": [{None: 2}]}), "value.a[0]: map key None (NoneType) is not a str"),
    (lambda: codec.encode({b"k": 1}), "value: map key b'k' (bytes) is not a str"),
    (lambda: codec.encode({"my key": [set()]}), "value['my key'][0]: set is not encodable"),
    (lambda: codec.encode({"a": ["x", "\ud800"]}), "value.a[1]: str is not valid Unicode text (surrogates not allowed at index 0)"),
    (lambda: codec.encode(["ok", ("\udfff",)]), "value[1][0]: str is not valid Unicode text (surrogates not allowed at index 0)"),
    (lambda: codec.encode({"x": np.array(["a"])}), "value.x: numpy array of dtype <U1 is not encodable (bool, int, uint, float, complex only)"),
    (lambda: codec.encode({"x": np.str_("a")}), "value.x: numpy scalar of dtype <U1 is not encodable"),
    (lambda: codec.encode((1, 2j)), "value[1]: complex is not encodable"),
    (lambda: codec.encode({"_1": {"b-c": frozenset()}}), "value._1['b-c']: frozenset is not encodable"),
    (lambda: codec.encode({"1a": {}.keys()}), "value['1a']: dict_keys is not encodable"),
    (lambda: codec.encode_request("e\ud800", "1", {}), "request[0]: str is not valid Unicode text (surrogates not allowed at index 1)"),
    # specs/content-key.md section 5: evaluator and version are non-empty str (these all encoded)
    (lambda: codec.encode_request("e", 1, {}), "request[1]: version must be a non-empty str, got 1 (int)"),
    (lambda: codec.encode_request("e", "", {}), "request[1]: version must be a non-empty str, got ''"),
    (lambda: codec.encode_request("e", b"1", {}), "request[1]: version must be a non-empty str, got b'1' (bytes)"),
    (lambda: codec.encode_request("", "1", {}), "request[0]: evaluator must be a non-empty str, got ''"),
    (lambda: codec.encode_request(1, "1", {}), "request[0]: evaluator must be a non-empty str, got 1 (int)"),
    (lambda: codec.encode_request(None, "1", {"a": {1}}), "request[0]: evaluator must be a non-empty str, got None"),
]


@pytest.mark.parametrize("call,message", ERROR_CASES, ids=[m for _, m in ERROR_CASES])
def test_error_names_the_path(call, message):
    with pytest.raises(FabricError) as ei:
        call()
    _invalid(ei)
    assert ei.value.message == message


def test_encode_request_refuses_version_none():
    with pytest.raises(FabricError) as ei:
        codec.encode_request("e", None, {})
    assert ei.value.message == "request[1]: version must be a non-empty str, got None"


def test_encode_request_takes_a_str_subclass_as_its_text():
    class Name(str):
        pass

    assert codec.encode_request(Name("e"), Name("1"), {"a": 1}) == codec.encode_request("e", "1", {"a": 1})


def _matrix():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        return np.matrix([[1]])


class _Color(enum.IntEnum):
    RED = 1


UNENCODABLE = [
    set(), frozenset({1}), 1j, object(), collections.OrderedDict(a=1), collections.defaultdict(int),
    _Color.RED, decimal.Decimal(1), fractions.Fraction(1, 3), datetime.date(2020, 1, 1), range(3),
    (i for i in ()), type, np.ma.array([1, 2]), _matrix(), np.array([object()]), np.array([b"x"]),
    np.array(["2020-01-01"], dtype="datetime64[D]"), np.array([1], dtype="timedelta64[s]"),
    np.zeros(2, dtype=[("a", "<i4")]), np.complex64(1), np.datetime64("2020-01-01"), np.void(b"x"),
]


@pytest.mark.parametrize("value", UNENCODABLE, ids=lambda v: type(v).__name__)
def test_unencodable_values_are_invalid_argument(value):
    for wrap, root in ((lambda v: v, "value"), (lambda v: {"deep": [v]}, "value.deep[0]")):
        with pytest.raises(FabricError) as ei:
            codec.encode(wrap(value))
        _invalid(ei)
        assert ei.value.message.startswith(root + ": ")


def test_too_deep_nesting_is_invalid_argument():
    v = None
    for _ in range(5000):
        v = [v]
    with pytest.raises(FabricError) as ei:
        codec.encode(v)
    _invalid(ei)
    shallow = None
    for _ in range(500):
        shallow = [shallow]
    assert codec.decode(codec.encode(shallow), strict=True) == shallow


# -- decode budget (specs/codec.md section 5, rule 7) ------------------------------------


def _exhausted(ei, limit: int) -> None:
    assert ei.value.status_code is StatusCode.RESOURCE_EXHAUSTED
    assert ei.value.message == f"codec: input decodes to more than {limit} arrays, maps and ext values"


def test_decode_budget_counts_arrays_maps_and_ext_values_exactly():
    # outer list 1, ndarray 3 (the ext, its payload array, its shape), map 1, list 1, key 1, bigint 1
    value = [np.arange(3, dtype=np.int64), {"a": []}, ContentKey.of("blob", b"x"), 2**70, "s" * 40]
    data = codec.encode(value)
    got = codec.decode(data, max_compound=8)
    assert got[0].tolist() == [0, 1, 2] and got[1:] == value[1:]
    with pytest.raises(FabricError) as ei:
        codec.decode(data, max_compound=7)
    _exhausted(ei, 7)
    assert codec.decode(data, strict=True, max_compound=8)[1:] == value[1:]


def test_decode_budget_stops_a_flood_of_empty_containers_and_one_hidden_in_an_ndarray():
    # 4 MiB of `90` bytes decoded to ~4 million lists (~290 MB of objects, about a second)
    n = 4 << 20
    flood = b"\xdd" + n.to_bytes(4, "big") + b"\x90" * n
    with pytest.raises(FabricError) as ei:
        codec.decode(flood, max_compound=65_536)
    _exhausted(ei, 65_536)
    # an ndarray's shape is decoded by a nested unpack: it counts against the same budget
    payload = b"\x93\xa3|u1\xdd" + (200_000).to_bytes(4, "big") + b"\x90" * 200_000 + b"\xc4\x00"
    ext = b"\xc9" + len(payload).to_bytes(4, "big") + b"\x01" + payload
    with pytest.raises(FabricError) as ei:
        codec.decode(ext, max_compound=65_536)
    _exhausted(ei, 65_536)
    with pytest.raises(FabricError) as ei:  # without a budget it is still refused, once built
        codec.decode(ext)
    _invalid(ei)


def test_decode_budget_leaves_bulk_scalars_bytes_and_arrays_alone():
    ints = list(range(100_000))
    assert codec.decode(codec.encode({"xs": ints}), max_compound=65_536) == {"xs": ints}
    blob = bytes(range(256)) * (16 << 10)  # 4 MiB
    arr = np.arange(1 << 19, dtype=np.float64)  # 4 MiB
    got = codec.decode(codec.encode([blob, arr]), max_compound=65_536)
    assert got[0] == blob and np.array_equal(got[1], arr)
    # every value takes a byte: 15 bytes hold at most 15 compound values (decoded without counting)
    small = codec.encode([[]] * 14)
    assert len(small) == 15 and codec.decode(memoryview(small), max_compound=15) == [[]] * 14
    with pytest.raises(FabricError) as ei:
        codec.decode(memoryview(small), max_compound=14)
    _exhausted(ei, 14)


# -- known bugs (xfail strict: they flip to failures once fixed) -------------------------


@pytest.mark.parametrize("n", [9, 10, 16, 17])
def test_bigint_negative_powers_of_two_are_minimal(n):
    v = -(2 ** (8 * n - 1))
    assert hits_bigint_bug(v)
    assert codec.encode(v) == ref_int(v)  # e.g. -2**71 -> c7 09 03 80 00*8


@pytest.mark.parametrize(
    "call",
    [
        lambda: codec.encode({"\ud800": 1}),
        lambda: codec.encode({"ok": [{"a": 1, "\udc00x": 2}]}),
        lambda: codec.encode_request("e", "1", {"\ud800": 1}),
        lambda: ContentKey.for_request("e", "1", {"\ud800": 1}),
    ],
    ids=["top", "nested", "encode_request", "for_request"],
)
def test_surrogate_map_key_is_invalid_argument(call):
    with pytest.raises(FabricError) as ei:
        call()
    _invalid(ei)


class _StrKey(str):
    pass


def test_str_subclass_key_is_rejected_whatever_was_encoded_before():
    key = "cache-probe-4e1f"
    with pytest.raises(FabricError):  # fresh: rejected, as R8 says
        codec.encode({_StrKey(key): 1})
    codec.encode({key: 1})
    with pytest.raises(FabricError):  # after an equal str key was encoded: must still be rejected
        codec.encode({_StrKey(key): 1})


@pytest.mark.parametrize("data", ["81c4016101", "d6ff00000000", "81a1619181c4016101"], ids=["bin key", "timestamp", "nested bin key"])
def test_strict_decode_stays_in_the_codec_domain(data):
    with pytest.raises(FabricError) as ei:
        codec.decode(bytes.fromhex(data), strict=True)
    _invalid(ei)


# ---------------------------------------------------------------- request fast path

_flat_values = st.one_of(
    st.none(), st.booleans(), st.text(), st.binary(max_size=16), st.floats(allow_nan=True),
    st.integers(min_value=-(2**70), max_value=2**70), st.lists(st.integers(), max_size=2),
)


@given(st.dictionaries(st.text(max_size=6), _flat_values, max_size=5))
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_encode_request_fast_path_matches_exact_encoding(args):
    """A request's args in canonical key order take a fast path on later calls (big
    ints, NaN and nested values leave it): the bytes are always those of encode()."""
    ordered = {k: args[k] for k in sorted(args, key=lambda k: (len(k.encode()), k.encode()))}
    want = codec.encode(["ev", "1", ordered])
    for _ in range(2):  # the first call learns the key order, the second may take the fast path
        assert codec.encode_request("ev", "1", ordered) == want
        assert codec.encode_request("ev", "1", args) == want


def test_encode_request_fast_path_still_names_bad_values():
    class Key(str):
        pass

    codec.encode_request("ev", "1", {"a": 1, "b": 2})  # learn the order of ("a", "b")
    with pytest.raises(FabricError) as e:
        codec.encode_request("ev", "1", {Key("a"): 1, "b": 2})
    assert e.value.status_code == StatusCode.INVALID_ARGUMENT and "is not a str" in e.value.message
    with pytest.raises(FabricError) as e:
        codec.encode_request("ev", "1", {"a": "\ud800", "b": 2})
    assert e.value.status_code == StatusCode.INVALID_ARGUMENT and e.value.message.startswith("args.a: ")
    big = codec.encode_request("ev", "1", {"a": 2**64, "b": 2})
    assert big == codec.encode(["ev", "1", {"a": 2**64, "b": 2}])
    assert codec.decode(big)[2]["a"] == 2**64
