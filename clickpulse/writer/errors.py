"""How the Writer reads a failure, once for every unit: transient (retried with backoff), data
ClickHouse rejects or a limit the batch exceeds (bisected; what still fails alone is
quarantined), configuration (retried, loud, not ready), or a missing schema (created again)."""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
import xxhash
from aiochclient import ChClientError

from clickpulse.metrics import ErrorKind

# The classification table. Each ClickHouse error code (aiochclient and chDB both carry
# ClickHouse's `Code: N` in their text) is one of:
# - data ClickHouse can never take as it is: the batch is bisected, the rows found go to the
#   quarantine ("rejected");
REJECTED_DATA_CODES = frozenset({
    6,    # CANNOT_PARSE_TEXT
    25,   # CANNOT_PARSE_ESCAPE_SEQUENCE
    26,   # CANNOT_PARSE_QUOTED_STRING
    27,   # CANNOT_PARSE_INPUT_ASSERTION_FAILED
    38,   # CANNOT_PARSE_DATE
    41,   # CANNOT_PARSE_DATETIME
    53,   # TYPE_MISMATCH
    69,   # ARGUMENT_OUT_OF_BOUND
    70,   # CANNOT_CONVERT_TYPE
    72,   # CANNOT_PARSE_NUMBER
    117,  # INCORRECT_DATA (JSONEachRow: unknown field, bad value)
    131,  # TOO_LARGE_STRING_SIZE
    128,  # TOO_LARGE_ARRAY_SIZE
    190,  # SIZES_OF_ARRAYS_DOESNT_MATCH
    321,  # VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE
    349,  # CANNOT_INSERT_NULL_IN_ORDINARY_COLUMN
    376,  # CANNOT_PARSE_UUID
    469,  # VIOLATED_CONSTRAINT
})
# - a limit the batch as a whole exceeds, which a smaller part stays under: bisected at once
#   ("limit"); a single row that still fails is quarantined with the error;
BATCH_LIMIT_CODES = frozenset({
    158,  # TOO_MANY_ROWS
    307,  # TOO_MANY_BYTES
    396,  # TOO_MANY_ROWS_OR_BYTES
})
# TOO_MANY_PARTS (252) is both: "too many partitions for single INSERT block" is a limit of the
# batch (events spread over many months, one partition each), "too many parts ... merges are
# processing significantly slower" is the server catching up, transient.
TOO_MANY_PARTS = 252
_PARTITION_LIMIT = re.compile(r"too many partitions for single insert block", re.IGNORECASE)
# - a limit that is transient under load but deterministic for a batch too large for the
#   server: retried a few times, then bisected like a limit;
MEMORY_LIMIT_EXCEEDED = 241
MEMORY_RETRIES = 3
# - configuration: the credentials or grants in CLICKHOUSE_DSN are refused; retried (the events
#   stay queued or spooled and are written once it is fixed), loud, and /readyz is 503;
CONFIGURATION_CODES = frozenset({
    164,  # READONLY: the user may not write
    192,  # UNKNOWN_USER
    193,  # WRONG_PASSWORD
    194,  # REQUIRED_PASSWORD
    195,  # IP_ADDRESS_NOT_ALLOWED
    291,  # DATABASE_ACCESS_DENIED
    497,  # ACCESS_DENIED
    516,  # AUTHENTICATION_FAILED
})
# - the table or database is gone: created again (or, with CLICKHOUSE_CREATE_TABLE=false,
#   waited for), then retried ("schema");
MISSING_SCHEMA_CODES = frozenset({60, 81})  # UNKNOWN_TABLE, UNKNOWN_DATABASE
# - anything else is the server or the network having trouble: retried with backoff for as long
#   as the process runs ("server", "connection", "timeout").
_ERROR_CODE = re.compile(r"Code:\s*(\d+)")

BACKOFF_BASE_SECONDS = 0.1
BACKOFF_CAP_SECONDS = 5.0


@dataclass(frozen=True)
class InsertFailure:
    kind: ErrorKind
    retryable: bool  # False: the batch is bisected and what still fails alone is quarantined
    detail: str  # for logs and /readyz: never a credential
    # Retries before a retryable failure is treated as not retryable; None: without limit.
    retry_limit: int | None = None
    # The attempt may have reached the server and been executed (a time-out, a lost answer).
    ambiguous: bool = False


class TableMissing(Exception):
    """CLICKHOUSE_CREATE_TABLE=false and the table does not exist: its owner has to create it."""


def error_code(text: str) -> int | None:
    match = _ERROR_CODE.search(text)
    return int(match.group(1)) if match else None


def classify_error(error: BaseException) -> InsertFailure:
    if isinstance(error, TableMissing):
        return InsertFailure("schema", True, str(error))
    if isinstance(error, TimeoutError):
        return InsertFailure("timeout", True, "ClickHouse did not answer in time", ambiguous=True)
    if isinstance(error, (aiohttp.ClientError, OSError)):
        # A refused connection never reached the server; anything later may have.
        reached = not isinstance(error, aiohttp.ClientConnectorError)
        return InsertFailure("connection", True, f"{type(error).__name__}: {error}", ambiguous=reached)
    # aiochclient raises ChClientError, chDB a RuntimeError; both carry ClickHouse's own text.
    if isinstance(error, (ChClientError, RuntimeError)):
        text = str(error).strip()
        code = error_code(text)
        first_line = text.splitlines()[0][:500] if text else "empty error"
        if code in CONFIGURATION_CODES:
            # ClickHouse's text names the user: give the code, never the message.
            return InsertFailure(
                "auth", True, f"ClickHouse refused the credentials or grants of CLICKHOUSE_DSN (Code: {code})"
            )
        if code in MISSING_SCHEMA_CODES:
            return InsertFailure("schema", True, first_line)
        if code in REJECTED_DATA_CODES:
            return InsertFailure("rejected", False, first_line)
        if code in BATCH_LIMIT_CODES or (code == TOO_MANY_PARTS and _PARTITION_LIMIT.search(text)):
            return InsertFailure("limit", False, first_line)
        if code == MEMORY_LIMIT_EXCEEDED:
            return InsertFailure("limit", True, first_line, retry_limit=MEMORY_RETRIES)
        return InsertFailure("server", True, first_line)
    return InsertFailure("server", True, f"{type(error).__name__}: {error}")


def backoff_seconds(attempt: int, draw: Callable[[float, float], float] = random.uniform) -> float:
    """Full jitter: anywhere between 0 and the exponential ceiling."""
    # The exponent is clamped: retries go on for as long as the process runs, and 0.1 * 2**1024
    # no longer fits in a float (OverflowError would kill the Writer after ~45 minutes of outage).
    return draw(0.0, min(BACKOFF_CAP_SECONDS, BACKOFF_BASE_SECONDS * 2 ** min(attempt, 32)))


def deduplication_token(body: bytes) -> str:
    """Derived from the rows alone, so a retry or a replay of the same rows carries the same one.
    XXH3-128: a batch is dropped only if its token equals one within the table's deduplication
    window, as unlikely at 128 bits as with the SipHash-128 ClickHouse names its own insert blocks
    by. Not collision-resistant against rows crafted for it, but every batch carries the server's
    own `received_at`, which no client chooses. BLAKE2b cost 17 instructions a byte here."""
    return str(xxhash.xxh3_128_hexdigest(body))
