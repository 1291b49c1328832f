"""The baselines of targets 3 and 5: the store alone ingesting the rows clickpulse would send.

    python bench/baseline.py clickhouse --url http://127.0.0.1:PORT/ --database DB --body FILE [--rows N]
    python bench/baseline.py chdb --path DIR --body FILE [--rows N]

Both first make at least `--rows` rows, the exact JSONEachRow lines clickpulse's POST /events
makes of the body in FILE (bench/bodies.py `EventsRows`: clickpulse's decoder, encoder and
enrichment; fresh event_ids for every repetition of the body), cut into `--rows-per-insert`-row
inserts (default 10,000, the issue's baseline; bench/run.py also runs one at clickpulse's default
BATCH_SIZE, as a reference), with the insert settings clickpulse
sends (clickpulse.clickhouse.INSERT_SETTINGS, and an insert_deduplication_token where the
server takes one, as the Writer does). Then, and only then, the clock starts:

- `clickhouse`: the inserts one after another over one keep-alive HTTP connection, as
  clickpulse's HttpClickHouse sends them, into DB.events (which must exist; bench/run.py creates
  it `AS` clickpulse's table). Run it pinned to the CPU wrk uses.
- `chdb`: a chDB session in DIR, the table created with clickpulse's DDL
  (clickpulse.schema.table_ddl, for chDB's version), each insert a `session.query` of the
  `INSERT … FORMAT JSONEachRow` line and the rows, as clickpulse's EmbeddedClickHouse does. Run
  it pinned to the one core the embedded clickpulse had.

Prints one JSON line: rows, inserts, seconds (first insert sent → last insert answered; started_at and
ended_at are CLOCK_MONOTONIC),
rows_per_second, count (count() afterwards), cpu_seconds of this process in that window (for
chDB: all its threads, i.e. chDB's own work) and its peak RSS.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import time
import urllib.parse
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bodies import insert_bodies  # noqa: E402
from clickpulse.clickhouse import INSERT_SETTINGS  # noqa: E402
from clickpulse.schema import capabilities_for, insert_query, table_ddl  # noqa: E402

try:  # the Writer's token: derived from the rows alone
    from clickpulse.writer.errors import deduplication_token
except ImportError as missing:  # moved on main: any stable digest of the rows serves
    if not (missing.name or "").startswith("clickpulse"):
        raise  # a dependency of the token itself is missing: not a moved module
    import hashlib

    def deduplication_token(body: bytes) -> str:
        return hashlib.blake2b(body, digest_size=16).hexdigest()


TABLE = "events"


def peak_rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def clickhouse(args: argparse.Namespace, inserts: list[bytes], rows: int) -> dict[str, object]:
    url = urllib.parse.urlsplit(args.url)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=120)

    def query(sql: str) -> str:
        connection.request("POST", "/", body=sql.encode(), headers={"X-ClickHouse-User": "default"})
        response = connection.getresponse()
        text = response.read().decode()
        if response.status != 200:
            raise RuntimeError(f"ClickHouse answered {response.status} to {sql!r}: {text}")
        return text

    capabilities = capabilities_for(query("SELECT version()").strip())
    requests = []
    for body in inserts:
        params = {**INSERT_SETTINGS, "query": insert_query(args.database, TABLE)}
        if capabilities.deduplicates_inserts:
            params["insert_deduplication_token"] = deduplication_token(body)
        requests.append(("/?" + urllib.parse.urlencode(params), body))
    headers = {"X-ClickHouse-User": "default", "Content-Type": "application/octet-stream"}
    cpu_started = time.process_time()
    started = time.monotonic()
    for path, body in requests:
        connection.request("POST", path, body=body, headers=headers)
        response = connection.getresponse()
        answer = response.read()
        if response.status != 200:
            raise RuntimeError(f"ClickHouse answered {response.status} to an insert: {answer.decode(errors='replace')}")
    ended = time.monotonic()
    seconds = ended - started
    cpu_seconds = time.process_time() - cpu_started
    count = int(query(f"SELECT count() FROM {args.database}.{TABLE}").strip())
    return {
        "store": f"ClickHouse {capabilities.version}", "rows": rows, "inserts": len(inserts), "seconds": seconds,
        "rows_per_second": rows / seconds, "count": count, "client_cpu_seconds": cpu_seconds,
        "started_at": started, "ended_at": ended,
    }


def chdb(args: argparse.Namespace, inserts: list[bytes], rows: int) -> dict[str, object]:
    from chdb import session as chdb_session

    Path(args.path).mkdir(parents=True, exist_ok=True)
    session = chdb_session.Session(args.path)
    capabilities = capabilities_for(str(session.query("SELECT version()", "TabSeparated")).strip())
    session.query(table_ddl("default", TABLE, capabilities), "TabSeparated")
    statements = []
    for body in inserts:
        settings = dict(INSERT_SETTINGS)
        if capabilities.deduplicates_inserts:
            settings["insert_deduplication_token"] = deduplication_token(body)
        statements.append(f"{insert_query('default', TABLE, settings)}\n{body.decode()}")
    inserts.clear()  # the statements hold the rows now; keep one copy in memory, not two
    cpu_started = time.process_time()
    started = time.monotonic()
    for statement in statements:
        session.query(statement, "TabSeparated")
    ended = time.monotonic()
    seconds = ended - started
    cpu_seconds = time.process_time() - cpu_started
    count = int(str(session.query(f"SELECT count() FROM default.{TABLE}", "TabSeparated")).strip())
    result = {
        "store": f"chDB {capabilities.version}", "rows": rows, "inserts": len(statements), "seconds": seconds,
        "rows_per_second": rows / seconds, "count": count, "cpu_seconds": cpu_seconds,
        "peak_rss_kib": peak_rss_kib(), "started_at": started, "ended_at": ended,
    }
    session.close()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("store", choices=("clickhouse", "chdb"))
    parser.add_argument("--body", required=True, help="a POST /events body (a JSON array of events)")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rows-per-insert", type=int, default=10_000)
    parser.add_argument("--url", help="clickhouse: the server's HTTP URL")
    parser.add_argument("--database", help="clickhouse: the database whose `events` table takes the rows")
    parser.add_argument("--path", help="chdb: the session's directory")
    args = parser.parse_args(argv)
    made = time.monotonic()
    inserts = insert_bodies(Path(args.body).read_bytes(), args.rows, args.rows_per_insert)
    rows = sum(body.count(b"\n") for body in inserts)
    made = time.monotonic() - made
    if args.store == "clickhouse":
        if not args.url or not args.database:
            parser.error("clickhouse needs --url and --database")
        result = clickhouse(args, inserts, rows)
    else:
        if not args.path:
            parser.error("chdb needs --path")
        result = chdb(args, inserts, rows)
    result["rows_made_in_seconds"] = made
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
