"""The edge on the real application: ingest keys, CORS, rate limits, bodies, the query route."""

from __future__ import annotations

import asyncio
import base64
import gzip
import logging
import zlib
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
import zstandard

from clickpulse.http.keys import KeyFileError, KeyStore, load_keys
from tests.http.conftest import MAX_BODY_BYTES, App, MakeApp, encode, event_object, json_error
from tests.support import ManualClock

SERVER_SECRET = "sk_live_0123456789abcdef"
BROWSER_SECRET = "pk_live_fedcba9876543210"
KEYS_TOML = f"""
[[keys]]
name = "backend"
secret = "{SERVER_SECRET}"
kind = "server"

[[keys]]
name = "landing"
secret = "{BROWSER_SECRET}"
kind = "browser"
origins = ["https://shop.example", "https://*.shop.example"]
events_per_second = 1
burst = 3
"""
ONE = encode(event_object(0))


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys.toml"
    path.write_text(KEYS_TOML)
    return path


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"}


def stored_keys(app: App) -> list[str | None]:
    return [
        msgspec.json.decode(line).get("source_key")
        for delivery in app.pipeline.deliveries for line in delivery.rows.splitlines()
    ]


# -- ingest keys ---------------------------------------------------------------------------------


async def test_with_keys_a_write_without_one_is_401_with_the_bearer_challenge(make_app: MakeApp, keys_file: Path) -> None:
    app = await make_app(keys_file=keys_file)

    response = await app.post(ONE)

    assert "ingest key" in await json_error(response, 401)
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="clickpulse"'
    assert app.pipeline.deliveries == []


async def test_an_unknown_key_is_401_and_the_answer_names_no_key(make_app: MakeApp, keys_file: Path) -> None:
    app = await make_app(keys_file=keys_file)

    response = await app.client.post("/events", data=ONE, headers=bearer("sk_live_guessed_0000000000"))

    error = await json_error(response, 401)
    assert "backend" not in error and "landing" not in error and "sk_live" not in error
    assert app.pipeline.deliveries == []


async def test_a_server_key_as_bearer_or_basic_user_is_accepted_and_its_name_stored(
    make_app: MakeApp, keys_file: Path
) -> None:
    app = await make_app(keys_file=keys_file)
    basic = base64.b64encode(f"{SERVER_SECRET}:".encode()).decode()

    first = await app.client.post("/events", data=ONE, headers=bearer(SERVER_SECRET))
    second = await app.client.post("/events", data=ONE, headers={"Authorization": f"Basic {basic}", "Content-Type": "application/json"})

    assert (first.status, second.status) == (202, 202)
    assert stored_keys(app) == ["backend", "backend"]
    metrics = await app.metrics_text()
    assert 'ingest_key_events_total{key="backend"} 2' in metrics
    assert 'ingest_key_events_total{key="landing"} 0' in metrics
    assert SERVER_SECRET not in metrics and BROWSER_SECRET not in metrics


async def test_every_spelling_of_a_bearer_header_is_read_alike_and_a_blank_one_is_none(
    make_app: MakeApp, keys_file: Path
) -> None:
    app = await make_app(keys_file=keys_file)
    spellings = (f"Bearer {SERVER_SECRET}", f"Bearer   {SERVER_SECRET}  ", f"bearer {SERVER_SECRET}",
                 f"  BEARER {SERVER_SECRET}")

    def authorization(value: str) -> dict[str, str]:
        return {"Authorization": value, "Content-Type": "application/json"}

    accepted = [
        (await app.client.post("/events", data=ONE, headers=authorization(spelling))).status for spelling in spellings
    ]
    blank = await app.client.post("/events", data=ONE, headers=authorization("Bearer    "))
    # A header's key is the request's key: one in the query beside it is not looked at.
    both = await app.post(ONE, query=f"key={BROWSER_SECRET}", headers=bearer(SERVER_SECRET))

    assert accepted == [202] * len(spellings)
    assert "an ingest key is needed" in await json_error(blank, 401)
    assert both.status == 202
    assert stored_keys(app) == ["backend"] * (len(spellings) + 1)


