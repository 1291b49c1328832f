"""The Spool actor: a write-ahead log between the Receiver and the Batcher (SPOOL_DIR).

Each accepted request is appended as one record (its JSONEachRow lines) to the active segment
file. One task fsyncs whatever was written since its last pass, so many requests share one
fsync; a request acknowledged in `disk` mode waits for the pass that covers its record. A second
task forwards fsynced records, in log order, to the Batcher as soon as MAX_BUFFER_EVENTS leaves
room; records that did not fit in memory are read back from disk when their turn comes, so the
spool, not memory, absorbs a long ClickHouse outage.

The Writer inserts batches in log order. Before each insert it records the batch's range in the
ledger (fsynced); after ClickHouse confirmed it, the range's end becomes the confirmed mark, and
segments wholly before the mark are deleted. At start, records after the mark are replayed, and
a batch that was in flight at a crash is replayed first with exactly the same rows, so the
server's deduplication token matches the first attempt.

Record: header (magic, payload length, event count, CRC-32 of count+time+payload, receipt time in
unix milliseconds), then the payload. A torn or corrupt tail is truncated with a warning.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import re
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from clickpulse.memory_limit import MemoryLimit
from clickpulse.messages import Batch, Delivery, SpoolPosition
from clickpulse.metrics import SpoolMetrics

log = logging.getLogger(__name__)

MAGIC = b"CPR1"
HEADER = struct.Struct("<4sIIIQ")  # magic, payload length, event count, crc32, received unix ms
SEGMENT_NAME = re.compile(r"segment-(\d{12})\.log")
LEDGER_NAME = "ledger.log"
LEDGER_COMPACT_BYTES = 1 << 20
REOPEN_INTERVAL_SECONDS = 1.0


class SpoolUnavailable(Exception):
    """The spool cannot take a record now (full, unwritable); the request is answered 503."""


def segment_name(number: int) -> str:
    return f"segment-{number:012d}.log"


def _checksum(count: int, received_ms: int, payload: bytes) -> int:
    return zlib.crc32(payload, zlib.crc32(struct.pack("<IQ", count, received_ms)))


def encode_record(payload: bytes, count: int, received_ms: int) -> bytes:
    return HEADER.pack(MAGIC, len(payload), count, _checksum(count, received_ms, payload), received_ms) + payload


@dataclass(slots=True)
class ScannedRecord:
    position: SpoolPosition
    end: int
    count: int
    received_ms: int
    payload: bytes | None  # None once recovery decided not to keep it in memory (read back later)


def scan_segment(number: int, data: bytes) -> tuple[list[ScannedRecord], int]:
    """The intact records of one segment, and the offset where intact data ends."""
    records = []
    offset = 0
    while offset + HEADER.size <= len(data):
        magic, length, count, crc, received_ms = HEADER.unpack_from(data, offset)
        end = offset + HEADER.size + length
        if magic != MAGIC or end > len(data):
            break
        payload = data[offset + HEADER.size : end]
        if _checksum(count, received_ms, payload) != crc:
            break
        records.append(ScannedRecord(SpoolPosition(number, offset), end, count, received_ms, payload))
        offset = end
    return records, offset


@dataclass(slots=True)
class _Record:
    """A record not yet handed to the Batcher."""

    position: SpoolPosition
    end: int
    count: int
    received_at: float
    rows: bytes | None  # None: not kept in memory, read back from the segment
    confirmation: asyncio.Future[int] | None


@dataclass(slots=True)
class _Segment:
    number: int
    size: int
    fd: int | None = None  # open for appending while active


class Spool:
    def __init__(
        self,
        *,
        directory: Path,
        max_bytes: int,
        segment_bytes: int,
        memory: MemoryLimit,
        deliver: Callable[[Delivery | Batch], None],
        metrics: SpoolMetrics,
    ) -> None:
        self.directory = directory
        self._max_bytes = max_bytes
        self._segment_bytes = segment_bytes
        self._memory = memory
        self._deliver = deliver
        self._metrics = metrics
        self._segments: dict[int, _Segment] = {}
        self._active: _Segment | None = None
        self._ledger_fd: int | None = None
        self._ledger_size = 0
        self._confirmed = SpoolPosition(0, 0)  # every record before this is in ClickHouse
        # (position, receipt unix ms, events) of every record after the confirmed mark, in order.
        self._unconfirmed: collections.deque[tuple[SpoolPosition, int, int]] = collections.deque()
        self._unconfirmed_events = 0
        self._undelivered: collections.deque[_Record] = collections.deque()
        self._undelivered_in_memory = 0
        # Records waiting with their rows on disk only. While there are any, new records wait on
        # disk too: kept rows are then always ahead of read-back ones in the queue, so the events
        # the pipeline holds plus the rows kept here never pass MAX_BUFFER_EVENTS.
        self._undelivered_on_disk = 0
        self._sync_waiters: collections.deque[tuple[SpoolPosition, asyncio.Future[None]]] = collections.deque()
        self._synced = SpoolPosition(0, 0)  # records ending at or before this are on disk
        self._written = SpoolPosition(0, 0)
        self._closing_fds: list[int] = []
        self._directory_dirty = False
        self._wrote = asyncio.Event()
        self._forwardable = asyncio.Event()
        self._forwarding = True
        self._error: str | None = None
        self._next_open_attempt = 0.0
        self._recovered_batch: Batch | None = None
        # The batch in flight at a crash, found by an open() after the start: forwarded first.
        self._recovered_late: Batch | None = None
        self._opened = False
        self._fsync_failing = False  # until an fsync pass succeeds again; /readyz says so

    # -- start ------------------------------------------------------------------------------

    def open(self) -> Batch | None:
        """Recovers the directory. Returns the batch that was being inserted at a crash, which
        must be written before anything else; its records are not forwarded again."""
        try:
            self._open()
        except OSError as error:
            self._fail(f"cannot open spool directory {self.directory}: {error.strerror or error}")
            return None
        self._opened = True
        self._error = None
        batch, self._recovered_batch = self._recovered_batch, None
        return batch

    def _open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._confirmed, intent = self._read_ledger()
        numbers = sorted(int(m.group(1)) for name in os.listdir(self.directory) if (m := SEGMENT_NAME.fullmatch(name)))
        replay: list[ScannedRecord] = []
        # Only what fits in memory keeps its rows (plus the batch in flight, which is inserted
        # first): the rest is read back when its turn comes. Keeping every payload here until
        # _queue_replay would hold the whole spool (up to SPOOL_MAX_BYTES) in memory at start.
        in_memory = self._memory.held + self._undelivered_in_memory
        on_disk = self._undelivered_on_disk
        for index, number in enumerate(numbers):
            path = self.directory / segment_name(number)
            data = path.read_bytes()
            records, intact = scan_segment(number, data)
            if intact < len(data):
                is_last = index == len(numbers) - 1
                self._metrics.corrupt_records.inc({})
                log.warning(
                    "spool segment %s: %d bytes after offset %d are %s; dropped",
                    path.name, len(data) - intact, intact, "a torn tail" if is_last else "corrupt",
                )
                with open(path, "r+b") as segment_file:
                    segment_file.truncate(intact)
                    os.fsync(segment_file.fileno())
            unconfirmed = [record for record in records if record.position >= self._confirmed]
            if not unconfirmed:  # every record is in ClickHouse; writing resumes in a new segment
                path.unlink()
                continue
            self._segments[number] = _Segment(number, intact)
            for record in unconfirmed:
                if intent and intent[0] <= record.position < intent[1]:
                    in_memory += record.count  # the batch in flight, held in memory to go first
                elif not on_disk and in_memory + record.count <= self._memory.capacity_events:
                    in_memory += record.count
                else:
                    record.payload = None
                    on_disk += 1
            replay.extend(unconfirmed)
            del records, unconfirmed, data
        # Never a number at or before the confirmed mark, even when every segment up to it was
        # deleted: records there would count as confirmed at the next start and be dropped.
        last = max(max(self._segments, default=0), self._confirmed.segment)
        self._start_segment(last + 1)
        self._sync_directory()
        self._queue_replay(replay, intent)
        self._publish_sizes()

    def _queue_replay(self, replay: list[ScannedRecord], intent: tuple[SpoolPosition, SpoolPosition] | None) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        in_flight: list[Delivery] = []
        for record in replay:
            self._track_unconfirmed(record.position, record.received_ms, record.count)
            if intent and intent[0] <= record.position < intent[1]:
                assert record.payload is not None
                in_flight.append(Delivery(record.payload, record.count, now, record.position))
                continue
            if record.payload is not None:  # _open kept it: it fits in memory
                self._undelivered_in_memory += record.count
            else:
                self._undelivered_on_disk += 1
            self._undelivered.append(_Record(record.position, record.end, record.count, now, record.payload, None))
        replayed = sum(record.count for record in replay)
        if replayed:
            self._metrics.replayed_events.add({}, replayed)
            log.warning("spool: replaying %d unconfirmed events from %s", replayed, self.directory)
        if in_flight:
            self._memory.try_reserve(sum(delivery.count for delivery in in_flight))
            self._recovered_batch = Batch(in_flight, "replay")
        self._synced = self._written = SpoolPosition(self._active.number, 0) if self._active else self._synced
        self._forwardable.set()
        self._publish_oldest()

    def _start_segment(self, number: int) -> None:
        # Opened before the active segment is retired: if it fails, the active one stays usable.
        fd = os.open(self.directory / segment_name(number), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        if self._active is not None and self._active.fd is not None:
            self._closing_fds.append(self._active.fd)
            self._active.fd = None
        size = os.fstat(fd).st_size
        self._active = self._segments[number] = _Segment(number, size, fd)
        self._directory_dirty = True

    # -- the ledger ---------------------------------------------------------------------------

    def _read_ledger(self) -> tuple[SpoolPosition, tuple[SpoolPosition, SpoolPosition] | None]:
        path = self.directory / LEDGER_NAME
        confirmed = SpoolPosition(0, 0)
        intent: tuple[SpoolPosition, SpoolPosition] | None = None
        text = path.read_bytes() if path.exists() else b""
        for line in text.split(b"\n")[:-1]:  # a line without its newline is a torn write
            fields = line.split()
            try:
                numbers = [int(field) for field in fields[1:]]
            except ValueError:
                continue
            if fields[:1] == [b"C"] and len(numbers) == 2:
                confirmed = max(confirmed, SpoolPosition(*numbers))
            elif fields[:1] == [b"I"] and len(numbers) == 4:
                intent = (SpoolPosition(*numbers[:2]), SpoolPosition(*numbers[2:]))
        if intent and intent[1] <= confirmed:
            intent = None
        self._rewrite_ledger(confirmed, intent)
        return confirmed, intent

    def _rewrite_ledger(self, confirmed: SpoolPosition, intent: tuple[SpoolPosition, SpoolPosition] | None) -> None:
        lines = f"C {confirmed.segment} {confirmed.offset}\n"
        if intent:
            lines += f"I {intent[0].segment} {intent[0].offset} {intent[1].segment} {intent[1].offset}\n"
        temporary = self.directory / (LEDGER_NAME + ".new")
        with open(temporary, "wb") as ledger:
            ledger.write(lines.encode())
            ledger.flush()
            os.fsync(ledger.fileno())
        os.replace(temporary, self.directory / LEDGER_NAME)
        self._sync_directory()
        # Opened before the old one is closed: if this fails, _ledger_fd must not name a closed
        # descriptor, whose number the next segment could get (ledger lines in a segment).
        ledger_fd = os.open(self.directory / LEDGER_NAME, os.O_WRONLY | os.O_APPEND)
        if self._ledger_fd is not None:
            os.close(self._ledger_fd)
        self._ledger_fd = ledger_fd
        self._ledger_size = len(lines)

    async def begin_insert(self, batch: Batch) -> None:
        """Called by the Writer before it sends `batch`: the range is durable before the insert."""
        if batch.first_position is None or self._ledger_fd is None:
            return
        end = self._end_of(batch)
        line = f"I {batch.first_position.segment} {batch.first_position.offset} {end.segment} {end.offset}\n"
        os.write(self._ledger_fd, line.encode())
        self._ledger_size += len(line)
        await asyncio.to_thread(os.fsync, self._ledger_fd)

    def confirm(self, batch: Batch) -> None:
        """Called by the Writer once ClickHouse has every row of `batch` (or its quarantine)."""
        if batch.first_position is None or self._ledger_fd is None:
            return
        self._confirmed = max(self._confirmed, self._end_of(batch))
        line = f"C {self._confirmed.segment} {self._confirmed.offset}\n"
        try:
            os.write(self._ledger_fd, line.encode())  # no fsync: losing it only replays this batch
        except OSError as error:
            # The rows are in ClickHouse. Like a lost line, this only replays them at the next start;
            # raising would kill the Writer, and keep the confirmed segments (often what fills the
            # disk) from being deleted.
            log.warning("spool: cannot record the confirmed mark in the ledger (replayed if we crash now): %s", error)
        else:
            self._ledger_size += len(line)
        while self._unconfirmed and self._unconfirmed[0][0] < self._confirmed:
            self._unconfirmed_events -= self._unconfirmed.popleft()[2]
        for number in sorted(self._segments):
            segment = self._segments[number]
            if segment is self._active or SpoolPosition(number, segment.size) > self._confirmed:
                break
            with_error = self._remove_segment(number)
            if with_error:
                break
        if self._ledger_size > LEDGER_COMPACT_BYTES:
            try:
                self._rewrite_ledger(self._confirmed, None)
            except OSError as error:  # the ledger stays as it was, longer; tried again next time
                log.warning("spool: cannot compact the ledger: %s", error)
        self._publish_sizes()
        self._publish_oldest()

    def _end_of(self, batch: Batch) -> SpoolPosition:
        last = batch.deliveries[-1]
        assert last.position is not None
        return SpoolPosition(last.position.segment, last.position.offset + HEADER.size + len(last.rows))

    def _remove_segment(self, number: int) -> bool:
        try:
            (self.directory / segment_name(number)).unlink()
        except FileNotFoundError:
            pass
        except OSError as error:
            log.warning("spool: cannot delete confirmed segment %s: %s", segment_name(number), error)
            return True
        del self._segments[number]
        return False

    # -- appending ----------------------------------------------------------------------------

    async def append(
        self, rows: bytes, count: int, received_at: float, *, durable: bool, confirmation: asyncio.Future[int] | None
    ) -> None:
        """Writes one request's record; with `durable`, returns once it is fsynced.
        Raises SpoolUnavailable (answered 503) when the record cannot be written."""
        self._ensure_open()
        received_ms = int(time.time() * 1000)
        record = encode_record(rows, count, received_ms)
        if self._total_bytes() + len(record) > self._max_bytes:
            self._metrics.rejected_full.inc({})
            raise SpoolUnavailable(f"the spool is full (SPOOL_MAX_BYTES={self._max_bytes}); retry later")
        assert self._active is not None and self._active.fd is not None
        try:
            if self._active.size >= self._segment_bytes:
                self._roll()  # creates a file: fails like a write when the directory is gone
            segment = self._active
            position = SpoolPosition(segment.number, segment.size)
            self._write_all(segment, record)
        except OSError as error:
            self._metrics.write_errors.inc({})
            raise SpoolUnavailable(f"cannot write the spool: {error.strerror or error}") from None
        segment.size += len(record)
        end = SpoolPosition(segment.number, segment.size)
        self._written = end
        self._track_unconfirmed(position, received_ms, count)
        # MAX_BUFFER_EVENTS bounds the events the pipeline holds and the rows waiting here together.
        keep = (
            not self._undelivered_on_disk
            and self._memory.held + self._undelivered_in_memory + count <= self._memory.capacity_events
        )
        if keep:
            self._undelivered_in_memory += count
        else:
            self._undelivered_on_disk += 1
        self._undelivered.append(_Record(position, end.offset, count, received_at, rows if keep else None, confirmation))
        self._wrote.set()
        if durable:
            synced = asyncio.get_running_loop().create_future()
            self._sync_waiters.append((end, synced))
            await synced

    def _write_all(self, segment: _Segment, record: bytes) -> None:
        assert segment.fd is not None
        written = 0
        try:
            while written < len(record):
                written += os.write(segment.fd, record[written:])
        except OSError:
            if written:  # never leave half a record behind a good one
                try:
                    os.ftruncate(segment.fd, segment.size)
                except OSError:
                    log.error("spool: cannot truncate a partial record in %s; rolling", segment_name(segment.number))
                    self._roll()
            raise

    def _roll(self) -> None:
        assert self._active is not None
        self._start_segment(self._active.number + 1)
        self._metrics.segments.set({}, len(self._segments))

    def _ensure_open(self) -> None:
        if self._opened:
            return
        now = time.monotonic()
        if now >= self._next_open_attempt:
            self._next_open_attempt = now + REOPEN_INTERVAL_SECONDS
            recovered = self.open()
            if recovered is not None:
                # The batch in flight at a crash goes first and whole, as the Batch it was (its
                # events are already reserved in the MemoryLimit): as separate records the Batcher
                # would merge it with later ones, and the insert would no longer carry the token
                # of the first attempt, which ClickHouse may already have stored.
                self._recovered_late = recovered
                self._forwardable.set()
        if not self._opened:
            raise SpoolUnavailable(self._error or "the spool is not open")

    def _fail(self, message: str) -> None:
        if message != self._error:
            log.error("spool: %s", message)
        self._error = message

    # -- the tasks ----------------------------------------------------------------------------

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._sync_loop())
            tasks.create_task(self._forward_loop())

    def stop_forwarding(self) -> None:
        """From now on records stay in the spool for the next start."""
        self._forwarding = False
        self._forwardable.set()

    def close(self) -> None:
        for fd in [*self._closing_fds, *(s.fd for s in self._segments.values() if s.fd is not None)]:
            try:
                os.fsync(fd)
                os.close(fd)
            except OSError as error:  # already closed by an fsync pass cut short, or a failing disk
                log.warning("spool: closing a segment: %s", error)
        self._closing_fds.clear()
        for segment in self._segments.values():
            segment.fd = None
        if self._ledger_fd is not None:
            os.fsync(self._ledger_fd)
            os.close(self._ledger_fd)
            self._ledger_fd = None

    async def _sync_loop(self) -> None:
        while True:
            await self._wrote.wait()
            self._wrote.clear()
            if self._active is None or self._active.fd is None:
                continue
            target = self._written
            closing, self._closing_fds = self._closing_fds, []
            active_fd = self._active.fd
            sync_directory = self._directory_dirty
            self._directory_dirty = False
            started = time.perf_counter()
            try:
                await asyncio.to_thread(self._sync_files, closing, active_fd, sync_directory)
            except OSError as error:
                self._metrics.write_errors.inc({})
                self._fail(f"fsync failed: {error.strerror or error}")
                self._fsync_failing = True
                self._fail_waiters(target, SpoolUnavailable(f"the spool could not be made durable: {error.strerror or error}"))
            else:
                self._metrics.fsync_duration.observe({}, time.perf_counter() - started)
                self._fsync_failing = False
                self._wake_waiters(target)
            self._synced = max(self._synced, target)
            self._forwardable.set()

    def _sync_files(self, closing: list[int], active_fd: int, sync_directory: bool) -> None:
        for fd in closing:
            os.fsync(fd)
            os.close(fd)
        os.fsync(active_fd)
        if sync_directory:
            self._sync_directory()

    def _sync_directory(self) -> None:
        directory_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(directory_fd)
        finally:
            os.close(directory_fd)

    def _wake_waiters(self, through: SpoolPosition) -> None:
        while self._sync_waiters and self._sync_waiters[0][0] <= through:
            _, waiter = self._sync_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    def _fail_waiters(self, through: SpoolPosition, error: Exception) -> None:
        while self._sync_waiters and self._sync_waiters[0][0] <= through:
            _, waiter = self._sync_waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error)

    async def _forward_loop(self) -> None:
        while True:
            if not self._forwarding:
                return
            if self._recovered_late is not None:
                batch, self._recovered_late = self._recovered_late, None
                self._deliver(batch)
                continue
            record = self._undelivered[0] if self._undelivered else None
            if record is None or SpoolPosition(record.position.segment, record.end) > self._synced:
                self._forwardable.clear()
                await self._forwardable.wait()
                continue
            await self._memory.reserve(record.count, None)
            if not self._forwarding:
                self._memory.release(record.count)
                return
            rows = record.rows if record.rows is not None else self._read_back(record)
            self._undelivered.popleft()
            if record.rows is not None:
                self._undelivered_in_memory -= record.count
            else:
                self._undelivered_on_disk -= 1
            self._deliver(Delivery(rows, record.count, record.received_at, record.position, record.confirmation))

    def _read_back(self, record: _Record) -> bytes:
        path = self.directory / segment_name(record.position.segment)
        with open(path, "rb") as segment_file:
            segment_file.seek(record.position.offset)
            data = segment_file.read(record.end - record.position.offset)
        records, _ = scan_segment(record.position.segment, data)
        if not records or records[0].payload is None:
            raise OSError(f"spool record at {record.position} in {path.name} no longer reads back intact")
        return records[0].payload

    # -- reporting ----------------------------------------------------------------------------

    def _total_bytes(self) -> int:
        return sum(segment.size for segment in self._segments.values())

    def _publish_sizes(self) -> None:
        self._metrics.bytes.set({}, self._total_bytes())
        self._metrics.segments.set({}, len(self._segments))

    def _track_unconfirmed(self, position: SpoolPosition, received_ms: int, count: int) -> None:
        self._unconfirmed.append((position, received_ms, count))
        self._unconfirmed_events += count

    def publish_metrics(self) -> None:
        """Sets the gauges from the spool's state; called at every scrape rather than at every
        append, where it cost more than the gauges told."""
        self._publish_sizes()
        self._publish_oldest()

    def _publish_oldest(self) -> None:
        oldest = self._unconfirmed[0][1] / 1000 if self._unconfirmed else 0
        self._metrics.oldest_unconfirmed_timestamp.set({}, oldest)
        self._metrics.unconfirmed_events.set({}, self._unconfirmed_events)

    @property
    def fill_ratio(self) -> float:
        return self._total_bytes() / self._max_bytes

    @property
    def unconfirmed_events(self) -> int:
        return self._unconfirmed_events

    def not_ready_reason(self) -> str | None:
        if not self._opened:
            return f"spool unavailable: {self._error}"
        if self._fsync_failing:
            return f"spool cannot make writes durable: {self._error}"
        if self.fill_ratio >= 0.9:
            return f"spool {self.fill_ratio:.0%} full"
        return None
