"""clickpulse's benchmark: every target of issue 14 against its baseline, measured in one run.

    python bench/run.py [--only single,instructions,batch,landed,embedded,soak] [--rounds 5] [--duration 5]

It starts its own ClickHouse (tests/servers.py) in a temp dir, pinned to CPU 1 with wrk and this
process; the services under test run on CPU 0, one under load at a time. The parts:

  single    interleaved rounds of single-event POSTs to (a) the bare handler, (b) clickpulse with
            memory acks, (e) clickpulse with an ingest key, CORS and enrichment, (d) clickpulse
            with disk acks: targets (b)/(a) >= 0.8, (e)/(a) >= 0.75, (d)/(b) >= 0.8, the medians
            of the per-round ratios
  instructions
            (a), (b) and (e) under valgrind's callgrind: instructions per single-event request,
            the same on a quiet or a busy machine (bench/instructions.py); skipped without valgrind
  batch     (f) 1000-message POST /v1/batch and (c) 1000-event POST /events to the memory-ack
            clickpulse: CPU us/event <= 2.5 each, beside the floor (plain msgspec decode + encode
            of the same bodies, in this process on CPU 0)
  landed    (c)'s events/s landed in ClickHouse >= 0.8x ClickHouse alone ingesting the same rows
            (bench/baseline.py clickhouse, before and after (c): the faster)
  soak      --soak-seconds of single events at 80% of (b)'s rate: VmRSS after 60 s within ±10%
            of its value at 60 s, p99 quoted, the curve as an SVG
  embedded  (g) the embedded default (chDB in-process, no CLICKHOUSE_DSN), wrk and clickpulse on
            CPU 0: events/s landed >= 0.8x chDB alone on the same core (bench/baseline.py chdb,
            before and after (g): the faster);
            peak RSS and what it is made of

Every acknowledged event must be a row: each clickpulse is SIGTERMed and its rows counted. Exit
status 1 when rows and acknowledgements differ, a clickpulse process exits non-zero or the
harness fails; the targets are reported, not enforced. See bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import embedded as embedded_part  # noqa: E402
import instructions as instructions_part  # noqa: E402
import phases  # noqa: E402
import report  # noqa: E402
import soak as soak_part  # noqa: E402
from bodies import write_bodies  # noqa: E402
from harness import (  # noqa: E402
    LOAD_CPU, OTHERS_CPU_WARNING, SERVICE_CPU, Clickpulse, source_state, tail, wait_for_rows,
)
from tests.support import stop_process  # noqa: E402
from tests.servers import find_clickhouse_server, start_clickhouse  # noqa: E402

PARTS = ("single", "instructions", "batch", "landed", "soak", "embedded")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(PARTS),
                        help=f"comma-separated parts to run, of {','.join(PARTS)} (default: all)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of (a), (b), (e), (d) (default 5)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of load per single-event phase (default 5)")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections for single events (default 64)")
    parser.add_argument("--batch-duration", type=float, default=None,
                        help="seconds of load per batch phase, (f), (c), (g) (default 20)")
    parser.add_argument("--batch-connections", type=int, default=8, help="wrk connections for batches (default 8)")
    parser.add_argument("--batch-events", type=int, default=1000, help="events per batch request (default 1000)")
    parser.add_argument("--baseline-rows", type=int, default=1_000_000,
                        help="rows ClickHouse alone and chDB alone insert, 10,000 an insert (default 1000000)")
    parser.add_argument("--soak-seconds", type=float, default=300.0, help="length of the soak (default 300; 0 skips it)")
    parser.add_argument("--soak-share", type=float, default=0.8,
                        help="the soak's rate as a share of its calibrated maximum req/s (default 0.8)")
    parser.add_argument("--soak-rate", type=float, default=None,
                        help="the soak's rate in req/s, instead of a share of a calibration run just before it")
    parser.add_argument("--soak-connections", type=int, default=None,
                        help="wrk connections for the soak (default: --connections)")
    parser.add_argument("--soak-plot", default=None, help="where to write the soak's RSS curve (default: the temp dir)")
    parser.add_argument(
        "--clickhouse-cpus", default=LOAD_CPU,
        help=f"CPU list ClickHouse is pinned to with taskset (default {LOAD_CPU}, the load side); 'any' to leave it unpinned",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, ClickHouse data) afterwards")
    args = parser.parse_args(argv)
    args.parts = [part.strip() for part in args.only.split(",") if part.strip()]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        parser.error(f"--only: unknown part {unknown[0]!r}; the parts are {', '.join(PARTS)}")
    if args.soak_seconds <= 0 and "soak" in args.parts:
        args.parts.remove("soak")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.duration <= 0:
        parser.error("--duration must be positive")
    if args.soak_connections is None:
        args.soak_connections = args.connections
    if args.batch_duration is None:
        # The last partial batch waits up to FLUSH_INTERVAL (1 s): a fixed tail, a small share of 20 s.
        args.batch_duration = 20.0
    return args


def collect_anomalies(run: phases.Run, spool_filesystem: str | None) -> list[tuple[Clickpulse, str]]:
    """Adds what every phase and service says about itself; returns the services with stderr."""
    for phase in run.phases:
        where = phase.name if phase.round is None else f"round {phase.round} {phase.name}"
        if phase.non2xx:
            run.anomalies.append(f"{where}: {phase.non2xx} non-2xx responses, by status {phase.statuses}")
        if phase.socket_errors:
            run.anomalies.append(
                f"{where}: wrk socket errors connect={phase.values['errors_connect']:.0f} "
                f"read={phase.values['errors_read']:.0f} write={phase.values['errors_write']:.0f} "
                f"timeout={phase.values['errors_timeout']:.0f}"
            )
        if phase.others_share > OTHERS_CPU_WARNING:
            run.anomalies.append(
                f"{where}: other processes used {phase.others_share:.0%} of CPU {SERVICE_CPU} "
                "(the machine was not quiet; req/s is understated, CPU us/req is the steadier figure)"
            )
        if phase.unanswered:
            run.anomalies.append(f"{where}: {phase.unanswered} requests sent but not answered before wrk ended")
    with_stderr = []
    for service in run.services:
        if service.exit_status != 0:
            run.anomalies.append(f"{service.label} exited with status {service.exit_status} after SIGTERM")
        text = service.stderr_text()
        if text:
            with_stderr.append((service, text))
            run.anomalies.append(f"{service.label} wrote {len(text.splitlines())} lines to stderr (LOG_LEVEL=WARNING)")
    if spool_filesystem and spool_filesystem.startswith(("tmpfs", "ramfs")):
        run.anomalies.append(f"the spool is on {spool_filesystem}: fsync costs nothing there, so (d) flatters disk acks")
    return with_stderr


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("wrk") is None or shutil.which("taskset") is None:
        print("bench: needs wrk and taskset on PATH", file=sys.stderr)
        return 2
    if not {0, 1} <= os.sched_getaffinity(0):
        print("bench: needs CPUs 0 and 1 (the services on 0, wrk on 1)", file=sys.stderr)
        return 2
    if "instructions" in args.parts and instructions_part.valgrind() is None:
        print("bench: no valgrind on PATH: the instructions part is skipped", file=sys.stderr)
        args.parts.remove("instructions")
    needs_server = bool({"single", "instructions", "batch", "landed", "soak"} & set(args.parts))
    clickhouse_command = find_clickhouse_server() if needs_server else []
    if clickhouse_command is None:
        print("bench: no clickhouse-server (install it or set CLICKHOUSE_SERVER_BIN)", file=sys.stderr)
        return 2
    if needs_server and args.clickhouse_cpus != "any":
        clickhouse_command = ["taskset", "-c", args.clickhouse_cpus, *clickhouse_command]
    # This process only polls and waits (and measures the floor, pinned to CPU 0 for that alone).
    os.sched_setaffinity(0, {int(LOAD_CPU)})

    workdir = Path(tempfile.mkdtemp(prefix="clickpulse-bench-"))
    run = phases.Run(args, workdir, write_bodies(workdir, args.batch_events))
    args.source = source_state()
    parts = report.Parts()
    failed = True
    started = time.monotonic()
    try:
        print(f"bench: temp dir {workdir}; parts: {', '.join(args.parts)}", flush=True)
        print(f"bench: clickpulse source: {args.source}", flush=True)
        if needs_server:
            run.server = start_clickhouse(workdir / "clickhouse", clickhouse_command)
            run.processes.append(run.server.process)
            run.clickhouse_version = run.server.query("SELECT version()").strip()
            print(f"bench: ClickHouse {run.clickhouse_version} on 127.0.0.1:{run.server.http_port}", flush=True)

        batch_wanted = bool({"batch", "landed"} & set(args.parts))
        memory = None
        if "single" in args.parts or batch_wanted:
            memory = phases.start_memory(run)
        if "single" in args.parts:
            assert memory is not None
            parts.single = phases.run_single(run, memory)
        if "instructions" in args.parts:
            parts.instructions = instructions_part.run_instructions(run)
        if batch_wanted:
            assert memory is not None
            acknowledged = parts.single.memory_acknowledged if parts.single else 0
            if parts.single is None:
                memory.wait_ready()
            landed = "landed" in args.parts
            alones = parts.clickhouse_alone

            def clickhouse_alone_before() -> None:
                alones.append(phases.run_clickhouse_alone(run, memory.database, "before"))

            parts.batches = phases.run_batches(
                run, memory, acknowledged, with_segment="batch" in args.parts,
                before_c=clickhouse_alone_before if landed else None,
            )
            if landed:
                alones.append(phases.run_clickhouse_alone(run, memory.database, "after"))
                if phases.CLICKPULSE_ROWS_PER_INSERT != phases.BASELINE_ROWS_PER_INSERT:
                    parts.clickhouse_reference = phases.run_clickhouse_alone(
                        run, memory.database, "batch_size", phases.CLICKPULSE_ROWS_PER_INSERT,
                    )
        elif memory is not None:
            memory.stop(run.anomalies)
            acknowledged = parts.single.memory_acknowledged if parts.single else 0
            run.check_rows("rows vs 2xx-acked events, memory acks (b)",
                           wait_for_rows(run.server, memory.database, acknowledged, 30.0), acknowledged)
        if "soak" in args.parts:
            # Without --soak-rate, the soak's own process is calibrated just before it: (b)'s
            # median from minutes earlier is no maximum on a machine whose speed drifts by tens of
            # percent, and 80% of a faster minute's rate soaked a saturated service.
            rate, source = (args.soak_rate, "--soak-rate") if args.soak_rate else (None, "")
            parts.soak = soak_part.run_soak(run, rate, source)
        if run.server is not None:
            run.server.stop()  # the embedded part needs no server, and a quiet machine
        if "embedded" in args.parts:
            parts.embedded = embedded_part.run_embedded(run)

        # -- the report ----------------------------------------------------------------------------
        with_stderr = collect_anomalies(run, parts.single.spool_filesystem if parts.single else None)
        print()
        print(
            f"clickpulse benchmark: parts {', '.join(args.parts)}; "
            + (f"{args.rounds} rounds of (a), (b), (e), (d) of {args.duration:g} s; " if parts.single else "")
            + f"batches {args.batch_duration:g} s; services on CPU {SERVICE_CPU} (one under load at "
            f"a time), wrk on CPU {LOAD_CPU} (for (g) on CPU {SERVICE_CPU}), ClickHouse {run.clickhouse_version or '-'} "
            f"on CPU {args.clickhouse_cpus}; BATCH_SIZE default, FLUSH_INTERVAL 1s"
            + (f"; (d)'s spool on {parts.single.spool_filesystem}" if parts.single else "")
            + f"; clickpulse source: {args.source}"
        )
        print()
        report.print_phases(run)
        print()
        if parts.single is not None:
            report.print_rounds(parts.single)
            print()
        if parts.instructions is not None:
            report.print_instructions(parts.instructions)
            print()
        if parts.batches is not None:
            report.print_batches(parts.batches, parts.clickhouse_alone, parts.clickhouse_reference)
            print()
        if parts.embedded is not None:
            report.print_embedded(parts.embedded)
            print()
        if parts.soak is not None:
            report.print_soak(parts.soak)
            print()
        # What can explain a missed target comes before the verdicts.
        if run.anomalies:
            print("anomalies (read these before the verdicts below):")
            for anomaly in run.anomalies:
                print(f"  - {anomaly}")
            print()
        report.print_summary(run, parts)
        print()
        print(f"total run time {time.monotonic() - started:.0f} s")
        for service, _ in with_stderr:
            print()
            print(f"tail of {service.label} stderr ({service.log}):")
            print(tail(service.log))
        failed = not run.rows_ok or any(service.exit_status != 0 for service in run.services)
        return 1 if failed else 0
    except Exception as error:  # noqa: BLE001 - one readable line, then clean up
        import traceback

        traceback.print_exc()
        print(f"bench: failed: {error}", file=sys.stderr)
        return 1
    finally:
        for process in run.processes:
            if process.poll() is None:
                stop_process(process, timeout=30.0)
        if failed or run.anomalies or args.keep:
            print(f"bench: logs and data kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
