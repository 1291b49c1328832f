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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from clickpulse.memory_limit import MemoryLimit
from clickpulse.messages import Batch, Delivery, SpoolPosition, fail_waiter
from clickpulse.spool.ledger import LedgerFile
from clickpulse.spool.record import HEADER, Extent, scan_extents
from clickpulse.spool.segments import Segments, segment_name

READ_BACK_BYTES = 1 << 20  # the most read back from disk in one go
YIELD_EVERY = 256  # deliveries between two turns given to the rest of the event loop


class Admission:
    """The one rule for where a record waits: it keeps its rows in memory only while no record
    is waiting on disk and memory.held + kept rows + count <= capacity; otherwise it waits on
    disk and is read back when its turn comes. So kept rows are always ahead of read-back ones,
    and the events the pipeline holds plus the rows kept here never pass MAX_BUFFER_EVENTS.

    Recovery applies it in a worker thread, to an Admission of its own that the spool adopts
    once open: nothing else touches it then, and memory.held is only read."""

    __slots__ = ("_memory", "kept", "kept_bytes", "on_disk")

    def __init__(self, memory: MemoryLimit) -> None:
        self._memory = memory
        self.kept = 0  # events of the records waiting with their rows in memory
        self.kept_bytes = 0  # and the bytes of those rows
        self.on_disk = 0  # records waiting with their rows on disk only

    def admit(self, count: int, size: int) -> bool:
        """Whether a new record of `count` events and `size` bytes of rows keeps its rows;
        counted either way."""
        if not self.on_disk and self._memory.fits(count, size, self.kept, self.kept_bytes):
            self.kept += count
            self.kept_bytes += size
            return True
        self.on_disk += 1
        return False

    def hold(self, count: int, size: int) -> None:
        """Rows kept whatever the rule says: the batch in flight at a crash, which goes first."""
        self.kept += count
        self.kept_bytes += size

    def leave(self, kept: bool, count: int, size: int) -> None:
        """A record no longer waits here (forwarded, or its events now reserved in the MemoryLimit)."""
        if kept:
            self.kept -= count
            self.kept_bytes -= size
        else:
            self.on_disk -= 1


# A record not yet handed to the Batcher: (segment, offset, end offset, events, received_at,
# rows, confirmation). rows is None while it waits on disk only; received_at is None for a
# recovered record (it counts from the moment the spool opened). A plain tuple: once it holds no
# rows-waiter, the garbage collector stops tracking it, however long the spool's backlog.
Waiting = tuple[int, int, int, int, float | None, bytes | None, "asyncio.Future[int] | None"]


def rows_size(record: Waiting) -> int:
    """The bytes of a waiting record's rows, as the MemoryLimit counts them."""
    return record[2] - record[1] - HEADER.size


@dataclass(slots=True)
class Recovered:
    waiting: list[Waiting]
    in_flight: Batch | None
    unconfirmed: list[tuple[int, int, int, int]]  # (segment, offset, receipt unix ms, events)
    events: int  # in every unconfirmed record
    damaged_segments: int


def recover(ledger: LedgerFile, segments: Segments, admission: Admission, clock: Callable[[], float]) -> Recovered:
    """Blocking (a worker thread, before the spool is open): what the directory holds after the
    confirmed mark, each record placed by `admission`, the batch in flight at a crash apart."""
    intent = ledger.recover()
    start, end = ((intent[0].segment, intent[0].offset), (intent[1].segment, intent[1].offset)) if intent else ((0, 0), (0, 0))
    in_flight: list[tuple[bytes, int, SpoolPosition]] = []
    waiting: list[Waiting] = []
    unconfirmed: list[tuple[int, int, int, int]] = []
    events = 0

    def take(number: int, data: bytes, extents: list[Extent]) -> None:
        nonlocal events
        header = HEADER.size
        for offset, record_end, count, received_ms in extents:
            unconfirmed.append((number, offset, received_ms, count))
            events += count
            size = record_end - offset - header
            if start <= (number, offset) < end:  # the batch in flight: kept, to go first
                admission.hold(count, size)
                in_flight.append((data[offset + header : record_end], count, SpoolPosition(number, offset)))
            elif admission.admit(count, size):
                waiting.append((number, offset, record_end, count, None, data[offset + header : record_end], None))
            else:
                waiting.append((number, offset, record_end, count, None, None, None))

    damaged = segments.recover(ledger.confirmed, take)
    now = clock()
    batch = Batch([Delivery(rows, count, now, position) for rows, count, position in in_flight], "replay") if in_flight else None
    return Recovered(waiting, batch, unconfirmed, events, damaged)


