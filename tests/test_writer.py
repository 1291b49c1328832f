"""Unit tests for clickpulse.writer: error classification, retry backoff, deduplication tokens,
and, with a fake ChClient in place of ClickHouse, bisection, quarantine and confirmations."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import msgspec
import pytest
from aiochclient import ChClientError
from aiohttp.client_reqrep import ConnectionKey
from aioprometheus import Registry

from clickpulse import writer as writer_module
from clickpulse.config import parse_dsn
from clickpulse.memory_limit import MemoryLimit
from clickpulse.messages import Batch, Delivery, RowsRejected
from clickpulse.metrics import WriterMetrics
from clickpulse.schema import capabilities_for
from clickpulse.writer import (
    BACKOFF_BASE_SECONDS,
    BACKOFF_CAP_SECONDS,
    QUARANTINE_FILE,
    Writer,
    backoff_seconds,
    classify_error,
    deduplication_token,
)


def connection_key() -> ConnectionKey:
    fields = {"host": "clickhouse.invalid", "port": 8123, "is_ssl": False, "ssl": True}
    # The tuple grew fields across aiohttp releases; fill whichever this one has.
    return ConnectionKey(**{name: fields.get(name) for name in ConnectionKey._fields})


# -- classify_error ---------------------------------------------------------------------------


def test_timeout_is_retryable_timeout() -> None:
    failure = classify_error(TimeoutError())

    assert (failure.kind, failure.retryable) == ("timeout", True)


@pytest.mark.parametrize(
    "error",
    [
        aiohttp.ClientConnectorError(connection_key(), ConnectionRefusedError(111, "Connection refused")),
        aiohttp.ClientOSError(104, "Connection reset by peer"),
        aiohttp.ServerDisconnectedError(),
        ConnectionRefusedError(111, "Connection refused"),
        ConnectionResetError(104, "Connection reset by peer"),
    ],
    ids=["ClientConnectorError", "ClientOSError", "ServerDisconnectedError", "ConnectionRefusedError", "ConnectionResetError"],
)
def test_connection_errors_are_retryable_connection_failures(error: BaseException) -> None:
    failure = classify_error(error)

    assert (failure.kind, failure.retryable) == ("connection", True)
    assert type(error).__name__ in failure.detail


def test_cannot_parse_input_is_rejected_and_not_retried() -> None:
    error = ChClientError(
        "Code: 27. DB::Exception: Cannot parse input: expected '\"' before: 'x': "
        "(while reading the value of key created_at): Row 1 (version 24.8.1.1)\n"
        "second line with more detail"
    )

    failure = classify_error(error)

    assert (failure.kind, failure.retryable) == ("rejected", False)
    assert failure.detail.startswith("Code: 27.")
    assert "\n" not in failure.detail


def test_missing_table_is_a_retryable_schema_failure() -> None:
    failure = classify_error(ChClientError("Code: 60. DB::Exception: Table x doesn't exist. (UNKNOWN_TABLE)"))

    assert (failure.kind, failure.retryable) == ("schema", True)


def test_missing_database_is_a_retryable_schema_failure() -> None:
    failure = classify_error(ChClientError("Code: 81. DB::Exception: Database analytics doesn't exist. (UNKNOWN_DATABASE)"))

    assert (failure.kind, failure.retryable) == ("schema", True)


def test_too_many_parts_is_a_retryable_server_failure() -> None:
    failure = classify_error(ChClientError("Code: 252. Too many parts (300). Merges are processing significantly slower"))

    assert (failure.kind, failure.retryable) == ("server", True)


def test_server_error_without_code_is_retryable() -> None:
    failure = classify_error(ChClientError("502 Bad Gateway: upstream went away"))

    assert (failure.kind, failure.retryable) == ("server", True)
    assert "502 Bad Gateway" in failure.detail


def test_empty_server_error_is_retryable() -> None:
    failure = classify_error(ChClientError(""))

    assert (failure.kind, failure.retryable) == ("server", True)


def test_error_code_is_matched_as_a_whole_number() -> None:
    # Code 270 is not code 27: it must not be mistaken for a data rejection.
    failure = classify_error(ChClientError("Code: 270. DB::Exception: some other failure"))

    assert failure.retryable is True


def test_very_long_server_error_detail_is_shortened() -> None:
    failure = classify_error(ChClientError("Code: 252. " + "x" * 5000))

    assert len(failure.detail) <= 500


def test_unexpected_exception_is_a_retryable_server_failure() -> None:
    failure = classify_error(KeyError("something odd"))

    assert (failure.kind, failure.retryable) == ("server", True)
    assert "KeyError" in failure.detail


def test_an_embedded_store_error_is_classified_by_its_clickhouse_code() -> None:
    # chDB raises RuntimeError subclasses carrying ClickHouse's own text.
    rejected = classify_error(RuntimeError("Code: 27. DB::Exception: Cannot parse input: expected '\"' (CANNOT_PARSE_INPUT_ASSERTION_FAILED)"))
    missing = classify_error(RuntimeError("Code: 60. DB::Exception: Unknown table expression identifier 'events'"))

    assert (rejected.kind, rejected.retryable) == ("rejected", False)
    assert (missing.kind, missing.retryable) == ("schema", True)


# -- backoff_seconds --------------------------------------------------------------------------


class RecordingDraw:
    """A `draw(low, high)` that records its bounds and returns the upper one."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, float]] = []

    def __call__(self, low: float, high: float) -> float:
        self.calls.append((low, high))
        return high


