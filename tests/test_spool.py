"""Unit tests for clickpulse.spool, against real files in tmp_path: the record format, grouped
fsync, ordered forwarding under the MemoryLimit, the ledger, recovery and torn tails."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aioprometheus import Registry

from clickpulse import spool as spool_module
from clickpulse.batcher import Batcher
from clickpulse.memory_limit import MemoryLimit
from clickpulse.messages import Batch, Delivery, SpoolPosition
from clickpulse.metrics import BatcherMetrics, SpoolMetrics
from clickpulse.spool import (
    HEADER,
    LEDGER_NAME,
    ScannedRecord,
    Spool,
    SpoolUnavailable,
    encode_record,
    scan_segment,
    segment_name,
)


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
class Forwarded:
    """Stands in for Batcher.put: records what the spool forwards, in order."""

    deliveries: list[Delivery] = field(default_factory=list)
    arrival: asyncio.Event = field(default_factory=asyncio.Event)
    on_delivery: Callable[[Delivery], None] | None = None
    batches: list[Batch] = field(default_factory=list)  # whole batches (the late-found one in flight)

    def __call__(self, message: Delivery | Batch) -> None:
        if isinstance(message, Batch):
            self.batches.append(message)
        for delivery in message.deliveries if isinstance(message, Batch) else [message]:
            self.deliveries.append(delivery)
            self.arrival.set()
            if self.on_delivery is not None:
                self.on_delivery(delivery)

    async def wait_for(self, count: int, timeout: float = 1.0) -> list[Delivery]:
        async with asyncio.timeout(timeout):
            while len(self.deliveries) < count:
                self.arrival.clear()
                await self.arrival.wait()
        return self.deliveries

    @property
    def payloads(self) -> list[bytes]:
        return [delivery.rows for delivery in self.deliveries]


@dataclass
class Harness:
    spool: Spool
    metrics: SpoolMetrics
    memory: MemoryLimit
    forwarded: Forwarded
    recovered: Batch | None
    task: asyncio.Task[None] | None = None

    def run(self) -> None:
        assert self.task is None
        self.task = asyncio.create_task(self.spool.run())

    async def append(self, payload: bytes, count: int = 1, *, durable: bool = True) -> None:
        await self.spool.append(payload, count, now(), durable=durable, confirmation=None)

    async def shut(self) -> None:
        """Ends the tasks and closes the files, as the service does at the end of a shutdown."""
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        self.spool.close()


OpenSpool = Callable[..., Awaitable[Harness]]


@pytest.fixture
async def open_spool(tmp_path: Path) -> AsyncIterator[OpenSpool]:
    harnesses: list[Harness] = []

    async def open_(
        directory: Path | None = None,
        *,
        capacity_events: int = 1000,
        max_bytes: int = 1 << 20,
        segment_bytes: int = 1 << 20,
        run: bool = True,
        memory: MemoryLimit | None = None,
    ) -> Harness:
        metrics = SpoolMetrics(Registry())
        memory = memory or MemoryLimit(capacity_events)
        forwarded = Forwarded()
        spool = Spool(
            directory=directory or tmp_path / "spool",
            max_bytes=max_bytes,
            segment_bytes=segment_bytes,
            memory=memory,
            deliver=forwarded,
            metrics=metrics,
        )
        harness = Harness(spool, metrics, memory, forwarded, spool.open())
        harnesses.append(harness)
        if run:
            harness.run()
        return harness

    yield open_
    for harness in harnesses:
        if harness.task is not None and not harness.task.done():
            harness.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await harness.task
        with contextlib.suppress(OSError):
            harness.spool.close()


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    return tmp_path / "spool"


# -- the record format ------------------------------------------------------------------------


def test_encoded_records_scan_back_with_positions_counts_and_receipt_times() -> None:
    first = encode_record(rows("a", 2), 2, 1_700_000_000_123)
    second = encode_record(rows("b"), 1, 1_700_000_000_456)

    records, intact = scan_segment(7, first + second)

    assert intact == len(first) + len(second)
    assert [(r.position, r.end, r.count, r.received_ms, r.payload) for r in records] == [
        (SpoolPosition(7, 0), len(first), 2, 1_700_000_000_123, rows("a", 2)),
        (SpoolPosition(7, len(first)), len(first) + len(second), 1, 1_700_000_000_456, rows("b")),
    ]


@pytest.mark.parametrize(
    "damage",
    [
        lambda record: record[:-1],  # torn payload
        lambda record: record[: HEADER.size - 3],  # torn header
        lambda record: record[:-2] + b"X" + record[-1:],  # payload changed: checksum fails
        lambda record: b"XXXX" + record[4:],  # bad magic
        lambda record: record[:8] + (5).to_bytes(4, "little") + record[12:],  # count changed: checksum fails
    ],
    ids=["torn-payload", "torn-header", "flipped-payload-byte", "bad-magic", "changed-count"],
)
def test_scan_stops_at_a_damaged_record_and_reports_where_intact_data_ends(damage: Callable[[bytes], bytes]) -> None:
    good = encode_record(rows("good"), 1, 1)
    bad = damage(encode_record(rows("bad"), 1, 2))
    after = encode_record(rows("after"), 1, 3)

    records, intact = scan_segment(1, good + bad + after)

    assert [record.payload for record in records] == [rows("good")]
    assert intact == len(good)


# -- appending --------------------------------------------------------------------------------


async def test_appended_records_are_on_disk_and_parse_back_with_scan_segment(open_spool: OpenSpool, spool_dir: Path) -> None:
    harness = await open_spool(run=False)
    before_ms = int(time.time() * 1000)

    await harness.append(rows("a", 3), 3, durable=False)
    await harness.append(rows("b"), 1, durable=False)

    assert segment_files(spool_dir) == [segment_name(1)]
    data = (spool_dir / segment_name(1)).read_bytes()
    records, intact = scan_segment(1, data)
    assert intact == len(data) == record_size(rows("a", 3)) + record_size(rows("b"))
    assert [(record.payload, record.count) for record in records] == [(rows("a", 3), 3), (rows("b"), 1)]
    assert [record.position for record in records] == [SpoolPosition(1, 0), SpoolPosition(1, record_size(rows("a", 3)))]
    assert all(before_ms <= record.received_ms <= int(time.time() * 1000) for record in records)
    harness.spool.publish_metrics()  # what a scrape does
    assert harness.metrics.bytes.get({}) == len(data)
    assert harness.spool.unconfirmed_events == 4


async def test_non_durable_append_returns_without_waiting_for_fsync(open_spool: OpenSpool) -> None:
    harness = await open_spool(run=False)  # no fsync pass will ever run

    async with asyncio.timeout(0.5):
        await harness.append(rows("a"), durable=False)

    assert fsync_passes(harness.metrics) == 0


async def test_durable_append_returns_only_after_an_fsync_pass(open_spool: OpenSpool) -> None:
    harness = await open_spool(run=False)

    appending = asyncio.create_task(harness.append(rows("a"), durable=True))
    await asyncio.sleep(0.05)
    assert not appending.done()  # written, but no fsync pass yet
    assert fsync_passes(harness.metrics) == 0

    harness.run()
    async with asyncio.timeout(1.0):
        await appending

    assert fsync_passes(harness.metrics) >= 1


async def test_concurrent_durable_appends_share_few_fsyncs(open_spool: OpenSpool, monkeypatch: pytest.MonkeyPatch) -> None:
    harness = await open_spool()
    fsynced_fds: list[int] = []
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        fsynced_fds.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    appends = 100

    async with asyncio.timeout(2.0):
        await asyncio.gather(*(harness.append(rows(f"r{index}"), durable=True) for index in range(appends)))

    assert fsynced_fds, "durable appends must fsync"
    assert len(fsynced_fds) <= appends // 10
    assert fsync_passes(harness.metrics) <= appends // 10
    records, _ = scan_segment(1, (harness.spool.directory / segment_name(1)).read_bytes())
    assert len(records) == appends


async def test_a_failing_fsync_refuses_the_waiting_appends_and_reports_not_ready_until_one_succeeds(
    open_spool: OpenSpool, monkeypatch: pytest.MonkeyPatch
) -> None:
    harness = await open_spool()
    real_fsync = os.fsync

    def failing_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(SpoolUnavailable, match="could not be made durable: Input/output error"):
        async with asyncio.timeout(2.0):
            await harness.append(rows("a"), durable=True)
    assert "cannot make writes durable" in (harness.spool.not_ready_reason() or "")

    monkeypatch.setattr(os, "fsync", real_fsync)
    async with asyncio.timeout(2.0):
        await harness.append(rows("b"), durable=True)
    assert harness.spool.not_ready_reason() is None


async def test_segments_roll_once_they_reach_segment_bytes(open_spool: OpenSpool, spool_dir: Path) -> None:
    payload = rows("x")
    # Two records fill a segment: the third starts the next one.
    harness = await open_spool(segment_bytes=2 * record_size(payload) - 1)

    for _ in range(5):
        await harness.append(payload)
    forwarded = await harness.forwarded.wait_for(5)

    assert segment_files(spool_dir) == [segment_name(1), segment_name(2), segment_name(3)]
    assert [delivery.position for delivery in forwarded] == [
        SpoolPosition(1, 0), SpoolPosition(1, record_size(payload)),
        SpoolPosition(2, 0), SpoolPosition(2, record_size(payload)),
        SpoolPosition(3, 0),
    ]
    for number, expected in ((1, 2), (2, 2), (3, 1)):
        records, intact = scan_segment(number, (spool_dir / segment_name(number)).read_bytes())
        assert (len(records), intact) == (expected, expected * record_size(payload))
    harness.spool.publish_metrics()  # what a scrape does
    assert harness.metrics.segments.get({}) == 3
    assert harness.metrics.bytes.get({}) == 5 * record_size(payload)


async def test_spool_max_bytes_refuses_the_record_with_spool_unavailable_full(open_spool: OpenSpool, spool_dir: Path) -> None:
    payload = rows("x")
    harness = await open_spool(max_bytes=2 * record_size(payload))
    await harness.append(payload)
    await harness.append(payload)  # exactly SPOOL_MAX_BYTES

    with pytest.raises(SpoolUnavailable, match="full") as caught:
        await harness.append(payload)

    assert "SPOOL_MAX_BYTES" in str(caught.value)
    assert (spool_dir / segment_name(1)).stat().st_size == 2 * record_size(payload)
    assert harness.metrics.rejected_full.get({}) == 1
    assert harness.spool.fill_ratio == 1.0
    assert "full" in (harness.spool.not_ready_reason() or "")


async def test_unwritable_directory_fails_softly_and_append_names_the_error(open_spool: OpenSpool, tmp_path: Path) -> None:
    plain_file = tmp_path / "plain-file"
    plain_file.write_bytes(b"")  # root ignores permissions; a file where a directory should be stops it too
    directory = plain_file / "spool"

    harness = await open_spool(directory)  # open() must not raise

    assert harness.recovered is None
    assert "Not a directory" in (harness.spool.not_ready_reason() or "")
    for _ in range(2):  # the same answer while the directory stays broken
        with pytest.raises(SpoolUnavailable, match="Not a directory") as caught:
            await harness.append(rows("a"))
        assert str(directory) in str(caught.value)
    assert harness.forwarded.deliveries == []


async def test_spool_opens_once_the_directory_can_be_made_and_then_takes_records(
    open_spool: OpenSpool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spool_module, "REOPEN_INTERVAL_SECONDS", 0.0)
    plain_file = tmp_path / "plain-file"
    plain_file.write_bytes(b"")
    harness = await open_spool(plain_file / "spool")
    with pytest.raises(SpoolUnavailable):
        await harness.append(rows("refused"))

    plain_file.unlink()  # the operator fixes the volume
    await harness.append(rows("a"))

    forwarded = await harness.forwarded.wait_for(1)
    assert [delivery.rows for delivery in forwarded] == [rows("a")]
    assert harness.spool.not_ready_reason() is None


async def test_losing_the_directory_at_a_segment_roll_is_spool_unavailable_not_a_crash(
    open_spool: OpenSpool, spool_dir: Path
) -> None:
    payload = rows("x")
    harness = await open_spool(segment_bytes=record_size(payload))
    await harness.append(payload)
    for path in spool_dir.iterdir():
        path.unlink()
    spool_dir.rmdir()  # the next record must start a new segment, in a directory that is gone

    with pytest.raises(SpoolUnavailable, match="No such file or directory"):
        await harness.append(payload)

    spool_dir.mkdir()  # once it is back, records are taken again
    async with asyncio.timeout(1.0):
        await harness.append(payload)
    assert segment_files(spool_dir) == [segment_name(2)]


def rewrite_rows_on_disk(path: Path, old: bytes, new: bytes) -> list[ScannedRecord]:
    """Rewrites every record of a segment with `old` replaced by `new` (same length, valid
    checksums): rows the spool kept in memory come out as appended, rows it reads back from disk
    come out rewritten. Returns the records as they were."""
    assert len(old) == len(new)
    data = path.read_bytes()
    records, intact = scan_segment(int(path.stem.split("-")[1]), data)
    assert intact == len(data)
    rewritten = b"".join(
        encode_record(record.payload.replace(old, new), record.count, record.received_ms) for record in records
    )
    with open(path, "r+b") as segment:
        segment.write(rewritten)
    return records


# -- forwarding -------------------------------------------------------------------------------


async def test_records_are_forwarded_in_append_order_with_their_positions(open_spool: OpenSpool, spool_dir: Path) -> None:
    harness = await open_spool()
    confirmation: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    received_at = now() - 1.5
    payloads = [rows(f"r{index}", index + 1) for index in range(5)]

    for index, payload in enumerate(payloads):
        await harness.spool.append(
            payload, index + 1, received_at + index, durable=index % 2 == 0,
            confirmation=confirmation if index == 3 else None,
        )
    forwarded = await harness.forwarded.wait_for(5)

    records, _ = scan_segment(1, (spool_dir / segment_name(1)).read_bytes())
    assert [delivery.rows for delivery in forwarded] == payloads
    assert [delivery.count for delivery in forwarded] == [1, 2, 3, 4, 5]
    assert [delivery.position for delivery in forwarded] == [record.position for record in records]
    assert [delivery.received_at for delivery in forwarded] == [received_at + index for index in range(5)]
    assert [delivery.confirmation for delivery in forwarded] == [None, None, None, confirmation, None]
    assert harness.memory.held == 15  # each forwarded record was reserved in the MemoryLimit


async def test_a_record_is_forwarded_only_once_it_is_fsynced(open_spool: OpenSpool) -> None:
    harness = await open_spool()
    passes_at_delivery: list[int] = []
    harness.forwarded.on_delivery = lambda delivery: passes_at_delivery.append(fsync_passes(harness.metrics))

    await harness.append(rows("a"), durable=False)
    await harness.forwarded.wait_for(1)

    assert passes_at_delivery == [1]


async def test_forwarding_waits_while_the_memory_limit_is_full(open_spool: OpenSpool) -> None:
    harness = await open_spool(capacity_events=10)
    assert harness.memory.try_reserve(10)  # the Writer holds everything

    await harness.append(rows("a", 2), 2)
    await harness.append(rows("b", 2), 2)
    await asyncio.sleep(0.05)
    assert harness.forwarded.deliveries == []

    harness.memory.release(3)  # room for the first record only
    await harness.forwarded.wait_for(1)
    await asyncio.sleep(0.02)
    assert harness.forwarded.payloads == [rows("a", 2)]

    harness.memory.release(7)
    await harness.forwarded.wait_for(2)
    assert harness.forwarded.payloads == [rows("a", 2), rows("b", 2)]
    assert harness.memory.held == 4


async def test_records_beyond_the_memory_capacity_are_read_back_from_disk(open_spool: OpenSpool, spool_dir: Path) -> None:
    harness = await open_spool(capacity_events=5)
    assert harness.memory.try_reserve(5)
    harness.forwarded.on_delivery = lambda delivery: harness.memory.release(delivery.count)  # an instant Writer
    payloads = [rows(f"mem{index}", 2) for index in range(4)]
    for payload in payloads:  # the pipeline holds MAX_BUFFER_EVENTS: none of them fits in memory
        await harness.append(payload, 2)
    await asyncio.sleep(0.02)
    assert harness.forwarded.deliveries == []

    records = rewrite_rows_on_disk(spool_dir / segment_name(1), b"mem", b"dsk")
    harness.memory.release(5)

    forwarded = await harness.forwarded.wait_for(4)

    assert [delivery.rows for delivery in forwarded] == [rows(f"dsk{index}", 2) for index in range(4)]
    assert [delivery.position for delivery in forwarded] == [record.position for record in records]


async def test_stop_forwarding_keeps_later_records_in_the_spool(open_spool: OpenSpool) -> None:
    harness = await open_spool()
    await harness.append(rows("a"))
    await harness.forwarded.wait_for(1)

    harness.spool.stop_forwarding()
    await harness.append(rows("b"))
    await asyncio.sleep(0.05)

    assert harness.forwarded.payloads == [rows("a")]
    assert harness.spool.unconfirmed_events == 2


# -- the ledger and recovery ------------------------------------------------------------------


async def append_and_forward(harness: Harness, payloads: list[bytes]) -> list[Delivery]:
    for payload in payloads:
        await harness.append(payload, payload.count(b"\n"))
    return list(await harness.forwarded.wait_for(len(payloads)))


async def write_to_clickhouse(harness: Harness, deliveries: list[Delivery]) -> Batch:
    """What the Writer does with the spool around a successful insert."""
    batch = Batch(deliveries, "size")
    await harness.spool.begin_insert(batch)
    harness.spool.confirm(batch)
    return batch


async def test_new_spool_replays_only_the_records_after_the_confirmed_mark(
    open_spool: OpenSpool, spool_dir: Path
) -> None:
    first = await open_spool()
    deliveries = await append_and_forward(first, [rows("a"), rows("b", 2), rows("c", 3), rows("d")])
    await write_to_clickhouse(first, deliveries[:2])
    assert first.spool.unconfirmed_events == 4
    await first.shut()

    second = await open_spool()

    assert second.recovered is None
    replayed = await second.forwarded.wait_for(2)
    await asyncio.sleep(0.02)
    assert second.forwarded.payloads == [rows("c", 3), rows("d")]
    assert [delivery.position for delivery in replayed] == [delivery.position for delivery in deliveries[2:]]
    assert [delivery.count for delivery in replayed] == [3, 1]
    assert second.metrics.replayed_events.get({}) == 4
    assert second.spool.unconfirmed_events == 4


async def test_confirmed_mark_survives_a_restart_without_replaying_anything(open_spool: OpenSpool) -> None:
    first = await open_spool()
    await write_to_clickhouse(first, await append_and_forward(first, [rows("a"), rows("b")]))
    await first.shut()

    second = await open_spool()
    await asyncio.sleep(0.05)

    assert second.recovered is None
    assert second.forwarded.deliveries == []
    assert second.metrics.replayed_events.get({}) == 0
    assert second.spool.unconfirmed_events == 0


async def test_batch_in_flight_at_a_crash_is_recovered_whole_and_not_forwarded_again(
    open_spool: OpenSpool, spool_dir: Path
) -> None:
    first = await open_spool()
    deliveries = await append_and_forward(first, [rows("a"), rows("b", 2), rows("c", 3), rows("d", 4)])
    await write_to_clickhouse(first, deliveries[:1])
    await first.spool.begin_insert(Batch(deliveries[1:3], "size"))  # the insert never came back
    await first.shut()

    second = await open_spool(capacity_events=100)

    recovered = second.recovered
    assert recovered is not None
    assert [delivery.rows for delivery in recovered.deliveries] == [rows("b", 2), rows("c", 3)]
    assert [delivery.position for delivery in recovered.deliveries] == [d.position for d in deliveries[1:3]]
    assert [delivery.count for delivery in recovered.deliveries] == [2, 3]
    assert recovered.count == 5
    assert second.memory.held == 5  # the recovered batch holds its events in memory
    await second.forwarded.wait_for(1)
    await asyncio.sleep(0.02)
    assert second.forwarded.payloads == [rows("d", 4)]
    assert second.metrics.replayed_events.get({}) == 9


async def test_recovered_batch_once_confirmed_is_not_replayed_at_the_next_start(open_spool: OpenSpool) -> None:
    first = await open_spool()
    deliveries = await append_and_forward(first, [rows("a"), rows("b")])
    await first.spool.begin_insert(Batch(deliveries, "size"))
    await first.shut()
    second = await open_spool()
    assert second.recovered is not None
    second.spool.confirm(second.recovered)
    await second.shut()

    third = await open_spool()
    await asyncio.sleep(0.05)

    assert third.recovered is None
    assert third.forwarded.deliveries == []


async def test_records_written_after_a_restart_with_everything_confirmed_are_replayed(
    open_spool: OpenSpool, spool_dir: Path
) -> None:
    # Everything before the restart was confirmed, so its segments are gone at the next start;
    # the records written after it must still sort after the confirmed mark.
    first = await open_spool()
    await write_to_clickhouse(first, await append_and_forward(first, [rows("a"), rows("b"), rows("c")]))
    await first.shut()
    second = await open_spool()
    await append_and_forward(second, [rows("after-restart")])  # acknowledged, never inserted
    await second.shut()

    third = await open_spool()

    await third.forwarded.wait_for(1)
    assert third.forwarded.payloads == [rows("after-restart")]
    assert third.spool.unconfirmed_events == 1


async def test_ledger_records_the_intent_before_the_insert_and_the_mark_after(open_spool: OpenSpool, spool_dir: Path) -> None:
    harness = await open_spool()
    deliveries = await append_and_forward(harness, [rows("a"), rows("b")])
    batch = Batch(deliveries, "size")
    end = record_size(rows("a")) + record_size(rows("b"))

    await harness.spool.begin_insert(batch)
    assert (spool_dir / LEDGER_NAME).read_text().splitlines()[-1] == f"I 1 0 1 {end}"
    harness.spool.confirm(batch)
    assert (spool_dir / LEDGER_NAME).read_text().splitlines()[-1] == f"C 1 {end}"
    assert harness.spool.unconfirmed_events == 0
    harness.spool.publish_metrics()  # what a scrape does
    assert harness.metrics.unconfirmed_events.get({}) == 0
    assert harness.metrics.oldest_unconfirmed_timestamp.get({}) == 0


async def test_segments_wholly_before_the_confirmed_mark_are_deleted_on_confirm(
    open_spool: OpenSpool, spool_dir: Path
) -> None:
    payload = rows("x")
    harness = await open_spool(segment_bytes=2 * record_size(payload) - 1)  # two records a segment
    deliveries = await append_and_forward(harness, [payload] * 6)  # segments 1, 2, 3
    assert segment_files(spool_dir) == [segment_name(1), segment_name(2), segment_name(3)]

    await write_to_clickhouse(harness, deliveries[:3])  # ends inside segment 2
    assert segment_files(spool_dir) == [segment_name(2), segment_name(3)]

    await write_to_clickhouse(harness, deliveries[3:4])  # ends exactly at segment 2's end
    assert segment_files(spool_dir) == [segment_name(3)]
    harness.spool.publish_metrics()  # what a scrape does
    assert harness.metrics.segments.get({}) == 1
    assert harness.metrics.bytes.get({}) == 2 * record_size(payload)

    await write_to_clickhouse(harness, deliveries[4:])  # the active segment stays, being written
    assert segment_files(spool_dir) == [segment_name(3)]
    assert harness.spool.unconfirmed_events == 0


async def test_confirm_frees_room_under_spool_max_bytes(open_spool: OpenSpool) -> None:
    payload = rows("x")
    harness = await open_spool(max_bytes=3 * record_size(payload), segment_bytes=record_size(payload))
    deliveries = await append_and_forward(harness, [payload] * 3)
    with pytest.raises(SpoolUnavailable, match="full"):
        await harness.append(payload)

    await write_to_clickhouse(harness, deliveries[:2])

    async with asyncio.timeout(1.0):
        await harness.append(payload)


@pytest.mark.parametrize("tear", ["garbage-appended", "last-record-cut-in-half"])
async def test_torn_tail_is_truncated_on_open_and_the_intact_records_replayed(
    open_spool: OpenSpool, spool_dir: Path, tear: str
) -> None:
    first = await open_spool()
    payloads = [rows("a"), rows("b", 2), rows("c", 3)]
    await append_and_forward(first, payloads)
    await first.shut()
    path = spool_dir / segment_name(1)
    data = path.read_bytes()
    if tear == "garbage-appended":
        path.write_bytes(data + b"\x00garbage after a crash")
        intact_payloads, intact_size = payloads, len(data)
    else:
        last = record_size(payloads[-1])
        path.write_bytes(data[: len(data) - last // 2])
        intact_payloads, intact_size = payloads[:-1], len(data) - last

    second = await open_spool()

    assert second.metrics.corrupt_records.get({}) == 1
    assert path.stat().st_size == intact_size
    await second.forwarded.wait_for(len(intact_payloads))
    await asyncio.sleep(0.02)
    assert second.forwarded.payloads == intact_payloads
    # Writing goes on in a new segment, after the intact records.
    await second.append(rows("new"))
    await second.forwarded.wait_for(len(intact_payloads) + 1)
    assert second.forwarded.deliveries[-1].position == SpoolPosition(2, 0)


async def test_intact_spool_reports_no_corrupt_records(open_spool: OpenSpool) -> None:
    first = await open_spool()
    await append_and_forward(first, [rows("a")])
    await first.shut()

    second = await open_spool()

    assert second.metrics.corrupt_records.get({}) == 0


async def test_torn_last_ledger_line_is_ignored(open_spool: OpenSpool, spool_dir: Path) -> None:
    first = await open_spool()
    deliveries = await append_and_forward(first, [rows("a"), rows("b")])
    await write_to_clickhouse(first, deliveries[:1])
    await first.shut()
    with open(spool_dir / LEDGER_NAME, "ab") as ledger:
        ledger.write(b"C 1 99")  # a confirm torn before its newline: it never happened

    second = await open_spool()

    await second.forwarded.wait_for(1)
    await asyncio.sleep(0.02)
    assert second.forwarded.payloads == [rows("b")]


async def test_spool_opened_late_replays_the_batch_in_flight_first_and_in_order(
    open_spool: OpenSpool, tmp_path: Path, spool_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The directory is unusable at start (open() fails softly) and comes back while running:
    # the batch that was in flight at the crash is replayed ahead of everything else.
    monkeypatch.setattr(spool_module, "REOPEN_INTERVAL_SECONDS", 0.0)
    first = await open_spool(spool_dir)
    deliveries = await append_and_forward(first, [rows("a"), rows("b", 2), rows("c", 3)])
    await first.spool.begin_insert(Batch(deliveries[:2], "size"))
    await first.shut()
    moved = tmp_path / "moved-away"
    spool_dir.rename(moved)
    spool_dir.write_bytes(b"")  # a file where the directory should be

    second = await open_spool(spool_dir, capacity_events=100)
    assert second.recovered is None
    with pytest.raises(SpoolUnavailable):
        await second.append(rows("refused"))
    spool_dir.unlink()
    moved.rename(spool_dir)

    await second.append(rows("d"))

    await second.forwarded.wait_for(4)
    assert second.forwarded.payloads == [rows("a"), rows("b", 2), rows("c", 3), rows("d")]
    assert [batch.count for batch in second.forwarded.batches] == [3]  # a and b, as one whole batch
    assert second.memory.held == 7  # each forwarded once, reserved once


async def test_spool_opened_late_still_keeps_at_most_the_memory_capacity_of_rows_in_memory(
    open_spool: OpenSpool, tmp_path: Path, spool_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The recovered batch's rows are held in memory (reserved in the MemoryLimit) until the Writer
    # confirms them; with the pipeline full, later rows wait on disk, not in memory.
    monkeypatch.setattr(spool_module, "REOPEN_INTERVAL_SECONDS", 0.0)
    first = await open_spool(spool_dir)
    deliveries = await append_and_forward(first, [rows("old", 3)])
    await first.spool.begin_insert(Batch(deliveries, "size"))
    await first.shut()
    moved = tmp_path / "moved-away"
    spool_dir.rename(moved)
    spool_dir.write_bytes(b"")
    second = await open_spool(spool_dir, capacity_events=10)
    with pytest.raises(SpoolUnavailable):
        await second.append(rows("refused"))
    spool_dir.unlink()
    moved.rename(spool_dir)
    await second.append(rows("mem0"))  # opens the spool; the recovered batch is forwarded first
    await second.forwarded.wait_for(2)
    second.forwarded.on_delivery = lambda delivery: second.memory.release(delivery.count)  # an instant Writer
    assert second.memory.try_reserve(10 - second.memory.held)  # full from now on

    for name in ("mem1", "mem2", "mem3"):  # the memory capacity is used up: none of them fits
        await second.append(rows(name, 5 if name != "mem3" else 3), 5 if name != "mem3" else 3)
    await asyncio.sleep(0.02)
    rewrite_rows_on_disk(spool_dir / segment_name(2), b"mem", b"dsk")
    second.memory.release(10)

    await second.forwarded.wait_for(5)
    assert second.forwarded.payloads[2:] == [rows("dsk1", 5), rows("dsk2", 5), rows("dsk3", 3)]


async def test_recovery_holds_at_most_the_memory_capacity_of_rows_not_the_whole_spool(
    open_spool: OpenSpool, spool_dir: Path
) -> None:
    # After a long outage the spool holds up to SPOOL_MAX_BYTES of unconfirmed records. Opening it
    # must not read them all into memory at once (a restart would then be killed for memory, and
    # again at every restart): only what fits under MAX_BUFFER_EVENTS keeps its rows.
    payload = b'{"x":"' + b"y" * 4000 + b'"}\n'
    first = await open_spool(capacity_events=10, segment_bytes=1 << 20, max_bytes=64 << 20, run=False)
    for _ in range(4000):  # ~16 MiB in 16 segments
        await first.append(payload, durable=False)
    await first.shut()

    tracemalloc.start()
    try:
        second = await open_spool(capacity_events=10, segment_bytes=1 << 20, max_bytes=64 << 20, run=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert second.spool.unconfirmed_events == 4000
    assert peak < 6 << 20, f"opening a 16 MiB spool allocated {peak / 2**20:.1f} MiB"
    # Every record still replays, in order: the first ten from memory, the rest read back.
    second.forwarded.on_delivery = lambda delivery: second.memory.release(delivery.count)
    second.run()
    forwarded = await second.forwarded.wait_for(4000, timeout=10.0)
    assert all(delivery.rows == payload for delivery in forwarded)
    assert [delivery.position for delivery in forwarded] == sorted(delivery.position for delivery in forwarded)


async def test_spool_opened_late_hands_the_batch_in_flight_to_the_writer_with_exactly_its_rows(
    tmp_path: Path, spool_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The batch in flight at a crash may already be in ClickHouse; only an insert of exactly its
    # rows carries the same deduplication token. When the spool directory is unusable at start and
    # comes back later, that batch must still reach the Writer whole and alone, not as separate
    # records that the Batcher merges with the ones after it.
    monkeypatch.setattr(spool_module, "REOPEN_INTERVAL_SECONDS", 0.0)
    forwarded = Forwarded()
    first = Spool(directory=spool_dir, max_bytes=1 << 20, segment_bytes=1 << 20, memory=MemoryLimit(100),
                  deliver=forwarded, metrics=SpoolMetrics(Registry()))
    first.open()
    first_task = asyncio.create_task(first.run())
    for payload in (rows("a"), rows("b", 2), rows("c", 3)):
        await first.append(payload, payload.count(b"\n"), now(), durable=True, confirmation=None)
    deliveries = await forwarded.wait_for(3)
    in_flight = Batch(deliveries[:2], "size")
    await first.begin_insert(in_flight)  # sent to ClickHouse; the answer never came back
    first_task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await first_task
    first.close()
    moved = tmp_path / "moved-away"
    spool_dir.rename(moved)
    spool_dir.write_bytes(b"")  # a file where the directory should be: open() fails softly

    memory = MemoryLimit(100)
    handed: list[Batch] = []

    async def hand_to_writer(batch: Batch) -> None:  # an instant Writer
        handed.append(batch)
        memory.release(batch.count)

    batcher = Batcher(batch_size=100, flush_interval=0.05, hand_to_writer=hand_to_writer,
                      metrics=BatcherMetrics(Registry()))
    second = Spool(directory=spool_dir, max_bytes=1 << 20, segment_bytes=1 << 20, memory=memory,
                   deliver=batcher.put, metrics=SpoolMetrics(Registry()))
    assert second.open() is None
    tasks = [asyncio.create_task(batcher.run()), asyncio.create_task(second.run())]
    try:
        spool_dir.unlink()
        moved.rename(spool_dir)
        await second.append(rows("d"), 1, now(), durable=True, confirmation=None)  # opens the spool
        async with asyncio.timeout(2.0):
            while sum(batch.count for batch in handed) < 7:
                await asyncio.sleep(0.01)
    finally:
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks)
        second.close()

    body = b"".join(delivery.rows for delivery in handed[0].deliveries)
    assert body == rows("a") + rows("b", 2)  # the same rows, so the same deduplication token
    assert [delivery.position for delivery in handed[0].deliveries] == [d.position for d in in_flight.deliveries]
    assert b"".join(delivery.rows for batch in handed[1:] for delivery in batch.deliveries) == rows("c", 3) + rows("d")
    assert memory.held == 0


async def test_while_the_memory_limit_is_full_new_records_wait_on_disk_not_in_memory(open_spool: OpenSpool) -> None:
    # MAX_BUFFER_EVENTS bounds every event held in memory; "when full, disk with a spool". With the
    # Batcher and the Writer holding all of it (a slow ClickHouse), the spool must not keep up to
    # another MAX_BUFFER_EVENTS of rows in memory waiting for their turn.
    harness = await open_spool(capacity_events=10)
    assert harness.memory.try_reserve(10)  # the pipeline is full

    def payload() -> bytes:  # 100 KB, a new object each time, as each request's rows are
        return b'{"x":"' + b"y" * 100_000 + b'"}\n'

    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        for _ in range(10):
            await harness.append(payload(), durable=False)
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert after - before < 200_000, f"{(after - before) / 1e6:.1f} MB of rows kept in memory beyond MAX_BUFFER_EVENTS"
    harness.forwarded.on_delivery = lambda delivery: harness.memory.release(delivery.count)
    harness.memory.release(10)
    forwarded = await harness.forwarded.wait_for(10)  # read back from disk, in order
    assert [delivery.rows for delivery in forwarded] == [payload()] * 10


async def test_rows_kept_in_memory_and_events_held_by_the_pipeline_never_exceed_the_capacity(
    open_spool: OpenSpool, spool_dir: Path
) -> None:
    harness = await open_spool(capacity_events=10, run=False)
    assert harness.memory.try_reserve(4)  # the pipeline holds 4: room for 6 more in memory
    for name in ("mem0", "mem1", "mem2"):  # 3 + 3 fit, the third does not
        await harness.append(rows(name, 3), 3, durable=False)
    await harness.append(rows("mem3"), 1, durable=False)  # would fit, but must not pass the one on disk
    rewrite_rows_on_disk(spool_dir / segment_name(1), b"mem", b"dsk")
    harness.forwarded.on_delivery = lambda delivery: harness.memory.release(delivery.count)
    harness.run()

    forwarded = await harness.forwarded.wait_for(4)

    assert [delivery.rows for delivery in forwarded] == [rows("mem0", 3), rows("mem1", 3), rows("dsk2", 3), rows("dsk3")]
