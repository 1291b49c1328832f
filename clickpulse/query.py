"""`python -m clickpulse query "SQL"`: one read-only statement against the ClickHouse the current
configuration points at, printed as a table (or in a ClickHouse format for programs).

With CLICKHOUSE_DSN set it asks that server. With the embedded store it opens DATA_DIR itself
when no clickpulse runs there, and otherwise asks the running service (POST /query on its
loopback address, from DATA_DIR/clickpulse.lock): chDB admits one process per directory, and
stopping the collector to look at its data would be the wrong trade. A DATA_DIR that does not
exist is an error, not something to create: it means the command runs in the wrong directory.

The table is drawn here, from ClickHouse's JSONCompact answer, so that it looks the same
whichever backend answered (and whatever the server's version), has a header and a row count
even when no row matched, and is coloured only on a terminal.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Awaitable, Callable

import aiohttp
import msgspec

from clickpulse.clickhouse import DataDirInUse, EmbeddedClickHouse, HttpClickHouse, read_lock_owner
from clickpulse.config import Config
from clickpulse.http.keys import first_server_secret
from clickpulse.http.query_guard import QueryRefused, check_query, readonly_statement

# The format asked of ClickHouse for --format table; the table is drawn from it.
TABLE_SOURCE_FORMAT = "JSONCompact"
# A statement that names its own output format gets exactly that output.
_OWN_FORMAT = re.compile(r"\bFORMAT\s+[A-Za-z][A-Za-z0-9_]*\s*;?\s*$", re.IGNORECASE)
_NUMERIC_TYPE = re.compile(r"^(Nullable\()?(U?Int\d+|Float\d+|Decimal)")
_BOLD, _RESET = "\033[1m", "\033[0m"


class QueryFailed(Exception):
    """The statement could not be run; the message says why in one line."""

    def __init__(self, message: str, exit_status: int = 1) -> None:
        super().__init__(message)
        self.exit_status = exit_status  # 2: the configuration is wrong (like any setting error)



class _Column(msgspec.Struct):
    name: str
    type: str


class _Result(msgspec.Struct):
    meta: list[_Column]
    data: list[list[object]]


async def run_query(config: Config, sql: str, output_format: str = "table", *, colour: bool = False) -> str:
    """The text to print: a table, or ClickHouse's own output in `output_format`. The same
    statement check everywhere (one statement that reads, no table functions that reach files or
    the network), then ClickHouse's readonly setting: sent with the request to a server
    (HttpClickHouse.query_text), attached to the statement on the embedded store."""
    try:
        sql = check_query(sql)
    except QueryRefused as refused:
        raise QueryFailed(str(refused)) from None
    wanted = TABLE_SOURCE_FORMAT if output_format == "table" else output_format
    text = await _fetch(config, sql, wanted)
    if output_format != "table" or _OWN_FORMAT.search(sql.strip()):
        return text
    return render_table(text, colour=colour)


async def _fetch(config: Config, sql: str, output_format: str) -> str:
    target = config.clickhouse
    if target is not None:
        async with aiohttp.ClientSession() as session:
            return await _ask(lambda: HttpClickHouse(target, session).query_text(
                sql, target.database, output_format, config.query_timeout
            ))
    if not (config.data_dir / "chdb").is_dir():
        raise QueryFailed(
            f"DATA_DIR={str(config.data_dir)!r} holds no embedded store ({config.data_dir.absolute() / 'chdb'} does not exist): "
            "run the command where the service ran, or set DATA_DIR (or CLICKHOUSE_DSN)",
            exit_status=2,
        )
    try:
        embedded = EmbeddedClickHouse(config.data_dir)
    except DataDirInUse:
        return await _ask_running_service(config, sql, output_format)
    try:
        return await _ask(lambda: embedded.query_text(readonly_statement(sql), "default", output_format, config.query_timeout))
    finally:
        await embedded.close()


async def _ask(run: Callable[[], Awaitable[str]]) -> str:
    try:
        return await run()
    except (RuntimeError, aiohttp.ClientError, OSError) as error:
        message = str(error).strip().splitlines()
        raise QueryFailed(message[0] if message else type(error).__name__) from None


async def _ask_running_service(config: Config, sql: str, output_format: str) -> str:
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
            url, data=sql.encode(), params={"format": output_format}, headers=headers,
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


def render_table(text: str, *, colour: bool = False) -> str:
    """A JSONCompact answer as a box-drawn table with a row count; a statement that returns no
    result set (text empty) prints `Ok.`; anything that is not JSONCompact is returned as it is."""
    if not text.strip():
        return "Ok.\n"
    try:
        result = msgspec.json.decode(text, type=_Result)
    except msgspec.DecodeError:
        return text
    names = [column.name for column in result.meta]
    right = [bool(_NUMERIC_TYPE.match(column.type)) for column in result.meta]
    rows = [[_cell(value) for value in row] for row in result.data]
    widths = [max([_width(name)] + [_width(row[index]) for row in rows]) for index, name in enumerate(names)]
    lines = []
    header = []
    for name, width, align_right in zip(names, widths, right):
        padding = "─" * (width - _width(name))
        shown = f"{_BOLD}{name}{_RESET}" if colour else name
        header.append(f"─{padding}{shown}─" if align_right else f"─{shown}{padding}─")
    lines.append("┌" + "┬".join(header) + "┐")
    for row in rows:
        cells = [_pad(value, width, align_right) for value, width, align_right in zip(row, widths, right)]
        lines.append("│ " + " │ ".join(cells) + " │")
    lines.append("└" + "┴".join("─" * (width + 2) for width in widths) + "┘")
    count = len(rows)
    lines.append(f"{count} row" if count == 1 else f"{count} rows")
    return "\n".join(lines) + "\n"


_CONTROL_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r", "\0": "\\0"}


def _cell(value: object) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, str):
        text = value
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (int, float)):
        text = repr(value) if isinstance(value, float) else str(value)
    else:
        text = msgspec.json.encode(value).decode()
    return "".join(_CONTROL_ESCAPES.get(char, f"\\x{ord(char):02x}") if char < " " else char for char in text)


def _width(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(char) in ("W", "F") else 0 if unicodedata.combining(char) else 1 for char in text)


def _pad(text: str, width: int, align_right: bool) -> str:
    padding = " " * (width - _width(text))
    return padding + text if align_right else text + padding
