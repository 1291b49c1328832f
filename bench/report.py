"""bench/run.py's report: the per-phase table, the per-round ratios, the details of the batch,
embedded and soak parts, the anomalies, and the summary with one line per target."""

from __future__ import annotations

from dataclasses import dataclass, field

from embedded import Embedded
from instructions import BATCH_FEWER, BATCH_MORE, BATCH_WARMUP, CONCURRENT, FEWER, MORE, WARMUP, Instructions
from harness import LOAD_CPU, OTHERS_CPU_WARNING, SERVICE_CPU, fmt_int, fmt_ms, median_or_zero, print_table, ratio
from phases import Batches, Run, Single, StoreAlone
from soak import TOLERANCE, Soak

TARGET_SINGLE_RATIO = 0.8  # median (b)/(a) req/s
TARGET_EDGE_RATIO = 0.75  # median (e)/(a) req/s
TARGET_DISK_RATIO = 0.8  # median (d)/(b) req/s
TARGET_BATCH_US_PER_EVENT = 2.5  # clickpulse CPU per event, (c) and (f)
TARGET_LANDED_RATIO = 0.8  # (c) landed ÷ ClickHouse alone
TARGET_EMBEDDED_RATIO = 0.8  # (g) landed ÷ chDB alone
BOUND = 0.9  # a CPU share at or above this is "the limit"


@dataclass
class Parts:
    single: Single | None = None
    instructions: Instructions | None = None
    batches: Batches | None = None
    clickhouse_alone: list[StoreAlone] = field(default_factory=list)  # before and after (c)
    clickhouse_reference: StoreAlone | None = None  # ClickHouse alone in BATCH_SIZE-row inserts
    embedded: Embedded | None = None
    soak: Soak | None = None


def print_phases(run: Run) -> None:
    print_table(
        [
            [
                phase.name, "-" if phase.round is None else str(phase.round), str(phase.connections),
                fmt_int(phase.ok), str(phase.non2xx), fmt_int(phase.requests_per_second),
                fmt_ms(phase.values["p50_us"]), fmt_ms(phase.values["p99_us"]), fmt_int(phase.events_per_second),
                f"{phase.server_cpu_share:.0%}", f"{phase.system_share:.0%}", f"{phase.cpu_us_per_request:.0f}",
                f"{phase.cpu_us_per_event:.2f}",
                f"{phase.others_share:.0%}", f"{phase.interrupt_share:.0%}", f"{phase.wrk_share:.0%}",
            ]
            for phase in run.phases
        ],
        [
            "phase", "round", "conns", "2xx", "non-2xx", "2xx req/s", "p50", "p99", "events/s acked",
            "server CPU", "of it sys", "CPU us/req", "CPU us/event", f"CPU {SERVICE_CPU} others", "of which irq", "wrk CPU",
        ],
    )


def print_rounds(single: Single) -> None:
    rounds = single.rounds

    def med(getter) -> float:
        return median_or_zero([getter(r) for r in rounds])

    columns = [
        ("(a) req/s", lambda r: r.a.requests_per_second, fmt_int),
        ("(b) req/s", lambda r: r.b.requests_per_second, fmt_int),
        ("(e) req/s", lambda r: r.e.requests_per_second, fmt_int),
        ("(d) req/s", lambda r: r.d.requests_per_second, fmt_int),
        ("(b)/(a)", lambda r: r.b_over_a, "{:.2f}".format),
        ("(e)/(a)", lambda r: r.e_over_a, "{:.2f}".format),
        ("(d)/(b)", lambda r: r.d_over_b, "{:.2f}".format),
        ("(a) us/req", lambda r: r.a.cpu_us_per_request, "{:.0f}".format),
        ("(b) us/req", lambda r: r.b.cpu_us_per_request, "{:.0f}".format),
        ("(e) us/req", lambda r: r.e.cpu_us_per_request, "{:.0f}".format),
        ("(d) us/req", lambda r: r.d.cpu_us_per_request, "{:.0f}".format),
        ("CPU (b)/(a)", lambda r: r.cpu_b_over_a, "{:.2f}".format),
        ("CPU (e)/(a)", lambda r: r.cpu_e_over_a, "{:.2f}".format),
        ("CPU (e)/(b)", lambda r: r.cpu_e_over_b, "{:.2f}".format),
        ("CPU (d)/(b)", lambda r: r.cpu_d_over_b, "{:.2f}".format),
    ]
    print("per round (ratios of phases run back to back; the medians are the figures to compare; us/req is CPU):")
    print_table(
        [[str(r.number), *(fmt(get(r)) for _, get, fmt in columns)] for r in rounds]
        + [["median", *(fmt(med(get)) for _, get, fmt in columns)]],
        ["round", *(name for name, _, _ in columns)],
    )
    a_rates = [r.a.requests_per_second for r in rounds]
    if len(rounds) > 1 and min(a_rates) > 0:
        print(
            f"(a) ranged from {fmt_int(min(a_rates))} to {fmt_int(max(a_rates))} req/s across rounds "
            f"({max(a_rates) / min(a_rates) - 1:.0%} apart): the machine's drift, which the per-round ratios cancel"
        )


