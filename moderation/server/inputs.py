"""Images as clients send them: `data:` URLs, bare base64, uploaded files and, only for hosts
the operator listed (`--fetch-urls`), http(s) URLs; decoded within the engine's limits.

Bytes that are not a data URL, not base64 or not an image type are the client's mistake (400,
`InputError`). Bytes that arrive well but cannot be decoded (a truncated file, 0 bytes, a
decompression bomb, garbage) are judged like `moderation check` judges such a file: an `error`
decision with the policy's `on_error` action, logged (`decode` returns the reason).
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import httpx

from moderation.errors import ModerationError
from moderation.image_files import ImageFile, read_image
from moderation.server.errors import APIError, safe

# Knobs for --fetch-urls: how long one fetch may take in all, and the most bytes it may read.
FETCH_TIMEOUT_S = 10.0
FETCH_MAX_BYTES = 20 * 1024 * 1024
FETCH_MAX_REDIRECTS = 3

_DATA_URL = re.compile(r"data:(?P<type>[^;,]*)(?P<params>(;[^;,]*)*),", re.IGNORECASE)
_BASE64 = re.compile(rb"[A-Za-z0-9+/\-_]*={0,2}")


@dataclass
class RawImage:
    """One image of a request before decoding: where it came from (for messages) and its bytes."""

    where: str  # e.g. input[1].image_url.url
    data: bytes


class _Named(io.BytesIO):
    """Bytes that PIL reads like a file, named like the request field they came from."""

    def __init__(self, data: bytes, name: str) -> None:
        super().__init__(data)
        self._name = name

    def __str__(self) -> str:
        return self._name


def b64_bytes(text: str, where: str) -> bytes:
    """Standard or URL-safe base64 (whitespace ignored), or a 400 naming the field."""
    raw = "".join(text.split()).encode("ascii", "replace")
    if not _BASE64.fullmatch(raw):
        raise APIError(400, f"{where}: not valid base64", code="invalid_base64", param=where)
    raw = raw.replace(b"-", b"+").replace(b"_", b"/")
    raw += b"=" * (-len(raw) % 4)
    try:
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(
            400, f"{where}: not valid base64", code="invalid_base64", param=where
        ) from None


def data_url_bytes(url: str, where: str) -> bytes:
    """The bytes of `data:image/...;base64,...` (an empty media type is taken as an image)."""
    match = _DATA_URL.match(url)
    if match is None:
        raise APIError(400, f"{where}: not a data URL", code="invalid_image_url", param=where)
    media = match.group("type").strip().lower()
    if media and not media.startswith("image/"):
        raise APIError(
            400,
            f"{where}: a data URL of type {media!r}, not an image",
            code="unsupported_media_type",
            param=where,
        )
    params = [p.strip().lower() for p in match.group("params").split(";") if p.strip()]
    if "base64" not in params:
        raise APIError(
            400, f"{where}: only base64 data URLs are read", code="invalid_image_url", param=where
        )
    return b64_bytes(url[match.end() :], where)


def is_remote(url: str) -> bool:
    return urlsplit(url).scheme.lower() in ("http", "https")


def remote_host(url: str) -> str:
    return (urlsplit(url).hostname or "").lower()


def check_remote(url: str, where: str, allowed: frozenset[str]) -> None:
    """Refuse a remote URL unless its host is listed (server-side request forgery)."""
    host = remote_host(url)
    if host not in allowed:
        raise APIError(
            400,
            f"{where}: remote image URLs are not fetched from {safe(host or url, 100)!r} "
            "(send the image as a data URL; the operator may allow hosts with --fetch-urls)",
            code="image_url_not_allowed",
            param=where,
        )


async def fetch(client: httpx.AsyncClient, url: str, where: str, allowed: frozenset[str]) -> bytes:
    """GET an allowed URL: redirects followed only to listed hosts, FETCH_MAX_BYTES at most."""
    for _ in range(FETCH_MAX_REDIRECTS + 1):
        check_remote(url, where, allowed)
        try:
            async with client.stream("GET", url, follow_redirects=False) as response:
                if response.is_redirect:
                    url = urljoin(url, response.headers.get("location", ""))
                    continue
                if response.status_code != 200:
                    raise APIError(
                        400,
                        f"{where}: fetching the image gave HTTP {response.status_code}",
                        code="image_fetch_failed",
                        param=where,
                    )
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > FETCH_MAX_BYTES:
                        raise APIError(
                            400,
                            f"{where}: the image is larger than {FETCH_MAX_BYTES} bytes",
                            code="image_too_large",
                            param=where,
                        )
                return bytes(body)
        except httpx.HTTPError as err:
            raise APIError(
                400,
                f"{where}: cannot fetch the image ({type(err).__name__})",
                code="image_fetch_failed",
                param=where,
            ) from None
    raise APIError(400, f"{where}: too many redirects", code="image_fetch_failed", param=where)


def decode(raw: RawImage) -> ImageFile | str:
    """The decoded image, or why it cannot be judged (then it gets an `error` decision).

    Runs in a worker thread: PIL's limits apply (max_pixels refuses bombs before decoding,
    larger images are reduced while decoded, animations are sampled)."""
    if not raw.data:
        return f"{raw.where}: empty image (0 bytes)"
    try:
        return read_image(_Named(raw.data, raw.where))
    except ModerationError as err:
        return safe(str(err))
    except Exception as err:  # any decoder failure is an unreadable image, never a crash
        return safe(f"{raw.where}: cannot read image ({type(err).__name__}: {err})")
