"""How the Writer reads a failure, once for every unit: transient (retried with backoff), data
ClickHouse rejects (split and quarantined), or a missing schema (created again, then retried)."""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
from aiochclient import ChClientError

from clickpulse.metrics import ErrorKind

# ClickHouse error codes meaning "this data can never be inserted as it is": the parse and
# conversion failures (CANNOT_PARSE_*, TYPE_MISMATCH, CANNOT_CONVERT_TYPE, INCORRECT_DATA, ...).
REJECTED_DATA_CODES = frozenset({6, 25, 26, 27, 38, 41, 53, 69, 70, 72, 117, 131, 376})
MISSING_SCHEMA_CODES = frozenset({60, 81})  # UNKNOWN_TABLE, UNKNOWN_DATABASE
_ERROR_CODE = re.compile(r"Code:\s*(\d+)")

BACKOFF_BASE_SECONDS = 0.1
BACKOFF_CAP_SECONDS = 5.0


@dataclass(frozen=True)
class InsertFailure:
    kind: ErrorKind
    retryable: bool
    detail: str


class TableMissing(Exception):
    """CLICKHOUSE_CREATE_TABLE=false and the table does not exist: its owner has to create it."""


def classify_error(error: BaseException) -> InsertFailure:
    if isinstance(error, TableMissing):
        return InsertFailure("schema", True, str(error))
    if isinstance(error, TimeoutError):
        return InsertFailure("timeout", True, "ClickHouse did not answer in time")
    if isinstance(error, (aiohttp.ClientError, OSError)):
        return InsertFailure("connection", True, f"{type(error).__name__}: {error}")
    # aiochclient raises ChClientError, chDB a RuntimeError; both carry ClickHouse's own text.
    if isinstance(error, (ChClientError, RuntimeError)):
        text = str(error).strip()
        match = _ERROR_CODE.search(text)
        code = int(match.group(1)) if match else None
        first_line = text.splitlines()[0][:500] if text else "empty error"
        if code in MISSING_SCHEMA_CODES:
            return InsertFailure("schema", True, first_line)
        if code in REJECTED_DATA_CODES:
            return InsertFailure("rejected", False, first_line)
        return InsertFailure("server", True, first_line)
    return InsertFailure("server", True, f"{type(error).__name__}: {error}")


def backoff_seconds(attempt: int, draw: Callable[[float, float], float] = random.uniform) -> float:
    """Full jitter: anywhere between 0 and the exponential ceiling."""
    # The exponent is clamped: retries go on for as long as the process runs, and 0.1 * 2**1024
    # no longer fits in a float (OverflowError would kill the Writer after ~45 minutes of outage).
    return draw(0.0, min(BACKOFF_CAP_SECONDS, BACKOFF_BASE_SECONDS * 2 ** min(attempt, 32)))


def deduplication_token(body: bytes) -> str:
    """Derived from the rows alone, so a retry or a replay of the same rows carries the same one."""
    return hashlib.blake2b(body, digest_size=16).hexdigest()
