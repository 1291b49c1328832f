"""What every part of bench/run.py shares: the CPU split, child processes, reading /proc, driving
wrk, a clickpulse process under test and polling ClickHouse's count()."""

from __future__ import annotations

import json
import math
import os
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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
LUA_SCRIPT = BENCH / "post_event.lua"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.servers import ClickHouseServer  # noqa: E402
from tests.support import clean_environment, free_port  # noqa: E402

SERVICE_CPU = "0"  # the service under test (and, for the embedded default, everything)
LOAD_CPU = "1"  # wrk, ClickHouse, run.py itself
TABLE = "events"
DRAIN_SECONDS = 3.0  # wrk runs this much longer than it sends, so every request sent is answered
POLL_SECONDS = 0.05  # how often count() is polled while batches land
OTHERS_CPU_WARNING = 0.05  # share of the service CPU used by other processes that makes a run noisy
STOP_SECONDS = 30.0  # a SIGTERMed process gets this long to drain before SIGKILL
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# -- processes ------------------------------------------------------------------------------------


def child_env(root: Path = ROOT, **extra: str) -> dict[str, str]:
    """`root`: the checkout whose clickpulse the child imports (bench/compare.py runs another)."""
    # Nothing that configures clickpulse may leak in from the caller's environment.
    env = clean_environment(os.environ)
    env["PYTHONPATH"] = str(root) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def tail(path: Path, lines: int = 30) -> str:
    if not path.exists():
        return "(no file)"
    text = path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:]) if text else "(empty)"


