"""Segment's official SDKs, unchanged, sending to a real `python -m clickpulse` that writes to
ClickHouse 18.16: segment-analytics-python (PyPI) and @segment/analytics-node (npm, in tests/js,
installed by .ci/run with `npm ci`). Rows are read back and compared field by field; then what
SDKs meet on a bad day: clock skew, a retried batch, wrong keys, oversize messages, one bad
message in a batch."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import shutil
import subprocess
import sys
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import skip_or_fail
from tests.integration.conftest import count_rows, eventually
from tests.servers import ClickHouseServer

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
JS = ROOT / "tests" / "js"
README = ROOT / "README.md"
SECRET = "sk_live_segment_sdk_0000001"
BROWSER_SECRET = "pk_live_segment_sdk_0000002"
COLUMNS = (
    "event_id, event_type, source, source_key, user_id, anonymous_id, properties, context, "
    "toUnixTimestamp(created_at) AS created, toUnixTimestamp(received_at) AS received, "
    "toUnixTimestamp(original_timestamp) AS original"
)
NESTED = {"plan": {"tier": "pro", "seats": [1, 2, 3]}, "price": 19.99, "big": 9007199254740991, "ok": True,
          "text": "naïve \"quoted\" \u2603"}


def keys_toml(origin: str = "http://127.0.0.1") -> str:
    return (
        f'[[keys]]\nname = "backend"\nsecret = "{SECRET}"\nkind = "server"\n\n'
        f'[[keys]]\nname = "web"\nsecret = "{BROWSER_SECRET}"\nkind = "browser"\norigins = ["{origin}"]\n'
    )


def basic(secret: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{secret}:".encode()).decode()}


async def rows(server: ClickHouseServer, database: str, where: str = "") -> list[dict[str, Any]]:
    text = await server.aquery(f"SELECT {COLUMNS} FROM {database}.events {where} ORDER BY created_at, event_type FORMAT JSONEachRow")
    return [json.loads(line) for line in text.splitlines() if line]


async def wait_rows(server: ClickHouseServer, database: str, expected: int) -> None:
    async def enough() -> bool:
        return await count_rows(server, database) >= expected

    await eventually(enough, timeout=20)


def calls(prefix: str, when: datetime) -> list[dict[str, Any]]:
    """The six calls, as the Node SDK's params (the Python test maps them onto its API)."""
    ts = lambda seconds: (when + timedelta(seconds=seconds)).isoformat()  # noqa: E731
    return [
        {"method": "track", "params": {"userId": f"{prefix}-u", "event": "Order Completed", "properties": NESTED,
                                       "timestamp": ts(0), "messageId": str(uuid.uuid4())}},
        {"method": "page", "params": {"anonymousId": f"{prefix}-a", "name": "Home", "category": "Docs",
                                      "properties": {"url": "https://shop.example/"}, "timestamp": ts(1),
                                      "messageId": f"{prefix}-page-1"}},
        {"method": "screen", "params": {"userId": f"{prefix}-u", "name": "Settings", "properties": {"dark": True},
                                        "timestamp": ts(2), "messageId": str(uuid.uuid4())}},
        {"method": "identify", "params": {"userId": f"{prefix}-u", "traits": {"email": "a@b.example", "nested": NESTED},
                                          "timestamp": ts(3), "messageId": str(uuid.uuid4())}},
        {"method": "group", "params": {"userId": f"{prefix}-u", "groupId": "g-42", "traits": {"size": 12},
                                       "timestamp": ts(4), "messageId": str(uuid.uuid4())}},
        {"method": "alias", "params": {"userId": f"{prefix}-u", "previousId": f"{prefix}-a", "timestamp": ts(5),
                                       "messageId": str(uuid.uuid4())}},
    ]


