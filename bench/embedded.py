"""Target 5, the embedded default: a `python -m clickpulse` without CLICKHOUSE_DSN (chDB in its
process, DATA_DIR in the temp dir), wrk and clickpulse all on CPU 0, batches to POST /events;
then chDB alone (bench/baseline.py chdb) on the same core inserting the same rows. Also where the
embedded process's RSS sits, from /proc/PID/smaps."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

from harness import (
    ROWS_WRITTEN,
    BENCH, CLOCK_TICKS, SERVICE_CPU, CpuSampler, PhaseResult, RowPoller, http_request, metric_value,
    ratio, count_embedded_rows, run_json_child, run_wrk, start_clickpulse, status_kib, thread_ticks,
)
from phases import BASELINE_ROWS_PER_INSERT, CLICKPULSE_ROWS_PER_INSERT, Run, StoreAlone



@dataclass
class RssPart:
    what: str
    kib: int


def rss_breakdown(pid: int) -> tuple[list[RssPart], list[RssPart]]:
    """The resident set of `pid` summed by kind of mapping, largest first, and the largest
    shared objects other than chDB's."""
    exe = os.path.realpath(f"/proc/{pid}/exe")
    parts: dict[str, int] = {}
    other_objects: dict[str, int] = {}
    path = perms = ""
    with open(f"/proc/{pid}/smaps") as smaps:
        for line in smaps:
            first = line.split(None, 1)[0]
            if "-" in first and not first.endswith(":"):  # a mapping's header: range perms offset dev inode [path]
                fields = line.split(None, 5)
                perms = fields[1]
                path = fields[5].strip() if len(fields) > 5 else ""
                continue
            if first != "Rss:":
                continue
            kib = int(line.split()[1])
            name = os.path.basename(path)
            if name.startswith(("_chdb", "libchdb")) and ".so" in name:
                what = f"chDB library ({name}) " + ("text (r-x)" if "x" in perms else "data (r--, rw-)")
            elif path in ("", "[heap]") or path.startswith("[anon"):
                what = "[heap] + anonymous (Python objects, chDB's allocator, thread stacks)"
            elif path == exe or name.startswith("libpython"):
                what = f"python ({name})"
            elif ".so" in name:
                what = "other .so files"
                other_objects[name] = other_objects.get(name, 0) + kib
            elif path.startswith("["):
                what = "[stack], [vdso], [vvar]"
            else:
                what = "other mapped files"
            parts[what] = parts.get(what, 0) + kib
    ranked = sorted((RssPart(what, kib) for what, kib in parts.items()), key=lambda part: -part.kib)
    objects = sorted((RssPart(name, kib) for name, kib in other_objects.items()), key=lambda part: -part.kib)
    return ranked, objects[:5]


@dataclass
class Embedded:
    phase: PhaseResult
    landed_rows: int
    landed_seconds: float
    rows_via_query: int | None
    rows_after_exit: int | None
    peak_rss_kib: int
    rss_kib: int
    rss_parts: list[RssPart]
    rss_objects: list[RssPart]
    main_thread_seconds: float  # clickpulse's event loop: HTTP, decoding, encoding
    other_threads_seconds: float  # chDB's threads and the executor thread that calls it
    top_threads: list[tuple[str, float]]
    exit_status: int | None
    alones: list[StoreAlone] = field(default_factory=list)  # chDB alone before and after (g)
    reference: StoreAlone | None = None  # chDB alone in BATCH_SIZE-row inserts, not the baseline
    chdb_version: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def landed_rate(self) -> float:
        return ratio(self.landed_rows, self.landed_seconds)


def count_after_exit(run: Run, data_dir) -> int | None:
    count, error = count_embedded_rows(data_dir)
    if count is None:
        run.anomalies.append(f"`python -m clickpulse query` after the embedded run failed: {error}")
    return count


def chdb_alone(run: Run, label: str, rows_per_insert: int = BASELINE_ROWS_PER_INSERT) -> StoreAlone:
    """chDB alone, in a process of its own on the service CPU, in a fresh directory."""
    args = run.args
    print(f"bench: chDB alone, {label} (g): {args.baseline_rows:,} rows in {rows_per_insert:,}-row inserts, "
          f"in a process of its own on CPU {SERVICE_CPU}", flush=True)
    sampler = CpuSampler({}).start()
    try:
        result = run_json_child(
            ["taskset", "-c", SERVICE_CPU, sys.executable, str(BENCH / "baseline.py"), "chdb",
             "--path", str(run.workdir / f"chdb-alone-{label}"), "--body", str(run.bodies.batch),
             "--rows", str(args.baseline_rows), "--rows-per-insert", str(rows_per_insert)],
            run.workdir / f"chdb-alone-{label}.log", timeout=900,
        )
    finally:
        sampler.stop()
    if result["count"] != result["rows"]:
        run.anomalies.append(f"chDB alone, {label} (g): count() {result['count']} for {result['rows']} rows inserted")
    return StoreAlone(result, {"cpu0": sampler.share("cpu0", result["started_at"], result["ended_at"])}, label)


