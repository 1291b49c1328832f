"""The phases against a ClickHouse server (tests/servers.py): the interleaved single-event rounds
(a), (b), (e), (d); the batch phases (f) /v1/batch and (c) /events with the floor and the landed
rate; ClickHouse alone ingesting the same rows."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import floor
from bodies import Bodies
from harness import (
    BENCH, LOAD_CPU, OTHERS_CPU_WARNING, ROOT, SERVICE_CPU, STOP_SECONDS, TABLE, Clickpulse, CpuSampler, PhaseResult, RowPoller, child_env,
    ROWS_WRITTEN, count_rows, filesystem_of, free_port, http_status, metric_value, ratio, run_json_child, run_wrk,
    start_clickpulse, tail, settle_merges, wait_for_rows, wait_until,
)
from clickpulse.config import Config
from clickpulse.schema import capabilities_for
from tests.servers import ClickHouseServer
from tests.support import stop_process

# Phase (e): an ingest key, CORS and enrichment, as a browser page of a shop would send.
KEY_NAME = "bench"
KEY_SECRET = "sk_bench_0123456789abcdef"
ORIGIN = "https://shop.example"
USER_AGENT = "Mozilla/5.0 (X11; Linux x86_64; rv:126.0) Gecko/20100101 Firefox/126.0"
EDGE_HEADERS = {"Authorization": f"Bearer {KEY_SECRET}", "Origin": ORIGIN, "User-Agent": USER_AGENT}


@dataclass
class Run:
    """What one `python bench/run.py` shares between its parts."""

    args: argparse.Namespace
    workdir: Path
    bodies: Bodies
    anomalies: list[str] = field(default_factory=list)
    processes: list[subprocess.Popen] = field(default_factory=list)  # stopped at the end, whatever happens
    services: list[Clickpulse] = field(default_factory=list)  # their exit status and stderr are checked
    server: ClickHouseServer | None = None
    clickhouse_version: str = ""
    phases: list[PhaseResult] = field(default_factory=list)  # every wrk run, for the per-phase table
    rows_checks: list[tuple[str, int, int]] = field(default_factory=list)  # (what, rows, acknowledged)

    def start(self, label: str, log_name: str, **settings: str) -> Clickpulse:
        service = start_clickpulse(label, self.server, self.workdir, log_name, **settings)
        self.processes.append(service.process)
        self.services.append(service)
        return service

    def check_rows(self, what: str, rows: int, acknowledged: int) -> None:
        self.rows_checks.append((what, rows, acknowledged))

    @property
    def rows_ok(self) -> bool:
        return all(rows == acknowledged for _, rows, acknowledged in self.rows_checks)


# -- (a), (b), (e), (d) -------------------------------------------------------------------------


@dataclass
class Round:
    number: int
    a: PhaseResult  # bare handler
    b: PhaseResult  # clickpulse, memory acks
    e: PhaseResult  # clickpulse, memory acks, ingest key + CORS + enrichment
    d: PhaseResult  # clickpulse, disk acks

    @property
    def b_over_a(self) -> float:
        return ratio(self.b.requests_per_second, self.a.requests_per_second)

    @property
    def e_over_a(self) -> float:
        return ratio(self.e.requests_per_second, self.a.requests_per_second)

    @property
    def d_over_b(self) -> float:
        return ratio(self.d.requests_per_second, self.b.requests_per_second)

    @property
    def cpu_b_over_a(self) -> float:
        return ratio(self.b.cpu_us_per_request, self.a.cpu_us_per_request)

    @property
    def cpu_e_over_a(self) -> float:
        return ratio(self.e.cpu_us_per_request, self.a.cpu_us_per_request)

    @property
    def cpu_e_over_b(self) -> float:
        return ratio(self.e.cpu_us_per_request, self.b.cpu_us_per_request)

    @property
    def cpu_d_over_b(self) -> float:
        return ratio(self.d.cpu_us_per_request, self.b.cpu_us_per_request)


@dataclass
class Single:
    rounds: list[Round]
    spool_filesystem: str
    memory_acknowledged: int  # events (b) acknowledged, all rounds
    peak_rss_kib: dict[str, int]


def start_bare_handler(run: Run) -> tuple[subprocess.Popen, str, Path]:
    port = free_port()
    log = run.workdir / "bare_handler.stderr.log"
    with open(log, "wb") as stderr:
        bare = subprocess.Popen(
            ["taskset", "-c", SERVICE_CPU, sys.executable, str(BENCH / "bare_handler.py"), str(port)],
            env=child_env(), cwd=ROOT, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr,
        )
    run.processes.append(bare)
    return bare, f"http://127.0.0.1:{port}", log


def start_memory(run: Run) -> Clickpulse:
    return run.start("clickpulse (memory acks)", "clickpulse-memory.stderr.log", ACK_MODE="memory")


def run_single(run: Run, memory: Clickpulse) -> Single:
    """Starts the bare handler, the keyed and the disk-ack clickpulse beside `memory`, runs the
    rounds, then stops all but `memory` and checks their rows."""
    args = run.args
    spool_dir = run.workdir / "spool"
    keys = run.workdir / "keys.toml"
    keys.write_text(f'[[keys]]\nname = "{KEY_NAME}"\nsecret = "{KEY_SECRET}"\nkind = "server"\n')
    keyed = run.start(
        "clickpulse (key, CORS, enrichment)", "clickpulse-keyed.stderr.log", ACK_MODE="memory",
        INGEST_KEYS_FILE=str(keys), CORS_ORIGINS=ORIGIN, ENRICH_IP="true",
    )
    disk = run.start(
        "clickpulse (disk acks)", "clickpulse-disk.stderr.log", SPOOL_DIR=str(spool_dir), ACK_MODE="disk",
    )
    bare, bare_url, bare_log = start_bare_handler(run)
    for service in (memory, keyed, disk):
        service.wait_ready()
        print(f"bench: {service.label} ready on {service.url} (pid {service.pid}, database {service.database})", flush=True)
    probe = run.bodies.single.read_bytes()
    wait_until(lambda: http_status(f"{bare_url}/events", probe) == 202, bare, "bare handler", bare_log)
    print(f"bench: bare handler ready on {bare_url} (pid {bare.pid})", flush=True)
    status = http_status(f"{keyed.url}/events", probe, headers=EDGE_HEADERS)
    if status != 202:
        raise RuntimeError(f"the keyed clickpulse answered {status} to a POST with its key, Origin and User-Agent")
    spool_filesystem = filesystem_of(spool_dir if spool_dir.exists() else run.workdir)

    single = run.bodies.single
    rounds: list[Round] = []
    for number in range(1, args.rounds + 1):
        print(f"bench: round {number} of {args.rounds}", flush=True)
        a = run_wrk("(a) bare handler", f"{bare_url}/events", single, args.connections, args.duration, 1, bare.pid, number)
        b = run_wrk(
            "(b) clickpulse, memory acks", f"{memory.url}/events", single, args.connections, args.duration, 1,
            memory.pid, number,
        )
        e = run_wrk(
            "(e) clickpulse, key + CORS + enrichment", f"{keyed.url}/events", single, args.connections,
            args.duration, 1, keyed.pid, number, headers=EDGE_HEADERS,
        )
        d = run_wrk(
            "(d) clickpulse, disk acks", f"{disk.url}/events", single, args.connections, args.duration, 1,
            disk.pid, number,
        )
        rounds.append(Round(number, a, b, e, d))
        run.phases.extend((a, b, e, d))

    bare_exit = stop_process(bare, timeout=STOP_SECONDS)
    bare_stderr = bare_log.read_text(errors="replace").strip()
    if bare_exit != 0 or bare_stderr:
        run.anomalies.append(f"bare handler exited with status {bare_exit}; its stderr:\n{tail(bare_log)}")
    # Done with them: stopped now, so that they no longer sit on CPU 0 during what follows.
    assert run.server is not None
    keyed_acknowledged = 1 + sum(r.e.accepted_events for r in rounds)  # 1: the probe above
    disk_acknowledged = sum(r.d.accepted_events for r in rounds)
    keyed.stop(run.anomalies)
    disk.stop(run.anomalies)
    run.check_rows("rows vs 2xx-acked events, key + CORS + enrichment (e)",
                   wait_for_rows(run.server, keyed.database, keyed_acknowledged, 30.0), keyed_acknowledged)
    keyed_rows = run.server.query(
        f"SELECT countIf(source_key = '{KEY_NAME}' AND context LIKE '%userAgent%') FROM {keyed.database}.{TABLE}"
    ).strip()
    if int(keyed_rows or 0) != keyed_acknowledged:
        run.anomalies.append(
            f"(e): only {keyed_rows} of {keyed_acknowledged} rows carry source_key {KEY_NAME!r} and a userAgent context"
        )
    run.check_rows("rows vs 2xx-acked events, disk acks (d)",
                   wait_for_rows(run.server, disk.database, disk_acknowledged, 30.0), disk_acknowledged)
    return Single(
        rounds, spool_filesystem, sum(r.b.accepted_events for r in rounds),
        {"key + CORS + enrichment": keyed.peak_rss_kib, "disk acks": disk.peak_rss_kib},
    )


# -- (f), (c), the floor, landed --------------------------------------------------------------------


@dataclass
class Batches:
    floors: floor.Floors | None
    segment: PhaseResult | None  # (f) /v1/batch
    events: PhaseResult  # (c) /events
    landed_rows: int
    landed_seconds: float
    merge_wait_seconds: float
    peak_rss_kib: int
    # CPU shares over (c)'s landed window, first request → last row: "cpu0", "cpu1" (busy, by
    # anyone), "clickhouse", "clickpulse"
    landed_shares: dict[str, float] = field(default_factory=dict)

    @property
    def landed_rate(self) -> float:
        return ratio(self.landed_rows, self.landed_seconds)

    @property
    def last_row_after_last_answer(self) -> float:
        return self.events.values["first_send"] + self.landed_seconds - self.events.values["last_response"]


def run_batches(
    run: Run, memory: Clickpulse, acknowledged_before: int, with_segment: bool, before_c: Callable[[], None] | None = None,
) -> Batches:
    """(f) then (c) on the memory-ack clickpulse, which is SIGTERMed after (c); every row checked.
    `before_c` runs just before (c) (ClickHouse alone, the first time)."""
    args = run.args
    server = run.server
    assert server is not None
    watched = {"clickhouse": server.process.pid}
    floors = None
    acknowledged = acknowledged_before
    rows_now = wait_for_rows(server, memory.database, acknowledged, 30.0)
    if rows_now != acknowledged:
        run.anomalies.append(f"before the batches ClickHouse held {rows_now} rows for {acknowledged} events acknowledged")
    segment = None
    if with_segment:
        floors = floor.measure(run.bodies.batch.read_bytes(), run.bodies.segment.read_bytes(), SERVICE_CPU)
        print(
            f"bench: floor on CPU {SERVICE_CPU}: plain msgspec /events {floors.events_us:.2f} us/event, /v1/batch "
            f"{floors.segment_us:.2f} us/event; clickpulse's code in-process: /events {floors.clickpulse_events_us:.2f}, "
            f"/v1/batch {floors.clickpulse_segment_us:.2f} us/event",
            flush=True,
        )
        if floors.others_share > OTHERS_CPU_WARNING:
            run.anomalies.append(
                f"the floor was measured while other processes used {floors.others_share:.0%} of CPU {SERVICE_CPU}: "
                "it is overstated"
            )
        settle_merges(server)
        segment = run_wrk(
            f"(f) clickpulse, /v1/batch, {args.batch_events}-message batches", f"{memory.url}/v1/batch",
            run.bodies.segment, args.batch_connections, args.batch_duration, args.batch_events, memory.pid,
            watched=watched,
        )
        run.phases.append(segment)
        acknowledged += segment.accepted_events
        rows_now = wait_for_rows(server, memory.database, acknowledged, 30.0)
    if before_c is not None:
        before_c()
    merge_wait = settle_merges(server)
    sampler = CpuSampler({"clickhouse": server.process.pid, "clickpulse": memory.pid}).start()
    # The clock of "the last row" is clickpulse's own count of rows ClickHouse confirmed
    # (clickhouse_rows_written_total), not count(): on 18.16 count() reads a column of the whole
    # table, so polling it cost ClickHouse a share of its one CPU that grew with the table. The
    # counter is polled every 0.5 s while wrk sends and every 50 ms after; count() confirms below.
    written_before = metric_value(memory.url, ROWS_WRITTEN) or 0.0
    poller = RowPoller(lambda: metric_value(memory.url, ROWS_WRITTEN))
    poller.slow_until(time.monotonic() + args.batch_duration, 0.5)
    poller.start()
    events = run_wrk(
        f"(c) clickpulse, /events, {args.batch_events}-event batches", f"{memory.url}/events", run.bodies.batch,
        args.batch_connections, args.batch_duration, args.batch_events, memory.pid, watched=watched,
    )
    run.phases.append(events)
    acknowledged += events.accepted_events
    target = int(written_before) + events.accepted_events
    written = poller.wait_reaching(target, timeout=60.0)
    landed_at = poller.first_time_at(written) if written >= target else time.monotonic()
    poller.stop()
    if written < target:
        run.anomalies.append(f"(c): clickpulse reported {written - int(written_before):,} of {events.accepted_events:,} rows written within 60 s")
    memory.stop(run.anomalies)
    sampler.stop()
    first_send = events.values["first_send"]
    shares = {label: sampler.share(label, first_send, landed_at) for label in ("cpu0", "cpu1", "clickhouse", "clickpulse")}
    if poller.errors:
        run.anomalies.append(f"{len(poller.errors)} /metrics polls failed, first: {poller.errors[0]}")
    rows = count_rows(server, memory.database)
    ran = ("(b)+" if acknowledged_before else "") + ("(f)+" if segment is not None else "") + "(c)"
    run.check_rows(f"rows vs 2xx-acked events, memory acks {ran}", rows, acknowledged)
    return Batches(
        floors, segment, events, landed_rows=written - int(written_before),
        landed_seconds=landed_at - first_send, merge_wait_seconds=merge_wait, peak_rss_kib=memory.peak_rss_kib,
        landed_shares=shares,
    )


@dataclass
class StoreAlone:
    """ClickHouse (or chDB) alone ingesting the rows clickpulse would send (bench/baseline.py)."""

    result: dict
    # CPU shares over the first insert → last answer: "cpu0", "cpu1" (busy, by anyone), "clickhouse"
    shares: dict[str, float] = field(default_factory=dict)
    label: str = ""  # "before" or "after" the phase it is the baseline of

    @property
    def client_share(self) -> float:
        """bench/baseline.py's own CPU time ÷ the insert window."""
        seconds = float(self.result["seconds"])
        used = self.result.get("client_cpu_seconds", self.result.get("cpu_seconds", 0.0))
        return float(used) / seconds if seconds else 0.0

    @property
    def rate(self) -> float:
        return float(self.result["rows_per_second"])

    @property
    def clickhouse_us_per_row(self) -> float:
        """The ClickHouse server's CPU time per row inserted (the server baseline only)."""
        return self.shares.get("clickhouse", 0.0) * float(self.result["seconds"]) * 1e6 / int(self.result["rows"])