def print_instructions(instructions: Instructions) -> None:
    per_request = instructions.per_request
    print(f"instructions per single-event request under callgrind ({MORE} - {FEWER} requests after {WARMUP}, "
          "one keep-alive connection; user space only):")
    print_table(
        [[f"({letter})", fmt_int(per_request[letter]), f"{instructions.over_a(letter):.3f}"] for letter in ("a", "b", "e")],
        ["phase", "instructions/request", "(a) ÷ this"],
    )
    if f"d@{CONCURRENT}" in per_request:
        print(f"and at {CONCURRENT} connections at once, where one fsync pass serves many disk-ack requests:")
        print_table(
            [[f"({letter}) {what}", fmt_int(per_request[f"{letter}@{CONCURRENT}"])]
             for letter, what in (("b", "memory acks"), ("d", "disk acks"))]
            + [["(b) ÷ (d)", f"{instructions.disk_over_memory:.3f}"]],
            ["phase", "instructions/request"],
        )
    batches = instructions.batches
    if batches is None:
        return
    print(f"instructions per event of batches under callgrind ({BATCH_MORE} - {BATCH_FEWER} requests after "
          f"{BATCH_WARMUP}; the codec alone in processes of their own):")
    print_table(
        [[f"({letter}) {path}", fmt_int(batches.service[letter]), fmt_int(batches.own_code[letter]),
          f"{ratio(batches.own_code[letter], batches.service[letter]):.0%}", fmt_int(batches.plain[letter]),
          fmt_int(batches.service[letter] - batches.own_code[letter])]
         for letter, path in (("c", "POST /events"), ("f", "POST /v1/batch"))],
        ["phase", "clickpulse process", "its decode + encode alone", "share", "plain msgspec (floor)",
         "HTTP, pipeline, insert"],
    )


def print_batches(batches: Batches, alones: list[StoreAlone], reference: StoreAlone | None = None) -> None:
    c, f, floors = batches.events, batches.segment, batches.floors
    print("batches:")
    if floors is not None:
        print(
            f"  floor (plain msgspec decode + encode_lines, best of 11, this process on CPU {floors.cpu}, idle): "
            f"/events {floors.events_us:.2f} us/event, /v1/batch {floors.segment_us:.2f} us/event"
        )
        print(
            f"  clickpulse's own /events code in-process (decode_json + encode + received_at/context splice): "
            f"{floors.clickpulse_events_us:.2f} us/event of (c)'s {c.cpu_us_per_event:.2f}"
        )
    if f is not None:
        print(
            f"  (f) /v1/batch {f.cpu_us_per_event:.2f} us/event, {fmt_int(f.events_per_second)} events/s acked; "
            f"(c) /events {c.cpu_us_per_event:.2f} us/event, {fmt_int(c.events_per_second)} events/s acked; "
            f"CPU (f)/(c) {ratio(f.cpu_us_per_event, c.cpu_us_per_event):.2f}"
        )
    shares = batches.landed_shares
    print(
        f"  (c) implied one-core capacity {fmt_int(ratio(1e6, c.cpu_us_per_event))} events/s (1e6 / us/event); "
        f"before (c), ClickHouse merged what earlier phases left for {batches.merge_wait_seconds:.1f} s"
    )
    print(
        f"  (c) landed {fmt_int(batches.landed_rows)} rows in {batches.landed_seconds:.2f} s (first request → clickpulse's "
        f"clickhouse_rows_written_total showing the last row, polled every 0.5 s while sending, 50 ms after) = {fmt_int(batches.landed_rate)} rows/s; the last row came "
        f"{batches.last_row_after_last_answer:.2f} s after the last answer (the last partial batch waits up to "
        "FLUSH_INTERVAL)"
    )
    print(
        f"  over that window: clickpulse {shares.get('clickpulse', 0):.0%} of CPU {SERVICE_CPU} (busy "
        f"{shares.get('cpu0', 0):.0%} by anyone); CPU {LOAD_CPU} busy {shares.get('cpu1', 0):.0%}: ClickHouse "
        f"{shares.get('clickhouse', 0):.0%} ({ratio(shares.get('clickhouse', 0) * batches.landed_seconds * 1e6, batches.landed_rows):.2f} "
        f"us/row), wrk {c.wrk_share:.0%}"
    )
    for alone in alones + ([reference] if reference else []):
        result = alone.result
        what = alone_label(alone, reference, "c", batches.landed_rate)
        print(
            f"  ClickHouse alone, {what} ({result['store']}): {fmt_int(result['rows'])} rows in {result['inserts']} inserts, "
            f"{result['seconds']:.2f} s = {fmt_int(alone.rate)} rows/s, count() {fmt_int(result['count'])}; "
            f"CPU {LOAD_CPU} busy {alone.shares.get('cpu1', 0):.0%}: ClickHouse {alone.shares.get('clickhouse', 0):.0%}, "
            f"the client {result['client_cpu_seconds'] / result['seconds']:.0%}; ClickHouse CPU "
            f"{alone.clickhouse_us_per_row:.2f} us/row"
        )


