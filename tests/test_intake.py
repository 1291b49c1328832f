"""The memory intake: the intake port and the Writer's ledger when there is no spool."""

from __future__ import annotations

import asyncio

import pytest

from clickpulse.intake import MemoryIntake
from clickpulse.memory_limit import MemoryLimit
from clickpulse.messages import Batch, Delivery, Refused


def make_intake(capacity: int = 10, enqueue_wait: float = 0.05) -> tuple[MemoryIntake, MemoryLimit, list[Delivery]]:
    memory = MemoryLimit(capacity, 1 << 30)
    delivered: list[Delivery] = []
    return MemoryIntake(memory=memory, to_batcher=delivered.append, enqueue_wait=enqueue_wait), memory, delivered


async def test_accept_reserves_the_events_and_puts_one_delivery_in_the_batchers_mailbox() -> None:
    intake, memory, delivered = make_intake()
    confirmation: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    await intake.accept(b"{}\n{}\n", 2, 12.5, durable=False, confirmation=confirmation)

    assert memory.held == 2
    [delivery] = delivered
    assert (delivery.rows, delivery.count, delivery.received_at, delivery.position) == (b"{}\n{}\n", 2, 12.5, None)
    assert delivery.confirmation is confirmation


async def test_a_full_memory_limit_is_refused_as_overloaded_after_the_wait_and_reserves_nothing() -> None:
    intake, memory, delivered = make_intake(capacity=3)
    assert memory.try_reserve(2, 0)

    with pytest.raises(Refused, match="MAX_BUFFER_EVENTS") as refusal:
        await intake.accept(b"{}\n{}\n", 2, 0.0, durable=False, confirmation=None)

    assert refusal.value.reason == "overloaded" and refusal.value.retry_after > 0
    assert memory.held == 2 and delivered == []


async def test_after_insert_releases_the_batchs_reservation() -> None:
    intake, memory, delivered = make_intake()
    await intake.accept(b"{}\n", 1, 0.0, durable=False, confirmation=None)
    await intake.accept(b"{}\n{}\n", 2, 0.0, durable=False, confirmation=None)

    batch = Batch(delivered, "size")
    await intake.before_insert(batch)
    assert memory.held == 3
    await intake.after_insert(batch)

    assert memory.held == 0


async def test_not_ready_from_nine_tenths_full_and_nothing_survives_the_process() -> None:
    intake, memory, _ = make_intake(capacity=10)
    assert not intake.keeps_unwritten and not intake.takes_durable
    assert memory.try_reserve(8, 0)
    assert intake.not_ready_reason() is None

    assert memory.try_reserve(1, 0)

    assert intake.not_ready_reason() == "buffer 90% full (MAX_BUFFER_EVENTS=10)"


async def test_bytes_are_a_limit_of_their_own() -> None:
    # A few huge events: far below MAX_BUFFER_EVENTS, but their rows fill MAX_BUFFER_BYTES.
    memory = MemoryLimit(1000, 1000)
    delivered: list[Delivery] = []
    intake = MemoryIntake(memory=memory, to_batcher=delivered.append, enqueue_wait=0.01)
    await intake.accept(b"x" * 600, 1, 0.0, durable=False, confirmation=None)

    with pytest.raises(Refused, match="MAX_BUFFER_BYTES"):
        await intake.accept(b"y" * 500, 1, 0.0, durable=False, confirmation=None)
    await intake.accept(b"z" * 300, 1, 0.0, durable=False, confirmation=None)

    assert (memory.held, memory.held_bytes) == (2, 900)
    assert intake.not_ready_reason() == "buffer 90% full (MAX_BUFFER_BYTES=1000)"
    await intake.after_insert(Batch(delivered, "size"))
    assert (memory.held, memory.held_bytes) == (0, 0)
