"""Part `instructions`: target 1 read without the machine's noise.

(a) the bare handler, (b) clickpulse with memory acks and (e) clickpulse with an ingest key, CORS
and enrichment each run under valgrind's callgrind, which counts the instructions the process
executes in user space (Python, aiohttp, msgspec, every library; not the kernel), the same
whatever else the host does: on a shared machine, where req/s swings by tens of percent from
minute to minute, two versions of the code compare exactly.

Each runs twice, answering `WARMUP + FEWER` and then `WARMUP + MORE` single-event POSTs sent one
after another on one keep-alive connection; (second total - first total) / (MORE - FEWER) is the
instructions per request, with start-up, warm-up and shutdown cancelled out. (a)/(b) is what
(b)/(a) in req/s would be if a request's time were its instructions. The kernel's part (the
same socket calls for all three: one recvfrom, one sendto per request) is not counted, so on an
otherwise quiet machine the req/s ratio is a little nearer 1 than this one.

Disk acks (target 4), the same way but with `CONCURRENT` connections sending at once, (b)'s
settings beside (d)'s: one fsync pass covers every request waiting when it starts, which one
connection at a time would never let happen; (b) at CONCURRENT connections ÷ (d) at CONCURRENT
connections is the (d)/(b) req/s ratio if time were instructions (the fsync's own time, in the
kernel, not counted).

Batches (target 2), the same way: (b)'s settings answering `BATCH_WARMUP + BATCH_FEWER` and then
`BATCH_WARMUP + BATCH_MORE` 1000-event POST /events (c) and 1000-message POST /v1/batch (f), and
beside them, each in a process of its own under callgrind, the floor's pieces of work
(bench/floor.py `Works`): clickpulse's own decode + encode of the same body, and plain msgspec's.
Their difference per event is what HTTP, the pipeline and the insert add to the codec, in the
one unit that does not drift with the machine.
"""

from __future__ import annotations

import http.client
import re
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from harness import BENCH, SERVICE_CPU, child_env, free_port, http_status, start_clickpulse, wait_for_rows, wait_until
from phases import EDGE_HEADERS, KEY_NAME, KEY_SECRET, ORIGIN, Run

WARMUP = 300  # requests before the counted ones: imports done, caches and the allocator warm
FEWER = 200
MORE = 1200
CONCURRENT = 32  # connections sending at once for the disk-ack pair, "b@32" and "d@32"
BATCH_WARMUP = 5
BATCH_FEWER = 5
BATCH_MORE = 25
CODEC_FEWER = 10  # calls of one piece of work over a whole batch body
CODEC_MORE = 30
TOTALS = re.compile(rb"^(?:summary|totals): (\d+)", re.MULTILINE)


@dataclass
class BatchInstructions:
    """Instructions per event of a batch body, for "c" (POST /events) and "f" (POST /v1/batch)."""

    service: dict[str, float]  # the whole clickpulse process answering them
    own_code: dict[str, float]  # clickpulse's decode + encode of the body alone, in-process
    plain: dict[str, float]  # plain msgspec decode + encode_lines of it: the floor


@dataclass
class Instructions:
    per_request: dict[str, float]  # "a", "b", "e", and "b@32", "d@32" (CONCURRENT) → instructions per request
    batches: BatchInstructions | None = None

    def over_a(self, letter: str) -> float:
        """(a)'s instructions ÷ this one's: the req/s ratio if time were instructions."""
        return self.per_request["a"] / self.per_request[letter] if self.per_request.get(letter) else 0.0

    @property
    def disk_over_memory(self) -> float:
        """(b)'s instructions ÷ (d)'s, both at CONCURRENT connections: target 4 without the noise."""
        disk = self.per_request.get(f"d@{CONCURRENT}")
        return self.per_request[f"b@{CONCURRENT}"] / disk if disk else 0.0


def valgrind() -> str | None:
    return shutil.which("valgrind")


