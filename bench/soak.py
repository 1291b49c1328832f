"""Target 6, memory flat: single-event POSTs to a memory-ack clickpulse at a fixed share of the
(b) rate measured earlier in the same run, paced by bench/post_event.lua (BENCH_RATE), for
--soak-seconds, with VmRSS sampled every second from /proc; the curve written as an SVG."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from html import escape
from pathlib import Path

from harness import PhaseResult, metric_value, run_wrk, status_kib, wait_for_rows
from phases import Run

HELD_EVENTS = "pipeline_memory_events"  # events held in memory anywhere in the pipeline
REFERENCE_SECONDS = 60.0  # RSS is compared with its value this long into the soak
TOLERANCE = 0.10
REFERENCE_SPAN = 10.0  # seconds either side of the reference time whose samples' median is the reference


@dataclass
class Soak:
    phase: PhaseResult
    rate: float  # requests per second asked for
    rate_source: str  # where the rate came from
    samples: list[tuple[float, int]]  # (seconds since the soak started, VmRSS KiB)
    reference_seconds: float
    # (seconds since the soak started, clickpulse's pipeline_memory_events): what RSS swings with
    held: list[tuple[float, float]] = field(default_factory=list)
    plot: Path | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def reference_kib(self) -> int:
        """VmRSS at `reference_seconds`: the median of the samples within REFERENCE_SPAN of it.
        RSS steps up and down with every flush (a batch's rows and the insert body come and go),
        so a single sample would fall on either side of that step by chance; the median is the
        level the process runs at."""
        near = sorted(kib for at, kib in self.samples if abs(at - self.reference_seconds) <= REFERENCE_SPAN)
        if near:
            return near[len(near) // 2]
        return min(self.samples, key=lambda sample: abs(sample[0] - self.reference_seconds))[1]

    @property
    def after(self) -> list[int]:
        return [kib for at, kib in self.samples if at >= self.reference_seconds]

    @property
    def low(self) -> float:
        return min(self.after) / self.reference_kib - 1 if self.after else 0.0

    @property
    def high(self) -> float:
        return max(self.after) / self.reference_kib - 1 if self.after else 0.0

    @property
    def final(self) -> float:
        return self.after[-1] / self.reference_kib - 1 if self.after else 0.0

    @property
    def last_minute_median(self) -> float:
        """The median VmRSS of the last 60 s: whether the curve drifts, whatever its swings."""
        end = self.samples[-1][0] if self.samples else 0.0
        last = sorted(kib for at, kib in self.samples if at >= end - 60)
        return float(last[len(last) // 2]) if last else 0.0

    @property
    def flat(self) -> bool:
        return bool(self.after) and -TOLERANCE <= self.low and self.high <= TOLERANCE

    @property
    def achieved_rate(self) -> float:
        return self.phase.requests_per_second


class RssSampler:
    """VmRSS every `interval`, and beside it the events clickpulse holds in its pipeline (from
    /metrics, one small GET a second), so that a swing of RSS can be told from a backlog."""

    def __init__(self, pid: int, url: str, interval: float = 1.0) -> None:
        self.pid = pid
        self.url = url
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self.held: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self.started = 0.0

    def start(self) -> None:
        self.started = time.monotonic()
        self._thread.start()

    def _run(self) -> None:
        next_at = self.started
        while not self._stop.is_set():
            try:
                self.samples.append((time.monotonic() - self.started, status_kib(self.pid, "VmRSS")))
            except OSError:
                return
            held = metric_value(self.url, HELD_EVENTS)
            if held is not None:
                self.held.append((time.monotonic() - self.started, held))
            next_at += self.interval
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def run_soak(run: Run, rate: float | None, rate_source: str) -> Soak:
    """`rate` None: calibrates the soak's own clickpulse first, one phase of --duration unpaced,
    then one paced at --soak-share of that rate, and takes --soak-share of the lower of the
    unpaced rate and the paced one scaled to a whole core of CPU."""
    args = run.args
    service = run.start("clickpulse (soak, memory acks)", "clickpulse-soak.stderr.log", ACK_MODE="memory")
    service.wait_ready()
    acknowledged = 0
    if rate is None:
        calibration = run_wrk(
            "(s0) soak calibration, unpaced", f"{service.url}/events", run.bodies.single, args.connections,
            args.duration, 1, service.pid,
        )
        run.phases.append(calibration)
        acknowledged += calibration.accepted_events
        unpaced = calibration.requests_per_second
        # Requests that arrive paced, one at a time, cost more CPU each than wrk's unpaced bursts,
        # where one pass of the event loop serves many connections; 80% of the unpaced rate
        # then asked for ~100% of a core (84 against 65 us/request measured). So a paced probe at
        # that rate measures the paced cost, and the maximum is what one core pays for at it.
        probe_rate = args.soak_share * unpaced
        probe = run_wrk(
            "(s1) soak calibration, paced", f"{service.url}/events", run.bodies.single, args.soak_connections,
            args.duration, 1, service.pid, rate=probe_rate,
        )
        run.phases.append(probe)
        acknowledged += probe.accepted_events
        paced = probe.requests_per_second / probe.server_cpu_share if probe.server_cpu_share > 0 else unpaced
        maximum = min(unpaced, paced)
        rate = args.soak_share * maximum
        rate_source = (
            f"{args.soak_share:.0%} of {maximum:,.0f} req/s, the lower of the unpaced calibration's "
            f"{unpaced:,.0f} and the paced one's {probe.requests_per_second:,.0f} req/s at "
            f"{probe.server_cpu_share:.0%} CPU ({paced:,.0f} on a whole core)"
        )
    print(
        f"bench: {service.label} ready on {service.url} (pid {service.pid}); {args.soak_seconds:g} s at "
        f"{rate:,.0f} req/s ({rate_source})", flush=True,
    )
    sampler = RssSampler(service.pid, service.url)
    sampler.start()
    phase = run_wrk(
        "(s) soak, single events, paced", f"{service.url}/events", run.bodies.single, args.soak_connections,
        args.soak_seconds, 1, service.pid, rate=rate,
    )
    sampler.stop()
    run.phases.append(phase)
    # Only what the load did: the drain tail after it is idle.
    end = args.soak_seconds + 1
    samples = [(at, kib) for at, kib in sampler.samples if at <= end]
    reference = min(REFERENCE_SECONDS, args.soak_seconds / 2)
    soak = Soak(phase, rate, rate_source, samples, reference, [(at, held) for at, held in sampler.held if at <= end])
    if soak.achieved_rate < 0.95 * rate:
        run.anomalies.append(
            f"soak: {soak.achieved_rate:,.0f} req/s achieved of {rate:,.0f} asked: the service (or the "
            f"{args.soak_connections} connections) could not keep the pace"
        )
    if reference < REFERENCE_SECONDS:
        soak.notes.append(f"soak shorter than 2 minutes: RSS compared with its value at {reference:.0f} s, not 60 s")
    service.stop(run.anomalies)
    assert run.server is not None
    acknowledged += phase.accepted_events
    run.check_rows("rows vs 2xx-acked events, soak (s)", wait_for_rows(run.server, service.database, acknowledged, 60.0),
                   acknowledged)
    plot = Path(args.soak_plot) if args.soak_plot else run.workdir / "soak-rss.svg"
    plot.parent.mkdir(parents=True, exist_ok=True)
    plot.write_text(svg(soak, title_detail=getattr(args, "source", "")))
    soak.plot = plot
    return soak


def svg(soak: Soak, title_detail: str = "", width: int = 640, height: int = 300) -> str:
    """The RSS curve as a small self-contained SVG: MiB over seconds, the ±10% band around the
    value at the reference time shaded, the reference time marked."""
    left, right, top, bottom = 58, 16, 40, 42
    plot_w, plot_h = width - left - right, height - top - bottom
    times = [at for at, _ in soak.samples] or [0.0]
    mib = [kib / 1024 for _, kib in soak.samples] or [0.0]
    reference = soak.reference_kib / 1024 if soak.samples else 0.0
    t_max = max(max(times), 1.0)
    low = min(min(mib), reference * (1 - TOLERANCE))
    high = max(max(mib), reference * (1 + TOLERANCE))
    span = high - low or 1.0
    low, high = max(0.0, low - span * 0.08), high + span * 0.08
    step = nice_step((high - low) / 5)
    low = step * int(low / step)

    def x(at: float) -> float:
        return left + at / t_max * plot_w

    def y(value: float) -> float:
        return top + (1 - (value - low) / (high - low)) * plot_h

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        'font-family="sans-serif" font-size="11">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{left}" y="16" font-size="13" font-weight="bold">clickpulse VmRSS during the soak: '
        f'{soak.achieved_rate:,.0f} single-event req/s for {t_max:.0f} s</text>',
        f'<text x="{left}" y="31" fill="#555">{escape(title_detail)}; p99 {soak.phase.values["p99_us"] / 1000:.1f} ms; '
        f'band: ±{TOLERANCE:.0%} of the median around {soak.reference_seconds:.0f} s</text>',
        f'<rect x="{x(soak.reference_seconds):.1f}" y="{y(reference * (1 + TOLERANCE)):.1f}" '
        f'width="{x(t_max) - x(soak.reference_seconds):.1f}" '
        f'height="{y(reference * (1 - TOLERANCE)) - y(reference * (1 + TOLERANCE)):.1f}" fill="#e3f0e3"/>',
    ]
    value = low
    while value <= high + 1e-9:
        out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y(value):.1f}" y2="{y(value):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{left - 6}" y="{y(value) + 4:.1f}" text-anchor="end">{value:g}</text>')
        value += step
    t_step = nice_step(t_max / 6)
    at = 0.0
    while at <= t_max + 1e-9:
        out.append(f'<line x1="{x(at):.1f}" x2="{x(at):.1f}" y1="{top + plot_h}" y2="{top + plot_h + 4}" stroke="#333"/>')
        out.append(f'<text x="{x(at):.1f}" y="{top + plot_h + 16}" text-anchor="middle">{at:g}</text>')
        at += t_step
    out += [
        f'<line x1="{x(soak.reference_seconds):.1f}" x2="{x(soak.reference_seconds):.1f}" y1="{top}" '
        f'y2="{top + plot_h}" stroke="#6a6" stroke-dasharray="4 3"/>',
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#333"/>',
        '<polyline fill="none" stroke="#1f5fbf" stroke-width="1.5" points="'
        + " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in zip(times, mib)) + '"/>',
        f'<text x="{left + plot_w / 2}" y="{height - 8}" text-anchor="middle">seconds since the soak started</text>',
        f'<text x="14" y="{top + plot_h / 2}" text-anchor="middle" transform="rotate(-90 14 {top + plot_h / 2})">'
        "VmRSS, MiB</text>",
        "</svg>",
    ]
    return "\n".join(out) + "\n"


def nice_step(raw: float) -> float:
    """1, 2 or 5 times a power of ten, at least `raw`."""
    if raw <= 0:
        return 1.0
    power = 10 ** int(f"{raw:e}".split("e")[1])
    for factor in (1, 2, 5, 10):
        if raw <= factor * power:
            return factor * power
    return 10 * power
