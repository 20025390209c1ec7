"""The ASGI layer around the app (pure ASGI: a BaseHTTPMiddleware would wrap errors raised while
a body is read): request bodies over `--max-body-mb` get 413 before they are read into memory,
also from a client that streams without Content-Length; every request is counted and timed in
the metrics, and logged with what the client chose (its path) escaped."""

from __future__ import annotations

import json
import logging
import time

from starlette.exceptions import HTTPException

from moderation.server.errors import TYPES, safe

access = logging.getLogger("moderation.server.access")
ENDPOINTS = {"/v1/moderations", "/v1/moderate", "/healthz", "/readyz", "/metrics"}


class BodyTooLarge(HTTPException):
    """Raised while the body is read: FastAPI passes HTTPExceptions on to the error handlers."""

    code = "request_too_large"

    def __init__(self, limit: int) -> None:
        super().__init__(413, _message(limit))


def _message(limit: int) -> str:
    return f"request body is larger than the {limit} bytes allowed (--max-body-mb)"


def _body(limit: int) -> bytes:
    error = {
        "message": _message(limit),
        "type": TYPES[413],
        "param": None,
        "code": "request_too_large",
    }
    return json.dumps({"error": error}).encode()


def endpoint_of(path: str) -> str:
    """The metrics label of a path: a known route, else "other" (bounded label values)."""
    if path in ENDPOINTS:
        return path
    return "/v1/decisions/{id}" if path.startswith("/v1/decisions/") else "other"


class Outer:
    def __init__(self, app, limit: int, metrics) -> None:
        self.app = app
        self.limit = limit
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.monotonic()
        status = 500

        async def watched_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._limited(scope, receive, watched_send)
        finally:
            path = scope.get("path", "")
            endpoint = endpoint_of(path)
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.monotonic() - started)
            client = (scope.get("client") or ("-",))[0]
            access.info(
                '%s "%s %s" %d', safe(client, 60), safe(scope.get("method", ""), 20),
                safe(path, 200), status,
            )  # fmt: skip

    async def _limited(self, scope, receive, send):
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    too_large = int(value) > self.limit
                except ValueError:
                    too_large = False
                if too_large:
                    return await self._refuse(send)
        seen = 0

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, counted_receive, send)

    async def _refuse(self, send) -> None:
        body = _body(self.limit)
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
