"""The OpenAPI document: valid OpenAPI 3.1, built from the Structs the server decodes with, one
path per route the application has, served at /openapi.json, and committed as docs/openapi.json."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
from openapi_spec_validator import validate

from clickpulse.events import SERVER_FIELDS, Event, server_column_schema
from clickpulse.openapi import encoded_document, openapi_document
from tests.http.conftest import App

DOCUMENT = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"


@pytest.mark.parametrize("with_query", [True, False])
def test_the_document_is_valid_openapi_3_1(with_query: bool) -> None:
    document = openapi_document(with_query=with_query)
    assert document["openapi"].startswith("3.1")
    validate(document)


def test_the_committed_document_is_the_generated_one() -> None:
    assert DOCUMENT.read_bytes() == encoded_document(), "run: python3 -c \"from clickpulse.openapi import encoded_document; open('docs/openapi.json','wb').write(encoded_document())\""


def test_the_event_schema_is_msgspecs_schema_of_the_struct_the_server_decodes() -> None:
    ours = openapi_document()["components"]["schemas"]["Event"]
    theirs = msgspec.json.schema_components(
        [Event], ref_template="#/components/schemas/{name}", schema_hook=server_column_schema
    )[1]["Event"]
    # Less the server's own columns, which a body may not carry.
    for name in SERVER_FIELDS:
        del theirs["properties"][name]
    assert {key: value for key, value in ours.items() if key != "description"} == {
        key: value for key, value in theirs.items() if key != "description"
    }
    assert not set(SERVER_FIELDS) & set(ours["properties"])
    assert set(ours["required"]) == {"event_type", "source", "created_at"}


async def test_every_route_is_documented_and_the_document_is_served(app: App) -> None:
    routes = {
        (route.method, route.resource.canonical)
        for route in app.client.app.router.routes()
        # "*": the catch-all that answers 404 and 405 in JSON, not an operation of the API.
        if route.method not in ("HEAD", "*") and route.resource is not None
    }
    response = await app.client.get("/openapi.json")
    assert response.status == 200 and response.content_type == "application/json"
    served = await response.json()
    documented = {(method.upper(), path) for path, operations in served["paths"].items() for method in operations}
    assert documented == routes  # this app has no embedded store: no POST /query, in either
    assert served == openapi_document(with_query=False)