async def test_a_key_header_with_bytes_that_are_not_utf8_or_ascii_is_a_401_not_a_500(
    make_app: MakeApp, keys_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app = await make_app(keys_file=keys_file)
    body = encode(event_object(0))

    def request(authorization: bytes) -> bytes:
        return (
            b"POST /events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: " + authorization + b"\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body
        )

    with caplog.at_level(logging.INFO):
        not_utf8 = await raw_request(app, request(b"Bearer sk_\xff\xfe" + SERVER_SECRET.encode()))
        basic_not_ascii = await raw_request(app, request("Basic \u00e9t\u00e9".encode()))

    assert not_utf8.startswith(b"HTTP/1.1 401"), not_utf8[:200]
    assert b"unknown ingest key" in not_utf8
    assert basic_not_ascii.startswith(b"HTTP/1.1 401"), basic_not_ascii[:200]
    assert b"an ingest key is needed" in basic_not_ascii
    assert app.pipeline.deliveries == []
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR or record.exc_info]


async def test_a_server_key_in_the_url_is_refused(make_app: MakeApp, keys_file: Path) -> None:
    app = await make_app(keys_file=keys_file)

    response = await app.post(ONE, query=f"key={SERVER_SECRET}")

    assert "Authorization header" in await json_error(response, 401)
    assert app.pipeline.deliveries == []


async def test_a_browser_key_in_the_url_from_its_origin_is_accepted(make_app: MakeApp, keys_file: Path) -> None:
    app = await make_app(keys_file=keys_file)

    exact = await app.post(ONE, "text/plain", query=f"key={BROWSER_SECRET}", headers={"Origin": "https://shop.example"})
    sub = await app.post(ONE, "text/plain", query=f"key={BROWSER_SECRET}", headers={"Origin": "https://www.shop.example"})

    assert (exact.status, sub.status) == (202, 202)
    assert exact.headers["Access-Control-Allow-Origin"] == "https://shop.example"
    assert exact.headers["Vary"] == "Origin"
    assert stored_keys(app) == ["landing", "landing"]


@pytest.mark.parametrize("origin", [None, "https://evil.example", "https://shop.example.evil", "http://shop.example"])
async def test_a_browser_key_from_another_origin_or_none_is_403(
    make_app: MakeApp, keys_file: Path, origin: str | None
) -> None:
    app = await make_app(keys_file=keys_file)
    headers = {"Origin": origin} if origin else {}

    response = await app.post(ONE, "text/plain", query=f"key={BROWSER_SECRET}", headers=headers)

    await json_error(response, 403)
    assert "Access-Control-Allow-Origin" not in response.headers
    assert app.pipeline.deliveries == []
    assert 'requests_rejected_total{reason="forbidden"} 1' in await app.metrics_text()


