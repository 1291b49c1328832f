"""Event-loop responsiveness while a large spool replays.

    python bench/spool_replay_lag.py [--records 300000] [--capacity 100000] [--segment-mib 32]

Fills a temp spool directory with `--records` one-event records (the record format of
clickpulse.spool, as a crash after a long ClickHouse outage would leave them), then opens a
Spool on it in an event loop and forwards everything to a deliver() that releases each event's
memory at once (an instant Batcher and Writer). Meanwhile a probe task sleeps 10 ms at a time
and records how late it wakes: the lag a /healthz request would see. Reports max, p99 and p50
of that lag during open() and during forwarding, and how long each took. Nothing leaves the
machine; the directory is removed afterwards.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's clickpulse

from aioprometheus import Registry

from clickpulse.memory_limit import MemoryLimit
from clickpulse.messages import Batch, Delivery
from clickpulse.metrics import SpoolMetrics
from clickpulse.spool import Spool, encode_record, segment_name

PROBE_SECONDS = 0.010


def page_view(index: int) -> bytes:
    return b'{"event":"page_view","user_id":"u%07d","n":%d}\n' % (index, index)


def fill(directory: Path, records: int, segment_bytes: int, row: Callable[[int], bytes] = page_view) -> int:
    """Writes `records` one-event records (`row(index)` each) in segments of about
    `segment_bytes`; returns bytes."""
    directory.mkdir(parents=True, exist_ok=True)
    received_ms = int(time.time() * 1000)
    number, chunk, size, total = 1, [], 0, 0
    for index in range(records):
        record = encode_record(row(index), 1, received_ms)
        chunk.append(record)
        size += len(record)
        if size >= segment_bytes:
            (directory / segment_name(number)).write_bytes(b"".join(chunk))
            number, chunk, total, size = number + 1, [], total + size, 0
    if chunk:
        (directory / segment_name(number)).write_bytes(b"".join(chunk))
        total += size
    return total


def summary(lags: list[float]) -> dict[str, float]:
    if not lags:
        return {"samples": 0}
    ordered = sorted(lags)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return {
        "samples": len(lags),
        "max_ms": round(ordered[-1] * 1000, 2),
        "p99_ms": round(p99 * 1000, 2),
        "p50_ms": round(statistics.median(ordered) * 1000, 2),
    }


async def measure(directory: Path, records: int, capacity: int, segment_bytes: int) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    memory = MemoryLimit(capacity, 1 << 30)
    forwarded = 0
    everything = asyncio.Event()

    def deliver(message: Delivery | Batch) -> None:
        nonlocal forwarded
        memory.release(message.count, 0)
        forwarded += message.count
        if forwarded >= records:
            everything.set()

    spool = Spool(directory=directory, max_bytes=1 << 40, segment_bytes=segment_bytes, memory=memory,
                  deliver=deliver, metrics=SpoolMetrics(Registry()))
    phase = "open"
    lags: dict[str, list[float]] = {"open": [], "forward": []}

    async def probe() -> None:
        while True:
            started = loop.time()
            await asyncio.sleep(PROBE_SECONDS)
            lags[phase].append(max(0.0, loop.time() - started - PROBE_SECONDS))

    probing = asyncio.create_task(probe())
    await asyncio.sleep(0.05)
    lags["open"].clear()
    started = time.perf_counter()
    await spool.open()
    opened = time.perf_counter()
    phase = "forward"
    running = asyncio.create_task(spool.run())
    await asyncio.wait_for(everything.wait(), timeout=600)
    finished = time.perf_counter()
    probing.cancel()
    running.cancel()
    await asyncio.gather(probing, running, return_exceptions=True)
    await spool.close()
    return {
        "records": records,
        "capacity_events": capacity,
        "open_seconds": round(opened - started, 3),
        "forward_seconds": round(finished - opened, 3),
        "lag_during_open": summary(lags["open"]),
        "lag_during_forwarding": summary(lags["forward"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=300_000)
    parser.add_argument("--capacity", type=int, default=100_000, help="MAX_BUFFER_EVENTS")
    parser.add_argument("--segment-mib", type=int, default=32, help="segment size (the service uses 32 MiB)")
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="clickpulse-replay-") as temporary:
        directory = Path(temporary) / "spool"
        size = fill(directory, arguments.records, arguments.segment_mib << 20)
        result = asyncio.run(measure(directory, arguments.records, arguments.capacity, arguments.segment_mib << 20))
        print(json.dumps({"spool_bytes": size, **result}, indent=2))


if __name__ == "__main__":
    main()
