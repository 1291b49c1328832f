"""The edge: what every request that writes passes through, whatever protocol adapter serves it
(POST /events today, a Segment-compatible /v1 API next).

    admit(request)        → ingest key (401/403), origin (403), client address
    read_body(request)    → the in-flight cap (503), time limit (408), Content-Encoding (415),
                            MAX_BODY_BYTES on the wire and decoded (413)
    charge(admission, n)  → the token buckets, in events (429)
    finish(admission, r)  → CORS and RateLimit headers on whatever the adapter answers
    preflight(request)    → OPTIONS: 204 with the CORS headers, or no CORS headers at all

With no keys, no CORS_ORIGINS and no rate limit configured, `admit` returns one shared
admission without looking at the request: the open collector pays nothing for the edge.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Final

import msgspec
from aiohttp import hdrs, web

from clickpulse.collectors import LabelKey
from clickpulse.http.bodies import BodyError, InflightBodies, decode, encoding_of, read_raw
from clickpulse.http.keys import RESERVED_NAME, IngestKey, KeyStore, Presented, presented_secret
from clickpulse.http.origins import OriginPatterns
from clickpulse.http.ratelimit import Network, TokenBuckets, Verdict, client_address
from clickpulse.http.responses import Rejections
from clickpulse.metrics import ReceiverMetrics

log = logging.getLogger("clickpulse.http")

WWW_AUTHENTICATE: Final = {"WWW-Authenticate": 'Bearer realm="clickpulse"'}
PREFLIGHT_MAX_AGE = 600
RETRY_AFTER_INFLIGHT = 1
NO_KEY_LABEL = RESERVED_NAME  # the `key` label of events sent without a key
MAX_KEY_SERIES = 4096  # key names come from INGEST_KEYS_FILE: few


class Admission(msgspec.Struct, gc=False):
    """What the edge learnt of one request. A Struct: made in C for every request with keys,
    CORS or a rate limit (a dataclass's __init__ runs Python, three times slower)."""

    key: IngestKey | None = None
    origin: str | None = None  # the request's Origin when it is allowed: answers carry CORS headers
    client: str = ""
    verdict: Verdict | None = None


OPEN: Final = Admission()
_VARY_ORIGIN: Final = (hdrs.VARY, "Origin")
_EXPOSE_HEADERS: Final = (
    hdrs.ACCESS_CONTROL_EXPOSE_HEADERS, "Retry-After, RateLimit-Limit, RateLimit-Remaining, RateLimit-Reset",
)


class Edge:
    def __init__(
        self,
        *,
        keys: KeyStore,
        cors_origins: OriginPatterns,
        rate_limit: float | None,
        rate_burst: int | None,
        trusted_proxies: Sequence[Network],
        max_body_bytes: int,
        max_inflight_body_bytes: int,
        body_timeout: float,
        rejections: Rejections,
        metrics: ReceiverMetrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._keys = keys
        self._cors_origins = cors_origins
        self._trusted = tuple(trusted_proxies)
        self._max_body_bytes = max_body_bytes
        self._inflight = InflightBodies(max_inflight_body_bytes)
        self._body_timeout = body_timeout
        self._rejections = rejections
        self._metrics = metrics
        self._clock = clock
        self._by_address = (
            TokenBuckets(rate_limit, rate_burst or max(1, int(rate_limit)), clock) if rate_limit else None
        )
        self._by_key: dict[str, TokenBuckets] = {}
        self._key_series: dict[str, LabelKey] = {}  # key name → its events_by_key series
        self._allowed_origins = cors_origins
        self._keyed = keys.configured  # the file may change on SIGHUP, whether there is one does not
        self._apply_keys()

    @property
    def keys(self) -> KeyStore:
        return self._keys

    @property
    def inflight_body_bytes(self) -> int:
        return self._inflight.held

    def reload(self) -> None:
        """SIGHUP: the keys file again (the old keys stay on an error)."""
        if self._keys.reload():
            self._apply_keys()

    def _apply_keys(self) -> None:
        ring = self._keys.ring
        origins = self._cors_origins
        for patterns in ring.browser_origins:
            origins = origins.union(patterns)
        self._allowed_origins = origins
        by_key: dict[str, TokenBuckets] = {}
        for key in ring.keys:
            if key.events_per_second is not None:
                previous = self._by_key.get(key.name)
                if previous is not None and previous.rate == key.events_per_second and previous.burst == key.burst:
                    by_key[key.name] = previous  # a reload does not refill anyone's bucket
                else:
                    by_key[key.name] = TokenBuckets(key.events_per_second, key.burst or 1, self._clock, max_entries=1)
        self._by_key = by_key
        self.rate_limited = bool(by_key) or self._by_address is not None  # else `charge` has nothing to do
        for name in (NO_KEY_LABEL, *ring.names):
            self._metrics.events_by_key.add({"key": name}, 0)
        self._passive = not self._keyed and not origins and self._by_address is None

    # -- admission -----------------------------------------------------------------------------

    def admit(self, request: web.Request, body_secret: str | None = None) -> Admission | web.Response:
        """`body_secret`: a key the body carries (the /v1 API's `writeKey`), taken like a header's
        when the request presents none in its header or query."""
        if self._passive:
            return OPEN
        headers = request.headers
        origin = headers.get(hdrs.ORIGIN)
        allowed_origin = origin if origin is not None and self._allowed_origins.allows(origin) else None
        admission = Admission(origin=allowed_origin)
        key: IngestKey | None = None
        if self._keyed:
            authorization = headers.get(hdrs.AUTHORIZATION)
            bearer = ""
            if authorization is not None and authorization.startswith("Bearer "):
                bearer = authorization[7:].strip()
            if bearer:  # as nearly every server-side client sends it: nothing else to parse
                presented: Presented = (bearer, "header")
            else:
                query_key = request.query.get("key") if request.query_string else None
                presented = presented_secret(authorization, query_key)
            if presented is None and body_secret:
                presented = (body_secret, "header")  # a body is as private as a header
            if presented is None:
                return self._unauthorized(admission, "an ingest key is needed: send Authorization: Bearer <key>")
            secret, where = presented
            key = self._keys.ring.find(secret)
            if key is None:
                return self._unauthorized(admission, "unknown ingest key")
            if where == "query" and key.kind != "browser":
                return self._unauthorized(
                    admission, "this key may only be sent in the Authorization header, never in the URL"
                )
            admission.key = key
            if key.kind == "browser":
                if origin is None:
                    return self._forbidden(admission, "a browser key needs an Origin header")
                if not key.origins.allows(origin):
                    return self._forbidden(admission, "this key is not allowed from this Origin")
        elif origin is not None and self._allowed_origins and allowed_origin is None:
            return self._forbidden(admission, "this Origin is not allowed (CORS_ORIGINS)")
        if key is None and self._by_address is not None:
            admission.client = client_address(
                request.remote, headers.get(hdrs.X_FORWARDED_FOR) if self._trusted else None, self._trusted
            )
        return admission

    def presents_key(self, request: web.Request) -> bool:
        """Whether keys are configured and the request presents one in a header or its query."""
        return presented_secret(
            request.headers.get(hdrs.AUTHORIZATION), request.query.get("key") if request.query_string else None
        ) is not None

    def origin_admission(self, request: web.Request) -> Admission:
        """An admission that only carries CORS (for answering before the key is known)."""
        origin = request.headers.get(hdrs.ORIGIN)
        return Admission(origin=origin if origin is not None and self._allowed_origins.allows(origin) else None)

    def client_of(self, request: web.Request, admission: Admission) -> str:
        """The client's address: the socket's peer, or X-Forwarded-For from TRUSTED_PROXIES."""
        if admission.client:
            return admission.client
        if not self._trusted:  # no proxy to believe: the socket's peer, nothing to parse
            return request.remote or ""
        return client_address(
            request.remote, request.headers.get(hdrs.X_FORWARDED_FOR) if self._trusted else None, self._trusted
        )

    def admit_server_key(self, request: web.Request) -> web.Response | None:
        """For operational routes with keys configured: a server key in the Authorization header."""
        presented = presented_secret(request.headers.get(hdrs.AUTHORIZATION), None)
        key = self._keys.ring.find(presented[0]) if presented is not None else None
        if key is None or key.kind != "server":
            return self._rejections.reject(
                "unauthorized", 401, "this route needs a server key: send Authorization: Bearer <key>",
                WWW_AUTHENTICATE,
            )
        return None

    def _unauthorized(self, admission: Admission, message: str) -> web.Response:
        response = self._rejections.reject("unauthorized", 401, message, WWW_AUTHENTICATE)
        return self.finish(admission, response)

    def _forbidden(self, admission: Admission, message: str) -> web.Response:
        return self.finish(admission, self._rejections.reject("forbidden", 403, message))

    # -- the body ------------------------------------------------------------------------------

    def read_body_now(self, request: web.Request, admission: Admission) -> bytes | web.Response | None:
        """The body without waiting, when aiohttp already holds all of it and it is not encoded
        (the common small request: no coroutine, no timer, nothing to reserve, since it is in
        memory already); None when `read_body` must do it."""
        content = request.content
        if not content.is_eof() or hdrs.CONTENT_ENCODING in request.headers:
            return None
        limit = self._max_body_bytes
        try:  # all of it is in memory already: its length is checked as read, not as declared
            body = content.read_nowait(-1)
        except Exception:  # noqa: BLE001 - a payload error: read_body answers it properly
            return None
        if len(body) > limit:
            return self.finish(admission, self._too_large(f"request body larger than {limit} bytes (MAX_BODY_BYTES)"))
        self._metrics.request_body_bytes.observe_at((), len(body))
        return body

    async def read_body(self, request: web.Request, admission: Admission) -> bytes | web.Response:
        reject = self._rejections.reject
        limit = self._max_body_bytes
        try:
            encoding = encoding_of(request)
        except BodyError as error:
            return self.finish(admission, reject("unsupported_type", 415, str(error)))
        length = request.content_length
        if length is not None and length > limit:
            return self.finish(admission, self._too_large(f"request body larger than {limit} bytes (MAX_BODY_BYTES)"))
        # Reserved: the wire bytes, plus the decoded bytes when there is an encoding.
        reserved = (length if length is not None else limit) + (limit if encoding != "identity" else 0)
        if not self._inflight.reserve(reserved):
            return self.finish(admission, self._rejections.unavailable(
                "overloaded", "too many request bodies are being read at once (MAX_INFLIGHT_BODY_BYTES); retry",
                RETRY_AFTER_INFLIGHT,
            ))
        try:
            if request.content.is_eof():  # all there already: no timer needed
                raw = await read_raw(request, limit)
            else:
                async with asyncio.timeout(self._body_timeout):
                    raw = await read_raw(request, limit)
            body = decode(raw, encoding, limit)
        except TimeoutError:
            response = self.finish(admission, reject(
                "timeout", 408, f"the body was not received within BODY_READ_TIMEOUT={self._body_timeout:g}s",
                {"Connection": "close"},
            ))
            # Answered, then closed at once: aiohttp would otherwise linger reading the slow body.
            await response.prepare(request)
            await response.write_eof()
            if request.protocol is not None:
                request.protocol.force_close()
            return response
        except BodyError as error:
            if error.kind == "too_large":
                return self.finish(admission, self._too_large(str(error)))
            if error.kind == "disconnected":
                return reject("client_disconnected", 400, str(error))
            return self.finish(admission, reject("invalid", 400, str(error)))
        finally:
            self._inflight.release(reserved)
        self._metrics.request_body_bytes.observe_at((), len(raw))
        return body

    def _too_large(self, message: str) -> web.Response:
        response = self._rejections.reject("too_large", 413, message)
        return response

    # -- rate limits ---------------------------------------------------------------------------

    def charge(self, admission: Admission, events: int) -> web.Response | None:
        """Takes `events` from the request's bucket; a 429 when they do not fit."""
        if admission is OPEN:
            return None
        key = admission.key
        if key is not None:
            buckets = self._by_key.get(key.name)
            if buckets is None:
                return None
            verdict = buckets.take(key.name, events)
        elif self._by_address is not None:
            verdict = self._by_address.take(admission.client, events)
        else:
            return None
        admission.verdict = verdict
        if verdict.allowed:
            return None
        if events > verdict.limit:
            message = f"{events} events in one request, more than this sender's burst of {verdict.limit}"
        else:
            message = f"rate limit: {verdict.limit} events at once; retry in {verdict.retry_after}s"
        return self.finish(admission, self._rejections.reject("rate_limited", 429, message))

    def accepted(self, admission: Admission, events: int) -> None:
        key = admission.key
        name = key.name if key is not None else NO_KEY_LABEL
        counter = self._metrics.events_by_key
        series = self._key_series.get(name)
        if series is None:
            series = counter.key_of({"key": name})
            if len(self._key_series) < MAX_KEY_SERIES:
                self._key_series[name] = series
        counter.add_at(series, events)

    def key_name(self, admission: Admission) -> str | None:
        return admission.key.name if admission.key is not None else None

    # -- answers -------------------------------------------------------------------------------

    def finish(self, admission: Admission, response: web.Response) -> web.Response:
        if admission is OPEN:
            return response
        if admission.origin is not None:
            response.headers.extend((
                (hdrs.ACCESS_CONTROL_ALLOW_ORIGIN, admission.origin), _VARY_ORIGIN, _EXPOSE_HEADERS,
            ))
        if admission.verdict is not None:
            response.headers.update(admission.verdict.headers())
        return response

    async def preflight(self, request: web.Request) -> web.Response:
        origin = request.headers.get(hdrs.ORIGIN)
        if origin is None or not self._allowed_origins.allows(origin):
            # Not an allowed origin: no CORS headers, so the browser refuses the actual request.
            return web.Response(status=204, headers={hdrs.VARY: "Origin"})
        return web.Response(status=204, headers={
            hdrs.ACCESS_CONTROL_ALLOW_ORIGIN: origin,
            hdrs.ACCESS_CONTROL_ALLOW_METHODS: "POST",
            hdrs.ACCESS_CONTROL_ALLOW_HEADERS: "Content-Type, Authorization, Content-Encoding",
            hdrs.ACCESS_CONTROL_MAX_AGE: str(PREFLIGHT_MAX_AGE),
            hdrs.VARY: "Origin",
        })