def run_instructions(run: Run) -> Instructions:
    keys = run.workdir / "instructions-keys.toml"
    keys.write_text(f'[[keys]]\nname = "{KEY_NAME}"\nsecret = "{KEY_SECRET}"\nkind = "server"\n')
    plain = {"Content-Type": "application/json"}
    edge = {**plain, **EDGE_HEADERS}
    # One flush, at shutdown: under callgrind a request takes ~50x as long, so a flush every
    # FLUSH_INTERVAL would carry a few dozen rows instead of thousands and its insert would be
    # counted against each request many times over what it costs under load. The final insert
    # (500 or 1500 rows) still counts: the rows' share of it is in the difference.
    unflushed = {"ACK_MODE": "memory", "FLUSH_INTERVAL": "1h"}
    setups = {
        "a": ({}, plain),
        "b": (unflushed, plain),
        "e": ({**unflushed, "INGEST_KEYS_FILE": str(keys), "CORS_ORIGINS": ORIGIN, "ENRICH_IP": "true"}, edge),
    }
    per_request: dict[str, float] = {}
    for letter, (settings, headers) in setups.items():
        fewer, more = (_count(run, letter, settings, headers, WARMUP + requests) for requests in (FEWER, MORE))
        per_request[letter] = (more - fewer) / (MORE - FEWER)
        print(f"bench: ({letter}) under callgrind: {per_request[letter]:,.0f} instructions per request", flush=True)
    for letter, settings in (("b", unflushed), ("d", {**unflushed, "ACK_MODE": "disk"})):
        counts = []
        for requests in (FEWER, MORE):
            spool = {"SPOOL_DIR": str(run.workdir / f"callgrind-spool-{requests}")} if letter == "d" else {}
            counts.append(_count(run, f"{letter}@{CONCURRENT}", {**settings, **spool}, plain, WARMUP + requests,
                                 connections=CONCURRENT))
        per_request[f"{letter}@{CONCURRENT}"] = (counts[1] - counts[0]) / (MORE - FEWER)
        print(f"bench: ({letter}) under callgrind at {CONCURRENT} connections: "
              f"{per_request[f'{letter}@{CONCURRENT}']:,.0f} instructions per request", flush=True)
    return Instructions(per_request, _count_batches(run, unflushed))


def _count_batches(run: Run, settings: dict[str, str]) -> BatchInstructions:
    bodies = run.bodies
    counts = BatchInstructions({}, {}, {})
    for letter, path, body, own_work, plain_work in (
        ("c", "/events", bodies.batch, "clickpulse_events", "plain_events"),
        ("f", "/v1/batch", bodies.segment, "clickpulse_segment", "plain_segment"),
    ):
        fewer, more = (
            _count(run, letter, settings, {"Content-Type": "application/json"}, BATCH_WARMUP + requests,
                   path=path, body=body.read_bytes(), events_per_request=bodies.batch_events)
            for requests in (BATCH_FEWER, BATCH_MORE)
        )
        counts.service[letter] = (more - fewer) / ((BATCH_MORE - BATCH_FEWER) * bodies.batch_events)
        for work, into in ((own_work, counts.own_code), (plain_work, counts.plain)):
            fewer, more = (_count_work(run, work, times) for times in (CODEC_FEWER, CODEC_MORE))
            into[letter] = (more - fewer) / ((CODEC_MORE - CODEC_FEWER) * bodies.batch_events)
        print(
            f"bench: ({letter}) {path} batches under callgrind: {counts.service[letter]:,.0f} instructions per event; "
            f"clickpulse's decode + encode alone {counts.own_code[letter]:,.0f}, plain msgspec {counts.plain[letter]:,.0f}",
            flush=True,
        )
    return counts


