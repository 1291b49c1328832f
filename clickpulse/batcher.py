"""The Batcher actor: the one owner of buffered events.

Each request's events arrive in its mailbox as one Delivery (from the Receiver, or from the
Spool in log order). Its `run()` task moves them into the buffer and hands whole batches to the
Writer when the next delivery would not fit in BATCH_SIZE, when the oldest buffered event has
waited FLUSH_INTERVAL, and on shutdown. A batch holds whole requests, never part of one, so that
a replayed batch can be rebuilt exactly from the spool.

Handing a batch over waits while the Writer's mailbox is full, so a slow ClickHouse stops this
task from draining its mailbox. What bounds the mailbox is MAX_BUFFER_EVENTS (MemoryLimit): a
delivery is put in only after its events were reserved there, and they are released only when
ClickHouse confirmed them. That wait is the backpressure that reaches the Receiver as 503.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable

from clickpulse.messages import STOP, Batch, Delivery, PipelineDown, Stop, fail_waiter
from clickpulse.metrics import BatcherMetrics, FlushCause

log = logging.getLogger("clickpulse.batcher")


class EventMailbox:
    """The Batcher's mailbox: Deliveries in arrival order, with a count of their events.

    A waiting `get` is woken only once as many events wait as it asked for (or by a Batch or
    Stop), not by every delivery: while the Batcher holds a partial batch it has nothing to do
    before the batch fills or its deadline passes, and a task switch per single-event request
    was a tenth of the request's cost. What it is woken for it then drains in arrival order."""

    def __init__(self) -> None:
        self._messages: collections.deque[Delivery | Batch | Stop] = collections.deque()
        self._events = 0
        self._arrival: asyncio.Future[None] | None = None
        self._wake_at_events = 1
        self._loop: asyncio.AbstractEventLoop | None = None  # the Batcher's, known at its first wait

    @property
    def events(self) -> int:
        return self._events

    @property
    def waited_on(self) -> bool:
        """Whether the Batcher sleeps in `get`: what waits here then waits to fill its batch,
        not for a busy Batcher."""
        return self._arrival is not None

    @property
    def oldest_received_at(self) -> float | None:
        """When the oldest waiting delivery was received (event-loop clock); None when there is none."""
        return next((message.received_at for message in self._messages if isinstance(message, Delivery)), None)

    def put(self, message: Delivery | Batch | Stop) -> None:
        self._messages.append(message)
        if isinstance(message, Delivery):
            self._events += message.count
            if self._events < self._wake_at_events:
                return
        if self._arrival is not None and not self._arrival.done():
            self._arrival.set_result(None)

    async def get(self, deadline: float | None, wake_at_events: int = 1) -> Delivery | Batch | Stop | None:
        """The next message, or None once the event-loop clock passes `deadline`. When none is
        waiting, sleeps until `wake_at_events` events (or any Batch or Stop) are, or `deadline`."""
        if not self._messages:
            self._wake_at_events = max(1, wake_at_events)
            # Cached: on Python 3.11 every get_running_loop() is a getpid() system call.
            loop = self._loop
            if loop is None:
                loop = self._loop = asyncio.get_running_loop()
            self._arrival = loop.create_future()
            timer = None if deadline is None else loop.call_at(deadline, self._expire, self._arrival)
            try:
                await self._arrival
            finally:
                if timer is not None:
                    timer.cancel()
                self._arrival = None
                self._wake_at_events = 1
            if not self._messages:
                return None
        message = self._messages.popleft()
        if isinstance(message, Delivery):
            self._events -= message.count
        return message

    def fail_waiters(self, error: BaseException) -> None:
        for message in self._messages:
            if isinstance(message, Delivery):
                fail_waiter(message.confirmation, error)
            elif isinstance(message, Batch):
                message.fail(error)

    @staticmethod
    def _expire(arrival: asyncio.Future[None]) -> None:
        if not arrival.done():
            arrival.set_result(None)


