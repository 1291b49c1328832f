"""One Config, built from command-line flags over environment variables over defaults.

Every setting has an environment variable (the old service's names) and a flag. A bad value
raises ConfigError naming the variable; `python -m clickpulse` turns that into one line on
stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NoReturn
from urllib.parse import parse_qs, quote, unquote, urlsplit

import msgspec

from clickpulse.messages import ACK_MODES, AckMode


class ConfigError(Exception):
    """A setting has a value clickpulse cannot use. The message names the variable."""


class ClickHouseTarget(msgspec.Struct, frozen=True):
    """Where and as whom to insert. `repr` and `redacted` never show the password."""

    url: str  # scheme://host:port/ — no credentials, no database
    database: str
    user: str | None = None
    password: str | None = None

    @property
    def location(self) -> str:
        """Where, without who: for logs, /readyz and errors."""
        return f"{self.url.rstrip('/')}/{self.database}"

    @property
    def redacted(self) -> str:
        user = f"{quote(self.user, safe='')}:***@" if self.user else ""
        scheme, _, hostport = self.url.rstrip("/").partition("://")
        return f"{scheme}://{user}{hostport}/{self.database}"

    def __repr__(self) -> str:
        return f"ClickHouseTarget({self.redacted!r})"

    __str__ = __repr__


BATCHES_IN_BUFFER = 4  # unless BATCH_SIZE is set, MAX_BUFFER_EVENTS holds at least this many batches


class Config(msgspec.Struct, frozen=True, kw_only=True):
    http_host: str = "0.0.0.0"
    http_port: int = 8080
    clickhouse: ClickHouseTarget | None = None  # None: the embedded store in data_dir
    data_dir: Path = Path("clickpulse-data")
    clickhouse_table: str = "events"
    clickhouse_create_table: bool = True
    clickhouse_timeout: float = 30.0
    query_timeout: float = 10.0
    batch_size: int = 25_000
    flush_interval: float = 1.0
    max_body_bytes: int = 1024 * 1024
    max_batch_events: int = 10_000
    max_buffer_events: int = 100_000
    max_buffer_bytes: int = 64 << 20
    spool_dir: Path | None = None
    spool_max_bytes: int = 1 << 30
    ack_mode: AckMode = "memory"
    ack_timeout: float = 30.0
    clickhouse_down_grace: float = 15.0
    shutdown_timeout: float = 30.0
    log_level: str = "INFO"
    log_format: str = "text"
    access_log: bool = False
    # The public edge (clickpulse/http/: keys.py, origins.py, ratelimit.py, bodies.py, edge.py).
    ingest_keys_file: Path | None = None
    cors_origins: tuple[str, ...] | None = None
    rate_limit_events_per_second: float | None = None
    rate_limit_burst: int | None = None
    trusted_proxies: tuple[str, ...] | None = None
    max_inflight_body_bytes: int = 64 << 20
    body_read_timeout: float = 30.0
    keepalive_timeout: float = 75.0
    head_read_timeout: float = 10.0
    max_connections: int = 10_000
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    admin_host: str = "127.0.0.1"
    admin_port: int | None = None
    # The Segment-compatible /v1 API (http/segment.py) and the enrichment of every endpoint.
    segment_max_message_bytes: int = 32 * 1024
    segment_max_batch_bytes: int = 500 * 1024
    enrich_ip: EnrichIp = "true"



_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_DURATION_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("text", "json")
EnrichIp = Literal["true", "false", "anonymize"]
ENRICH_IP_MODES: tuple[EnrichIp, ...] = ("true", "false", "anonymize")


def parse_duration(text: str) -> float:
    """Seconds from `500ms`, `5s`, `1m30s`, `2h` or plain seconds (`2.5`)."""
    text = text.strip()
    try:
        return _non_negative(float(text))
    except ValueError:
        pass
    position = 0
    total = 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != position:
            break
        total += float(match.group(1)) * _DURATION_UNIT_SECONDS[match.group(2)]
        position = match.end()
    if position == 0 or position != len(text):
        raise ValueError(f"{text!r} is not a duration like 500ms, 5s, 1m30s or plain seconds")
    return total


def _non_negative(seconds: float) -> float:
    if not seconds >= 0 or seconds == float("inf"):
        raise ValueError(f"{seconds!r} is not a non-negative finite number of seconds")
    return seconds


def parse_dsn(dsn: str) -> ClickHouseTarget:
    """`http(s)://user:password@host:port/database` or `http://host:8123?user=u&password=p&database=d`."""
    try:
        parts = urlsplit(dsn.strip())
        port = parts.port
    except ValueError:
        # urlsplit's message quotes the bad port or netloc, which is part of the password when
        # the password holds an unencoded `/`, `?`, `#` or `@`: never echo it.
        raise ValueError("not a URL: malformed host or port (URL-encode special characters in the password)") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError("must start with http:// or https://")
    if not parts.hostname:
        raise ValueError("has no host")
    if _credentials_cut_short(parts.netloc, parts.path, parts.query, parts.fragment):
        # `http://app:123/4@host/db`: the password's `/` ended the host part early, so "app" would
        # be the host and "123" the port. Never guess, and never echo any of it.
        raise ValueError(
            "the password (or user) holds an unencoded '/', '?', '#' or '@': "
            "URL-encode it ('/' is %2F, '?' %3F, '#' %23, '@' %40)"
        )
    query = parse_qs(parts.query, keep_blank_values=True)
    unknown = sorted(set(query) - {"user", "password", "database"})
    if unknown:
        raise ValueError(f"unknown query parameter {unknown[0]!r} (allowed: user, password, database)")

    def last(name: str) -> str | None:
        values = query.get(name)
        return values[-1] if values else None

    user = unquote(parts.username) if parts.username else last("user")
    password = unquote(parts.password) if parts.password is not None else last("password")
    path_database = unquote(parts.path.strip("/"))
    database = path_database or last("database") or "default"
    if "/" in database or not database:
        raise ValueError(f"database name {database!r} is not valid")
    host = parts.hostname
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    default_port = 8443 if parts.scheme == "https" else 8123
    url = f"{parts.scheme}://{host}:{port or default_port}/"
    return ClickHouseTarget(url=url, database=database, user=user or None, password=password or None)


def _credentials_cut_short(netloc: str, path: str, query: str, fragment: str) -> bool:
    """Whether an `@` after the host part shows that credentials with an unencoded `/`, `?` or
    `#` were taken for the host and port. An `@` is fine only inside a query's user or password
    value (`?password=p@ss`), the DSN's other form."""
    if "@" in path or "@" in fragment:
        return True
    if "@" not in query:
        return False
    for pair in query.split("&"):
        name, _, value = pair.partition("=")
        if "@" in name or ("@" in value and name not in ("user", "password")):
            return True
    return False