async def test_sighup_reload_swaps_keys_and_a_bad_file_keeps_the_old_ones(
    make_app: MakeApp, keys_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app = await make_app(keys_file=keys_file)
    rotated = "sk_live_rotated_1111111111"
    keys_file.write_text(f'[[keys]]\nname = "backend"\nsecret = "{rotated}"\nkind = "server"\n')
    app.http.edge.reload()

    assert (await app.client.post("/events", data=ONE, headers=bearer(SERVER_SECRET))).status == 401
    assert (await app.client.post("/events", data=ONE, headers=bearer(rotated))).status == 202

    keys_file.write_text('[[keys]]\nname = "backend"\nsecret = "short"\nkind = "server"\n')
    with caplog.at_level(logging.WARNING):
        app.http.edge.reload()
    assert (await app.client.post("/events", data=ONE, headers=bearer(rotated))).status == 202
    assert "keeping the 1 keys in use" in caplog.text and "keys[0]" in caplog.text
    assert rotated not in caplog.text and "short" not in caplog.text.replace("shutting", "")


@pytest.mark.parametrize(("text", "expected"), [
    ("[[keys]\n", "not TOML"),
    ('[[keys]]\nname = "a"\nsecret = "sk_live_0123456789abcdef"\nkind = "server"\ncolour = "red"\n', "keys[0] (name 'a'): unknown field 'colour'"),
    ('[[keys]]\nname = "a"\nsecret = "sk_live_0123456789abcdef"\nkind = "server"\n'
     '[[keys]]\nname = "a"\nsecret = "sk_live_0123456789abcdeg"\nkind = "server"\n', "keys[1] (name 'a'): duplicate name"),
    ('[[keys]]\nname = "a"\nsecret = "sk_live_0123456789abcdef"\nkind = "server"\n'
     '[[keys]]\nname = "b"\nsecret = "sk_live_0123456789abcdef"\nkind = "server"\n', "keys[1] (name 'b'): duplicate secret"),
    ('[[keys]]\nname = "a"\nsecret = "pk_live_0123456789abcdef"\nkind = "browser"\n', "needs `origins`"),
    ('[[keys]]\nname = "a"\nsecret = "pk_live_0123456789abcdef"\nkind = "browser"\norigins = ["shop"]\n', "not an origin"),
    ('[[keys]]\nname = "none"\nsecret = "sk_live_0123456789abcdef"\nkind = "server"\n', "reserved"),
])
def test_a_bad_keys_file_names_the_file_and_the_entry_in_one_line(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(text)

    with pytest.raises(KeyFileError) as caught:
        load_keys(path)

    message = str(caught.value)
    assert str(path) in message and expected in message and "\n" not in message
    assert "0123456789abcde" not in message


def test_keys_are_never_shown_by_repr(keys_file: Path) -> None:
    ring = KeyStore(keys_file).ring
    assert SERVER_SECRET not in repr(ring.keys) and "digest" not in repr(ring.keys)


# -- CORS ----------------------------------------------------------------------------------------


async def test_preflight_from_an_allowed_origin_is_204_with_the_cors_headers(make_app: MakeApp) -> None:
    app = await make_app(cors_origins=("https://app.example",))

    response = await app.client.options("/events", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    })

    assert response.status == 204
    assert response.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert response.headers["Access-Control-Allow-Methods"] == "POST"
    assert response.headers["Access-Control-Allow-Headers"] == "Content-Type, Authorization, Content-Encoding"
    assert int(response.headers["Access-Control-Max-Age"]) > 0
    assert response.headers["Vary"] == "Origin"


async def test_an_allowed_origin_in_capitals_is_allowed_and_answered_as_sent(make_app: MakeApp) -> None:
    app = await make_app(cors_origins=("https://app.example",))

    response = await app.post(ONE, headers={"Origin": "HTTPS://App.Example"})

    assert response.status == 202
    assert response.headers["Access-Control-Allow-Origin"] == "HTTPS://App.Example"


async def test_preflight_and_post_from_another_origin_get_no_cors_headers_and_store_nothing(
    make_app: MakeApp, keys_file: Path
) -> None:
    app = await make_app(cors_origins=("https://app.example",))

    preflight = await app.client.options("/events", headers={"Origin": "https://evil.example"})
    post = await app.post(ONE, "text/plain", headers={"Origin": "https://evil.example"})

    assert not any(name.startswith("Access-Control") for name in preflight.headers)
    await json_error(post, 403)
    assert not any(name.startswith("Access-Control") for name in post.headers)
    assert app.pipeline.deliveries == []


async def test_browser_key_origins_are_allowed_for_cors_too(make_app: MakeApp, keys_file: Path) -> None:
    app = await make_app(keys_file=keys_file)

    response = await app.client.options("/events", headers={"Origin": "https://a.shop.example"})

    assert response.headers["Access-Control-Allow-Origin"] == "https://a.shop.example"


async def test_without_cors_or_keys_a_request_with_an_origin_is_served_as_today(app: App) -> None:
    response = await app.post(ONE, headers={"Origin": "https://anywhere.example"})

    assert response.status == 202
    assert "Access-Control-Allow-Origin" not in response.headers


# -- rate limits ---------------------------------------------------------------------------------


async def test_a_key_over_its_burst_is_429_with_retry_after_and_nothing_stored(
    make_app: MakeApp, keys_file: Path
) -> None:
    clock = ManualClock()
    app = await make_app(keys_file=keys_file, clock=clock)
    headers = {"Origin": "https://shop.example"}
    query = f"key={BROWSER_SECRET}"

    ok = await app.post(encode([event_object(0), event_object(1)]), query=query, headers=headers)
    limited = await app.post(encode([event_object(2), event_object(3)]), query=query, headers=headers)

    assert ok.status == 202
    assert ok.headers["RateLimit-Remaining"] == "1"
    assert "rate limit" in await json_error(limited, 429)
    assert limited.headers["Retry-After"] == "1"
    assert limited.headers["RateLimit-Limit"] == "3"
    assert limited.headers["RateLimit-Remaining"] == "1"
    assert int(limited.headers["RateLimit-Reset"]) >= 1
    assert limited.headers["Access-Control-Allow-Origin"] == "https://shop.example"
    assert len(app.pipeline.deliveries) == 1
    clock.advance(1.0)
    assert (await app.post(encode([event_object(2), event_object(3)]), query=query, headers=headers)).status == 202
    assert 'requests_rejected_total{reason="rate_limited"} 1' in await app.metrics_text()


async def test_per_address_limits_follow_x_forwarded_for_only_from_trusted_proxies(make_app: MakeApp) -> None:
    clock = ManualClock()
    trusting = await make_app(rate_limit=1, rate_burst=1, trusted_proxies="127.0.0.0/8", clock=clock)
    distrusting = await make_app(rate_limit=1, rate_burst=1, clock=clock)

    for app, expected in ((trusting, [202, 202, 429]), (distrusting, [202, 429, 429])):
        statuses = [
            (await app.post(ONE, headers={"X-Forwarded-For": forwarded})).status
            for forwarded in ("203.0.113.1", "203.0.113.2", "203.0.113.1")
        ]
        assert statuses == expected


def test_per_address_state_is_bounded() -> None:
    from clickpulse.http.ratelimit import TokenBuckets

    buckets = TokenBuckets(1.0, 1, ManualClock(), max_entries=100)
    for index in range(10_000):
        buckets.take(f"10.0.{index // 256}.{index % 256}", 1)
    assert len(buckets) == 100


# -- bodies --------------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "deflate-raw", "zstd"])
async def test_compressed_bodies_are_decoded(app: App, encoding: str) -> None:
    body = encode([event_object(0), event_object(1)])
    if encoding == "gzip":
        data = gzip.compress(body)
    elif encoding == "deflate":
        data = zlib.compress(body)
    elif encoding == "deflate-raw":
        compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        data = compressor.compress(body) + compressor.flush()
    else:
        data = zstandard.ZstdCompressor().compress(body)

    response = await app.post(data, headers={"Content-Encoding": encoding.removesuffix("-raw")})

    assert response.status == 202, await response.text()
    assert app.pipeline.submitted_types == [["type_0", "type_1"]]


@pytest.mark.parametrize("encoding", ["gzip", "zstd"])
async def test_a_body_inflating_beyond_max_body_bytes_is_413(app: App, encoding: str) -> None:
    inflated = b"[" + b" " * (MAX_BODY_BYTES * 20) + b"]"
    data = gzip.compress(inflated) if encoding == "gzip" else zstandard.ZstdCompressor().compress(inflated)
    assert len(data) < MAX_BODY_BYTES

    response = await app.post(data, headers={"Content-Encoding": encoding})

    assert "once decoded" in await json_error(response, 413)


async def test_an_unknown_or_broken_encoding_is_a_clear_4xx(app: App) -> None:
    unknown = await app.post(ONE, headers={"Content-Encoding": "br2"})
    broken = await app.post(b"not gzip at all", headers={"Content-Encoding": "gzip"})

    assert "Content-Encoding" in await json_error(unknown, 415)
    assert "gzip" in await json_error(broken, 400)


async def test_beyond_max_inflight_body_bytes_is_503_with_retry_after(make_app: MakeApp) -> None:
    # A body still arriving is counted (a body aiohttp already holds whole is simply read).
    app = await make_app(max_inflight_body_bytes=100)

    async def streamed() -> AsyncIterator[bytes]:
        body = encode([event_object(index) for index in range(3)])
        yield body[:10]
        await asyncio.sleep(0.1)
        yield body[10:]

    response = await app.post(streamed())  # type: ignore[arg-type]  # chunked: no Content-Length

    assert "MAX_INFLIGHT_BODY_BYTES" in await json_error(response, 503)
    assert response.headers["Retry-After"] == "1"
    assert app.http.edge.inflight_body_bytes == 0


async def raw_request(app: App, data: bytes, then_close: bool = False, read: bool = True) -> bytes:
    server = app.client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(data)
    await writer.drain()
    if then_close:
        writer.close()
        await asyncio.sleep(0.2)
        return b""
    answer = await asyncio.wait_for(reader.read(), 5) if read else b""
    writer.close()
    return answer


async def test_a_slow_body_is_408_the_connection_closed_and_counted(
    make_app: MakeApp, caplog: pytest.LogCaptureFixture
) -> None:
    app = await make_app(body_timeout=0.2)
    head = b"POST /events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"

    with caplog.at_level(logging.INFO):
        answer = await raw_request(app, head + b'{"event')

    assert answer.startswith(b"HTTP/1.1 408")  # and read() returned: the server closed the connection
    assert 'requests_rejected_total{reason="timeout"} 1' in await app.metrics_text()
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR or record.exc_info]


