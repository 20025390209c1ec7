"""Logging in and out."""

from __future__ import annotations

import secrets

from fastapi import APIRouter, Depends, Form, Request

from moderation.desk.accounts import DeskError, set_image_mode
from moderation.desk.images import IMAGE_MODES
from moderation.desk.sessions import LoginRefused, Viewer, login, logout, same
from moderation.desk.web import (
    LOGIN_COOKIE,
    SESSION_COOKIE,
    csrf_checked,
    current_viewer,
    desk_of,
    error_page,
    render,
    see_other,
    signed_in,
)
from moderation.storage.errors import database_errors

router = APIRouter()
# The only routes anyone may use without logging in (the route-table test holds this list).
PUBLIC = {("GET", "/login"), ("POST", "/login")}


def _secure(request: Request) -> bool:
    """Cookies are `Secure` when the page came over TLS (or a trusted proxy said it did)."""
    return request.url.scheme == "https"


def _login_page(request: Request, status_code: int = 200, message: str | None = None):
    token = secrets.token_urlsafe(24)
    response = render(
        request, "login.html", status_code, viewer=None, login_csrf=token, message=message
    )
    response.set_cookie(
        LOGIN_COOKIE,
        token,
        httponly=True,
        samesite="strict",
        secure=_secure(request),
        path="/login",
    )
    return response


@router.get("/login")
def login_form(request: Request):
    if current_viewer(request) is not None:
        return see_other("/")
    return _login_page(request)


@router.post("/login")
def login_submit(
    request: Request,
    name: str = Form(""),
    password: str = Form(""),
    csrf: str = Form(""),
):
    expected = request.cookies.get(LOGIN_COOKIE) or ""
    if not expected or not csrf or not same(csrf, expected):
        return _login_page(request, 403, "the login form expired; try again")
    desk = desk_of(request)
    remote = request.client.host if request.client else "?"
    try:
        with database_errors(desk.queue.url):
            token = login(desk.engine, name, password, remote, desk.now())
    except LoginRefused as err:
        return _login_page(request, 401, str(err))
    response = see_other("/")
    response.set_cookie(
        SESSION_COOKIE,
        token,
        httponly=True,
        samesite="strict",
        secure=_secure(request),
        path="/",
    )
    response.delete_cookie(LOGIN_COOKIE, path="/login")
    return response


@router.post("/logout")
def logout_submit(request: Request, viewer: Viewer = Depends(csrf_checked)):
    desk = desk_of(request)
    logout(desk.engine, viewer, desk.now())
    response = see_other("/login")
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


@router.get("/account")
def account_page(request: Request, note: str = "", viewer: Viewer = Depends(signed_in)):
    """The person's own settings: how images look until revealed."""
    return render(
        request,
        "account.html",
        viewer=viewer,
        modes=IMAGE_MODES,
        note="Saved." if note == "saved" else None,
    )


@router.post("/account")
def account_submit(
    request: Request, image_mode: str = Form(""), viewer: Viewer = Depends(csrf_checked)
):
    desk = desk_of(request)
    try:
        with desk.engine.begin() as conn:
            set_image_mode(conn, viewer.user_id, viewer.name, image_mode)
    except DeskError as err:
        return error_page(request, viewer, 400, str(err))
    return see_other("/account?note=saved")
