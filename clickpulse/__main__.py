"""`python -m clickpulse`: flags and environment → Config → run the service, check the
configuration (--check-config) or run one query (`query SQL`)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Sequence

import msgspec

from clickpulse.check import check_config, listen_problem, start_error
from clickpulse.clickhouse import EmbeddedUnavailable
from clickpulse.config import Config, ConfigError, load_config, parse_command_line
from clickpulse.query import QueryFailed, run_query
from clickpulse.service import serve
from clickpulse.spool import SpoolDirInUse

EXIT_CONFIG_ERROR = 2


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line, for log shippers. A record's `fields` (a dict passed as
    `extra={"fields": ...}`) become top-level keys: the access log's method, path, status, ..."""

    def __init__(self) -> None:
        super().__init__()
        self._encoder = msgspec.json.Encoder()

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update({key: value for key, value in fields.items() if key not in entry})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        try:
            return self._encoder.encode(entry).decode()
        except UnicodeEncodeError:  # a header's bytes that were not UTF-8 (a User-Agent): escaped
            return json.dumps(entry, ensure_ascii=True, default=str, separators=(",", ":"))


def configure_logging(config: Config) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if config.log_format == "json":
        handler.setFormatter(JsonLogFormatter())
    else:
        formatter = logging.Formatter("%(asctime)s.%(msecs)03dZ %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S")
        formatter.converter = time.gmtime
        handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.log_level)
    # aiohttp's own access log and asyncio's selector line are noise at any level; requests are
    # logged by clickpulse.access (ACCESS_LOG=true), flushes and inserts at DEBUG.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("asyncio").setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    try:
        command_line = parse_command_line(arguments)
        config = load_config(arguments, os.environ)
    except ConfigError as error:
        print(f"clickpulse: {error}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except SystemExit as exit:  # --help, --version, query --help: printed, and that is all
        return exit.code if isinstance(exit.code, int) else 0
    if command_line.command == "query":
        return query_command(config, command_line.sql, command_line.format)
    if command_line.check_config:
        return asyncio.run(check_config(config, sys.stdout))
    problem = listen_problem(config)
    if problem is not None:
        print(f"clickpulse: {problem}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    configure_logging(config)
    try:
        return asyncio.run(serve(config))
    except (EmbeddedUnavailable, SpoolDirInUse, ConfigError) as error:  # ConfigError: INGEST_KEYS_FILE's, read at start
        print(f"clickpulse: {error}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except KeyboardInterrupt:
        return 130
    except OSError as error:
        # Service.start closed everything it had opened; what is left is to say which setting.
        print(f"clickpulse: {start_error(config, error)}", file=sys.stderr)
        return EXIT_CONFIG_ERROR


def query_command(config: Config, sql: str, output_format: str = "table") -> int:
    try:
        output = asyncio.run(run_query(config, sql, output_format, colour=sys.stdout.isatty()))
    except (EmbeddedUnavailable, ConfigError) as error:
        print(f"clickpulse: {error}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except QueryFailed as error:
        print(f"clickpulse: query failed: {error}", file=sys.stderr)
        return error.exit_status
    sys.stdout.write(output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
