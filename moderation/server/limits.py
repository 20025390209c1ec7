"""Request bodies over `--max-body-mb` get 413 before they are read into memory (pure ASGI,
so it also bounds what a client without Content-Length streams)."""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException

from moderation.server.errors import TYPES


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


class BodyLimit:
    def __init__(self, app, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
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
