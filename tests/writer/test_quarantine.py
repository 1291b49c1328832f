"""Splitter and Quarantine: a batch ClickHouse rejects as data is bisected; only the rows it
cannot take are kept aside, in the table, else the file, else the log."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from clickpulse.writer.errors import deduplication_token
from clickpulse.writer.quarantine import QUARANTINE_FILE, RejectedRow
from tests.writer.fakes import FakeClickHouse, row, writer_parts


async def test_bisection_inserts_every_good_row_and_returns_only_the_bad_one() -> None:
    parts = writer_parts()
    names = ["good0", "good1", "good2", "bad", "good3", "good4"]
    body = b"".join(row(name) for name in names)

    rejected = await parts.splitter.insert_or_split(body, len(names))

    assert [(entry.index, entry.row) for entry in rejected] == [(3, row("bad").strip())]
    assert rejected[0].error.startswith("Code: 27.")
    assert sorted(parts.clickhouse.inserted_rows) == sorted(row(f"good{index}").strip() for index in range(5))
    for token, part in parts.clickhouse.inserts:  # every partial insert carries its own token
        assert token == deduplication_token(part)


async def test_a_clean_body_is_one_insert_and_nothing_rejected() -> None:
    parts = writer_parts()

    assert await parts.splitter.insert_or_split(row("a") + row("b"), 2) == []
    assert len(parts.clickhouse.inserts) == 1


@pytest.mark.parametrize("names_rows", [False, True], ids=["bisected", "cut-at-the-named-row"])
async def test_every_insertable_row_is_inserted_and_every_bad_row_rejected_exactly(names_rows: bool) -> None:
    # Half good, half bad, interleaved: a batch after a schema change that some rows still fit.
    parts = writer_parts(FakeClickHouse(names_rows=names_rows))
    names = [("bad" if index % 2 else f"good{index}") for index in range(400)]

    rejected = await parts.splitter.insert_or_split(b"".join(row(name) for name in names), len(names))

    assert [entry.index for entry in rejected] == list(range(1, 400, 2))
    assert sorted(parts.clickhouse.inserted_rows) == sorted(row(f"good{index}").strip() for index in range(0, 400, 2))


async def test_a_named_row_is_rejected_only_once_it_failed_alone() -> None:
    # The row ClickHouse names is tried on its own before it is quarantined.
    parts = writer_parts(FakeClickHouse(names_rows=True))
    names = ["good0", "good1", "bad", "good2"]

    rejected = await parts.splitter.insert_or_split(b"".join(row(name) for name in names), 4)

    assert [entry.index for entry in rejected] == [2]
    inserted_alone = [body for _, body in parts.clickhouse.inserts]
    assert b"".join(row(name) for name in ("good0", "good1")) in inserted_alone
    assert row("good2") in inserted_alone


def rejected_rows(*names: str) -> list[RejectedRow]:
    return [RejectedRow(index, row(name).strip(), "Code: 27. bad") for index, name in enumerate(names)]


async def test_rejected_rows_go_to_the_quarantine_table_with_their_error() -> None:
    parts = writer_parts()

    destination = await parts.quarantine.keep(rejected_rows("bad"))

    assert destination == "table"
    assert parts.quarantine.describe(destination) == "events_quarantine"
    [body] = parts.clickhouse.quarantined
    [kept] = [msgspec.json.decode(line) for line in body.splitlines()]
    assert (kept["row"], kept["error"]) == (row("bad").decode().strip(), "Code: 27. bad")
    assert parts.metrics.quarantined.get({"destination": "table"}) == 1
    assert parts.metrics.events_dropped.get({"reason": "rejected"}) == 0


async def test_rejected_rows_go_to_the_file_when_the_table_cannot_take_them(tmp_path: Path) -> None:
    parts = writer_parts(FakeClickHouse(quarantine_fails=True), quarantine_directory=tmp_path)

    destination = await parts.quarantine.keep(rejected_rows("bad"))

    assert destination == "file"
    assert parts.quarantine.describe(destination) == "quarantine.ndjson in SPOOL_DIR"
    [line] = (tmp_path / QUARANTINE_FILE).read_bytes().splitlines()
    assert msgspec.json.decode(line)["row"] == row("bad").decode().strip()
    assert parts.metrics.quarantined.get({"destination": "file"}) == 1
    assert parts.metrics.events_dropped.get({"reason": "rejected"}) == 0


async def test_without_table_or_file_the_rows_are_logged_and_counted_as_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    parts = writer_parts(FakeClickHouse(quarantine_fails=True))

    destination = await parts.quarantine.keep(rejected_rows("bad", "worse"))

    assert destination == "log"
    assert parts.quarantine.describe(destination) == "error log only"
    assert sum("rejected row kept only in this log" in message for message in caplog.messages) == 2
    assert parts.metrics.events_dropped.get({"reason": "rejected"}) == 2
    assert parts.metrics.quarantined.get({"destination": "log"}) == 2
