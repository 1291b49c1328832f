"""The deployment files' commands and paths against a real `python -m clickpulse`: the Dockerfile's
and compose's healthcheck commands run as subprocesses, and every path that Kubernetes probes or
Prometheus scrapes is asked of the running service.

The service is configured as the image and the Kubernetes ConfigMap configure it (with the port,
the spool directory and the ClickHouse address moved to this machine). No ClickHouse is needed:
liveness does not depend on it, and readiness must then answer 503, not 404.
"""

from __future__ import annotations

import http.server
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deploy_files import (
    SETTING_NAMES,
    dockerfile_healthcheck,
    final_stage_env,
    healthcheck_command,
    k8s_resource,
    read_compose,
    read_dockerfile,
)
from tests.support import clean_environment, free_port, stop_process

pytestmark = pytest.mark.integration

STARTUP_SECONDS = 30


def healthcheck_commands() -> dict[str, list[str]]:
    compose_test = read_compose()["services"]["clickpulse"]["healthcheck"]["test"]
    return {
        "Dockerfile HEALTHCHECK": dockerfile_healthcheck(read_dockerfile()).command,
        "compose healthcheck": healthcheck_command(compose_test),
    }


def run_healthcheck(command: list[str], port: int, base_env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Runs the command as the container would, with this machine's Python standing in for the
    image's `python`; the port comes through ADMIN_PORT (the command prefers it to HTTP_PORT, as
    the service serves /healthz there when it is set)."""
    argv = [sys.executable if part == "python" else part for part in command]
    return subprocess.run(
        argv, env={**base_env, "HTTP_PORT": "1", "ADMIN_PORT": str(port)}, capture_output=True, text=True, timeout=30,
        stdin=subprocess.DEVNULL,
    )


def wait_until_listening(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"clickpulse exited with {process.returncode}: {log.read_text(errors='replace')}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"clickpulse did not listen within {STARTUP_SECONDS}s: {log.read_text(errors='replace')}")


@pytest.fixture(scope="module")
def deployed_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, dict[str, str]]]:
    """`python -m clickpulse` with the image's and the ConfigMap's settings; yields the port the
    probes ask (ADMIN_PORT, moved to a free one here, when the ConfigMap sets it) and the env."""
    directory = tmp_path_factory.mktemp("deployed")
    port = free_port()
    probe_port = port
    image_env = final_stage_env(read_dockerfile())
    settings = {name: value for name, value in image_env.items() if name in SETTING_NAMES}
    settings.update(k8s_resource("ConfigMap")["data"])
    if "SPOOL_DIR" in settings:
        settings["SPOOL_DIR"] = str(directory / "spool")
    settings.update(
        HTTP_HOST="127.0.0.1",
        HTTP_PORT=str(port),
        # Nothing listens there: the liveness answer must not depend on ClickHouse.
        CLICKHOUSE_DSN=f"http://127.0.0.1:{free_port()}/clickpulse",
    )
    if "ADMIN_PORT" in settings:
        probe_port = free_port()
        settings.update(ADMIN_HOST="127.0.0.1", ADMIN_PORT=str(probe_port))
    base_env = clean_environment(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    base_env["PYTHONPATH"] = root + os.pathsep + base_env.get("PYTHONPATH", "")
    log = directory / "clickpulse.log"
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "clickpulse"], env={**base_env, **settings},
            stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
    try:
        wait_until_listening(f"http://127.0.0.1:{probe_port}/healthz", process, log)
        yield probe_port, base_env
    finally:
        stop_process(process)


@pytest.mark.parametrize("name", list(healthcheck_commands()))
def test_the_healthcheck_command_succeeds_against_the_running_service(
    deployed_service: tuple[int, dict[str, str]], name: str
) -> None:
    port, base_env = deployed_service

    completed = run_healthcheck(healthcheck_commands()[name], port, base_env)

    assert completed.returncode == 0, completed.stderr


@pytest.mark.parametrize("name", list(healthcheck_commands()))
def test_the_healthcheck_command_fails_when_nothing_listens(name: str) -> None:
    completed = run_healthcheck(healthcheck_commands()[name], free_port(), dict(os.environ))

    assert completed.returncode != 0


class _UnhealthyHandler(http.server.BaseHTTPRequestHandler):
    """Answers every GET with 503, as a wedged service behind a working socket might."""

    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - silence the test output
        pass


@pytest.mark.parametrize("name", list(healthcheck_commands()))
def test_the_healthcheck_command_fails_on_an_error_status(name: str) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _UnhealthyHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        completed = run_healthcheck(healthcheck_commands()[name], server.server_address[1], dict(os.environ))
    finally:
        server.shutdown()
        server.server_close()

    assert completed.returncode != 0
    assert "503" in completed.stderr


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_every_probed_and_scraped_path_is_served(deployed_service: tuple[int, dict[str, str]]) -> None:
    port, _ = deployed_service
    deployment = k8s_resource("Deployment")["spec"]["template"]
    (container,) = deployment["spec"]["containers"]
    assert all(container[probe]["httpGet"]["port"] == "admin" for probe in ("startupProbe", "livenessProbe",
                                                                          "readinessProbe"))
    healthcheck_paths = {
        re.search(r"127\.0\.0\.1:[^/]*(/\w+)", " ".join(command)).group(1) for command in healthcheck_commands().values()
    }

    for probe in ("startupProbe", "livenessProbe"):
        path = container[probe]["httpGet"]["path"]
        assert get(port, path)[0] == 200, f"{probe} {path}"
    for path in healthcheck_paths:
        assert get(port, path)[0] == 200, path
    # Ready only with ClickHouse: here it is unreachable, so 503 with a reason (never 404).
    status, body = get(port, container["readinessProbe"]["httpGet"]["path"])
    assert status == 503 and "clickhouse" in body.lower(), body
    status, body = get(port, deployment["metadata"]["annotations"]["prometheus.io/path"])
    assert status == 200 and "# TYPE" in body
