"""FabricError and the one retry helper, on a fake clock."""

from __future__ import annotations

import pickle
import random

import pytest
import trio
import trio.testing
from hypothesis import given, strategies as st

from fabric.errors import (
    DEFAULT_POLICIES,
    FabricError,
    RetryPolicy,
    StatusCode,
    aretry_call,
    is_retryable,
    retry_call,
)
from cassette.keys import ContentKey

GRPC = {
    "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4, "NOT_FOUND": 5, "PERMISSION_DENIED": 7,
    "RESOURCE_EXHAUSTED": 8, "FAILED_PRECONDITION": 9, "ABORTED": 10, "UNIMPLEMENTED": 12,
    "INTERNAL": 13, "UNAVAILABLE": 14, "DATA_LOSS": 15, "UNAUTHENTICATED": 16,
}


def test_status_codes_are_grpc_canonical():
    assert {c.name: c.value for c in StatusCode} == GRPC


def test_error_fields_and_one_line_text():
    k = ContentKey.of("blob", b"x")
    e = FabricError(StatusCode.NOT_FOUND, "no\nsuch   thing", key=k)
    assert (e.status_code, e.retryable, e.key) == (StatusCode.NOT_FOUND, False, k)
    assert str(e) == f"NOT_FOUND: no such thing (key={k})"
    assert "\n" not in str(e)
    assert FabricError("UNAVAILABLE", "x").retryable is True
    assert FabricError(StatusCode.UNAVAILABLE, "x", retryable=False).retryable is False


def test_error_pickles_and_round_trips_the_wire_form():
    e = FabricError(StatusCode.ABORTED, "try again", key="request:" + "0" * 64)
    for back in (pickle.loads(pickle.dumps(e)), FabricError.from_wire(e.to_wire())):
        assert (back.status_code, back.message, back.retryable, back.key) == (e.status_code, e.message, e.retryable, e.key)
    garbage = FabricError.from_wire({"nope": 1})
    assert garbage.status_code is StatusCode.INTERNAL


def test_default_policies_match_design():
    assert {op: (p.deadline_s, p.attempts) for op, p in DEFAULT_POLICIES.items()} == {
        "realize": (40.0, 3), "put": (45.0, 2), "get": (40.0, 3), "get_into": (40.0, 3),
    }


class FakeClock:
    def __init__(self):
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self):
        return self.now

    def sleep(self, s):
        self.sleeps.append(s)
        self.now += s


def _flaky(errors, result="ok"):
    calls = []

    def fn():
        calls.append(1)
        if errors:
            raise errors.pop(0)
        return result

    return fn, calls


@pytest.mark.parametrize("code", ["UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED"])
def test_retries_retryable_codes_until_success(code):
    fc = FakeClock()
    fn, calls = _flaky([FabricError(code, "transient"), FabricError(code, "transient")])
    assert retry_call(fn, op="get", clock=fc.clock, sleep=fc.sleep, rng=random.Random(1)) == "ok"
    assert len(calls) == 3 and len(fc.sleeps) == 2


@pytest.mark.parametrize("code", [c for c in StatusCode if c.name not in ("UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED")])
def test_never_retries_other_codes(code):
    fc = FakeClock()
    fn, calls = _flaky([FabricError(code, "final", retryable=True)])
    with pytest.raises(FabricError) as ei:
        retry_call(fn, op="get", clock=fc.clock, sleep=fc.sleep)
    assert ei.value.status_code is code and len(calls) == 1 and fc.sleeps == []


def test_retryable_false_is_not_retried():
    fn, calls = _flaky([FabricError(StatusCode.UNAVAILABLE, "down", retryable=False)])
    with pytest.raises(FabricError):
        retry_call(fn, op="get", clock=FakeClock().clock, sleep=FakeClock().sleep)
    assert len(calls) == 1


def test_foreign_exceptions_propagate_unchanged():
    def fn():
        raise ZeroDivisionError("evaluator bug")

    with pytest.raises(ZeroDivisionError, match="evaluator bug"):
        retry_call(fn, op="realize", clock=FakeClock().clock, sleep=FakeClock().sleep)


def test_attempts_bound_raises_last_error():
    fc = FakeClock()
    errs = [FabricError(StatusCode.UNAVAILABLE, f"down {i}") for i in range(10)]
    fn, calls = _flaky(errs)
    with pytest.raises(FabricError, match="down 1"):
        retry_call(fn, op="put", clock=fc.clock, sleep=fc.sleep)  # put: 2 attempts
    assert len(calls) == 2


def test_deadline_bound_raises_deadline_exceeded():
    fc = FakeClock()

    def fn():
        fc.now += 30.0  # each attempt takes 30 s of a 40 s budget
        raise FabricError(StatusCode.UNAVAILABLE, "slow peer")

    with pytest.raises(FabricError) as ei:
        retry_call(fn, op="get", clock=fc.clock, sleep=fc.sleep, rng=random.Random(0))
    assert ei.value.status_code is StatusCode.DEADLINE_EXCEEDED
    assert "slow peer" in ei.value.message
    assert fc.now <= 40.0 + 30.0  # never starts an attempt past the deadline


@given(st.integers(1, 8), st.floats(0.001, 1.0), st.floats(0.01, 5.0), st.integers(0, 2**32))
def test_backoff_is_full_jitter_within_exponential_cap(attempts, base, cap, seed):
    pol = RetryPolicy(attempts=attempts, deadline_s=1e9, base_delay_s=base, max_delay_s=cap)
    delays = list(pol.backoffs(random.Random(seed)))
    assert len(delays) == attempts - 1
    for n, d in enumerate(delays):
        assert 0.0 <= d <= min(cap, base * 2**n)


def test_async_retry_on_mock_clock():
    calls = []

    async def fn():
        calls.append(trio.current_time())
        if len(calls) < 3:
            raise FabricError(StatusCode.UNAVAILABLE, "down")
        return "up"

    async def main():
        return await aretry_call(fn, op="realize", rng=random.Random(3))

    assert trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0)) == "up"
    assert len(calls) == 3 and calls[0] < calls[1] < calls[2]


def test_async_deadline_is_a_cancel_scope():
    async def fn():
        await trio.sleep(100)  # hangs past any deadline

    async def main():
        await aretry_call(fn, op="get", policy=RetryPolicy(attempts=3, deadline_s=5.0))

    with pytest.raises(FabricError) as ei:
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert ei.value.status_code is StatusCode.DEADLINE_EXCEEDED


def test_is_retryable():
    assert is_retryable(FabricError(StatusCode.ABORTED, "x"))
    assert not is_retryable(FabricError(StatusCode.DATA_LOSS, "x"))
    assert not is_retryable(ValueError("x"))


def test_bounded_wait_raises_a_retryable_deadline_exceeded_naming_what_did_not_arrive():
    from fabric.errors import bounded_wait

    key = ContentKey.of("blob", b"x")

    async def main():
        with bounded_wait(1.0, "get: chunk 7", key):
            await trio.sleep(0.999)  # in time: nothing raised, nothing cancelled
        t0 = trio.current_time()
        with pytest.raises(FabricError) as ei:
            with bounded_wait(1.0, "get: chunk 8", key):
                await trio.sleep(5)
        assert trio.current_time() - t0 == pytest.approx(1.0)
        return ei.value

    err = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert err.status_code is StatusCode.DEADLINE_EXCEEDED and err.retryable and err.key == key
    assert err.message == "get: chunk 8 did not arrive within 1 s"
