"""Request and Reply: what an agent asks for and what it gets back."""

from __future__ import annotations

from typing import Any

from cassette.errors import FabricError, StatusCode
from cassette.codec import encode_request as _encode_request
from cassette.keys import _HASHERS, ContentKey
from fabric import registry

_new_key = bytes.__new__
_PREFIX = b"\x01"  # the request kind byte (cassette.keys)
_REQUEST_HASHER = _HASHERS["request"]  # derive_key(request context), context already absorbed
_latest_version = registry._latest.get  # registry.latest_version, minus a call (every Request naming no version)

__all__ = ["Request", "Reply", "SOURCES"]

#: Where a reply came from: this node's cassette, a peer's, or a fresh computation.
SOURCES = ("local", "peer", "computed")


class Request:
    """A request to evaluate ``evaluator`` on keyword ``args``.

    ``Request(evaluator, args, version=None)``: with no version, the latest
    locally registered version is used, looked up when the request is made and,
    if the evaluator was not registered then, again when its key is first needed
    (a request for an evaluator only a remote node knows keeps ``version=None``
    and the node resolves it).
    ``req.key`` is the request's :class:`ContentKey`; it is computed on first
    access (bad args raise ``FabricError(INVALID_ARGUMENT)`` naming the path)
    and cached, so do not mutate ``args`` afterwards.
    """

    __slots__ = ("evaluator", "args", "version", "_key")

    def __init__(self, evaluator: str, args: dict | None = None, *, version: Any = None) -> None:
        if not isinstance(evaluator, str) or not evaluator:
            raise FabricError(StatusCode.INVALID_ARGUMENT, f"evaluator: must be a non-empty str, got {evaluator!r}")
        if args is None:
            args = {}
        elif type(args) is not dict:
            raise FabricError(StatusCode.INVALID_ARGUMENT, f"args: must be a dict of keyword arguments, got {type(args).__name__}")
        self.evaluator = evaluator
        self.args = args
        if version is None:
            self.version = _latest_version(evaluator)
        elif type(version) is str and version:
            self.version = version
        else:
            self.version = registry._norm_version(version)
        self._key: ContentKey | None = None

    @property
    def key(self) -> ContentKey:
        """The request's ContentKey (see class docstring)."""
        k = self._key
        if k is None:
            if self.version is None:  # made before its evaluator was registered here: resolve it now
                version = registry.latest_version(self.evaluator)
                if version is None:
                    registry.lookup(self.evaluator)  # raises NOT_FOUND listing what is registered
                self.version = version
            h = _REQUEST_HASHER.copy()
            h.update(_encode_request(self.evaluator, self.version, self.args))
            k = self._key = _new_key(ContentKey, _PREFIX + h.digest())
        return k

    def to_wire(self) -> dict:
        """The request as a plain map (evaluator, version or None, args)."""
        return {"evaluator": self.evaluator, "version": self.version, "args": self.args}

    def __repr__(self) -> str:
        return f"Request({self.evaluator!r}, version={self.version!r}, args=<{len(self.args)} args>)"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Request):
            return NotImplemented
        return self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)


class Reply:
    """The answer to a request.

    ``value`` (decoded; numpy arrays come back as read-only numpy arrays, tuples
    as lists), ``key`` (the request's ContentKey), ``source`` and ``holder`` (id of
    the node that served it).  ``source``: ``"computed"`` for the one call an
    evaluator run answered (so "computed" replies count evaluator runs), ``"local"``
    when the serving node's cassette held it (also for a call that waited on an
    identical in-flight computation), ``"peer"`` when the serving node got it from
    another node.
    """

    __slots__ = ("key", "value", "source", "holder")

    def __init__(self, key: ContentKey, value: Any, source: str, holder: str) -> None:
        self.key = key
        self.value = value
        self.source = source
        self.holder = holder

    def __repr__(self) -> str:
        return f"Reply(key={self.key.short()}, source={self.source!r}, holder={self.holder!r})"