def _count_work(run: Run, work: str, times: int) -> int:
    """Instructions of a process that does one of bench/floor.py's pieces of work `times` times."""
    output = run.workdir / f"callgrind-{work}-{times}.out"
    subprocess.run(
        ["taskset", "-c", SERVICE_CPU, valgrind() or "valgrind", "--tool=callgrind", f"--callgrind-out-file={output}",
         sys.executable, str(BENCH / "floor.py"), work, str(times), str(run.bodies.batch), str(run.bodies.segment)],
        env=child_env(), cwd=BENCH, stdin=subprocess.DEVNULL, capture_output=True, check=True, timeout=600,
    )
    return _total(output)


def _total(output: Path) -> int:
    totals = [int(value) for value in TOTALS.findall(output.read_bytes())]
    if not totals:
        raise RuntimeError(f"callgrind wrote no totals to {output}")
    return max(totals)


def _count(
    run: Run, letter: str, settings: dict[str, str], headers: dict[str, str], requests: int, *,
    path: str = "/events", body: bytes | None = None, events_per_request: int = 1, connections: int = 1,
) -> int:
    """Instructions of one whole process's life that answered `requests` POSTs of `body` (the
    single event unless given) to `path`, sent over `connections` at once."""
    body = run.bodies.single.read_bytes() if body is None else body
    output = run.workdir / f"callgrind-{letter}-{requests}.out"
    tool = [valgrind() or "valgrind", "--tool=callgrind", f"--callgrind-out-file={output}"]
    if letter == "a":
        port = free_port()
        log = run.workdir / f"callgrind-{letter}-{requests}.stderr.log"
        with open(log, "wb") as stderr:
            process = subprocess.Popen(
                ["taskset", "-c", SERVICE_CPU, *tool, sys.executable, str(BENCH / "bare_handler.py"), str(port)],
                env=child_env(), stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr,
            )
        run.processes.append(process)
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: http_status(f"{url}/events", run.bodies.single.read_bytes(), 5.0) == 202,
                   process, "bare handler under callgrind", log, 180.0)
        _send(port, headers, body, requests - 1)  # the probe was one
        process.terminate()
        status = process.wait(timeout=60)
        if status not in (0, -15):
            run.anomalies.append(f"the bare handler under callgrind exited with status {status}")
    else:
        service = start_clickpulse(
            f"clickpulse ({letter}) under callgrind", run.server, run.workdir, f"callgrind-{letter}-{requests}.stderr.log",
            prefix=tool, **settings,
        )
        run.processes.append(service.process)
        service.wait_ready(180.0)
        port = int(service.url.rsplit(":", 1)[1])
        _send_concurrently(port, headers, body, requests, path, connections)
        anomalies: list[str] = []
        status = service.stop(anomalies)
        run.anomalies.extend(anomalies)
        if status != 0:
            run.anomalies.append(f"{service.label} exited with status {status}")
        assert run.server is not None
        events = requests * events_per_request
        run.check_rows(f"rows vs 2xx-acked events, ({letter}) {path} under callgrind, {requests} requests",
                       wait_for_rows(run.server, service.database, events, 30.0), events)
    return _total(output)


def _send_concurrently(port: int, headers: dict[str, str], body: bytes, requests: int, path: str, connections: int) -> None:
    """`requests` POSTs, spread over `connections` threads with a keep-alive connection each."""
    if connections == 1:
        _send(port, headers, body, requests, path)
        return
    failures: list[BaseException] = []

    def send_share(share: int) -> None:
        try:
            _send(port, headers, body, share, path)
        except BaseException as error:  # re-raised below, in the caller's thread
            failures.append(error)

    shares = [requests // connections + (index < requests % connections) for index in range(connections)]
    threads = [threading.Thread(target=send_share, args=(share,)) for share in shares]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]


def _send(port: int, headers: dict[str, str], body: bytes, requests: int, path: str = "/events") -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        for _ in range(requests):
            connection.request("POST", path, body, headers)
            response = connection.getresponse()
            response.read()
            if response.status not in (200, 202):
                raise RuntimeError(f"POST {path} under callgrind answered {response.status}, not 2xx")
    finally:
        connection.close()