@pytest.mark.parametrize("attempt", range(6))
def test_backoff_ceiling_doubles_from_the_base(attempt: int) -> None:
    draw = RecordingDraw()

    delay = backoff_seconds(attempt, draw)

    assert draw.calls == [(0.0, pytest.approx(BACKOFF_BASE_SECONDS * 2**attempt))]
    assert delay == pytest.approx(BACKOFF_BASE_SECONDS * 2**attempt)


def test_backoff_first_ceilings() -> None:
    draw = RecordingDraw()

    ceilings = [backoff_seconds(attempt, draw) for attempt in range(4)]

    assert ceilings == pytest.approx([0.1, 0.2, 0.4, 0.8])


@pytest.mark.parametrize("attempt", [6, 7, 10, 50, 1023, 1024, 5000, 100_000])
def test_backoff_ceiling_is_capped_at_five_seconds(attempt: int) -> None:
    draw = RecordingDraw()

    delay = backoff_seconds(attempt, draw)

    assert BACKOFF_CAP_SECONDS == 5.0
    assert draw.calls == [(0.0, 5.0)]
    assert delay == 5.0


def test_backoff_full_jitter_lower_bound_is_zero() -> None:
    assert backoff_seconds(3, lambda low, high: low) == 0.0


def test_backoff_default_draw_stays_within_full_jitter_bounds() -> None:
    random.seed(1234)
    for attempt in list(range(12)) + [2000]:
        ceiling = min(BACKOFF_CAP_SECONDS, BACKOFF_BASE_SECONDS * 2 ** min(attempt, 64))
        delays = [backoff_seconds(attempt) for _ in range(200)]
        assert all(0.0 <= delay <= ceiling for delay in delays)
        assert len(set(delays)) > 1, "full jitter: delays should vary"


# -- deduplication_token ----------------------------------------------------------------------

BODY = b'{"event_type":"a","event_id":"1"}\n{"event_type":"b","event_id":"2"}\n'


def test_same_body_gives_the_same_token() -> None:
    assert deduplication_token(BODY) == deduplication_token(bytes(BODY))


def test_same_deliveries_joined_again_give_the_same_token() -> None:
    # A replay rebuilds the batch from the same records: the joined body, so the token, match.
    first, second = BODY.splitlines(keepends=True)

    assert deduplication_token(first + second) == deduplication_token(b"".join([first, second]))


