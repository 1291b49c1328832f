"""Unit tests for clickpulse.batcher: size, interval and shutdown flushes, the bounded mailbox."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone

import pytest
from aioprometheus import Registry

from clickpulse.batcher import Batch, Batcher
from clickpulse.events import Event
from clickpulse.metrics import BatcherMetrics

CREATED_AT = datetime(2024, 1, 1, tzinfo=timezone.utc)


def make_events(count: int, start: int = 0) -> list[Event]:
    return [Event(event_type=f"e{index}", source="test", created_at=CREATED_AT) for index in range(start, start + count)]


def names(events: list[Event]) -> list[str]:
    return [event.event_type for event in events]


def now() -> float:
    return asyncio.get_running_loop().time()


@dataclass
class FakeWriter:
    """Stands in for Writer.submit: records each batch and the loop time it arrived."""

    batches: list[Batch] = field(default_factory=list)
    arrived_at: list[float] = field(default_factory=list)
    arrival: asyncio.Event = field(default_factory=asyncio.Event)

    async def hand_to_writer(self, batch: Batch) -> None:
        self.batches.append(batch)
        self.arrived_at.append(now())
        self.arrival.set()

    async def wait_for_batches(self, count: int, timeout: float = 1.0) -> None:
        async with asyncio.timeout(timeout):
            while len(self.batches) < count:
                self.arrival.clear()
                await self.arrival.wait()


@dataclass
class Harness:
    batcher: Batcher
    writer: FakeWriter
    metrics: BatcherMetrics
    task: asyncio.Task[None]

    async def submit(self, events: list[Event], wait: float = 0.05) -> bool:
        return await self.batcher.submit(events, now(), wait)

    async def stop(self) -> None:
        await self.batcher.stop()
        async with asyncio.timeout(1.0):
            await self.task


MakeHarness = Callable[..., Awaitable[Harness]]


@pytest.fixture
async def start_batcher() -> AsyncIterator[MakeHarness]:
    tasks: list[asyncio.Task[None]] = []

    async def start(
        *,
        batch_size: int = 10,
        flush_interval: float = 10.0,
        capacity_events: int = 1000,
        hand_to_writer: Callable[[Batch], Awaitable[None]] | None = None,
        run: bool = True,
    ) -> Harness:
        writer = FakeWriter()
        metrics = BatcherMetrics(Registry())
        batcher = Batcher(
            batch_size=batch_size,
            flush_interval=flush_interval,
            capacity_events=capacity_events,
            hand_to_writer=hand_to_writer or writer.hand_to_writer,
            metrics=metrics,
        )
        task = asyncio.create_task(batcher.run()) if run else asyncio.create_task(asyncio.sleep(0))
        tasks.append(task)
        return Harness(batcher, writer, metrics, task)

    yield start
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def settle() -> None:
    """Lets the Batcher task take everything from its mailbox (no timers involved)."""
    for _ in range(10):
        await asyncio.sleep(0)


# -- flush by size ----------------------------------------------------------------------------


async def test_flushes_full_batches_by_size_and_the_rest_on_stop(start_batcher: MakeHarness) -> None:
    harness = await start_batcher(batch_size=10)
    sent: list[Event] = []
    for count in (7, 7, 7, 4):  # 25 events in four requests
        events = make_events(count, start=len(sent))
        sent += events
        assert await harness.submit(events)

    await harness.writer.wait_for_batches(2)
    await settle()
    assert [len(batch.events) for batch in harness.writer.batches] == [10, 10]
    assert [batch.trigger for batch in harness.writer.batches] == ["size", "size"]
    assert harness.batcher.held_events == 5

    await harness.stop()

    assert [len(batch.events) for batch in harness.writer.batches] == [10, 10, 5]
    assert harness.writer.batches[2].trigger == "shutdown"
    delivered = [event for batch in harness.writer.batches for event in batch.events]
    assert names(delivered) == names(sent)
    assert harness.batcher.held_events == 0


async def test_single_delivery_larger_than_batch_size_is_split(start_batcher: MakeHarness) -> None:
    harness = await start_batcher(batch_size=10)
    events = make_events(35)

    assert await harness.submit(events)
    await harness.writer.wait_for_batches(3)

    assert [len(batch.events) for batch in harness.writer.batches] == [10, 10, 10]
    assert all(batch.trigger == "size" for batch in harness.writer.batches)
    await harness.stop()
    assert [len(batch.events) for batch in harness.writer.batches] == [10, 10, 10, 5]
    assert names([event for batch in harness.writer.batches for event in batch.events]) == names(events)


async def test_exactly_batch_size_events_flush_at_once(start_batcher: MakeHarness) -> None:
    harness = await start_batcher(batch_size=10)

    assert await harness.submit(make_events(10))
    await harness.writer.wait_for_batches(1)

    assert len(harness.writer.batches[0].events) == 10
    assert harness.writer.batches[0].trigger == "size"
    assert harness.batcher.held_events == 0


async def test_below_batch_size_nothing_is_flushed_before_the_interval(start_batcher: MakeHarness) -> None:
    harness = await start_batcher(batch_size=10, flush_interval=10.0)

    assert await harness.submit(make_events(9))
    await asyncio.sleep(0.05)

    assert harness.writer.batches == []
    assert harness.batcher.held_events == 9


# -- flush by interval ------------------------------------------------------------------------


async def test_flushes_by_interval(start_batcher: MakeHarness) -> None:
    harness = await start_batcher(batch_size=10, flush_interval=0.05)
    submitted_at = now()

    assert await harness.submit(make_events(1))
    await harness.writer.wait_for_batches(1, timeout=1.0)

    batch = harness.writer.batches[0]
    assert batch.trigger == "interval"
    assert len(batch.events) == 1
    assert harness.writer.arrived_at[0] - submitted_at >= 0.05 - 0.005
    assert harness.batcher.held_events == 0


async def test_no_batch_when_idle(start_batcher: MakeHarness) -> None:
    harness = await start_batcher(batch_size=10, flush_interval=0.05)

    await asyncio.sleep(0.2)

    assert harness.writer.batches == []


async def test_no_further_batches_after_an_interval_flush_empties_the_buffer(start_batcher: MakeHarness) -> None:
    harness = await start_batcher(batch_size=10, flush_interval=0.05)

    assert await harness.submit(make_events(2))
    await harness.writer.wait_for_batches(1)
    await asyncio.sleep(0.2)

    assert len(harness.writer.batches) == 1


async def test_interval_clock_starts_at_the_oldest_buffered_event(start_batcher: MakeHarness) -> None:
    harness = await start_batcher(batch_size=100, flush_interval=0.1)
    first_at = now()

    assert await harness.submit(make_events(1, start=0))
    await asyncio.sleep(0.03)
    assert await harness.submit(make_events(1, start=1))
    await harness.writer.wait_for_batches(1, timeout=1.0)

    assert len(harness.writer.batches) == 1
    batch = harness.writer.batches[0]
    assert names(batch.events) == ["e0", "e1"]
    assert batch.trigger == "interval"
    assert harness.writer.arrived_at[0] - first_at >= 0.1 - 0.005
    assert batch.oldest_received_at == pytest.approx(first_at, abs=0.01)


async def test_a_newer_event_does_not_postpone_the_flush_of_an_older_one(start_batcher: MakeHarness) -> None:
    # The second delivery claims to have arrived far in the future: were the clock to restart at
    # the newest event, nothing would be flushed for a minute.
    harness = await start_batcher(batch_size=100, flush_interval=0.05)
    first_at = now()

    assert await harness.batcher.submit(make_events(1, start=0), first_at, 0.05)
    assert await harness.batcher.submit(make_events(1, start=1), first_at + 60.0, 0.05)
    await harness.writer.wait_for_batches(1, timeout=1.0)

    assert names(harness.writer.batches[0].events) == ["e0", "e1"]


async def test_interval_clock_restarts_after_a_size_flush(start_batcher: MakeHarness) -> None:
    # After a size flush leaves events behind, their own age decides the next interval flush.
    harness = await start_batcher(batch_size=10, flush_interval=0.05)

    assert await harness.submit(make_events(13))
    await harness.writer.wait_for_batches(2, timeout=1.0)

    assert [(len(batch.events), batch.trigger) for batch in harness.writer.batches] == [(10, "size"), (3, "interval")]


# -- stop -------------------------------------------------------------------------------------


async def test_stop_flushes_everything_with_trigger_shutdown_and_run_returns(start_batcher: MakeHarness) -> None:
    harness = await start_batcher(batch_size=10, flush_interval=10.0)
    assert await harness.submit(make_events(4))
    assert await harness.submit(make_events(3, start=4))

    await harness.stop()

    assert harness.task.done() and harness.task.exception() is None
    assert [(len(batch.events), batch.trigger) for batch in harness.writer.batches] == [(7, "shutdown")]
    assert names(harness.writer.batches[0].events) == [f"e{index}" for index in range(7)]
    assert harness.batcher.held_events == 0


async def test_stop_of_an_empty_batcher_produces_no_batch(start_batcher: MakeHarness) -> None:
    harness = await start_batcher()

    await harness.stop()

    assert harness.writer.batches == []


async def test_events_still_in_the_mailbox_at_stop_are_all_delivered(start_batcher: MakeHarness) -> None:
    harness = await start_batcher(batch_size=10, run=False)
    assert await harness.submit(make_events(25))
    await harness.batcher.stop()

    async with asyncio.timeout(1.0):
        await harness.batcher.run()

    assert [len(batch.events) for batch in harness.writer.batches] == [10, 10, 5]
    assert harness.writer.batches[-1].trigger == "shutdown"
    assert harness.batcher.held_events == 0


# -- mailbox capacity -------------------------------------------------------------------------


async def test_submit_beyond_capacity_returns_false_after_the_wait(start_batcher: MakeHarness) -> None:
    handed: list[Batch] = []

    async def blocked_writer(batch: Batch) -> None:
        handed.append(batch)
        await asyncio.Event().wait()  # ClickHouse never answers

    harness = await start_batcher(batch_size=10, capacity_events=20, hand_to_writer=blocked_writer)
    assert await harness.submit(make_events(10))  # taken by the Batcher, stuck in the writer
    await settle()
    assert len(handed) == 1

    assert await harness.submit(make_events(15))
    assert await harness.submit(make_events(5))  # mailbox now holds exactly its capacity
    started = now()
    assert await harness.submit(make_events(1), wait=0.05) is False
    assert now() - started >= 0.05 - 0.005
    assert harness.batcher.held_events == 20


async def test_delivery_larger_than_capacity_is_refused_at_once(start_batcher: MakeHarness) -> None:
    harness = await start_batcher(capacity_events=20, run=False)
    started = now()

    assert await harness.submit(make_events(21), wait=1.0) is False
    assert now() - started < 0.5


async def test_waiting_submit_succeeds_when_room_appears(start_batcher: MakeHarness) -> None:
    harness = await start_batcher(batch_size=10, capacity_events=10, run=False)
    assert await harness.submit(make_events(10))

    waiting = asyncio.create_task(harness.submit(make_events(5, start=10), wait=1.0))
    await settle()
    assert not waiting.done()
    run = asyncio.create_task(harness.batcher.run())  # starts draining the mailbox

    assert await waiting is True
    await harness.batcher.stop()
    async with asyncio.timeout(1.0):
        await run
    delivered = [event for batch in harness.writer.batches for event in batch.events]
    assert names(delivered) == [f"e{index}" for index in range(15)]


# -- metrics ----------------------------------------------------------------------------------


async def test_metrics_buffer_events_flush_counts_and_batch_size(start_batcher: MakeHarness) -> None:
    harness = await start_batcher(batch_size=10, flush_interval=10.0, capacity_events=500)
    metrics = harness.metrics
    assert metrics.buffer_events.get({}) == 0
    assert metrics.buffer_capacity_events.get({}) == 500

    assert await harness.submit(make_events(23))
    await harness.writer.wait_for_batches(2)
    await settle()

    assert metrics.batch_flushes.get({"trigger": "size"}) == 2
    assert metrics.batch_size.get({}) == 10
    assert metrics.buffer_events.get({}) == 3

    await harness.stop()

    assert metrics.batch_flushes.get({"trigger": "shutdown"}) == 1
    assert metrics.batch_size.get({}) == 3
    assert metrics.buffer_events.get({}) == 0
    assert metrics.batch_rows.get({})["count"] == 3
    assert metrics.batch_rows.get({})["sum"] == 23


async def test_metrics_count_interval_flushes(start_batcher: MakeHarness) -> None:
    harness = await start_batcher(batch_size=10, flush_interval=0.05)

    assert await harness.submit(make_events(4))
    await harness.writer.wait_for_batches(1)

    assert harness.metrics.batch_flushes.get({"trigger": "interval"}) == 1
    assert harness.metrics.batch_size.get({}) == 4
    assert harness.metrics.buffer_events.get({}) == 0


async def test_buffer_events_gauge_counts_the_mailbox_too(start_batcher: MakeHarness) -> None:
    harness = await start_batcher(capacity_events=100, run=False)

    assert await harness.submit(make_events(6))
    assert await harness.submit(make_events(7))

    assert harness.metrics.buffer_events.get({}) == 13
    assert harness.batcher.held_events == 13
