"""The review desk's FastAPI application: `create_app(DeskSettings(...))`."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.staticfiles import StaticFiles

from moderation.desk import routes_actions, routes_auth, routes_pages
from moderation.desk.web import (
    HERE,
    SECURITY_HEADERS,
    Desk,
    Forbidden,
    NotLoggedIn,
    error_page,
    no_content,
    see_other,
)
from moderation.desk.webhooks import Deliverer
from moderation.review.queue import ReviewQueue
from moderation.storage.held import HeldStore
from moderation.storage.log import default_held_dir


@dataclass
class DeskSettings:
    """How to run the desk. `now` is the clock (tests move it instead of sleeping)."""

    db_url: str
    held_dir: Path | None = None
    lease_seconds: int = 900
    now: Callable[[], datetime] | None = None
    webhooks: bool = True  # deliver the webhook outbox from this process
    webhook_interval_s: float = 2.0


def create_app(settings: DeskSettings) -> FastAPI:
    """The desk over an existing, migrated database."""
    queue = ReviewQueue(settings.db_url, lease_seconds=settings.lease_seconds, now=settings.now)
    held = HeldStore(settings.held_dir if settings.held_dir is not None else default_held_dir())
    desk = Desk(engine=queue.engine, queue=queue, held=held, now=queue.now)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        deliverer = None
        if settings.webhooks:
            deliverer = Deliverer(desk.engine, desk.now, settings.webhook_interval_s)
            deliverer.start()
        try:
            yield
        finally:
            if deliverer is not None:
                deliverer.stop()

    app = FastAPI(
        title="moderation review desk",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        lifespan=lifespan,
    )
    app.state.desk = desk

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        for name, value in SECURITY_HEADERS.items():
            response.headers[name] = value
        return response

    @app.exception_handler(NotLoggedIn)
    async def not_logged_in(request: Request, exc: NotLoggedIn):
        if request.method == "GET" and not request.url.path.endswith("/image"):
            return see_other("/login")
        return no_content(401)

    @app.exception_handler(Forbidden)
    async def forbidden(request: Request, exc: Forbidden):
        return error_page(request, None, 403, exc.message)

    app.include_router(routes_auth.router)
    app.include_router(routes_pages.router)
    app.include_router(routes_actions.router)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    return app


def route_table(app: FastAPI) -> list[tuple[str, str, object]]:
    """(method, path, route) of every API route, also inside included routers (FastAPI keeps
    those as their own objects); the route-table test walks this."""
    from fastapi.routing import APIRoute

    found: list[tuple[str, str, object]] = []

    def walk(routes) -> None:
        for route in routes:
            if isinstance(route, APIRoute):
                found.extend((m, route.path, route) for m in sorted(route.methods))
            elif hasattr(route, "original_router"):
                walk(route.original_router.routes)

    walk(app.routes)
    return found