def print_embedded(embedded: Embedded) -> None:
    g = embedded.phase
    events = g.accepted_events or 1
    print("embedded default (chDB in-process; clickpulse, its chDB threads and wrk all on CPU 0):")
    print(
        f"  (g) {fmt_int(g.accepted_events)} events acked, landed {fmt_int(embedded.landed_rows)} in "
        f"{embedded.landed_seconds:.2f} s (first request → /metrics clickhouse_rows_written_total reaching it) = "
        f"{fmt_int(embedded.landed_rate)} events/s; /query count() {embedded.rows_via_query}, after exit "
        f"{embedded.rows_after_exit}"
    )
    print(
        f"  CPU per event on the one core: clickpulse's event loop (main thread) "
        f"{embedded.main_thread_seconds * 1e6 / events:.2f} us, its other threads (chDB) "
        f"{embedded.other_threads_seconds * 1e6 / events:.2f} us, wrk {g.cpu.wrk_seconds * 1e6 / events:.2f} us; "
        f"busiest other threads: "
        + ", ".join(f"{name} {seconds * 1e6 / events:.2f}" for name, seconds in embedded.top_threads)
    )
    reference = embedded.reference
    for alone in embedded.alones + ([reference] if reference else []):
        result = alone.result
        what = alone_label(alone, reference, "g", embedded.landed_rate)
        print(
            f"  chDB alone, {what} ({result['store']}): {fmt_int(result['rows'])} rows in {result['inserts']} inserts, "
            f"{result['seconds']:.2f} s = {fmt_int(alone.rate)} rows/s, count() {fmt_int(result['count'])}, "
            f"{result['cpu_seconds'] * 1e6 / result['rows']:.2f} us CPU/row ({result['cpu_seconds'] / result['seconds']:.0%} "
            f"of CPU {SERVICE_CPU}, which was {alone.shares.get('cpu0', 0):.0%} busy); peak RSS "
            f"{result['peak_rss_kib'] / 1024:.0f} MiB (with all its rows in memory)"
        )
    print(
        f"  RSS of the embedded clickpulse: peak (VmHWM) {embedded.peak_rss_kib / 1024:.0f} MiB; at the end of the load "
        f"VmRSS {embedded.rss_kib / 1024:.0f} MiB, by mapping (/proc/PID/smaps):"
    )
    for part in embedded.rss_parts[:6]:
        print(f"    {part.kib / 1024:7.1f} MiB  {part.what}")
    if embedded.rss_objects:
        print("    largest other .so files: " + ", ".join(f"{o.what} {o.kib / 1024:.1f}" for o in embedded.rss_objects))