BASELINE_ROWS_PER_INSERT = 10_000  # the baseline: 10k-row JSONEachRow inserts
CLICKPULSE_ROWS_PER_INSERT = Config().batch_size  # clickpulse's default BATCH_SIZE: a reference beside it


def run_clickhouse_alone(
    run: Run, like_database: str, label: str, rows_per_insert: int = BASELINE_ROWS_PER_INSERT,
) -> StoreAlone:
    """The same rows as `rows_per_insert`-row JSONEachRow inserts from one client pinned to the
    load CPU, into a fresh table `AS` clickpulse's. Run before and after (c) in 10k-row inserts:
    the faster is the baseline; once in BATCH_SIZE-row inserts, as a reference."""
    server = run.server
    assert server is not None
    database = f"bench_clickhouse_alone_{label}"
    server.query(f"CREATE DATABASE IF NOT EXISTS {database}")
    # With the settings clickpulse creates its table with (LowCardinality needs an opt-in before 19.x).
    settings = {name: str(value) for name, value in capabilities_for(run.clickhouse_version).create_settings.items()}
    server.query(f"CREATE TABLE {database}.{TABLE} AS {like_database}.{TABLE}", **settings)
    settle_merges(server)
    print(f"bench: ClickHouse alone, {label} (c): {run.args.baseline_rows:,} rows in {rows_per_insert:,}-row inserts "
          f"into {database}.{TABLE} from CPU {LOAD_CPU}", flush=True)
    command = [
        "taskset", "-c", LOAD_CPU, sys.executable, str(BENCH / "baseline.py"), "clickhouse",
        "--url", server.url, "--database", database, "--body", str(run.bodies.batch),
        "--rows", str(run.args.baseline_rows), "--rows-per-insert", str(rows_per_insert),
    ]
    sampler = CpuSampler({"clickhouse": server.process.pid}).start()
    try:
        result = run_json_child(command, run.workdir / f"clickhouse-alone-{label}.log", timeout=600)
    finally:
        sampler.stop()
    window = (result["started_at"], result["ended_at"])
    alone = StoreAlone(result, {cpu: sampler.share(cpu, *window) for cpu in ("cpu0", "cpu1", "clickhouse")}, label)
    if result["count"] != result["rows"]:
        run.anomalies.append(f"ClickHouse alone: count() {result['count']} for {result['rows']} rows inserted")
    return alone