class Batcher:
    """Owns the buffer. Talk to it only through `put()` and `stop()`."""

    def __init__(
        self,
        *,
        batch_size: int,
        flush_interval: float,
        hand_to_writer: Callable[[Batch], Awaitable[None]],
        metrics: BatcherMetrics,
    ) -> None:
        self._batch_size = batch_size
        self._flush_interval = flush_interval
        self._hand_to_writer = hand_to_writer
        self._metrics = metrics
        self._buffer: list[Delivery] = []
        self._buffered_events = 0
        self._buffered_bytes = 0
        self._mailbox = EventMailbox()

    def put(self, delivery: Delivery | Batch) -> None:
        """Takes one request's events. The intake reserved them in the MemoryLimit first.
        A whole Batch (the spool's batch in flight at a crash) goes to the Writer as it is, after
        what was buffered before it: its rows must be inserted exactly as they were the first time."""
        self._mailbox.put(delivery)

    @property
    def held_events(self) -> int:
        """Events in the mailbox or the buffer, not yet handed to the Writer."""
        return self._mailbox.events + self._buffered_events

    async def stop(self) -> None:
        """Asks `run()` to flush everything it holds and return. Call after intake has stopped."""
        self._mailbox.put(STOP)

    def publish_metrics(self) -> None:
        """Sets the Batcher's gauges from its state; called at every scrape, not at every request,
        where the updates cost more than they told. Events that have not woken a sleeping Batcher
        belong to the batch it is filling: they count as buffered, and the mailbox gauge keeps
        meaning what piles up while the Batcher (or the Writer behind it) is busy."""
        mailbox = self._mailbox
        if mailbox.waited_on:
            self._metrics.publish(0, self._buffered_events + mailbox.events, self.oldest_event_age())
        else:
            self._metrics.publish(mailbox.events, self._buffered_events, self.oldest_event_age())

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            # Ended by a crash or a cancellation: what it still holds will not be written by this
            # process, so whoever waits for it is answered now. (After a clean stop it holds nothing.)
            down = PipelineDown("the batcher has stopped")
            for delivery in self._buffer:
                fail_waiter(delivery.confirmation, down)
            self._mailbox.fail_waiters(down)

    async def _run(self) -> None:
        deadline: float | None = None
        while True:
            # With a partial batch held, wake for the deadline or for what would fill the batch.
            message = await self._mailbox.get(deadline, self._batch_size - self._buffered_events if self._buffer else 1)
            if message is None:
                await self._flush("interval")
                deadline = None
                continue
            if isinstance(message, Stop):
                if self._buffer:
                    await self._flush("shutdown")
                return
            if isinstance(message, Batch):
                if self._buffer:
                    await self._flush("size")
                deadline = None
                await self._hand_to_writer(message)
                continue
            if self._buffer and self._buffered_events + message.count > self._batch_size:
                await self._flush("size")
                deadline = None
            if not self._buffer:
                deadline = message.received_at + self._flush_interval
            self._buffer.append(message)
            self._buffered_events += message.count
            self._buffered_bytes += len(message.rows)
            if self._buffered_events >= self._batch_size:
                await self._flush("size")
                deadline = None

    async def _flush(self, trigger: FlushCause) -> None:
        batch = Batch(self._buffer, trigger, self._buffered_events, self._buffered_bytes)
        self._buffer = []
        self._buffered_events = 0
        self._buffered_bytes = 0
        self._metrics.batch_flushes.inc({"trigger": trigger})
        self._metrics.batch_size.set({}, batch.count)
        self._metrics.batch_rows.observe({}, batch.count)
        if log.isEnabledFor(logging.DEBUG) and batch.deliveries:
            log.debug(
                "flush (%s): %d events from %d requests; the oldest waited %.3fs",
                trigger, batch.count, len(batch.deliveries),
                asyncio.get_running_loop().time() - batch.oldest_received_at,
            )
        await self._hand_to_writer(batch)

    def oldest_event_age(self) -> float:
        """Seconds the oldest held event has waited: the buffer's head, else the mailbox's (while the
        Writer is busy the buffer may be empty and the mailbox is where events wait); 0 when none."""
        received_at = self._buffer[0].received_at if self._buffer else self._mailbox.oldest_received_at
        if received_at is None:
            return 0.0
        return max(0.0, asyncio.get_running_loop().time() - received_at)
