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
from aiochclient import ChClient

from clickpulse.config import ClickHouseTarget
from clickpulse.schema import insert_query

# Old servers parse ISO 8601 timestamps with offsets only in best-effort mode.
INSERT_SETTINGS: Mapping[str, str] = {"date_time_input_format": "best_effort"}


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

    async def insert(self, database: str, table: str, body: bytes, deduplication_token: str | None) -> None: ...

    async def query_text(self, sql: str, database: str) -> str: ...

    async def close(self) -> None: ...


class HttpClickHouse:
    backend = "http"

    def __init__(self, target: ClickHouseTarget, session: aiohttp.ClientSession) -> None:
        self._target = target
        self._session = session
        self.description = f"ClickHouse at {target.redacted}"
        self._client = self._new_client()
        self._insert_client = self._new_client(**INSERT_SETTINGS)

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

    async def insert(self, database: str, table: str, body: bytes, deduplication_token: str | None) -> None:
        settings = {"insert_deduplication_token": deduplication_token} if deduplication_token else {}
        await self._insert_client.insert_file(insert_query(database, table, settings), body)

    async def query_text(self, sql: str, database: str) -> str:
        # readonly=1: the query command's statements read, whatever the server's profile allows.
        params = {"query": sql, "database": database, "default_format": "PrettyCompactMonoBlock", "readonly": "1"}
        headers = {"X-ClickHouse-User": self._target.user or "default"}
        if self._target.password:
            headers["X-ClickHouse-Key"] = self._target.password
        async with self._session.post(self._target.url, params=params, headers=headers) as response:
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
                "pip install 'clickpulse[embedded]', or set CLICKHOUSE_DSN to a ClickHouse server"
            ) from None
        self.lock = DataDirLock(data_dir)
        self.path = data_dir / "chdb"
        self.description = f"embedded ClickHouse (chDB) in {self.path.resolve()}"
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="chdb")
        self.path.mkdir(parents=True, exist_ok=True)
        self._session = chdb_session.Session(str(self.path))

    async def _run(self, sql: str, output_format: str = "TabSeparated") -> str:
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(self._executor, self._session.query, sql, output_format)
        return str(result)

    async def query_value(self, sql: str) -> str:
        return (await self._run(sql)).strip()

    async def execute(self, sql: str, settings: Mapping[str, object]) -> None:
        await self._run(sql)  # chDB is always a current ClickHouse: no compatibility settings needed

    async def insert(self, database: str, table: str, body: bytes, deduplication_token: str | None) -> None:
        settings = dict(INSERT_SETTINGS)
        if deduplication_token:
            settings["insert_deduplication_token"] = deduplication_token
        await self._run(f"{insert_query(database, table, settings)}\n{body.decode()}")

    async def query_text(self, sql: str, database: str) -> str:
        # The embedded store keeps its tables in its current database, `default`.
        return await self._run(sql, "PrettyCompactMonoBlock")

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._session.close)
        self._executor.shutdown(wait=True)
        self.lock.release()
