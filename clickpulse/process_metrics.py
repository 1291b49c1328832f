"""Process metrics (build, start time, CPU, memory, file descriptors), refreshed at scrape time.

aioprometheus has no process collector, and this one is a few reads of /proc. The names are the
ones every Prometheus client library exports (`process_*`), so the usual dashboards and alerts
written for them work here too. Where /proc does not exist (macOS in development) the memory and
file-descriptor gauges stay absent rather than report a made-up value.
"""

from __future__ import annotations

import os
import platform
import resource
import time
from pathlib import Path

from aioprometheus import Counter, Gauge, Registry

from clickpulse import __version__

PROC_ROOT = Path("/proc")
# proc(5): field 22 of /proc/<pid>/stat is the start time in clock ticks after boot.
STARTTIME_FIELD = 22


class ProcessMetrics:
    def __init__(self, registry: Registry, proc_root: Path = PROC_ROOT, pid: str = "self") -> None:
        self._proc_root = proc_root
        self._process_dir = proc_root / pid
        self.build_info = Gauge(
            "clickpulse_build_info",
            "Always 1; the labels name the clickpulse version and the Python version running it.",
            registry=registry,
        )
        self.start_time = Gauge(
            "process_start_time_seconds", "Start time of the process since the Unix epoch, in seconds.", registry=registry
        )
        self.cpu_seconds = Counter(
            "process_cpu_seconds_total", "User and system CPU time the process has used, in seconds.", registry=registry
        )
        self.resident_memory = Gauge(
            "process_resident_memory_bytes", "Resident set size: memory the process holds in RAM.", registry=registry
        )
        self.open_fds = Gauge("process_open_fds", "Open file descriptors (sockets included).", registry=registry)
        self.max_fds = Gauge(
            "process_max_fds", "The soft limit on open file descriptors (RLIMIT_NOFILE).", registry=registry
        )
        self.build_info.set({"version": __version__, "python": platform.python_version()}, 1)
        self.start_time.set({}, self._read_start_time())
        self.refresh()

    def refresh(self) -> None:
        """Reads the current values; the /metrics handler calls this before every render."""
        self.cpu_seconds.set({}, time.process_time())
        resident = self._read_resident_bytes()
        if resident is not None:
            self.resident_memory.set({}, resident)
        open_fds = self._count_open_fds()
        if open_fds is not None:
            self.open_fds.set({}, open_fds)
        soft_limit, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft_limit != resource.RLIM_INFINITY:
            self.max_fds.set({}, soft_limit)

    def _read_start_time(self) -> float:
        """Boot time plus the process's start in clock ticks since boot; now, without /proc."""
        try:
            stat = (self._process_dir / "stat").read_bytes()
            boot_time = next(
                float(line.split()[1])
                for line in (self._proc_root / "stat").read_bytes().splitlines()
                if line.startswith(b"btime ")
            )
        except (OSError, StopIteration):
            return time.time()
        # The command name (field 2) may hold spaces and parentheses: count fields after its last ")".
        fields_after_name = stat.rsplit(b")", 1)[1].split()
        start_ticks = float(fields_after_name[STARTTIME_FIELD - 3])
        return boot_time + start_ticks / os.sysconf("SC_CLK_TCK")

    def _read_resident_bytes(self) -> int | None:
        try:
            statm = (self._process_dir / "statm").read_bytes().split()
        except OSError:
            return None
        return int(statm[1]) * resource.getpagesize()

    def _count_open_fds(self) -> int | None:
        try:
            return len(os.listdir(self._process_dir / "fd"))
        except OSError:
            return None
