"""The HTTP layer: the aiohttp application (app.py), shared answers (responses.py) and one thin
adapter per protocol (events.py for POST /events). It knows the pipeline only through the
intake port: it imports neither the spool, the memory limit nor the Batcher."""
