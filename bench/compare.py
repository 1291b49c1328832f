"""A/B: the CPU that clickpulse at another commit (A), or with other settings, takes per request
or per event, beside this checkout's (B), in interleaved rounds on the same machine.

    python bench/compare.py BASE                          # A: BASE (a commit, branch or tag); B: this checkout
    python bench/compare.py BASE --load batch             # 1000-event POST /events instead of single events
    python bench/compare.py HEAD --b-setting BATCH_SIZE=500   # the same code, B with another setting
    python bench/compare.py BASE --load embedded          # batches into the embedded store (chDB), as target 5

The machine's speed drifts by tens of percent between minutes, so a ratio of two runs minutes
apart mostly measures the drift. Here both services run side by side for the whole comparison:
each round loads A and B one after the other (the order alternating), and the figure is the
median of the per-round ratios B/A of the CPU time the service process took per answered
request (or per event), read from /proc/PID/stat. Layout as in bench/run.py: the service under
load alone on CPU 0, wrk and ClickHouse on CPU 1. Every acknowledged event of both is checked as
a row at the end. With `--load embedded` there is no ClickHouse server: each service keeps its
rows in chDB in a DATA_DIR of its own, and wrk shares CPU 0 with it, as in bench/embedded.py; the
figure is the CPU of the whole process (event loop and chDB threads) per event, and the rows are
counted with `python -m clickpulse query` once both have stopped. BASE is checked out with
`git worktree` into the temp dir (its clickpulse/ runs; the bench itself is this checkout's).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bodies import write_bodies
from harness import (
    LOAD_CPU, ROOT, SERVICE_CPU, Clickpulse, PhaseResult, count_embedded_rows, print_table, run_wrk, start_clickpulse, wait_for_rows,
)
from tests.servers import find_clickhouse_server, start_clickhouse

LOADS = {"single": 64, "batch": 8, "embedded": 8}  # the load and its default wrk connections, as in bench/run.py


def setting(text: str) -> tuple[str, str]:
    name, equals, value = text.partition("=")
    if not equals or not name:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE")
    return name, value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base", help="A: the commit, branch or tag to compare with (HEAD with --b-setting)")
    parser.add_argument("--load", choices=tuple(LOADS), default="single", 
                        help="single events, 1000-event batches, or batches into the embedded store")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds of A and B (default 6)")
    parser.add_argument("--seconds", type=float, default=8.0, help="seconds of load per phase (default 8)")
    parser.add_argument("--connections", type=int, help="wrk connections (default 64 single, 8 batch)")
    parser.add_argument("--setting", type=setting, action="append", default=[], metavar="NAME=VALUE",
                        help="a clickpulse setting for both (repeatable); ACK_MODE=memory unless given")
    parser.add_argument("--b-setting", type=setting, action="append", default=[], metavar="NAME=VALUE",
                        help="a clickpulse setting for B only (repeatable)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.seconds <= 0:
        parser.error("--rounds and --seconds must be positive")
    return args


def per_unit(result: PhaseResult, load: str) -> float:
    return result.cpu_us_per_request if load == "single" else result.cpu_us_per_event


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    embedded = args.load == "embedded"
    clickhouse_command = find_clickhouse_server()
    if clickhouse_command is None and not embedded:
        print("compare: no clickhouse-server (install it or set CLICKHOUSE_SERVER_BIN)", file=sys.stderr)
        return 2
    os.sched_setaffinity(0, {int(LOAD_CPU)})  # this process only waits and reads /proc
    workdir = Path(tempfile.mkdtemp(prefix="clickpulse-compare-"))
    base_tree = workdir / "base"
    bodies = write_bodies(workdir, 1000)
    body, events_per_request = (bodies.single, 1) if args.load == "single" else (bodies.batch, bodies.batch_events)
    wrk_cpu = SERVICE_CPU if embedded else LOAD_CPU
    connections = args.connections or LOADS[args.load]
    settings = {"ACK_MODE": "memory", **dict(args.setting)}
    services: list[Clickpulse] = []
    server = None
    try:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet", str(base_tree), args.base],
                       check=True)
        commit = subprocess.run(["git", "-C", str(base_tree), "rev-parse", "--short", "HEAD"],
                                check=True, capture_output=True, text=True).stdout.strip()
        data_dirs = {letter: workdir / f"{letter}-data" for letter in "AB"}
        stores = {letter: {"DATA_DIR": str(path)} if embedded else {} for letter, path in data_dirs.items()}
        if clickhouse_command is not None and not embedded:
            server = start_clickhouse(workdir / "clickhouse", ["taskset", "-c", LOAD_CPU, *clickhouse_command])
        a = start_clickpulse(f"A ({args.base}, {commit})", server, workdir, "a.log", root=base_tree,
                             **settings, **stores["A"])
        b = start_clickpulse("B (this checkout)", server, workdir, "b.log",
                             **{**settings, **dict(args.b_setting)}, **stores["B"])
        services = [a, b]
        acknowledged = {"A": 0, "B": 0}
        for letter, service in (("A", a), ("B", b)):
            service.wait_ready(180.0 if embedded else 60.0)
            # Warm-up, not in the figures: imports, caches, the allocator, ClickHouse's first parts.
            acknowledged[letter] += run_wrk(f"{service.label} warm-up", service.url + "/events", body, connections,
                                            2.0, events_per_request, service.pid, wrk_cpu=wrk_cpu).accepted_events
        figures: dict[str, list[float]] = {"A": [], "B": []}
        for number in range(1, args.rounds + 1):
            order = (("A", a), ("B", b)) if number % 2 else (("B", b), ("A", a))
            for letter, service in order:
                result = run_wrk(f"round {number} {letter}", service.url + "/events", body, connections,
                                 args.seconds, events_per_request, service.pid, number, wrk_cpu=wrk_cpu)
                if result.non2xx:
                    raise RuntimeError(f"{service.label} answered {result.non2xx} requests with a non-2xx status")
                figures[letter].append(per_unit(result, args.load))
                acknowledged[letter] += result.accepted_events
        unit = "us/request" if args.load == "single" else "us/event"
        ratios = [after / before for before, after in zip(figures["A"], figures["B"])]
        print()
        print_table(
            [[str(number), f"{before:.3f}", f"{after:.3f}", f"{ratio:.3f}"]
             for number, (before, after, ratio) in enumerate(zip(figures["A"], figures["B"], ratios), 1)]
            + [["median", f"{statistics.median(figures['A']):.3f}", f"{statistics.median(figures['B']):.3f}",
                f"{statistics.median(ratios):.3f}"]],
            ["round", f"A CPU {unit}", f"B CPU {unit}", "B/A"],
        )
        print(f"A: {a.label}; B: this checkout{''.join(f' {n}={v}' for n, v in args.b_setting)}; "
              f"{args.load}, {connections} connections, {args.seconds:g} s a phase; settings "
              + " ".join(f"{n}={v}" for n, v in settings.items()))
        print(f"B/A, the median of the per-round ratios: {statistics.median(ratios):.3f}")
        anomalies: list[str] = []
        for service in services:
            service.stop(anomalies)
        rows_ok = True
        for letter, service in (("A", a), ("B", b)):
            if server is not None:
                rows = wait_for_rows(server, service.database, acknowledged[letter], 30.0)
            else:
                counted, error = count_embedded_rows(data_dirs[letter])
                rows = -1 if counted is None else counted
                if error:
                    anomalies.append(f"{service.label}: `python -m clickpulse query` failed: {error}")
            print(f"rows vs acknowledged events, {service.label}: {rows:,} vs {acknowledged[letter]:,}")
            if rows != acknowledged[letter] or service.exit_status != 0:
                rows_ok = False
                print(f"compare: {service.label}: {rows:,} rows for {acknowledged[letter]:,} acknowledged events, "
                      f"exit status {service.exit_status}", file=sys.stderr)
        for anomaly in anomalies:
            print(f"compare: {anomaly}", file=sys.stderr)
        return 0 if rows_ok and not anomalies else 1
    finally:
        for service in services:
            if service.process.poll() is None:
                service.process.kill()
        if server is not None:
            server.stop()
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base_tree)],
                       capture_output=True)
        if args.keep:
            print(f"compare: logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
