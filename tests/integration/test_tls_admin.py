"""Optional TLS (a self-signed certificate made here with openssl, swapped on SIGHUP) and
ADMIN_PORT (the operational routes on a second listener), against `python -m clickpulse`."""

from __future__ import annotations

import asyncio
import shutil
import signal
import ssl
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import skip_or_fail
from tests.integration.conftest import eventually, make_event, wait_for_rows
from tests.servers import ClickHouseServer
from tests.support import free_port

pytestmark = pytest.mark.integration


def self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    if openssl is None:
        skip_or_fail("no openssl")
    assert openssl is not None
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )
    return cert, key


def trusting(cert: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cert))


async def post_event(url: str, context: ssl.SSLContext, index: int) -> int | str:
    try:
        async with aiohttp.ClientSession() as http, http.post(url + "/events", json=make_event(index), ssl=context) as response:
            return response.status
    except aiohttp.ClientConnectorCertificateError:
        return "untrusted"


async def test_https_with_a_self_signed_certificate_reloaded_on_sighup(
    clickhouse_server: ClickHouseServer, clickhouse_database: str, start_service, tmp_path: Path
) -> None:
    first_cert, first_key = self_signed(tmp_path, "first")
    second_cert, second_key = self_signed(tmp_path, "second")
    live_cert, live_key = tmp_path / "live.crt", tmp_path / "live.key"
    shutil.copy(first_cert, live_cert)
    shutil.copy(first_key, live_key)
    service = start_service(
        CLICKHOUSE_DSN=clickhouse_server.dsn(clickhouse_database), TLS_CERT_FILE=str(live_cert),
        TLS_KEY_FILE=str(live_key), FLUSH_INTERVAL="100ms",
    )
    url = f"https://127.0.0.1:{service.port}"

    async def up() -> bool:
        try:
            async with aiohttp.ClientSession() as http, http.get(url + "/readyz", ssl=trusting(first_cert)) as response:
                return response.status == 200
        except aiohttp.ClientError:
            return False

    await eventually(up, timeout=20)
    assert await post_event(url, trusting(first_cert), 1) == 202
    assert await post_event(url, trusting(second_cert), 2) == "untrusted"
    # Plain HTTP on the TLS port is not served.
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientError):
            async with http.get(f"http://127.0.0.1:{service.port}/healthz") as response:
                await response.read()

    shutil.copy(second_cert, live_cert)
    shutil.copy(second_key, live_key)
    service.process.send_signal(signal.SIGHUP)

    async def swapped() -> bool:
        return await post_event(url, trusting(second_cert), 3) == 202

    await eventually(swapped, timeout=10)
    assert await post_event(url, trusting(first_cert), 4) == "untrusted"
    live_key.write_text("not a key")  # a broken pair keeps the certificate in use
    service.process.send_signal(signal.SIGHUP)
    await eventually(lambda: asyncio.sleep(0, "keeping the TLS certificate" in service.log), timeout=10)
    assert await post_event(url, trusting(second_cert), 5) == 202
    assert await wait_for_rows(clickhouse_server, clickhouse_database, 3) == 3
    service.process.send_signal(signal.SIGTERM)
    assert await service.wait_exit(30) == 0
    assert "Traceback" not in service.log


def test_a_bad_certificate_exits_2_with_one_line(python_env: dict[str, str], tmp_path: Path) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("not a certificate")
    result = subprocess.run(
        [sys.executable, "-m", "clickpulse"],
        env={**python_env, "TLS_CERT_FILE": str(cert), "TLS_KEY_FILE": str(cert), "DATA_DIR": str(tmp_path / "d"),
             "HTTP_HOST": "127.0.0.1", "HTTP_PORT": "0"},
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "TLS_CERT_FILE" in result.stderr


async def test_admin_port_takes_the_operational_routes_off_the_public_listener(
    start_service, python_env: dict[str, str], tmp_path: Path
) -> None:
    admin_port = free_port()
    data_dir = tmp_path / "data"
    service = start_service(DATA_DIR=str(data_dir), ADMIN_PORT=str(admin_port), FLUSH_INTERVAL="100ms")
    admin = f"http://127.0.0.1:{admin_port}"
    async with aiohttp.ClientSession() as http:
        async def ready() -> bool:
            try:
                async with http.get(admin + "/readyz") as response:
                    return response.status == 200
            except aiohttp.ClientError:
                return False

        await eventually(ready, timeout=60)
        for path in ("/metrics", "/healthz", "/readyz"):
            async with http.get(service.url + path) as response:
                assert response.status == 404, path
            async with http.get(admin + path) as response:
                assert response.status == 200, path
        async with http.post(service.url + "/query", data="SELECT 1") as response:
            assert response.status == 404
        async with http.post(service.url + "/events", json=make_event(1)) as response:
            assert response.status == 202
        async with http.post(admin + "/events", json=make_event(2)) as response:
            assert response.status in (404, 405)
    # The query command finds the running service's /query on the admin listener.
    async def counted() -> bool:
        result = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "clickpulse", "query", "SELECT count() FROM events"],
            env={**python_env, "DATA_DIR": str(data_dir)}, capture_output=True, text=True, timeout=60,
        )
        return result.returncode == 0 and "│ 1 │" in result.stdout.replace("       ", " ")

    await eventually(counted, timeout=20)
    service.process.send_signal(signal.SIGTERM)
    assert await service.wait_exit(30) == 0
