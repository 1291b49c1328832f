"""`python -m clickpulse`: flags and environment → Config → run the service."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import Sequence

import msgspec

from clickpulse.clickhouse import EmbeddedUnavailable
from clickpulse.config import Config, ConfigError, load_config
from clickpulse.query import QueryFailed, run_query
from clickpulse.service import serve

EXIT_CONFIG_ERROR = 2


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def __init__(self) -> None:
        super().__init__()
        self._encoder = msgspec.json.Encoder()

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return self._encoder.encode(entry).decode()


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
    # aiohttp logs each access and client disconnect at INFO; that is noise at our rates.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


QUERY_USAGE = 'usage: python -m clickpulse query "SELECT ..." [flags]'


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    sql = None
    if arguments[:1] == ["query"]:
        if len(arguments) < 2 or arguments[1].startswith("-"):
            print(f"clickpulse: {QUERY_USAGE}", file=sys.stderr)
            return EXIT_CONFIG_ERROR
        sql, arguments = arguments[1], arguments[2:]
    try:
        config = load_config(arguments, os.environ)
    except ConfigError as error:
        print(f"clickpulse: {error}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    if sql is not None:
        return query_command(config, sql)
    configure_logging(config)
    try:
        return asyncio.run(serve(config))
    except (EmbeddedUnavailable, ConfigError) as error:  # ConfigError: INGEST_KEYS_FILE's, read at start
        print(f"clickpulse: {error}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except KeyboardInterrupt:
        return 130
    except OSError as error:
        # The listening socket is the usual suspect: port in use, address not available.
        logging.getLogger("clickpulse").error("cannot start: %s", error)
        return 1


def query_command(config: Config, sql: str) -> int:
    try:
        print(asyncio.run(run_query(config, sql)), end="")
    except (EmbeddedUnavailable, ConfigError) as error:
        print(f"clickpulse: {error}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except QueryFailed as error:
        print(f"clickpulse: query failed: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
