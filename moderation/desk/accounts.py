"""Desk accounts: names, roles and argon2id password hashes (argon2-cffi)."""

from __future__ import annotations

import functools
from datetime import datetime
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import Connection, Engine, delete, insert, select, update

from moderation.desk.audit import record_event
from moderation.desk.images import IMAGE_MODES
from moderation.errors import ModerationError
from moderation.review.queries import iso
from moderation.storage.models import DESK_ROLES, DeskSession, DeskUser, utcnow
from moderation.text import escape_controls

ROLES = DESK_ROLES
MIN_PASSWORD = 10  # knob: shortest password an account may have
MAX_PASSWORD = 1024  # argon2 hashes any length; a bound keeps a login request cheap
MAX_NAME = 200
# argon2-cffi's defaults are RFC 9106's second recommendation for argon2id (64 MiB, t=3, p=4).
HASHER = PasswordHasher()


@functools.cache
def _dummy_hash(parameters: tuple[int, int, int]) -> str:
    """A hash to verify against when the name is unknown, so that both cases take the same time."""
    return HASHER.hash("not a password of anyone")


class DeskError(ModerationError):
    """A desk request that cannot be carried out, worded for people."""


def check_name(name: str) -> str:
    """A stripped account name of printable characters."""
    text = (name or "").strip()
    if not text:
        raise DeskError("a user name is required")
    if len(text) > MAX_NAME or not text.isprintable():
        raise DeskError(
            f'user name "{escape_controls(text[:MAX_NAME])}" must be printable and at most '
            f"{MAX_NAME} characters"
        )
    return text


def check_password(password: str) -> str:
    """The password as given, if long enough (never stripped: spaces count)."""
    if not isinstance(password, str) or len(password) < MIN_PASSWORD:
        raise DeskError(f"a password needs at least {MIN_PASSWORD} characters")
    if len(password) > MAX_PASSWORD:
        raise DeskError(f"a password may have at most {MAX_PASSWORD} characters")
    return password


def check_role(role: str) -> str:
    if role not in ROLES:
        raise DeskError(f'unknown role "{escape_controls(role)}"; choose from {", ".join(ROLES)}')
    return role


def _user(conn: Connection, name: str) -> Any:
    row = conn.execute(select(DeskUser.__table__).where(DeskUser.name == name)).first()
    if row is None:
        raise DeskError(f'no user "{escape_controls(name)}"')
    return row


def add_user(engine: Engine, name: str, role: str, password: str, *, actor: str = "cli") -> None:
    """Create an account (DeskError when the name is taken)."""
    name, role = check_name(name), check_role(role)
    digest = HASHER.hash(check_password(password))
    now = utcnow()
    with engine.begin() as conn:
        if conn.execute(select(DeskUser.id).where(DeskUser.name == name)).first() is not None:
            raise DeskError(f'user "{escape_controls(name)}" already exists')
        conn.execute(
            insert(DeskUser).values(
                name=name,
                role=role,
                password_hash=digest,
                disabled=False,
                created_at=now,
                updated_at=now,
            )
        )
        record_event(conn, actor, "user_added", details={"user": name, "role": role}, at=now)


def list_users(engine: Engine) -> list[dict[str, Any]]:
    """Every account (never its hash), by name."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(
                DeskUser.name,
                DeskUser.role,
                DeskUser.disabled,
                DeskUser.created_at,
                DeskUser.updated_at,
            ).order_by(DeskUser.name)
        ).all()
    return [
        {
            "name": r.name,
            "role": r.role,
            "disabled": bool(r.disabled),
            "created_at": iso(r.created_at),
            "updated_at": iso(r.updated_at),
        }
        for r in rows
    ]


def disable_user(engine: Engine, name: str, *, actor: str = "cli") -> None:
    """Disable an account and end its sessions at once."""
    name = check_name(name)
    now = utcnow()
    with engine.begin() as conn:
        user = _user(conn, name)
        conn.execute(
            update(DeskUser).where(DeskUser.id == user.id).values(disabled=True, updated_at=now)
        )
        conn.execute(delete(DeskSession).where(DeskSession.user_id == user.id))
        record_event(conn, actor, "user_disabled", details={"user": name}, at=now)


def set_password(engine: Engine, name: str, password: str, *, actor: str = "cli") -> None:
    """Replace an account's password and end its sessions."""
    name = check_name(name)
    digest = HASHER.hash(check_password(password))
    now = utcnow()
    with engine.begin() as conn:
        user = _user(conn, name)
        conn.execute(
            update(DeskUser)
            .where(DeskUser.id == user.id)
            .values(password_hash=digest, updated_at=now)
        )
        conn.execute(delete(DeskSession).where(DeskSession.user_id == user.id))
        record_event(conn, actor, "password_changed", details={"user": name}, at=now)


def verify_login(conn: Connection, name: str, password: str) -> Any | None:
    """The account row when `password` is right and the account is enabled, else None."""
    row = conn.execute(select(DeskUser.__table__).where(DeskUser.name == name)).first()
    try:
        params = (HASHER.time_cost, HASHER.memory_cost, HASHER.parallelism)
        stored = row.password_hash if row is not None else _dummy_hash(params)
        HASHER.verify(stored, password[:MAX_PASSWORD])
    except (VerificationError, InvalidHashError):
        return None
    if row is None or row.disabled:
        return None
    if HASHER.check_needs_rehash(row.password_hash):
        conn.execute(
            update(DeskUser)
            .where(DeskUser.id == row.id)
            .values(password_hash=HASHER.hash(password))
        )
    return row


def when(value: datetime | None) -> str:
    return "-" if value is None else value.strftime("%Y-%m-%d %H:%M:%S UTC")


def set_image_mode(conn: Connection, user_id: int, name: str, mode: str) -> None:
    """Store how this person sees images until they reveal them (audited)."""
    if mode not in IMAGE_MODES:
        raise DeskError(f'unknown image mode "{escape_controls(mode)}"')
    row = conn.execute(select(DeskUser.preferences).where(DeskUser.id == user_id)).one()
    preferences = {**(row.preferences or {}), "image_mode": mode}
    conn.execute(
        update(DeskUser)
        .where(DeskUser.id == user_id)
        .values(preferences=preferences, updated_at=utcnow())
    )
    record_event(conn, name, "preference_changed", details={"image_mode": mode})
