"""The request bodies bench/run.py sends, and the JSONEachRow rows clickpulse makes of them.

- `make_event`: one realistic event (`event_type`, `source`, `user_id`, `value`, `created_at` in
  RFC 3339 with `Z`, a handful of `properties`).
- `write_bodies`: a single event, a JSON array of `batch_events` events for POST /events, and the
  same events as Segment track messages for POST /v1/batch (`segment_batch`).
- `events_rows`: the exact JSONEachRow lines clickpulse sends to ClickHouse for a POST /events
  body, made by clickpulse's own code, for the baselines that insert them without clickpulse.
"""

from __future__ import annotations

import json
import random
import sys
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

EVENT_TYPES = ("page_view", "page_view", "page_view", "click", "click", "search", "add_to_cart", "purchase", "signup")
SOURCES = ("web", "web", "ios", "android", "backend")
PATHS = ("/", "/pricing", "/docs/getting-started", "/blog/2024/05/batching", "/checkout", "/account/settings")
REFERRERS = ("https://www.google.com/", "https://news.ycombinator.com/", "", "https://t.co/x1y2z3")
BROWSERS = ("Firefox", "Chrome", "Safari", "Edge")
SEED = 20240514


def make_event(rng: random.Random, now: datetime) -> dict[str, object]:
    event_type = rng.choice(EVENT_TYPES)
    created_at = now - timedelta(milliseconds=rng.randrange(0, 3_600_000))
    properties: dict[str, object] = {
        "path": rng.choice(PATHS),
        "referrer": rng.choice(REFERRERS),
        "browser": rng.choice(BROWSERS),
        "screen_width": rng.choice((390, 768, 1280, 1440, 1920)),
        "logged_in": rng.random() < 0.4,
    }
    if event_type == "purchase":
        value: float = round(rng.uniform(5, 400), 2)
        properties["currency"] = "EUR"
    elif event_type == "page_view":
        value = round(rng.uniform(0.2, 120.0), 3)  # seconds on page
    else:
        value = 1.0
    return {
        "event_type": event_type,
        "source": rng.choice(SOURCES),
        "user_id": f"user_{rng.randrange(1, 200_000):06d}",
        "value": value,
        "created_at": created_at.strftime("%Y-%m-%dT%H:%M:%S.") + f"{created_at.microsecond // 1000:03d}Z",
        "properties": properties,
    }


def segment_batch(events: list[dict[str, object]], now: datetime, rng: random.Random) -> bytes:
    """The same events as a POST /v1/batch body: one track message each (event_type → event,
    user_id → userId, created_at → timestamp, the same properties, a messageId each) and a sentAt."""
    messages = [{
        "type": "track", "event": event["event_type"], "userId": event["user_id"], "timestamp": event["created_at"],
        "properties": event["properties"], "messageId": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
    } for event in events]
    return json.dumps({"batch": messages, "sentAt": now.isoformat()}, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Bodies:
    single: Path  # one event, a JSON object
    batch: Path  # `batch_events` events, a JSON array, for POST /events
    segment: Path  # the same events as track messages, for POST /v1/batch
    batch_events: int


def write_bodies(directory: Path, batch_events: int) -> Bodies:
    rng = random.Random(SEED)
    now = datetime.now(timezone.utc)
    single = directory / "single_event.json"
    single.write_text(json.dumps(make_event(rng, now), separators=(",", ":")))
    events = [make_event(rng, now) for _ in range(batch_events)]
    batch = directory / f"batch_{batch_events}.json"
    batch.write_text(json.dumps(events, separators=(",", ":")))
    segment = directory / f"segment_batch_{batch_events}.json"
    segment.write_bytes(segment_batch(events, now, rng))
    return Bodies(single, batch, segment, batch_events)


# -- the rows clickpulse makes ----------------------------------------------------------------


class EventsRows:
    """Makes, for one POST /events body, the JSONEachRow lines clickpulse's /events endpoint
    hands its pipeline, with clickpulse's own code: clickpulse.events.EventDecoder().decode_json
    and RowEncoder().encode, with the `received_at` and `context` the endpoint adds from
    clickpulse/http/enrich.py's `Enricher` (clickpulse/http/events.py sets them on each event
    through a `RowStamp`).
    Fresh event_ids every call, as clickpulse generates them for a body wrk repeats. Not timed: the
    baselines make all their rows before they start the clock."""

    def __init__(self, user_agent: str | None = None, client: str = "127.0.0.1", enrich_ip: str = "true") -> None:
        import clickpulse.events as events
        from clickpulse.http.enrich import Enricher

        self._decoder = events.EventDecoder()
        self._encoder = events.RowEncoder()
        self._enricher = Enricher(enrich_ip)  # type: ignore[arg-type]
        # The enricher reads only the request's headers (User-Agent).
        self._request = SimpleNamespace(headers={"User-Agent": user_agent} if user_agent else {})
        self._client = client
        self._stamp_type = events.RowStamp

    def rows(self, body: bytes) -> tuple[bytes, int]:
        enricher, request, client = self._enricher, self._request, self._client
        stamp = self._stamp_type(enricher.received_at_value(), enricher.context_value(request, client))
        events, _ = self._decoder.decode_json(body, stamp)
        return self._encoder.encode(events), len(events)


def insert_bodies(body: bytes, total_rows: int, rows_per_insert: int) -> list[bytes]:
    """At least `total_rows` rows (whole requests) of what clickpulse makes of `body` POSTed again
    and again, as JSONEachRow bodies of `rows_per_insert` rows each (the last may be shorter)."""
    maker = EventsRows()
    lines: list[bytes] = []
    while len(lines) < total_rows:
        rows, _ = maker.rows(body)
        lines.extend(rows.splitlines(keepends=True))
    return [b"".join(lines[start:start + rows_per_insert]) for start in range(0, len(lines), rows_per_insert)]
