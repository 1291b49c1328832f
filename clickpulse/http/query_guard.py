"""The /query route's and the `query` command's statement check: exactly one statement that
reads, without the table functions that reach files or the network, without INTO OUTFILE and
without a SETTINGS clause. It is a second wall: the statement then runs with ClickHouse's own
`readonly = 1` (over HTTP as a request setting; on the embedded store as a trailing SETTINGS
clause, which this check makes sure nothing can comment out or precede)."""

from __future__ import annotations

import re

READ_ONLY_STATEMENTS = frozenset({"SELECT", "WITH", "SHOW", "DESCRIBE", "DESC", "EXISTS", "EXPLAIN"})
# Table functions (and engines usable as such) that read or write files, other servers or
# processes. Lower case; matched as a bare word followed by `(`.
REFUSED_FUNCTIONS = frozenset({
    "file", "filecluster", "url", "urlcluster", "remote", "remotesecure", "cluster", "clusterallreplicas",
    "s3", "s3cluster", "gcs", "oss", "cosn", "azureblobstorage", "azureblobstoragecluster", "hdfs", "hdfscluster",
    "mysql", "postgresql", "sqlite", "mongodb", "redis", "executable", "executablepool", "jdbc", "odbc",
    "input", "deltalake", "deltalakecluster", "hudi", "hudicluster", "iceberg", "icebergs3", "icebergcluster",
    "icebergazure", "iceberghdfs", "icebergs3cluster", "paimon", "arrowflight", "ytsaurus", "dictionary",
})
REFUSED_WORDS = frozenset({"outfile", "settings"})
_TOKEN = re.compile(
    r"""\s+|--[^\n]*|/\*.*?\*/|'(?:[^'\\]|\\.|'')*'|"(?:[^"\\]|\\.)*"|`(?:[^`\\]|\\.)*`|([A-Za-z_][A-Za-z0-9_]*)|(.)""",
    re.S,
)
MAX_QUERY_LENGTH = 100_000
READONLY_SUFFIX = "\nSETTINGS readonly = 1"


class QueryRefused(ValueError):
    """The statement is not one this route runs; the message says why."""


def check_query(sql: str) -> str:
    """The statement, without a trailing `;`, or QueryRefused."""
    sql = sql.strip()
    if not sql:
        raise QueryRefused("empty query: send one SELECT, SHOW, DESCRIBE, EXISTS or EXPLAIN statement")
    if len(sql) > MAX_QUERY_LENGTH:
        raise QueryRefused(f"query longer than {MAX_QUERY_LENGTH} characters")
    words: list[str] = []
    previous_word: str | None = None
    position = 0
    end_of_statement: int | None = None
    while position < len(sql):
        match = _TOKEN.match(sql, position)
        if match is None:  # an unterminated string, quoted name or comment
            raise QueryRefused("unterminated string, quoted name or comment")
        word, symbol = match.group(1), match.group(2)
        if symbol == "/" and sql.startswith("/*", position):
            raise QueryRefused("unterminated comment")
        if symbol in ("'", '"', "`"):
            raise QueryRefused("unterminated string or quoted name")
        if end_of_statement is not None and (word or symbol):
            raise QueryRefused("exactly one statement per query: nothing may follow `;`")
        if symbol == ";":
            end_of_statement = match.start()
        elif word:
            lowered = word.lower()
            if lowered in REFUSED_WORDS:
                raise QueryRefused(f"{word.upper()} is not allowed in a query here")
            words.append(lowered)
            previous_word = lowered
        elif symbol == "(" and previous_word in REFUSED_FUNCTIONS:
            raise QueryRefused(f"table function {previous_word}() reaches files or the network; not allowed here")
        token = match.group(0)
        if token[:1] in ('"', "`"):  # a quoted name may name a table function too
            previous_word = token[1:-1].lower()
        elif not word and symbol is not None and symbol != "(":
            previous_word = None
        position = match.end()
    if not words or words[0].upper() not in READ_ONLY_STATEMENTS:
        raise QueryRefused(f"only statements that read: {', '.join(sorted(READ_ONLY_STATEMENTS))}")
    return sql[:end_of_statement].rstrip() if end_of_statement is not None else sql


def readonly_statement(sql: str) -> str:
    """The checked statement with ClickHouse's readonly setting attached, for the embedded store."""
    return check_query(sql) + READONLY_SUFFIX