def expected_properties(call: dict[str, Any]) -> dict[str, Any]:
    params, method = call["params"], call["method"]
    if method in ("identify", "group"):
        own = params.get("traits", {})
    else:
        own = params.get("properties", {})
    extra: dict[str, Any] = {}
    if method in ("page", "screen"):
        extra = {key: params[key] for key in ("name", "category") if key in params}
    elif method == "group":
        extra = {"groupId": params["groupId"]}
    elif method == "alias":
        extra = {"previousId": params["previousId"]}
    return {**extra, **own}


def check_rows(got: list[dict[str, Any]], sent: list[dict[str, Any]], when: datetime, library: str) -> None:
    assert len(got) == len(sent)
    for row, call in zip(got, sent):
        params, method = call["params"], call["method"]
        assert row["event_type"] == (params["event"] if method == "track" else f"${method}")
        message_id = params["messageId"]
        try:
            expected_id = str(uuid.UUID(message_id))
        except ValueError:
            expected_id = str(uuid.uuid5(uuid.UUID("6f1c2a8e-4b1d-5e0a-9c3f-0c11c4a9e512"), message_id))
        assert row["event_id"] == expected_id
        assert row["source"] == "backend" and row["source_key"] == "backend"
        assert row["user_id"] == params.get("userId")
        assert row["anonymous_id"] == params.get("anonymousId")
        assert json.loads(row["properties"]) == expected_properties(call), method
        context = json.loads(row["context"])
        assert context["library"]["name"] == library
        assert context["ip"] == "127.0.0.1"
        timestamp = datetime.fromisoformat(params["timestamp"])
        assert int(row["original"]) == int(timestamp.timestamp())
        assert abs(int(row["created"]) - timestamp.timestamp()) <= 2  # sentAt ≈ received: no skew to fix
        assert abs(int(row["received"]) - datetime.now(timezone.utc).timestamp()) < 120


@pytest.fixture
def node() -> str:
    path = shutil.which("node")
    if path is None or not (JS / "node_modules" / "@segment" / "analytics-node").is_dir():
        skip_or_fail("no node or tests/js/node_modules (apt-get install nodejs npm; cd tests/js && npm ci)")
    assert path is not None
    return path


@pytest.fixture
def segment_python() -> Any:
    try:
        from segment.analytics import Client
    except ImportError:
        skip_or_fail("segment-analytics-python is not installed (pip install -e '.[test]')")
    return Client


def send_python(client_class: Any, host: str, key: str, sent: list[dict[str, Any]], errors: list[Any]) -> None:
    client = client_class(
        write_key=key, host=host, sync_mode=True, gzip=True, max_retries=0,
        on_error=lambda error, batch: errors.append(error),
    )
    for call in sent:
        try:
            send_one(client, call)
        except Exception as error:  # noqa: BLE001 - sync_mode raises the APIError
            errors.append(error)
    client.flush()


def send_one(client: Any, call: dict[str, Any]) -> None:
    params = dict(call["params"])
    method = call["method"]
    kwargs: dict[str, Any] = {
        "user_id": params.pop("userId", None), "anonymous_id": params.pop("anonymousId", None),
        "timestamp": datetime.fromisoformat(params.pop("timestamp")), "message_id": params.pop("messageId"),
    }
    if method == "track":
        client.track(event=params["event"], properties=params["properties"], **kwargs)
    elif method in ("page", "screen"):
        getattr(client, method)(category=params.get("category"), name=params["name"],
                                properties=params["properties"], **kwargs)
    elif method == "identify":
        client.identify(traits=params["traits"], **kwargs)
    elif method == "group":
        client.group(group_id=params["groupId"], traits=params["traits"], **kwargs)
    elif method == "alias":
        kwargs.pop("anonymous_id")
        client.alias(previous_id=params["previousId"], **kwargs)


def run_node(node: str, url: str, key: str, sent: list[dict[str, Any]]) -> str:
    done = subprocess.run(
        [node, str(JS / "send_node.mjs"), url, key, json.dumps(sent)],
        capture_output=True, text=True, timeout=60, cwd=JS,
    )
    return (done.stdout + done.stderr).strip()


