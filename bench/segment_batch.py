"""Batched events/s: POST /v1/batch (the Segment-compatible API) beside POST /events, on the same
events. One `python -m clickpulse` (memory acks) on CPU 0, wrk on CPU 1 and ClickHouse as in
bench/run.py; the two phases interleaved for a few rounds. The /events body is a JSON array of
`--batch-events` events from bench/run.py's generator; the /v1/batch body holds the same events
as track messages (event_type → event, user_id → userId, created_at → timestamp, the same
properties, plus a messageId each and a sentAt). Prints events/s and CPU µs/event of each, and
their ratio, medians of the rounds; then checks every acknowledged event became a row.

First, in this process: what /v1/batch's decoding, mapping and encoding of that body cost per
event, beside the floor, msgspec alone decoding the same body into Structs of its members and
encoding them again (best of many runs: what the code costs, not what the machine's load adds).
`--in-process-only` stops there, with no server started.

    python3 bench/segment_batch.py [--rounds 3] [--duration 5] [--batch-events 500] [--connections 8]
                                   [--in-process-only]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  # bench/run.py: its processes, wrk runner and event generator


def write_bodies(directory: Path, count: int) -> tuple[Path, Path]:
    rng = random.Random(20240514)
    now = datetime.now(timezone.utc)
    events = [bench.make_event(rng, now) for _ in range(count)]
    plain = directory / "events.json"
    plain.write_text(json.dumps(events, separators=(",", ":")))
    messages = [{
        "type": "track", "event": event["event_type"], "userId": event["user_id"], "timestamp": event["created_at"],
        "properties": event["properties"], "messageId": str(uuid.uuid4()),
    } for event in events]
    segment = directory / "batch.json"
    segment.write_text(json.dumps({"batch": messages, "sentAt": now.isoformat()}, separators=(",", ":")))
    return plain, segment


class _FloorMessage(msgspec.Struct, gc=False):
    """The members of write_bodies' track messages, as msgspec alone would decode them."""

    type: str
    event: str
    userId: str
    timestamp: datetime
    properties: msgspec.Raw
    messageId: str


class _FloorBatch(msgspec.Struct, gc=False):
    batch: list[_FloorMessage]
    sentAt: datetime


def best_of(function: Callable[[], object], runs: int) -> float:
    """The fastest of `runs` calls, in seconds."""
    best = math.inf
    for _ in range(runs):
        started = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - started)
    return best


def in_process(segment: Path, events: int, runs: int = 200) -> tuple[float, float]:
    """µs per event of /v1/batch's own work on the body (decoding, the rows, their encoding), and
    of the floor: msgspec decoding it into _FloorBatch and encoding those messages again."""
    from clickpulse.http.segment import BatchLimits, MessageMapper, RequestFacts

    body = segment.read_bytes()
    floor_decoder = msgspec.json.Decoder(_FloorBatch)
    encoder = msgspec.json.Encoder()
    mapper = MessageMapper()
    limits = BatchLimits(max_message_bytes=32 * 1024, max_events=events)  # the defaults' message limit
    request = RequestFacts(datetime.now(timezone.utc), "segment", "", (b'"ip":"127.0.0.1"', b'"userAgent":"bench"'))

    def segment_route() -> bytes:
        return encoder.encode_lines(mapper.batch_rows(body, limits, request))

    def floor() -> bytes:
        return encoder.encode_lines(floor_decoder.decode(body).batch)

    return best_of(segment_route, runs) * 1e6 / events, best_of(floor, runs) * 1e6 / events


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--batch-events", type=int, default=500)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--in-process-only", action="store_true", help="only the in-process costs; no server")
    args = parser.parse_args(argv)
    command = bench.find_clickhouse_server()
    if not args.in_process_only and (command is None or shutil.which("wrk") is None):
        print("segment_batch: needs clickhouse-server and wrk", file=sys.stderr)
        return 2
    os.sched_setaffinity(0, {int(bench.LOAD_CPU)})
    workdir = Path(tempfile.mkdtemp(prefix="clickpulse-segment-bench-"))
    plain, segment = write_bodies(workdir, args.batch_events)
    print(f"bodies: /events {plain.stat().st_size:,} bytes, /v1/batch {segment.stat().st_size:,} bytes, "
          f"{args.batch_events} events each", flush=True)
    route_cost, floor_cost = in_process(segment, args.batch_events)
    print(f"in-process: /v1/batch decoding, mapping and encoding {route_cost:.2f} us/event; "
          f"floor, msgspec alone decoding and encoding the same body {floor_cost:.2f} us/event", flush=True)
    if args.in_process_only or command is None:
        shutil.rmtree(workdir, ignore_errors=True)
        return 0
    server = bench.start_clickhouse(workdir / "clickhouse", command)
    anomalies: list[str] = []
    service = None
    acknowledged = 0
    try:
        service = bench.start_clickpulse("memory", server, workdir, "clickpulse.log")
        bench.wait_until(lambda: bench.http_status(f"{service.url}/readyz") == 200,
                         service.process, service.label, service.log)
        rows: dict[str, list[tuple[float, float]]] = {"events": [], "v1": []}
        for number in range(1, args.rounds + 1):
            a = bench.run_wrk("/events", f"{service.url}/events", plain, args.connections, args.duration,
                              args.batch_events, service.process.pid, number)
            b = bench.run_wrk("/v1/batch", f"{service.url}/v1/batch", segment, args.connections, args.duration,
                              args.batch_events, service.process.pid, number)
            assert set(a.statuses) == {202} and set(b.statuses) == {200}, (a.statuses, b.statuses)
            acknowledged += a.accepted_events + b.ok * args.batch_events
            for name, phase in (("events", a), ("v1", b)):
                events_per_second = phase.ok * args.batch_events / phase.window
                cpu = phase.cpu.process_seconds * 1e6 / (phase.ok * args.batch_events) if phase.cpu else 0.0
                rows[name].append((events_per_second, cpu))
            print(f"  round {number}: /events {rows['events'][-1][0]:,.0f} events/s {rows['events'][-1][1]:.1f} us/event, "
                  f"/v1/batch {rows['v1'][-1][0]:,.0f} events/s {rows['v1'][-1][1]:.1f} us/event", flush=True)
        median = {name: (statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs)) for name, rs in rows.items()}
        ratios = [v[0] / e[0] for e, v in zip(rows["events"], rows["v1"])]
        print(f"/events   median of {args.rounds}: {median['events'][0]:,.0f} events/s, {median['events'][1]:.1f} us/event")
        print(f"/v1/batch median of {args.rounds}: {median['v1'][0]:,.0f} events/s, {median['v1'][1]:.1f} us/event")
        print(f"/v1/batch / /events events/s, median of per-round ratios: {statistics.median(ratios):.3f}")
        deadline = time.monotonic() + 60
        stored = 0
        while time.monotonic() < deadline:
            stored = int(server.query(f"SELECT count() FROM {service.database}.{bench.TABLE}").strip() or 0)
            if stored >= acknowledged:
                break
            time.sleep(0.5)
        print(f"rows: {stored:,} stored of {acknowledged:,} acknowledged")
        if stored != acknowledged:
            anomalies.append(f"{acknowledged - stored} acknowledged events are not rows")
    finally:
        if service is not None:
            service.stop(anomalies)
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    for anomaly in anomalies:
        print(f"ANOMALY: {anomaly}", file=sys.stderr)
    return 1 if anomalies else 0


if __name__ == "__main__":
    sys.exit(main())
