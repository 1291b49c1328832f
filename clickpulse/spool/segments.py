"""The spool's segment files (`segment-<12 digits>.log`): appending, rolling, group fsync, deletion.

Records are appended to the active segment; once it holds SEGMENT_BYTES the next record starts a
new one. One task fsyncs whatever was written since its last pass (the active segment, segments
retired since, and the directory when a segment was created), so many writers share one fsync; a
durable writer waits for the pass that covers its record. A segment is deleted once the confirmed
mark has passed its end.

`Segments` owns the files; `GroupFsync` is the one task that fsyncs them.

Small records are written inline on the event loop: the hot path. A large record (at least
LARGE_WRITE_BYTES), a roll to a new segment, and the rest of a partial write run in a worker
thread, one at a time; while one does, other writes queue behind it, so records never interleave.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from clickpulse.messages import Refused, SpoolPosition
from clickpulse.metrics import SpoolMetrics
from clickpulse.spool.record import HEADER, MAGIC, Extent, scan_extents

log = logging.getLogger("clickpulse.spool")

SEGMENT_NAME = re.compile(r"segment-(\d{12})\.log")
LARGE_WRITE_BYTES = 64 << 10
NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})
RECOVER_CHUNK_BYTES = 1 << 20  # recovery reads segments this much at a time


def segment_name(number: int) -> str:
    return f"segment-{number:012d}.log"


def fsync_directory(directory: Path) -> None:
    directory_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(directory_fd)
    finally:
        os.close(directory_fd)


class Segments:
    def __init__(self, *, directory: Path, segment_bytes: int, metrics: SpoolMetrics) -> None:
        self.directory = directory
        self._segment_bytes = segment_bytes
        self._metrics = metrics
        self._sizes: dict[int, int] = {}  # every segment on disk, the active one included
        self._active = 0
        self._fd: int | None = None  # the active segment, open for appending
        self._closing: list[int] = []  # retired segments: fsynced and closed by the next pass
        self._directory_dirty = False  # a segment was created since the last directory fsync
        self._must_roll = False  # a partial record could not be cut off: the next record starts a segment
        self.space_short = False  # a write failed for lack of space (ENOSPC, EDQUOT); the spool clears it
        self.gone = False  # the directory is not the one opened: no file is created or deleted by name
        self.check_directory: Callable[[], str | None] = lambda: None  # blocking: why it is not (spool/directory.py)
        self.found_gone: str | None = None  # what a check in a worker thread found
        self.total_bytes = 0
        self.written = SpoolPosition(0, 0)  # records ending at or before this are written
        self.wrote = asyncio.Event()  # set at every write; cleared by the fsync pass
        self.sync_lock = asyncio.Lock()  # held by an fsync pass, and by close()
        self._off_loop = 0  # writes in or waiting for the worker thread; inline writes wait behind them
        self._write_lock = asyncio.Lock()

    @property
    def count(self) -> int:
        return len(self._sizes)

    def size_of(self, number: int) -> int:
        """The bytes of whole records in segment `number`; 0 if it is gone."""
        return self._sizes.get(number, 0)

    def next_after(self, number: int) -> int | None:
        """The segment after `number` in log order, if there is one."""
        return min((other for other in self._sizes if other > number), default=None)

    # -- recovery (in a worker thread, before the spool is open) -------------------------------

    def recover(self, confirmed: SpoolPosition, take: Callable[[int, bytes, list[Extent]], None]) -> int:
        """Blocking. Scans every segment in order, truncates a torn or corrupt tail, deletes the
        segments ClickHouse has confirmed wholly, and starts a new active segment. Hands the
        records after `confirmed` to `take(number, data, extents)`, in log order, a chunk of at
        most about RECOVER_CHUNK_BYTES at a time (extents are offsets in the segment; `data`
        starts at the first one's offset): so recovery holds one chunk, never a whole segment.
        Returns how many segments had a damaged tail."""
        directory = self.directory
        numbers = sorted(int(m.group(1)) for name in os.listdir(directory) if (m := SEGMENT_NAME.fullmatch(name)))
        sizes: dict[int, int] = {}
        damaged = 0
        for index, number in enumerate(numbers):
            path = directory / segment_name(number)
            unconfirmed = False
            with open(path, "rb") as segment_file:
                size = os.fstat(segment_file.fileno()).st_size
                intact = 0
                while intact < size:
                    data = _read_records_at(segment_file, intact, RECOVER_CHUNK_BYTES, size)
                    extents, end = scan_extents(data, intact)
                    if not extents:
                        break
                    if number > confirmed.segment or (number == confirmed.segment and extents[-1][0] >= confirmed.offset):
                        first = 0
                        if number == confirmed.segment:
                            first = next(i for i, extent in enumerate(extents) if extent[0] >= confirmed.offset)
                        unconfirmed = True
                        if first:
                            data, extents = data[extents[first][0] - intact :], extents[first:]
                        take(number, data, extents)
                    del data, extents
                    intact = end
            if intact < size:
                damaged += 1
                log.warning(
                    "spool segment %s: %d bytes after offset %d are %s; dropped",
                    path.name, size - intact, intact, "a torn tail" if index == len(numbers) - 1 else "corrupt",
                )
                with open(path, "r+b") as segment_file:
                    segment_file.truncate(intact)
                    os.fsync(segment_file.fileno())
            if not unconfirmed:  # every record is in ClickHouse; writing resumes in a new segment
                path.unlink()
                continue
            sizes[number] = intact
        # Never a number at or before the confirmed mark, even when every segment up to it was
        # deleted: records there would count as confirmed at the next start and be dropped.
        active = max(max(sizes, default=0), confirmed.segment) + 1
        fd, size = self._create(active)
        try:
            fsync_directory(directory)
        except OSError:
            os.close(fd)
            raise
        self._sizes = sizes
        self.total_bytes = sum(sizes.values())
        self._install(active, fd, size)
        self._directory_dirty = False
        self.written = SpoolPosition(active, 0)
        return damaged

    def _create(self, number: int) -> tuple[int, int]:
        fd = os.open(self.directory / segment_name(number), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        return fd, os.fstat(fd).st_size

    def _create_checked(self, number: int) -> tuple[int, int]:
        """_create, in the directory opened only: never a file in another one put in its place."""
        self._check_still_ours()
        return self._create(number)

    def _check_still_ours(self) -> None:
        """Blocking. Raises OSError (ENOENT) if the directory is not the one opened any more, and
        leaves the reason in found_gone for the spool, on the loop, to act on."""
        gone = self.check_directory()
        if gone is not None:
            self.found_gone = gone
            raise OSError(errno.ENOENT, f"{os.strerror(errno.ENOENT)} ({gone})")

    def _install(self, number: int, fd: int, size: int) -> None:
        # Created before the active segment is retired: if that fails, the active one stays usable.
        if self._fd is not None:
            self._closing.append(self._fd)
        self._active, self._fd = number, fd
        self.total_bytes += size - self._sizes.get(number, 0)
        self._sizes[number] = size
        self._directory_dirty = True
        self._must_roll = False

    # -- appending ------------------------------------------------------------------------------

    async def append(self, record: bytes) -> tuple[SpoolPosition, SpoolPosition]:
        """Writes one record after the last; returns where it starts and where it ends.
        Raises OSError, leaving no part of the record behind a later one."""
        fd = self._fd
        assert fd is not None, "the spool is not open"
        if (
            not self._off_loop
            and len(record) < LARGE_WRITE_BYTES
            and not self._must_roll
            and self._sizes[self._active] < self._segment_bytes
        ):
            written = os.write(fd, record)  # an OSError here wrote nothing
            if written == len(record):
                return self._advance(len(record))
            return await self._off_the_loop(record, written)
        return await self._off_the_loop(record, 0)

    async def _off_the_loop(self, record: bytes, written: int) -> tuple[SpoolPosition, SpoolPosition]:
        self._off_loop += 1  # counted before the first await: no inline write slips in between
        try:
            async with self._write_lock:
                if written == 0 and (self._must_roll or self._sizes[self._active] >= self._segment_bytes):
                    if self.gone:
                        raise OSError(errno.ENOENT, "the spool directory is gone")
                    fd, size = await asyncio.to_thread(self._create_checked, self._active + 1)
                    self._install(self._active + 1, fd, size)
                    self._metrics.segments.set({}, len(self._sizes))
                if len(record) - written >= LARGE_WRITE_BYTES:
                    await asyncio.to_thread(self._write_rest, record, written)
                else:
                    self._write_rest(record, written)
                return self._advance(len(record))
        finally:
            self._off_loop -= 1

    def _write_rest(self, record: bytes, written: int) -> None:
        fd, size = self._fd, self._sizes[self._active]
        if fd is None:  # closed while this write waited its turn
            raise OSError(errno.EBADF, "the spool is closed")
        try:
            while written < len(record):
                written += os.write(fd, record[written:])
        except OSError:
            if written:  # never leave half a record behind a good one
                try:
                    os.ftruncate(fd, size)
                except OSError:
                    log.error("spool: cannot truncate a partial record in %s; rolling", segment_name(self._active))
                    self._must_roll = True
            raise

    def _advance(self, length: int) -> tuple[SpoolPosition, SpoolPosition]:
        number = self._active
        start = self._sizes[number]
        self._sizes[number] = start + length
        self.total_bytes += length
        self.written = end = SpoolPosition(number, start + length)
        self.wrote.set()
        return SpoolPosition(number, start), end

    # -- for the fsync pass ---------------------------------------------------------------------

    def take_unsynced(self) -> tuple[list[int], int | None, bool]:
        """What the next pass fsyncs: the retired segments (it closes them), the active one, and
        whether the directory changed."""
        closing, self._closing = self._closing, []
        directory_dirty, self._directory_dirty = self._directory_dirty, False
        return closing, self._fd, directory_dirty

    def directory_unsynced(self) -> None:
        """A pass failed before the directory was fsynced: the next one does it."""
        self._directory_dirty = True

    # -- deletion and closing -------------------------------------------------------------------

    async def delete_confirmed(self, confirmed: SpoolPosition) -> None:
        """Deletes the segments that end at or before `confirmed`. The active one too, once a
        write found the disk full and ClickHouse has all of it: writing goes on in a new
        segment. Without that, a spool on a disk smaller than a segment stays full for ever.
        (Otherwise the active segment stays until it rolls: replacing it after every confirmed
        batch of a quiet service would cost a file and a directory fsync each time.)"""
        if self.gone:  # the names may be another directory's files now
            return
        active = self._active
        size = self._sizes.get(active, 0)
        if self.space_short and size and SpoolPosition(active, size) <= confirmed:
            await self._retire_active(confirmed)
        doomed = []
        for number in sorted(self._sizes):
            if number == self._active or SpoolPosition(number, self._sizes[number]) > confirmed:
                break
            doomed.append(number)
        if not doomed:
            return
        for number in await asyncio.to_thread(self._unlink, doomed):
            self.total_bytes -= self._sizes.pop(number, 0)

    async def _retire_active(self, confirmed: SpoolPosition) -> None:
        """Starts a new active segment in place of a wholly confirmed one, whose descriptor is
        closed at once (no fsync: ClickHouse has every record), so deleting it frees its space."""
        self._off_loop += 1  # no inline write into the segment being retired
        try:
            async with self._write_lock, self.sync_lock:
                active, fd = self._active, self._fd
                if fd is None or SpoolPosition(active, self._sizes[active]) > confirmed:
                    return
                try:
                    new_fd, size = await asyncio.to_thread(self._create_checked, active + 1)
                except OSError as error:
                    log.warning("spool: cannot start a new segment in place of the confirmed %s: %s", segment_name(active), error)
                    return
                self._install(active + 1, new_fd, size)
                self._closing.remove(fd)
                os.close(fd)
        finally:
            self._off_loop -= 1

    def _unlink(self, numbers: list[int]) -> list[int]:
        try:
            self._check_still_ours()  # these names may be another directory's files now
        except OSError:
            return []
        deleted = []
        for number in numbers:
            try:
                (self.directory / segment_name(number)).unlink()
            except FileNotFoundError:
                pass
            except OSError as error:
                log.warning("spool: cannot delete confirmed segment %s: %s", segment_name(number), error)
                break
            deleted.append(number)
        return deleted

    async def close(self) -> None:
        async with self.sync_lock:
            fds, self._closing = [*self._closing, *([self._fd] if self._fd is not None else [])], []
            self._fd = None
            if fds:
                await asyncio.to_thread(_fsync_and_close_all, fds)


def _read_records_at(segment_file: BinaryIO, offset: int, chunk: int, size: int) -> bytes:
    """Blocking. At least `chunk` bytes from `offset` (less at the end of the file), or the whole
    record that starts there if it is longer."""
    segment_file.seek(offset)
    data = segment_file.read(min(chunk, size - offset))
    if len(data) >= HEADER.size:
        magic, length = HEADER.unpack_from(data)[:2]
        whole = HEADER.size + length
        if magic == MAGIC and len(data) < whole <= size - offset:
            segment_file.seek(offset)
            data = segment_file.read(whole)
    return data


def _fsync_and_close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.fsync(fd)
        except OSError as error:  # a failing disk
            log.warning("spool: closing a segment: %s", error)
        finally:
            os.close(fd)


class GroupFsync:
    """The one task that makes writes durable: each pass fsyncs everything written since the
    last, then answers every writer waiting for a record the pass covered."""

    def __init__(
        self,
        segments: Segments,
        *,
        metrics: SpoolMetrics,
        on_synced: Callable[[], None],
        on_error: Callable[[str], None],
        check_directory: Callable[[], str | None] = lambda: None,
        on_gone: Callable[[str], None] = lambda message: None,
    ) -> None:
        self._segments = segments
        self._metrics = metrics
        self._on_synced = on_synced
        self._on_error = on_error
        self._check_directory = check_directory  # blocking: why the directory is not the spool's any more
        self._on_gone = on_gone
        self.synced = SpoolPosition(0, 0)  # records ending at or before this are fsynced
        self.failing = False  # the last pass failed; until one succeeds again
        self._waiters: collections.deque[tuple[SpoolPosition, asyncio.Future[None]]] = collections.deque()

    def recovered(self, through: SpoolPosition) -> None:
        """What recovery found before `through` was on disk already."""
        self.synced = max(self.synced, through)

    async def wait_synced(self, end: SpoolPosition) -> None:
        """Returns once a pass has fsynced everything up to `end`; raises Refused if it failed."""
        synced: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((end, synced))
        await synced

    async def run(self) -> None:
        segments = self._segments
        while True:
            await segments.wrote.wait()
            segments.wrote.clear()
            target = segments.written
            started = time.perf_counter()
            try:
                async with segments.sync_lock:
                    closing, active_fd, sync_directory = segments.take_unsynced()
                    if active_fd is None:  # closed
                        continue
                    try:
                        gone = await asyncio.to_thread(
                            _sync_files, segments.directory, closing, active_fd, sync_directory, self._check_directory
                        )
                    except OSError:
                        if sync_directory:
                            segments.directory_unsynced()
                        raise
                    if gone is not None:  # fsynced, into files no restart will find
                        self._on_gone(gone)
                        raise OSError(errno.ENOENT, gone)
            except OSError as error:
                self._metrics.write_errors.inc({})
                if not segments.gone:
                    self._on_error(f"fsync failed: {error.strerror or error}")
                self.failing = True
                self._settle(target, error)
            else:
                self._metrics.fsync_duration.observe({}, time.perf_counter() - started)
                self.failing = False
                self._settle(target, None)
            self.synced = max(self.synced, target)
            self._on_synced()

    def _settle(self, through: SpoolPosition, error: OSError | None) -> None:
        waiters = self._waiters
        while waiters and waiters[0][0] <= through:
            _, waiter = waiters.popleft()
            if waiter.done():
                continue
            if error is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(
                    Refused("overloaded", f"the spool could not be made durable: {error.strerror or error}", retry_after=1)
                )

    def fail_waiters(self, error: BaseException) -> None:
        """Nobody will fsync any more: every waiting writer gets `error` now."""
        while self._waiters:
            _, waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error)


def _sync_files(
    directory: Path, closing: list[int], active_fd: int, sync_directory: bool, check_directory: Callable[[], str | None]
) -> str | None:
    failure: OSError | None = None
    for fd in closing:
        try:
            os.fsync(fd)
        except OSError as error:
            failure = failure or error
        finally:
            os.close(fd)
    if failure is not None:
        raise failure
    os.fsync(active_fd)
    if sync_directory:
        fsync_directory(directory)
    return check_directory()
