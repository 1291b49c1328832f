"""Real servers for tests and benchmarks: a ClickHouse server started from its binary on free
ports with its own temp config and data directory, a Prometheus server started the same way, and
a small TCP proxy the test controls.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

# Re-exported: older imports take them from here.
from tests.support import free_port as free_port
from tests.support import stop_process as stop_process

# A user with a password full of URL-special characters, to prove DSN decoding.
APP_USER = "app"
APP_PASSWORD = "p@ss:w/rd?#1"

_CONFIG = """<?xml version="1.0"?>
<yandex>
  <logger><level>warning</level><log>{dir}/server.log</log><errorlog>{dir}/server.err.log</errorlog></logger>
  <http_port>{http_port}</http_port>
  <tcp_port>{tcp_port}</tcp_port>
  <listen_host>127.0.0.1</listen_host>
  <path>{dir}/data/</path>
  <tmp_path>{dir}/tmp/</tmp_path>
  <user_files_path>{dir}/user_files/</user_files_path>
  <format_schema_path>{dir}/format_schemas/</format_schema_path>
  <mark_cache_size>268435456</mark_cache_size>
  <users_config>{dir}/users.xml</users_config>
  <default_profile>default</default_profile>
  <default_database>default</default_database>
  <timezone>UTC</timezone>
</yandex>
"""

_USERS = """<?xml version="1.0"?>
<yandex>
  <profiles><default></default></profiles>
  <users>
    <default><password></password><networks><ip>127.0.0.1</ip></networks><profile>default</profile><quota>default</quota></default>
    <{user}><password>{password}</password><networks><ip>127.0.0.1</ip></networks><profile>default</profile><quota>default</quota></{user}>
  </users>
  <quotas><default></default></quotas>
</yandex>
"""


def find_clickhouse_server() -> list[str] | None:
    """The command that starts a ClickHouse server, or None if none is installed."""
    explicit = os.environ.get("CLICKHOUSE_SERVER_BIN")
    if explicit:
        return [explicit]
    for candidate in ("/usr/sbin/clickhouse-server", shutil.which("clickhouse-server")):
        if candidate and os.access(candidate, os.X_OK):
            return [candidate]
    combined = shutil.which("clickhouse")
    return [combined, "server"] if combined else None


@dataclass
class ClickHouseServer:
    http_port: int
    directory: Path
    process: subprocess.Popen

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/"

    def dsn(self, database: str) -> str:
        return f"http://127.0.0.1:{self.http_port}/{database}"

    def query(self, sql: str, body: bytes | None = None, **settings: str) -> str:
        """Runs one statement as the default user; returns the response text. Blocking."""
        params = urllib.parse.urlencode({"query": sql, **settings}) if body is not None else urllib.parse.urlencode(settings)
        request = urllib.request.Request(self.url + ("?" + params if params else ""), data=body if body is not None else sql.encode())
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.read().decode()
        except urllib.error.HTTPError as error:
            raise RuntimeError(f"ClickHouse error for {sql!r}: {error.read().decode()}") from None

    async def aquery(self, sql: str) -> str:
        """`query` off the event loop, so a service under test in the same loop keeps running."""
        return await asyncio.to_thread(self.query, sql)

    def stop(self) -> None:
        stop_process(self.process)


def start_clickhouse(directory: Path, command: list[str], startup_timeout: float = 60.0) -> ClickHouseServer:
    directory.mkdir(parents=True, exist_ok=True)
    http_port, tcp_port = free_port(), free_port()
    (directory / "users.xml").write_text(_USERS.format(user=APP_USER, password=APP_PASSWORD.replace("&", "&amp;")))
    (directory / "config.xml").write_text(_CONFIG.format(dir=directory, http_port=http_port, tcp_port=tcp_port))
    output = open(directory / "stdout.log", "wb")
    process = subprocess.Popen(
        [*command, f"--config-file={directory / 'config.xml'}"],
        stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=directory,
    )
    server = ClickHouseServer(http_port=http_port, directory=directory, process=process)
    deadline = time.monotonic() + startup_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/ping", timeout=1) as response:
                if response.read().strip() == b"Ok.":
                    return server
        except OSError:
            time.sleep(0.1)
    server.stop()
    log_tail = ""
    for name in ("server.err.log", "stdout.log"):
        path = directory / name
        if path.exists():
            log_tail += path.read_text(errors="replace")[-2000:]
    raise RuntimeError(f"ClickHouse did not start on port {http_port}: {log_tail}")


class TcpProxy:
    """Forwards 127.0.0.1:port to a target port; `cut()` closes every connection and stops
    listening, `restore()` listens again on the same port, `delay` seconds are added before every
    chunk forwarded. Tests use it to make ClickHouse vanish or crawl."""

    def __init__(self, target_port: int, port: int | None = None) -> None:
        self.target_port = target_port
        self.port = port or free_port()
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[asyncio.StreamWriter] = set()
        self.delay = 0.0

    async def restore(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._connections):
            writer.transport.abort()
        self._connections.clear()

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_writer.transport.abort()
            return
        self._connections.update((client_writer, upstream_writer))
        await asyncio.gather(
            self._pipe(client_reader, upstream_writer), self._pipe(upstream_reader, client_writer), return_exceptions=True
        )
        self._connections.difference_update((client_writer, upstream_writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while chunk := await reader.read(65536):
                if self.delay:
                    await asyncio.sleep(self.delay)
                writer.write(chunk)
                await writer.drain()
        finally:
            writer.close()


def find_prometheus() -> str | None:
    """The Prometheus server binary (Debian package `prometheus`), or None if none is installed."""
    explicit = os.environ.get("PROMETHEUS_BIN")
    if explicit:
        return explicit
    for candidate in ("/usr/bin/prometheus", shutil.which("prometheus")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


@dataclass
class PrometheusServer:
    port: int
    directory: Path
    process: subprocess.Popen

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self) -> str:
        return (self.directory / "prometheus.log").read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        stop_process(self.process)


def start_prometheus(
    directory: Path, binary: str, config: dict, rule_files: dict[str, dict], startup_timeout: float = 30.0
) -> PrometheusServer:
    """Starts Prometheus on a free port with a temp TSDB. `config` is prometheus.yml as a dict; its
    `rule_files` entries name keys of `rule_files`, written next to it (JSON is valid YAML)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, rules in rule_files.items():
        (directory / name).write_text(json.dumps(rules))
    (directory / "prometheus.yml").write_text(json.dumps(config))
    port = free_port()
    output = open(directory / "prometheus.log", "wb")
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={directory / 'prometheus.yml'}",
            f"--storage.tsdb.path={directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=directory,
    )
    server = PrometheusServer(port=port, directory=directory, process=process)
    deadline = time.monotonic() + startup_timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(f"{server.url}/-/ready", timeout=1) as response:
                if response.status == 200:
                    return server
        except OSError:
            time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"Prometheus did not start on port {port}: {server.log_tail()}")
