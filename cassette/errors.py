"""The one error type of evalfabric.

It lives in the lowest layer (``cassette``) so every layer above raises the same
type; ``fabric.errors`` re-exports it together with the retry helper.

A :class:`FabricError` carries a :class:`StatusCode` whose ``.name`` is gRPC's
canonical name and whose ``.value`` is gRPC's number, a one-line message, a
``retryable`` hint and, where one applies, the :class:`~cassette.keys.ContentKey`
it is about.
"""

from __future__ import annotations

import enum
from typing import Any

__all__ = ["StatusCode", "FabricError", "RETRYABLE_CODES"]


class StatusCode(enum.IntEnum):
    """gRPC canonical status codes used by evalfabric (numbers as in gRPC)."""

    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


#: Codes that may clear with time; only these are ever retried.
RETRYABLE_CODES = frozenset(
    {StatusCode.UNAVAILABLE, StatusCode.DEADLINE_EXCEEDED, StatusCode.ABORTED}
)


class FabricError(Exception):
    """An evalfabric failure with a gRPC-style status.

    ``FabricError(status_code, message, retryable=None, key=None)``.  When
    ``retryable`` is omitted it is true exactly for UNAVAILABLE,
    DEADLINE_EXCEEDED and ABORTED.  ``str(err)`` is one line:
    ``"NOT_FOUND: no evaluator 'x' (key=request:ab12...)"``.
    """

    __slots__ = ("status_code", "message", "retryable", "key")

    def __init__(
        self,
        status_code: StatusCode | str | int,
        message: str,
        retryable: bool | None = None,
        key: Any = None,
    ) -> None:
        code = _as_code(status_code)
        self.status_code = code
        # messages are one line, always
        self.message = " ".join(str(message).split())
        self.retryable = (code in RETRYABLE_CODES) if retryable is None else bool(retryable)
        self.key = key
        super().__init__(self.status_code, self.message)

    @property
    def code(self) -> StatusCode:
        """Alias of :attr:`status_code`."""
        return self.status_code

    def __str__(self) -> str:
        text = f"{self.status_code.name}: {self.message}"
        if self.key is not None:
            text += f" (key={self.key})"
        return text

    def __repr__(self) -> str:
        return (
            f"FabricError({self.status_code.name}, {self.message!r}, "
            f"retryable={self.retryable}, key={self.key!r})"
        )

    def __reduce__(self):  # picklable across processes
        return (FabricError, (int(self.status_code), self.message, self.retryable, self.key))

    def to_wire(self) -> dict:
        """The error as a plain map (for frames and logs): code name, message, retryable, key text."""
        return {
            "code": self.status_code.name,
            "message": self.message,
            "retryable": self.retryable,
            "key": None if self.key is None else str(self.key),
        }

    @classmethod
    def from_wire(cls, m: Any) -> "FabricError":
        """Inverse of :meth:`to_wire`; a malformed map becomes INTERNAL, never a crash."""
        try:
            return cls(m["code"], m["message"], bool(m["retryable"]), m.get("key"))
        except Exception:  # noqa: BLE001 - a peer's garbage must not escape as another type
            return cls(StatusCode.INTERNAL, f"malformed error from peer: {m!r:.200}")


def _as_code(code: StatusCode | str | int) -> StatusCode:
    if isinstance(code, StatusCode):
        return code
    if isinstance(code, str):
        try:
            return StatusCode[code]
        except KeyError:
            raise ValueError(f"unknown status code name {code!r}") from None
    return StatusCode(int(code))
