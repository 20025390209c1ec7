"""API keys: `moderation api-key create|list|revoke`, and the live set `moderation serve` checks.

A key is `mod_` + 43 URL-safe characters from `secrets` (256 bits), shown once; the database
keeps only its sha256 (a slow password hash buys nothing for a random secret of that size). The
service keeps the hashes of the active keys in memory, refreshed every REFRESH_S seconds, so a
revoked key is refused within that time and known keys keep working while the database restarts.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from moderation.errors import ModerationError
from moderation.storage.errors import database_errors, display_url
from moderation.storage.models import ApiKey
from moderation.storage.schema import get_engine
from moderation.text import escape_controls
from moderation.times import utcnow

logger = logging.getLogger("moderation.server")

PREFIX = "mod_"
SHOWN_PREFIX = 10  # characters of a key `api-key list` shows (PREFIX + 6), never the rest
REFRESH_S = 2.0  # knob: how stale the service's set of active keys may be
MAX_NAME = 200


class ApiKeyError(ModerationError):
    """An API key command that cannot be done, worded for people."""


@dataclass(frozen=True)
class KeyInfo:
    name: str
    prefix: str
    created_at: datetime
    revoked_at: datetime | None


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def _check_name(name: str) -> str:
    if not name or not name.strip() or len(name) > MAX_NAME or not name.isprintable():
        raise ApiKeyError(
            f"key name {escape_controls(name)!r} must be 1 to {MAX_NAME} printable characters"
        )
    return name


def create_key(url: str, name: str) -> str:
    """Store a new key named `name` (unique) and return the secret: it is never stored."""
    _check_name(name)
    key = PREFIX + secrets.token_urlsafe(32)
    engine = get_engine(url)
    try:
        with database_errors(url), engine.begin() as conn:
            if conn.execute(select(ApiKey.id).where(ApiKey.name == name)).first() is not None:
                raise ApiKeyError(f"a key named {escape_controls(name)!r} exists already")
            conn.execute(
                ApiKey.__table__.insert().values(
                    name=name,
                    key_sha256=key_hash(key),
                    prefix=key[:SHOWN_PREFIX],
                    created_at=utcnow(),
                    revoked_at=None,
                )
            )
    except IntegrityError:  # a concurrent create of the same name
        raise ApiKeyError(f"a key named {escape_controls(name)!r} exists already") from None
    return key


def list_keys(url: str) -> list[KeyInfo]:
    engine = get_engine(url)
    query = select(ApiKey.name, ApiKey.prefix, ApiKey.created_at, ApiKey.revoked_at).order_by(
        ApiKey.created_at, ApiKey.id
    )
    with database_errors(url), engine.connect() as conn:
        return [KeyInfo(*row) for row in conn.execute(query)]


def revoke_key(url: str, name: str) -> None:
    engine = get_engine(url)
    with database_errors(url), engine.begin() as conn:
        row = conn.execute(select(ApiKey.revoked_at).where(ApiKey.name == name)).first()
        if row is None:
            raise ApiKeyError(f"no key named {escape_controls(name)!r} in {display_url(url)}")
        if row.revoked_at is None:
            conn.execute(update(ApiKey).where(ApiKey.name == name).values(revoked_at=utcnow()))


class ActiveKeys:
    """The active keys' hashes, read from the database at most every REFRESH_S seconds.

    `name_of(key)` compares the key's hash with every active hash in constant time
    (hmac.compare_digest, no early exit), so timing tells nothing about which bytes matched.
    When the database cannot be read, the last set read stays in force (logged)."""

    def __init__(self, url: str, refresh_s: float = REFRESH_S) -> None:
        self.url = url
        self.refresh_s = refresh_s
        self._hashes: dict[str, str] = {}  # sha256 hex -> key name
        self._read_at = float("-inf")
        self._lock = threading.Lock()
        self.loaded = False  # read at least once

    def refresh(self, *, force: bool = False) -> None:
        """Read the set again when it is older than refresh_s; while another thread reads it,
        the others go on with the set they have (a slow database never queues requests here)."""
        if not force and time.monotonic() - self._read_at < self.refresh_s:
            return
        if not self._lock.acquire(blocking=force or not self.loaded):
            return
        try:
            self._read_at = time.monotonic()
            query = select(ApiKey.key_sha256, ApiKey.name).where(ApiKey.revoked_at.is_(None))
            try:
                with database_errors(self.url), get_engine(self.url).connect() as conn:
                    self._hashes = {h: n for h, n in conn.execute(query)}
                self.loaded = True
            except ModerationError as err:
                logger.warning("cannot read the API keys, keeping the last ones read: %s", err)
        finally:
            self._lock.release()

    def name_of(self, key: str) -> str | None:
        """The active key's name, or None; reads no database (the service refreshes the set
        every refresh_s seconds in the background; call refresh() where there is none)."""
        wanted = key_hash(key).encode()
        found = None
        for digest, name in list(self._hashes.items()):
            if hmac.compare_digest(digest.encode(), wanted):
                found = name
        return found
