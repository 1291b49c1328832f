"""A real browser: Debian's headless Chromium loads a page this test serves on its own origin;
the page runs the README's browser snippet (fetch() with JSON, so preflighted, and sendBeacon())
against a real clickpulse writing to ClickHouse 18.16. From an origin that is not allowed, nothing
is stored. No test tool downloads a browser: Chromium comes from apt (.ci/run)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import skip_or_fail
from tests.integration.conftest import count_rows, eventually, metric_samples, running_service
from tests.servers import ClickHouseServer
from tests.support import stop_process

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parents[2] / "README.md"
BROWSER_SECRET = "pk_live_browser_test_000001"
CHROMIUM_FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-default-apps",
    "--disable-extensions", "--metrics-recording-only", "--password-store=basic", "--use-mock-keychain",
)

# Reports what the snippet did back to the page's own server: the fetch() status it logs, or
# the error of a fetch the browser refused (CORS), once both sends had time to go.
HARNESS = """<!doctype html><html><body><div id="result">running</div><script>
const report = (what) => fetch("/report", {method: "POST", body: what});
const log = console.log;
console.log = (...args) => { log(...args); if (args[0] === "clickpulse") report("fetch " + args[1]); };
window.addEventListener("unhandledrejection", (event) => report("fetch failed " + event.reason));
</script><script>
SNIPPET
</script></body></html>"""


def readme_snippet() -> str:
    match = re.search(r"```js\n// clickpulse browser snippet\n(.*?)```", README.read_text(), re.S)
    assert match, "README has no browser snippet"
    return match.group(1)


def page_for(collector: str) -> str:
    snippet = readme_snippet()
    snippet = re.sub(r'const collector = "[^"]*";', f'const collector = "{collector}";', snippet)
    snippet = re.sub(r'const key = "[^"]*";', f'const key = "{BROWSER_SECRET}";', snippet)
    assert collector in snippet and BROWSER_SECRET in snippet
    return HARNESS.replace("SNIPPET", snippet)


@pytest.fixture
def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        skip_or_fail("no chromium (apt-get install chromium)")
    assert path is not None
    return path


async def visit(chromium: str, url: str, profile: Path, reports: asyncio.Queue[str]) -> str:
    """Opens `url` in a fresh headless Chromium until the page reports; returns the report."""
    process = subprocess.Popen(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", url],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
    )
    try:
        return await asyncio.wait_for(reports.get(), 60)
    finally:
        await asyncio.to_thread(stop_process, process, 10)


async def test_a_real_browser_sends_with_fetch_and_sendbeacon_only_from_an_allowed_origin(
    clickhouse_server: ClickHouseServer, clickhouse_database: str, chromium: str, tmp_path: Path
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        html_holder: list[str] = []
        allowed_url, allowed_reports = await stack.enter_async_context(page_server(html_holder))
        denied_url, denied_reports = await stack.enter_async_context(page_server(html_holder))
        denied_url = denied_url.replace("127.0.0.1", "localhost")
        keys = tmp_path / "keys.toml"
        keys.write_text(
            f'[[keys]]\nname = "site"\nsecret = "{BROWSER_SECRET}"\nkind = "browser"\norigins = ["{allowed_url}"]\n'
        )
        service = await stack.enter_async_context(running_service(
            clickhouse_server.dsn(clickhouse_database), INGEST_KEYS_FILE=str(keys), FLUSH_INTERVAL="100ms",
        ))
        collector = f"http://127.0.0.1:{service.port}"
        html_holder.append(page_for(collector))

        report = await visit(chromium, allowed_url, tmp_path / "profile-allowed", allowed_reports)
        assert report == "fetch 202"

        async def both_stored() -> bool:
            return await count_rows(clickhouse_server, clickhouse_database) == 2

        await eventually(both_stored, timeout=20)
        stored = await clickhouse_server.aquery(
            f"SELECT event_type, source_key FROM {clickhouse_database}.events ORDER BY event_type"
        )
        assert stored.split("\n")[:2] == ["page_hide\tsite", "page_view\tsite"]

        report = await visit(chromium, denied_url, tmp_path / "profile-denied", denied_reports)
        assert report.startswith("fetch failed")  # the preflight had no CORS headers

        async with aiohttp.ClientSession() as http:
            async def beacon_refused() -> bool:
                async with http.get(collector + "/metrics") as response:
                    samples = metric_samples(await response.text())
                return samples['requests_rejected_total{reason="forbidden"}'] >= 1

            await eventually(beacon_refused, timeout=20)
            async with http.get(collector + "/metrics") as response:
                samples = metric_samples(await response.text())
        # The allowed page's fetch() was preflighted, and so was the denied page's (refused).
        assert samples['http_requests_total{method="OPTIONS",path="/events",status="204"}'] >= 2
        await asyncio.sleep(0.5)  # a flush interval and more
        assert await count_rows(clickhouse_server, clickhouse_database) == 2


@contextlib.asynccontextmanager
async def page_server(html_holder: list[str]) -> AsyncIterator[tuple[str, asyncio.Queue[str]]]:
    """Serves html_holder[0] at / on 127.0.0.1 (its own origin; filled in once the collector's
    port is known) and collects what the page reports."""
    reports: asyncio.Queue[str] = asyncio.Queue()

    async def page(request: web.Request) -> web.Response:
        return web.Response(text=html_holder[0], content_type="text/html")

    async def report(request: web.Request) -> web.Response:
        await reports.put(await request.text())
        return web.Response(status=204)

    app = web.Application()
    app.router.add_get("/", page)
    app.router.add_post("/report", report)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", reports
    finally:
        await runner.cleanup()


# -- analytics.js (@segment/analytics-next), self-hosted -----------------------------------------

ANALYTICS_JS = Path(__file__).resolve().parents[1] / "js" / "node_modules" / "@segment" / "analytics-next" / "dist" / "umd"
ANALYTICS_PAGE = """<!doctype html><html><head><title>analytics.js test</title></head><body>
<script src="/analytics.js"></script><script>
SNIPPET
</script></body></html>"""


def analytics_page_for(collector: str) -> str:
    match = re.search(r"```js\n// clickpulse analytics.js snippet\n(.*?)```", README.read_text(), re.S)
    assert match, "README has no analytics.js snippet"
    snippet = re.sub(r'writeKey: "[^"]*"', f'writeKey: "{BROWSER_SECRET}"', match.group(1))
    snippet = re.sub(r'cdnURL: "[^"]*"', f'cdnURL: "{collector}"', snippet)
    assert collector in snippet and BROWSER_SECRET in snippet
    return ANALYTICS_PAGE.replace("SNIPPET", snippet)


async def test_analytics_js_self_hosted_sends_a_page_and_a_track_that_land_as_rows(
    clickhouse_server: ClickHouseServer, clickhouse_database: str, chromium: str, tmp_path: Path
) -> None:
    if not (ANALYTICS_JS / "index.js").is_file():
        skip_or_fail("no @segment/analytics-next in tests/js/node_modules (cd tests/js && npm ci)")
    html_holder: list[str] = []

    async def page(request: web.Request) -> web.Response:
        return web.Response(text=html_holder[0], content_type="text/html")

    async def script(request: web.Request) -> web.FileResponse:
        return web.FileResponse(ANALYTICS_JS / "index.js")

    app = web.Application()
    app.router.add_get("/", page)
    app.router.add_get("/analytics.js", script)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    origin = f"http://127.0.0.1:{runner.addresses[0][1]}"
    keys = tmp_path / "keys.toml"
    keys.write_text(f'[[keys]]\nname = "site"\nsecret = "{BROWSER_SECRET}"\nkind = "browser"\norigins = ["{origin}"]\n')
    try:
        async with running_service(
            clickhouse_server.dsn(clickhouse_database), INGEST_KEYS_FILE=str(keys), FLUSH_INTERVAL="100ms",
        ) as service:
            html_holder.append(analytics_page_for(f"http://127.0.0.1:{service.port}"))
            process = subprocess.Popen(
                [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile-ajs'}", origin + "/"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
            )
            try:
                async def both_stored() -> bool:
                    return await count_rows(clickhouse_server, clickhouse_database) >= 2

                await eventually(both_stored, timeout=60)
            finally:
                await asyncio.to_thread(stop_process, process, 10)
    finally:
        await runner.cleanup()
    text = await clickhouse_server.aquery(
        "SELECT event_type, source, source_key, user_id, anonymous_id, properties, context "
        f"FROM {clickhouse_database}.events ORDER BY event_type FORMAT JSONEachRow"
    )
    rows = [json.loads(line) for line in text.splitlines() if line]
    assert [row["event_type"] for row in rows] == ["$page", "Signed Up"]
    for row in rows:
        assert (row["source"], row["source_key"], row["user_id"]) == ("site", "site", None)
        assert row["anonymous_id"]  # analytics.js's own anonymous id, the same for both
        context = json.loads(row["context"])
        assert context["library"]["name"] == "analytics.js"
        assert context["page"]["url"] == origin + "/"
        assert "Chrome" in context["userAgent"] and context["ip"] == "127.0.0.1"
    assert rows[0]["anonymous_id"] == rows[1]["anonymous_id"]
    page_properties, track_properties = (json.loads(row["properties"]) for row in rows)
    assert page_properties["name"] == "Home" and page_properties["category"] == "Docs"
    assert page_properties["section"] == {"depth": 2} and page_properties["url"] == origin + "/"
    assert track_properties == {"plan": {"tier": "pro", "seats": [1, 2]}}
