"""The aiohttp application: routes, routing errors answered in JSON (a catch-all route last), the
request metrics (aiohttp's access-log hook: clickpulse/access_log.py), and the operational
routes: /healthz, /readyz, /metrics, /openapi.json (clickpulse/openapi.py) and, with the
embedded store, /query."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import hdrs, web

from clickpulse.access_log import RequestMetrics, request_log_class, request_logger
from clickpulse.http.adapter import AdapterWiring, Draining
from clickpulse.http.edge import Edge
from clickpulse.http.enrich import Enricher
from clickpulse.http.events import EventsEndpoint
from clickpulse.http.keys import KeyStore
from clickpulse.http.origins import OriginPatterns
from clickpulse.http.query_guard import QueryRefused, check_query
from clickpulse.http.segment import SegmentEndpoint
from clickpulse.http.responses import Rejections, ServerLog, json_response
from clickpulse.messages import AckMode
from clickpulse.metrics import PipelineMetrics
from clickpulse.openapi import QUERY_FORMATS, encoded_document
from clickpulse.ports import IntakePort


LOOPBACK_ADDRESSES = frozenset({"127.0.0.1", "::1"})

Query = Callable[[str, str], Awaitable[str]]  # (sql, output format) → the result's text


class HttpApp:
    def __init__(
        self,
        *,
        intake: IntakePort,
        max_body_bytes: int,
        max_batch_events: int,
        ack_mode: AckMode,
        ack_timeout: float,
        not_ready_reason: Callable[[], str | None],
        pipeline_down: asyncio.Future[None],
        metrics: PipelineMetrics,
        query: Query | None = None,
        edge: Edge | None = None,
        rejections: Rejections | None = None,
        keepalive_timeout: float = 75.0,
        enricher: Enricher | None = None,
        segment_max_message_bytes: int = 32 * 1024,
        segment_max_batch_bytes: int = 500 * 1024,
        access_log: bool = False,
    ) -> None:
        self._max_body_bytes = max_body_bytes
        self._not_ready_reason = not_ready_reason
        self._query = query
        self._openapi = encoded_document(with_query=query is not None)
        self._metrics = metrics
        self._request_metrics = RequestMetrics(metrics.receiver)
        self._access_log = access_log
        self._draining = Draining()
        self._keepalive_timeout = keepalive_timeout
        rejections = rejections if rejections is not None else Rejections(metrics.receiver)
        self.rejections = rejections
        self.edge = edge if edge is not None else Edge(
            keys=KeyStore(None), cors_origins=OriginPatterns(), rate_limit=None, rate_burst=None,
            trusted_proxies=(), max_body_bytes=max_body_bytes, max_inflight_body_bytes=0, body_timeout=30.0,
            rejections=rejections, metrics=metrics.receiver,
        )
        wiring = AdapterWiring(
            intake=intake,
            max_batch_events=max_batch_events,
            ack_mode=ack_mode,
            ack_timeout=ack_timeout,
            draining=self._draining,
            pipeline_down=pipeline_down,
            rejections=rejections,
            metrics=metrics.receiver,
            edge=self.edge,
            enricher=enricher if enricher is not None else Enricher(),
        )
        self.events = EventsEndpoint(wiring, max_body_bytes=max_body_bytes)
        self.segment = SegmentEndpoint(
            wiring, max_message_bytes=segment_max_message_bytes, max_batch_bytes=segment_max_batch_bytes
        )

    def server_options(self) -> dict[str, Any]:
        """Keyword arguments for aiohttp's server (AppRunner, TestServer): the edge decodes
        bodies itself, under its bounds, and idle connections are closed."""
        return {
            "auto_decompress": False,
            "keepalive_timeout": self._keepalive_timeout,
            "max_line_size": 8190,
            "max_field_size": 8190,
            "max_headers": 64,
            # After an answer to a body not read to its end (413, 401...), how long aiohttp reads
            # and discards the rest so the client sees the answer: short, or it is a slowloris.
            "lingering_time": 2.0,
            "logger": ServerLog(self.rejections),
            **self._request_log(lines=self._access_log),
        }

    def admin_server_options(self) -> dict[str, Any]:
        """ADMIN_PORT's server: its requests are counted and timed, never access-logged."""
        return self._request_log(lines=False)

    def _request_log(self, *, lines: bool) -> dict[str, Any]:
        return {"access_log": request_logger(), "access_log_class": request_log_class(self._request_metrics, lines=lines)}

    def build(self, *, operational: bool = True) -> web.Application:
        """The public application; without the operational routes when they live on ADMIN_PORT."""
        app = web.Application(client_max_size=self._max_body_bytes)
        app.router.add_post("/events", self.events.post)
        app.router.add_route("OPTIONS", "/events", self.edge.preflight)
        self.segment.routes(app)
        if operational:
            self._add_operational(app)
        self._add_no_route(app)
        return app

    def build_admin(self) -> web.Application:
        """ADMIN_PORT's application: /healthz, /readyz, /metrics and /query."""
        app = web.Application(client_max_size=self._max_body_bytes)
        self._add_operational(app)
        self._add_no_route(app)
        return app

    def _add_operational(self, app: web.Application) -> None:
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/openapi.json", self.openapi)
        if self._query is not None:
            app.router.add_post("/query", self.run_query)

    def _add_no_route(self, app: web.Application) -> None:
        """Last, so that it takes only what no other route does: aiohttp's own 404 and 405 are
        text, clickpulse answers in JSON."""
        route = app.router.add_route("*", "/{path:.*}", self.no_route)
        self._request_metrics.treat_as_unmatched(route)

    async def no_route(self, request: web.Request) -> web.Response:
        """404, or 405 with Allow when another route takes this path with other methods."""
        allowed: set[str] = set()
        for resource in request.app.router.resources():
            if resource is not request.match_info.route.resource:
                _, methods = await resource.resolve(request)
                allowed |= methods
        if allowed:
            return json_response(
                405, {"error": f"method {request.method} is not allowed on {request.path}"},
                {hdrs.ALLOW: ",".join(sorted(allowed))},
            )
        return json_response(404, {"error": f"no route for {request.path}"})

    def stop_intake(self) -> None:
        """From now on POST /events answers 503 and /readyz reports shutting down."""
        self._draining.started = True

    async def run_query(self, request: web.Request) -> web.Response:
        """Only with the embedded store, only from this machine, only statements that read: how
        `python -m clickpulse query` reaches a store that the running service holds open."""
        assert self._query is not None
        if request.remote not in LOOPBACK_ADDRESSES:
            return json_response(403, {"error": "queries are answered only from this machine"})
        output_format = request.query.get("format", QUERY_FORMATS[0])
        if output_format not in QUERY_FORMATS:
            return json_response(400, {"error": f"format must be one of {', '.join(QUERY_FORMATS)}"})
        keys = self.edge.keys
        if keys.configured:
            # A reverse proxy on this host makes every request look local: with keys, a server key too.
            refusal = self.edge.admit_server_key(request)
            if refusal is not None:
                return refusal
        try:
            text = (await request.read()).decode(request.charset or "utf-8")
        except web.HTTPRequestEntityTooLarge:  # client_max_size
            self.rejections.count("too_large")
            return json_response(413, {"error": f"the query is larger than {self._max_body_bytes} bytes (MAX_BODY_BYTES)"})
        except (UnicodeDecodeError, LookupError) as error:
            return json_response(400, {"error": f"the query body is not text in {request.charset or 'utf-8'}: {error}"})
        try:
            sql = check_query(text)
        except QueryRefused as refused:
            return json_response(400, {"error": str(refused)})
        try:
            text = await self._query(sql, output_format)
        except Exception as error:  # noqa: BLE001 - ClickHouse's own message is the answer
            message = str(error).strip()
            return json_response(400, {"error": message.splitlines()[0] if message else repr(error)})
        return web.Response(text=text, content_type="text/plain")

    async def openapi(self, request: web.Request) -> web.Response:
        return web.Response(body=self._openapi, content_type="application/json")

    async def healthz(self, request: web.Request) -> web.Response:
        return json_response(200, {"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        reason = "shutting down" if self._draining.started else self._not_ready_reason()
        if reason:
            return json_response(503, {"status": "not ready", "reason": reason})
        return json_response(200, {"status": "ready"})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self._metrics.render(), headers={hdrs.CONTENT_TYPE: self._metrics.content_type})
