"""The one canonical codec: msgpack with exactly one encoding per value.

Normative text: ``specs/codec.md``.  In short:

* maps: keys must be ``str``; entries sorted by their encoded key bytes (which is
  UTF-8 length first, then bytewise);
* tuples encode as lists (and decode as lists); ints minimal; ``bool`` is not
  ``int``; floats always float64; every NaN is the one quiet NaN
  ``7ff8000000000000``; ``-0.0`` keeps its sign;
* ``bytes``/``bytearray``/``memoryview`` encode as msgpack bin;
* ints outside msgpack's 64-bit range use ext type 3 (two's complement,
  big-endian, minimal length);
* numpy arrays are ext type 1 carrying ``[dtype, shape, C-order bytes]`` with a
  little-endian dtype string (bool elements as bytes 00 / 01 only, however numpy
  holds them); numpy scalars encode as the Python value they hold;
* :class:`~cassette.keys.ContentKey` is ext type 2 carrying its 33 binary bytes.

Anything else raises ``FabricError(INVALID_ARGUMENT)`` naming the path to the bad
value, e.g. ``args.items[3]: set is not encodable``.

Decoded numpy arrays are read-only views over the decoded bytes (as Ray's object
store returns them): copy before mutating.
"""

from __future__ import annotations

import math
import struct
from types import MappingProxyType
from typing import Any, Mapping

import msgpack
import numpy as np

from cassette.errors import FabricError, StatusCode
from cassette.keys import ContentKey

__all__ = [
    "encode",
    "pack",
    "decode",
    "has_non_str_key",
    "encode_request",
    "is_canonical",
    "EXT_NDARRAY",
    "EXT_CONTENT_KEY",
    "EXT_BIGINT",
    "CANONICAL_NAN",
]

EXT_NDARRAY = 1
EXT_CONTENT_KEY = 2
EXT_BIGINT = 3

#: The one NaN every float NaN encodes as (quiet NaN, sign bit clear).
CANONICAL_NAN: float = struct.unpack(">d", bytes.fromhex("7ff8000000000000"))[0]

#: no decode hooks (the trusted path: nothing counted)
_NO_HOOKS: Mapping[str, Any] = MappingProxyType({})

_I64_MIN = -(1 << 63)
_U64_MAX = (1 << 64) - 1
_ARRAY_KINDS = frozenset("biufc")
_IDENT_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")

_packb = msgpack.Packer(use_bin_type=True, strict_types=True, use_single_float=False, autoreset=True).pack


