"""Handing the spool's records to the Batcher, in log order, under MAX_BUFFER_EVENTS.

A record waits here from its append (or from recovery) until its turn: it must be fsynced, and
its events reserved in the MemoryLimit. Where it waits is decided once, by `Admission`: in memory
with its rows, or on disk only, to be read back (a run of neighbours at a time, off the event
loop) when its turn comes. So a long ClickHouse outage fills the disk, not memory.

Nor does the bookkeeping grow with the backlog: a record kept in memory has a tuple of its own
(bounded by the MemoryLimit, like its rows), but the records waiting on disk are one range, from
the first of them to the end of the log, described by a cursor: the position of the next one to
read back, and its header once read. When their turn comes they are found again by scanning
their segment from the cursor, in chunks, off the loop. Only a disk-waiting record whose request
waits for its confirmation has an entry of its own (bounded by the requests waiting).

At open, the batch that was in flight at a crash (the ledger's intent) is rebuilt with exactly
its rows and forwarded first, as one whole `Batch`: ClickHouse may already have it, and only the
same rows carry the same deduplication token.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from clickpulse.memory_limit import MemoryLimit
from clickpulse.messages import Batch, Delivery, SpoolPosition, fail_waiter
from clickpulse.spool.ledger import Intent, LedgerFile, Unconfirmed
from clickpulse.spool.record import HEADER, MAGIC, Extent, scan_extents
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


class KeptStop(enum.Enum):
    """Why Replay._forward_kept stopped forwarding."""

    EMPTY = "no kept record left"
    UNSYNCED = "the head is not fsynced yet"
    FULL = "the head does not fit in memory now"
    YIELD = "YIELD_EVERY records forwarded: the event loop's turn"


# A record kept in memory with its rows, not yet handed to the Batcher: (segment, offset, end
# offset, events, received_at, rows, confirmation, receipt unix ms). received_at is None for a
# recovered record (it counts from the moment the spool opened).
Waiting = tuple[int, int, int, int, float | None, bytes, "asyncio.Future[int] | None", int]

# The header of the next disk-waiting record: (events, payload length, receipt unix ms).
Header = tuple[int, int, int]


def rows_size(record: Waiting) -> int:
    """The bytes of a waiting record's rows, as the MemoryLimit counts them."""
    return record[2] - record[1] - HEADER.size


@dataclass(slots=True)
class Recovered:
    kept: list[Waiting]  # the records admitted to memory, in log order
    disk_start: SpoolPosition | None  # the first record waiting on disk, if any
    disk_head: Header | None  # its header
    in_flight: Batch | None
    in_flight_ms: list[int]  # the receipt time of each of its records
    skip: Intent | None  # the in-flight batch's range: a disk read-back passes over it
    events: int  # in every unconfirmed record
    damaged_segments: int


def recover(ledger: LedgerFile, segments: Segments, admission: Admission, clock: Callable[[], float]) -> Recovered:
    """Blocking (a worker thread, before the spool is open): what the directory holds after the
    confirmed mark, each record placed by `admission`, the batch in flight at a crash apart."""
    intent = ledger.recover()
    start, end = ((intent[0].segment, intent[0].offset), (intent[1].segment, intent[1].offset)) if intent else ((0, 0), (0, 0))
    in_flight: list[tuple[bytes, int, SpoolPosition]] = []
    in_flight_ms: list[int] = []
    kept: list[Waiting] = []
    disk_start: SpoolPosition | None = None
    disk_head: Header | None = None
    events = 0

    def take(number: int, data: bytes, extents: list[Extent]) -> None:
        nonlocal events, disk_start, disk_head
        header, base = HEADER.size, extents[0][0]
        for offset, record_end, count, received_ms in extents:
            events += count
            size = record_end - offset - header
            if start <= (number, offset) < end:  # the batch in flight: kept, to go first
                admission.hold(count, size)
                in_flight.append((data[offset - base + header : record_end - base], count, SpoolPosition(number, offset)))
                in_flight_ms.append(received_ms)
            elif admission.admit(count, size):
                kept.append((number, offset, record_end, count, None, data[offset - base + header : record_end - base], None, received_ms))
            elif disk_start is None:
                disk_start, disk_head = SpoolPosition(number, offset), (count, size, received_ms)

    damaged = segments.recover(ledger.confirmed, take)
    now = clock()
    batch = Batch([Delivery(rows, count, now, position) for rows, count, position in in_flight], "replay") if in_flight else None
    return Recovered(kept, disk_start, disk_head, batch, in_flight_ms, intent if in_flight else None, events, damaged)


def read_range(path: Path, offset: int, length: int) -> bytes:
    """Blocking. `length` bytes of a segment from `offset` (fewer at its end)."""
    with open(path, "rb") as segment_file:
        segment_file.seek(offset)
        return segment_file.read(length)


def parse_header(data: bytes | memoryview, at: int = 0) -> Header | None:
    if len(data) - at < HEADER.size:
        return None
    magic, length, count, _, received_ms = HEADER.unpack_from(data, at)
    return (count, length, received_ms) if magic == MAGIC else None