async def test_a_client_hanging_up_mid_body_is_counted_without_a_traceback(
    make_app: MakeApp, caplog: pytest.LogCaptureFixture
) -> None:
    app = await make_app()
    head = b"POST /events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"

    with caplog.at_level(logging.DEBUG):
        await raw_request(app, head + b'{"event', then_close=True)
        await asyncio.sleep(0.1)

    assert 'requests_rejected_total{reason="client_disconnected"} 1' in await app.metrics_text()
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR or record.exc_info]
    assert "client faults" in caplog.text and "client_disconnected=1" in caplog.text


# -- the query route -----------------------------------------------------------------------------


async def test_query_route_refuses_what_does_not_read(make_app: MakeApp) -> None:
    asked: list[str] = []

    async def query(sql: str, output_format: str = "PrettyCompactMonoBlock") -> str:
        asked.append(sql)
        return "1\n"

    app = await make_app(query=query)
    for sql, expected in [
        ("SELECT 1; DROP TABLE events", "exactly one statement"),
        ("SELECT * FROM file('/etc/passwd', 'LineAsString')", "file()"),
        ("SELECT * FROM url('http://127.0.0.1:1/', 'CSV', 'a String')", "url()"),
        ("SELECT * FROM remoteSecure('h', system.one)", "remotesecure()"),
        ("SELECT 1 INTO OUTFILE '/tmp/x'", "OUTFILE"),
        ("SELECT 1 SETTINGS readonly = 0", "SETTINGS"),
        ("INSERT INTO events VALUES (1)", "only statements that read"),
    ]:
        response = await app.client.post("/query", data=sql)
        assert expected in await json_error(response, 400), sql
    assert asked == []
    assert (await app.client.post("/query", data="SELECT 1;")).status == 200
    assert asked == ["SELECT 1"]


async def test_with_keys_the_query_route_needs_a_server_key(make_app: MakeApp, keys_file: Path) -> None:
    async def query(sql: str, output_format: str = "PrettyCompactMonoBlock") -> str:
        return "1\n"

    app = await make_app(keys_file=keys_file, query=query)

    without = await app.client.post("/query", data="SELECT 1")
    browser = await app.client.post("/query", data="SELECT 1", headers={"Authorization": f"Bearer {BROWSER_SECRET}"})
    server = await app.client.post("/query", data="SELECT 1", headers={"Authorization": f"Bearer {SERVER_SECRET}"})

    await json_error(without, 401)
    await json_error(browser, 401)
    assert server.status == 200


async def test_basic_with_the_secret_as_password_and_an_empty_user_is_accepted(make_app: MakeApp, keys_file: Path) -> None:
    app = await make_app(keys_file=keys_file)
    basic = base64.b64encode(f":{SERVER_SECRET}".encode()).decode()

    response = await app.post(ONE, headers={"Authorization": f"Basic {basic}"})

    assert response.status == 202
