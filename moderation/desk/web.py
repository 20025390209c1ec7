"""What every desk route shares: the app's state, who is asking (sessions and roles as FastAPI
dependencies that the route-table test looks for), CSRF checks, security headers, templates."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import Path as PathParam
from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape
from sqlalchemy import Engine

from moderation.desk.sessions import Viewer, same, viewer_of
from moderation.review.queue import ReviewQueue
from moderation.storage.held import HeldStore

HERE = Path(__file__).parent
SESSION_COOKIE = "desk_session"
LOGIN_COOKIE = "desk_login"  # double-submit CSRF token of the login form (no session yet)
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    # Pages and images show what a service refused to show anyone: no cache keeps a copy.
    "Cache-Control": "no-store",
}

# A review item id as a URL gives it: review_items.id is a 32-bit integer on PostgreSQL.
ItemId = Annotated[int, PathParam(ge=1, le=2**31 - 1)]

TEMPLATES = Environment(
    loader=FileSystemLoader(HERE / "templates"),
    autoescape=select_autoescape(("html",), default=True),
    trim_blocks=True,
    lstrip_blocks=True,
)
# A metadata value that is not text, as JSON text (autoescaped like any other text; Jinja's
# own tojson is for scripts and shows `<` as \u003c).
TEMPLATES.filters["json_text"] = lambda value: json.dumps(value, ensure_ascii=False, default=str)


@dataclass
class Desk:
    """The running desk: database engine, review queue, held originals, clock."""

    engine: Engine
    queue: ReviewQueue
    held: HeldStore
    now: Callable[[], datetime]


def desk_of(request: Request) -> Desk:
    return request.app.state.desk


class NotLoggedIn(Exception):
    """No live session: pages redirect to the login page, everything else gets 401, no content."""


class Forbidden(Exception):
    """A role that may not use this route, or a state-changing request without its CSRF token."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def current_viewer(request: Request) -> Viewer | None:
    desk = desk_of(request)
    token = request.cookies.get(SESSION_COOKIE)
    with desk.engine.connect() as conn:
        return viewer_of(conn, token, desk.queue.now())


def require(role: str) -> Callable[[Request], Viewer]:
    """A dependency admitting logged-in people of `role` (reviewer: every role)."""

    def dependency(request: Request) -> Viewer:
        viewer = current_viewer(request)
        if viewer is None:
            raise NotLoggedIn
        if role == "admin" and not viewer.admin:
            raise Forbidden("this page is for admins")
        return viewer

    dependency.desk_access = role  # type: ignore[attr-defined]  # the route-table test reads it
    return dependency


signed_in = require("reviewer")
admin_only = require("admin")


async def csrf_checked(request: Request) -> Viewer:
    """A logged-in person's state-changing request, carrying the session's CSRF token (form
    field `csrf` or header `X-CSRF-Token`)."""
    viewer = signed_in(request)
    given = request.headers.get("X-CSRF-Token")
    if given is None:
        form = await request.form()
        value = form.get("csrf")
        given = value if isinstance(value, str) else None
    if not given or not same(given, viewer.csrf):
        raise Forbidden("the form's CSRF token is missing or wrong; reload the page")
    return viewer


csrf_checked.desk_access = "reviewer"  # type: ignore[attr-defined]
csrf_checked.desk_csrf = True  # type: ignore[attr-defined]


def render(request: Request, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    """A page from templates/ (autoescaped)."""
    html = TEMPLATES.get_template(template).render(request=request, **context)
    return HTMLResponse(html, status_code=status_code)


def error_page(
    request: Request, viewer: Viewer | None, status_code: int, message: str
) -> HTMLResponse:
    return render(request, "error.html", status_code, viewer=viewer, message=message)


def see_other(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


def no_content(status_code: int) -> Response:
    return Response(status_code=status_code)
