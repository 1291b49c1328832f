"""Unit tests for clickpulse.batcher: size, interval and shutdown flushes of whole deliveries."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import msgspec
import pytest
from aioprometheus import Registry

from clickpulse.batcher import Batcher, EventMailbox
from clickpulse.messages import STOP, Batch, Delivery
from clickpulse.metrics import BatcherMetrics


def now() -> float:
    return asyncio.get_running_loop().time()


def make_delivery(count: int, start: int = 0, received_at: float | None = None) -> Delivery:
    """`count` JSONEachRow rows named e<start>.. e<start+count-1>, as the Receiver would encode them."""
    rows = b"".join(msgspec.json.encode({"event_type": f"e{index}"}) + b"\n" for index in range(start, start + count))
    return Delivery(rows, count, now() if received_at is None else received_at)


def row_names(deliveries: list[Delivery]) -> list[str]:
    return [
        msgspec.json.decode(line)["event_type"]
        for delivery in deliveries
        for line in delivery.rows.splitlines()
    ]


def sizes(batches: list[Batch]) -> list[int]:
    return [batch.count for batch in batches]


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

    @property
    def delivered_names(self) -> list[str]:
        return row_names([delivery for batch in self.batches for delivery in batch.deliveries])


@dataclass
class Harness:
    batcher: Batcher
    writer: FakeWriter
    metrics: BatcherMetrics
    task: asyncio.Task[None]
    sent: list[Delivery] = field(default_factory=list)

    def put(self, count: int, received_at: float | None = None) -> Delivery:
        """Puts the next `count` rows, numbered on from those already put."""
        start = sum(delivery.count for delivery in self.sent)
        delivery = make_delivery(count, start, received_at)
        self.sent.append(delivery)
        self.batcher.put(delivery)
        return delivery

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
        hand_to_writer: Callable[[Batch], Awaitable[None]] | None = None,
        run: bool = True,
    ) -> Harness:
        writer = FakeWriter()
        metrics = BatcherMetrics(Registry())
        batcher = Batcher(
            batch_size=batch_size,
            flush_interval=flush_interval,
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


async def test_flushes_when_the_next_delivery_would_not_fit_and_the_rest_on_stop(start_batcher: MakeHarness) -> None:
    harness = await start_batcher(batch_size=10)
    for count in (4, 3, 3, 4, 2, 5):  # 21 events in six requests
        harness.put(count)

    await harness.writer.wait_for_batches(1)
    await settle()
    # 4+3+3 reaches BATCH_SIZE; 4+2 leaves no room for the 5.
    assert [batch.count for batch in harness.writer.batches] == [10, 6]
    assert [batch.trigger for batch in harness.writer.batches] == ["size", "size"]
    assert harness.batcher.held_events == 5

    await harness.stop()

    assert sizes(harness.writer.batches) == [10, 6, 5]
    assert harness.writer.batches[2].trigger == "shutdown"
    assert harness.writer.delivered_names == row_names(harness.sent)
    assert harness.batcher.held_events == 0


async def test_a_batch_holds_whole_deliveries_never_part_of_one(start_batcher: MakeHarness) -> None:
    harness = await start_batcher(batch_size=10)
    for count in (7, 7, 7, 4):
        harness.put(count)

    await harness.stop()

    assert sizes(harness.writer.batches) == [7, 7, 7, 4]
    assert [len(batch.deliveries) for batch in harness.writer.batches] == [1, 1, 1, 1]
    assert [batch.deliveries[0] for batch in harness.writer.batches] == harness.sent
    assert all(batch.count <= 10 for batch in harness.writer.batches)


async def test_delivery_larger_than_batch_size_is_never_split_but_flushed_alone(start_batcher: MakeHarness) -> None:
    harness = await start_batcher(batch_size=10)
    harness.put(3)
    big = harness.put(35)
    harness.put(2)

    await harness.writer.wait_for_batches(2)
    await harness.stop()

    assert [(batch.count, batch.trigger) for batch in harness.writer.batches] == [(3, "size"), (35, "size"), (2, "shutdown")]
    assert harness.writer.batches[1].deliveries == [big]
    assert harness.writer.delivered_names == row_names(harness.sent)


async def test_exactly_batch_size_events_flush_at_once(start_batcher: MakeHarness) -> None:
    harness = await start_batcher(batch_size=10)

    harness.put(10)
    await harness.writer.wait_for_batches(1)

    assert harness.writer.batches[0].count == 10
    assert harness.writer.batches[0].trigger == "size"
    assert harness.batcher.held_events == 0


async def test_deliveries_adding_up_to_batch_size_flush_at_once(start_batcher: MakeHarness) -> None:
    harness = await start_batcher(batch_size=10)

    harness.put(6)
    harness.put(4)
    await harness.writer.wait_for_batches(1)

    assert [(batch.count, batch.trigger, len(batch.deliveries)) for batch in harness.writer.batches] == [(10, "size", 2)]


async def test_below_batch_size_nothing_is_flushed_before_the_interval(start_batcher: MakeHarness) -> None:
    harness = await start_batcher(batch_size=10, flush_interval=10.0)

    harness.put(9)
    await asyncio.sleep(0.05)

    assert harness.writer.batches == []
    assert harness.batcher.held_events == 9


async def test_a_waiting_mailbox_wakes_only_once_the_events_asked_for_are_there() -> None:
    mailbox = EventMailbox()
    waiting = asyncio.create_task(mailbox.get(deadline=None, wake_at_events=5))
    await settle()

    for _ in range(4):
        mailbox.put(make_delivery(1))
    await settle()
    assert not waiting.done(), "four single events woke a get that asked for five"

    mailbox.put(make_delivery(1))
    await settle()
    first = waiting.result()
    assert isinstance(first, Delivery) and mailbox.events == 4  # the rest are drained without waiting
    assert [await mailbox.get(None) for _ in range(4)] and mailbox.events == 0


async def test_a_stop_wakes_a_mailbox_waiting_for_events() -> None:
    mailbox = EventMailbox()
    waiting = asyncio.create_task(mailbox.get(deadline=None, wake_at_events=1000))
    await settle()
    mailbox.put(make_delivery(1))
    mailbox.put(STOP)
    await settle()
    assert isinstance(waiting.result(), Delivery)


async def test_deliveries_that_did_not_wake_the_batcher_are_in_its_interval_flush(start_batcher: MakeHarness) -> None:
    harness = await start_batcher(batch_size=100, flush_interval=0.1)
    for _ in range(30):
        harness.put(1)
        await asyncio.sleep(0.001)

    await harness.writer.wait_for_batches(1, timeout=1.0)

    assert sizes(harness.writer.batches) == [30]
    assert harness.writer.batches[0].trigger == "interval"
    assert harness.writer.delivered_names == [f"e{index}" for index in range(30)]


async def test_a_delivery_that_fills_the_batch_wakes_the_batcher_before_the_interval(start_batcher: MakeHarness) -> None:
    harness = await start_batcher(batch_size=10, flush_interval=10.0)
    for _ in range(9):
        harness.put(1)
    await settle()
    harness.put(1)

    await harness.writer.wait_for_batches(1, timeout=1.0)

    assert sizes(harness.writer.batches) == [10] and harness.writer.batches[0].trigger == "size"


# -- flush by interval ------------------------------------------------------------------------


async def test_flushes_by_interval(start_batcher: MakeHarness) -> None:
    harness = await start_batcher(batch_size=10, flush_interval=0.05)
    submitted_at = now()

    harness.put(1, received_at=submitted_at)
    await harness.writer.wait_for_batches(1, timeout=1.0)

    batch = harness.writer.batches[0]
    assert batch.trigger == "interval"
    assert batch.count == 1
    assert harness.writer.arrived_at[0] - submitted_at >= 0.05 - 0.005
    assert harness.batcher.held_events == 0


async def test_no_batch_when_idle(start_batcher: MakeHarness) -> None:
    harness = await start_batcher(batch_size=10, flush_interval=0.05)

    await asyncio.sleep(0.2)

    assert harness.writer.batches == []


async def test_no_further_batches_after_an_interval_flush_empties_the_buffer(start_batcher: MakeHarness) -> None:
    harness = await start_batcher(batch_size=10, flush_interval=0.05)

    harness.put(2)
    await harness.writer.wait_for_batches(1)
    await asyncio.sleep(0.2)

    assert len(harness.writer.batches) == 1


async def test_interval_clock_starts_at_the_oldest_buffered_delivery(start_batcher: MakeHarness) -> None:
    harness = await start_batcher(batch_size=100, flush_interval=0.1)
    first_at = now()

    harness.put(1, received_at=first_at)
    await asyncio.sleep(0.03)
    harness.put(1)
    await harness.writer.wait_for_batches(1, timeout=1.0)

    assert len(harness.writer.batches) == 1
    batch = harness.writer.batches[0]
    assert row_names(batch.deliveries) == ["e0", "e1"]
    assert batch.trigger == "interval"
    assert harness.writer.arrived_at[0] - first_at >= 0.1 - 0.005
    assert harness.writer.arrived_at[0] - first_at < 0.1 + 0.03 + 0.1  # not restarted by the second
    assert batch.oldest_received_at == pytest.approx(first_at, abs=0.01)


async def test_interval_clock_counts_from_receipt_not_from_arrival_in_the_batcher(start_batcher: MakeHarness) -> None:
    # A delivery that waited in the Spool or the mailbox is flushed as soon as it is taken in.
    harness = await start_batcher(batch_size=100, flush_interval=5.0)

    harness.put(1, received_at=now() - 10.0)
    await harness.writer.wait_for_batches(1, timeout=0.5)

    assert harness.writer.batches[0].trigger == "interval"


async def test_a_newer_delivery_does_not_postpone_the_flush_of_an_older_one(start_batcher: MakeHarness) -> None:
    # The second delivery claims to have arrived far in the future: were the clock to restart at
    # the newest delivery, nothing would be flushed for a minute.
    harness = await start_batcher(batch_size=100, flush_interval=0.05)
    first_at = now()

    harness.put(1, received_at=first_at)
    harness.put(1, received_at=first_at + 60.0)
    await harness.writer.wait_for_batches(1, timeout=1.0)

    assert row_names(harness.writer.batches[0].deliveries) == ["e0", "e1"]


async def test_interval_clock_restarts_after_a_size_flush(start_batcher: MakeHarness) -> None:
    # After a size flush, the delivery that did not fit starts a new clock of its own.
    harness = await start_batcher(batch_size=10, flush_interval=0.05)

    harness.put(8)
    harness.put(5)
    await harness.writer.wait_for_batches(2, timeout=1.0)

    assert [(batch.count, batch.trigger) for batch in harness.writer.batches] == [(8, "size"), (5, "interval")]


# -- stop -------------------------------------------------------------------------------------


async def test_stop_flushes_everything_with_trigger_shutdown_and_run_returns(start_batcher: MakeHarness) -> None:
    harness = await start_batcher(batch_size=10, flush_interval=10.0)
    harness.put(4)
    harness.put(3)

    await harness.stop()

    assert harness.task.done() and harness.task.exception() is None
    assert [(batch.count, batch.trigger) for batch in harness.writer.batches] == [(7, "shutdown")]
    assert harness.writer.batches[0].deliveries == harness.sent
    assert harness.writer.delivered_names == [f"e{index}" for index in range(7)]
    assert harness.batcher.held_events == 0


async def test_stop_of_an_empty_batcher_produces_no_batch(start_batcher: MakeHarness) -> None:
    harness = await start_batcher()

    await harness.stop()

    assert harness.writer.batches == []


async def test_deliveries_still_in_the_mailbox_at_stop_are_all_delivered(start_batcher: MakeHarness) -> None:
    harness = await start_batcher(batch_size=10, run=False)
    for count in (4, 3, 3, 4, 2):
        harness.put(count)
    assert harness.batcher.held_events == 16
    await harness.batcher.stop()

    async with asyncio.timeout(1.0):
        await harness.batcher.run()

    assert [(batch.count, batch.trigger) for batch in harness.writer.batches] == [(10, "size"), (6, "shutdown")]
    assert harness.writer.delivered_names == row_names(harness.sent)
    assert harness.batcher.held_events == 0


# -- backpressure -----------------------------------------------------------------------------


async def test_a_blocked_writer_stops_the_batcher_and_deliveries_wait_in_the_mailbox(start_batcher: MakeHarness) -> None:
    # What bounds the mailbox is the MemoryLimit upstream; the Batcher's part is not to drain it
    # while the Writer cannot take a batch, and to hand on everything once it can.
    handed: list[Batch] = []
    writer_free = asyncio.Event()

    async def blocked_writer(batch: Batch) -> None:
        handed.append(batch)
        await writer_free.wait()

    harness = await start_batcher(batch_size=10, hand_to_writer=blocked_writer)
    harness.put(10)  # taken by the Batcher, stuck in the writer
    await settle()
    assert len(handed) == 1

    harness.put(6)
    harness.put(7)
    await settle()

    assert len(handed) == 1
    assert harness.batcher.held_events == 13
    harness.batcher.publish_metrics()
    assert harness.metrics.mailbox_events.get({}) == 13

    writer_free.set()
    await harness.stop()

    assert sizes(handed) == [10, 6, 7]
    assert row_names([delivery for batch in handed for delivery in batch.deliveries]) == row_names(harness.sent)


# -- metrics ----------------------------------------------------------------------------------


async def test_metrics_buffer_events_flush_counts_and_batch_size(start_batcher: MakeHarness) -> None:
    harness = await start_batcher(batch_size=10, flush_interval=10.0)
    metrics = harness.metrics
    harness.batcher.publish_metrics()
    assert metrics.buffer_events.get({}) == 0

    for count in (5, 5, 6, 4, 3):
        harness.put(count)
    await harness.writer.wait_for_batches(2)
    await settle()

    assert metrics.batch_flushes.get({"trigger": "size"}) == 2
    assert metrics.batch_size.get({}) == 10
    harness.batcher.publish_metrics()
    assert metrics.buffer_events.get({}) == 3
    harness.batcher.publish_metrics()
    assert metrics.buffered_events.get({}) == 3

    await harness.stop()

    assert metrics.batch_flushes.get({"trigger": "shutdown"}) == 1
    assert metrics.batch_size.get({}) == 3
    harness.batcher.publish_metrics()
    assert metrics.buffer_events.get({}) == 0
    assert metrics.batch_rows.get({})["count"] == 3
    assert metrics.batch_rows.get({})["sum"] == 23


async def test_metrics_count_interval_flushes(start_batcher: MakeHarness) -> None:
    harness = await start_batcher(batch_size=10, flush_interval=0.05)

    harness.put(4)
    await harness.writer.wait_for_batches(1)

    assert harness.metrics.batch_flushes.get({"trigger": "interval"}) == 1
    assert harness.metrics.batch_size.get({}) == 4
    harness.batcher.publish_metrics()
    assert harness.metrics.buffer_events.get({}) == 0


async def test_buffer_events_gauge_counts_the_mailbox_too(start_batcher: MakeHarness) -> None:
    harness = await start_batcher(run=False)

    harness.put(6)
    harness.put(7)

    harness.batcher.publish_metrics()

    assert harness.metrics.buffer_events.get({}) == 13
    harness.batcher.publish_metrics()
    assert harness.metrics.mailbox_events.get({}) == 13
    assert harness.batcher.held_events == 13


async def test_events_that_did_not_wake_the_batcher_count_as_buffered_not_as_waiting(start_batcher: MakeHarness) -> None:
    harness = await start_batcher(batch_size=100, flush_interval=10.0)
    for _ in range(5):
        harness.put(2)
        await settle()

    harness.batcher.publish_metrics()

    assert harness.metrics.mailbox_events.get({}) == 0
    assert harness.metrics.buffered_events.get({}) == 10
    assert harness.metrics.buffer_events.get({}) == 10


async def test_oldest_event_age_is_the_mailbox_head_while_the_buffer_is_empty(start_batcher: MakeHarness) -> None:
    harness = await start_batcher(run=False)
    assert harness.batcher.oldest_event_age() == 0.0

    harness.put(1, received_at=now() - 3.0)
    harness.put(1, received_at=now() - 1.0)

    assert harness.batcher.oldest_event_age() == pytest.approx(3.0, abs=0.1)


async def test_a_whole_batch_put_in_the_mailbox_is_handed_on_as_it_is_after_what_came_before(
    start_batcher: MakeHarness,
) -> None:
    # The spool's batch in flight at a crash, found late: it must reach the Writer with exactly
    # its rows (its deduplication token), neither merged with other deliveries nor split.
    harness = await start_batcher(batch_size=100)
    before = harness.put(2)
    in_flight = Batch([make_delivery(3, 100), make_delivery(1, 103)], "replay")
    harness.batcher.put(in_flight)
    after = harness.put(4)

    await harness.stop()

    assert harness.writer.batches[1] is in_flight
    assert [batch.deliveries for batch in harness.writer.batches] == [[before], in_flight.deliveries, [after]]


async def test_a_batcher_that_dies_answers_every_waiter_it_holds(start_batcher: MakeHarness) -> None:
    # A blocked Writer: the first batch waits in hand_to_writer, later deliveries in the buffer
    # and the mailbox. Cancelled (as when it crashes), the Batcher answers every one of them.
    from clickpulse.messages import PipelineDown

    writer_free = asyncio.Event()

    async def blocked_writer(batch: Batch) -> None:
        await writer_free.wait()

    harness = await start_batcher(batch_size=2, hand_to_writer=blocked_writer)
    loop = asyncio.get_running_loop()
    waiting = []
    for index in range(4):
        delivery = make_delivery(1, start=index)
        delivery.confirmation = loop.create_future()
        waiting.append(delivery.confirmation)
        harness.batcher.put(delivery)
    await settle()

    harness.task.cancel()
    await asyncio.gather(harness.task, return_exceptions=True)

    assert all(isinstance(future.exception(), PipelineDown) for future in waiting[2:])