class _Unencodable(Exception):
    """Internal: carries the reason and the path (innermost segment first)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        self.segments: list[str] = []


def _key_sort(k: str) -> tuple[int, bytes]:
    b = k.encode("utf-8")
    return (len(b), b)


def _norm(v: Any) -> Any:
    """Normalise ``v`` into a structure msgpack packs canonically (strict types)."""
    t = type(v)
    if t is str or t is bytes or t is bool or v is None:
        return v
    if t is int:
        if _I64_MIN <= v <= _U64_MAX:
            return v
        return msgpack.ExtType(EXT_BIGINT, _bigint_bytes(v))
    if t is float:
        return CANONICAL_NAN if v != v else v
    if t is dict:
        return _norm_dict(v)
    if t is list or t is tuple:
        out_l = []
        for i, item in enumerate(v):
            try:
                out_l.append(_norm(item))
            except _Unencodable as e:
                e.segments.append(f"[{i}]")
                raise
        return out_l
    if t is ContentKey:
        return msgpack.ExtType(EXT_CONTENT_KEY, bytes(v))
    if t is np.ndarray:
        return msgpack.ExtType(EXT_NDARRAY, _array_payload(v))
    if t is bytearray or t is memoryview:
        return bytes(v)
    if isinstance(v, np.generic):
        if isinstance(v, (np.bool_, np.integer, np.floating)):
            return _norm(v.item())
        raise _Unencodable(f"numpy scalar of dtype {v.dtype} is not encodable")
    raise _Unencodable(f"{t.__name__} is not encodable")


_SCALAR_TYPES = frozenset((str, bytes, bool, type(None)))
_ORDER_CACHE: dict[tuple, tuple] = {}
_ORDER_CACHE_MAX = 4096
#: key tuples (all exactly str) already in canonical order: the request fast path's test
_CANONICAL_KEYS: set[tuple] = set()
#: value types msgpack (strict types) packs canonically as they are, ints in range
_PLAIN_TYPES = _SCALAR_TYPES | {int}


def _key_order(keys: tuple) -> tuple:
    """Keys in canonical order (UTF-8 length, then bytes); cached per key tuple."""
    for k in keys:  # checked on every call: a str subclass equals its str in the cache
        if type(k) is not str:
            raise _Unencodable(f"map key {k!r} ({type(k).__name__}) is not a str")
    order = _ORDER_CACHE.get(keys)
    if order is None:
        try:
            order = tuple(sorted(keys, key=_key_sort))
        except UnicodeEncodeError:
            bad = next(k for k in keys if not _is_text(k))
            raise _Unencodable(f"map key {bad!r} is not valid Unicode text") from None
        if len(_ORDER_CACHE) >= _ORDER_CACHE_MAX:
            _ORDER_CACHE.clear()
            _CANONICAL_KEYS.clear()
        _ORDER_CACHE[keys] = order
        if order == keys:
            _CANONICAL_KEYS.add(keys)
    return order


def _is_text(k: str) -> bool:
    try:
        k.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _norm_dict(v: dict) -> dict:
    keys = tuple(v)
    order = _key_order(keys)
    scalar = _SCALAR_TYPES
    if order == keys:  # already in canonical order: packable as it is if every value is a plain scalar
        for x in v.values():
            t = type(x)
            if not (t in scalar or (t is int and _I64_MIN <= x <= _U64_MAX) or (t is float and x == x)):
                break
        else:
            return v
    out = {}
    for k in order:
        x = v[k]
        t = type(x)
        if t in scalar or (t is int and _I64_MIN <= x <= _U64_MAX):
            out[k] = x
            continue
        try:
            out[k] = _norm(x)
        except _Unencodable as e:
            e.segments.append(_key_segment(k))
            raise
    return out


def _key_segment(k: str) -> str:
    if k and _IDENT_OK.issuperset(k) and not k[0].isdigit():
        return f".{k}"
    return f"[{k!r}]"


def _bigint_bytes(v: int) -> bytes:
    n = ((v if v >= 0 else ~v).bit_length() + 8) // 8  # minimal two's complement, sign bit included
    return v.to_bytes(n, "big", signed=True)


def _array_payload(a: np.ndarray) -> bytes:
    dt = a.dtype
    if dt.kind not in _ARRAY_KINDS or dt.fields is not None or dt.subdtype is not None:
        raise _Unencodable(f"numpy array of dtype {dt} is not encodable (bool, int, uint, float, complex only)")
    le = dt.newbyteorder("<") if dt.itemsize > 1 else dt
    arr = np.ascontiguousarray(a, dtype=le)
    if dt.kind == "b":
        # numpy reads any non-zero byte as True (a uint8 array viewed as bool keeps its
        # 2s): the canonical element bytes are 00 / 01 (one max() pass, a copy only if needed)
        u8 = arr.view(np.uint8)
        if u8.size and u8.max() > 1:
            arr = u8 != 0
    elif dt.kind in "fc":
        nan = np.isnan(arr)
        if nan.any():
            arr = arr.copy()
            if dt.kind == "f":
                arr[nan] = CANONICAL_NAN
            else:
                re, im = arr.real.copy(), arr.imag.copy()
                re[np.isnan(re)] = CANONICAL_NAN
                im[np.isnan(im)] = CANONICAL_NAN
                arr = _complex_from(re, im, le)
    return _packb([le.str, list(a.shape), arr.tobytes()])


def _complex_from(re: np.ndarray, im: np.ndarray, dt: np.dtype) -> np.ndarray:
    out = np.empty(re.shape, dtype=dt)
    out.real = re
    out.imag = im
    return out


def _fail(e: _Unencodable, root: str) -> FabricError:
    path = root + "".join(reversed(e.segments))
    return FabricError(StatusCode.INVALID_ARGUMENT, f"{path}: {e.reason}")


def _locate_bad_text(v: Any, root: str) -> FabricError | None:
    """Slow walk used only after msgpack refused a normalised value: find the bad str."""
    stack: list[tuple[Any, str]] = [(v, root)]
    while stack:
        x, path = stack.pop()
        if type(x) is str:
            try:
                x.encode("utf-8")
            except UnicodeEncodeError as exc:
                return FabricError(
                    StatusCode.INVALID_ARGUMENT,
                    f"{path}: str is not valid Unicode text ({exc.reason} at index {exc.start})",
                )
        elif type(x) is dict:
            for k, item in x.items():
                kp = path + _key_segment(k) if type(k) is str else path
                if type(k) is str:
                    stack.append((k, f"{path} map key"))
                stack.append((item, kp))
        elif type(x) in (list, tuple):
            stack.extend((item, f"{path}[{i}]") for i, item in enumerate(x))
    return None


def encode(value: Any, *, root: str = "value") -> bytes:
    """Canonical bytes of ``value``; ``root`` names it in error paths."""
    try:
        normal = _norm(value)
    except _Unencodable as e:
        raise _fail(e, root) from None
    except RecursionError:
        raise FabricError(StatusCode.INVALID_ARGUMENT, f"{root}: nesting too deep to encode") from None
    try:
        return _packb(normal)
    except (UnicodeEncodeError, ValueError, TypeError, OverflowError) as exc:
        located = _locate_bad_text(value, root)
        if located is not None:
            raise located from None
        raise FabricError(StatusCode.INVALID_ARGUMENT, f"{root}: not encodable ({exc})") from None


def _pack_default(v: Any) -> Any:
    """msgpack's ``default`` for :func:`pack`: the codec's non-msgpack types, nothing else."""
    t = type(v)
    if t is ContentKey:
        return msgpack.ExtType(EXT_CONTENT_KEY, bytes(v))
    if t is tuple:
        return list(v)
    if t is np.ndarray:
        try:
            return msgpack.ExtType(EXT_NDARRAY, _array_payload(v))
        except _Unencodable:
            raise TypeError("unencodable array") from None
    if t is bytearray or t is memoryview:
        return bytes(v)
    if isinstance(v, (np.bool_, np.integer, np.floating)):
        return v.item()
    raise TypeError(f"{t.__name__} is not encodable")


def pack(value: Any, *, root: str = "value") -> bytes:
    """Bytes of ``value`` that :func:`decode` turns back into an equal value — **not** canonical.

    The same data model and ext types as :func:`encode`, but maps keep their
    insertion order and NaN payloads are not normalised, so two equal values
    may pack differently: never hash or compare these bytes (use
    :func:`encode` for anything content-addressed).  For messages whose bytes
    are authenticated rather than named, e.g. wire frames (``specs/wire.md``).
    A value :func:`encode` refuses raises the same located INVALID_ARGUMENT.
    """
    try:
        out = msgpack.packb(value, use_bin_type=True, strict_types=True, default=_pack_default)
    except Exception:  # noqa: BLE001 - big ints, non-str keys, bad text...: the canonical path decides
        return encode(value, root=root)
    if has_non_str_key(value):
        return encode(value, root=root)  # raises: map keys must be str
    return out


def has_non_str_key(value: Any) -> bool:
    """Whether a map anywhere in ``value`` has a key that is not exactly ``str`` (the data model's
    only key type; :func:`decode` lets msgpack ``bin`` keys through as ``bytes``).  Iterative, so
    any nesting :func:`decode` accepts is walked without recursion."""
    t = type(value)
    if t is not dict and t is not list and t is not tuple:
        return False
    stack = [value]
    pop, push = stack.pop, stack.append
    while stack:
        x = pop()
        if type(x) is dict:
            for k, item in x.items():
                if type(k) is not str:
                    return True
                t = type(item)
                if t is dict or t is list or t is tuple:
                    push(item)
        else:
            for item in x:
                t = type(item)
                if t is dict or t is list or t is tuple:
                    push(item)
    return False


def encode_request(evaluator: str, version: str, args: Any) -> bytes:
    """Canonical bytes of ``[evaluator, version, args]`` (specs/content-key.md section 5).

    ``evaluator`` and ``version`` must be non-empty ``str`` (a ``str`` subclass is
    taken as its text), else INVALID_ARGUMENT at ``request[0]`` / ``request[1]``;
    errors in ``args`` name their path under ``args``.
    """
    if not (type(evaluator) is str is type(version) and evaluator and version):  # (one chain: hot path)
        evaluator, version = _request_names(evaluator, version)
    if type(args) is dict and tuple(args) in _CANONICAL_KEYS:
        # the hot case: str keys already in canonical order, flat plain values.  An int
        # out of range, a str subclass or bad text makes msgpack raise: the exact path
        # below then encodes it (big ints as ext) or names what is wrong.
        for x in args.values():
            t = type(x)
            if t is float:
                if x != x:
                    break  # NaN: normalised below
            elif t not in _PLAIN_TYPES:
                break
        else:
            try:
                return _packb([evaluator, version, args])
            except (UnicodeEncodeError, ValueError, TypeError, OverflowError):
                pass
    try:
        normal = _norm_dict(args) if type(args) is dict else _norm(args)
    except _Unencodable as e:
        raise _fail(e, "args") from None
    except RecursionError:
        raise FabricError(StatusCode.INVALID_ARGUMENT, "args: nesting too deep to encode") from None
    try:
        return _packb([evaluator, version, normal])
    except (UnicodeEncodeError, ValueError, TypeError, OverflowError) as exc:
        located = _locate_bad_text(args, "args") or _locate_bad_text([evaluator, version], "request")
        if located is not None:
            raise located from None
        raise FabricError(StatusCode.INVALID_ARGUMENT, f"args: not encodable ({exc})") from None


def _request_names(evaluator: Any, version: Any) -> tuple[str, str]:
    """The slow path of :func:`encode_request`'s name check: plain ``str`` names, or
    INVALID_ARGUMENT at ``request[0]`` / ``request[1]``."""
    for i, (what, v) in enumerate((("evaluator", evaluator), ("version", version))):
        if not isinstance(v, str) or not v:
            got = repr(v) if isinstance(v, str) or v is None else f"{v!r:.60} ({type(v).__name__})"
            raise FabricError(StatusCode.INVALID_ARGUMENT, f"request[{i}]: {what} must be a non-empty str, got {got}")
    return str.__str__(evaluator), str.__str__(version)


def _ext_hook(code: int, data: bytes, _hooks: Mapping[str, Any] = _NO_HOOKS) -> Any:
    """The value of one ext; ``_hooks`` (a :class:`_Budget`'s) also count an ndarray payload's arrays."""
    if code == EXT_NDARRAY:
        try:
            dtype_str, shape, raw = msgpack.unpackb(data, raw=False, use_list=True, **_hooks)
            dt = np.dtype(dtype_str)
            if dt.kind not in _ARRAY_KINDS or dt.str != dtype_str or (dt.itemsize > 1 and dt.byteorder not in "<="):
                raise ValueError(f"non-canonical dtype {dtype_str!r}")
            if dt.itemsize > 1 and dt.str[0] != "<":
                raise ValueError(f"dtype {dtype_str!r} is not little-endian")
            if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
                raise ValueError(f"bad shape {shape!r}")
            count = math.prod(shape)
            if count * dt.itemsize != len(raw):
                raise ValueError(f"{len(raw)} data bytes for shape {shape} of {dtype_str}")
            return np.frombuffer(raw, dtype=dt, count=count).reshape(shape)
        except FabricError:
            raise
        except Exception as exc:  # noqa: BLE001 - any malformed payload is one error
            raise FabricError(StatusCode.INVALID_ARGUMENT, f"codec: malformed ndarray ext: {exc}") from None
    if code == EXT_CONTENT_KEY:
        return ContentKey.from_bytes(data)
    if code == EXT_BIGINT:
        if not data:
            raise FabricError(StatusCode.INVALID_ARGUMENT, "codec: empty bigint ext")
        return int.from_bytes(data, "big", signed=True)
    raise FabricError(StatusCode.INVALID_ARGUMENT, f"codec: unknown ext type {code}")


class _Budget:
    """Counts the compound values (arrays, maps, ext values) one decode builds, as msgpack's
    hooks see them; the one past ``limit`` raises RESOURCE_EXHAUSTED, so no more are built."""

    __slots__ = ("left", "limit", "hooks")

    def __init__(self, limit: int) -> None:
        self.left = limit
        self.limit = limit
        self.hooks = {"list_hook": self.take, "object_hook": self.take}

    def take(self, value: Any) -> Any:
        self.left -= 1
        if self.left < 0:
            raise FabricError(
                StatusCode.RESOURCE_EXHAUSTED,
                f"codec: input decodes to more than {self.limit} arrays, maps and ext values",
            )
        return value

    def ext(self, code: int, data: bytes) -> Any:
        self.take(None)
        return _ext_hook(code, data, self.hooks)


def decode(data: bytes | memoryview, *, strict: bool = False, max_compound: int | None = None) -> Any:
    """Inverse of :func:`encode`.

    Malformed input raises ``FabricError(INVALID_ARGUMENT)``.  With
    ``strict=True`` the input must also be the canonical encoding of its value
    (re-encoding gives the same bytes), as wire input and spec vectors must be.

    ``max_compound`` bounds what untrusted bytes may cost: input that decodes to
    more than that many compound values (arrays and maps, those of ndarray ext
    payloads included, and ext values) raises ``FabricError(RESOURCE_EXHAUSTED)``
    as soon as it has built one too many.  Every value takes at least one byte,
    so input of at most ``max_compound`` bytes is decoded without counting.
    """
    try:
        if max_compound is None or (data.nbytes if type(data) is memoryview else len(data)) <= max_compound:
            value = msgpack.unpackb(
                data, raw=False, use_list=True, strict_map_key=True, ext_hook=_ext_hook, timestamp=0
            )
        else:
            budget = _Budget(max_compound)
            value = msgpack.unpackb(
                data, raw=False, use_list=True, strict_map_key=True, ext_hook=budget.ext, timestamp=0, **budget.hooks
            )
    except FabricError:
        raise
    except msgpack.exceptions.StackError:  # raised without a message
        raise FabricError(StatusCode.INVALID_ARGUMENT, "codec: malformed msgpack (arrays and maps nested too deeply)") from None
    except Exception as exc:  # noqa: BLE001 - msgpack raises several types
        raise FabricError(StatusCode.INVALID_ARGUMENT, f"codec: malformed msgpack ({type(exc).__name__}: {exc})") from None
    if strict and not is_canonical_value(value, data):
        raise FabricError(StatusCode.INVALID_ARGUMENT, "codec: input is valid msgpack but not the canonical encoding")
    return value


def is_canonical_value(value: Any, data: bytes | memoryview) -> bool:
    """Whether ``data`` is exactly the canonical encoding of ``value``."""
    try:
        return encode(value) == bytes(data)
    except FabricError:
        return False


def is_canonical(data: bytes | memoryview) -> bool:
    """Whether ``data`` decodes and is the canonical encoding of what it decodes to."""
    try:
        return is_canonical_value(decode(data), data)
    except FabricError:
        return False
