"""The baseline for bench/run.py: the least an aiohttp handler for POST /events can do.

It reads the body, decodes it with the same msgspec decoder clickpulse uses into
clickpulse.events.Event, and answers 202 {"status":"accepted"}. No batching, no ClickHouse, no
metrics middleware: the gap between this and clickpulse is what the pipeline costs per request.

    python bench/bare_handler.py PORT
"""

from __future__ import annotations

import sys
from pathlib import Path

import msgspec
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clickpulse.events import EventDecoder  # noqa: E402

ACCEPTED = msgspec.json.encode({"status": "accepted"})
DECODER = EventDecoder()


async def post_events(request: web.Request) -> web.Response:
    body = await request.read()
    try:
        DECODER.decode_json(body)
    except msgspec.DecodeError as error:
        return web.Response(status=400, body=msgspec.json.encode({"error": str(error)}), content_type="application/json")
    return web.Response(status=202, body=ACCEPTED, content_type="application/json")


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python bench/bare_handler.py PORT")
    app = web.Application(client_max_size=1024 * 1024)
    app.router.add_post("/events", post_events)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)


if __name__ == "__main__":
    main()