def _without_password(text: str) -> str:
    text = re.sub(r"://([^:/@]*):.*@", r"://\1:***@", text)  # to the last `@`: passwords may hold one
    return re.sub(r"([?&]password=)[^&]*", r"\1***", text)


def _positive_int(text: str) -> int:
    value = int(text.strip().replace("_", ""))
    if value <= 0:
        raise ValueError(f"{text!r} must be a positive integer")
    return value


def _port(text: str) -> int:
    value = int(text.strip())
    if not 0 <= value <= 65535:
        raise ValueError(f"{text!r} is not a TCP port (0-65535)")
    return value


def _positive_duration(text: str) -> float:
    seconds = parse_duration(text)
    if seconds <= 0:
        raise ValueError(f"{text!r} must be longer than zero")
    return seconds


def _choice(choices: Sequence[str], normalise: Callable[[str], str]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = normalise(text.strip())
        if value not in choices:
            raise ValueError(f"{text!r} is not one of {', '.join(choices)}")
        return value

    return parse


def _table_name(text: str) -> str:
    if not _IDENTIFIER.fullmatch(text):
        raise ValueError(f"{text!r} is not a plain table name (letters, digits, underscore)")
    return text


def _text(text: str) -> str:
    return text


_SIZE_UNITS = {"": 1, "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
               "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4}


def parse_size(text: str) -> int:
    """Bytes from `1073741824`, `512MiB`, `1GiB`, `10GB`."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _SIZE_UNITS:
        raise ValueError(f"{text!r} is not a size like 1073741824, 512MiB or 1GiB")
    size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if size <= 0:
        raise ValueError(f"{text!r} must be larger than zero")
    return size


def _directory(text: str) -> Path:
    if not text.strip():
        raise ValueError("is empty")
    return Path(text)


_TRUE_WORDS = ("true", "1", "yes", "on")
_FALSE_WORDS = ("false", "0", "no", "off")


def _boolean(text: str) -> bool:
    word = text.strip().lower()
    if word in _TRUE_WORDS:
        return True
    if word in _FALSE_WORDS:
        return False
    raise ValueError(f"{text!r} is not true or false")


def _origins(text: str) -> tuple[str, ...]:
    from clickpulse.http.origins import OriginPatterns

    origins = tuple(part.strip() for part in text.split(",") if part.strip())
    OriginPatterns.parse(origins)  # raises ValueError naming the bad one
    return origins


def _networks(text: str) -> tuple[str, ...]:
    from clickpulse.http.ratelimit import parse_networks

    return tuple(str(network) for network in parse_networks(text))


def _positive_number(text: str) -> float:
    value = float(text.strip())
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{text!r} must be a positive number")
    return value


def _file(text: str) -> Path:
    if not text.strip():
        raise ValueError("is empty")
    return Path(text)


@dataclass(frozen=True)
class Setting:
    variable: str
    field: str
    parse: Callable[[str], Any]
    help: str


SETTINGS: tuple[Setting, ...] = (
    Setting("HTTP_HOST", "http_host", _text, "address to listen on"),
    Setting("HTTP_PORT", "http_port", _port, "port to listen on"),
    Setting("CLICKHOUSE_DSN", "clickhouse", parse_dsn,
            "ClickHouse HTTP URL with user, password, database; unset: the embedded store in DATA_DIR"),
    Setting("DATA_DIR", "data_dir", _directory, "where the embedded store (CLICKHOUSE_DSN unset) keeps its data"),
    Setting("CLICKHOUSE_TABLE", "clickhouse_table", _table_name, "table the events go to"),
    Setting(
        "CLICKHOUSE_CREATE_TABLE", "clickhouse_create_table", _boolean,
        "create the database and table if absent (false: only check that the table exists)",
    ),
    Setting("CLICKHOUSE_TIMEOUT", "clickhouse_timeout", _positive_duration, "time limit of one ClickHouse request"),
    Setting("QUERY_TIMEOUT", "query_timeout", _positive_duration,
            "time limit of one statement of POST /query or the query command (ClickHouse's max_execution_time)"),
    Setting("BATCH_SIZE", "batch_size", _positive_int, "flush when this many events are buffered"),
    Setting("FLUSH_INTERVAL", "flush_interval", _positive_duration, "flush when the oldest buffered event is this old"),
    Setting("MAX_BODY_BYTES", "max_body_bytes", _positive_int, "largest request body (413 above)"),
    Setting("MAX_BATCH_EVENTS", "max_batch_events", _positive_int, "most events in one request (413 above)"),
    Setting("MAX_BUFFER_EVENTS", "max_buffer_events", _positive_int, "most events held in memory (503 above)"),
    Setting("MAX_BUFFER_BYTES", "max_buffer_bytes", parse_size,
            "most bytes of encoded events held in memory (503 above)"),
    Setting("SHUTDOWN_TIMEOUT", "shutdown_timeout", _positive_duration, "time to drain on SIGTERM"),
    Setting("SPOOL_DIR", "spool_dir", _directory, "directory of the write-ahead log; unset: no spool"),
    Setting("SPOOL_MAX_BYTES", "spool_max_bytes", parse_size, "most bytes the spool may take on disk (503 above)"),
    Setting("ACK_MODE", "ack_mode", _choice(ACK_MODES, str.lower),
            "when POST /events answers: memory, disk (needs SPOOL_DIR) or clickhouse"),
    Setting("ACK_TIMEOUT", "ack_timeout", _positive_duration, "longest wait for ClickHouse in ack mode clickhouse (504)"),
    Setting("CLICKHOUSE_DOWN_GRACE", "clickhouse_down_grace", _positive_duration,
            "how long ClickHouse may stop answering before /readyz reports 503 (at start: 503 until it answers)"),
    Setting("LOG_LEVEL", "log_level", _choice(LOG_LEVELS, str.upper),
            f"{', '.join(LOG_LEVELS)}; DEBUG adds a line per flush and per insert"),
    Setting("LOG_FORMAT", "log_format", _choice(LOG_FORMATS, str.lower), "text or json"),
    Setting("ACCESS_LOG", "access_log", _boolean, "one log line per HTTP request, in LOG_FORMAT"),
    Setting("INGEST_KEYS_FILE", "ingest_keys_file", _file,
            "TOML file of ingest keys; set: every write needs a key (reloaded on SIGHUP); unset: open"),
    Setting("CORS_ORIGINS", "cors_origins", _origins,
            "origins browsers may send from, comma-separated: https://shop.example or https://*.shop.example"),
    Setting("RATE_LIMIT_EVENTS_PER_SECOND", "rate_limit_events_per_second", _positive_number,
            "events per second per client address for requests without a key (429 above); unset: no limit"),
    Setting("RATE_LIMIT_BURST", "rate_limit_burst", _positive_int,
            "events a client address may send at once; unset: RATE_LIMIT_EVENTS_PER_SECOND"),
    Setting("TRUSTED_PROXIES", "trusted_proxies", _networks,
            "proxy addresses or CIDRs whose X-Forwarded-For names the client, comma-separated"),
    Setting("MAX_INFLIGHT_BODY_BYTES", "max_inflight_body_bytes", parse_size,
            "most bytes of request bodies read at once (503 above)"),
    Setting("BODY_READ_TIMEOUT", "body_read_timeout", _positive_duration,
            "time limit for receiving a request body (408, connection closed)"),
    Setting("KEEPALIVE_TIMEOUT", "keepalive_timeout", _positive_duration,
            "idle keep-alive connections are closed after this"),
    Setting("HEAD_READ_TIMEOUT", "head_read_timeout", _positive_duration,
            "time limit for receiving a request's head from its first byte (then the connection is closed)"),
    Setting("MAX_CONNECTIONS", "max_connections", _positive_int,
            "most open client connections; beyond, a new one gets 503 and is closed"),
    Setting("TLS_CERT_FILE", "tls_cert_file", _file, "PEM certificate (chain): serve HTTPS; needs TLS_KEY_FILE"),
    Setting("TLS_KEY_FILE", "tls_key_file", _file, "PEM private key of TLS_CERT_FILE"),
    Setting("ADMIN_HOST", "admin_host", _text, "address of the ADMIN_PORT listener"),
    Setting("ADMIN_PORT", "admin_port", _port,
            "serve /metrics, /healthz, /readyz and /query here (plain HTTP) instead of on HTTP_PORT"),
    Setting("SEGMENT_MAX_MESSAGE_BYTES", "segment_max_message_bytes", parse_size,
            "largest message of the /v1 API, alone or in a batch (413 above)"),
    Setting("SEGMENT_MAX_BATCH_BYTES", "segment_max_batch_bytes", parse_size,
            "largest decoded body of /v1/batch and /v1/import (413 above)"),
    Setting("ENRICH_IP", "enrich_ip", _choice(ENRICH_IP_MODES, str.lower),
            "add the client address to each row's context: true, false or anonymize"),
)


def _flag(setting: Setting) -> str:
    return "--" + setting.variable.lower().replace("_", "-")


# What a default depends on, where it is not a plain value.
_DEFAULT_REMARKS = {"ack_mode": "disk with SPOOL_DIR"}


def shown_default(setting: Setting) -> str:
    """A setting's default as a user would write it: `1s`, `1GiB`, `true`; `unset` for none.
    `setting.parse(shown_default(setting))` gives the default back (except for `unset`)."""
    value = getattr(Config(), setting.field)
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if setting.parse is _positive_duration:
        return _shown_duration(value)
    if setting.parse is parse_size:
        for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
            if value % size == 0:
                return f"{value // size}{unit}"
    return str(value)


def _shown_duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


class _OneLineArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"command line: {_without_password(message)}")


QUERY_FORMATS = ("table", "TSV", "TSVWithNames", "CSV", "CSVWithNames", "JSONEachRow")


def _query_format(text: str) -> str:
    for name in QUERY_FORMATS:
        if name.lower() == text.strip().lower():
            return name
    raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(QUERY_FORMATS)}")


def build_argument_parser() -> argparse.ArgumentParser:
    """The whole command line: the settings flags, --version, --check-config and the `query`
    command (which takes the same settings flags, before or after its SQL)."""
    from clickpulse import __version__

    settings = _OneLineArgumentParser(add_help=False)
    group = settings.add_argument_group("settings (each flag is also the environment variable in brackets; the flag wins)")
    for setting in SETTINGS:
        remark = _DEFAULT_REMARKS.get(setting.field)
        default = shown_default(setting) + (f"; {remark}" if remark else "")
        group.add_argument(
            _flag(setting), dest=setting.field, metavar="VALUE", default=argparse.SUPPRESS,
            help=f"{setting.help} [{setting.variable}; default: {default}]".replace("%", "%%"),
        )
    parser = _OneLineArgumentParser(
        prog="python -m clickpulse",
        usage="%(prog)s [--check-config] [SETTING FLAGS]\n       %(prog)s query SQL [--format FORMAT] [SETTING FLAGS]"
        "\n       %(prog)s --version | --help | query --help",
        description="HTTP event collector that batches events into ClickHouse. Without a command it "
        "runs the service. Durations take 500ms, 5s, 1m30s, 2h or plain seconds; sizes 512MiB, 1GiB or bytes.",
        parents=[settings],
        epilog="A bad setting exits with status 2 and one line naming it. Documentation: docs/configuration.md.",
    )
    parser.add_argument("--version", action="version", version=f"clickpulse {__version__}")
    parser.add_argument(
        "--check-config", action="store_true",
        help="parse the configuration, connect to ClickHouse, check the table and the grants, "
        "print what the service would do, and exit: 0 when it would start, 2 when not",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands", parser_class=_OneLineArgumentParser)
    query = commands.add_parser(
        "query", parents=[settings], usage="python -m clickpulse query SQL [--format FORMAT] [SETTING FLAGS]", help="print the result of one read-only SQL statement (see query --help)",
        description="Runs one read-only statement against the ClickHouse the configuration points at "
        "(CLICKHOUSE_DSN, or the embedded store in DATA_DIR, through the running service if one holds it) "
        "and prints its result: a table for people (coloured on a terminal), or --format for programs.",
    )
    query.add_argument("sql", metavar="SQL", help='the statement, e.g. "SELECT event_type, count() FROM events GROUP BY event_type"')
    query.add_argument(
        "--format", type=_query_format, default="table", metavar="FORMAT",
        help=f"output format: {', '.join(QUERY_FORMATS)} (ClickHouse's formats of those names); default: table",
    )
    return parser


def parse_command_line(argv: Sequence[str]) -> argparse.Namespace:
    """The parsed flags, `command` (None or "query") with its `sql` and `format`, `check_config`."""
    try:
        return build_argument_parser().parse_args(list(argv))
    except ConfigError as error:
        # An unknown flag's value reads as an unknown command: name the flag, the real mistake.
        if "argument COMMAND: invalid choice" in str(error):
            unknown = [argument for argument in argv if argument.startswith("--") and argument.split("=", 1)[0] not in _FLAGS]
            if unknown:
                raise ConfigError(f"command line: unrecognized arguments: {' '.join(unknown)}") from None
        raise


_FLAGS = frozenset({_flag(setting) for setting in SETTINGS} | {"--version", "--check-config", "--help", "--format"})


def load_config(argv: Sequence[str] = (), environ: Mapping[str, str] | None = None) -> Config:
    """Flags win over environment variables, which win over defaults."""
    environ = {} if environ is None else environ
    flags = vars(parse_command_line(argv))
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        from_flag = flags.get(setting.field)
        raw = from_flag if from_flag is not None else environ.get(setting.variable)
        if raw is None or (from_flag is None and raw == ""):
            continue
        try:
            values[setting.field] = setting.parse(raw)
        except ValueError as error:
            shown = raw if setting.variable != "CLICKHOUSE_DSN" else _without_password(raw)
            detail = str(error) if setting.variable == "CLICKHOUSE_DSN" else _strip_value_noise(str(error), raw)
            where = f"{_flag(setting)} ({setting.variable})" if from_flag is not None else setting.variable
            raise ConfigError(f"invalid {where}={shown!r}: {detail}") from None
    if "ack_mode" not in values and values.get("spool_dir") is not None:
        values["ack_mode"] = "disk"
    config = Config(**values)
    if config.ack_mode == "disk" and config.spool_dir is None:
        raise ConfigError("invalid ACK_MODE=disk: needs SPOOL_DIR, the directory events are fsynced to")
    if (config.tls_cert_file is None) != (config.tls_key_file is None):
        raise ConfigError("invalid TLS_CERT_FILE/TLS_KEY_FILE: set both, or neither")
    if config.rate_limit_burst is not None and config.rate_limit_events_per_second is None:
        raise ConfigError("invalid RATE_LIMIT_BURST: needs RATE_LIMIT_EVENTS_PER_SECOND")
    if "batch_size" not in values and config.batch_size * BATCHES_IN_BUFFER > config.max_buffer_events:
        # The default batch shrinks with a small buffer: the intake must go on taking events
        # while full batches wait for the Writer.
        config = msgspec.structs.replace(config, batch_size=max(1, config.max_buffer_events // BATCHES_IN_BUFFER))
    if config.batch_size > config.max_buffer_events:
        raise ConfigError(
            f"invalid BATCH_SIZE={config.batch_size}: larger than MAX_BUFFER_EVENTS={config.max_buffer_events}, "
            "so a batch could never fill"
        )
    if config.max_batch_events > config.max_buffer_events:
        raise ConfigError(
            f"invalid MAX_BATCH_EVENTS={config.max_batch_events}: larger than "
            f"MAX_BUFFER_EVENTS={config.max_buffer_events}, so a full request could never be accepted"
        )
    return config


def _strip_value_noise(message: str, raw: str) -> str:
    if message.startswith("invalid literal for int()"):
        return "not a whole number"
    if message.startswith("could not convert string to float"):
        return "not a number"
    return message
