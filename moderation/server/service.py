"""The service's state and its one job: images of a request -> decisions (decode, batch, log).

Shared by the endpoints; the routes (`app`) only read requests and shape responses.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
from sqlalchemy import text

from moderation.engine import Moderator
from moderation.image_files import ImageFile
from moderation.server.batching import Batcher, Judged
from moderation.server.config import ServeConfig
from moderation.server.errors import APIError, safe
from moderation.server.inputs import (
    FETCH_TIMEOUT_S,
    RawImage,
    b64_bytes,
    check_remote,
    data_url_bytes,
    decode,
    fetch,
    is_remote,
)
from moderation.server.keys import ActiveKeys
from moderation.server.metrics import Metrics

logger = logging.getLogger("moderation.server")

# Knob: images decoded at once (each within DECODE_PIXELS: ~50 MB of uint8 at most).
DECODE_WORKERS = 2
READY_CHECK_S = 2.0  # knob: how long /readyz waits for the database


class Service:
    def __init__(self, moderator: Moderator, config: ServeConfig) -> None:
        self.moderator = moderator
        self.config = config
        self.metrics = Metrics()
        self.batcher = Batcher(
            moderator,
            self.metrics,
            max_batch=config.max_batch,
            max_wait_ms=config.max_wait_ms,
            queue_limit=config.queue_limit,
        )
        self.url = moderator.log.url if moderator.log is not None else None
        self.keys = ActiveKeys(self.url) if config.auth and self.url else None
        self._decoders = ThreadPoolExecutor(DECODE_WORKERS, thread_name_prefix="moderation-decode")
        self._http: httpx.AsyncClient | None = None
        self._refresher: asyncio.Task | None = None
        self.started = time.time()

    async def start(self) -> None:
        self.batcher.start()
        if self.config.fetch_urls:
            self._http = httpx.AsyncClient(timeout=FETCH_TIMEOUT_S, follow_redirects=False)
        if self.keys is not None:
            await asyncio.to_thread(self.keys.refresh, force=True)
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_keys())

    async def _refresh_keys(self) -> None:
        """Re-read the active keys every refresh_s seconds, off the event loop."""
        while True:
            await asyncio.sleep(self.keys.refresh_s)
            await asyncio.to_thread(self.keys.refresh, force=True)

    async def stop(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
        await self.batcher.stop()
        self._decoders.shutdown(wait=True)
        if self._http is not None:
            await self._http.aclose()
        self.moderator.close()

    # -- authentication ----------------------------------------------------------------------

    def key_name(self, authorization: str | None) -> str | None:
        """The name of the key in `Authorization: Bearer KEY` (None under --no-auth), or 401."""
        if not self.config.auth:
            return None
        scheme, _, key = (authorization or "").partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise APIError(
                401, "missing API key: send `Authorization: Bearer KEY`", code="invalid_api_key"
            )
        name = self.keys.name_of(key) if self.keys is not None else None
        if name is None:
            raise APIError(401, "invalid or revoked API key", code="invalid_api_key")
        return name

    # -- images ------------------------------------------------------------------------------

    def check_sources(self, sources: list[tuple[str, str]]) -> None:
        """Refuse too many images, and remote URLs from hosts not allowed (400)."""
        if len(sources) > self.config.max_images:
            raise APIError(
                400,
                f"{len(sources)} images in one request, more than the {self.config.max_images} "
                "allowed",
                code="too_many_images",
            )
        for where, url in sources:
            if is_remote(url):
                check_remote(url, where, self.config.fetch_urls)

    async def judge_sources(
        self, sources: list[tuple[str, str]], metas: list[dict[str, Any]], *, bare_base64: bool
    ) -> tuple[list[RawImage], list[Judged]]:
        """Every image source (data URL, base64, allowed URL) read, decoded and judged; any
        source that is not well formed is a 400 before anything is judged."""
        self.check_sources(sources)
        fetched = {}
        for where, url in sources:
            if is_remote(url):
                fetched[where] = await fetch(self._http, url, where, self.config.fetch_urls)

        def read() -> list[tuple[RawImage, ImageFile | str]]:
            raws = []
            for where, url in sources:
                if where in fetched:
                    data = fetched[where]
                elif url[:5].lower() == "data:" or not bare_base64:
                    data = data_url_bytes(url, where)
                else:
                    data = b64_bytes(url, where)
                raws.append(RawImage(where, data))
            return [(raw, decode(raw)) for raw in raws]  # 400s above come before any decoding

        loop = asyncio.get_running_loop()
        self.batcher.decoding(len(sources))  # until _judge queues them (or this fails)
        try:
            pairs = await loop.run_in_executor(self._decoders, read)
        except BaseException:
            self.batcher.decoding(-len(sources))
            raise
        raws = [raw for raw, _ in pairs]
        return raws, await self._judge([d for _, d in pairs], metas, announced=True)

    async def judge_raws(self, raws: list[RawImage], metas: list[dict[str, Any]]) -> list[Judged]:
        """Uploaded files: decoded (worker threads) and judged."""
        self.check_sources([(r.where, "") for r in raws])
        loop = asyncio.get_running_loop()
        decoded = await asyncio.gather(
            *(loop.run_in_executor(self._decoders, decode, raw) for raw in raws)
        )
        return await self._judge(list(decoded), metas)

    async def _judge(
        self, decoded: list[ImageFile | str], metas: list[dict[str, Any]], announced: bool = False
    ) -> list[Judged]:
        """Judge (batched) and log every image, in order; an image that could not be decoded
        gets a logged `error` decision (on_error), never `allow`. announced: the images were
        counted by `Batcher.decoding`, and are uncounted as they are queued."""
        self.metrics.images.inc(len(decoded))
        good = [i for i, d in enumerate(decoded) if not isinstance(d, str)]
        bad = [i for i, d in enumerate(decoded) if isinstance(d, str)]
        if announced and bad:
            self.batcher.decoding(-len(bad))
        out: list[Judged | None] = [None] * len(decoded)
        if bad:
            for i in bad:
                logger.warning("undecodable image: %s", safe(decoded[i]))
            failed = await self.batcher.fail([decoded[i] for i in bad], [metas[i] for i in bad])
            for i, j in zip(bad, failed, strict=True):
                out[i] = j
        if good:
            judged = await self.batcher.submit(
                [decoded[i] for i in good], [metas[i] for i in good], announced=announced
            )
            for i, j in zip(good, judged, strict=True):
                out[i] = j
        return out  # type: ignore[return-value]

    # -- readiness ---------------------------------------------------------------------------

    async def readiness(self) -> dict[str, Any]:
        """Model loaded; the database reachable, or decisions going to the spool."""
        database = "none"
        if self.url is not None:
            try:
                await asyncio.wait_for(asyncio.to_thread(self._ping), READY_CHECK_S)
                database = "reachable"
            except Exception:
                database = "spooling"
        return {
            "ready": True,
            "policy": self.moderator.policy.name,
            "policy_digest": self.moderator.policy.digest,
            "model": self.moderator.policy.model,
            "database": database,
            "queue_images": self.batcher.waiting,
        }

    def _ping(self) -> None:
        from moderation.storage.db import engine_for

        with engine_for(self.url).connect() as conn:
            conn.execute(text("SELECT 1"))


def request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"
