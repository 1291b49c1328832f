"""The spool directory itself: one process (one Spool) per directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from clickpulse.spool import LOCK_NAME, SpoolDirInUse
from tests.spool.conftest import OpenSpool
from tests.spool.helpers import rows, segment_files


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
