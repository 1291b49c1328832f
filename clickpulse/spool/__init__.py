"""The spool: a write-ahead log between the HTTP intake and the Batcher (SPOOL_DIR).

Each accepted request is appended as one checksummed record (record.py) to the active segment
file (segments.py); one task fsyncs whatever was written since its last pass, so many requests
share one fsync, and a request acknowledged in `disk` mode waits for the pass that covers its
record. Fsynced records are forwarded in log order to the Batcher as MAX_BUFFER_EVENTS leaves
room; what does not fit in memory waits on disk and is read back when its turn comes
(replay.py), so the spool, not memory, absorbs a long ClickHouse outage. Nor does the spool's
bookkeeping grow with it: per record only for the records memory holds anyway (rows kept, records
forwarded and not confirmed, requests waiting for a confirmation); the records waiting on disk are
one range behind a cursor, and the unconfirmed count is one number.

The Writer inserts batches in log order. Before each insert the batch's range goes to the ledger
(ledger.py), fsynced; once ClickHouse confirmed it, its end becomes the confirmed mark and the
segments wholly before it are deleted. At open, records after the mark are replayed; the batch in
flight at a crash goes first, whole, with exactly its rows, so the server's deduplication token
matches the first attempt.

`Spool` is the buffering path with a spool (ports.BufferingPath). Every blocking file operation
runs in a worker thread, except the inline write of a small record: the hot path.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path

from clickpulse.memory_limit import MemoryLimit
from clickpulse.messages import Batch, Delivery, PipelineDown, Refused, SpoolPosition
from clickpulse.metrics import SpoolMetrics
from clickpulse.spool import directory as directory_watch
from clickpulse.spool.directory import DirectoryWatch
from clickpulse.spool.ledger import (
    LEDGER_COMPACT_BYTES,
    LEDGER_NAME,
    LedgerFile,
    Unconfirmed,
    parse_ledger,
)
from clickpulse.spool.record import (
    HEADER,
    MAGIC,
    Extent,
    ScannedRecord,
    checksum,
    encode_record,
    record_end,
    scan_extents,
    scan_segment,
)
from clickpulse.spool.lock import LOCK_NAME, SpoolDirInUse, SpoolDirLock
from clickpulse.spool.replay import Admission, Recovered, Replay, recover
from clickpulse.spool.segments import (
    LARGE_WRITE_BYTES,
    NO_SPACE,
    SEGMENT_NAME,
    GroupFsync,
    Segments,
    segment_name,
)

__all__ = [
    "HEADER",
    "LARGE_WRITE_BYTES",
    "LEDGER_COMPACT_BYTES",
    "LEDGER_NAME",
    "LOCK_NAME",
    "MAGIC",
    "REOPEN_INTERVAL_SECONDS",
    "SEGMENT_NAME",
    "Extent",
    "ScannedRecord",
    "Spool",
    "SpoolDirInUse",
    "checksum",
    "encode_record",
    "parse_ledger",
    "scan_extents",
    "scan_segment",
    "segment_name",
]

log = logging.getLogger(__name__)

REOPEN_INTERVAL_SECONDS = 1.0  # while the spool cannot be opened, run() tries again this often
NEARLY_FULL = 0.9


class Spool:
    takes_durable = True

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
        self._memory = memory
        self._metrics = metrics
        self._segments = Segments(directory=directory, segment_bytes=segment_bytes, metrics=metrics)
        self._unconfirmed = Unconfirmed()
        self._replay = Replay(
            directory=directory, memory=memory, deliver=deliver, synced=self._synced, segments=self._segments,
            unconfirmed=self._unconfirmed,
        )
        self._watch = DirectoryWatch(directory)
        self._segments.check_directory = self._watch.check
        self._fsync = GroupFsync(
            self._segments, metrics=metrics, on_synced=self._replay.wake, on_error=self._fail,
            check_directory=self._watch.check, on_gone=self._directory_gone,
        )
        self._ledger = LedgerFile(directory)
        self._open_lock = asyncio.Lock()
        self._directory_lock: SpoolDirLock | None = None  # held from the first open to close()
        self._opened = False
        self._ended = False  # run() has returned: nothing is fsynced or forwarded any more
        self._closed = False
        self._error: str | None = None
        self._gone: str | None = None  # why SPOOL_DIR is not the directory opened any more

    # -- the lifecycle ----------------------------------------------------------------------------

    async def open(self) -> None:
        """Locks and recovers the directory, off the event loop. An OSError is recorded (logged,
        and the reason /readyz gives), not raised: the spool stays closed and run() tries again.
        Raises SpoolDirInUse, having touched nothing, when another process holds the directory."""
        async with self._open_lock:
            if self._opened or self._closed:
                return
            admission = Admission(self._memory)
            try:
                recovered = await asyncio.to_thread(self._recover, admission, asyncio.get_running_loop().time)
            except OSError as error:
                self._fail(f"cannot open spool directory {self.directory}: {error.strerror or error}")
                return
            self._install(recovered, admission)

    def _recover(self, admission: Admission, clock: Callable[[], float]) -> Recovered:
        self.directory.mkdir(parents=True, exist_ok=True)
        if self._directory_lock is None:  # before anything in the directory is read or changed
            self._directory_lock = SpoolDirLock(self.directory)
        self._watch.pin()
        return recover(self._ledger, self._segments, admission, clock)

    def _install(self, recovered: Recovered, admission: Admission) -> None:
        if recovered.damaged_segments:
            self._metrics.corrupt_records.add({}, recovered.damaged_segments)
        self._fsync.recovered(self._segments.written)
        self._unconfirmed.add(recovered.events)
        self._replay.load(recovered, admission, self._segments.written)
        replayed = recovered.events
        if replayed:
            self._metrics.replayed_events.add({}, replayed)
            log.warning("spool: replaying %d unconfirmed events from %s", replayed, self.directory)
        self._opened = True
        self._error = None
        self.publish_metrics()

    async def run(self) -> None:
        """The actor: opens the spool if open() could not (retrying every
        REOPEN_INTERVAL_SECONDS), then runs the group fsync and the forwarding. However it ends,
        whoever still waits on it is answered PipelineDown at once."""
        try:
            while not self._opened:
                if self._closed:
                    return
                await self.open()
                if not self._opened:
                    await asyncio.sleep(REOPEN_INTERVAL_SECONDS)
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._fsync.run())
                tasks.create_task(self._replay.forward_loop())
                tasks.create_task(self._watch_directory())
        finally:
            self._ended = True
            down = PipelineDown("the spool has stopped")
            self._fsync.fail_waiters(down)
            self._replay.fail_waiters(down)

    async def _watch_directory(self) -> None:
        """Every WATCH_INTERVAL_SECONDS: is the directory still the one opened (between fsync
        passes, which check it too), and after a full disk, can a confirmed active segment go?"""
        while True:
            await asyncio.sleep(directory_watch.WATCH_INTERVAL_SECONDS)
            if self._gone is None:
                gone = await asyncio.to_thread(self._watch.check)
                if gone is not None:
                    self._directory_gone(gone)
            if self._segments.space_short and self._gone is None:
                await self._reclaim(self._ledger.confirmed)

    def _directory_gone(self, message: str) -> None:
        if self._gone is not None:
            return
        log.error("spool: %s; refusing events (503) until restarted: records not yet confirmed and not held in "
                  "memory are lost with its files", message)
        self._gone = message
        self._segments.gone = True
        self._ledger.frozen = True

    async def _reclaim(self, confirmed: SpoolPosition) -> None:
        """Deletes what ClickHouse has confirmed; a full disk has room again if that freed some."""
        before = self._segments.total_bytes
        await self._segments.delete_confirmed(confirmed)
        if self._segments.found_gone is not None:
            self._directory_gone(self._segments.found_gone)
        elif self._segments.total_bytes < before:
            self._segments.space_short = False  # room again, probably: the next write tells

    def stop_forwarding(self) -> None:
        """From now on records stay in the spool for the next start."""
        self._replay.stop()

    async def close(self) -> None:
        """Fsyncs and closes the files; after the Writer has finished."""
        self._closed = True
        await self._segments.close()
        await self._ledger.close()
        if self._directory_lock is not None:
            self._directory_lock.release()
            self._directory_lock = None

    def advertise(self, url: str) -> None:
        """Where this process listens: written into the lock file, for a second instance to name."""
        if self._directory_lock is not None:
            self._directory_lock.advertise(url)

    def _fail(self, message: str) -> None:
        if message != self._error:
            log.error("spool: %s", message)
        self._error = message

    def _synced(self) -> SpoolPosition:
        return self._fsync.synced

    # -- the intake port ------------------------------------------------------------------------

    async def accept(
        self,
        rows: bytes,
        count: int,
        received_at: float,
        *,
        durable: bool,
        confirmation: asyncio.Future[int] | None,
    ) -> None:
        """Appends one request's record; with `durable`, returns once it is fsynced. Raises
        Refused when it cannot be taken, PipelineDown once run() has ended."""
        if self._ended or self._closed or not self._opened or self._gone is not None:
            raise self._refusal()
        received_ms = int(time.time() * 1000)
        record = encode_record(rows, count, received_ms)
        segments = self._segments
        if segments.total_bytes + len(record) > self._max_bytes:
            self._metrics.rejected_full.inc({})
            raise Refused("overloaded", f"the spool is full (SPOOL_MAX_BYTES={self._max_bytes}); retry later")
        try:
            position, end = await segments.append(record)
        except OSError as error:
            self._metrics.write_errors.inc({})
            if segments.found_gone is not None:
                self._directory_gone(segments.found_gone)
            if error.errno in NO_SPACE:
                segments.space_short = True
                raise Refused("overloaded", f"the spool's disk is full ({error.strerror}); retry later") from None
            raise Refused("overloaded", f"cannot write the spool: {error.strerror or error}") from None
        if segments.space_short:
            segments.space_short = False
        self._unconfirmed.events += count
        self._replay.add(position, end, count, received_at, rows, confirmation, received_ms)
        if durable:
            await self._fsync.wait_synced(end)

    def _refusal(self) -> Exception:
        if self._ended:
            return PipelineDown("the spool has stopped")
        if self._closed:
            return Refused("shutting_down", "the spool is closed", retry_after=5)
        if self._gone is not None:
            return Refused("overloaded", f"{self._gone}; this process cannot spool any more", retry_after=5)
        return Refused("overloaded", self._error or "the spool is not open yet", retry_after=1)

    # -- the Writer's ledger ----------------------------------------------------------------------

    async def before_insert(self, batch: Batch) -> None:
        """The batch's range, fsynced in the ledger before it is sent. Raises OSError."""
        first = batch.first_position
        if first is not None and self._opened:
            await self._ledger.record_intent(first, _end_of(batch))

    async def after_insert(self, batch: Batch) -> None:
        """ClickHouse has the batch: its end becomes the confirmed mark, the segments wholly
        before the mark are deleted, and its events leave the MemoryLimit."""
        self._memory.release(batch.count, batch.size)
        if batch.first_position is None or not self._opened:
            return
        confirmed = await self._ledger.record_confirmed(_end_of(batch))
        self._unconfirmed.drop_before(confirmed)
        await self._reclaim(confirmed)
        self.publish_metrics()

    # -- reporting ------------------------------------------------------------------------------

    @property
    def keeps_unwritten(self) -> bool:
        """What ClickHouse has not confirmed survives for the next start: not once the directory
        is gone, with the files that held it."""
        return self._gone is None

    @property
    def unconfirmed_events(self) -> int:
        return self._unconfirmed.events

    @property
    def oldest_unconfirmed_unix(self) -> float:
        """Receipt time of the oldest unconfirmed record (the first after the confirmed mark), in
        unix seconds; 0 when there is none. Forwarded records come before those still waiting."""
        if not self._unconfirmed.events:
            return 0
        received_ms = self._unconfirmed.oldest_forwarded_ms
        if received_ms is None:
            received_ms = self._replay.oldest_waiting_ms
        return received_ms / 1000 if received_ms is not None else 0

    @property
    def fill_ratio(self) -> float:
        return self._segments.total_bytes / self._max_bytes

    def publish_metrics(self) -> None:
        """Sets the gauges; called at every scrape rather than at every append, where it cost
        more than the gauges told."""
        metrics = self._metrics
        metrics.bytes.set({}, self._segments.total_bytes)
        metrics.segments.set({}, self._segments.count)
        metrics.oldest_unconfirmed_timestamp.set({}, self.oldest_unconfirmed_unix)
        metrics.unconfirmed_events.set({}, self._unconfirmed.events)

    def not_ready_reason(self) -> str | None:
        if self._ended:
            return "spool stopped"
        if not self._opened:
            return f"spool unavailable: {self._error or 'not open yet'}"
        if self._gone is not None:
            return f"spool directory gone: {self._gone}"
        if self._segments.space_short:
            return f"spool disk full: no space left in {self.directory} (writes fail with ENOSPC until ClickHouse confirms and segments are deleted)"
        if self._fsync.failing:
            return f"spool cannot make writes durable: {self._error}"
        if self.fill_ratio >= NEARLY_FULL:
            return f"spool {self.fill_ratio:.0%} full"
        return None


def _end_of(batch: Batch) -> SpoolPosition:
    last = batch.deliveries[-1]
    assert last.position is not None
    return record_end(last.position, len(last.rows))
