"""Throughput benchmark: clickpulse against a bare aiohttp handler, disk acks, and batches.

    python bench/run.py [--rounds 3] [--duration 5] [--connections 64]

It starts its own ClickHouse (tests/servers.py) in a temp dir; two `python -m clickpulse`
processes (one acknowledging from memory, one with SPOOL_DIR in the temp dir and ACK_MODE=disk,
each with its own database) and bench/bare_handler.py, all pinned to CPU 0; and drives them,
one at a time, with wrk pinned to CPU 1. Single-event POSTs, interleaved in every round:

    (a) to the bare handler
    (b) to clickpulse, memory acks
    (d) to clickpulse, disk acks (202 once the event is fsynced in the spool)

then, once after the rounds:

    (c) 1000-event JSON-array POSTs to the memory-ack clickpulse

The figures to hold against the targets are the medians of the per-round ratios (b)/(a) and
(d)/(b): a ratio of two phases run seconds apart is far steadier on a noisy machine than one of
two phases run a minute apart. Finally it SIGTERMs both clickpulse processes and checks that
every 2xx-acknowledged event is a row in their databases. See bench/README.md for what each
figure means. Exit status 1 when rows and acknowledgements differ, a clickpulse process exits
non-zero or something failed; the targets are reported, not enforced.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
LUA_SCRIPT = BENCH / "post_event.lua"
sys.path.insert(0, str(ROOT))

from tests.servers import ClickHouseServer, find_clickhouse_server, start_clickhouse  # noqa: E402
from tests.support import clean_environment, free_port, stop_process  # noqa: E402

SERVICE_CPU = "0"
LOAD_CPU = "1"
TABLE = "events"
DRAIN_SECONDS = 3.0  # wrk runs this much longer than it sends, so every request sent is answered
POLL_SECONDS = 0.05  # how often count() is polled while batches land
OTHERS_CPU_WARNING = 0.05  # share of the service CPU used by other processes that makes a run noisy
TARGET_SINGLE_RATIO = 0.8  # median (b)/(a) req/s
TARGET_DISK_RATIO = 0.7  # median (d)/(b) req/s
TARGET_LANDED_EVENTS_PER_SECOND = 250_000

STOP_SECONDS = 30.0  # a SIGTERMed process gets this long to drain before SIGKILL


# -- event bodies -------------------------------------------------------------------------------

EVENT_TYPES = ("page_view", "page_view", "page_view", "click", "click", "search", "add_to_cart", "purchase", "signup")
SOURCES = ("web", "web", "ios", "android", "backend")
PATHS = ("/", "/pricing", "/docs/getting-started", "/blog/2024/05/batching", "/checkout", "/account/settings")
REFERRERS = ("https://www.google.com/", "https://news.ycombinator.com/", "", "https://t.co/x1y2z3")
BROWSERS = ("Firefox", "Chrome", "Safari", "Edge")


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


def write_bodies(directory: Path, batch_events: int) -> tuple[Path, Path]:
    rng = random.Random(20240514)
    now = datetime.now(timezone.utc)
    single = directory / "single_event.json"
    single.write_text(json.dumps(make_event(rng, now), separators=(",", ":")))
    batch = directory / f"batch_{batch_events}.json"
    batch.write_text(json.dumps([make_event(rng, now) for _ in range(batch_events)], separators=(",", ":")))
    return single, batch


# -- processes ------------------------------------------------------------------------------------


def child_env(**extra: str) -> dict[str, str]:
    # Nothing that configures clickpulse may leak in from the caller's environment.
    env = clean_environment(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def tail(path: Path, lines: int = 30) -> str:
    if not path.exists():
        return "(no file)"
    text = path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:]) if text else "(empty)"


def http_status(url: str, data: bytes | None = None, timeout: float = 2.0) -> int | None:
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


def wait_until(check, process: subprocess.Popen, what: str, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with status {process.returncode}; its log:\n{tail(log)}")
        if check():
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what} not ready within {timeout:.0f}s; its log:\n{tail(log)}")


def read_proc_status(pid: int) -> dict[str, str]:
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class CpuSnapshot:
    at: float
    process_ticks: int  # utime + stime of the service process, all threads
    cpu_busy_ticks: int  # the service CPU's busy time, whoever used it
    cpu_total_ticks: int
    cpu_interrupt_ticks: int  # the service CPU's irq + softirq time (network receive, disk completions)


def cpu_snapshot(pid: int) -> CpuSnapshot:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    process_ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    busy = total = interrupts = 0
    with open("/proc/stat") as stat:
        for line in stat:
            if line.startswith(f"cpu{SERVICE_CPU} "):
                values = [int(value) for value in line.split()[1:9]]
                total = sum(values)
                busy = total - values[3] - values[4]  # minus idle and iowait
                interrupts = values[5] + values[6]  # irq, softirq
                break
    return CpuSnapshot(time.monotonic(), process_ticks, busy, total, interrupts)


@dataclass
class CpuUse:
    process_seconds: float  # CPU time of the service process
    others_seconds: float  # CPU time of everything else on the service CPU (other processes, interrupts)
    elapsed_seconds: float  # wall time the two snapshots span (the whole wrk run, drain tail included)
    interrupt_seconds: float  # irq + softirq time on the service CPU, part of others_seconds

    @classmethod
    def between(cls, before: CpuSnapshot, after: CpuSnapshot) -> CpuUse:
        process = after.process_ticks - before.process_ticks
        others = max(after.cpu_busy_ticks - before.cpu_busy_ticks - process, 0)
        interrupts = min(after.cpu_interrupt_ticks - before.cpu_interrupt_ticks, others)
        return cls(process / CLOCK_TICKS, others / CLOCK_TICKS, after.at - before.at, interrupts / CLOCK_TICKS)


def count_rows(server: ClickHouseServer, database: str) -> int:
    return int(server.query(f"SELECT count() FROM {database}.{TABLE}").strip())


# -- wrk ------------------------------------------------------------------------------------------


@dataclass
class PhaseResult:
    name: str
    connections: int
    events_per_request: int
    values: dict[str, float]
    statuses: dict[int, int]
    output: str
    cpu: CpuUse | None = None
    round: int | None = None  # None for (c), which runs once after the rounds

    @property
    def window(self) -> float:
        """First request sent to last answer received, in seconds."""
        return self.values["last_response"] - self.values["first_send"]

    @property
    def ok(self) -> int:
        return int(self.values["ok2xx"])

    @property
    def non2xx(self) -> int:
        return int(self.values["non2xx"])

    @property
    def accepted_events(self) -> int:
        return int(self.values["accepted_events"])

    @property
    def requests_per_second(self) -> float:
        return self.ok / self.window if self.window > 0 else 0.0

    @property
    def events_per_second(self) -> float:
        return self.accepted_events / self.window if self.window > 0 else 0.0

    @property
    def cpu_us_per_request(self) -> float:
        """CPU time of the server process per 2xx answer, in microseconds."""
        return self.cpu.process_seconds * 1e6 / self.ok if self.cpu and self.ok else 0.0

    @property
    def cpu_us_per_event(self) -> float:
        """CPU time of the server process per acknowledged event, in microseconds."""
        return self.cpu.process_seconds * 1e6 / self.accepted_events if self.cpu and self.accepted_events else 0.0

    @property
    def others_share(self) -> float:
        """Share of the service CPU that other processes took while wrk ran (the same span the CPU time covers)."""
        return self.cpu.others_seconds / self.cpu.elapsed_seconds if self.cpu and self.cpu.elapsed_seconds > 0 else 0.0

    @property
    def interrupt_share(self) -> float:
        """The irq + softirq part of others_share."""
        return self.cpu.interrupt_seconds / self.cpu.elapsed_seconds if self.cpu and self.cpu.elapsed_seconds > 0 else 0.0

    @property
    def socket_errors(self) -> int:
        return sum(int(self.values[f"errors_{kind}"]) for kind in ("connect", "read", "write", "timeout"))

    @property
    def unanswered(self) -> int:
        return int(self.values["sent"] - self.values["responses"])


def run_wrk(
    name: str, url: str, body: Path, connections: int, seconds: float, events_per_request: int, service_pid: int,
    round_number: int | None = None,
) -> PhaseResult:
    wrk_seconds = math.ceil(seconds + DRAIN_SECONDS)  # wrk's -d takes whole seconds only
    command = [
        "taskset", "-c", LOAD_CPU, "wrk", "-t1", f"-c{connections}", f"-d{wrk_seconds}s",
        "--timeout", "10s", "--latency", "-s", str(LUA_SCRIPT), url,
    ]
    env = dict(os.environ, BENCH_BODY_FILE=str(body), BENCH_SECONDS=f"{seconds:g}")
    print(f"  {name}: {' '.join(command)}", flush=True)
    cpu_before = cpu_snapshot(service_pid)
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=wrk_seconds + 60)
    cpu_after = cpu_snapshot(service_pid)
    output = completed.stdout + completed.stderr
    if completed.returncode != 0:
        raise RuntimeError(f"wrk failed with status {completed.returncode}:\n{output}")
    line = next((line for line in completed.stdout.splitlines() if line.startswith("BENCH_RESULT ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no BENCH_RESULT line:\n{output}")
    values: dict[str, float] = {}
    statuses: dict[int, int] = {}
    for item in line.split()[1:]:
        key, _, value = item.partition("=")
        if key.startswith("status_"):
            statuses[int(key.removeprefix("status_"))] = int(value)
        else:
            values[key] = float(value)
    return PhaseResult(
        name, connections, events_per_request, values, dict(sorted(statuses.items())), output,
        CpuUse.between(cpu_before, cpu_after), round_number,
    )


# -- the ClickHouse row poller --------------------------------------------------------------------


@dataclass
class RowPoller:
    """Polls count() in a thread and remembers (time, count) samples while batches land."""

    server: ClickHouseServer
    database: str
    samples: list[tuple[float, int]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="row-poller", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                count = count_rows(self.server, self.database)
            except Exception as error:  # noqa: BLE001 - reported at the end
                self.errors.append(str(error))
            else:
                self.samples.append((time.monotonic(), count))
            self._stop.wait(POLL_SECONDS)

    def wait_stable(self, stable_for: float, timeout: float) -> int:
        """Waits until count() has not changed for `stable_for` seconds; returns it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.samples:
                last_time, last_count = self.samples[-1]
                changed_at = self.first_time_at(last_count)
                if last_time - changed_at >= stable_for:
                    return last_count
            time.sleep(POLL_SECONDS)
        return self.samples[-1][1] if self.samples else -1

    def first_time_at(self, count: int) -> float:
        """When count() first showed `count` in the latest run of equal samples."""
        when = self.samples[-1][0]
        for sample_time, sample_count in reversed(self.samples):
            if sample_count != count:
                break
            when = sample_time
        return when

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


