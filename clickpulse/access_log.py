"""ACCESS_LOG=true: one line per HTTP request on the `clickpulse.access` logger, in LOG_FORMAT.

Text: `127.0.0.1 "POST /events" 202 27B 1.2ms "curl/8.5.0"`. JSON: the same as fields
(`remote`, `method`, `path`, `status`, `bytes`, `duration_ms`, `user_agent`). The query string is
left out: it may carry credentials, and it is not needed to tell requests apart.
"""

from __future__ import annotations

import logging

from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse

LOGGER_NAME = "clickpulse.access"


class AccessLogger(AbstractAccessLogger):
    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        fields = {
            "remote": request.remote,
            "method": request.method,
            "path": request.path,
            "status": response.status,
            "bytes": response.body_length,
            "duration_ms": round(time * 1000, 3),
            "user_agent": request.headers.get("User-Agent"),
        }
        self.logger.info(
            '%s "%s %s" %d %dB %.1fms "%s"',
            fields["remote"], fields["method"], fields["path"], fields["status"], fields["bytes"],
            fields["duration_ms"], fields["user_agent"] or "-",
            extra={"fields": fields},
        )

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)


def access_logger(enabled: bool) -> logging.Logger | None:
    """The logger to hand aiohttp's runner: None turns its access log off."""
    return logging.getLogger(LOGGER_NAME) if enabled else None
