"""Handing the spool's records to the Batcher, in log order, under MAX_BUFFER_EVENTS.

A record waits here from its append (or from recovery) until its turn: it must be fsynced, and
its events reserved in the MemoryLimit. Where it waits is decided once, by `Admission`: in memory
with its rows, or on disk only, to be read back (a run of neighbours at a time, off the event
loop) when its turn comes. So a long ClickHouse outage fills the disk, not memory.

At open, the batch that was in flight at a crash (the ledger's intent) is rebuilt with exactly
its rows and forwarded first, as one whole `Batch`: ClickHouse may already have it, and only the
same rows carry the same deduplication token.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from clickpulse.memory_limit import MemoryLimit
from clickpulse.messages import Batch, Delivery, SpoolPosition, fail_waiter
from clickpulse.spool.ledger import LedgerFile
from clickpulse.spool.record import ScannedRecord, scan_segment
from clickpulse.spool.segments import Segments, segment_name

READ_BACK_BYTES = 1 << 20  # the most read back from disk in one go
YIELD_EVERY = 256  # deliveries between two turns given to the rest of the event loop


class Admission:
    """The one rule for where a record waits: it keeps its rows in memory only while no record
    is waiting on disk and memory.held + kept rows + count <= capacity; otherwise it waits on
    disk and is read back when its turn comes. So kept rows are always ahead of read-back ones,
    and the events the pipeline holds plus the rows kept here never pass MAX_BUFFER_EVENTS."""

    __slots__ = ("_memory", "kept", "on_disk")

    def __init__(self, memory: MemoryLimit) -> None:
        self._memory = memory
        self.kept = 0  # events of the records waiting with their rows in memory
        self.on_disk = 0  # records waiting with their rows on disk only

    def admit(self, count: int) -> bool:
        """Whether a new record of `count` events keeps its rows; counted either way."""
        memory = self._memory
        if not self.on_disk and memory.held + self.kept + count <= memory.capacity_events:
            self.kept += count
            return True
        self.on_disk += 1
        return False

    def hold(self, count: int) -> None:
        """Rows kept whatever the rule says: the batch in flight at a crash, which goes first."""
        self.kept += count

    def leave(self, kept: bool, count: int) -> None:
        """A record no longer waits here (forwarded, or its events now reserved in the MemoryLimit)."""
        if kept:
            self.kept -= count
        else:
            self.on_disk -= 1


@dataclass(slots=True)
class Waiting:
    """A record not yet handed to the Batcher."""

    position: SpoolPosition
    end: int  # offset in the segment where the record ends
    count: int
    received_at: float
    rows: bytes | None  # None: waiting on disk only, read back when its turn comes
    confirmation: asyncio.Future[int] | None


@dataclass(slots=True)
class Recovered:
    waiting: list[Waiting]
    in_flight: Batch | None
    unconfirmed: list[tuple[SpoolPosition, int, int]]  # (position, receipt unix ms, events)
    events: int  # in every unconfirmed record
    damaged_segments: int


def recover(ledger: LedgerFile, segments: Segments, admission: Admission, clock: Callable[[], float]) -> Recovered:
    """Blocking (a worker thread, before the spool is open): what the directory holds after the
    confirmed mark, each record placed by `admission`, the batch in flight at a crash apart."""
    intent = ledger.recover()

    def in_flight(position: SpoolPosition) -> bool:
        return intent is not None and intent[0] <= position < intent[1]

    def keep_payload(position: SpoolPosition, count: int) -> bool:
        if in_flight(position):
            admission.hold(count)
            return True
        return admission.admit(count)

    records, damaged = segments.recover(ledger.confirmed, keep_payload)
    now = clock()
    batch: list[Delivery] = []
    waiting: list[Waiting] = []
    for record in records:
        if in_flight(record.position):
            assert record.payload is not None
            batch.append(Delivery(record.payload, record.count, now, record.position))
        else:
            waiting.append(Waiting(record.position, record.end, record.count, now, record.payload, None))
    unconfirmed = [(record.position, record.received_ms, record.count) for record in records]
    events = sum(record.count for record in records)
    return Recovered(waiting, Batch(batch, "replay") if batch else None, unconfirmed, events, damaged)


def read_back(directory: Path, run: list[Waiting]) -> list[bytes]:
    """Blocking. The rows of `run`, consecutive records of one segment, read in one go."""
    first, last = run[0].position, run[-1]
    path = directory / segment_name(first.segment)
    with open(path, "rb") as segment_file:
        segment_file.seek(first.offset)
        data = segment_file.read(last.end - first.offset)
    records, _ = scan_segment(first.segment, data, base_offset=first.offset)
    if len(records) < len(run) or any(r.position != w.position for r, w in zip(records, run)):
        broken = run[len(records)] if len(records) < len(run) else run[0]
        raise OSError(f"spool record at {broken.position} in {path.name} no longer reads back intact")
    payloads = []
    for record in records[: len(run)]:
        assert record.payload is not None  # scanned keeping every payload
        payloads.append(record.payload)
    return payloads


class Replay:
    def __init__(
        self,
        *,
        directory: Path,
        memory: MemoryLimit,
        deliver: Callable[[Delivery | Batch], None],
        synced: Callable[[], SpoolPosition],
    ) -> None:
        self._directory = directory
        self._memory = memory
        self._deliver = deliver
        self._synced = synced
        self.admission = Admission(memory)
        self._queue: collections.deque[Waiting] = collections.deque()
        self._in_flight: Batch | None = None
        self._forwardable = asyncio.Event()
        self._forwarding = True
        self._since_yield = 0

    def add(
        self,
        position: SpoolPosition,
        end: SpoolPosition,
        count: int,
        received_at: float,
        rows: bytes,
        confirmation: asyncio.Future[int] | None,
    ) -> None:
        """Queues a record just appended."""
        kept = self.admission.admit(count)
        self._queue.append(Waiting(position, end.offset, count, received_at, rows if kept else None, confirmation))

    def load(self, recovered: Recovered, admission: Admission) -> None:
        """Takes what recovery found (placed by `admission`), ahead of anything appended since."""
        assert not self._queue, "recovered records go first"
        self.admission = admission
        self._queue.extend(recovered.waiting)
        batch = recovered.in_flight
        if batch is not None:
            # Nothing is forwarded before the spool is open, so the pipeline holds nothing yet
            # and the reservation succeeds.
            self._memory.try_reserve(batch.count)
            admission.leave(True, batch.count)
            self._in_flight = batch
        self._forwardable.set()

    def wake(self) -> None:
        """Something may have become forwardable (an fsync pass ended)."""
        self._forwardable.set()

    def stop(self) -> None:
        self._forwarding = False
        self._forwardable.set()

    def fail_waiters(self, error: BaseException) -> None:
        """These records will not be forwarded in this process: their requests learn it now."""
        for record in self._queue:
            fail_waiter(record.confirmation, error)

    async def forward_loop(self) -> None:
        queue, memory = self._queue, self._memory
        while self._forwarding:
            if self._in_flight is not None:
                batch, self._in_flight = self._in_flight, None
                self._deliver(batch)
                continue
            head = queue[0] if queue else None
            if head is None or SpoolPosition(head.position.segment, head.end) > self._synced():
                self._forwardable.clear()
                await self._forwardable.wait()
                continue
            if not memory.try_reserve(head.count):
                await memory.reserve(head.count, None)
                if not self._forwarding:
                    memory.release(head.count)
                    return
            if head.rows is None:
                await self._forward_from_disk(head)
            else:
                queue.popleft()
                self.admission.leave(True, head.count)
                await self._forward(head, head.rows)

    async def _forward(self, record: Waiting, rows: bytes) -> None:
        self._deliver(Delivery(rows, record.count, record.received_at, record.position, record.confirmation))
        self._since_yield += 1
        if self._since_yield >= YIELD_EVERY:  # a long replay must not starve requests and probes
            self._since_yield = 0
            await asyncio.sleep(0)

    async def _forward_from_disk(self, head: Waiting) -> None:
        """Reads back `head` (its events reserved) and the on-disk records right after it that
        are fsynced and fit in memory now, in one go off the loop; then forwards them."""
        memory, synced = self._memory, self._synced()
        run, size = [head], head.end - head.position.offset
        for record in itertools.islice(self._queue, 1, None):
            position = record.position
            if record.rows is not None or position.segment != head.position.segment or position.offset != run[-1].end:
                break
            length = record.end - position.offset
            if size + length > READ_BACK_BYTES or SpoolPosition(position.segment, record.end) > synced:
                break
            if not memory.try_reserve(record.count):
                break
            run.append(record)
            size += length
        try:
            payloads = await asyncio.to_thread(read_back, self._directory, run)
        except BaseException:
            memory.release(sum(record.count for record in run))
            raise
        for index, (forwarded, rows) in enumerate(zip(run, payloads)):
            if not self._forwarding:  # the rest stays in the spool for the next start
                memory.release(sum(left.count for left in run[index:]))
                return
            self._queue.popleft()
            self.admission.leave(False, forwarded.count)
            await self._forward(forwarded, rows)