@pytest.mark.parametrize(
    "other",
    [
        BODY.replace(b'"2"', b'"3"'),  # one byte differs
        BODY.splitlines(keepends=True)[0],  # a part of it
        b"".join(reversed(BODY.splitlines(keepends=True))),  # the same rows in another order
        BODY + b"\n",
    ],
    ids=["one-byte", "prefix", "reordered", "trailing-newline"],
)
def test_different_body_gives_a_different_token(other: bytes) -> None:
    assert deduplication_token(other) != deduplication_token(BODY)


def test_token_is_plain_hex_safe_inside_a_quoted_setting() -> None:
    token = deduplication_token(BODY)

    assert len(token) == 32
    assert set(token) <= set("0123456789abcdef")


# -- a Writer with a fake ClickHouse ----------------------------------------------------------

REJECTION = "Code: 27. DB::Exception: Cannot parse input: expected '\"' before: 'bad'"


@dataclass
class FakeClickHouse:
    """Stands in for the Writer's insert ChClient: takes rows unless a row holds `"bad"`."""

    transient_failures: int = 0
    quarantine_fails: bool = False
    inserts: list[tuple[str, bytes]] = field(default_factory=list)
    quarantined: list[bytes] = field(default_factory=list)

    backend = "http"
    description = "a fake ClickHouse"

    async def query_value(self, sql: str) -> str:
        return "1"

    async def execute(self, sql: str, settings: object) -> None:
        pass

    async def query_text(self, sql: str, database: str) -> str:
        return ""

    async def close(self) -> None:
        pass

    async def insert(self, database: str, table: str, body: bytes, deduplication_token: str | None) -> None:
        if table.endswith("_quarantine"):
            if self.quarantine_fails:
                raise aiohttp.ClientOSError(111, "Connection refused")
            self.quarantined.append(body)
            return
        if self.transient_failures:
            self.transient_failures -= 1
            raise aiohttp.ClientOSError(104, "Connection reset by peer")
        if b'"bad"' in body:
            raise ChClientError(REJECTION)
        self.inserts.append((deduplication_token, body))

    @property
    def inserted_rows(self) -> list[bytes]:
        return [line for _, body in self.inserts for line in body.splitlines()]


@dataclass
class FakeSpool:
    """Records what the Writer tells the spool around each insert."""

    calls: list[tuple[str, Batch]] = field(default_factory=list)

    async def begin_insert(self, batch: Batch) -> None:
        self.calls.append(("begin_insert", batch))

    def confirm(self, batch: Batch) -> None:
        self.calls.append(("confirm", batch))


@dataclass
class WriterHarness:
    writer: Writer
    clickhouse: FakeClickHouse
    spool: FakeSpool
    memory: MemoryLimit
    metrics: WriterMetrics


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client_session:
        yield client_session


@pytest.fixture
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(writer_module, "backoff_seconds", lambda attempt: 0.0)


def make_writer(session: aiohttp.ClientSession, clickhouse: FakeClickHouse, quarantine_directory: Path | None = None) -> WriterHarness:
    metrics = WriterMetrics(Registry())
    memory = MemoryLimit(1000)
    spool = FakeSpool()
    writer = Writer(
        connection=clickhouse,
        database="analytics",
        table="events",
        timeout=1.0,
        metrics=metrics,
        memory=memory,
        spool=spool,  # type: ignore[arg-type]
        quarantine_directory=quarantine_directory,
    )
    # As if _connect() had found a server that supports deduplication tokens.
    writer._capabilities = capabilities_for("24.8.1.1")
    writer._schema_ready = True
    return WriterHarness(writer, clickhouse, spool, memory, metrics)


def row(name: str) -> bytes:
    return msgspec.json.encode({"event_type": name}) + b"\n"