class Replay:
    def __init__(
        self,
        *,
        directory: Path,
        memory: MemoryLimit,
        deliver: Callable[[Delivery | Batch], None],
        synced: Callable[[], SpoolPosition],
        segments: Segments,
        unconfirmed: Unconfirmed,
    ) -> None:
        self._directory = directory
        self._memory = memory
        self._deliver = deliver
        self._synced = synced
        self._segments = segments
        self._unconfirmed = unconfirmed
        self.admission = Admission(memory)
        self._kept: collections.deque[Waiting] = collections.deque()
        # The records waiting on disk: from _disk_next to the end of the log (admission.on_disk of
        # them, the in-flight batch's range passed over); None when there is none.
        self._disk_next: SpoolPosition | None = None
        self._disk_head: Header | None = None  # the header at _disk_next, once known
        self._disk_waiters: dict[tuple[int, int], asyncio.Future[int]] = {}  # confirmations of disk-waiting records
        self._skip: Intent | None = None
        self._in_flight: Batch | None = None
        self._appended_from = SpoolPosition(0, 0)  # records before this were recovered
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
        received_ms: int,
    ) -> None:
        """Queues a record just appended."""
        if self.admission.admit(count, len(rows)):
            self._kept.append((position.segment, position.offset, end.offset, count, received_at, rows, confirmation, received_ms))
            return
        if self._disk_next is None:
            self._disk_next, self._disk_head = position, (count, len(rows), received_ms)
        if confirmation is not None:
            self._disk_waiters[(position.segment, position.offset)] = confirmation

    def load(self, recovered: Recovered, admission: Admission, appended_from: SpoolPosition) -> None:
        """Takes what recovery found (placed by `admission`), ahead of anything appended since."""
        assert not self._kept and self._disk_next is None, "recovered records go first"
        self.admission = admission
        self._appended_from = appended_from
        self._opened_at = asyncio.get_running_loop().time()
        self._kept.extend(recovered.kept)
        self._disk_next, self._disk_head = recovered.disk_start, recovered.disk_head
        self._skip = recovered.skip
        batch = recovered.in_flight
        if batch is not None:
            # Nothing is forwarded before the spool is open, so the pipeline holds nothing yet
            # and the reservation succeeds.
            self._memory.try_reserve(batch.count, batch.size)
            admission.leave(True, batch.count, batch.size)
            for delivery, received_ms in zip(batch.deliveries, recovered.in_flight_ms):
                assert delivery.position is not None
                self._unconfirmed.forwarded(delivery.position.segment, delivery.position.offset, received_ms, delivery.count)
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
        for record in self._kept:
            fail_waiter(record[6], error)
        for waiter in self._disk_waiters.values():
            fail_waiter(waiter, error)
        self._disk_waiters.clear()

    @property
    def oldest_waiting_ms(self) -> int | None:
        """Receipt time (unix ms) of the first record not yet forwarded, in log order, if known."""
        if self._kept:
            return self._kept[0][7]
        if self._disk_next is not None and self._disk_head is not None:
            return self._disk_head[2]
        return None

    async def forward_loop(self) -> None:
        kept = self._kept
        while self._forwarding:
            if self._in_flight is not None:
                batch, self._in_flight = self._in_flight, None
                self._deliver(batch)
                continue
            if kept:
                stopped = self._forward_kept()
                if stopped is KeptStop.UNSYNCED:
                    await self._wait_forwardable()
                elif stopped is KeptStop.YIELD:
                    await asyncio.sleep(0)
                elif stopped is KeptStop.FULL:  # the head waits for room, then goes alone
                    head = kept[0]
                    count, size = head[3], rows_size(head)
                    if not await self._reserve(count, size):
                        return
                    kept.popleft()
                    self.admission.leave(True, count, size)
                    await self._forward(head[0], head[1], count, head[4], head[5], head[6], head[7])
            elif self._disk_next is not None:
                if not await self._forward_from_disk(self._disk_next):
                    await self._wait_forwardable()
            else:
                await self._wait_forwardable()

    def _forward_kept(self) -> KeptStop:
        """Forwards the fsynced kept records at the head that fit in memory now, without a turn of
        the event loop between them: at ~25 records per fsync pass under load, one call per
        pass instead of two coroutines per record. Says why it stopped."""
        kept = self._kept
        while kept:
            if self._since_yield >= YIELD_EVERY:  # a long replay must not starve requests and probes
                self._since_yield = 0
                return KeptStop.YIELD
            head = kept[0]
            if self._not_synced(head[0], head[2]):
                return KeptStop.UNSYNCED
            count, size = head[3], rows_size(head)
            if not self._memory.try_reserve(count, size):
                return KeptStop.FULL
            kept.popleft()
            self.admission.leave(True, count, size)
            self._hand_over(head[0], head[1], count, head[4], head[5], head[6], head[7])
        return KeptStop.EMPTY

    async def _wait_forwardable(self) -> None:
        self._forwardable.clear()
        await self._forwardable.wait()

    async def _reserve(self, count: int, size: int) -> bool:
        """Reserves, waiting as long as it takes; False (nothing reserved) once stopped."""
        memory = self._memory
        if not memory.try_reserve(count, size):
            await memory.reserve(count, size, None)
            if not self._forwarding:
                memory.release(count, size)
                return False
        return True

    def _not_synced(self, segment: int, end: int) -> bool:
        synced = self._synced()
        return segment > synced.segment or (segment == synced.segment and end > synced.offset)

    def _readable_end(self, segment: int) -> int:
        """Where the fsynced whole records of `segment` end."""
        synced = self._synced()
        if segment > synced.segment:
            return 0
        size = self._segments.size_of(segment)
        return min(size, synced.offset) if segment == synced.segment else size

    async def _forward(
        self,
        segment: int,
        offset: int,
        count: int,
        received_at: float | None,
        rows: bytes,
        confirmation: asyncio.Future[int] | None,
        received_ms: int,
    ) -> None:
        self._hand_over(segment, offset, count, received_at, rows, confirmation, received_ms)
        if self._since_yield >= YIELD_EVERY:  # a long replay must not starve requests and probes
            self._since_yield = 0
            await asyncio.sleep(0)

    def _hand_over(
        self,
        segment: int,
        offset: int,
        count: int,
        received_at: float | None,
        rows: bytes,
        confirmation: asyncio.Future[int] | None,
        received_ms: int,
    ) -> None:
        """Delivers one record (its events reserved) to the Batcher; it is forwarded, unconfirmed."""
        at = self._opened_at if received_at is None else received_at
        self._unconfirmed.forwarded(segment, offset, received_ms, count)
        self._deliver(Delivery(rows, count, at, SpoolPosition(segment, offset), confirmation))
        self._since_yield += 1

    def _received_at(self, position: SpoolPosition, received_ms: int) -> float | None:
        """A disk-waiting record's received_at, on the loop's clock, from its receipt time."""
        if position < self._appended_from:
            return None
        return asyncio.get_running_loop().time() - max(0.0, time.time() - received_ms / 1000)

    def _skipped(self, position: SpoolPosition) -> bool:
        return self._skip is not None and self._skip[0] <= position < self._skip[1]

    async def _forward_from_disk(self, position: SpoolPosition) -> bool:
        """Reads back the record at the cursor (its events reserved first) and the disk-waiting
        records right after it that are fsynced and fit in memory now, in one go off the loop;
        forwards them and moves the cursor. False when the cursor's record is not fsynced yet."""
        segment, offset = position.segment, position.offset
        if self._segments.gone:  # its name may be another directory's file now
            return False
        readable = self._readable_end(segment)
        if offset >= readable:
            following = self._segments.next_after(segment)
            if offset < self._segments.size_of(segment) or following is None or self._not_synced(following, 0):
                return False
            self._disk_next, self._disk_head = SpoolPosition(following, 0), None  # that segment is done
            return True
        path = self._directory / segment_name(segment)
        head = self._disk_head
        if head is None:
            head = parse_header(await asyncio.to_thread(read_range, path, offset, HEADER.size))
            if head is None:
                raise OSError(f"spool record at {position} in {path.name} no longer reads back intact")
            self._disk_head = head
        count, length, _ = head
        whole = HEADER.size + length
        if offset + whole > readable:
            return False
        if self._skipped(position):  # the in-flight batch, forwarded first at open
            self._disk_next, self._disk_head = SpoolPosition(segment, offset + whole), None
            return True
        if not await self._reserve(count, length):
            return True
        memory = self._memory
        # As much as could fit in memory once the head is in (every record holds an event and
        # its header), within READ_BACK_BYTES, and the header after it, to know the next head.
        room = max(0, memory.capacity_bytes - memory.held_bytes) + HEADER.size * max(0, memory.capacity_events - memory.held)
        want = whole + min(READ_BACK_BYTES, room) + HEADER.size
        try:
            data = await asyncio.to_thread(read_range, path, offset, min(want, readable - offset))
            extents, _ = scan_extents(data, offset)
            if not extents or extents[0][:2] != (offset, offset + whole):
                raise OSError(f"spool record at {position} in {path.name} no longer reads back intact")
        except BaseException:
            memory.release(count, length)
            raise
        at = offset  # where the cursor goes: after the last record forwarded or passed over
        for index, (start, end, count, received_ms) in enumerate(extents):
            here = SpoolPosition(segment, start)
            if index and self._skipped(here):
                at = end
                continue
            size = end - start - HEADER.size
            if not self._forwarding:  # the rest stays in the spool for the next start
                if not index:
                    memory.release(count, size)
                break
            if index and not memory.try_reserve(count, size):
                break
            self.admission.leave(False, count, size)
            at = end
            last = not self.admission.on_disk
            if last:  # from now on a new record may be kept, or start a range of its own
                self._disk_next, self._disk_head = None, None
            await self._forward(
                segment, start, count, self._received_at(here, received_ms),
                data[start - offset + HEADER.size : end - offset], self._disk_waiters.pop((segment, start), None),
                received_ms,
            )
            if last:
                return True
        self._disk_next = SpoolPosition(segment, at)
        self._disk_head = parse_header(data, at - offset)
        return True
