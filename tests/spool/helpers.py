"""What the spool tests share: a stand-in for the Batcher, a harness around one Spool, and
small helpers over the files on disk."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from pathlib import Path

from clickpulse.memory_limit import MemoryLimit
from clickpulse.messages import Batch, Delivery
from clickpulse.metrics import SpoolMetrics
from clickpulse.spool import HEADER, ScannedRecord, Spool, encode_record, scan_segment
from tests.support import MailboxRecorder


def rows(name: str, count: int = 1) -> bytes:
    """`count` JSONEachRow lines; every line of one record carries its name."""
    return b"".join(b'{"n":"%s","i":%d}\n' % (name.encode(), index) for index in range(count))


def record_size(payload: bytes) -> int:
    return HEADER.size + len(payload)


def now() -> float:
    return asyncio.get_running_loop().time()


def segment_files(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.glob("segment-*.log"))


def fsync_passes(metrics: SpoolMetrics) -> int:
    return int(metrics.fsync_duration.get({})["count"])






@dataclass
class Harness:
    spool: Spool
    metrics: SpoolMetrics
    memory: MemoryLimit
    forwarded: MailboxRecorder
    task: asyncio.Task[None] | None = None

    def run(self) -> None:
        assert self.task is None
        self.task = asyncio.create_task(self.spool.run())

    async def accept(self, payload: bytes, count: int = 1, *, durable: bool = True) -> None:
        await self.spool.accept(payload, count, now(), durable=durable, confirmation=None)

    async def stop_task(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
        if self.task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    async def shut(self) -> None:
        """Ends the actor and closes the files, as the service does at the end of a shutdown."""
        await self.stop_task()
        await self.spool.close()


def rewrite_rows_on_disk(path: Path, old: bytes, new: bytes) -> list[ScannedRecord]:
    """Rewrites every record of a segment with `old` replaced by `new` (same length, valid
    checksums): rows the spool kept in memory come out as accepted, rows it reads back from disk
    come out rewritten. Returns the records as they were."""
    assert len(old) == len(new)
    data = path.read_bytes()
    records, intact = scan_segment(int(path.stem.split("-")[1]), data)
    assert intact == len(data)
    rewritten = b""
    for record in records:
        assert record.payload is not None
        rewritten += encode_record(record.payload.replace(old, new), record.count, record.received_ms)
    with open(path, "r+b") as segment:
        segment.write(rewritten)
    return records


async def append_and_forward(harness: Harness, payloads: list[bytes]) -> list[Delivery]:
    for payload in payloads:
        await harness.accept(payload, payload.count(b"\n"))
    return list(await harness.forwarded.wait_for(len(payloads)))


async def write_to_clickhouse(harness: Harness, deliveries: list[Delivery]) -> Batch:
    """What the Writer does with the spool around a successful insert."""
    batch = Batch(deliveries, "size")
    await harness.spool.before_insert(batch)
    await harness.spool.after_insert(batch)
    return batch
