"""`python -m clickpulse query "SQL"`: one read-only statement against the ClickHouse the current
configuration points at, printed as a table.

With CLICKHOUSE_DSN set it asks that server. With the embedded store it opens DATA_DIR itself
when no clickpulse runs there, and otherwise asks the running service (POST /query on its
loopback address, from DATA_DIR/clickpulse.lock): chDB admits one process per directory, and
stopping the collector to look at its data would be the wrong trade.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import aiohttp

from clickpulse.clickhouse import DataDirInUse, EmbeddedClickHouse, HttpClickHouse, read_lock_owner
from clickpulse.config import Config
from clickpulse.http.keys import first_server_secret
from clickpulse.http.query_guard import QueryRefused, check_query, readonly_statement


class QueryFailed(Exception):
    """The statement could not be run; the message says why in one line."""


async def run_query(config: Config, sql: str) -> str:
    """The same statement check everywhere (one statement that reads, no table functions that
    reach files or the network), then ClickHouse's readonly setting: sent with the request to a
    server (HttpClickHouse.query_text), attached to the statement on the embedded store."""
    try:
        sql = check_query(sql)
    except QueryRefused as refused:
        raise QueryFailed(str(refused)) from None
    target = config.clickhouse
    if target is not None:
        async with aiohttp.ClientSession() as session:
            return await _ask(lambda: HttpClickHouse(target, session).query_text(sql, target.database))
    try:
        embedded = EmbeddedClickHouse(config.data_dir)
    except DataDirInUse:
        return await _ask_running_service(config, sql)
    try:
        return await _ask(lambda: embedded.query_text(readonly_statement(sql), "default"))
    finally:
        await embedded.close()


async def _ask(run: Callable[[], Awaitable[str]]) -> str:
    try:
        return await run()
    except (RuntimeError, aiohttp.ClientError, OSError) as error:
        message = str(error).strip().splitlines()
        raise QueryFailed(message[0] if message else type(error).__name__) from None


async def _ask_running_service(config: Config, sql: str) -> str:
    owner = read_lock_owner(config.data_dir)
    if owner is None or " " not in owner:
        raise QueryFailed(f"{config.data_dir} is in use by another process that does not say where it serves")
    url = owner.split(" ", 1)[1] + "/query"
    headers = {}
    if config.ingest_keys_file is not None:  # then the service's /query needs a server key
        secret = first_server_secret(config.ingest_keys_file)
        if secret is None:
            raise QueryFailed(f"INGEST_KEYS_FILE {config.ingest_keys_file} has no server key, which /query needs")
        headers["Authorization"] = f"Bearer {secret}"
    try:
        async with aiohttp.ClientSession() as session, session.post(
            url, data=sql.encode(), headers=headers,
            # The service's own certificate on its own loopback address (TLS_CERT_FILE without
            # ADMIN_PORT) may well be self-signed; the lock file is what says who is there.
            ssl=False if url.startswith("https://") else True,
        ) as response:
            if response.status == 200:
                return await response.text()
            body = await response.json(content_type=None)
            raise QueryFailed(body.get("error", f"HTTP {response.status}") if isinstance(body, dict) else str(body))
    except aiohttp.ClientError as error:
        raise QueryFailed(f"the clickpulse holding {config.data_dir} did not answer at {url}: {error}") from None