def delivery(*names: str, confirmed: bool = True) -> Delivery:
    future = asyncio.get_running_loop().create_future() if confirmed else None
    return Delivery(b"".join(row(name) for name in names), len(names), asyncio.get_running_loop().time(), None, future)


async def write(harness: WriterHarness, deliveries: list[Delivery]) -> Batch:
    """What the Batcher and Writer do with one batch: reserve, submit, write."""
    batch = Batch(deliveries, "size")
    assert harness.memory.try_reserve(batch.count)
    harness.writer._change_pending(batch.count)
    async with asyncio.timeout(1.0):
        await harness.writer._write(batch)
    return batch


async def test_finish_confirmations_maps_rejected_row_indices_to_their_deliveries(
    session: aiohttp.ClientSession,
) -> None:
    harness = make_writer(session, FakeClickHouse())
    unconfirmed = delivery("r0", "r1", confirmed=False)  # rows 0-1: ack=memory, nobody waits
    second = delivery("r2", "r3", "r4")  # rows 2-4
    third = delivery("r5")  # row 5
    fourth = delivery("r6", "r7")  # rows 6-7
    batch = Batch([unconfirmed, second, third, fourth], "size")

    harness.writer._finish_confirmations(batch, {1, 3, 4, 7}, "table")

    assert unconfirmed.confirmation is None
    assert second.confirmation is not None and third.confirmation is not None and fourth.confirmation is not None
    rejection = second.confirmation.exception()
    assert isinstance(rejection, RowsRejected)
    assert (rejection.rejected, rejection.written, rejection.destination) == (2, 1, "events_quarantine")
    assert third.confirmation.result() == 1
    rejection = fourth.confirmation.exception()
    assert isinstance(rejection, RowsRejected)
    assert (rejection.rejected, rejection.written) == (1, 1)


@pytest.mark.parametrize(
    ("destination", "named"), [("file", "quarantine.ndjson in SPOOL_DIR"), ("log", "error log only")]
)
async def test_finish_confirmations_names_a_quarantine_outside_the_table(
    session: aiohttp.ClientSession, destination: str, named: str
) -> None:
    harness = make_writer(session, FakeClickHouse())
    rejected = delivery("r0")

    harness.writer._finish_confirmations(Batch([rejected], "size"), {0}, destination)

    assert rejected.confirmation is not None
    rejection = rejected.confirmation.exception()
    assert isinstance(rejection, RowsRejected) and rejection.destination == named


async def test_finish_confirmations_leaves_an_already_finished_future_alone(session: aiohttp.ClientSession) -> None:
    harness = make_writer(session, FakeClickHouse())
    abandoned, waiting = delivery("r0"), delivery("r1")
    assert abandoned.confirmation is not None
    abandoned.confirmation.cancel()  # its request went away

    harness.writer._finish_confirmations(Batch([abandoned, waiting], "size"), set(), "")

    assert waiting.confirmation is not None and waiting.confirmation.result() == 1


async def test_write_inserts_a_clean_batch_once_with_its_token_and_confirms_it(session: aiohttp.ClientSession) -> None:
    harness = make_writer(session, FakeClickHouse())
    first, second = delivery("a", "b"), delivery("c")

    batch = await write(harness, [first, second])

    [(token, body)] = harness.clickhouse.inserts
    assert body == first.rows + second.rows
    assert token == deduplication_token(body)
    assert first.confirmation is not None and first.confirmation.result() == 2
    assert second.confirmation is not None and second.confirmation.result() == 1
    assert harness.spool.calls == [("begin_insert", batch), ("confirm", batch)]
    assert harness.memory.held == 0
    assert harness.writer.pending_events == 0