async def test_the_official_python_and_node_sdks_land_field_by_field(
    clickhouse_server: ClickHouseServer, clickhouse_database: str, start_service, tmp_path: Path,
    node: str, segment_python: Any,
) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text(keys_toml())
    service = start_service(
        CLICKHOUSE_DSN=clickhouse_server.dsn(clickhouse_database), INGEST_KEYS_FILE=str(keys), FLUSH_INTERVAL="100ms",
    )
    async with aiohttp.ClientSession() as http:
        await eventually(lambda: service.is_ready(http), timeout=20)
    when = datetime(2026, 3, 1, 12, 0, 0, tzinfo=timezone.utc)

    python_calls = calls("py", when)
    errors: list[Any] = []
    await asyncio.to_thread(send_python, segment_python, service.url, SECRET, python_calls, errors)
    assert errors == []
    await wait_rows(clickhouse_server, clickhouse_database, 6)
    check_rows(await rows(clickhouse_server, clickhouse_database, "WHERE user_id LIKE 'py-%' OR anonymous_id LIKE 'py-%'"),
               python_calls, when, "analytics-python")

    node_when = when + timedelta(hours=1)
    node_calls = calls("node", node_when)
    assert await asyncio.to_thread(run_node, node, service.url, SECRET, node_calls) == "sent"
    await wait_rows(clickhouse_server, clickhouse_database, 12)
    check_rows(await rows(clickhouse_server, clickhouse_database, "WHERE user_id LIKE 'node-%' OR anonymous_id LIKE 'node-%'"),
               node_calls, node_when, "@segment/analytics-node")

    # A wrong write key: the SDKs are told 401 and nothing is stored.
    errors.clear()
    await asyncio.to_thread(send_python, segment_python, service.url, "sk_wrong_key_00000000", calls("bad", when), errors)
    assert len(errors) == 6
    assert all((getattr(error, "status", None), getattr(error, "code", None)) == (401, "unauthorized") for error in errors)
    answer = await asyncio.to_thread(run_node, node, service.url, "sk_wrong_key_00000000", calls("bad", when))
    assert answer.startswith("error") and "401" in answer
    await asyncio.sleep(0.5)
    assert await count_rows(clickhouse_server, clickhouse_database) == 12
    assert "Traceback" not in service.log


