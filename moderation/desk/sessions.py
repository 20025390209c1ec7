"""Desk sessions: a random token in an HttpOnly cookie (the database keeps only its sha256), a
CSRF token per session, and login throttling from the audit's failed logins."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Connection, Engine, delete, func, insert, select

from moderation.desk.accounts import verify_login
from moderation.desk.audit import record_event
from moderation.desk.images import image_mode_or_default
from moderation.storage.models import DeskEvent, DeskSession, DeskUser

SESSION_HOURS = 12  # knob: a session ends this long after login (a reviewer's working day)
THROTTLE_FAILURES = 5  # knob: failed logins of one name within THROTTLE_WINDOW lock it out ...
THROTTLE_WINDOW = timedelta(minutes=15)  # ... until the oldest of them is this old


@dataclass(frozen=True)
class Viewer:
    """The logged-in person a request comes from."""

    user_id: int
    name: str
    role: str
    csrf: str
    session_id: str
    image_mode: str = "blur-grey"  # how an unrevealed image is shown: see desk/images.py

    @property
    def special_care(self) -> bool:
        """Whether this person sees items that special-care concepts escalated."""
        return self.role == "special-care"

    @property
    def admin(self) -> bool:
        return self.role == "admin"


def token_id(token: str) -> str:
    """What the database keeps of a session token: its sha256 (a stolen table logs nobody in)."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def same(a: str, b: str) -> bool:
    """Constant-time comparison of two tokens."""
    return hmac.compare_digest(
        a.encode("utf-8", "surrogatepass"), b.encode("utf-8", "surrogatepass")
    )


class LoginRefused(Exception):
    """A login that did not succeed: wrong name or password, or throttled (message says which)."""


def login(engine: Engine, name: str, password: str, remote: str, now: datetime) -> str:
    """Check a login and open a session; return the session token (LoginRefused otherwise)."""
    name = (name or "").strip()[:200]
    with engine.begin() as conn:
        since = now - THROTTLE_WINDOW
        failures = conn.execute(
            select(func.count()).where(
                DeskEvent.actor == name, DeskEvent.event == "login_failed", DeskEvent.at >= since
            )
        ).scalar_one()
        if failures >= THROTTLE_FAILURES:
            record_event(conn, name, "login_throttled", details={"remote": remote}, at=now)
            raise LoginRefused(
                "too many failed logins for this name; wait 15 minutes or ask an admin"
            )
        user = verify_login(conn, name, password or "")
        if user is None:
            record_event(conn, name, "login_failed", details={"remote": remote}, at=now)
            failed = True
        else:
            failed = False
            token = secrets.token_urlsafe(32)
            conn.execute(
                insert(DeskSession).values(
                    id=token_id(token),
                    user_id=user.id,
                    csrf_token=secrets.token_urlsafe(32),
                    created_at=now,
                    expires_at=now + timedelta(hours=SESSION_HOURS),
                )
            )
            record_event(conn, user.name, "login", details={"remote": remote}, at=now)
    if failed:
        # Committed above: the failure counts towards the throttle even though we refuse.
        raise LoginRefused("wrong name or password")
    return token


def viewer_of(conn: Connection, token: str | None, now: datetime) -> Viewer | None:
    """The person whose live session `token` opens, or None (no, expired or disabled session)."""
    if not token or len(token) > 200:
        return None
    row = conn.execute(
        select(
            DeskSession.id,
            DeskSession.csrf_token,
            DeskSession.expires_at,
            DeskUser.id.label("user_id"),
            DeskUser.name,
            DeskUser.role,
            DeskUser.disabled,
            DeskUser.preferences,
        )
        .join(DeskUser, DeskUser.id == DeskSession.user_id)
        .where(DeskSession.id == token_id(token))
    ).first()
    if row is None or row.disabled or row.expires_at <= now:
        return None
    mode = (row.preferences or {}).get("image_mode")
    return Viewer(
        row.user_id, row.name, row.role, row.csrf_token, row.id, image_mode_or_default(mode)
    )


def logout(engine: Engine, viewer: Viewer, now: datetime) -> None:
    with engine.begin() as conn:
        conn.execute(delete(DeskSession).where(DeskSession.id == viewer.session_id))
        record_event(conn, viewer.name, "logout", at=now)