async def test_write_bisects_a_rejected_batch_and_quarantines_only_the_bad_row(session: aiohttp.ClientSession) -> None:
    harness = make_writer(session, FakeClickHouse())
    clean = delivery("good0", "good1")
    mixed = delivery("good2", "bad", "good3")
    unwatched = delivery("good4", confirmed=False)

    batch = await write(harness, [clean, mixed, unwatched])

    assert sorted(harness.clickhouse.inserted_rows) == sorted(row(f"good{index}").strip() for index in range(5))
    for token, body in harness.clickhouse.inserts:  # every partial insert carries its own token
        assert token == deduplication_token(body)
    [quarantine_body] = harness.clickhouse.quarantined
    [quarantined] = [msgspec.json.decode(line) for line in quarantine_body.splitlines()]
    assert quarantined["row"] == row("bad").decode().strip()
    assert quarantined["error"].startswith("Code: 27.")
    assert clean.confirmation is not None and clean.confirmation.result() == 2
    assert mixed.confirmation is not None
    rejection = mixed.confirmation.exception()
    assert isinstance(rejection, RowsRejected)
    assert (rejection.rejected, rejection.written, rejection.destination) == (1, 2, "events_quarantine")
    assert harness.metrics.quarantined.get({"destination": "table"}) == 1
    assert harness.metrics.events_dropped.get({"reason": "rejected"}) == 0
    assert harness.spool.calls[-1] == ("confirm", batch)  # quarantined rows count as done
    assert harness.memory.held == 0


async def test_write_retries_transient_failures_with_the_same_token(
    session: aiohttp.ClientSession, no_backoff: None
) -> None:
    harness = make_writer(session, FakeClickHouse(transient_failures=3))
    waiting = delivery("a", "b")

    await write(harness, [waiting])

    [(token, body)] = harness.clickhouse.inserts
    assert token == deduplication_token(waiting.rows)
    assert harness.metrics.retries.get({}) == 3
    assert harness.metrics.insert_errors.get({"kind": "connection"}) == 3
    assert waiting.confirmation is not None and waiting.confirmation.result() == 2
    assert harness.clickhouse.quarantined == []


async def test_rejected_rows_go_to_the_quarantine_file_when_the_table_cannot_take_them(
    session: aiohttp.ClientSession, no_backoff: None, tmp_path: Path
) -> None:
    harness = make_writer(session, FakeClickHouse(quarantine_fails=True), quarantine_directory=tmp_path)
    mixed = delivery("good", "bad")

    await write(harness, [mixed])

    [line] = (tmp_path / QUARANTINE_FILE).read_bytes().splitlines()
    assert msgspec.json.decode(line)["row"] == row("bad").decode().strip()
    assert harness.clickhouse.inserted_rows == [row("good").strip()]
    assert mixed.confirmation is not None
    rejection = mixed.confirmation.exception()
    assert isinstance(rejection, RowsRejected) and rejection.destination == "quarantine.ndjson in SPOOL_DIR"
    assert harness.metrics.quarantined.get({"destination": "file"}) == 1
    assert harness.metrics.events_dropped.get({"reason": "rejected"}) == 0


# -- shutdown: a cancelled Writer ends ------------------------------------------------------------


@dataclass
class DownClickHouse(FakeClickHouse):
    """ClickHouse that never answers: every request fails as a refused connection."""

    async def query_value(self, sql: str) -> str:
        raise aiohttp.ClientOSError(111, "Connection refused")

    async def insert(self, database: str, table: str, body: bytes, deduplication_token: str | None) -> None:
        raise aiohttp.ClientOSError(111, "Connection refused")


