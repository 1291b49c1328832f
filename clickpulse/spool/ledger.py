"""The ledger (`ledger.log`): how far ClickHouse has confirmed the log, and the batch in flight.

One line per event, appended: `C <segment> <offset>` once ClickHouse confirmed every record
before that position, `I <segment> <offset> <segment> <offset>` (fsynced) before a batch covering
that range is inserted. A line without its newline is a torn write and never happened. At open
the ledger is rewritten as its two meaningful lines; once it passes LEDGER_COMPACT_BYTES it is
rewritten as the confirmed mark alone.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
from pathlib import Path

from clickpulse.messages import SpoolPosition
from clickpulse.spool.segments import fsync_directory

log = logging.getLogger("clickpulse.spool")

LEDGER_NAME = "ledger.log"
LEDGER_COMPACT_BYTES = 1 << 20

Intent = tuple[SpoolPosition, SpoolPosition]  # [start, end) of the batch being inserted


def parse_ledger(text: bytes) -> tuple[SpoolPosition, Intent | None]:
    """The confirmed mark and the intent still open after it, from a ledger's bytes."""
    confirmed = SpoolPosition(0, 0)
    intent: Intent | None = None
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
    return confirmed, intent


def confirmed_line(position: SpoolPosition) -> bytes:
    return b"C %d %d\n" % (position.segment, position.offset)


def intent_line(start: SpoolPosition, end: SpoolPosition) -> bytes:
    return b"I %d %d %d %d\n" % (start.segment, start.offset, end.segment, end.offset)


class LedgerFile:
    """The ledger of one spool directory. `recover()` runs in a worker thread; the rest on the
    event loop, with every fsync and rewrite off it. One lock orders the lines and the rewrites."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._fd: int | None = None
        self._size = 0
        self._lock = asyncio.Lock()
        self.confirmed = SpoolPosition(0, 0)  # every record before this is in ClickHouse
        self.frozen = False  # the directory is gone: the ledger is not rewritten by name any more

    def recover(self) -> Intent | None:
        """Blocking. Reads the ledger, rewrites it compacted and opens it for appending; returns
        the intent of the batch in flight at a crash, if there was one."""
        path = self._directory / LEDGER_NAME
        confirmed, intent = parse_ledger(path.read_bytes() if path.exists() else b"")
        self._rewrite(confirmed, intent)
        self.confirmed = confirmed
        return intent

    def _rewrite(self, confirmed: SpoolPosition, intent: Intent | None) -> None:
        lines = confirmed_line(confirmed) + (intent_line(*intent) if intent else b"")
        temporary = self._directory / (LEDGER_NAME + ".new")
        with open(temporary, "wb") as ledger:
            ledger.write(lines)
            ledger.flush()
            os.fsync(ledger.fileno())
        os.replace(temporary, self._directory / LEDGER_NAME)
        fsync_directory(self._directory)
        # Opened before the old one is closed: if this fails, _fd must not name a closed
        # descriptor, whose number the next segment could get (ledger lines in a segment).
        fd = os.open(self._directory / LEDGER_NAME, os.O_WRONLY | os.O_APPEND)
        if self._fd is not None:
            os.close(self._fd)
        self._fd = fd
        self._size = len(lines)

    async def record_intent(self, start: SpoolPosition, end: SpoolPosition) -> None:
        """The range about to be inserted, durable before the insert. Raises OSError."""
        async with self._lock:
            if self._fd is None:
                return
            line = intent_line(start, end)
            os.write(self._fd, line)  # one short line: inline, like a small record
            self._size += len(line)
            await asyncio.to_thread(os.fsync, self._fd)

    async def record_confirmed(self, end: SpoolPosition) -> SpoolPosition:
        """Moves the confirmed mark to `end` (never back); returns the mark. Never raises."""
        async with self._lock:
            self.confirmed = max(self.confirmed, end)
            if self._fd is None:
                return self.confirmed
            line = confirmed_line(self.confirmed)
            try:
                os.write(self._fd, line)  # no fsync: losing it only replays this batch
            except OSError as error:
                # The rows are in ClickHouse. Like a lost line, this only replays them at the next
                # start; raising would kill the Writer, and keep the confirmed segments (often what
                # fills the disk) from being deleted.
                log.warning("spool: cannot record the confirmed mark in the ledger (replayed if we crash now): %s", error)
            else:
                self._size += len(line)
            if self._size > LEDGER_COMPACT_BYTES and not self.frozen:
                try:
                    await asyncio.to_thread(self._rewrite, self.confirmed, None)
                except OSError as error:  # the ledger stays as it was, longer; tried again next time
                    log.warning("spool: cannot compact the ledger: %s", error)
            return self.confirmed

    async def close(self) -> None:
        async with self._lock:
            fd, self._fd = self._fd, None
            if fd is not None:
                await asyncio.to_thread(_fsync_and_close, fd)


def _fsync_and_close(fd: int) -> None:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Unconfirmed:
    """How many events the spool holds that ClickHouse has not confirmed, and where the oldest
    unconfirmed record is, without a word per record on disk: a count, and (segment, offset,
    receipt unix ms, events) of each record forwarded to the Batcher and not yet confirmed
    (bounded by the MemoryLimit, which reserved them), in the order forwarded. Records not yet
    forwarded are described by the Replay (spool/replay.py), which comes after them in log order."""

    def __init__(self) -> None:
        self._forwarded: collections.deque[tuple[int, int, int, int]] = collections.deque()
        self.events = 0

    def add(self, count: int) -> None:
        """`count` more events are in the spool (appended, or found at open)."""
        self.events += count

    def forwarded(self, segment: int, offset: int, received_ms: int, count: int) -> None:
        self._forwarded.append((segment, offset, received_ms, count))

    def drop_before(self, confirmed: SpoolPosition) -> None:
        records, segment, offset = self._forwarded, confirmed.segment, confirmed.offset
        while records and (records[0][0] < segment or (records[0][0] == segment and records[0][1] < offset)):
            self.events -= records.popleft()[3]

    @property
    def oldest_forwarded_ms(self) -> int | None:
        """Receipt time (unix ms) of the oldest record forwarded and not confirmed, if any."""
        return self._forwarded[0][2] if self._forwarded else None
