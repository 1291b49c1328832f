"""How long /healthz takes to answer while a real clickpulse replays a large spool.

    python bench/replay_healthz.py [--records 300000] [--checkout DIR]

Fills a temp SPOOL_DIR with `--records` one-event records (valid events, in the spool's own
record format, as a crash after a long outage would leave them), starts its own ClickHouse
(tests/servers.py) and `python -m clickpulse` on that spool, and from the moment the process
starts until every replayed row is counted in ClickHouse it sends GET /healthz every 10 ms and
times each answer, and when the first came (`--checkout` runs another checkout's clickpulse on the same spool format, for a
before/after comparison). Prints the latency p50 / p99 / max and how long the replay took. Everything
listens on 127.0.0.1; the temp directory is removed afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's clickpulse and tests/

from bench.spool_replay_lag import fill  # noqa: E402
from tests.servers import find_clickhouse_server, start_clickhouse  # noqa: E402
from tests.support import clean_environment, free_port, stop_process  # noqa: E402

SEGMENT_BYTES = 32 << 20
PROBE_SECONDS = 0.010


def valid_event(index: int) -> bytes:
    """A row the events table takes, with an id of its own."""
    return (
        b'{"event_type":"page_view","source":"replay","created_at":"2024-05-01T12:00:00Z",'
        b'"user_id":"u%07d","event_id":"00000000-0000-4000-8000-%012d"}\n' % (index, index)
    )


async def probe_until_replayed(url: str, count_rows, records: int) -> tuple[list[float], float, float]:
    latencies: list[float] = []
    first_answer = 0.0
    started = time.perf_counter()
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        next_count = 0.0
        while True:
            sent = time.perf_counter()
            try:
                async with http.get(url + "/healthz") as response:
                    await response.read()
                    if response.status == 200:
                        latencies.append(time.perf_counter() - sent)
                        first_answer = first_answer or time.perf_counter() - started
            except aiohttp.ClientConnectionError:
                pass  # not listening yet
            now = time.perf_counter()
            if now >= next_count:
                next_count = now + 0.5
                if await asyncio.to_thread(count_rows) >= records:
                    return latencies, now - started, first_answer
            await asyncio.sleep(PROBE_SECONDS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=300_000)
    parser.add_argument("--checkout", type=Path, default=ROOT, help="the clickpulse checkout to run (default: this one)")
    arguments = parser.parse_args()
    command = find_clickhouse_server()
    if command is None:
        sys.exit("no clickhouse-server binary (apt-get install clickhouse-server)")
    with tempfile.TemporaryDirectory(prefix="clickpulse-replay-healthz-") as temporary:
        base = Path(temporary)
        spool_bytes = fill(base / "spool", arguments.records, SEGMENT_BYTES, valid_event)
        server = start_clickhouse(base / "clickhouse", command)
        port = free_port()
        env = clean_environment(__import__("os").environ)
        env.update(
            PYTHONPATH=str(arguments.checkout), CLICKHOUSE_DSN=server.dsn("replay"), SPOOL_DIR=str(base / "spool"),
            HTTP_HOST="127.0.0.1", HTTP_PORT=str(port), LOG_LEVEL="WARNING",
        )
        log = open(base / "clickpulse.log", "wb")
        process = subprocess.Popen([sys.executable, "-m", "clickpulse"], env=env, stdout=log, stderr=subprocess.STDOUT)

        def count_rows() -> int:
            try:
                return int(server.query("SELECT count() FROM replay.events").strip())
            except RuntimeError:
                return 0

        try:
            latencies, took, first_answer = asyncio.run(probe_until_replayed(f"http://127.0.0.1:{port}", count_rows, arguments.records))
        finally:
            stop_process(process)
            server.stop()
    ordered = sorted(latencies)
    print(json.dumps({
        "records": arguments.records,
        "spool_bytes": spool_bytes,
        "replay_seconds": round(took, 2),
        "first_healthz_answer_seconds": round(first_answer, 2),
        "healthz_answers": len(ordered),
        "healthz_p50_ms": round(statistics.median(ordered) * 1000, 2),
        "healthz_p99_ms": round(ordered[int(len(ordered) * 0.99)] * 1000, 2),
        "healthz_max_ms": round(ordered[-1] * 1000, 2),
    }, indent=2))


if __name__ == "__main__":
    main()
