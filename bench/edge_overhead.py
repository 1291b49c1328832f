"""What the public edge costs on the hot path: single-event POST /events to two clickpulse
processes on the same ClickHouse, one open (no INGEST_KEYS_FILE) and one keyed (a keys file,
every request with `Authorization: Bearer <server key>`), interleaved for a few rounds, wrk on
CPU 1 and the services on CPU 0 as in bench/run.py. Prints the medians of keyed/open req/s and
CPU us/req.

    python3 bench/edge_overhead.py [--rounds 3] [--duration 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  # bench/run.py: its processes, wrk runner and bodies

SECRET = "sk_bench_0123456789abcdef"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args(argv)
    command = bench.find_clickhouse_server()
    if command is None or shutil.which("wrk") is None:
        print("edge_overhead: needs clickhouse-server and wrk", file=sys.stderr)
        return 2
    os.sched_setaffinity(0, {int(bench.LOAD_CPU)})
    workdir = Path(tempfile.mkdtemp(prefix="clickpulse-edge-bench-"))
    single, _ = bench.write_bodies(workdir, 1)
    keys = workdir / "keys.toml"
    keys.write_text(f'[[keys]]\nname = "bench"\nsecret = "{SECRET}"\nkind = "server"\n')
    # ClickHouse off the services' CPU, as bench/run.py does by default.
    server = bench.start_clickhouse(workdir / "clickhouse", ["taskset", "-c", bench.LOAD_CPU, *command])
    services: list[bench.Clickpulse] = []
    anomalies: list[str] = []
    try:
        open_service = bench.start_clickpulse("open", server, workdir, "open.log")
        keyed = bench.start_clickpulse("keyed", server, workdir, "keyed.log", INGEST_KEYS_FILE=str(keys))
        services = [open_service, keyed]
        for service in services:
            bench.wait_until(
                lambda service=service: bench.http_status(f"{service.url}/readyz") == 200,
                service.process, service.label, service.log,
            )
        ratios_rps, ratios_cpu = [], []

        def run_open(number: int) -> bench.PhaseResult:
            os.environ.pop("BENCH_AUTHORIZATION", None)
            return bench.run_wrk("open", f"{open_service.url}/events", single, args.connections, args.duration, 1,
                                 open_service.process.pid, number)

        def run_keyed(number: int) -> bench.PhaseResult:
            os.environ["BENCH_AUTHORIZATION"] = f"Bearer {SECRET}"
            return bench.run_wrk("keyed", f"{keyed.url}/events", single, args.connections, args.duration, 1,
                                 keyed.process.pid, number)

        for number in range(1, args.rounds + 1):
            # Alternate which goes first, so that what one phase leaves behind (ClickHouse merging
            # its inserts, say) does not always fall on the same side.
            if number % 2:
                a = run_open(number)
                b = run_keyed(number)
            else:
                b = run_keyed(number)
                a = run_open(number)
            assert set(a.statuses) == {202} and set(b.statuses) == {202}, (a.statuses, b.statuses)
            ratios_rps.append(b.requests_per_second / a.requests_per_second)
            ratios_cpu.append(b.cpu_us_per_request / a.cpu_us_per_request)
            print(f"  round {number}: open {a.requests_per_second:,.0f} req/s {a.cpu_us_per_request:.0f} us/req, "
                  f"keyed {b.requests_per_second:,.0f} req/s {b.cpu_us_per_request:.0f} us/req", flush=True)
        print(f"keyed/open req/s, median of {args.rounds}: {statistics.median(ratios_rps):.3f}")
        print(f"keyed/open CPU us/req, median of {args.rounds}: {statistics.median(ratios_cpu):.3f}")
    finally:
        os.environ.pop("BENCH_AUTHORIZATION", None)
        for service in services:
            service.stop(anomalies)
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
