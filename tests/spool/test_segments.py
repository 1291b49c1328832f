"""Segment files (clickpulse.spool.segments): appending, rolling, the group fsync, SPOOL_MAX_BYTES,
deletion of confirmed segments, and which file work runs off the event loop."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import pytest

from clickpulse.messages import Refused, SpoolPosition
from clickpulse.spool import LARGE_WRITE_BYTES, scan_segment, segment_name
from tests.spool.conftest import OpenSpool
from tests.spool.helpers import (
    append_and_forward,
    fsync_passes,
    now,
    record_size,
    rows,
    segment_files,
    write_to_clickhouse,
)


async def test_accepted_records_are_on_disk_and_parse_back_with_scan_segment(open_spool: OpenSpool, spool_dir: Path) -> None:
    harness = await open_spool(run=False)
    before_ms = int(time.time() * 1000)

    await harness.accept(rows("a", 3), 3, durable=False)
    await harness.accept(rows("b"), 1, durable=False)

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


async def test_non_durable_accept_returns_without_waiting_for_fsync(open_spool: OpenSpool) -> None:
    harness = await open_spool(run=False)  # no fsync pass will ever run

    async with asyncio.timeout(0.5):
        await harness.accept(rows("a"), durable=False)

    assert fsync_passes(harness.metrics) == 0


async def test_durable_accept_returns_only_after_an_fsync_pass(open_spool: OpenSpool) -> None:
    harness = await open_spool(run=False)

    accepting = asyncio.create_task(harness.accept(rows("a"), durable=True))
    await asyncio.sleep(0.05)
    assert not accepting.done()  # written, but no fsync pass yet
    assert fsync_passes(harness.metrics) == 0

    harness.run()
    async with asyncio.timeout(1.0):
        await accepting

    assert fsync_passes(harness.metrics) >= 1


async def test_concurrent_durable_accepts_share_few_fsyncs(open_spool: OpenSpool, monkeypatch: pytest.MonkeyPatch) -> None:
    harness = await open_spool()
    fsynced_fds: list[int] = []
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        fsynced_fds.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    accepts = 100

    async with asyncio.timeout(2.0):
        await asyncio.gather(*(harness.accept(rows(f"r{index}"), durable=True) for index in range(accepts)))

    assert fsynced_fds, "durable accepts must fsync"
    assert len(fsynced_fds) <= accepts // 10
    assert fsync_passes(harness.metrics) <= accepts // 10
    records, _ = scan_segment(1, (harness.spool.directory / segment_name(1)).read_bytes())
    assert len(records) == accepts


async def test_a_failing_fsync_refuses_the_waiting_accepts_and_reports_not_ready_until_one_succeeds(
    open_spool: OpenSpool, monkeypatch: pytest.MonkeyPatch
) -> None:
    harness = await open_spool()
    real_fsync = os.fsync

    def failing_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(Refused, match="could not be made durable: Input/output error") as caught:
        async with asyncio.timeout(2.0):
            await harness.accept(rows("a"), durable=True)
    assert (caught.value.reason, caught.value.retry_after) == ("overloaded", 1)
    assert "cannot make writes durable" in (harness.spool.not_ready_reason() or "")
    assert harness.metrics.write_errors.get({}) >= 1

    monkeypatch.setattr(os, "fsync", real_fsync)
    async with asyncio.timeout(2.0):
        await harness.accept(rows("b"), durable=True)
    assert harness.spool.not_ready_reason() is None


async def test_segments_roll_once_they_reach_segment_bytes(open_spool: OpenSpool, spool_dir: Path) -> None:
    payload = rows("x")
    # Two records fill a segment: the third starts the next one.
    harness = await open_spool(segment_bytes=2 * record_size(payload) - 1)

    for _ in range(5):
        await harness.accept(payload)
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


async def test_spool_max_bytes_refuses_the_record_as_full(open_spool: OpenSpool, spool_dir: Path) -> None:
    payload = rows("x")
    harness = await open_spool(max_bytes=2 * record_size(payload))
    await harness.accept(payload)
    await harness.accept(payload)  # exactly SPOOL_MAX_BYTES

    with pytest.raises(Refused, match="full") as caught:
        await harness.accept(payload)

    assert "SPOOL_MAX_BYTES" in str(caught.value)
    assert (caught.value.reason, caught.value.retry_after) == ("overloaded", 1)
    assert (spool_dir / segment_name(1)).stat().st_size == 2 * record_size(payload)
    assert harness.metrics.rejected_full.get({}) == 1
    assert harness.spool.fill_ratio == 1.0
    assert "full" in (harness.spool.not_ready_reason() or "")


async def test_losing_the_directory_at_a_segment_roll_is_a_refusal_not_a_crash(
    open_spool: OpenSpool, spool_dir: Path
) -> None:
    payload = rows("x")
    harness = await open_spool(segment_bytes=record_size(payload))
    await harness.accept(payload)
    for path in spool_dir.iterdir():
        path.unlink()
    spool_dir.rmdir()  # the next record must start a new segment, in a directory that is gone

    with pytest.raises(Refused, match="No such file or directory"):
        await harness.accept(payload)
    assert harness.metrics.write_errors.get({}) == 1

    # A directory made again in its place is another one: the ledger and the unconfirmed records
    # are in the files that were deleted, so nothing is spooled there (tests/spool/test_directory.py).
    spool_dir.mkdir()
    async with asyncio.timeout(1.0):
        with pytest.raises(Refused, match="deleted or moved away"):
            await harness.accept(payload)
    assert segment_files(spool_dir) == []
    assert "spool directory gone" in (harness.spool.not_ready_reason() or "")


async def test_segments_wholly_before_the_confirmed_mark_are_deleted_after_the_insert(
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


async def test_after_insert_frees_room_under_spool_max_bytes(open_spool: OpenSpool) -> None:
    payload = rows("x")
    harness = await open_spool(max_bytes=3 * record_size(payload), segment_bytes=record_size(payload))
    deliveries = await append_and_forward(harness, [payload] * 3)
    with pytest.raises(Refused, match="full"):
        await harness.accept(payload)

    await write_to_clickhouse(harness, deliveries[:2])

    async with asyncio.timeout(1.0):
        await harness.accept(payload)


async def test_large_records_are_written_off_the_event_loop_and_stay_in_order_with_small_ones(
    open_spool: OpenSpool, spool_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    harness = await open_spool(capacity_events=100, max_bytes=16 << 20)
    large = b'{"x":"' + b"y" * LARGE_WRITE_BYTES + b'"}\n'
    threads: dict[int, set[str]] = {}
    real_write = os.write

    def recording_write(fd: int, data: bytes) -> int:
        threads.setdefault(len(data), set()).add(threading.current_thread().name)
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", recording_write)
    payloads = [large if index % 3 == 0 else rows(f"small{index}") for index in range(12)]

    await asyncio.gather(*(
        harness.spool.accept(payload, 1, now(), durable=index % 2 == 0, confirmation=None)
        for index, payload in enumerate(payloads)
    ))
    forwarded = await harness.forwarded.wait_for(12)

    main = threading.main_thread().name
    assert main not in threads[record_size(large)]
    assert main in threads[record_size(rows("small1"))]
    records, intact = scan_segment(1, (spool_dir / segment_name(1)).read_bytes())
    assert intact == sum(record_size(payload) for payload in payloads)
    assert [record.payload for record in records] == [delivery.rows for delivery in forwarded]
    assert [record.position for record in records] == [delivery.position for delivery in forwarded]
    assert sorted(delivery.rows for delivery in forwarded) == sorted(payloads)


async def test_fsync_and_deletion_run_off_the_event_loop(
    open_spool: OpenSpool, monkeypatch: pytest.MonkeyPatch
) -> None:
    payload = rows("x")
    harness = await open_spool(segment_bytes=record_size(payload))
    calls: list[tuple[str, str]] = []
    real_fsync, real_unlink = os.fsync, os.unlink

    def fsync(fd: int) -> None:
        calls.append(("fsync", threading.current_thread().name))
        real_fsync(fd)

    def unlink(path: str | os.PathLike[str], *, dir_fd: int | None = None) -> None:
        calls.append(("unlink", threading.current_thread().name))
        real_unlink(path, dir_fd=dir_fd)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "unlink", unlink)
    deliveries = await append_and_forward(harness, [payload, payload])
    await write_to_clickhouse(harness, deliveries[:1])

    assert {kind for kind, _ in calls} == {"fsync", "unlink"}
    assert all(thread != threading.main_thread().name for _, thread in calls)
