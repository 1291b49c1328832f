"""JSON answers shared by every route, and the count of refused requests by reason."""

from __future__ import annotations

import msgspec
from aiohttp import hdrs, web

from clickpulse.metrics import ReceiverMetrics, RejectReason


def json_response(status: int, payload: object, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=msgspec.json.encode(payload), content_type="application/json", headers=headers
    )


class Rejections:
    """Answers a refused request in JSON and counts it under `requests_rejected_total{reason}`."""

    def __init__(self, metrics: ReceiverMetrics) -> None:
        self._counter = metrics.requests_rejected

    def reject(
        self, reason: RejectReason, status: int, message: str, headers: dict[str, str] | None = None
    ) -> web.Response:
        self._counter.inc({"reason": reason})
        return json_response(status, {"error": message}, headers)

    def unavailable(self, reason: RejectReason, message: str, retry_after: int) -> web.Response:
        return self.reject(reason, 503, message, {hdrs.RETRY_AFTER: str(retry_after)})
