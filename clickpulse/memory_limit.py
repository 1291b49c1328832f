"""MAX_BUFFER_EVENTS as one counter for every event held in memory: the Batcher's mailbox and
buffer, the Writer's mailbox and the batch being inserted. Reserved before an event enters the
pipeline, released when ClickHouse confirmed it (or it was quarantined)."""

from __future__ import annotations

import asyncio


class MemoryLimit:
    def __init__(self, capacity_events: int) -> None:
        self.capacity_events = capacity_events
        self._held = 0
        self._released = asyncio.Event()

    @property
    def held(self) -> int:
        return self._held

    @property
    def fill_ratio(self) -> float:
        return self._held / self.capacity_events

    def try_reserve(self, count: int) -> bool:
        # A request larger than the whole capacity is let in alone, so it cannot wait forever.
        if self._held + count > self.capacity_events and self._held > 0:
            return False
        self._held += count
        return True

    async def reserve(self, count: int, timeout: float | None) -> bool:
        """Waits for room up to `timeout` seconds (None: as long as it takes)."""
        if self.try_reserve(count):
            return True
        try:
            async with asyncio.timeout(timeout):
                while True:
                    self._released.clear()
                    await self._released.wait()
                    if self.try_reserve(count):
                        return True
        except TimeoutError:
            return False

    def release(self, count: int) -> None:
        self._held -= count
        self._released.set()
