"""The spool directory itself: one process (one Spool) per directory; deleted or replaced while running; a full disk."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest

from clickpulse.messages import Refused, SpoolPosition
from clickpulse.spool import LOCK_NAME, SpoolDirInUse, segment_name
from clickpulse.spool import directory as directory_watch
from tests.spool.conftest import OpenSpool
from tests.spool.helpers import append_and_forward, rows, segment_files, write_to_clickhouse
from tests.support import eventually


async def test_a_second_spool_on_a_held_directory_is_refused_and_touches_nothing(open_spool: OpenSpool, spool_dir: Path) -> None:
    first = await open_spool(spool_dir)
    await first.accept(rows("kept"))
    before = {name: (spool_dir / name).read_bytes() for name in segment_files(spool_dir)}
    with pytest.raises(SpoolDirInUse, match=rf"in use by another clickpulse \(pid {os.getpid()}\)"):
        await open_spool(spool_dir, run=False)
    assert {name: (spool_dir / name).read_bytes() for name in segment_files(spool_dir)} == before
    first.spool.advertise("http://127.0.0.1:8123")
    with pytest.raises(SpoolDirInUse, match=r"at http://127\.0\.0\.1:8123"):
        await open_spool(spool_dir, run=False)


async def test_the_lock_is_released_at_close(open_spool: OpenSpool, spool_dir: Path) -> None:
    first = await open_spool(spool_dir)
    await first.shut()
    assert (spool_dir / LOCK_NAME).read_text() == ""
    second = await open_spool(spool_dir)
    assert second.spool.not_ready_reason() is None


async def test_a_full_disk_refuses_reports_and_recovers_once_the_active_segment_is_confirmed(
    open_spool: OpenSpool, spool_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    harness = await open_spool(spool_dir)
    deliveries = await append_and_forward(harness, [rows("a"), rows("b")])
    real_write = os.write
    segment_fds = set()

    def full_disk(fd: int, data: bytes) -> int:
        if fd in segment_fds:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    segment_fds.add(harness.spool._segments._fd)
    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(Refused, match="disk is full"):
        await harness.accept(rows("c"))
    reason = harness.spool.not_ready_reason()
    assert reason is not None and "disk full" in reason and "ENOSPC" in reason
    assert segment_files(spool_dir) == [segment_name(1)]

    await write_to_clickhouse(harness, deliveries)  # ClickHouse has all of the active segment

    assert segment_files(spool_dir) == [segment_name(2)]  # its space is free again
    assert harness.spool.not_ready_reason() is None
    monkeypatch.setattr(os, "write", real_write)
    await harness.accept(rows("c"))
    assert (await harness.forwarded.wait_for(3))[-1].position == SpoolPosition(2, 0)


@pytest.fixture
def quick_watch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(directory_watch, "WATCH_INTERVAL_SECONDS", 0.01)


async def test_a_deleted_directory_is_found_by_the_fsync_pass_before_a_durable_accept_is_answered(
    open_spool: OpenSpool, spool_dir: Path
) -> None:
    harness = await open_spool(spool_dir)
    await harness.accept(rows("before"))
    shutil.rmtree(spool_dir)

    with pytest.raises(Refused, match="deleted or moved away"):
        await harness.accept(rows("into an unlinked file"))  # written, fsynced, never durable
    with pytest.raises(Refused, match="deleted or moved away"):
        await harness.accept(rows("after"), durable=False)
    reason = harness.spool.not_ready_reason()
    assert reason is not None and "spool directory gone" in reason
    assert not spool_dir.exists()


async def test_a_replaced_directory_is_refused_and_its_files_never_touched(
    open_spool: OpenSpool, spool_dir: Path, tmp_path: Path
) -> None:
    harness = await open_spool(spool_dir, segment_bytes=1)  # every record rolls to a new segment
    deliveries = await append_and_forward(harness, [rows("a"), rows("b")])
    spool_dir.rename(tmp_path / "moved")
    spool_dir.mkdir()
    other = (spool_dir / segment_name(1))
    other.write_bytes(b"another spool's segment")

    with pytest.raises(Refused, match="replaced"):
        await harness.accept(rows("c"))
    await write_to_clickhouse(harness, deliveries)  # deletes by name nothing in the new directory

    assert sorted(path.name for path in spool_dir.iterdir()) == [segment_name(1)]
    assert other.read_bytes() == b"another spool's segment"
    assert "replaced" in (harness.spool.not_ready_reason() or "")


async def test_the_watch_finds_a_deleted_directory_without_any_write(
    open_spool: OpenSpool, spool_dir: Path, quick_watch: None
) -> None:
    harness = await open_spool(spool_dir)
    shutil.rmtree(spool_dir)
    await eventually(lambda: "deleted" in (harness.spool.not_ready_reason() or ""), timeout=2)
    with pytest.raises(Refused, match="deleted or moved away"):
        await harness.accept(rows("x"), durable=False)
