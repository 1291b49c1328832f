"""Unit tests for clickpulse.memory_limit: one counter of events held in memory, MAX_BUFFER_EVENTS."""

from __future__ import annotations

import asyncio

import pytest

from clickpulse.memory_limit import MemoryLimit


def now() -> float:
    return asyncio.get_running_loop().time()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


# -- try_reserve and release ------------------------------------------------------------------


def test_try_reserve_takes_room_up_to_the_capacity_and_no_further() -> None:
    memory = MemoryLimit(10, 1 << 30)

    assert memory.try_reserve(4, 0)
    assert memory.try_reserve(6, 0)  # exactly full
    assert memory.held == 10
    assert memory.fill_ratio == 1.0

    assert not memory.try_reserve(1, 0)
    assert memory.held == 10  # a refused reservation takes nothing


def test_release_gives_room_back() -> None:
    memory = MemoryLimit(10, 1 << 30)
    assert memory.try_reserve(10, 0)

    memory.release(3, 0)

    assert memory.held == 7
    assert memory.fill_ratio == pytest.approx(0.7)
    assert not memory.try_reserve(4, 0)
    assert memory.try_reserve(3, 0)


def test_reservation_larger_than_the_capacity_is_let_in_when_nothing_is_held() -> None:
    memory = MemoryLimit(10, 1 << 30)

    assert memory.try_reserve(25, 0)

    assert memory.held == 25
    assert not memory.try_reserve(1, 0)  # nothing more until it is released
    memory.release(25, 0)
    assert memory.try_reserve(1, 0)


def test_reservation_larger_than_the_capacity_waits_while_anything_is_held() -> None:
    memory = MemoryLimit(10, 1 << 30)
    assert memory.try_reserve(1, 0)

    assert not memory.try_reserve(25, 0)
    assert memory.held == 1


def test_held_follows_every_reservation_and_release() -> None:
    memory = MemoryLimit(10, 1 << 30)
    seen = []
    for step in (lambda: memory.try_reserve(4, 0), lambda: memory.try_reserve(20, 0), lambda: memory.try_reserve(5, 0),
                 lambda: memory.release(9, 0)):
        step()
        seen.append(memory.held)

    assert seen == [4, 4, 9, 0]  # the refused reservation changed nothing


# -- reserve with a timeout -------------------------------------------------------------------


async def test_reserve_with_room_returns_at_once() -> None:
    memory = MemoryLimit(10, 1 << 30)

    async with asyncio.timeout(0.1):
        assert await memory.reserve(10, 0, timeout=5.0)

    assert memory.held == 10


async def test_reserve_gives_up_after_the_timeout_and_takes_nothing() -> None:
    memory = MemoryLimit(10, 1 << 30)
    assert memory.try_reserve(8, 0)
    started = now()

    assert await memory.reserve(3, 0, timeout=0.05) is False

    assert now() - started >= 0.05 - 0.005
    assert memory.held == 8


async def test_a_release_too_small_for_the_waiter_does_not_let_it_in() -> None:
    memory = MemoryLimit(10, 1 << 30)
    assert memory.try_reserve(10, 0)
    waiting = asyncio.create_task(memory.reserve(5, 0, timeout=0.1))
    await settle()

    memory.release(2, 0)

    assert await waiting is False
    assert memory.held == 8


async def test_waiter_wakes_on_release_and_takes_its_room() -> None:
    memory = MemoryLimit(10, 1 << 30)
    assert memory.try_reserve(10, 0)
    waiting = asyncio.create_task(memory.reserve(4, 0, timeout=1.0))
    await settle()
    assert not waiting.done()

    memory.release(4, 0)

    async with asyncio.timeout(0.1):
        assert await waiting is True
    assert memory.held == 10


async def test_reserve_without_timeout_waits_as_long_as_it_takes() -> None:
    memory = MemoryLimit(10, 1 << 30)
    assert memory.try_reserve(10, 0)
    waiting = asyncio.create_task(memory.reserve(10, 0, timeout=None))
    await asyncio.sleep(0.05)
    assert not waiting.done()

    memory.release(10, 0)

    async with asyncio.timeout(0.1):
        assert await waiting is True
    assert memory.held == 10


async def test_every_waiter_that_fits_wakes_on_one_release() -> None:
    memory = MemoryLimit(10, 1 << 30)
    assert memory.try_reserve(10, 0)
    waiters = [asyncio.create_task(memory.reserve(3, 0, timeout=1.0)) for _ in range(3)]
    await settle()

    memory.release(10, 0)

    async with asyncio.timeout(0.2):
        assert await asyncio.gather(*waiters) == [True, True, True]
    assert memory.held == 9


async def test_waiters_that_do_not_fit_keep_waiting_for_the_next_release() -> None:
    memory = MemoryLimit(10, 1 << 30)
    assert memory.try_reserve(10, 0)
    first = asyncio.create_task(memory.reserve(6, 0, timeout=1.0))
    second = asyncio.create_task(memory.reserve(6, 0, timeout=1.0))
    await settle()

    memory.release(10, 0)
    await settle()
    assert [first.done(), second.done()].count(True) == 1  # only one of them fits
    assert memory.held == 6

    memory.release(6, 0)

    async with asyncio.timeout(0.2):
        assert await asyncio.gather(first, second) == [True, True]
    assert memory.held == 6


async def test_waiter_larger_than_the_capacity_gets_in_once_everything_is_released() -> None:
    memory = MemoryLimit(10, 1 << 30)
    assert memory.try_reserve(3, 0)
    waiting = asyncio.create_task(memory.reserve(50, 0, timeout=1.0))
    await settle()
    assert not waiting.done()

    memory.release(3, 0)

    async with asyncio.timeout(0.1):
        assert await waiting is True
    assert memory.held == 50


def test_bytes_limit_refuses_like_the_event_limit() -> None:
    memory = MemoryLimit(100, 1000)
    assert memory.try_reserve(1, 700)
    assert not memory.try_reserve(1, 400)  # 1 + 1 events fit, 1100 bytes do not
    assert memory.try_reserve(1, 300)  # exactly full
    assert memory.fill_ratio == 1.0
    memory.release(2, 1000)
    assert (memory.held, memory.held_bytes) == (0, 0)


def test_a_reservation_larger_than_the_byte_capacity_is_let_in_alone() -> None:
    memory = MemoryLimit(100, 1000)
    assert memory.try_reserve(1, 5000)
    assert not memory.try_reserve(1, 1)
    memory.release(1, 5000)
    assert memory.try_reserve(1, 1)
