"""ContentKey: the 32-byte BLAKE3 name of a request, a blob or an artifact.

A key is BLAKE3 in ``derive_key`` mode over the canonical bytes of the thing it
names, with one context string per kind, so a request and a blob with equal bytes
never share a key.  Normative text and test vectors: ``specs/content-key.md``.
"""

from __future__ import annotations

from typing import Any

import blake3

from cassette.errors import FabricError, StatusCode

__all__ = ["ContentKey", "KINDS", "CONTEXTS", "derive"]

#: The kinds of key, in the order of their one-byte codes (1, 2, 3).
KINDS = ("request", "blob", "artifact")

#: BLAKE3 derive_key context strings, one per kind (published in specs/content-key.md).
CONTEXTS = {
    "request": "evalfabric 2026-11-23 request key v1",
    "blob": "evalfabric 2026-11-23 blob key v1",
    "artifact": "evalfabric 2026-11-23 artifact manifest key v1",
}

_CODE = {kind: i + 1 for i, kind in enumerate(KINDS)}
_KIND_OF_CODE = {i + 1: kind for i, kind in enumerate(KINDS)}
_HEXDIGITS = frozenset("0123456789abcdef")


# derive_key hashes its context string first; keep one hasher per kind with that
# done and copy it per key (same bytes, a quarter less work for small inputs)
_HASHERS = {kind: blake3.blake3(derive_key_context=ctx) for kind, ctx in CONTEXTS.items()}


def derive(kind: str, material: bytes) -> bytes:
    """The 32-byte BLAKE3 derive_key of ``material`` under ``kind``'s context."""
    base = _HASHERS.get(kind)
    if base is None:
        raise FabricError(StatusCode.INVALID_ARGUMENT, f"content key kind must be one of {', '.join(KINDS)}, got {kind!r}")
    h = base.copy()
    h.update(material)
    return h.digest()


class ContentKey(bytes):
    """Immutable, hashable name of content: a ``kind`` and a 32-byte ``digest``.

    A ContentKey *is* its 33-byte binary form (one kind byte, 1..3 for request,
    blob, artifact, then the digest): ``bytes(key)`` is that form, keys hash,
    compare and order as those bytes, and ``key == bytes(key)``.  The text form
    is ``<kind>:<64 lowercase hex>`` (``str(key)``).
    """

    __slots__ = ()

    def __new__(cls, kind: str, digest: bytes) -> "ContentKey":
        code = _CODE.get(kind)
        if code is None:
            raise FabricError(
                StatusCode.INVALID_ARGUMENT,
                f"content key kind must be one of {', '.join(KINDS)}, got {kind!r}",
            )
        if len(digest) != 32:
            raise FabricError(
                StatusCode.INVALID_ARGUMENT,
                f"content key digest must be 32 bytes, got {len(digest)}",
            )
        return bytes.__new__(cls, _PREFIX[code] + bytes(digest))

    # -- construction -----------------------------------------------------------
    @classmethod
    def of(cls, kind: str, material: bytes) -> "ContentKey":
        """Key of ``material`` (already canonical bytes) under ``kind``."""
        digest = derive(kind, material)  # validates kind
        return _new(cls, _PREFIX[_CODE[kind]] + digest)

    @classmethod
    def for_request(cls, evaluator: str, version: str, args: Any) -> "ContentKey":
        """Key of a request: derive_key(request context, canonical_encode([evaluator, version, args]))."""
        return _new(cls, _REQUEST_PREFIX + derive("request", request_material(evaluator, version, args)))

    @classmethod
    def parse(cls, text: Any) -> "ContentKey":
        """Parse ``<kind>:<64 lowercase hex>``; anything else is INVALID_ARGUMENT."""
        if isinstance(text, ContentKey):
            return text
        if not isinstance(text, str):
            raise FabricError(
                StatusCode.INVALID_ARGUMENT,
                f"content key must be text '<kind>:<64 hex>', got {type(text).__name__}",
            )
        kind, sep, hexpart = text.partition(":")
        if not sep or kind not in _CODE:
            raise FabricError(
                StatusCode.INVALID_ARGUMENT,
                f"content key {text[:80]!r}: expected '<kind>:<64 lowercase hex>' "
                f"with kind one of {', '.join(KINDS)}",
            )
        if len(hexpart) != 64 or not _HEXDIGITS.issuperset(hexpart):
            raise FabricError(
                StatusCode.INVALID_ARGUMENT,
                f"content key {text[:80]!r}: expected 64 lowercase hex digits after '{kind}:'",
            )
        return cls(kind, bytes.fromhex(hexpart))

    @classmethod
    def from_bytes(cls, data: bytes) -> "ContentKey":
        """Inverse of ``bytes(key)``: one kind byte then 32 digest bytes."""
        if len(data) != 33 or data[0] not in _KIND_OF_CODE:
            raise FabricError(
                StatusCode.INVALID_ARGUMENT,
                f"binary content key must be 33 bytes with kind code 1..3, got {bytes(data[:40])!r}",
            )
        return _new(cls, bytes(data))

    # -- forms ------------------------------------------------------------------
    @property
    def kind(self) -> str:
        """``"request"``, ``"blob"`` or ``"artifact"``."""
        return _KIND_OF_CODE[self[0]]

    @property
    def digest(self) -> bytes:
        """The 32-byte BLAKE3 digest."""
        return bytes(self[1:])

    @property
    def hex(self) -> str:  # type: ignore[override]
        """The digest as 64 lowercase hex digits."""
        return self[1:].hex()

    def __str__(self) -> str:
        return f"{_KIND_OF_CODE[self[0]]}:{self[1:].hex()}"

    def __repr__(self) -> str:
        return f"ContentKey('{self}')"

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)

    def short(self) -> str:
        """Abbreviated text form for logs: ``request:1a2b3c4d5e6f``."""
        return f"{_KIND_OF_CODE[self[0]]}:{self[1:7].hex()}"

    def __reduce__(self):
        return (ContentKey.from_bytes, (bytes(self),))

    def __copy__(self) -> "ContentKey":
        return self

    def __deepcopy__(self, memo: Any) -> "ContentKey":
        return self


_new = bytes.__new__
_blake3 = blake3.blake3
_PREFIX = {code: bytes((code,)) for code in _KIND_OF_CODE}
_REQUEST_PREFIX = _PREFIX[_CODE["request"]]


def request_material(evaluator: str, version: str, args: Any) -> bytes:
    """The canonical bytes a request key is derived from: encode([evaluator, version, args])."""
    if not isinstance(evaluator, str) or not evaluator:
        raise FabricError(StatusCode.INVALID_ARGUMENT, f"evaluator: must be a non-empty str, got {evaluator!r}")
    if not isinstance(version, str) or not version:
        raise FabricError(StatusCode.INVALID_ARGUMENT, f"version: must be a non-empty str, got {version!r}")
    return _codec.encode_request(evaluator, version, args)


from cassette import codec as _codec  # noqa: E402  (codec imports ContentKey from here)
