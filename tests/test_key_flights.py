"""KeyFlights: one fetch-or-forward per key among a node's trio tasks (fabric.serve)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from cassette.keys import ContentKey
from fabric.errors import FabricError, StatusCode
from fabric.serve import KeyFlights

K1 = ContentKey.of("blob", b"one")
K2 = ContentKey.of("blob", b"two")


@pytest.mark.trio
async def test_concurrent_askers_of_one_key_run_it_once_and_other_keys_run_alongside():
    flights = KeyFlights()
    runs: list[ContentKey] = []
    gate = trio.Event()
    outcomes: list[tuple[bool, object]] = []

    async def work(key: ContentKey) -> str:
        runs.append(key)
        await gate.wait()
        return f"done {key.short()}"

    async def ask(key: ContentKey) -> None:
        outcomes.append(await flights.lead(key, lambda: work(key)))

    async with trio.open_nursery() as nursery:
        for key in (K1, K1, K1, K2):
            nursery.start_soon(ask, key)
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(runs) == sorted([K1, K2]) and len(flights) == 2  # once each; the second key is not held up by the first
        gate.set()
    assert sorted(outcomes, key=repr) == sorted([(True, f"done {K1.short()}"), (False, None), (False, None),
                                                 (True, f"done {K2.short()}")], key=repr)
    assert len(flights) == 0


@pytest.mark.trio
async def test_waiters_get_the_leaders_error_and_the_next_ask_runs_again():
    flights = KeyFlights()
    runs = 0
    gate = trio.Event()

    async def failing() -> None:
        nonlocal runs
        runs += 1
        await gate.wait()
        raise FabricError(StatusCode.UNAVAILABLE, "home unreachable", retryable=True)

    errors: list[FabricError] = []

    async def ask() -> None:
        try:
            await flights.lead(K1, failing)
        except FabricError as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(ask)
        await trio.testing.wait_all_tasks_blocked()
        gate.set()
    assert runs == 1 and [e.status_code for e in errors] == [StatusCode.UNAVAILABLE] * 3
    gate = trio.Event()
    gate.set()
    with pytest.raises(FabricError):
        await flights.lead(K1, failing)
    assert runs == 2  # a failure is not remembered


@pytest.mark.trio
async def test_a_waiter_whose_leader_is_cancelled_runs_it_itself():
    flights = KeyFlights()
    runs = 0

    async def work() -> str:
        nonlocal runs
        runs += 1
        await trio.sleep(0.5 if runs == 1 else 0)
        return "value"

    got: list = []
    async with trio.open_nursery() as nursery:
        leader = trio.CancelScope()

        async def lead() -> None:
            with leader:
                await flights.lead(K1, work)

        async def wait() -> None:
            got.append(await flights.lead(K1, work))

        nursery.start_soon(lead)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(wait)
        await trio.testing.wait_all_tasks_blocked()
        leader.cancel()  # the leader's client went away
    assert got == [(True, "value")] and runs == 2


@pytest.mark.trio
async def test_share_answers_waiters_from_what_was_recorded_or_runs_it_again_when_nothing_is():
    flights = KeyFlights()
    recorded: set = set()
    runs = 0
    gate = trio.Event()

    async def fetch(record: bool) -> str:
        nonlocal runs
        runs += 1
        await gate.wait()
        if record:
            recorded.add(K1)
        return "fetched"

    async def held():
        return "from the cassette" if K1 in recorded else None

    got: list = []

    async def ask(record: bool) -> None:
        got.append(await flights.share(K1, lambda: fetch(record), held))

    async with trio.open_nursery() as nursery:  # the leader records: both waiters answer from it
        for _ in range(3):
            nursery.start_soon(ask, True)
        await trio.testing.wait_all_tasks_blocked()
        gate.set()
    assert runs == 1 and sorted(got) == ["fetched", "from the cassette", "from the cassette"]
    recorded.clear()
    got.clear()
    gate = trio.Event()
    async with trio.open_nursery() as nursery:  # it records nothing here: a waiter takes its own turn
        nursery.start_soon(ask, False)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(ask, False)
        await trio.testing.wait_all_tasks_blocked()
        gate.set()
    assert runs == 3 and got == ["fetched", "fetched"]
