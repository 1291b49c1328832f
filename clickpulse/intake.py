"""The memory intake: the buffering path without a spool (SPOOL_DIR unset).

As an intake port it reserves a request's events under MAX_BUFFER_EVENTS (waiting a short while
for room, then refusing with 503) and puts the rows in the Batcher's mailbox. As the Writer's
ledger it releases the reservation once ClickHouse confirmed the batch (or quarantined its
rejected rows). Nothing survives the process: `keeps_unwritten` is False.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from clickpulse.memory_limit import MemoryLimit
from clickpulse.messages import Batch, Delivery, Refused

# How long a request may wait for room under MAX_BUFFER_EVENTS before it is answered 503.
ENQUEUE_WAIT_SECONDS = 1.0
NEARLY_FULL = 0.9


class MemoryIntake:
    keeps_unwritten = False
    takes_durable = False

    def __init__(
        self,
        *,
        memory: MemoryLimit,
        to_batcher: Callable[[Delivery], None],
        enqueue_wait: float = ENQUEUE_WAIT_SECONDS,
    ) -> None:
        self._memory = memory
        self._to_batcher = to_batcher
        self._enqueue_wait = enqueue_wait

    async def accept(
        self,
        rows: bytes,
        count: int,
        received_at: float,
        *,
        durable: bool,
        confirmation: asyncio.Future[int] | None,
    ) -> None:
        memory = self._memory
        size = len(rows)
        if not memory.try_reserve(count, size) and not await memory.reserve(count, size, self._enqueue_wait):
            raise Refused("overloaded", "the pipeline is full (MAX_BUFFER_EVENTS, MAX_BUFFER_BYTES); retry later")
        self._to_batcher(Delivery(rows, count, received_at, None, confirmation))

    async def before_insert(self, batch: Batch) -> None:
        """Nothing to record: without a spool an insert leaves no trace to recover from."""

    async def after_insert(self, batch: Batch) -> None:
        self._memory.release(batch.count, batch.size)

    @property
    def unconfirmed_events(self) -> int:
        return self._memory.held

    async def open(self) -> None:
        """Nothing to recover."""

    def stop_forwarding(self) -> None:
        """Nothing is held here between the request and the Batcher."""

    async def close(self) -> None:
        """No files."""

    def not_ready_reason(self) -> str | None:
        memory = self._memory
        events_ratio = memory.held / memory.capacity_events
        bytes_ratio = memory.held_bytes / memory.capacity_bytes
        if events_ratio >= NEARLY_FULL and events_ratio >= bytes_ratio:
            return f"buffer {events_ratio:.0%} full (MAX_BUFFER_EVENTS={memory.capacity_events})"
        if bytes_ratio >= NEARLY_FULL:
            return f"buffer {bytes_ratio:.0%} full (MAX_BUFFER_BYTES={memory.capacity_bytes})"
        return None