async def test_a_writer_cancelled_right_after_stop_ends_even_while_clickhouse_is_down(
    session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What Service.stop does once SHUTDOWN_TIMEOUT is used up: stop() (which wakes the backoff
    # pause) and, in the same breath, cancel(). The cancellation must not be swallowed by the
    # woken pause, else the Writer retries forever and the shutdown never ends.
    monkeypatch.setattr(writer_module, "backoff_seconds", lambda attempt: 30.0)
    harness = make_writer(session, DownClickHouse())
    writer = harness.writer
    writer._schema_ready = False  # as at start: _connect() retries with a backoff pause
    writer._change_pending(1)  # a batch is waiting, so a stop alone does not end _connect()
    task = asyncio.create_task(writer.run())
    await asyncio.sleep(0.05)  # in the backoff pause

    await writer.stop()
    task.cancel()

    done, _ = await asyncio.wait([task], timeout=2.0)
    assert task in done, "the Writer swallowed its cancellation"
    if not task.done():
        task.cancel()


async def test_a_writer_cancelled_as_a_batch_arrives_ends_even_while_clickhouse_is_down(
    session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The idle Writer waits for its mailbox; a batch put there just as the task is cancelled must
    # not be taken with the cancellation swallowed (its insert would be retried forever).
    monkeypatch.setattr(writer_module, "backoff_seconds", lambda attempt: 0.01)
    harness = make_writer(session, DownClickHouse())
    task = asyncio.create_task(harness.writer.run())
    await asyncio.sleep(0.05)  # idle, waiting for the mailbox

    await harness.writer.submit(Batch([delivery("a", confirmed=False)], "shutdown"))
    task.cancel()

    done, _ = await asyncio.wait([task], timeout=2.0)
    assert task in done, "the Writer swallowed its cancellation"
    if not task.done():
        task.cancel()


# -- a real spool whose ledger cannot be written -------------------------------------------------


async def test_a_ledger_write_failure_after_an_insert_does_not_kill_the_writer(
    session: aiohttp.ClientSession, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The disk under the spool is full (SPOOL_MAX_BYTES larger than the free space, or another
    # tenant): appending the confirmed mark to the ledger fails. The rows are in ClickHouse; the
    # Writer must go on (and delete the confirmed segments, which frees the disk) instead of
    # crashing the process into a restart loop that inserts the same batch again and again.
    import errno
    import os as os_module

    from clickpulse import spool as spool_module
    from clickpulse.metrics import SpoolMetrics
    from clickpulse.spool import Spool, segment_name

    memory = MemoryLimit(1000)
    forwarded: list[Delivery] = []
    spool = Spool(directory=tmp_path / "spool", max_bytes=1 << 20, segment_bytes=1, memory=memory,
                  deliver=forwarded.append, metrics=SpoolMetrics(Registry()))
    spool.open()
    spool_task = asyncio.create_task(spool.run())
    try:
        for name in ("a", "b", "c"):  # segment_bytes=1: one record per segment
            await spool.append(row(name), 1, asyncio.get_running_loop().time(), durable=True, confirmation=None)
        async with asyncio.timeout(1.0):
            while len(forwarded) < 3:
                await asyncio.sleep(0.01)
        harness = make_writer(session, FakeClickHouse())
        harness.writer._spool = spool
        harness.writer._memory = memory
        real_write = os_module.write

        def write_but_not_the_ledger(fd: int, data: bytes) -> int:
            if fd == spool._ledger_fd:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_write(fd, data)

        monkeypatch.setattr(spool_module.os, "write", write_but_not_the_ledger)
        batch = Batch(forwarded[:2], "size")
        task = asyncio.create_task(harness.writer.run())
        await harness.writer.submit(batch)
        async with asyncio.timeout(2.0):
            while harness.writer.pending_events:
                await asyncio.sleep(0.01)
                assert not task.done(), task.exception() if task.done() else None
        assert not task.done()
        assert harness.clickhouse.inserted_rows == [row("a").strip(), row("b").strip()]
        assert memory.held == 1  # batch released; c, forwarded, still held
        assert spool.unconfirmed_events == 1
        assert not (tmp_path / "spool" / segment_name(1)).exists()  # confirmed segments are deleted
        await harness.writer.stop()
        async with asyncio.timeout(1.0):
            await task
    finally:
        spool_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await spool_task
        spool.close()