def wait_for_rows(server: ClickHouseServer, database: str, expected: int, timeout: float) -> int:
    """Polls count() until it reaches `expected` or `timeout` seconds pass; returns the last count."""
    deadline = time.monotonic() + timeout
    count = count_rows(server, database)
    while count < expected and time.monotonic() < deadline:
        time.sleep(0.1)
        count = count_rows(server, database)
    return count


# -- report ---------------------------------------------------------------------------------------


def fmt_int(value: float) -> str:
    return f"{value:,.0f}"


def fmt_ms(microseconds: float) -> str:
    return f"{microseconds / 1000:.2f} ms"


def print_table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    def line(cells: list[str]) -> str:
        return "  ".join(
            (str(cell).ljust(widths[i]) if i == 0 else str(cell).rjust(widths[i])) for i, cell in enumerate(cells)
        ).rstrip()
    print(line(header))
    print("  ".join("-" * width for width in widths))
    for row in rows:
        print(line(row))


def median_or_zero(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


# -- the machine and the source -------------------------------------------------------------------


def filesystem_of(path: Path) -> str:
    """'ext4 on /dev/vda' for the mount that holds `path` (fsync on tmpfs costs nothing)."""
    best: tuple[int, str] = (-1, "unknown")
    resolved = str(path.resolve())
    try:
        with open("/proc/self/mounts") as mounts:
            for line in mounts:
                device, mount_point, fs_type = line.split()[:3]
                mount_point = mount_point.replace("\\040", " ")
                inside = resolved == mount_point or resolved.startswith(mount_point.rstrip("/") + "/")
                if inside and len(mount_point) > best[0]:
                    best = (len(mount_point), f"{fs_type} on {device}")
    except OSError:
        pass
    return best[1]


def source_state() -> str:
    """The commit the benchmarked clickpulse/ comes from, and whether it has local changes."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "clickpulse"],
            capture_output=True, text=True, timeout=10,
        ).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    if not commit:
        return "unknown (not a git checkout)"
    if not changed:
        return f"commit {commit}, clickpulse/ unchanged"
    return f"commit {commit} + uncommitted changes in {len(changed)} file(s) under clickpulse/"


# -- main -----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds of (a), (b), (d) (default 3)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of load per phase (default 5)")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections for single events (default 64)")
    parser.add_argument("--batch-connections", type=int, default=8, help="wrk connections for batches (default 8)")
    parser.add_argument("--batch-events", type=int, default=1000, help="events per batch request (default 1000)")
    parser.add_argument(
        "--clickhouse-cpus", default=LOAD_CPU,
        help=f"CPU list ClickHouse is pinned to with taskset (default {LOAD_CPU}, the load side); 'any' to leave it unpinned",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, ClickHouse data) afterwards")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.duration <= 0:
        parser.error("--duration must be positive")
    return args


@dataclass
class Clickpulse:
    """One `python -m clickpulse` process under test."""

    label: str
    process: subprocess.Popen
    url: str
    database: str
    log: Path
    peak_rss_kib: int = 0
    exit_status: int | None = None

    def stop(self, anomalies: list[str]) -> int:
        """Reads the peak RSS, SIGTERMs the process and waits for it to drain and exit."""
        if self.process.poll() is None:
            self.peak_rss_kib = int(read_proc_status(self.process.pid)["VmHWM"].split()[0])
            self.process.send_signal(signal.SIGTERM)
        try:
            self.exit_status = self.process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            anomalies.append(f"{self.label} did not exit within 90 s of SIGTERM; killed")
            self.process.kill()
            self.exit_status = self.process.wait()
        return self.exit_status


def start_clickpulse(
    label: str, server: ClickHouseServer, workdir: Path, log_name: str, **extra: str
) -> Clickpulse:
    database = f"bench_{uuid.uuid4().hex[:10]}"
    port = free_port()
    log = workdir / log_name
    env = child_env(
        HTTP_HOST="127.0.0.1",
        HTTP_PORT=str(port),
        CLICKHOUSE_DSN=server.dsn(database),
        CLICKHOUSE_TABLE=TABLE,
        FLUSH_INTERVAL="1s",
        LOG_LEVEL="WARNING",
        **extra,
    )
    with open(log, "wb") as stderr:
        process = subprocess.Popen(
            ["taskset", "-c", SERVICE_CPU, sys.executable, "-m", "clickpulse"],
            env=env, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr,
        )
    return Clickpulse(label, process, f"http://127.0.0.1:{port}", database, log)


@dataclass
class Round:
    number: int
    a: PhaseResult  # bare handler
    b: PhaseResult  # clickpulse, memory acks
    d: PhaseResult  # clickpulse, disk acks

    @property
    def b_over_a(self) -> float:
        return ratio(self.b.requests_per_second, self.a.requests_per_second)

    @property
    def d_over_b(self) -> float:
        return ratio(self.d.requests_per_second, self.b.requests_per_second)

    @property
    def cpu_b_over_a(self) -> float:
        return ratio(self.b.cpu_us_per_request, self.a.cpu_us_per_request)

    @property
    def cpu_d_over_b(self) -> float:
        return ratio(self.d.cpu_us_per_request, self.b.cpu_us_per_request)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("wrk") is None or shutil.which("taskset") is None:
        print("bench: needs wrk and taskset on PATH", file=sys.stderr)
        return 2
    if not {0, 1} <= os.sched_getaffinity(0):
        print("bench: needs CPUs 0 and 1 (the services on 0, wrk on 1)", file=sys.stderr)
        return 2
    clickhouse_command = find_clickhouse_server()
    if clickhouse_command is None:
        print("bench: no clickhouse-server (install it or set CLICKHOUSE_SERVER_BIN)", file=sys.stderr)
        return 2
    if args.clickhouse_cpus != "any":
        clickhouse_command = ["taskset", "-c", args.clickhouse_cpus, *clickhouse_command]
    # This process only polls and waits; keep it off the CPU the services are measured on.
    os.sched_setaffinity(0, {int(LOAD_CPU)})

    workdir = Path(tempfile.mkdtemp(prefix="clickpulse-bench-"))
    single_body, batch_body = write_bodies(workdir, args.batch_events)
    spool_dir = workdir / "spool"
    processes: list[subprocess.Popen] = []
    server: ClickHouseServer | None = None
    anomalies: list[str] = []
    failed = True
    started = time.monotonic()
    try:
        print(f"bench: temp dir {workdir}", flush=True)
        source = source_state()
        print(f"bench: clickpulse source: {source}", flush=True)
        server = start_clickhouse(workdir / "clickhouse", clickhouse_command)
        clickhouse_version = server.query("SELECT version()").strip()
        print(f"bench: ClickHouse {clickhouse_version} on 127.0.0.1:{server.http_port}", flush=True)

        # Start all three services at once (they start in parallel), then wait for each.
        memory = start_clickpulse("clickpulse (memory acks)", server, workdir, "clickpulse-memory.stderr.log",
                                  ACK_MODE="memory")
        processes.append(memory.process)
        disk = start_clickpulse("clickpulse (disk acks)", server, workdir, "clickpulse-disk.stderr.log",
                                SPOOL_DIR=str(spool_dir), ACK_MODE="disk")
        processes.append(disk.process)
        bare_port = free_port()
        bare_log = workdir / "bare_handler.stderr.log"
        with open(bare_log, "wb") as stderr:
            bare = subprocess.Popen(
                ["taskset", "-c", SERVICE_CPU, sys.executable, str(BENCH / "bare_handler.py"), str(bare_port)],
                env=child_env(), cwd=ROOT, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr,
            )
        processes.append(bare)
        bare_url = f"http://127.0.0.1:{bare_port}"
        for service in (memory, disk):
            wait_until(
                lambda service=service: http_status(f"{service.url}/readyz") == 200,
                service.process, service.label, service.log,
            )
            print(
                f"bench: {service.label} ready on {service.url} (pid {service.process.pid}, "
                f"database {service.database})", flush=True,
            )
        probe = single_body.read_bytes()
        wait_until(lambda: http_status(f"{bare_url}/events", probe) == 202, bare, "bare handler", bare_log)
        print(f"bench: bare handler ready on {bare_url} (pid {bare.pid})", flush=True)
        spool_filesystem = filesystem_of(spool_dir if spool_dir.exists() else workdir)

        # -- (a), (b), (d) interleaved, one service under load at a time ---------------------------
        single_url = "/events"
        rounds: list[Round] = []
        for number in range(1, args.rounds + 1):
            print(f"bench: round {number} of {args.rounds}", flush=True)
            phase_a = run_wrk(
                "(a) bare handler", f"{bare_url}{single_url}", single_body, args.connections, args.duration, 1,
                bare.pid, number,
            )
            phase_b = run_wrk(
                "(b) clickpulse, memory acks", f"{memory.url}{single_url}", single_body, args.connections,
                args.duration, 1, memory.process.pid, number,
            )
            phase_d = run_wrk(
                "(d) clickpulse, disk acks", f"{disk.url}{single_url}", single_body, args.connections,
                args.duration, 1, disk.process.pid, number,
            )
            rounds.append(Round(number, phase_a, phase_b, phase_d))

        bare_exit = stop_process(bare, timeout=STOP_SECONDS)
        bare_stderr = bare_log.read_text(errors="replace").strip()
        if bare_exit != 0 or bare_stderr:
            anomalies.append(f"bare handler exited with status {bare_exit}; its stderr:\n{tail(bare_log)}")

        # The disk-ack process is done: stop it now, so that it is idle no longer on CPU 0 during (c).
        acknowledged_disk = sum(r.d.accepted_events for r in rounds)
        disk.stop(anomalies)
        rows_disk = wait_for_rows(server, disk.database, acknowledged_disk, timeout=30.0)
        rows_disk_ok = rows_disk == acknowledged_disk

        # -- (c) batches into the memory-ack process ----------------------------------------------
        acknowledged_b = sum(r.b.accepted_events for r in rounds)
        rows_before_c = wait_for_rows(server, memory.database, acknowledged_b, timeout=30.0)
        if rows_before_c != acknowledged_b:
            anomalies.append(
                f"after the rounds ClickHouse held {rows_before_c} rows for {acknowledged_b} events (b) acknowledged"
            )
        poller = RowPoller(server, memory.database)
        poller.start()
        phase_c = run_wrk(
            f"(c) clickpulse, {args.batch_events}-event batches", f"{memory.url}{single_url}", batch_body,
            args.batch_connections, args.duration, args.batch_events, memory.process.pid,
        )
        memory.stop(anomalies)
        final_rows = poller.wait_stable(stable_for=1.0, timeout=60.0)
        landed_at = poller.first_time_at(final_rows)
        poller.stop()
        if poller.errors:
            anomalies.append(f"{len(poller.errors)} count() polls failed, first: {poller.errors[0]}")
        rows_memory = count_rows(server, memory.database)

        landed_c = rows_memory - rows_before_c
        landed_window = landed_at - phase_c.values["first_send"]
        landed_rate = landed_c / landed_window if landed_window > 0 else 0.0
        acknowledged_memory = acknowledged_b + phase_c.accepted_events
        rows_memory_ok = rows_memory == acknowledged_memory
        c_cpu_us_per_event = phase_c.cpu_us_per_event
        c_capacity = 1e6 / c_cpu_us_per_event if c_cpu_us_per_event else 0.0

        median_b_over_a = median_or_zero([r.b_over_a for r in rounds])
        median_d_over_b = median_or_zero([r.d_over_b for r in rounds])
        median_cpu_b_over_a = median_or_zero([r.cpu_b_over_a for r in rounds])
        median_cpu_d_over_b = median_or_zero([r.cpu_d_over_b for r in rounds])

        all_phases = [phase for r in rounds for phase in (r.a, r.b, r.d)] + [phase_c]
        for phase in all_phases:
            where = phase.name if phase.round is None else f"round {phase.round} {phase.name}"
            if phase.non2xx:
                anomalies.append(f"{where}: {phase.non2xx} non-2xx responses, by status {phase.statuses}")
            if phase.socket_errors:
                anomalies.append(
                    f"{where}: wrk socket errors connect={phase.values['errors_connect']:.0f} "
                    f"read={phase.values['errors_read']:.0f} write={phase.values['errors_write']:.0f} "
                    f"timeout={phase.values['errors_timeout']:.0f}"
                )
            if phase.others_share > OTHERS_CPU_WARNING:
                anomalies.append(
                    f"{where}: other processes used {phase.others_share:.0%} of CPU {SERVICE_CPU} "
                    "(the machine was not quiet; req/s is understated, CPU us/req is the steadier figure)"
                )
            if phase.unanswered:
                anomalies.append(f"{where}: {phase.unanswered} requests sent but not answered before wrk ended")
        stderr_lines: list[tuple[Clickpulse, str]] = []
        for service in (memory, disk):
            if service.exit_status != 0:
                anomalies.append(f"{service.label} exited with status {service.exit_status} after SIGTERM")
            text = service.log.read_text(errors="replace").strip()
            if text:
                stderr_lines.append((service, text))
                anomalies.append(
                    f"{service.label} wrote {len(text.splitlines())} lines to stderr (LOG_LEVEL=WARNING)"
                )
        if spool_filesystem.startswith(("tmpfs", "ramfs")):
            anomalies.append(f"the spool is on {spool_filesystem}: fsync costs nothing there, so (d) flatters disk acks")

        # -- the report ----------------------------------------------------------------------------
        print()
        print(
            f"clickpulse benchmark: {args.rounds} rounds of (a), (b), (d), then (c); {args.duration:g} s of load per "
            f"phase; the services on CPU {SERVICE_CPU} (one under load at a time), wrk on CPU {LOAD_CPU}, ClickHouse "
            f"{clickhouse_version} on CPU {args.clickhouse_cpus}; BATCH_SIZE default, FLUSH_INTERVAL 1s; "
            f"(d)'s spool on {spool_filesystem}; clickpulse source: {source}"
        )
        print()
        print_table(
            [
                [
                    phase.name, "-" if phase.round is None else str(phase.round), str(phase.connections),
                    fmt_int(phase.ok), str(phase.non2xx), fmt_int(phase.requests_per_second),
                    fmt_ms(phase.values["p50_us"]), fmt_ms(phase.values["p99_us"]), fmt_int(phase.events_per_second),
                    f"{phase.cpu.process_seconds / phase.window:.0%}" if phase.window > 0 else "-",
                    f"{phase.cpu_us_per_request:.0f}", f"{phase.cpu_us_per_event:.1f}", f"{phase.others_share:.0%}",
                    f"{phase.interrupt_share:.0%}",
                ]
                for phase in all_phases
            ],
            [
                "phase", "round", "conns", "2xx", "non-2xx", "2xx req/s", "p50", "p99", "events/s acked",
                "server CPU", "CPU us/req", "CPU us/event", f"CPU {SERVICE_CPU} others", "of which irq",
            ],
        )
        print()
        print("per round (ratios of phases run back to back; the medians are the figures to compare):")
        print_table(
            [
                [
                    str(r.number), fmt_int(r.a.requests_per_second), fmt_int(r.b.requests_per_second),
                    fmt_int(r.d.requests_per_second), f"{r.b_over_a:.2f}", f"{r.d_over_b:.2f}",
                    f"{r.a.cpu_us_per_request:.0f}", f"{r.b.cpu_us_per_request:.0f}", f"{r.d.cpu_us_per_request:.0f}",
                    f"{r.cpu_b_over_a:.2f}", f"{r.cpu_d_over_b:.2f}",
                ]
                for r in rounds
            ]
            + [
                [
                    "median", fmt_int(median_or_zero([r.a.requests_per_second for r in rounds])),
                    fmt_int(median_or_zero([r.b.requests_per_second for r in rounds])),
                    fmt_int(median_or_zero([r.d.requests_per_second for r in rounds])),
                    f"{median_b_over_a:.2f}", f"{median_d_over_b:.2f}",
                    f"{median_or_zero([r.a.cpu_us_per_request for r in rounds]):.0f}",
                    f"{median_or_zero([r.b.cpu_us_per_request for r in rounds]):.0f}",
                    f"{median_or_zero([r.d.cpu_us_per_request for r in rounds]):.0f}",
                    f"{median_cpu_b_over_a:.2f}", f"{median_cpu_d_over_b:.2f}",
                ]
            ],
            [
                "round", "(a) req/s", "(b) req/s", "(d) req/s", "(b)/(a)", "(d)/(b)",
                "(a) CPU us/req", "(b) CPU us/req", "(d) CPU us/req", "CPU (b)/(a)", "CPU (d)/(b)",
            ],
        )
        a_rates = [r.a.requests_per_second for r in rounds]
        if len(rounds) > 1 and min(a_rates) > 0:
            print(
                f"(a) ranged from {fmt_int(min(a_rates))} to {fmt_int(max(a_rates))} req/s across rounds "
                f"({max(a_rates) / min(a_rates) - 1:.0%} apart): the machine's drift, which the per-round ratios cancel"
            )
        print()

        # What can explain a missed target comes first, and a verdict that is not met says why on
        # its own line, so that no "NOT MET" is read without its context.
        if anomalies:
            print("anomalies (read these before the verdicts below):")
            for anomaly in anomalies:
                print(f"  - {anomaly}")
            print()
        landed_context = (
            f"(c)'s landed rate is bounded by ClickHouse, which shares CPU {LOAD_CPU} with wrk; "
            f"clickpulse's own limit is the implied one-core capacity ({fmt_int(c_capacity)} events/s)"
        )
        print(f"note: {landed_context}.")
        print()

        def verdict(value: float, target: float, context: str = "") -> str:
            if value >= target:
                return "met"
            reasons = [context] if context else []
            if anomalies:
                reasons.append(f"{len(anomalies)} anomal{'y' if len(anomalies) == 1 else 'ies'} above")
            return "NOT MET" + (f" ({'; '.join(reasons)})" if reasons else "")

        def per_round(values: list[float]) -> str:
            return "per round " + ", ".join(f"{value:.2f}" for value in values)

        print_table(
            [
                [
                    f"(b)/(a) single-event req/s, median of {len(rounds)}", f"{median_b_over_a:.2f}",
                    f">= {TARGET_SINGLE_RATIO:.2f}",
                    verdict(median_b_over_a, TARGET_SINGLE_RATIO, per_round([r.b_over_a for r in rounds])),
                ],
                [
                    f"(d)/(b) disk-ack req/s, median of {len(rounds)}", f"{median_d_over_b:.2f}",
                    f">= {TARGET_DISK_RATIO:.2f}",
                    verdict(median_d_over_b, TARGET_DISK_RATIO, per_round([r.d_over_b for r in rounds])),
                ],
                [
                    f"CPU us/req (b)/(a), median of {len(rounds)}",
                    f"{median_cpu_b_over_a:.2f} (1/x = {ratio(1, median_cpu_b_over_a):.2f})", "", "",
                ],
                [
                    f"CPU us/req (d)/(b), median of {len(rounds)}",
                    f"{median_cpu_d_over_b:.2f} (1/x = {ratio(1, median_cpu_d_over_b):.2f})", "", "",
                ],
                ["(c) events/s acknowledged (2xx)", fmt_int(phase_c.events_per_second), "", ""],
                ["(c) clickpulse CPU us/event", f"{c_cpu_us_per_event:.2f}", "", ""],
                ["(c) implied one-core capacity, events/s (1e6 / us/event)", fmt_int(c_capacity), "", ""],
                [
                    "(c) events/s landed in ClickHouse", fmt_int(landed_rate), f">= {TARGET_LANDED_EVENTS_PER_SECOND:,}",
                    verdict(
                        landed_rate, TARGET_LANDED_EVENTS_PER_SECOND,
                        f"ClickHouse shares CPU {LOAD_CPU} with wrk; one-core capacity {fmt_int(c_capacity)} events/s",
                    ),
                ],
                ["    (c) rows landed / seconds", f"{fmt_int(landed_c)} / {landed_window:.2f} s", "", ""],
                [
                    "rows vs 2xx-acked events, memory acks (b)+(c)",
                    f"{fmt_int(rows_memory)} vs {fmt_int(acknowledged_memory)}", "equal",
                    "OK" if rows_memory_ok else "MISMATCH",
                ],
                [
                    "rows vs 2xx-acked events, disk acks (d)",
                    f"{fmt_int(rows_disk)} vs {fmt_int(acknowledged_disk)}", "equal",
                    "OK" if rows_disk_ok else "MISMATCH",
                ],
                [
                    "peak RSS (VmHWM), memory acks / disk acks",
                    f"{memory.peak_rss_kib / 1024:.1f} / {disk.peak_rss_kib / 1024:.1f} MiB", "", "",
                ],
                *[
                    [
                        f"exit status after SIGTERM, {service.label}", str(service.exit_status), "0",
                        "OK" if service.exit_status == 0 else "FAILED",
                    ]
                    for service in (memory, disk)
                ],
            ],
            ["figure", "value", "target", ""],
        )
        print()
        print(f"total run time {time.monotonic() - started:.0f} s")
        for service, _ in stderr_lines:
            print()
            print(f"tail of {service.label} stderr ({service.log}):")
            print(tail(service.log))
        failed = not (rows_memory_ok and rows_disk_ok) or memory.exit_status != 0 or disk.exit_status != 0
        return 1 if failed else 0
    except Exception as error:  # noqa: BLE001 - one readable line, then clean up
        print(f"bench: failed: {error}", file=sys.stderr)
        return 1
    finally:
        for process in processes:
            if process.poll() is None:
                stop_process(process, timeout=STOP_SECONDS)
        if server is not None:
            server.stop()
        if failed or anomalies or args.keep:
            print(f"bench: logs and data kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