async def test_skew_retries_keys_limits_and_all_or_nothing_over_http(
    clickhouse_server: ClickHouseServer, clickhouse_database: str, start_service, tmp_path: Path,
) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text(keys_toml())
    service = start_service(
        CLICKHOUSE_DSN=clickhouse_server.dsn(clickhouse_database), INGEST_KEYS_FILE=str(keys), FLUSH_INTERVAL="100ms",
    )
    url = service.url + "/v1/batch"
    async with aiohttp.ClientSession() as http:
        await eventually(lambda: service.is_ready(http), timeout=20)

        async def send(payload: object, headers: dict[str, str] | None = None, **kwargs: Any) -> tuple[int, Any]:
            async with http.post(url, json=payload, headers=headers if headers is not None else basic(SECRET),
                                 **kwargs) as response:
                return response.status, await response.json()

        # A device whose clock is an hour ahead: created_at is the server's idea of the time.
        now = datetime.now(timezone.utc)
        device = now + timedelta(hours=1)
        status, answer = await send({"batch": [
            {"type": "track", "event": "skewed", "userId": "u", "timestamp": (device - timedelta(minutes=10)).isoformat(),
             "messageId": "retry-me"},
        ], "sentAt": device.isoformat()})
        assert (status, answer) == (200, {"success": True})
        # The SDK retries the same batch: the same event_id, so the duplicate is recognisable.
        assert (await send({"batch": [{"type": "track", "event": "skewed", "userId": "u", "messageId": "retry-me",
                                       "timestamp": (device - timedelta(minutes=10)).isoformat()}],
                            "sentAt": device.isoformat()}))[0] == 200
        # Wrong, missing and body keys.
        assert (await send({"batch": [{"type": "track", "event": "x", "userId": "u"}]}, basic("sk_nope_0000000000")))[0] == 401
        assert (await send({"batch": [{"type": "track", "event": "x", "userId": "u"}]}, {}))[0] == 401
        assert (await send({"batch": [{"type": "track", "event": "body-key", "userId": "u"}], "writeKey": SECRET}, {}))[0] == 200
        # Oversize: one message of 40 KB (the limit is 32 KB), a batch of 600 KB.
        status, answer = await send({"batch": [{"type": "track", "event": "big", "userId": "u",
                                                "properties": {"x": "y" * 40_000}}]})
        assert status == 413 and "$.batch[0]" in answer["error"]
        many = [{"type": "track", "event": "many", "userId": "u", "properties": {"x": "y" * 20_000}}] * 30
        assert (await send({"batch": many}))[0] == 413
        # One bad message among good ones: none of them stored.
        status, answer = await send({"batch": [
            {"type": "track", "event": "good", "userId": "u"},
            {"type": "track", "event": "good", "userId": "u"},
            {"type": "track", "userId": "u"},
        ]})
        assert status == 400 and "$.batch[2]" in answer["error"]

        await wait_rows(clickhouse_server, clickhouse_database, 3)
        await asyncio.sleep(0.5)
        got = await rows(clickhouse_server, clickhouse_database)
        assert sorted(row["event_type"] for row in got) == ["body-key", "skewed", "skewed"]
        skewed = [row for row in got if row["event_type"] == "skewed"]
        assert skewed[0]["event_id"] == skewed[1]["event_id"]
        for row in skewed:
            assert abs(int(row["created"]) - (now - timedelta(minutes=10)).timestamp()) < 30
            assert abs(int(row["original"]) - (device - timedelta(minutes=10)).timestamp()) < 2
    assert "Traceback" not in service.log


def readme_block(marker: str) -> str:
    match = re.search(r"```\w+\n" + re.escape(marker) + r"\n(.*?)```", README.read_text(), re.S)
    assert match, f"README has no block starting {marker!r}"
    return match.group(1)


async def test_the_readmes_python_and_node_snippets_send_to_clickpulse(
    clickhouse_server: ClickHouseServer, clickhouse_database: str, start_service, tmp_path: Path,
    node: str, segment_python: Any,
) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text(keys_toml())
    service = start_service(
        CLICKHOUSE_DSN=clickhouse_server.dsn(clickhouse_database), INGEST_KEYS_FILE=str(keys), FLUSH_INTERVAL="100ms",
    )
    async with aiohttp.ClientSession() as http:
        await eventually(lambda: service.is_ready(http), timeout=20)

    def fill(snippet: str) -> str:
        filled = snippet.replace("https://clickpulse.example", service.url).replace("YOUR_INGEST_KEY", SECRET)
        assert service.url in filled and SECRET in filled
        return filled

    python_script = tmp_path / "snippet.py"
    python_script.write_text(fill(readme_block("# clickpulse python snippet")))
    done = await asyncio.to_thread(subprocess.run, [sys.executable, str(python_script)], capture_output=True,
                                   text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    node_script = JS / f"snippet-{uuid.uuid4().hex}.mjs"  # beside node_modules, so the import resolves
    node_script.write_text(fill(readme_block("// clickpulse node snippet")))
    try:
        done = await asyncio.to_thread(subprocess.run, [node, str(node_script)], capture_output=True, text=True,
                                       timeout=60, cwd=JS)
    finally:
        node_script.unlink()
    assert done.returncode == 0, done.stderr
    await wait_rows(clickhouse_server, clickhouse_database, 4)
    got = await rows(clickhouse_server, clickhouse_database)
    assert sorted((row["event_type"], json.loads(row["context"])["library"]["name"]) for row in got) == [
        ("$identify", "@segment/analytics-node"), ("$identify", "analytics-python"),
        ("Signed Up", "@segment/analytics-node"), ("Signed Up", "analytics-python"),
    ]
