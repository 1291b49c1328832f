"""The shared test helpers: the child environment filter, the manual clock, process stops."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys

import pytest

from clickpulse import events
from clickpulse.config import SETTINGS
from tests import servers
from tests.support import ManualClock, clean_environment, free_port, stop_process


def test_every_setting_variable_in_the_callers_environment_is_absent_from_the_clean_one() -> None:
    caller = {setting.variable: "set-by-the-caller" for setting in SETTINGS}
    caller.update(PATH="/usr/bin", HOME="/root", PYTHONPATH="/somewhere")

    clean = clean_environment(caller)

    assert SETTINGS, "no settings to check"
    assert not {setting.variable for setting in SETTINGS} & clean.keys()
    assert clean == {"PATH": "/usr/bin", "HOME": "/root", "PYTHONPATH": "/somewhere"}


@pytest.fixture
def every_setting_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for setting in SETTINGS:
        monkeypatch.setenv(setting.variable, "set-by-the-caller")
    monkeypatch.setenv("CLICKPULSE_TEST_MARKER", "kept")


def test_python_env_has_no_setting_variable(every_setting_in_the_environment: None, python_env: dict[str, str]) -> None:
    assert python_env["CLICKPULSE_TEST_MARKER"] == "kept"  # built from the environment set above
    assert not {setting.variable for setting in SETTINGS} & python_env.keys()


def test_other_clickhouse_variables_go_but_the_server_binary_stays() -> None:
    clean = clean_environment(
        {"CLICKHOUSE_PASSWORD": "secret", "CLICKHOUSE_SERVER_BIN": "/opt/clickhouse-server", "HTTP_PROXY": "http://proxy"}
    )
    assert clean == {"CLICKHOUSE_SERVER_BIN": "/opt/clickhouse-server", "HTTP_PROXY": "http://proxy"}


def test_servers_re_exports_the_moved_helpers() -> None:
    assert servers.free_port is free_port
    assert servers.stop_process is stop_process


def test_free_port_can_be_listened_on() -> None:
    port = free_port()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", port))
        listener.listen()


def test_stop_process_returns_the_exit_status_of_a_terminated_process() -> None:
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    assert stop_process(process, timeout=10) == -signal.SIGTERM
    assert stop_process(process) == -signal.SIGTERM  # already stopped: nothing more to do


def test_stop_process_kills_a_process_that_ignores_sigterm() -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE,
    )
    assert process.stdout is not None
    process.stdout.readline()  # the handler is installed
    assert stop_process(process, timeout=0.2) == -signal.SIGKILL
    process.stdout.close()


def test_the_manual_clock_moves_only_when_told() -> None:
    clock = ManualClock(start=100.0)
    assert clock() == clock.time() == clock.monotonic() == clock.perf_counter() == 100.0
    assert clock.time_ns() == clock.monotonic_ns() == 100_000_000_000
    clock.advance(0.001)
    assert clock.time_ns() == 100_001_000_000
    assert clock() == pytest.approx(100.001)
    with pytest.raises(ValueError):
        clock.advance(-1)


def test_the_manual_clock_stands_in_for_a_modules_time(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = ManualClock(start=1_700_000_000.0)
    clock.install(monkeypatch, events)
    ids = events.EventIds()

    first, second = ids.batch(2)
    clock.advance(0.001)
    (third,) = ids.batch(1)

    # UUIDv7: the first 48 bits are the millisecond timestamp.
    def milliseconds(event_id: str) -> int:
        return int(event_id.replace("-", "")[:12], 16)

    assert milliseconds(first) == milliseconds(second) == 1_700_000_000_000
    assert milliseconds(third) == 1_700_000_000_001
