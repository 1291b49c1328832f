"""The ledger (clickpulse.spool.ledger): the confirmed mark and the intent before each insert,
on disk in `ledger.log`, and what a restart makes of them."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from clickpulse.messages import Batch, SpoolPosition
from clickpulse.spool import LEDGER_NAME, parse_ledger
from clickpulse.spool import ledger as ledger_module
from tests.spool.conftest import OpenSpool
from tests.spool.helpers import (
    append_and_forward,
    record_size,
    rows,
    write_to_clickhouse,
)


def test_parse_takes_the_highest_confirmed_mark_and_the_last_open_intent() -> None:
    text = b"C 1 0\nI 1 0 1 40\nC 1 40\nI 1 40 2 10\nC 1 20\n"

    assert parse_ledger(text) == (SpoolPosition(1, 40), (SpoolPosition(1, 40), SpoolPosition(2, 10)))


def test_parse_drops_an_intent_the_confirmed_mark_has_passed() -> None:
    assert parse_ledger(b"I 1 0 1 40\nC 1 40\n") == (SpoolPosition(1, 40), None)


@pytest.mark.parametrize(
    "text",
    [b"C 1 10\nC 1 99", b"C 1 10\nX 3 3\n", b"C 1 10\nC one 99\n", b"C 1 10\nC 1\n", b"C 1 10\nI 1 2 3\n"],
    ids=["torn-last-line", "unknown-kind", "not-a-number", "too-few-fields", "short-intent"],
)
def test_parse_ignores_torn_and_malformed_lines(text: bytes) -> None:
    assert parse_ledger(text) == (SpoolPosition(1, 10), None)


def test_an_empty_or_missing_ledger_confirms_nothing() -> None:
    assert parse_ledger(b"") == (SpoolPosition(0, 0), None)


async def test_ledger_records_the_intent_before_the_insert_and_the_mark_after(open_spool: OpenSpool, spool_dir: Path) -> None:
    harness = await open_spool()
    deliveries = await append_and_forward(harness, [rows("a"), rows("b")])
    batch = Batch(deliveries, "size")
    end = record_size(rows("a")) + record_size(rows("b"))

    await harness.spool.before_insert(batch)
    assert (spool_dir / LEDGER_NAME).read_text().splitlines()[-1] == f"I 1 0 1 {end}"
    await harness.spool.after_insert(batch)
    assert (spool_dir / LEDGER_NAME).read_text().splitlines()[-1] == f"C 1 {end}"
    assert harness.spool.unconfirmed_events == 0
    harness.spool.publish_metrics()  # what a scrape does
    assert harness.metrics.unconfirmed_events.get({}) == 0
    assert harness.metrics.oldest_unconfirmed_timestamp.get({}) == 0


async def test_open_rewrites_the_ledger_as_its_two_meaningful_lines(open_spool: OpenSpool, spool_dir: Path) -> None:
    first = await open_spool()
    deliveries = await append_and_forward(first, [rows("a"), rows("b"), rows("c")])
    await write_to_clickhouse(first, deliveries[:1])
    await first.spool.before_insert(Batch(deliveries[1:2], "size"))
    await first.shut()
    a, b = record_size(rows("a")), record_size(rows("b"))

    second = await open_spool()

    assert (spool_dir / LEDGER_NAME).read_text() == f"C 1 {a}\nI 1 {a} 1 {a + b}\n"
    await second.forwarded.wait_for(2)


async def test_confirmed_mark_survives_a_restart_without_replaying_anything(open_spool: OpenSpool) -> None:
    first = await open_spool()
    await write_to_clickhouse(first, await append_and_forward(first, [rows("a"), rows("b")]))
    await first.shut()

    second = await open_spool()
    await asyncio.sleep(0.05)

    assert second.forwarded.deliveries == []
    assert second.forwarded.batches == []
    assert second.metrics.replayed_events.get({}) == 0
    assert second.spool.unconfirmed_events == 0


async def test_torn_last_ledger_line_is_ignored(open_spool: OpenSpool, spool_dir: Path) -> None:
    first = await open_spool()
    deliveries = await append_and_forward(first, [rows("a"), rows("b")])
    await write_to_clickhouse(first, deliveries[:1])
    await first.shut()
    ledger = spool_dir / LEDGER_NAME
    ledger.write_bytes(ledger.read_bytes() + b"C 1 99")  # a confirm torn before its newline: it never happened

    second = await open_spool()

    await second.forwarded.wait_for(1)
    await asyncio.sleep(0.02)
    assert second.forwarded.payloads == [rows("b")]


async def test_a_long_ledger_is_compacted_to_the_confirmed_mark_and_still_replays_right(
    open_spool: OpenSpool, spool_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ledger_module, "LEDGER_COMPACT_BYTES", 64)
    first = await open_spool()
    deliveries = await append_and_forward(first, [rows(f"r{index}") for index in range(8)])
    for delivery in deliveries[:6]:
        await write_to_clickhouse(first, [delivery])
    end = deliveries[5].position
    assert end is not None
    ledger_text = (spool_dir / LEDGER_NAME).read_text()
    assert len(ledger_text) <= 64 + len("I 1 999 1 999\nC 1 999\n")
    assert f"C 1 {end.offset + record_size(rows('r5'))}\n" in ledger_text
    await first.shut()

    second = await open_spool()

    await second.forwarded.wait_for(2)
    await asyncio.sleep(0.02)
    assert second.forwarded.payloads == [rows("r6"), rows("r7")]


async def test_a_failing_confirmed_mark_write_is_logged_and_the_batch_is_still_confirmed(
    open_spool: OpenSpool, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    harness = await open_spool()
    deliveries = await append_and_forward(harness, [rows("a")])
    batch = Batch(deliveries, "size")
    await harness.spool.before_insert(batch)
    real_write = os.write

    def failing_write(fd: int, data: bytes) -> int:
        if data.startswith(b"C "):
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", failing_write)
    await harness.spool.after_insert(batch)  # must not raise: the rows are in ClickHouse

    assert "cannot record the confirmed mark" in caplog.text
    assert harness.spool.unconfirmed_events == 0
    assert harness.memory.held == 0