def print_soak(soak: Soak) -> None:
    p = soak.phase
    kib = [kib for _, kib in soak.samples]
    print("soak:")
    print(
        f"  {fmt_int(p.ok)} single-event POSTs in {p.window:.0f} s: {fmt_int(soak.achieved_rate)} req/s achieved of "
        f"{fmt_int(soak.rate)} asked ({soak.rate_source}); {int(p.values.get('late', 0)):,} sent over 10 ms late; "
        f"p50 {fmt_ms(p.values['p50_us'])}, p90 {fmt_ms(p.values['p90_us'])}, p99 {fmt_ms(p.values['p99_us'])}, "
        f"max {fmt_ms(p.values['max_us'])}; server CPU {p.server_cpu_share:.0%}"
    )
    if kib:
        print(
            f"  VmRSS: {kib[0] / 1024:.0f} MiB at start, {soak.reference_kib / 1024:.0f} MiB at "
            f"{soak.reference_seconds:.0f} s, after that {soak.low:+.1%} .. {soak.high:+.1%} of it, "
            f"{soak.final:+.1%} at the end; {len(kib)} samples; plot: {soak.plot}"
        )
    if soak.held and kib:
        peak_at, peak_kib = max(soak.samples, key=lambda sample: sample[1])
        held_at_peak = min(soak.held, key=lambda sample: abs(sample[0] - peak_at))[1]
        held = sorted(n for _, n in soak.held)
        print(
            f"  events held in the pipeline (pipeline_memory_events, once a second): median {fmt_int(held[len(held) // 2])}, "
            f"max {fmt_int(held[-1])}; at the highest VmRSS ({peak_kib / 1024:.0f} MiB, {peak_at:.0f} s) {fmt_int(held_at_peak)}"
        )
    for note in soak.notes:
        print(f"  note: {note}")


# -- the summary ---------------------------------------------------------------------------------


def verdict(met: bool, why: str, noise: str = "") -> str:
    """`met`, or `NOT MET: why`; `noise` (other load on a CPU the figure depends on) qualifies either."""
    if met:
        return f"met (but {noise}: the figure is shaky)" if noise else "met"
    return f"NOT MET: {why}" + (f"; {noise}" if noise else "")


def noisy(*shares: tuple[str, float]) -> str:
    """`CPU 0 not quiet: others took 31% in (d)` for every (where, share) above the warning level."""
    loud = [f"{share:.0%} {where}" for where, share in shares if share > OTHERS_CPU_WARNING]
    return f"not quiet: others took {', '.join(loud)}" if loud else ""


def single_why(rounds, phase: str, baseline: str) -> str:
    """Why a single-event ratio is low, from the medians of its rounds."""
    def med_of(name: str, getter) -> float:
        return median_or_zero([getter(getattr(r, name)) for r in rounds])

    server = med_of(phase, lambda p: p.server_cpu_share)
    wrk = med_of(baseline, lambda p: p.wrk_share)
    us = med_of(phase, lambda p: p.cpu_us_per_request)
    base_us = med_of(baseline, lambda p: p.cpu_us_per_request)
    cost = f"{us:.0f} us CPU/req vs the bare handler's {base_us:.0f} ({ratio(us, base_us):.2f}x)"
    if server >= BOUND:
        reasons = [f"server CPU {server:.0%}: clickpulse-bound, {cost}"]
    else:
        reasons = [f"server CPU only {server:.0%} (not the limit alone), {cost}"]
    if wrk >= BOUND:
        reasons.append(f"wrk {wrk:.0%} of CPU {LOAD_CPU} in ({baseline}): the baseline is load-bound, the gap is larger")
    return "; ".join(reasons)


def rounds_noise(rounds, *letters: str) -> str:
    return noisy(*(
        (f"of CPU {SERVICE_CPU} in ({letter}) (median)", median_or_zero([getattr(r, letter).others_share for r in rounds]))
        for letter in letters
    ))


def alone_label(alone: StoreAlone, reference: StoreAlone | None, phase: str, landed_rate: float) -> str:
    """How a store-alone run is named: before/after the phase it is the baseline of, or as the
    reference at clickpulse's own insert size, with the phase's landed rate against it."""
    if alone is not reference:
        return f"{alone.label} ({phase})"
    rows_per_insert = fmt_int(ratio(int(alone.result["rows"]), int(alone.result["inserts"])))
    return (f"in {rows_per_insert}-row inserts, as clickpulse's default BATCH_SIZE makes them (a reference, "
            f"not the baseline: ({phase}) landed {ratio(landed_rate, alone.rate):.2f}x of it)")


