"""Unit tests for clickpulse.writer.errors: error classification, retry backoff, deduplication tokens."""

from __future__ import annotations

import random

import aiohttp
import pytest
from aiochclient import ChClientError
from aiohttp.client_reqrep import ConnectionKey

from clickpulse.writer.errors import (
    BACKOFF_BASE_SECONDS,
    BACKOFF_CAP_SECONDS,
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


def test_token_is_the_same_from_version_to_version() -> None:
    # The batch in flight at a crash is replayed by whatever version starts next: a token that
    # changed with the code would let ClickHouse store that batch twice. XXH3-128 of the rows.
    assert deduplication_token(BODY) == "db15c7d897c31f07a1f3474740feccb3"


def test_token_is_plain_hex_safe_inside_a_quoted_setting() -> None:
    token = deduplication_token(BODY)

    assert len(token) == 32
    assert set(token) <= set("0123456789abcdef")


# -- the classification table: what is deterministic for a batch is never retried for ever ----


def test_too_many_partitions_for_one_insert_block_is_a_limit_of_the_batch_not_retried() -> None:
    failure = classify_error(ChClientError(
        "Code: 252. DB::Exception: Too many partitions for single INSERT block (more than 100). "
        "The limit is controlled by 'max_partitions_per_insert_block' setting."
    ))
    assert (failure.kind, failure.retryable) == ("limit", False)


def test_the_embedded_stores_partition_limit_error_is_the_same_class() -> None:
    failure = classify_error(RuntimeError("Code: 252. DB::Exception: Too many partitions for single INSERT block (more than 100)."))
    assert (failure.kind, failure.retryable) == ("limit", False)


@pytest.mark.parametrize("code", [158, 307, 396])
def test_row_and_byte_limits_of_a_query_are_limits_of_the_batch(code: int) -> None:
    failure = classify_error(ChClientError(f"Code: {code}. DB::Exception: Limit for rows or bytes exceeded"))
    assert (failure.kind, failure.retryable) == ("limit", False)


def test_a_memory_limit_is_retried_a_few_times_then_treated_as_a_limit_of_the_batch() -> None:
    failure = classify_error(ChClientError("Code: 241. DB::Exception: Memory limit (for query) exceeded"))
    assert (failure.kind, failure.retryable) == ("limit", True)
    assert failure.retry_limit is not None and failure.retry_limit > 0


@pytest.mark.parametrize(
    "text",
    [
        "Code: 193, e.displayText() = DB::Exception: Wrong password for user app",
        "Code: 516. DB::Exception: app: Authentication failed: password is incorrect, or there is no user with such name.",
        "Code: 192. DB::Exception: Unknown user app",
        "Code: 497. DB::Exception: app: Not enough privileges. To execute this query, it's necessary to have the grant INSERT",
        "Code: 164. DB::Exception: app: Cannot execute query in readonly mode",
    ],
)
def test_refused_credentials_and_grants_are_configuration_errors_that_never_name_the_user(text: str) -> None:
    failure = classify_error(ChClientError(text))
    assert failure.kind == "auth" and failure.retryable
    assert "CLICKHOUSE_DSN" in failure.detail
    assert "app" not in failure.detail


def test_a_time_out_and_a_reset_may_have_reached_the_server_a_refused_connection_not() -> None:
    assert classify_error(TimeoutError()).ambiguous
    assert classify_error(aiohttp.ServerDisconnectedError()).ambiguous
    refused = aiohttp.ClientConnectorError(connection_key(), OSError(111, "Connection refused"))
    assert not classify_error(refused).ambiguous
