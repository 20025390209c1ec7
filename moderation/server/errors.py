"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`, for every status.

Messages may quote what a client sent; they are escaped here (control characters as `\\xNN`) and
cut to MAX_MESSAGE characters, so neither a response nor the server's log carries raw input.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from moderation.text import escape_controls

logger = logging.getLogger("moderation.server")

MAX_MESSAGE = 500

TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",  # OpenAI: invalid_api_key is the code
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "server_error",
}


def safe(text: object, limit: int = MAX_MESSAGE) -> str:
    """Client text fit for a message and a log line: escaped, at most `limit` characters."""
    cleaned = escape_controls(text)
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 1] + "…"


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = safe(message)
        self.code = code
        self.param = None if param is None else safe(param, 200)
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.code, self.param, self.headers)


def error_response(
    status: int,
    message: str,
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {
        "error": {
            "message": message,
            "type": TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
            "param": param,
            "code": code,
        }
    }
    return JSONResponse(body, status_code=status, headers=headers)


def _location(loc: tuple) -> str:
    parts = [str(p) for p in loc if p not in ("body",)]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or "body"


def install(app: FastAPI) -> None:
    """Every error the app can answer, in OpenAI's shape (schema errors: 422, naming the field)."""

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = _location(tuple(first.get("loc", ())))
        message = f"{where}: {first.get('msg', 'invalid value')}"
        return error_response(422, safe(message), "invalid_request", safe(where, 200))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = getattr(exc, "code", None)
        return error_response(exc.status_code, safe(exc.detail), code, None, exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        logger.error("unexpected error: %s", safe(f"{type(exc).__name__}: {exc}"))
        return error_response(500, "internal error (logged by the server)", "internal_error")
