"""The Batcher actor: the one owner of buffered events.

Receivers put each request's events in its mailbox as one message. Its `run()` task moves them
into the buffer and hands whole batches to the Writer when the buffer reaches BATCH_SIZE, when
the oldest buffered event has waited FLUSH_INTERVAL, and on shutdown. Handing a batch over waits
while the Writer's mailbox is full, so a slow ClickHouse stops this task from draining its own
mailbox, which then fills and makes the receiver answer 503: backpressure instead of memory.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from clickpulse.events import Event
from clickpulse.metrics import BatcherMetrics

log = logging.getLogger(__name__)

FLUSH_TRIGGERS = ("size", "interval", "shutdown")


@dataclass(frozen=True, slots=True)
class Delivery:
    """One request's events, as a message in the Batcher's mailbox."""

    events: list[Event]
    received_at: float  # event-loop clock


@dataclass(frozen=True, slots=True)
class Batch:
    """Events flushed together; one INSERT."""

    events: list[Event]
    trigger: str
    oldest_received_at: float


class _Stop:
    """Mailbox message: flush everything and end `run()`."""


_STOP = _Stop()


class EventMailbox:
    """A mailbox bounded by the number of events it holds, not by the number of messages.

    A 10,000-event request and a 1-event request are one message each; counting events keeps
    memory bounded whatever the mix.
    """

    def __init__(self, capacity_events: int, on_change: Callable[[int], None]) -> None:
        self.capacity_events = capacity_events
        self._messages: collections.deque[Delivery | _Stop] = collections.deque()
        self._events = 0
        self._on_change = on_change
        self._arrival: asyncio.Future[None] | None = None
        self._room = asyncio.Event()

    @property
    def events(self) -> int:
        return self._events

    def try_put(self, delivery: Delivery) -> bool:
        count = len(delivery.events)
        if self._events + count > self.capacity_events:
            return False
        self._append(delivery, count)
        return True

    async def put(self, delivery: Delivery, timeout: float) -> bool:
        """Waits up to `timeout` seconds for room; False when there was none."""
        if self.try_put(delivery):
            return True
        if len(delivery.events) > self.capacity_events:
            return False
        try:
            async with asyncio.timeout(timeout):
                while True:
                    self._room.clear()
                    await self._room.wait()
                    if self.try_put(delivery):
                        return True
        except TimeoutError:
            return False

    def put_stop(self) -> None:
        self._append(_STOP, 0)

    def _append(self, message: Delivery | _Stop, count: int) -> None:
        self._messages.append(message)
        self._events += count
        self._on_change(self._events)
        if self._arrival is not None and not self._arrival.done():
            self._arrival.set_result(None)

    async def get(self, deadline: float | None) -> Delivery | _Stop | None:
        """The next message, or None once the event-loop clock passes `deadline`."""
        if not self._messages:
            loop = asyncio.get_running_loop()
            self._arrival = loop.create_future()
            timer = None if deadline is None else loop.call_at(deadline, self._expire, self._arrival)
            try:
                await self._arrival
            finally:
                if timer is not None:
                    timer.cancel()
                self._arrival = None
            if not self._messages:
                return None
        message = self._messages.popleft()
        if isinstance(message, Delivery):
            self._events -= len(message.events)
            self._on_change(self._events)
            self._room.set()
        return message

    @staticmethod
    def _expire(arrival: asyncio.Future[None]) -> None:
        if not arrival.done():
            arrival.set_result(None)


class Batcher:
    """Owns the buffer. Talk to it only through `submit()` and `stop()`."""

    def __init__(
        self,
        *,
        batch_size: int,
        flush_interval: float,
        capacity_events: int,
        hand_to_writer: Callable[[Batch], Awaitable[None]],
        metrics: BatcherMetrics,
    ) -> None:
        self._batch_size = batch_size
        self._flush_interval = flush_interval
        self._hand_to_writer = hand_to_writer
        self._metrics = metrics
        self._buffer: collections.deque[Delivery] = collections.deque()
        self._buffered_events = 0
        self._mailbox_events = 0
        self._mailbox = EventMailbox(capacity_events, self._mailbox_changed)
        metrics.buffer_capacity_events.set({}, capacity_events)
        metrics.buffer_events.set({}, 0)

    async def submit(self, events: list[Event], received_at: float, wait: float) -> bool:
        """Puts one request's events in the mailbox; False if it stayed full for `wait` seconds."""
        return await self._mailbox.put(Delivery(events, received_at), wait)

    @property
    def held_events(self) -> int:
        """Events in the mailbox or the buffer, not yet handed to the Writer."""
        return self._mailbox_events + self._buffered_events

    async def stop(self) -> None:
        """Asks `run()` to flush everything it holds and return. Call after intake has stopped."""
        self._mailbox.put_stop()

    async def run(self) -> None:
        deadline: float | None = None
        while True:
            message = await self._mailbox.get(deadline)
            if message is None:
                await self._flush_all("interval")
                deadline = None
                continue
            if isinstance(message, _Stop):
                await self._flush_all("shutdown")
                return
            if not self._buffer:
                deadline = message.received_at + self._flush_interval
            self._buffer.append(message)
            self._buffered_events += len(message.events)
            while self._buffered_events >= self._batch_size:
                await self._flush_one_batch("size")
                deadline = self._buffer[0].received_at + self._flush_interval if self._buffer else None
            self._update_gauge()

    async def _flush_all(self, trigger: str) -> None:
        while self._buffer:
            await self._flush_one_batch(trigger)

    async def _flush_one_batch(self, trigger: str) -> None:
        """Takes up to BATCH_SIZE events, oldest first, and hands them to the Writer."""
        taken: list[list[Event]] = []
        count = 0
        oldest_received_at = self._buffer[0].received_at
        while self._buffer and count < self._batch_size:
            delivery = self._buffer[0]
            room = self._batch_size - count
            if len(delivery.events) <= room:
                self._buffer.popleft()
                taken.append(delivery.events)
                count += len(delivery.events)
            else:
                taken.append(delivery.events[:room])
                self._buffer[0] = Delivery(delivery.events[room:], delivery.received_at)
                count += room
        events = taken[0] if len(taken) == 1 else list(itertools.chain.from_iterable(taken))
        self._buffered_events -= count
        self._update_gauge()
        self._metrics.batch_flushes.inc({"trigger": trigger})
        self._metrics.batch_size.set({}, count)
        self._metrics.batch_rows.observe({}, count)
        await self._hand_to_writer(Batch(events, trigger, oldest_received_at))

    def _mailbox_changed(self, mailbox_events: int) -> None:
        self._mailbox_events = mailbox_events
        self._update_gauge()

    def _update_gauge(self) -> None:
        self._metrics.buffer_events.set({}, self.held_events)