def http_request(
    url: str, data: bytes | None = None, timeout: float = 2.0, headers: dict[str, str] | None = None
) -> tuple[int | None, bytes]:
    all_headers = {"Content-Type": "application/json"} if data is not None else {}
    all_headers.update(headers or {})
    request = urllib.request.Request(url, data=data, headers=all_headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except OSError:
        return None, b""


def http_status(url: str, data: bytes | None = None, timeout: float = 2.0, headers: dict[str, str] | None = None) -> int | None:
    return http_request(url, data, timeout, headers)[0]


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


def status_kib(pid: int, field_name: str) -> int:
    """A `kB` field of /proc/PID/status (VmRSS, VmHWM), in KiB."""
    return int(read_proc_status(pid)[field_name].split()[0])


def process_ticks(pid: int) -> int:
    """utime + stime of a process, all its threads, in clock ticks (fields 14 and 15 of stat)."""
    user, system = process_user_system_ticks(pid)
    return user + system


def process_user_system_ticks(pid: int) -> tuple[int, int]:
    """utime and stime of a process, all its threads, in clock ticks."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return int(fields[11]), int(fields[12])


def thread_ticks(pid: int) -> dict[int, tuple[str, int]]:
    """Per thread of `pid`: its name and utime + stime in clock ticks."""
    threads: dict[int, tuple[str, int]] = {}
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/stat") as stat:
                text = stat.read()
        except OSError:
            continue  # gone meanwhile
        name = text[text.index("(") + 1:text.rindex(")")]
        fields = text.rpartition(")")[2].split()
        threads[int(task)] = (name, int(fields[11]) + int(fields[12]))
    return threads


def cpu_times(cpu: str) -> tuple[int, int, int]:
    """(busy, total, irq + softirq) ticks of one CPU from /proc/stat."""
    with open("/proc/stat") as stat:
        for line in stat:
            if line.startswith(f"cpu{cpu} "):
                values = [int(value) for value in line.split()[1:9]]
                total = sum(values)
                return total - values[3] - values[4], total, values[5] + values[6]  # minus idle, iowait
    raise RuntimeError(f"no cpu{cpu} in /proc/stat")


@dataclass
class CpuSnapshot:
    at: float
    process_ticks: int  # utime + stime of the service process, all threads
    process_system_ticks: int  # its stime: the kernel's work for it (socket reads and writes, fsync)
    cpu_busy_ticks: int  # the service CPU's busy time, whoever used it
    cpu_total_ticks: int
    cpu_interrupt_ticks: int  # the service CPU's irq + softirq time (network receive, disk completions)
    load_busy_ticks: int  # the load CPU's busy time (wrk, ClickHouse, run.py)
    watched_ticks: dict[str, int]  # other processes by label (ClickHouse)


def cpu_snapshot(pid: int, watched: dict[str, int] | None = None) -> CpuSnapshot:
    busy, total, interrupts = cpu_times(SERVICE_CPU)
    load_busy, _, _ = cpu_times(LOAD_CPU)
    user, system = process_user_system_ticks(pid)
    return CpuSnapshot(
        time.monotonic(), user + system, system, busy, total, interrupts, load_busy,
        {label: process_ticks(other) for label, other in (watched or {}).items()},
    )


@dataclass
class CpuUse:
    process_seconds: float  # CPU time of the service process
    others_seconds: float  # CPU time of everything else on the service CPU (other processes, interrupts)
    elapsed_seconds: float  # wall time the two snapshots span (the whole wrk run, drain tail included)
    interrupt_seconds: float  # irq + softirq time on the service CPU, part of others_seconds
    load_busy_seconds: float = 0.0  # busy time of the load CPU
    watched_seconds: dict[str, float] = field(default_factory=dict)  # CPU time of each watched process
    wrk_seconds: float = 0.0  # wrk's own CPU time (its rusage)
    process_system_seconds: float = 0.0  # the system (kernel) part of process_seconds

    @classmethod
    def between(cls, before: CpuSnapshot, after: CpuSnapshot, subtract_from_others: int = 0) -> CpuUse:
        """`subtract_from_others`: ticks of a process known to share the service CPU on purpose
        (wrk, when it is pinned there too), left out of `others`."""
        process = after.process_ticks - before.process_ticks
        others = max(after.cpu_busy_ticks - before.cpu_busy_ticks - process - subtract_from_others, 0)
        interrupts = min(after.cpu_interrupt_ticks - before.cpu_interrupt_ticks, others)
        return cls(
            process / CLOCK_TICKS, others / CLOCK_TICKS, after.at - before.at, interrupts / CLOCK_TICKS,
            (after.load_busy_ticks - before.load_busy_ticks) / CLOCK_TICKS,
            {label: (after.watched_ticks[label] - ticks) / CLOCK_TICKS for label, ticks in before.watched_ticks.items()},
            process_system_seconds=(after.process_system_ticks - before.process_system_ticks) / CLOCK_TICKS,
        )


class CpuSampler:
    """Samples, every `interval` seconds in a thread, the busy time of CPUs 0 and 1 and the CPU
    time of some processes, so that shares can be taken over any span afterwards (a batch phase's
    window from its first request to its last row, a baseline's first to last insert), not just
    over the span of a whole wrk run."""

    def __init__(self, pids: dict[str, int], interval: float = 0.2) -> None:
        self.pids = dict(pids)
        self.interval = interval
        self.samples: list[tuple[float, dict[str, int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)

    def watch(self, label: str, pid: int) -> None:
        self.pids[label] = pid

    def _sample(self) -> None:
        ticks = {f"cpu{SERVICE_CPU}": cpu_times(SERVICE_CPU)[0], f"cpu{LOAD_CPU}": cpu_times(LOAD_CPU)[0]}
        for label, pid in list(self.pids.items()):
            try:
                ticks[label] = process_ticks(pid)
            except OSError:
                pass  # exited
        self.samples.append((time.monotonic(), ticks))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def start(self) -> CpuSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def share(self, label: str, start: float, end: float) -> float:
        """CPU time of `label` (a process, or "cpu0"/"cpu1" busy time) ÷ wall time, over the
        samples nearest `start` and `end`."""
        inside = [(at, ticks) for at, ticks in self.samples if label in ticks]
        if len(inside) < 2:
            return 0.0
        first = min(inside, key=lambda sample: abs(sample[0] - start))
        last = min(inside, key=lambda sample: abs(sample[0] - end))
        if last[0] <= first[0]:
            return 0.0
        return (last[1][label] - first[1][label]) / CLOCK_TICKS / (last[0] - first[0])


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
    round: int | None = None  # None for the phases that run once

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
    def server_cpu_share(self) -> float:
        """CPU time of the server process ÷ the window: about 1.0 means the server was the limit."""
        return self.cpu.process_seconds / self.window if self.cpu and self.window > 0 else 0.0

    @property
    def cpu_us_per_request(self) -> float:
        """CPU time of the server process per 2xx answer, in microseconds."""
        return self.cpu.process_seconds * 1e6 / self.ok if self.cpu and self.ok else 0.0

    @property
    def cpu_us_per_event(self) -> float:
        """CPU time of the server process per acknowledged event, in microseconds."""
        return self.cpu.process_seconds * 1e6 / self.accepted_events if self.cpu and self.accepted_events else 0.0

    @property
    def system_share(self) -> float:
        """The kernel's part of the server's CPU time (system ÷ user + system)."""
        return self.cpu.process_system_seconds / self.cpu.process_seconds if self.cpu and self.cpu.process_seconds else 0.0

    @property
    def others_share(self) -> float:
        """Share of the service CPU that other processes took while wrk ran (the same span the CPU time covers)."""
        return self.cpu.others_seconds / self.cpu.elapsed_seconds if self.cpu and self.cpu.elapsed_seconds > 0 else 0.0

    @property
    def interrupt_share(self) -> float:
        """The irq + softirq part of others_share."""
        return self.cpu.interrupt_seconds / self.cpu.elapsed_seconds if self.cpu and self.cpu.elapsed_seconds > 0 else 0.0

    @property
    def wrk_share(self) -> float:
        """wrk's CPU time ÷ the window: about 1.0 means the load generator was the limit."""
        return self.cpu.wrk_seconds / self.window if self.cpu and self.window > 0 else 0.0

    def watched_share(self, label: str) -> float:
        """A watched process's CPU time ÷ the window."""
        if not self.cpu or self.window <= 0:
            return 0.0
        return self.cpu.watched_seconds.get(label, 0.0) / self.window

    @property
    def socket_errors(self) -> int:
        return sum(int(self.values[f"errors_{kind}"]) for kind in ("connect", "read", "write", "timeout"))

    @property
    def unanswered(self) -> int:
        return int(self.values["sent"] - self.values["responses"])


def run_wrk(
    name: str, url: str, body: Path, connections: int, seconds: float, events_per_request: int, service_pid: int,
    round_number: int | None = None, *, headers: dict[str, str] | None = None, rate: float | None = None,
    wrk_cpu: str = LOAD_CPU, watched: dict[str, int] | None = None,
) -> PhaseResult:
    """Runs wrk with bench/post_event.lua against `url` for `seconds` of sending plus the drain tail.

    `headers`: Authorization, Origin and User-Agent (the Lua script sets only these); `rate`:
    requests per second to pace to; `watched`: other processes whose CPU time to record
    (ClickHouse). With `wrk_cpu` equal to SERVICE_CPU, wrk's own CPU time is not counted in
    `CPU 0 others`."""
    wrk_seconds = math.ceil(seconds + DRAIN_SECONDS)  # wrk's -d takes whole seconds only
    command = [
        "taskset", "-c", wrk_cpu, "wrk", "-t1", f"-c{connections}", f"-d{wrk_seconds}s",
        "--timeout", "10s", "--latency", "-s", str(LUA_SCRIPT), url,
    ]
    env = dict(
        os.environ, BENCH_BODY_FILE=str(body), BENCH_SECONDS=f"{seconds:g}",
        BENCH_EVENTS_PER_REQUEST=str(events_per_request),
    )
    lua_headers = {"Authorization": "BENCH_AUTHORIZATION", "Origin": "BENCH_ORIGIN", "User-Agent": "BENCH_USER_AGENT"}
    for variable in (*lua_headers.values(), "BENCH_RATE"):
        env.pop(variable, None)
    for header, value in (headers or {}).items():
        env[lua_headers[header]] = value
    if rate:
        env["BENCH_RATE"] = f"{rate:.3f}"
    shown = "".join(f" {lua_headers[h]}={v!r}" for h, v in (headers or {}).items())
    print(f"  {name}: {' '.join(command)}{shown}{f' BENCH_RATE={rate:.0f}' if rate else ''}", flush=True)
    with tempfile.TemporaryFile("w+") as output_file:
        cpu_before = cpu_snapshot(service_pid, watched)
        process = subprocess.Popen(command, env=env, stdout=output_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        # wait4 rather than wait: the rusage says how much CPU wrk itself took (taskset execs it).
        deadline = time.monotonic() + wrk_seconds + 60
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                process.kill()
                pid, status, usage = os.wait4(process.pid, 0)
                break
            time.sleep(0.05)
        process.returncode = os.waitstatus_to_exitcode(status)
        cpu_after = cpu_snapshot(service_pid, watched)
        output_file.seek(0)
        output = output_file.read()
    wrk_ticks = round((usage.ru_utime + usage.ru_stime) * CLOCK_TICKS)
    cpu = CpuUse.between(cpu_before, cpu_after, subtract_from_others=wrk_ticks if wrk_cpu == SERVICE_CPU else 0)
    cpu.wrk_seconds = usage.ru_utime + usage.ru_stime
    if process.returncode != 0:
        raise RuntimeError(f"wrk failed with status {process.returncode}:\n{output}")
    line = next((line for line in output.splitlines() if line.startswith("BENCH_RESULT ")), None)
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
    return PhaseResult(name, connections, events_per_request, values, dict(sorted(statuses.items())), output, cpu, round_number)


# -- clickpulse under test ------------------------------------------------------------------------


@dataclass
class Clickpulse:
    """One `python -m clickpulse` process under test."""

    label: str
    process: subprocess.Popen
    url: str
    database: str  # "default" for the embedded store
    log: Path
    peak_rss_kib: int = 0
    exit_status: int | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_ready(self, timeout: float = 60.0) -> None:
        wait_until(lambda: http_status(f"{self.url}/readyz") == 200, self.process, self.label, self.log, timeout)

    def stop(self, anomalies: list[str]) -> int:
        """Reads the peak RSS, SIGTERMs the process and waits for it to drain and exit."""
        if self.process.poll() is None:
            self.peak_rss_kib = status_kib(self.process.pid, "VmHWM")
            self.process.send_signal(signal.SIGTERM)
        try:
            self.exit_status = self.process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            anomalies.append(f"{self.label} did not exit within 90 s of SIGTERM; killed")
            self.process.kill()
            self.exit_status = self.process.wait()
        return self.exit_status

    def stderr_text(self) -> str:
        return self.log.read_text(errors="replace").strip() if self.log.exists() else ""


def start_clickpulse(
    label: str, server: ClickHouseServer | None, workdir: Path, log_name: str, cpu: str = SERVICE_CPU,
    prefix: Sequence[str] = (), root: Path = ROOT, **extra: str,
) -> Clickpulse:
    """A `python -m clickpulse` pinned to `cpu`, on a free port, with its own fresh `bench_…`
    database on `server`; with `server` None, the embedded store (set DATA_DIR in `extra`).
    `prefix`: a command that runs it (valgrind, for bench/instructions.py); `root`: the checkout
    it runs from."""
    port = free_port()
    log = workdir / log_name
    settings = dict(HTTP_HOST="127.0.0.1", HTTP_PORT=str(port), FLUSH_INTERVAL="1s", LOG_LEVEL="WARNING")
    if server is not None:
        database = f"bench_{uuid.uuid4().hex[:10]}"
        settings.update(CLICKHOUSE_DSN=server.dsn(database), CLICKHOUSE_TABLE=TABLE)
    else:
        database = "default"
    settings.update(extra)
    with open(log, "wb") as stderr:
        process = subprocess.Popen(
            ["taskset", "-c", cpu, *prefix, sys.executable, "-m", "clickpulse"],
            env=child_env(root, **settings), cwd=root, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr,
        )
    return Clickpulse(label, process, f"http://127.0.0.1:{port}", database, log)


ROWS_WRITTEN = "clickhouse_rows_written_total"  # clickpulse's count of rows ClickHouse confirmed


def metric_value(url: str, name: str) -> float | None:
    """One unlabelled sample of clickpulse's /metrics, or None if it cannot be read."""
    status, body = http_request(f"{url}/metrics", timeout=5.0)
    if status != 200:
        return None
    for line in body.decode(errors="replace").splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{}"):
            return float(line.rsplit(None, 1)[1])
    return None


# -- ClickHouse -----------------------------------------------------------------------------------


def count_rows(server: ClickHouseServer, database: str, table: str = TABLE) -> int:
    return int(server.query(f"SELECT count() FROM {database}.{table}").strip())


def count_embedded_rows(data_dir: Path, timeout: float = 120.0) -> tuple[int | None, str]:
    """count() of a stopped embedded service's table, read with this checkout's `query` command
    on the load CPU: the count, or None and the command's stderr."""
    completed = subprocess.run(
        ["taskset", "-c", LOAD_CPU, sys.executable, "-m", "clickpulse", "query", "--format", "TSV",
         "SELECT count() FROM events"],
        env=child_env(DATA_DIR=str(data_dir), LOG_LEVEL="WARNING"), cwd=ROOT, capture_output=True, text=True,
        timeout=timeout,
    )
    if completed.returncode != 0:
        return None, completed.stderr.strip()
    return int(completed.stdout.strip()), ""


def wait_for_rows(server: ClickHouseServer, database: str, expected: int, timeout: float) -> int:
    """Polls count() until it reaches `expected` or `timeout` seconds pass; returns the last count."""
    deadline = time.monotonic() + timeout
    count = count_rows(server, database)
    while count < expected and time.monotonic() < deadline:
        time.sleep(0.1)
        count = count_rows(server, database)
    return count


def settle_merges(server: ClickHouseServer, timeout: float = 120.0) -> float:
    """Merges every bench table's parts now (OPTIMIZE … FINAL, which waits for its merge), then
    waits until no merge runs: otherwise the parts earlier phases left (hundreds of 1,000- and
    10,000-row inserts) are merged in the background during the next measured ingest, on
    ClickHouse's CPU. Returns the seconds it took."""
    started = time.monotonic()
    tables = server.query(
        f"SELECT database, name FROM system.tables WHERE database LIKE 'bench%' AND name = '{TABLE}'"
    ).split("\n")
    for line in tables:
        if line.strip():
            database, name = line.split("\t")
            server.query(f"OPTIMIZE TABLE {database}.{name} FINAL")
    wait_merges_done(server, timeout)
    return time.monotonic() - started


def wait_merges_done(server: ClickHouseServer, timeout: float = 60.0) -> float:
    """Waits until ClickHouse runs no merge for half a second, so that what one phase left to
    merge does not take CPU 1 from the next; returns the seconds waited."""
    started = time.monotonic()
    quiet_since = None
    while time.monotonic() - started < timeout:
        if int(server.query("SELECT count() FROM system.merges").strip()) == 0:
            quiet_since = quiet_since or time.monotonic()
            if time.monotonic() - quiet_since >= 0.5:
                break
        else:
            quiet_since = None
        time.sleep(0.1)
    return time.monotonic() - started


@dataclass
class RowPoller:
    """Polls a count in a thread and remembers (time, count) samples while batches land.
    `count` is any callable (ClickHouse's count(), clickpulse's rows-written counter)."""

    count: object  # Callable[[], int]
    interval: float = POLL_SECONDS
    samples: list[tuple[float, int]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _slow_until: float = 0.0
    _slow_interval: float = 0.0

    def slow_until(self, until: float, interval: float) -> None:
        """Poll only every `interval` seconds until time.monotonic() reaches `until` (while load
        shares the CPU with what is polled), then every `self.interval`."""
        self._slow_until, self._slow_interval = until, interval

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="row-poller", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                count = self.count()  # type: ignore[operator]
            except Exception as error:  # noqa: BLE001 - reported at the end
                self.errors.append(str(error))
            else:
                if count is not None:
                    self.samples.append((time.monotonic(), int(count)))
            slow = time.monotonic() < self._slow_until
            self._stop.wait(self._slow_interval if slow else self.interval)

    def wait_stable(self, stable_for: float, timeout: float) -> int:
        """Waits until the count has not changed for `stable_for` seconds; returns it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.samples:
                last_time, last_count = self.samples[-1]
                if last_time - self.first_time_at(last_count) >= stable_for:
                    return last_count
            time.sleep(POLL_SECONDS)
        return self.samples[-1][1] if self.samples else -1

    def wait_reaching(self, target: int, timeout: float) -> int:
        """Waits until the count reaches `target` or `timeout` seconds pass; returns the last count."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.samples and self.samples[-1][1] >= target:
                break
            time.sleep(POLL_SECONDS)
        return self.samples[-1][1] if self.samples else -1

    def first_time_at(self, count: int) -> float:
        """When the count first showed `count` in the latest run of equal samples."""
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


# -- helpers for the report -----------------------------------------------------------------------


def median_or_zero(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


def fmt_int(value: float) -> str:
    return f"{value:,.0f}"


def fmt_ms(microseconds: float) -> str:
    return f"{microseconds / 1000:.2f} ms"


def print_table(rows: list[list[str]], header: list[str], left: tuple[int, ...] = (0,)) -> None:
    """Columns right-aligned but those in `left` (index; -1 the last)."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    left_columns = {index % len(header) for index in left}

    def line(cells: list[str]) -> str:
        return "  ".join(
            (str(cell).ljust(widths[i]) if i in left_columns else str(cell).rjust(widths[i]))
            for i, cell in enumerate(cells)
        ).rstrip()

    print(line(header))
    print("  ".join("-" * width for width in widths))
    for row in rows:
        print(line(row))


def run_json_child(command: list[str], log: Path, timeout: float) -> dict:
    """Runs a bench helper that prints one JSON object as its last stdout line."""
    completed = subprocess.run(
        command, env=child_env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )
    log.write_text(completed.stdout + completed.stderr)
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:6])} … failed with status {completed.returncode}:\n{tail(log)}")
    lines = completed.stdout.strip().splitlines()
    if not lines:
        raise RuntimeError(f"{' '.join(command[:6])} … printed nothing")
    return json.loads(lines[-1])


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
