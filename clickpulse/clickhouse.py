"""The two ways the Writer reaches ClickHouse, behind one interface.

- `HttpClickHouse`: a ClickHouse server over HTTP with aiochclient (CLICKHOUSE_DSN set).
- `EmbeddedClickHouse`: chDB, ClickHouse's engine in this process, storing under DATA_DIR
  (CLICKHOUSE_DSN unset). Its calls block, so they run on one thread of their own: off the event
  loop, and one at a time, which is also the most chDB allows.

Both take the same DDL and the same JSONEachRow bodies, and raise errors whose text carries
ClickHouse's `Code: N`, which the Writer classifies the same way.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import fcntl
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import aiohttp
from aiohttp.abc import AbstractStreamWriter
from aiochclient import ChClient, ChClientError

from clickpulse.config import ClickHouseTarget
from clickpulse.schema import insert_query

# Old servers parse ISO 8601 timestamps with offsets only in best-effort mode.
INSERT_SETTINGS: Mapping[str, str] = {"date_time_input_format": "best_effort"}

# An insert body goes to the socket in slices of this size (SlicedBody).
INSERT_SLICE_BYTES = 256 * 1024


class SlicedBody(aiohttp.BytesPayload):
    """An insert body written to the socket a slice at a time, with its Content-Length.

    Written whole, a batch's body (megabytes) is copied twice more in this process before the
    kernel copies it: aiohttp joins it with the request's headers into one new bytes (on Python
    before 3.12.9, where it does not use writelines), and the transport copies whatever the socket
    did not take at once into its buffer. A slice at a time, only the first slice is joined with
    the headers, and aiohttp waits for the transport to drain before the next, so the socket takes
    most slices straight from the rows."""

    async def write(self, writer: AbstractStreamWriter) -> None:
        await self.write_with_length(writer, None)  # what aiohttp before 3.12 calls

    async def write_with_length(self, writer: AbstractStreamWriter, content_length: int | None) -> None:
        body = memoryview(self._value)
        if content_length is not None:
            body = body[:content_length]
        for start in range(0, len(body), INSERT_SLICE_BYTES):
            await writer.write(body[start:start + INSERT_SLICE_BYTES])


class EmbeddedUnavailable(Exception):
    """CLICKHOUSE_DSN is unset and chdb is not installed, or DATA_DIR is in use."""


class DataDirInUse(EmbeddedUnavailable):
    """Another process holds DATA_DIR."""


LOCK_FILE = "clickpulse.lock"


class DataDirLock:
    """One process per DATA_DIR (chDB's own rule): an exclusive flock on DATA_DIR/clickpulse.lock,
    held for the process's life. The file also says where that process serves HTTP, so that
    `python -m clickpulse query` can ask it instead of opening the store itself."""

    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.path = data_dir / LOCK_FILE
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise DataDirInUse(
                f"{data_dir} is in use by another clickpulse ({read_lock_owner(data_dir) or 'address unknown'})"
            ) from None

    def advertise(self, url: str) -> None:
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()} {url}\n".encode(), 0)

    def release(self) -> None:
        os.ftruncate(self._fd, 0)
        os.close(self._fd)


def read_lock_owner(data_dir: Path) -> str | None:
    """"<pid> <url>" of the process holding DATA_DIR, if it wrote one."""
    try:
        text = (data_dir / LOCK_FILE).read_text().strip()
    except OSError:
        return None
    return text or None


class ClickHouseConnection(Protocol):
    backend: str  # "http" or "embedded": a metric label and a word in logs
    description: str  # where the data goes, without any password

    async def query_value(self, sql: str) -> str: ...

    async def execute(self, sql: str, settings: Mapping[str, object]) -> None: ...

    async def insert(
        self, database: str, table: str, body: bytes, deduplication_token: str | None, query_id: str | None = None
    ) -> None:
        """`query_id` names the attempt on the server, so that a later look at system.processes
        can tell whether it still runs; the embedded store has no use for it."""
        ...

    async def query_text(
        self, sql: str, database: str, output_format: str = "PrettyCompactMonoBlock", time_limit: float | None = None
    ) -> str:
        """A statement's result as text in `output_format`; `time_limit` is ClickHouse's own
        max_execution_time, so the server stops a query the caller no longer waits for."""
        ...

    async def close(self) -> None: ...


class HttpClickHouse:
    backend = "http"

    def __init__(self, target: ClickHouseTarget, session: aiohttp.ClientSession) -> None:
        self._target = target
        self._session = session
        self.description = f"ClickHouse at {target.location}"
        self._client = self._new_client()
        self._headers = {"X-ClickHouse-User": target.user or "default"}
        if target.password:
            self._headers["X-ClickHouse-Key"] = target.password

    def _new_client(self, **settings: object) -> ChClient:
        return ChClient(
            self._session,
            url=self._target.url,
            user=self._target.user,
            password=self._target.password,
            database=None,  # every statement names its database, which may not exist yet
            **settings,
        )

    async def query_value(self, sql: str) -> str:
        return str(await self._client.fetchval(sql))

    async def execute(self, sql: str, settings: Mapping[str, object]) -> None:
        client = self._new_client(**settings) if settings else self._client
        await client.execute(sql)

    async def insert(
        self, database: str, table: str, body: bytes, deduplication_token: str | None, query_id: str | None = None
    ) -> None:
        # Sent by hand rather than with aiochclient's insert_file, which cannot name the query.
        params = {**INSERT_SETTINGS, "query": insert_query(database, table)}
        if deduplication_token:
            params["insert_deduplication_token"] = deduplication_token
        if query_id:
            params["query_id"] = query_id
        sent = SlicedBody(body)
        async with self._session.post(self._target.url, params=params, headers=self._headers, data=sent) as response:
            if response.status != 200:
                text = (await response.read()).decode(errors="replace").strip()
                raise ChClientError(text or f"HTTP {response.status} with an empty body")

    async def query_text(
        self, sql: str, database: str, output_format: str = "PrettyCompactMonoBlock", time_limit: float | None = None
    ) -> str:
        # readonly=1: the query command's statements read, whatever the server's profile allows.
        params = {"query": sql, "database": database, "default_format": output_format, "readonly": "1"}
        if time_limit is not None:
            params["max_execution_time"] = str(max(1, round(time_limit)))
        async with self._session.post(self._target.url, params=params, headers=self._headers) as response:
            text = await response.text()
            if response.status != 200:
                raise RuntimeError(text.strip())
            return text

    async def close(self) -> None:
        """The session belongs to the supervisor, which closes it."""


class EmbeddedClickHouse:
    backend = "embedded"

    def __init__(self, data_dir: Path) -> None:
        try:
            from chdb import session as chdb_session
        except ImportError:
            raise EmbeddedUnavailable(
                "CLICKHOUSE_DSN is unset and the embedded store needs chdb: "
                "pip install -e '.[embedded]' in the clickpulse checkout, or set CLICKHOUSE_DSN to a ClickHouse server"
            ) from None
        self.lock = DataDirLock(data_dir)
        self.path = data_dir / "chdb"
        self.description = f"embedded ClickHouse (chDB) in {self.path.resolve()}"
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="chdb")
        self.path.mkdir(parents=True, exist_ok=True)
        self._session = chdb_session.Session(str(self.path))
        # chDB runs one statement at a time: inserts go first. A query starts only while no insert
        # waits, and its max_execution_time bounds how long an insert may wait behind it.
        self._inserts_waiting = 0
        self._no_insert_waiting = asyncio.Event()
        self._no_insert_waiting.set()

    async def _run(self, sql: str | bytes, output_format: str = "TabSeparated") -> str:
        # chDB's binding takes the statement as str or as UTF-8 bytes (pybind11's std::string).
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(self._executor, self._session.query, sql, output_format)
        return str(result)

    async def query_value(self, sql: str) -> str:
        return (await self._run(sql)).strip()

    async def execute(self, sql: str, settings: Mapping[str, object]) -> None:
        await self._run(sql)  # chDB is always a current ClickHouse: no compatibility settings needed

    async def insert(
        self, database: str, table: str, body: bytes, deduplication_token: str | None, query_id: str | None = None
    ) -> None:
        settings = dict(INSERT_SETTINGS)
        if deduplication_token:
            settings["insert_deduplication_token"] = deduplication_token
        self._inserts_waiting += 1
        self._no_insert_waiting.clear()
        try:
            # Bytes, not text: a str of a batch of many megabytes would be three more copies of
            # it on the event loop and the chDB thread (decode, concatenation, re-encode).
            await self._run(f"{insert_query(database, table, settings)}\n".encode() + body)
        finally:
            self._inserts_waiting -= 1
            if not self._inserts_waiting:
                self._no_insert_waiting.set()

    async def query_text(
        self, sql: str, database: str, output_format: str = "PrettyCompactMonoBlock", time_limit: float | None = None
    ) -> str:
        # The embedded store keeps its tables in its current database, `default`.
        while self._inserts_waiting:
            await self._no_insert_waiting.wait()
        seconds = max(1, round(time_limit)) if time_limit is not None else 0
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(self._executor, self._query_with_limit, sql, output_format, seconds)
        return str(result)

    def _query_with_limit(self, sql: str, output_format: str, seconds: int) -> object:
        """Blocking, on the chDB thread: the limit holds for this statement only."""
        self._session.query(f"SET max_execution_time = {seconds}")
        try:
            return self._session.query(sql, output_format)
        finally:
            self._session.query("SET max_execution_time = 0")

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._session.close)
        self._executor.shutdown(wait=True)
        self.lock.release()
