"""JSON answers shared by every route, and the count of refused requests by reason.

Refusals that are the client's fault (a wrong key, a hang-up, a time-out, malformed HTTP) are
counted and summarised in the log at most once per LOG_INTERVAL, with their counts: hostile
traffic cannot flood the log, and never puts a traceback in it."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any, Final

import msgspec
from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDict, CIMultiDictProxy

from clickpulse.metrics import CLIENT_FAULTS, ReceiverMetrics, RejectReason

log = logging.getLogger("clickpulse.http")

LOG_INTERVAL = 60.0


JSON_HEADERS: Final = CIMultiDictProxy(CIMultiDict({hdrs.CONTENT_TYPE: "application/json"}))


def json_response(status: int, payload: object, headers: dict[str, str] | None = None) -> web.Response:
    # Headers rather than content_type=: aiohttp then skips parsing the type it was given (0.6 us).
    return web.Response(
        status=status, body=msgspec.json.encode(payload),
        headers=JSON_HEADERS if headers is None else {hdrs.CONTENT_TYPE: "application/json", **headers},
    )


class ClientFaultLog:
    """Counts client faults; logs one INFO line with the counts at most once per `interval`."""

    def __init__(self, interval: float = LOG_INTERVAL, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = interval
        self._clock = clock
        self._counts: dict[str, int] = {}
        self._last: float | None = None

    def record(self, reason: str) -> None:
        self._counts[reason] = self._counts.get(reason, 0) + 1
        now = self._clock()
        if self._last is None or now - self._last >= self._interval:
            self.flush(now)

    def flush(self, now: float | None = None) -> None:
        if self._counts:
            log.info(
                "client faults%s: %s", "" if self._last is None else f" in the last {self._interval:g}s",
                ", ".join(f"{reason}={count}" for reason, count in sorted(self._counts.items())),
            )
            self._counts.clear()
        self._last = self._clock() if now is None else now


class Rejections:
    """Answers a refused request in JSON and counts it under `requests_rejected_total{reason}`."""

    def __init__(self, metrics: ReceiverMetrics, faults: ClientFaultLog | None = None) -> None:
        self._counter = metrics.requests_rejected
        self.faults = faults if faults is not None else ClientFaultLog()

    def count(self, reason: RejectReason) -> None:
        self._counter.inc({"reason": reason})
        if reason in CLIENT_FAULTS:
            self.faults.record(reason)

    def reject(
        self, reason: RejectReason, status: int, message: str, headers: dict[str, str] | None = None
    ) -> web.Response:
        self.count(reason)
        return json_response(status, {"error": message}, headers)

    def unavailable(self, reason: RejectReason, message: str, retry_after: int) -> web.Response:
        return self.reject(reason, 503, message, {hdrs.RETRY_AFTER: str(retry_after)})


class ServerLog(logging.Logger):
    """The logger aiohttp's connection handler writes to (its `logger` argument).

    aiohttp logs a request it cannot parse (malformed HTTP, an over-long request line or header)
    and a connection reset while answering with `logger.exception`: a traceback at ERROR for
    what is only a client's fault. Those are counted here (`malformed`, `client_disconnected`)
    and summarised with the other client faults; anything else goes on to aiohttp's own logger.
    """

    def __init__(self, rejections: Rejections) -> None:
        super().__init__("aiohttp.server")
        self.parent = logging.getLogger("aiohttp.server")
        self._rejections = rejections

    def _client_fault(self, exc_info: Any) -> bool:
        error = exc_info if isinstance(exc_info, BaseException) else sys.exc_info()[1] if exc_info else None
        if isinstance(error, HttpProcessingError) and 400 <= (error.code or 400) < 500:
            self._rejections.count("malformed")
            return True
        if isinstance(error, ConnectionError):
            self._rejections.count("client_disconnected")
            return True
        return False

    def exception(self, msg: object, *args: object, exc_info: Any = True, **kwargs: Any) -> None:
        if not self._client_fault(exc_info):
            super().exception(msg, *args, exc_info=exc_info, **kwargs)

    def debug(self, msg: object, *args: object, exc_info: Any = None, **kwargs: Any) -> None:
        # aiohttp logs a first request with a bad method (not HTTP at all, or TLS) at DEBUG.
        if exc_info is None or not self._client_fault(exc_info):
            super().debug(msg, *args, exc_info=exc_info, **kwargs)
