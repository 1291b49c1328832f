"""Unit tests for clickpulse.config: durations, DSNs, flags over environment over defaults."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from clickpulse.config import SETTINGS, Config, ConfigError, load_config, parse_dsn, parse_duration, parse_size

REPO_ROOT = Path(__file__).resolve().parent.parent


# -- parse_duration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("5s", 5.0),
        ("1m30s", 90.0),
        ("2h", 7200.0),
        ("2.5", 2.5),
        ("1h30m15s500ms", 5415.5),
        ("1.5s", 1.5),
        ("0", 0.0),
        (" 5s ", 5.0),
    ],
)
def test_parse_duration_accepts_units_and_plain_seconds(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "abc", "5x", "5 s", "s", "5s5", "-1", "-5s", "1.5.5s", "nan", "inf", "5S"])
def test_parse_duration_rejects_malformed_negative_and_non_finite_values(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


# -- parse_size -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("1073741824", 1 << 30),
        ("512MiB", 512 << 20),
        ("1GiB", 1 << 30),
        ("2TiB", 2 << 40),
        ("64KiB", 64 << 10),
        ("10GB", 10 * 1000**3),
        ("5MB", 5 * 1000**2),
        ("3kb", 3000),
        ("100b", 100),
        ("1.5KiB", 1536),
        ("1gib", 1 << 30),
        (" 2 MiB ", 2 << 20),
    ],
)
def test_parse_size_accepts_bytes_and_binary_and_decimal_units(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    "text", ["", "   ", "abc", "MiB", "-1", "-5MiB", "0", "0GiB", "0.0001KiB", "10XB", "1.5.5MiB", "1 MiB extra", "1e9"]
)
def test_parse_size_rejects_malformed_unknown_unit_and_non_positive_sizes(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


# -- parse_dsn --------------------------------------------------------------------------------


def test_parse_dsn_url_form_with_url_encoded_password() -> None:
    target = parse_dsn("http://user:p%40ss@clickhouse.example:9000/analytics")

    assert target.url == "http://clickhouse.example:9000/"
    assert target.database == "analytics"
    assert target.user == "user"
    assert target.password == "p@ss"


def test_parse_dsn_old_query_parameter_form() -> None:
    target = parse_dsn("http://host:8123?user=app&password=app&database=x")

    assert target.url == "http://host:8123/"
    assert target.database == "x"
    assert target.user == "app"
    assert target.password == "app"


def test_parse_dsn_https_defaults_to_port_8443_and_http_to_8123() -> None:
    assert parse_dsn("https://ch.example/db").url == "https://ch.example:8443/"
    assert parse_dsn("http://ch.example/db").url == "http://ch.example:8123/"


def test_parse_dsn_without_database_or_credentials_uses_default_database() -> None:
    target = parse_dsn("http://ch.example")

    assert target.database == "default"
    assert target.user is None
    assert target.password is None


def test_parse_dsn_keeps_ipv6_literal_bracketed() -> None:
    assert parse_dsn("http://[::1]:8123/x").url == "http://[::1]:8123/"


@pytest.mark.parametrize(
    "dsn",
    [
        "ftp://host/db",
        "host:8123/db",
        "http://:8123/db",
        "http://host:99999/db",
        "http://host:abc/db",
        "http://host/a/b",
        "http://host/db?foo=1",
    ],
)
def test_parse_dsn_rejects_bad_dsns(dsn: str) -> None:
    with pytest.raises(ValueError):
        parse_dsn(dsn)


def test_target_repr_and_str_hide_the_password() -> None:
    target = parse_dsn("http://user:hunter2secret@host:8123/db")

    assert "hunter2secret" not in repr(target)
    assert "hunter2secret" not in str(target)
    assert "hunter2secret" not in target.redacted
    assert "user" in target.redacted and "host:8123" in target.redacted


# -- load_config: precedence ------------------------------------------------------------------


def test_load_config_defaults_without_flags_or_environment() -> None:
    config = load_config([], {})

    assert config == Config()
    assert config.http_port == 8080
    assert config.clickhouse is None  # no DSN: the embedded store
    assert config.data_dir == Path("clickpulse-data")


def test_environment_overrides_defaults() -> None:
    config = load_config(
        [],
        {
            "HTTP_PORT": "9001",
            "BATCH_SIZE": "50",
            "FLUSH_INTERVAL": "250ms",
            "CLICKHOUSE_TABLE": "clicks",
            "CLICKHOUSE_DSN": "http://app:pw@ch:8124/stats",
            "LOG_LEVEL": "debug",
            "LOG_FORMAT": "JSON",
        },
    )

    assert config.http_port == 9001
    assert config.batch_size == 50
    assert config.flush_interval == pytest.approx(0.25)
    assert config.clickhouse_table == "clicks"
    assert config.clickhouse.url == "http://ch:8124/"
    assert config.clickhouse.database == "stats"
    assert config.log_level == "DEBUG"
    assert config.log_format == "json"


def test_flags_override_environment() -> None:
    config = load_config(
        ["--http-port", "7000", "--flush-interval", "2s", "--clickhouse-dsn", "http://flag-host/flagdb"],
        {"HTTP_PORT": "9001", "FLUSH_INTERVAL": "250ms", "CLICKHOUSE_DSN": "http://env-host/envdb", "BATCH_SIZE": "42"},
    )

    assert config.http_port == 7000
    assert config.flush_interval == 2.0
    assert config.clickhouse.url == "http://flag-host:8123/"
    assert config.clickhouse.database == "flagdb"
    assert config.batch_size == 42  # no flag given: the environment still applies


def test_empty_environment_variable_means_unset() -> None:
    assert load_config([], {"HTTP_PORT": ""}).http_port == 8080


# -- load_config: errors name the variable ----------------------------------------------------

BAD_VALUES = {
    "HTTP_PORT": "abc",
    "CLICKHOUSE_DSN": "ftp://host/db",
    "CLICKHOUSE_TABLE": "events; DROP TABLE x",
    "CLICKHOUSE_TIMEOUT": "0",
    "BATCH_SIZE": "0",
    "FLUSH_INTERVAL": "soon",
    "MAX_BODY_BYTES": "-5",
    "MAX_BATCH_EVENTS": "1.5",
    "MAX_BUFFER_EVENTS": "lots",
    "SHUTDOWN_TIMEOUT": "-1s",
    "LOG_LEVEL": "loud",
    "LOG_FORMAT": "xml",
    "CLICKHOUSE_CREATE_TABLE": "maybe",
    "ACCESS_LOG": "sometimes",
    "SPOOL_DIR": "   ",
    "DATA_DIR": "   ",
    "SPOOL_MAX_BYTES": "10XB",
    "MAX_BUFFER_BYTES": "0",
    "QUERY_TIMEOUT": "0s",
    "ACK_MODE": "eventually",
    "ACK_TIMEOUT": "0",
    "CLICKHOUSE_DOWN_GRACE": "soon",
    "INGEST_KEYS_FILE": "   ",
    "CORS_ORIGINS": "https://ok.example, shop.example",
    "RATE_LIMIT_EVENTS_PER_SECOND": "0",
    "RATE_LIMIT_BURST": "-3",
    "TRUSTED_PROXIES": "10.0.0.0/8, not-an-address",
    "MAX_INFLIGHT_BODY_BYTES": "lots",
    "BODY_READ_TIMEOUT": "0",
    "KEEPALIVE_TIMEOUT": "forever",
    "HEAD_READ_TIMEOUT": "0s",
    "MAX_CONNECTIONS": "none",
    "TLS_CERT_FILE": "  ",
    "TLS_KEY_FILE": "  ",
    "ADMIN_PORT": "70000",
    "SEGMENT_MAX_MESSAGE_BYTES": "0",
    "SEGMENT_MAX_BATCH_BYTES": "lots",
    "ENRICH_IP": "maybe",
}


def test_every_setting_except_http_host_has_a_bad_value_case() -> None:
    assert set(BAD_VALUES) == {setting.variable for setting in SETTINGS} - {"HTTP_HOST", "ADMIN_HOST"}


@pytest.mark.parametrize(("variable", "value"), sorted(BAD_VALUES.items()))
def test_bad_environment_value_raises_config_error_naming_the_variable(variable: str, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config([], {variable: value})

    message = str(caught.value)
    assert variable in message
    assert "\n" not in message


@pytest.mark.parametrize(("variable", "value"), sorted(BAD_VALUES.items()))
def test_bad_flag_value_raises_config_error_naming_the_flag(variable: str, value: str) -> None:
    flag = "--" + variable.lower().replace("_", "-")

    with pytest.raises(ConfigError) as caught:
        load_config([f"{flag}={value}"], {})

    assert flag in str(caught.value)


def test_bad_flag_wins_over_good_environment_value() -> None:
    with pytest.raises(ConfigError, match="--http-port"):
        load_config(["--http-port", "x"], {"HTTP_PORT": "8080"})


def test_unknown_flag_raises_config_error() -> None:
    with pytest.raises(ConfigError, match="--no-such-flag"):
        load_config(["--no-such-flag", "1"], {})


@pytest.mark.parametrize("port", ["-1", "65536"])
def test_port_out_of_range_is_rejected(port: str) -> None:
    with pytest.raises(ConfigError, match="HTTP_PORT"):
        load_config([], {"HTTP_PORT": port})


def test_max_batch_events_above_max_buffer_events_is_an_error() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config([], {"MAX_BATCH_EVENTS": "200", "MAX_BUFFER_EVENTS": "100"})

    assert "MAX_BATCH_EVENTS" in str(caught.value)
    assert "MAX_BUFFER_EVENTS" in str(caught.value)


def test_max_batch_events_equal_to_max_buffer_events_is_allowed() -> None:
    config = load_config([], {"MAX_BATCH_EVENTS": "100", "MAX_BUFFER_EVENTS": "100"})

    assert config.max_batch_events == config.max_buffer_events == 100



def test_batch_size_above_max_buffer_events_is_an_error() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config([], {"BATCH_SIZE": "30000", "MAX_BUFFER_EVENTS": "20000"})

    assert str(caught.value).startswith("invalid BATCH_SIZE=30000")
    assert "MAX_BUFFER_EVENTS=20000" in str(caught.value)


def test_default_batch_size_leaves_room_for_four_batches_in_a_small_buffer() -> None:
    assert load_config([], {}).batch_size == 25_000
    assert load_config([], {"MAX_BUFFER_EVENTS": "20000"}).batch_size == 5000
    assert load_config([], {"MAX_BUFFER_EVENTS": "2", "MAX_BATCH_EVENTS": "1"}).batch_size == 1
    # Set explicitly, BATCH_SIZE is taken as it is, up to MAX_BUFFER_EVENTS.
    assert load_config([], {"MAX_BUFFER_EVENTS": "20000", "BATCH_SIZE": "20000"}).batch_size == 20_000
    assert load_config(["--max-buffer-events", "400000"], {}).batch_size == 25_000

# -- spool and acknowledgement settings -------------------------------------------------------


def test_reliability_settings_defaults_without_a_spool() -> None:
    config = load_config([], {})

    assert config.spool_dir is None
    assert config.ack_mode == "memory"
    assert config.spool_max_bytes == 1 << 30
    assert config.ack_timeout == 30.0
    assert config.clickhouse_down_grace == 15.0


def test_reliability_settings_from_the_environment() -> None:
    config = load_config(
        [],
        {
            "SPOOL_DIR": "/var/lib/clickpulse",
            "SPOOL_MAX_BYTES": "512MiB",
            "ACK_MODE": "ClickHouse",
            "ACK_TIMEOUT": "500ms",
            "CLICKHOUSE_DOWN_GRACE": "1m",
            "CLICKHOUSE_CREATE_TABLE": "off",
        },
    )

    assert config.spool_dir == Path("/var/lib/clickpulse")
    assert config.spool_max_bytes == 512 << 20
    assert config.ack_mode == "clickhouse"
    assert config.ack_timeout == pytest.approx(0.5)
    assert config.clickhouse_down_grace == 60.0
    assert config.clickhouse_create_table is False


def test_reliability_settings_from_flags() -> None:
    config = load_config(
        ["--spool-dir", "/data/spool", "--spool-max-bytes", "2GB", "--ack-mode", "memory", "--ack-timeout", "2s"],
        {"SPOOL_MAX_BYTES": "1KiB"},
    )

    assert config.spool_dir == Path("/data/spool")
    assert config.spool_max_bytes == 2 * 1000**3
    assert config.ack_mode == "memory"
    assert config.ack_timeout == 2.0


def test_ack_mode_defaults_to_disk_when_spool_dir_is_set() -> None:
    assert load_config([], {"SPOOL_DIR": "/var/lib/clickpulse"}).ack_mode == "disk"
    assert load_config(["--spool-dir", "/var/lib/clickpulse"], {}).ack_mode == "disk"


@pytest.mark.parametrize("mode", ["memory", "clickhouse"])
def test_explicit_ack_mode_wins_over_the_spool_default(mode: str) -> None:
    assert load_config([], {"SPOOL_DIR": "/var/lib/clickpulse", "ACK_MODE": mode}).ack_mode == mode


def test_empty_spool_dir_means_no_spool_and_memory_acks() -> None:
    config = load_config([], {"SPOOL_DIR": ""})

    assert config.spool_dir is None
    assert config.ack_mode == "memory"


def test_ack_mode_clickhouse_needs_no_spool() -> None:
    assert load_config([], {"ACK_MODE": "clickhouse"}).ack_mode == "clickhouse"


@pytest.mark.parametrize(
    ("argv", "environ"),
    [([], {"ACK_MODE": "disk"}), (["--ack-mode", "disk"], {}), ([], {"ACK_MODE": "DISK"})],
    ids=["environment", "flag", "upper-case"],
)
def test_ack_mode_disk_without_spool_dir_is_an_error_naming_both(argv: list[str], environ: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(argv, environ)

    message = str(caught.value)
    assert "ACK_MODE" in message
    assert "SPOOL_DIR" in message
    assert "\n" not in message


def test_bad_spool_max_bytes_error_shows_the_accepted_forms() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config([], {"SPOOL_MAX_BYTES": "lots"})

    assert "SPOOL_MAX_BYTES" in str(caught.value)
    assert "MiB" in str(caught.value)


# -- the DSN password never leaks -------------------------------------------------------------

SECRET = "s3cretPw"


@pytest.mark.parametrize(
    "dsn",
    [
        f"ftp://user:{SECRET}@host/db",  # bad scheme
        f"http://user:{SECRET}@host:99999/db",  # port out of range
        f"http://user:{SECRET}@host:abc/db",  # port not a number
        f"http://user:{SECRET}@host/db?foo=1",  # unknown query parameter
        f"http://user:{SECRET}@host/a/b",  # bad database name
        f"http://host:8123/db?user=u&password={SECRET}&foo=1",  # old form, password in the query
        f"http://host:8123/db?password={SECRET}&user=u&bogus=2",
        # Unencoded special characters in the password split the URL in unexpected places.
        f"http://user:{SECRET}#x@host/db",
        f"http://user:{SECRET}/x@host/db",
        f"http://user:{SECRET}?x@host/db",
        f"http://user:p@{SECRET}@host:8x/db",
    ],
)
def test_dsn_password_never_appears_in_config_error(dsn: str) -> None:
    for argv, environ in (([], {"CLICKHOUSE_DSN": dsn}), (["--clickhouse-dsn", dsn], {})):
        with pytest.raises(ConfigError) as caught:
            load_config(argv, environ)
        message = str(caught.value)
        assert "CLICKHOUSE_DSN" in message
        assert SECRET not in message
        # not even a fragment of it
        assert SECRET[:4] not in message


@pytest.mark.parametrize(
    "argv",
    [
        ["--clickhouse_dsn", f"http://user:{SECRET}@host/db"],  # misspelt flag: argparse echoes it
        [f"--clickhouse=http://user:{SECRET}@host/db"],  # ambiguous abbreviation
    ],
)
def test_dsn_password_never_appears_in_command_line_errors(argv: list[str]) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(argv, {})

    assert SECRET not in str(caught.value)


def test_dsn_password_not_in_errors_about_other_settings() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config([], {"CLICKHOUSE_DSN": f"http://user:{SECRET}@host/db", "MAX_BATCH_EVENTS": "10", "MAX_BUFFER_EVENTS": "5"})

    assert SECRET not in str(caught.value)


def test_dsn_password_not_in_repr_of_config() -> None:
    config = load_config([], {"CLICKHOUSE_DSN": f"http://user:{SECRET}@host:8123/db"})

    assert config.clickhouse.password == SECRET  # it is kept, only never shown
    assert SECRET not in repr(config)
    assert SECRET not in str(config)
    assert SECRET not in repr(config.clickhouse)
    assert SECRET not in str(config.clickhouse)


def test_dsn_password_from_query_not_in_repr_of_config() -> None:
    config = load_config([], {"CLICKHOUSE_DSN": f"http://host:8123?user=app&password={SECRET}&database=x"})

    assert config.clickhouse.password == SECRET
    assert SECRET not in repr(config)
    assert SECRET not in str(config.clickhouse)


# -- python -m clickpulse ---------------------------------------------------------------------


def _clean_environment(**overrides: str) -> dict[str, str]:
    prefixes = ("CLICKHOUSE_", "HTTP_", "BATCH_", "FLUSH_", "MAX_", "LOG_", "SHUTDOWN_", "SPOOL_", "ACK_")
    env = {key: value for key, value in os.environ.items() if not key.startswith(prefixes)}
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(overrides)
    return env


def test_module_exits_2_with_one_stderr_line_naming_the_bad_variable() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "clickpulse"],
        env=_clean_environment(HTTP_PORT="abc"),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert completed.returncode == 2
    lines = completed.stderr.splitlines()
    assert len(lines) == 1, completed.stderr
    assert "HTTP_PORT" in lines[0]
    assert "Traceback" not in completed.stderr
    assert completed.stdout == ""


def test_module_bad_dsn_exits_2_without_showing_the_password() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "clickpulse", "--clickhouse-dsn", f"http://user:{SECRET}#x@host/db"],
        env=_clean_environment(),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert completed.returncode == 2
    assert len(completed.stderr.splitlines()) == 1, completed.stderr
    assert "CLICKHOUSE_DSN" in completed.stderr
    assert SECRET[:4] not in completed.stderr


@pytest.mark.parametrize(
    "dsn",
    [
        "http://app:123/sec@clickhouse:8123/analytics",  # '/' after digits: "123" would be the port
        "http://app:99?sec@clickhouse:8123/analytics",
        "http://app:7#sec@clickhouse:8123/analytics",
        "http://app:1/2?3#4@clickhouse:8123/analytics",
        "http://app:42/sec@clickhouse:8123?database=analytics",
    ],
)
def test_a_password_that_cannot_be_parsed_unambiguously_exits_naming_the_variable_and_no_part_of_it(dsn: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config([], {"CLICKHOUSE_DSN": dsn})
    message = str(caught.value)
    assert message.startswith("invalid CLICKHOUSE_DSN=") and "URL-encode" in message and "\n" not in message
    for fragment in ("sec", "123", "99", "42", "1/2", "3#4"):
        assert fragment not in message.replace("8123", "")


def test_an_at_sign_inside_the_query_forms_password_is_fine() -> None:
    target = parse_dsn("http://clickhouse:8123?user=app&password=p@ss/w?rd&database=analytics")
    assert (target.user, target.password, target.database) == ("app", "p@ss/w?rd", "analytics")


def test_the_location_of_a_target_names_neither_user_nor_password() -> None:
    target = parse_dsn("http://app:hunter2@clickhouse:8123/analytics")
    assert target.location == "http://clickhouse:8123/analytics"
def test_edge_settings_parse() -> None:
    config = load_config([], {
        "CORS_ORIGINS": "https://shop.example, https://*.shop.example",
        "RATE_LIMIT_EVENTS_PER_SECOND": "2.5",
        "RATE_LIMIT_BURST": "10",
        "TRUSTED_PROXIES": "10.0.0.0/8, 127.0.0.1",
        "MAX_INFLIGHT_BODY_BYTES": "8MiB",
    })
    assert config.cors_origins == ("https://shop.example", "https://*.shop.example")
    assert (config.rate_limit_events_per_second, config.rate_limit_burst) == (2.5, 10)
    assert config.trusted_proxies == ("10.0.0.0/8", "127.0.0.1/32")
    assert config.max_inflight_body_bytes == 8 << 20


def test_a_burst_without_a_rate_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="RATE_LIMIT_BURST"):
        load_config([], {"RATE_LIMIT_BURST": "5"})


def test_tls_needs_both_files() -> None:
    with pytest.raises(ConfigError, match="TLS_CERT_FILE/TLS_KEY_FILE: set both"):
        load_config([], {"TLS_CERT_FILE": "/etc/cert.pem"})