def run_embedded(run: Run) -> Embedded:
    args = run.args
    before = chdb_alone(run, "before")
    data_dir = run.workdir / "embedded-data"
    service = start_clickpulse(
        "clickpulse (embedded chDB)", None, run.workdir, "clickpulse-embedded.stderr.log", cpu=SERVICE_CPU,
        DATA_DIR=str(data_dir), ACK_MODE="memory",
    )
    run.processes.append(service.process)
    run.services.append(service)
    service.wait_ready(timeout=180)
    print(f"bench: {service.label} ready on {service.url} (pid {service.pid}, DATA_DIR {data_dir})", flush=True)

    # /metrics says when ClickHouse confirmed the rows; polled once a second while wrk shares
    # the core, every 0.1 s once it has stopped sending (then only the last insert runs).
    poller = RowPoller(lambda: metric_value(service.url, ROWS_WRITTEN), interval=0.1)
    poller.slow_until(time.monotonic() + args.batch_duration, 1.0)
    threads_before = thread_ticks(service.pid)
    poller.start()
    phase = run_wrk(
        f"(g) embedded clickpulse, /events, {args.batch_events}-event batches, wrk on CPU {SERVICE_CPU} too",
        f"{service.url}/events", run.bodies.batch, args.batch_connections, args.batch_duration, args.batch_events,
        service.pid, wrk_cpu=SERVICE_CPU,
    )
    run.phases.append(phase)
    acknowledged = phase.accepted_events
    final = poller.wait_reaching(acknowledged, timeout=60.0)
    landed_at = poller.first_time_at(final)
    poller.stop()
    if poller.errors:
        run.anomalies.append(f"{len(poller.errors)} /metrics polls of the embedded clickpulse failed: {poller.errors[0]}")
    threads_after = thread_ticks(service.pid)
    main_ticks = other_ticks = 0
    by_name: dict[str, int] = {}
    for tid, (name, ticks) in threads_after.items():
        spent = ticks - threads_before.get(tid, (name, 0))[1]
        if tid == service.pid:
            main_ticks += spent
        else:
            other_ticks += spent
            by_name[name] = by_name.get(name, 0) + spent
    rss_parts, rss_objects = rss_breakdown(service.pid)
    rss_kib = status_kib(service.pid, "VmRSS")
    status, body = http_request(
        f"{service.url}/query?format=TSV", b"SELECT count() FROM default.events", timeout=30.0,
        headers={"Content-Type": "text/plain"},
    )
    rows_via_query = int(body.strip()) if status == 200 else None
    if status != 200:
        run.anomalies.append(f"POST /query of the embedded clickpulse answered {status}: {body[:200]!r}")
    exit_status = service.stop(run.anomalies)
    rows_after_exit = count_after_exit(run, data_dir)
    run.check_rows("rows vs 2xx-acked events, embedded (g)", rows_after_exit if rows_after_exit is not None else -1,
                   acknowledged)
    if rows_via_query is not None and rows_via_query != final:
        run.anomalies.append(f"embedded: /query counted {rows_via_query} rows, /metrics {ROWS_WRITTEN} said {final}")
    embedded = Embedded(
        phase, final, landed_at - phase.values["first_send"], rows_via_query, rows_after_exit, service.peak_rss_kib,
        rss_kib, rss_parts, rss_objects, main_ticks / CLOCK_TICKS, other_ticks / CLOCK_TICKS,
        sorted(((name, ticks / CLOCK_TICKS) for name, ticks in by_name.items()), key=lambda item: -item[1])[:4],
        exit_status,
    )

    embedded.alones = [before, chdb_alone(run, "after")]
    if CLICKPULSE_ROWS_PER_INSERT != BASELINE_ROWS_PER_INSERT:
        embedded.reference = chdb_alone(run, "batch-size", CLICKPULSE_ROWS_PER_INSERT)
    return embedded
