"""`python -m clickpulse --check-config`: what the service would do with this configuration, and
whether it could: the address it listens on, ClickHouse (reachable, version, database, table,
INSERT grant), the embedded store, the spool directory. Exit 0 when it would start and write,
2 when not; for CI pipelines and support requests. It changes nothing: it creates no directory,
no database and no table, and its only insert is an empty one (which stores nothing)."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import socket
from pathlib import Path
from typing import TextIO

import aiohttp

from clickpulse.clickhouse import LOCK_FILE, HttpClickHouse, read_lock_owner
from clickpulse.config import Config, ClickHouseTarget
from clickpulse.schema import capabilities_for, quarantine_table, quote_string, table_exists_query

EXIT_OK, EXIT_PROBLEM = 0, 2


class _Report:
    def __init__(self, out: TextIO) -> None:
        self._out = out
        self.problems = 0

    def ok(self, text: str) -> None:
        print(f"ok       {text}", file=self._out)

    def plan(self, text: str) -> None:
        print(f"would    {text}", file=self._out)

    def warn(self, text: str) -> None:
        print(f"warning  {text}", file=self._out)

    def error(self, text: str) -> None:
        self.problems += 1
        print(f"error    {text}", file=self._out)


async def check_config(config: Config, out: TextIO) -> int:
    report = _Report(out)
    report.ok("configuration parsed (flags over environment over defaults)")
    _plan(config, report)
    problem = listen_problem(config)
    if problem:
        report.error(problem)
    else:
        report.ok(f"can listen on {config.http_host}:{config.http_port}")
    if config.spool_dir is not None:
        _check_directory("SPOOL_DIR", config.spool_dir, report)
    if config.clickhouse is None:
        _check_embedded(config, report)
    else:
        await _check_server(config, config.clickhouse, report)
    print(
        "result   " + ("the service would start and write" if not report.problems else f"{report.problems} problem(s): it would not"),
        file=out,
    )
    return EXIT_OK if not report.problems else EXIT_PROBLEM


def _plan(config: Config, report: _Report) -> None:
    store = (
        f"ClickHouse at {config.clickhouse.redacted}" if config.clickhouse is not None
        else f"the embedded store (chDB) in {config.data_dir.absolute() / 'chdb'}"
    )
    database = config.clickhouse.database if config.clickhouse is not None else "default"
    report.plan(f"listen on http://{config.http_host}:{config.http_port}")
    report.plan(
        f"write to {store}, table {database}.{config.clickhouse_table} "
        + ("(created at start if absent)" if config.clickhouse_create_table else "(must exist: CLICKHOUSE_CREATE_TABLE=false)")
    )
    report.plan(
        f"flush at {config.batch_size} events or when the oldest has waited {config.flush_interval:g}s; "
        f"hold at most {config.max_buffer_events} events in memory"
    )
    spool = (
        f"spool to {config.spool_dir} (at most {config.spool_max_bytes} bytes)" if config.spool_dir is not None
        else "keep unwritten events in memory only (no SPOOL_DIR)"
    )
    report.plan(f"answer POST /events in ack mode {config.ack_mode}; {spool}")
    report.plan(
        f"log at {config.log_level} as {config.log_format}"
        + ("; one line per request (ACCESS_LOG=true)" if config.access_log else "")
    )


def _check_directory(variable: str, directory: Path, report: _Report) -> None:
    if directory.is_dir():
        if os.access(directory, os.W_OK | os.X_OK):
            report.ok(f"{variable}={directory} exists and is writable")
        else:
            report.error(f"invalid {variable}={str(directory)!r}: not writable by this user")
        return
    if directory.exists():
        report.error(f"invalid {variable}={str(directory)!r}: exists and is not a directory")
        return
    parent = next((path for path in directory.absolute().parents if path.exists()), Path("/"))
    if os.access(parent, os.W_OK | os.X_OK):
        report.plan(f"create {variable}={directory} at start")
    else:
        report.error(f"invalid {variable}={str(directory)!r}: does not exist and {parent} is not writable")


def _check_embedded(config: Config, report: _Report) -> None:
    try:
        import chdb  # noqa: F401
    except ImportError:
        report.error(
            "CLICKHOUSE_DSN is unset and the embedded store needs chdb: "
            "pip install -e '.[embedded]' in the clickpulse checkout, or set CLICKHOUSE_DSN"
        )
        return
    report.ok("chdb is installed (the embedded store)")
    _check_directory("DATA_DIR", config.data_dir, report)
    lock = config.data_dir / LOCK_FILE
    if not lock.exists():
        return
    descriptor = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(descriptor, fcntl.LOCK_UN)
    except BlockingIOError:
        owner = read_lock_owner(config.data_dir) or "address unknown"
        report.error(f"invalid DATA_DIR={str(config.data_dir)!r}: in use by another clickpulse ({owner})")
    finally:
        os.close(descriptor)


async def _check_server(config: Config, target: ClickHouseTarget, report: _Report) -> None:
    timeout = config.clickhouse_timeout
    async with aiohttp.ClientSession() as session:
        clickhouse = HttpClickHouse(target, session)
        try:
            async with asyncio.timeout(timeout):
                version = await clickhouse.query_value("SELECT version()")
        except Exception as error:  # noqa: BLE001 - any failure to connect is the answer
            report.error(f"CLICKHOUSE_DSN={target.redacted}: cannot query ClickHouse: {_first_line(error)}")
            return
        capabilities = capabilities_for(version)
        report.ok(
            f"ClickHouse {version} answers at {target.redacted} (created_at {capabilities.timestamp_type}; "
            f"insert deduplication {'on' if capabilities.deduplicates_inserts else 'not supported: at least once'})"
        )
        database, table = target.database, config.clickhouse_table
        try:
            async with asyncio.timeout(timeout):
                database_exists = int(await clickhouse.query_value(
                    f"SELECT count() FROM system.databases WHERE name = {quote_string(database)}"
                ))
                table_exists = int(await clickhouse.query_value(table_exists_query(database, table)))
                quarantine_exists = int(await clickhouse.query_value(table_exists_query(database, quarantine_table(table))))
        except Exception as error:  # noqa: BLE001
            report.error(f"cannot read ClickHouse's system tables as {target.user or 'default'}: {_first_line(error)}")
            return
        if not table_exists:
            if config.clickhouse_create_table:
                what = f"database {database} and table" if not database_exists else "table"
                report.plan(f"create {what} {database}.{table} and {database}.{quarantine_table(table)} at start")
                await _check_create_grant(clickhouse, database, report, timeout)
            else:
                report.error(
                    f"table {database}.{table} does not exist and CLICKHOUSE_CREATE_TABLE=false: "
                    "the service would stay not ready until it does"
                )
            return
        report.ok(f"table {database}.{table} exists")
        try:
            async with asyncio.timeout(timeout):
                await clickhouse.insert(database, table, b"", None)  # no rows: checks the grant, stores nothing
        except Exception as error:  # noqa: BLE001
            report.error(f"user {target.user or 'default'} cannot insert into {database}.{table}: {_first_line(error)}")
            return
        report.ok(f"user {target.user or 'default'} may insert into {database}.{table}")
        if quarantine_exists:
            report.ok(f"quarantine table {database}.{quarantine_table(table)} exists")
        elif config.clickhouse_create_table:
            report.plan(f"create {database}.{quarantine_table(table)} at start (rows ClickHouse rejects)")
        else:
            where = f"quarantine.ndjson in {config.spool_dir}" if config.spool_dir else "the error log"
            report.warn(f"no {database}.{quarantine_table(table)}: rows ClickHouse rejects would go to {where}")


async def _check_create_grant(clickhouse: HttpClickHouse, database: str, report: _Report, timeout: float) -> None:
    """Servers with access control (20.x and newer) list the user's grants; older ones have none."""
    try:
        async with asyncio.timeout(timeout):
            grants = await clickhouse.query_text("SHOW GRANTS", "system", "TSV")
    except Exception:  # noqa: BLE001 - no SHOW GRANTS before access control
        report.warn("this server cannot list grants: whether the user may CREATE is found out at start")
        return
    lines = [line.upper() for line in grants.splitlines()]
    wanted = (" ON *.*", f" ON {database.upper()}.*", f" ON `{database.upper()}`.*")
    if any(("GRANT ALL" in line or "CREATE" in line) and any(scope in line for scope in wanted) for line in lines):
        report.ok(f"the user's grants include CREATE on {database}")
    else:
        report.error(f"the user has no CREATE grant on {database}: create the table first, or set CLICKHOUSE_CREATE_TABLE=false")


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def listen_problem(config: Config) -> str | None:
    """Why the service could not listen on HTTP_HOST:HTTP_PORT, found before anything starts
    (the same bind the service will do, on a socket closed at once); None when it can."""
    try:
        addresses = socket.getaddrinfo(
            config.http_host or None, config.http_port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except (socket.gaierror, UnicodeError) as error:
        return start_error(config, socket.gaierror(str(error)))
    if config.http_port == 0:
        return None
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(address)
            except OSError as error:
                if error.errno == errno.EADDRNOTAVAIL and family == socket.AF_INET6 and len(addresses) > 1:
                    continue  # no IPv6 here; asyncio skips that address the same way
                return start_error(config, error)
    return None


def start_error(config: Config, error: OSError) -> str:
    """One line naming the setting behind a failed start."""
    host, port = config.http_host, config.http_port
    if isinstance(error, socket.gaierror):
        return f"invalid HTTP_HOST={host!r}: cannot be resolved to an address to listen on ({error.strerror or error})"
    if error.errno == errno.EADDRINUSE:
        return f"invalid HTTP_PORT={port}: already in use on {host} (another process listens there)"
    if error.errno == errno.EADDRNOTAVAIL:
        return f"invalid HTTP_HOST={host!r}: not an address of this machine"
    if error.errno == errno.EACCES and error.filename is None:
        return f"invalid HTTP_PORT={port}: permission denied (ports below 1024 need privileges)"
    if error.filename is not None:
        for variable, directory in (("SPOOL_DIR", config.spool_dir), ("DATA_DIR", config.data_dir)):
            if directory is not None and str(error.filename).startswith(str(directory)):
                return f"invalid {variable}={str(directory)!r}: {error.strerror or error} ({error.filename})"
    return f"cannot start: {error}"