def best_alone(alones: list[StoreAlone]) -> StoreAlone:
    """The fastest of the baseline's runs: other load only ever slows a run down."""
    return max(alones, key=lambda alone: alone.rate)


def alone_runs(alones: list[StoreAlone]) -> str:
    if len(alones) == 1:
        return ""
    return " (best of " + ", ".join(f"{alone.label} {fmt_int(alone.rate)}" for alone in alones) + ")"


def summary(run: Run, parts: Parts) -> list[list[str]]:
    rows: list[list[str]] = []
    single = parts.single
    if single is not None:
        rounds = single.rounds
        n = len(rounds)
        a = median_or_zero([r.a.requests_per_second for r in rounds])
        for letter, getter, target, label in (
            ("b", lambda r: r.b_over_a, TARGET_SINGLE_RATIO, "1. single events, memory acks, no keys: (b)/(a) req/s"),
            ("e", lambda r: r.e_over_a, TARGET_EDGE_RATIO, "1. single events, key + CORS + enrichment: (e)/(a) req/s"),
        ):
            value = median_or_zero([getter(r) for r in rounds])
            rate = median_or_zero([getattr(r, letter).requests_per_second for r in rounds])
            per_round = ", ".join(f"{getter(r):.2f}" for r in rounds)
            rows.append([
                label, f"{value:.2f} (median of {n}; {fmt_int(rate)} req/s)", f"(a) bare handler {fmt_int(a)} req/s",
                f">= {target:.2f}",
                verdict(value >= target, f"{single_why(rounds, letter, 'a')}; per round {per_round}",
                        rounds_noise(rounds, "a", letter)),
            ])
    counted = parts.instructions
    if counted is not None:
        a = counted.per_request["a"]
        for letter, target, label in (
            ("b", TARGET_SINGLE_RATIO, "1. (b), instructions: (a)'s per request ÷ (b)'s"),
            ("e", TARGET_EDGE_RATIO, "1. (e), instructions: (a)'s per request ÷ (e)'s"),
        ):
            value = counted.over_a(letter)
            rows.append([
                label, f"{value:.3f} ({fmt_int(counted.per_request[letter])}/request)",
                f"(a) bare handler {fmt_int(a)}/request", f">= {target:.2f}",
                verdict(value >= target, "callgrind: the same whatever the machine does; the kernel's part not counted"),
            ])
    batches = parts.batches
    if batches is not None:
        floors = batches.floors
        for phase, floor_us, label in (
            (batches.events, floors.events_us if floors else None, "2. 1000-event batches, POST /events: CPU us/event"),
            (batches.segment, floors.segment_us if floors else None, "2. 1000-message batches, POST /v1/batch: CPU us/event"),
        ):
            if phase is None:
                continue
            value = phase.cpu_us_per_event
            why = f"{ratio(value, floor_us):.1f}x the floor" if floor_us else "no floor measured"
            if floors:
                own = floors.clickpulse_events_us if phase is batches.events else floors.clickpulse_segment_us
                why += (
                    f"; clickpulse's decode + encode in-process {own:.2f}, the other "
                    f"{value - own:.2f} HTTP, pipeline, insert and that code running slower under load"
                )
            counted_batches = parts.instructions.batches if parts.instructions else None
            if counted_batches is not None:
                letter = "c" if phase is batches.events else "f"
                why += (
                    f"; by instructions the codec is {ratio(counted_batches.own_code[letter], counted_batches.service[letter]):.0%} "
                    f"of the process ({fmt_int(counted_batches.own_code[letter])} of {fmt_int(counted_batches.service[letter])}"
                    f"/event, floor {fmt_int(counted_batches.plain[letter])})"
                )
            why += f"; server CPU {phase.server_cpu_share:.0%}"
            rows.append([
                label, f"{value:.2f}", f"floor {floor_us:.2f} (plain msgspec)" if floor_us else "-",
                f"<= {TARGET_BATCH_US_PER_EVENT:.2f}",
                verdict(value <= TARGET_BATCH_US_PER_EVENT, why, noisy((f"of CPU {SERVICE_CPU}", phase.others_share))),
            ])
    if batches is not None and parts.clickhouse_alone:
        alone = best_alone(parts.clickhouse_alone)
        c = batches.events
        value = ratio(batches.landed_rate, alone.rate)
        shares = batches.landed_shares
        load_busy, clickhouse, server = shares.get("cpu1", 0.0), shares.get("clickhouse", 0.0), shares.get("clickpulse", 0.0)
        alone_share = alone.shares.get("clickhouse", 0.0)
        others = max(0.0, load_busy - clickhouse - c.wrk_share)
        per_row = clickhouse * batches.landed_seconds * 1e6 / batches.landed_rows if batches.landed_rows else 0.0
        reasons = []
        if load_busy >= BOUND:
            # ClickHouse is the bottleneck on a busy CPU 1: say who else took it, if anyone did.
            sharers = [(f"wrk {c.wrk_share:.0%}", c.wrk_share), (f"other processes {others:.0%}", others)]
            sharing = [text for text, share in sharers if share > OTHERS_CPU_WARNING]
            reasons.append(
                f"ClickHouse-bound: it had {clickhouse:.0%} of CPU {LOAD_CPU} against {alone_share:.0%} alone"
                + (f", sharing it with {' and '.join(sharing)}" if sharing else "")
            )
        if server >= BOUND:
            reasons.append(f"server CPU {server:.0%}: clickpulse-bound")
        if not reasons:
            reasons.append(
                f"neither CPU saturated (clickpulse {server:.0%} of CPU {SERVICE_CPU}, CPU {LOAD_CPU} {load_busy:.0%} "
                f"busy, ClickHouse {clickhouse:.0%} against {alone_share:.0%} alone)"
            )
        reasons.append(
            f"ClickHouse CPU {per_row:.2f} us/row against "
            f"{alone.clickhouse_us_per_row:.2f} alone"
        )
        reasons.append(f"{batches.last_row_after_last_answer:.2f} s of the {batches.landed_seconds:.2f} s waited for the "
                       "last partial batch")
        alone_others = max(0.0, alone.shares.get("cpu1", 0.0) - alone_share - alone.client_share)
        noise = noisy((f"of CPU {LOAD_CPU} in (c)", others), (f"of CPU {LOAD_CPU} in ClickHouse alone", alone_others))
        rows.append([
            "3. landed in ClickHouse: (c) events/s first request → last row",
            f"{fmt_int(batches.landed_rate)} = {value:.2f}x",
            f"ClickHouse alone {fmt_int(alone.rate)} rows/s{alone_runs(parts.clickhouse_alone)}",
            f">= {TARGET_LANDED_RATIO:.2f}x", verdict(value >= TARGET_LANDED_RATIO, "; ".join(reasons), noise),
        ])
    if single is not None:
        rounds = single.rounds
        value = median_or_zero([r.d_over_b for r in rounds])
        server = median_or_zero([r.d.server_cpu_share for r in rounds])
        cpu = median_or_zero([r.cpu_d_over_b for r in rounds])
        if server < 0.85:
            why = f"server CPU {server:.0%}: waiting for fsync (spool on {single.spool_filesystem})"
        else:
            why = f"server CPU {server:.0%}: clickpulse-bound, a disk-ack request costs {cpu:.2f}x the CPU of a memory-ack one"
        rows.append([
            "4. disk acks: (d)/(b) req/s", f"{value:.2f} (median of {len(rounds)})",
            f"(b) memory acks {fmt_int(median_or_zero([r.b.requests_per_second for r in rounds]))} req/s",
            f">= {TARGET_DISK_RATIO:.2f}",
            verdict(value >= TARGET_DISK_RATIO, f"{why}; per round " + ", ".join(f"{r.d_over_b:.2f}" for r in rounds),
                    rounds_noise(rounds, "b", "d")),
        ])
    if counted is not None and f"d@{CONCURRENT}" in counted.per_request:
        value = counted.disk_over_memory
        rows.append([
            f"4. disk acks, instructions: (b)'s per request ÷ (d)'s, {CONCURRENT} connections",
            f"{value:.3f} ({fmt_int(counted.per_request[f'd@{CONCURRENT}'])}/request)",
            f"(b) memory acks {fmt_int(counted.per_request[f'b@{CONCURRENT}'])}/request", f">= {TARGET_DISK_RATIO:.2f}",
            verdict(value >= TARGET_DISK_RATIO, "callgrind: the same whatever the machine does; fsync and the write, in the kernel, not counted"),
        ])
    embedded = parts.embedded
    if embedded is not None and embedded.alones:
        alone = best_alone(embedded.alones)
        value = ratio(embedded.landed_rate, alone.rate)
        events = embedded.phase.accepted_events or 1
        result = alone.result
        chdb_us = embedded.other_threads_seconds * 1e6 / events
        wrk_us = embedded.phase.cpu.wrk_seconds * 1e6 / events
        alone_us = result['cpu_seconds'] * 1e6 / result['rows']
        # What the target leaves the event loop: the core's time per event at the target rate,
        # less what chDB and wrk took per event in (g).
        budget_us = alone_us / TARGET_EMBEDDED_RATIO - chdb_us - wrk_us
        why = (
            f"one core for all: clickpulse's event loop {embedded.main_thread_seconds * 1e6 / events:.2f} us/event + "
            f"its chDB threads {chdb_us:.2f} + wrk {wrk_us:.2f}, against chDB alone {alone_us:.2f} us/row; "
            f"{TARGET_EMBEDDED_RATIO:.2f}x would leave the event loop {budget_us:.2f} us/event"
        )
        alone_others = max(0.0, alone.shares.get("cpu0", 0.0) - result["cpu_seconds"] / result["seconds"])
        noise = noisy((f"of CPU {SERVICE_CPU} in (g)", embedded.phase.others_share),
                      (f"of CPU {SERVICE_CPU} in chDB alone", alone_others))
        rows.append([
            "5. embedded default: (g) events/s landed in chDB, one core",
            f"{fmt_int(embedded.landed_rate)} = {value:.2f}x",
            f"chDB alone {fmt_int(alone.rate)} rows/s{alone_runs(embedded.alones)}",
            f">= {TARGET_EMBEDDED_RATIO:.2f}x", verdict(value >= TARGET_EMBEDDED_RATIO, why, noise),
        ])
    soak = parts.soak
    if soak is not None and soak.samples:
        reasons = []
        if soak.high > TOLERANCE:
            reasons.append(f"RSS grew to {soak.high:+.0%} of its level at {soak.reference_seconds:.0f} s")
        if soak.low < -TOLERANCE:
            reasons.append(f"RSS fell to {soak.low:+.0%} of its level at {soak.reference_seconds:.0f} s")
        if reasons and soak.after:
            reasons.append(
                f"it swung {min(soak.after) / 1024:.0f}-{max(soak.after) / 1024:.0f} MiB; the last minute's median is "
                f"{soak.last_minute_median / soak.reference_kib - 1:+.0%} of it"
            )
        if not soak.after:
            reasons.append("no samples after the reference time")
        shortfall = soak.achieved_rate < 0.95 * soak.rate
        rows.append([
            f"6. memory flat: soak {soak.phase.window:.0f} s at {fmt_int(soak.achieved_rate)} req/s, "
            f"p99 {fmt_ms(soak.phase.values['p99_us'])}",
            f"VmRSS {soak.low:+.1%} .. {soak.high:+.1%} (last minute's median {soak.last_minute_median / soak.reference_kib - 1:+.1%})",
            f"VmRSS around {soak.reference_seconds:.0f} s (median) {soak.reference_kib / 1024:.0f} MiB",
            f"within ±{TOLERANCE:.0%}",
            verdict(soak.flat, "; ".join(reasons))
            + (f" (but only {fmt_int(soak.achieved_rate)} of {fmt_int(soak.rate)} req/s achieved)" if shortfall else ""),
        ])
    return rows


def print_summary(run: Run, parts: Parts) -> None:
    print("summary, one line per target (each against its baseline from this run):")
    print_table(summary(run, parts), ["target", "figure", "baseline (same run)", "target", "verdict"], left=(0, -1))
    print()
    checks = [[what, f"{fmt_int(rows)} vs {fmt_int(acked)}", "equal", "OK" if rows == acked else "MISMATCH"]
              for what, rows, acked in run.rows_checks]
    checks += [
        [f"exit status after SIGTERM, {service.label}", str(service.exit_status), "0",
         "OK" if service.exit_status == 0 else "FAILED"]
        for service in run.services
    ]
    checks += [
        [f"peak RSS (VmHWM), {service.label}", f"{service.peak_rss_kib / 1024:.1f} MiB", "", ""]
        for service in run.services
    ]
    print_table(checks, ["check", "value", "expected", ""], left=(0, -1))
