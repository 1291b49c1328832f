"""MAX_BUFFER_EVENTS and MAX_BUFFER_BYTES as one account of everything held in memory: the
Batcher's mailbox and buffer, the Writer's mailbox and the batch being inserted, and the rows
the spool keeps in memory. Reserved before an event enters the pipeline, released when
ClickHouse confirmed it (or it was quarantined).

Bytes are those of the request's encoded JSONEachRow rows, the form the pipeline holds them in:
a count of events alone let a thousand half-megabyte events take half a gigabyte.
"""

from __future__ import annotations

import asyncio


class MemoryLimit:
    def __init__(self, capacity_events: int, capacity_bytes: int) -> None:
        self.capacity_events = capacity_events
        self.capacity_bytes = capacity_bytes
        self._held = 0
        self._held_bytes = 0
        self._released = asyncio.Event()

    @property
    def held(self) -> int:
        return self._held

    @property
    def held_bytes(self) -> int:
        return self._held_bytes

    @property
    def fill_ratio(self) -> float:
        """The fuller of the two limits."""
        return max(self._held / self.capacity_events, self._held_bytes / self.capacity_bytes)

    def fits(self, count: int, size: int, also_events: int = 0, also_bytes: int = 0) -> bool:
        """Whether `count` events of `size` bytes fit beside what is held (and `also_*` more)."""
        return (
            self._held + also_events + count <= self.capacity_events
            and self._held_bytes + also_bytes + size <= self.capacity_bytes
        )

    def try_reserve(self, count: int, size: int) -> bool:
        # A request larger than the whole capacity is let in alone, so it cannot wait forever.
        if self._held > 0 and not self.fits(count, size):
            return False
        self._held += count
        self._held_bytes += size
        return True

    async def reserve(self, count: int, size: int, timeout: float | None) -> bool:
        """Waits for room up to `timeout` seconds (None: as long as it takes)."""
        if self.try_reserve(count, size):
            return True
        try:
            async with asyncio.timeout(timeout):
                while True:
                    self._released.clear()
                    await self._released.wait()
                    if self.try_reserve(count, size):
                        return True
        except TimeoutError:
            return False

    def release(self, count: int, size: int) -> None:
        self._held -= count
        self._held_bytes -= size
        self._released.set()
