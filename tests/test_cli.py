"""`python -m clickpulse` as a command-line tool: --version, --help, query --help, and the
configuration errors a failed start turns into (one line naming the setting, exit status 2)."""

from __future__ import annotations

import errno
import json
import logging
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import clickpulse.__main__ as cli
from clickpulse import __version__
from clickpulse.check import start_error
from clickpulse.config import SETTINGS, Config, load_config, shown_default
from tests.support import free_port


def run(arguments: list[str], env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "clickpulse", *arguments], env=env, cwd=cwd, capture_output=True, text=True, timeout=60)


def test_version_prints_the_package_version(python_env: dict[str, str]) -> None:
    result = run(["--version"], python_env)
    assert (result.returncode, result.stdout.strip()) == (0, f"clickpulse {__version__}")


def test_help_lists_the_query_command_and_every_setting_with_its_default(python_env: dict[str, str]) -> None:
    result = run(["--help"], python_env)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # argparse wraps lines
    assert re.search(r"\bquery\b.*read-only SQL statement", text)
    assert "--check-config" in text and "--version" in text
    for setting in SETTINGS:
        assert f"[{setting.variable}; default: {shown_default(setting)}" in text, setting.variable
    assert "DEBUG, INFO, WARNING, ERROR, CRITICAL" in text


def test_shown_defaults_parse_back_to_the_defaults() -> None:
    defaults = Config()
    for setting in SETTINGS:
        shown = shown_default(setting)
        if shown != "unset":
            assert setting.parse(shown) == getattr(defaults, setting.field), setting.variable


def test_query_help_exits_0_and_names_the_formats(python_env: dict[str, str]) -> None:
    result = run(["query", "--help"], python_env)
    assert result.returncode == 0, result.stderr
    assert "--format" in result.stdout and "JSONEachRow" in result.stdout


def test_query_without_sql_is_one_line_and_exit_2(python_env: dict[str, str]) -> None:
    result = run(["query"], python_env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["clickpulse: command line: the following arguments are required: SQL"]


def test_settings_flags_work_before_and_after_the_query_command() -> None:
    assert load_config(["--data-dir", "a", "query", "SELECT 1"]).data_dir == Path("a")
    assert load_config(["query", "SELECT 1", "--data-dir", "b"]).data_dir == Path("b")


def test_a_port_in_use_exits_2_with_one_line_naming_http_port(python_env: dict[str, str], tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run([], {**python_env, "HTTP_HOST": "127.0.0.1", "HTTP_PORT": str(port), "DATA_DIR": str(tmp_path / "d")})
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("clickpulse: invalid HTTP_PORT=") and "in use" in line
    assert not (tmp_path / "d").exists()  # nothing was started


def test_an_unresolvable_http_host_exits_2_with_one_line_naming_it(python_env: dict[str, str], tmp_path: Path) -> None:
    # An empty label fails before any lookup leaves the machine.
    result = run([], {**python_env, "HTTP_HOST": "bad..host", "DATA_DIR": str(tmp_path / "d")})
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("clickpulse: invalid HTTP_HOST='bad..host'")


@pytest.fixture
def restored_logging() -> Iterator[None]:
    """main() configures the root logger for the process; a test that calls it in-process must
    leave logging as it found it, or later tests' caplog sees nothing."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    levels = {name: logging.getLogger(name).level for name in ("aiohttp.access", "asyncio")}
    yield
    root.handlers[:], root.level = saved[0], saved[1]
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def test_a_bind_failure_during_start_is_one_line_exit_2_and_closes_everything(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], recwarn: pytest.WarningsRecorder,
    restored_logging: None,
) -> None:
    # The port is taken between the check and the start: Service.start fails, closes what it
    # opened, and the OSError becomes the same one line.
    monkeypatch.setattr(cli, "listen_problem", lambda config: None)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        status = cli.main([
            "--http-host", "127.0.0.1", "--http-port", str(port),
            "--clickhouse-dsn", f"http://127.0.0.1:{free_port()}/db", "--log-level", "critical",
        ])
    assert status == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"clickpulse: invalid HTTP_PORT={port}: already in use on 127.0.0.1 (another process listens there)"]
    assert not [warning for warning in recwarn if "Unclosed" in str(warning.message)]


@pytest.mark.parametrize(
    ("error", "variable"),
    [
        (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), "HTTP_HOST"),
        (OSError(errno.EADDRINUSE, "address already in use"), "HTTP_PORT"),
        (OSError(errno.EADDRNOTAVAIL, "cannot assign requested address"), "HTTP_HOST"),
        (OSError(errno.EACCES, "permission denied"), "HTTP_PORT"),
        (PermissionError(errno.EACCES, "Permission denied", "/srv/spool/segment-1"), "SPOOL_DIR"),
    ],
)
def test_start_errors_name_their_setting(error: OSError, variable: str) -> None:
    config = Config(spool_dir=Path("/srv/spool"))
    assert start_error(config, error).startswith(f"invalid {variable}=")


def test_a_json_log_line_with_a_header_that_was_not_utf8_is_still_one_json_object() -> None:
    record = logging.LogRecord("clickpulse.access", logging.INFO, __file__, 1, "POST /events", None, None)
    record.fields = {"path": "/events", "user_agent": "bot/\udcff1"}

    line = cli.JsonLogFormatter().format(record)

    assert "\n" not in line and line.isascii()
    assert json.loads(line)["user_agent"] == "bot/\udcff1"  # escaped, not lost
