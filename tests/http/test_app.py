"""The application: routing errors in JSON, health, readiness and metrics."""

from __future__ import annotations



from tests.http.conftest import (
    App,
    encode,
    event_object,
    json_error,
)


# -- routing errors ---------------------------------------------------------------------------


async def test_get_events_is_405_with_allow_header_and_json(app: App) -> None:
    response = await app.client.get("/events")

    await json_error(response, 405)
    assert "POST" in response.headers["Allow"]


async def test_unknown_path_is_404_json(app: App) -> None:
    response = await app.client.get("/nope")

    await json_error(response, 404)


async def test_post_to_unknown_path_is_404_json(app: App) -> None:
    response = await app.client.post("/events/extra", data=encode(event_object()))

    await json_error(response, 404)
    assert app.pipeline.deliveries == []


# -- health -----------------------------------------------------------------------------------


async def test_healthz_is_200_ok(app: App) -> None:
    response = await app.client.get("/healthz")

    assert response.status == 200
    assert await response.json() == {"status": "ok"}


async def test_healthz_stays_ok_while_not_ready(app: App) -> None:
    app.pipeline.not_ready = "clickhouse not reachable"

    response = await app.client.get("/healthz")

    assert response.status == 200


async def test_readyz_is_200_when_ready(app: App) -> None:
    response = await app.client.get("/readyz")

    assert response.status == 200
    assert (await response.json())["status"] == "ready"


async def test_readyz_is_503_with_the_reason_when_not_ready(app: App) -> None:
    app.pipeline.not_ready = "clickhouse not reachable: connection: refused"

    response = await app.client.get("/readyz")

    assert response.status == 503
    assert (await response.json())["reason"] == "clickhouse not reachable: connection: refused"


async def test_readyz_follows_the_reason_as_it_changes(app: App) -> None:
    app.pipeline.not_ready = "writer actor is not running"
    assert (await app.client.get("/readyz")).status == 503

    app.pipeline.not_ready = None
    assert (await app.client.get("/readyz")).status == 200


# -- metrics ----------------------------------------------------------------------------------


async def test_metrics_count_requests_by_route_template_and_status(app: App) -> None:
    for _ in range(2):
        assert (await app.post(encode(event_object()))).status == 202
    assert (await app.post(b"{")).status == 400

    text = await app.metrics_text()

    assert 'http_requests_total{method="POST",path="/events",status="202"} 2' in text
    assert 'http_requests_total{method="POST",path="/events",status="400"} 1' in text
    assert app.metrics.receiver.events_received.get({}) == 2
    assert app.metrics.receiver.requests_rejected.get({"reason": "invalid"}) == 1


async def test_metrics_never_use_request_data_as_label_values(app: App) -> None:
    assert (await app.client.get("/secret-xyz")).status == 404
    assert (await app.client.post("/secret-abc?token=qqq", data=b"{}")).status == 404
    assert (await app.client.request("PROPFIND", "/secret-dav")).status == 404
    assert (await app.post(encode(event_object(0, source="secret-src")), "application/secret-type")).status == 415

    text = await app.metrics_text()

    assert "secret" not in text
    assert "PROPFIND" not in text
    assert "qqq" not in text
    assert 'path="unmatched",status="404"' in text


async def test_metrics_content_type_is_prometheus_text(app: App) -> None:
    response = await app.client.get("/metrics")

    assert response.status == 200
    assert response.content_type == "text/plain"
    assert "# TYPE http_requests_total counter" in await response.text()
