"""Errors and the one retry helper.

``FabricError`` and ``StatusCode`` are defined in :mod:`cassette.errors` (the
lowest layer) and re-exported here.  :func:`retry_call` / :func:`aretry_call` are
the only retry loops in evalfabric: bounded by attempts *and* an overall
deadline, exponential backoff with full jitter, and they retry only a
``FabricError`` that is ``retryable`` and whose code is UNAVAILABLE,
DEADLINE_EXCEEDED or ABORTED.  Anything else (an evaluator's own exception
included) propagates at once, unchanged.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterator, TypeVar

from cassette.errors import RETRYABLE_CODES, FabricError, StatusCode

__all__ = [
    "FabricError",
    "StatusCode",
    "RetryPolicy",
    "DEFAULT_POLICIES",
    "policy_for",
    "is_retryable",
    "retry_call",
    "aretry_call",
    "bounded_wait",
]

T = TypeVar("T")

#: The jitter source when a caller passes no ``rng`` (jitter needs no per-call seed).
_JITTER = random.Random()


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry one operation.

    ``attempts`` counts the first try; ``deadline_s`` bounds the whole operation
    including sleeps; the n-th retry sleeps ``uniform(0, min(max_delay_s,
    base_delay_s * 2**(n-1)))`` (full jitter), never past the deadline.
    """

    attempts: int
    deadline_s: float
    base_delay_s: float = 0.05
    max_delay_s: float = 2.0

    def backoffs(self, rng: random.Random) -> Iterator[float]:
        """The jittered sleeps before retry 1, 2, ... (``attempts - 1`` of them)."""
        for n in range(self.attempts - 1):
            cap = min(self.max_delay_s, self.base_delay_s * (2**n))
            yield rng.uniform(0.0, cap)


#: DESIGN.md defaults: realize 40 s / 3, put 45 s / 2, get 40 s / 3, get_into 40 s / 3.
DEFAULT_POLICIES: dict[str, RetryPolicy] = {
    "realize": RetryPolicy(attempts=3, deadline_s=40.0),
    "put": RetryPolicy(attempts=2, deadline_s=45.0),
    "get": RetryPolicy(attempts=3, deadline_s=40.0),
    "get_into": RetryPolicy(attempts=3, deadline_s=40.0),
}


def policy_for(op: str, policy: RetryPolicy | None = None) -> RetryPolicy:
    """``policy`` if given, else the default for ``op`` (unknown ops: 3 attempts, 40 s)."""
    if policy is not None:
        return policy
    return DEFAULT_POLICIES.get(op, RetryPolicy(attempts=3, deadline_s=40.0))


def is_retryable(exc: BaseException) -> bool:
    """True only for a retryable FabricError with UNAVAILABLE / DEADLINE_EXCEEDED / ABORTED."""
    return isinstance(exc, FabricError) and exc.retryable and exc.status_code in RETRYABLE_CODES


def _count_retry(op: str, exc: FabricError) -> None:
    """Count a retry under the op of the public call taking it (so a ``holders`` call retried
    under the ``get`` policy is ``op="holders"``, as its latency and errors are), else ``op``."""
    from fabric import metrics  # metrics imports prometheus; keep errors importable alone

    metrics.RETRIES.labels(op=metrics.current_op() or op, status=exc.status_code.name).inc()


def retry_call(
    fn: Callable[[], T],
    *,
    op: str = "call",
    policy: RetryPolicy | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Any] = time.sleep,
    rng: random.Random | None = None,
) -> T:
    """Call ``fn()`` until it succeeds, fails for good, or the policy is spent.

    Raises the last error when attempts run out; raises DEADLINE_EXCEEDED
    (wrapping the last error's message) when the next sleep would pass the
    deadline.  ``clock``/``sleep``/``rng`` are injectable for tests.
    """
    pol = policy_for(op, policy)
    rng = rng or _JITTER
    deadline = clock() + pol.deadline_s
    delays = pol.backoffs(rng)
    while True:
        try:
            return fn()
        except FabricError as exc:
            if not is_retryable(exc):
                raise
            delay = next(delays, None)
            if delay is None:
                raise
            if clock() + delay >= deadline:
                raise _deadline_error(op, pol, exc) from exc
            _count_retry(op, exc)
            sleep(delay)


async def aretry_call(
    fn: Callable[[], Awaitable[T]],
    *,
    op: str = "call",
    policy: RetryPolicy | None = None,
    rng: random.Random | None = None,
) -> T:
    """Async twin of :func:`retry_call` under trio.

    The overall deadline is a cancel scope around all attempts and sleeps: when
    it expires the operation is cancelled and DEADLINE_EXCEEDED is raised.
    trio's clock is used, so ``trio.testing.MockClock`` drives it in tests.
    """
    import trio

    pol = policy_for(op, policy)
    rng = rng or _JITTER
    delays = pol.backoffs(rng)
    last: FabricError | None = None
    with trio.move_on_after(pol.deadline_s) as scope:
        while True:
            try:
                return await fn()
            except FabricError as exc:
                if not is_retryable(exc):
                    raise
                delay = next(delays, None)
                if delay is None:
                    raise
                last = exc
                _count_retry(op, exc)
                await trio.sleep(delay)
    assert scope.cancelled_caught
    err = _deadline_error(op, pol, last)
    raise err from last


def _deadline_error(op: str, pol: RetryPolicy, last: FabricError | None) -> FabricError:
    why = f"; last error: {last}" if last is not None else ""
    return FabricError(
        StatusCode.DEADLINE_EXCEEDED,
        f"{op} did not finish within its {pol.deadline_s:g} s deadline{why}",
        retryable=False,
        key=None if last is None else last.key,
    )


@contextlib.contextmanager
def bounded_wait(wait_s: float, what: str, key: Any = None) -> Iterator[None]:
    """Under trio: one wait for the other side of a long transfer, bounded by ``wait_s``.

    If ``wait_s`` passes first, the wait is cancelled and a retryable DEADLINE_EXCEEDED
    ``"<what> did not arrive within <wait_s> s"`` is raised: the per-wait deadline that
    streamed transfers use instead of an overall one (specs/errors.md "Long transfers").
    """
    import trio

    with trio.move_on_after(wait_s) as scope:
        yield
    if scope.cancelled_caught:
        raise FabricError(StatusCode.DEADLINE_EXCEEDED, f"{what} did not arrive within {wait_s:g} s", retryable=True, key=key)


def remaining(deadline: float | None, clock: Callable[[], float] = time.monotonic) -> float:
    """Seconds left until ``deadline`` (``math.inf`` for none), never negative."""
    if deadline is None:
        return math.inf
    return max(0.0, deadline - clock())
