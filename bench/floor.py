"""The floor of target 2: what plain msgspec decoding plus encoding of the batch bodies costs,
in this process, pinned to the service CPU while nothing is under load.

- /events: the body decoded into `list[PlainEvent]` (the fields and types of
  clickpulse.events.Event, no constraints) and `encode_lines` of that list.
- /v1/batch: the body decoded into `PlainBatch` (`batch: list[PlainTrack]`, `sentAt`; each track
  message's members with plain types) and `encode_lines` of its messages.

Both decode `properties` into a dict, as /events does. µs/event is the best of several repeats of
the thread's CPU time (the figure clickpulse's own `CPU us/event` is comparable with). Beside
them, clickpulse's own /events code in-process (decode_json, encode, the enrichment splice:
bench/bodies.py `EventsRows`) and its own /v1/batch mapping in-process (MessageMapper.batch_rows
and encode_lines) show how much of the service's CPU per event is that work and how much is
HTTP, the pipeline and the insert.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

import msgspec

from bodies import EventsRows
from harness import CLOCK_TICKS, cpu_times

PropertyValue = str | int | float | bool


class PlainEvent(msgspec.Struct):
    event_type: str
    source: str
    created_at: datetime
    user_id: str | None = None
    value: float | None = None
    event_id: uuid.UUID | None = None
    properties: dict[str, PropertyValue] | None = None


class PlainTrack(msgspec.Struct):
    type: str
    event: str
    userId: str
    timestamp: datetime
    properties: dict[str, PropertyValue]
    messageId: str


class PlainBatch(msgspec.Struct):
    batch: list[PlainTrack]
    sentAt: datetime


@dataclass
class Floors:
    events_us: float  # plain msgspec, /events body
    segment_us: float  # plain msgspec, /v1/batch body
    clickpulse_events_us: float  # clickpulse's own /events decode + encode + splice, in-process
    clickpulse_segment_us: float  # clickpulse's own /v1/batch decode + mapping + encode, in-process
    cpu: str
    others_share: float = 0.0  # share of `cpu` other processes used while it was measured


def best_us_per_event(work, events: int, repeats: int = 11, min_seconds: float = 0.1) -> float:
    """Best of `repeats` of the thread CPU time per event of `work()`, each repeat long enough to
    measure (`min_seconds`)."""
    work()  # warm up: caches, the allocator, msgspec's type info
    started = time.thread_time()
    calls = 0
    while time.thread_time() - started < min_seconds / 4:
        work()
        calls += 1
    per_call = (time.thread_time() - started) / calls
    loops = max(1, round(min_seconds / per_call))
    best = float("inf")
    for _ in range(repeats):
        started = time.thread_time_ns()
        for _ in range(loops):
            work()
        best = min(best, (time.thread_time_ns() - started) / 1e3 / (loops * events))
    return best


@dataclass
class Works:
    """The four pieces of work the floor compares, each one call over a whole batch body."""

    plain_events: Callable[[], object]
    plain_segment: Callable[[], object]
    clickpulse_events: Callable[[], object]
    clickpulse_segment: Callable[[], object]
    events: int  # in the /events body
    segment_events: int  # messages in the /v1/batch body


def works(events_body: bytes, segment_body: bytes) -> Works:
    events_decoder = msgspec.json.Decoder(list[PlainEvent])
    segment_decoder = msgspec.json.Decoder(PlainBatch)
    encoder = msgspec.json.Encoder()
    segment_count = len(segment_decoder.decode(segment_body).batch)
    maker = EventsRows()

    from clickpulse.http.segment_mapping import BatchLimits, MessageMapper, RequestFacts

    mapper = MessageMapper()
    limits = BatchLimits(max_message_bytes=32 * 1024, max_events=segment_count)  # the defaults' message limit
    request = RequestFacts(datetime.now(timezone.utc), "segment", "", (b'"ip":"127.0.0.1"', b'"userAgent":"bench"'))
    return Works(
        plain_events=lambda: encoder.encode_lines(events_decoder.decode(events_body)),
        plain_segment=lambda: encoder.encode_lines(segment_decoder.decode(segment_body).batch),
        clickpulse_events=lambda: maker.rows(events_body),
        clickpulse_segment=lambda: encoder.encode_lines(mapper.batch_rows(segment_body, limits, request)),
        events=len(events_decoder.decode(events_body)),
        segment_events=segment_count,
    )


def measure(events_body: bytes, segment_body: bytes, cpu: str) -> Floors:
    """Pins this thread to `cpu` for the measurement and restores its affinity afterwards."""
    work = works(events_body, segment_body)
    affinity = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {int(cpu)})
    busy_before, _, _ = cpu_times(cpu)
    started, own_started = time.monotonic(), time.thread_time()
    try:
        floors = Floors(
            events_us=best_us_per_event(work.plain_events, work.events),
            segment_us=best_us_per_event(work.plain_segment, work.segment_events),
            clickpulse_events_us=best_us_per_event(work.clickpulse_events, work.events),
            clickpulse_segment_us=best_us_per_event(work.clickpulse_segment, work.segment_events),
            cpu=cpu,
        )
    finally:
        os.sched_setaffinity(0, affinity)
    busy_after, _, _ = cpu_times(cpu)
    wall, own = time.monotonic() - started, time.thread_time() - own_started
    floors.others_share = max(0.0, (busy_after - busy_before) / CLOCK_TICKS - own) / wall if wall > 0 else 0.0
    return floors


if __name__ == "__main__":
    # `python bench/floor.py WORK TIMES EVENTS_BODY SEGMENT_BODY`: one of `Works`' pieces of work
    # TIMES times and nothing else, for bench/instructions.py to count under callgrind.
    import sys

    name, times, events_path, segment_path = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    pieces = ("plain_events", "plain_segment", "clickpulse_events", "clickpulse_segment")
    if name not in pieces:
        sys.exit(f"usage: floor.py {{{'|'.join(pieces)}}} TIMES EVENTS_BODY SEGMENT_BODY")
    with open(events_path, "rb") as events_file, open(segment_path, "rb") as segment_file:
        chosen = getattr(works(events_file.read(), segment_file.read()), name)
    for _ in range(times):
        chosen()