def read_back(directory: Path, run: list[Waiting]) -> list[bytes]:
    """Blocking. The rows of `run`, consecutive records of one segment, read in one go."""
    segment, first, last = run[0][0], run[0][1], run[-1][2]
    path = directory / segment_name(segment)
    with open(path, "rb") as segment_file:
        segment_file.seek(first)
        data = segment_file.read(last - first)
    extents, _ = scan_extents(data, first)
    payloads = []
    for index, record in enumerate(run):
        if index >= len(extents) or extents[index][:2] != record[1:3]:
            raise OSError(f"spool record at {SpoolPosition(segment, record[1])} in {path.name} no longer reads back intact")
        payloads.append(data[record[1] - first + HEADER.size : record[2] - first])
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
        self._opened_at = 0.0  # received_at of the recovered records
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
        kept = self.admission.admit(count, len(rows))
        self._queue.append(
            (position.segment, position.offset, end.offset, count, received_at, rows if kept else None, confirmation)
        )

    def load(self, recovered: Recovered, admission: Admission) -> None:
        """Takes what recovery found (placed by `admission`), ahead of anything appended since."""
        assert not self._queue, "recovered records go first"
        self.admission = admission
        self._opened_at = asyncio.get_running_loop().time()
        self._queue.extend(recovered.waiting)
        batch = recovered.in_flight
        if batch is not None:
            # Nothing is forwarded before the spool is open, so the pipeline holds nothing yet
            # and the reservation succeeds.
            self._memory.try_reserve(batch.count, batch.size)
            admission.leave(True, batch.count, batch.size)
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
            fail_waiter(record[6], error)

    async def forward_loop(self) -> None:
        queue, memory = self._queue, self._memory
        while self._forwarding:
            if self._in_flight is not None:
                batch, self._in_flight = self._in_flight, None
                self._deliver(batch)
                continue
            head = queue[0] if queue else None
            if head is None or self._not_synced(head):
                self._forwardable.clear()
                await self._forwardable.wait()
                continue
            count, rows, size = head[3], head[5], rows_size(head)
            if not memory.try_reserve(count, size):
                await memory.reserve(count, size, None)
                if not self._forwarding:
                    memory.release(count, size)
                    return
            if rows is None:
                await self._forward_from_disk(head)
            else:
                queue.popleft()
                self.admission.leave(True, count, size)
                await self._forward(head, rows)

    def _not_synced(self, record: Waiting) -> bool:
        synced = self._synced()
        return record[0] > synced.segment or (record[0] == synced.segment and record[2] > synced.offset)

    async def _forward(self, record: Waiting, rows: bytes) -> None:
        segment, offset, _, count, received_at, _, confirmation = record
        at = self._opened_at if received_at is None else received_at
        self._deliver(Delivery(rows, count, at, SpoolPosition(segment, offset), confirmation))
        self._since_yield += 1
        if self._since_yield >= YIELD_EVERY:  # a long replay must not starve requests and probes
            self._since_yield = 0
            await asyncio.sleep(0)

    async def _forward_from_disk(self, head: Waiting) -> None:
        """Reads back `head` (its events reserved) and the on-disk records right after it that
        are fsynced and fit in memory now, in one go off the loop; then forwards them."""
        memory = self._memory
        run, size = [head], head[2] - head[1]
        for record in itertools.islice(self._queue, 1, None):
            segment, offset, end, count, _, rows, _ = record
            if rows is not None or segment != head[0] or offset != run[-1][2]:
                break
            if (
                size + end - offset > READ_BACK_BYTES
                or self._not_synced(record)
                or not memory.try_reserve(count, rows_size(record))
            ):
                break
            run.append(record)
            size += end - offset
        try:
            payloads = await asyncio.to_thread(read_back, self._directory, run)
        except BaseException:
            memory.release(sum(record[3] for record in run), sum(rows_size(record) for record in run))
            raise
        delivered = 0
        try:
            for record, rows in zip(run, payloads):
                if not self._forwarding:  # the rest stays in the spool for the next start
                    break
                self._queue.popleft()
                self.admission.leave(False, record[3], rows_size(record))
                delivered += 1
                await self._forward(record, rows)
        finally:
            if delivered < len(run):
                left = run[delivered:]
                memory.release(sum(record[3] for record in left), sum(rows_size(record) for record in left))
