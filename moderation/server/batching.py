"""Dynamic batching: concurrent requests coalesced into one engine batch, with back-pressure.

Requests queue their decoded images; one task takes them in arrival order, up to `max_batch`
images, waiting at most `max_wait_ms` after the oldest arrived for more to come (while the
engine is busy, the next batch gathers by itself), and runs `Moderator.moderate` on one engine
thread. More than `queue_limit` images waiting (or QUEUE_PIXELS decoded pixels) and new requests
get 429 with Retry-After instead of a queue without bound.

A request whose client went away before its batch was taken is dropped unjudged (nothing was
decided); once taken, it is judged and logged like any other, whoever waits for the answer.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from moderation.server.errors import APIError

if TYPE_CHECKING:
    from moderation.decision import Decision
    from moderation.engine import Moderator
    from moderation.image_files import ImageFile
    from moderation.server.metrics import Metrics

logger = logging.getLogger("moderation.server")

# Knob: decoded pixels that may wait for the engine (uint8 RGB: 3 bytes each, ~400 MB).
QUEUE_PIXELS = 1 << 27
# Knob: once max_wait_ms is over, a batch that is not full still waits for images that are
# being decoded (their requests arrived with the others), up to this many times max_wait_ms.
DECODING_GRACE = 4


@dataclass
class Judged:
    """One image's decision, the image as the caller may show it, and whether it is recorded."""

    decision: Decision
    image: Any  # PIL image with the action applied
    recorded: bool


@dataclass
class _Job:
    images: list[ImageFile]
    metas: list[dict[str, Any]]
    future: asyncio.Future
    pixels: int
    arrived: float = field(default_factory=time.monotonic)


class Overloaded(APIError):
    def __init__(self, retry_after: int) -> None:
        super().__init__(
            429,
            "too many images are waiting to be judged; retry later",
            code="queue_full",
            headers={"Retry-After": str(retry_after)},
        )


class Batcher:
    """Coalesces `submit` calls into `Moderator.moderate` batches on one engine thread."""

    def __init__(
        self,
        moderator: Moderator,
        metrics: Metrics,
        *,
        max_batch: int = 32,
        max_wait_ms: float = 10.0,
        queue_limit: int = 256,
    ) -> None:
        self.moderator = moderator
        self.metrics = metrics
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000
        self.queue_limit = queue_limit
        self._jobs: deque[_Job] = deque()
        self._waiting = 0  # images queued, not yet taken
        self._decoding = 0  # images of requests that are being read and decoded
        self._waiting_pixels = 0
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._engine = ThreadPoolExecutor(1, thread_name_prefix="moderation-engine")
        self._last_rate = 0.0  # images per second of the last batch, for Retry-After
        self.batches = 0

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Judge what was taken, drop what waits (its clients get 503), stop the engine thread."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for job in self._jobs:
            if not job.future.done():
                job.future.set_exception(
                    APIError(503, "the service is shutting down", code="shutting_down")
                )
        self._jobs.clear()
        self._engine.shutdown(wait=True)

    @property
    def waiting(self) -> int:
        return self._waiting

    def decoding(self, n: int) -> None:
        """n images (negative: done) are being read and decoded: a batch waits a little for
        them (DECODING_GRACE), so requests that arrived together are judged together."""
        self._decoding += n
        if n < 0 and self._wake is not None:
            self._wake.set()

    async def submit(
        self, images: list[ImageFile], metas: list[dict[str, Any]], announced: bool = False
    ) -> list[Judged]:
        """Queue the images, wait for their batch. announced: they were counted by decoding()."""
        n = len(images)
        if announced:
            self._decoding -= n  # in the same step as they are queued (or refused) below
        pixels = sum(int(f.frames.numel()) // 3 for f in images)
        if self._waiting and (
            self._waiting + n > self.queue_limit or self._waiting_pixels + pixels > QUEUE_PIXELS
        ):
            self.metrics.rejected.inc(n)
            raise Overloaded(self._retry_after())
        job = _Job(images, metas, asyncio.get_running_loop().create_future(), pixels)
        self._jobs.append(job)
        self._waiting += n
        self._waiting_pixels += pixels
        self.metrics.queue_depth.set(self._waiting)
        self._wake.set()
        # Shielded: a client that goes away cancels its wait, not the job (see `_take`).
        return await asyncio.shield(job.future)

    def _retry_after(self) -> int:
        if self._last_rate <= 0:
            return 1
        return max(1, math.ceil(self._waiting / self._last_rate))

    async def _run(self) -> None:
        while True:
            while not self._jobs:
                self._wake.clear()
                await self._wake.wait()
            arrived = self._jobs[0].arrived
            deadline = arrived + self.max_wait_s
            grace = arrived + self.max_wait_s * (1 + DECODING_GRACE)
            while self._waiting < self.max_batch:
                now = time.monotonic()
                if now >= deadline and (self._decoding <= 0 or now >= grace):
                    break
                left = (deadline if now < deadline else grace) - now
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), left)
                except TimeoutError:
                    break
            jobs = self._take()
            if jobs:
                await self._judge(jobs)

    def _take(self) -> list[_Job]:
        """Jobs of up to max_batch images, oldest first (a larger job alone); a job nobody
        waits for any more (its request was cancelled) is dropped before it is judged."""
        taken, count = [], 0
        while self._jobs:
            job = self._jobs[0]
            n = len(job.images)
            if taken and count + n > self.max_batch:
                break
            self._jobs.popleft()
            self._waiting -= n
            self._waiting_pixels -= job.pixels
            if job.future.cancelled():
                continue
            taken.append(job)
            count += n
        self.metrics.queue_depth.set(self._waiting)
        return taken

    async def _judge(self, jobs: list[_Job]) -> None:
        images = [f for job in jobs for f in job.images]
        metas = [m for job in jobs for m in job.metas]
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        try:
            result = await loop.run_in_executor(self._engine, self._moderate, images, metas)
        except Exception as err:  # a bug: the requests fail, the service stays up
            logger.error(
                "engine batch of %d images failed: %s: %s", len(images), type(err).__name__, err
            )
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(
                        APIError(
                            500, "the engine failed on this batch (logged)", code="engine_error"
                        )
                    )
            return
        took = time.monotonic() - started
        self._last_rate = len(images) / took if took > 0 else 0.0
        self.batches += 1
        self.metrics.batch_size.observe(len(images))
        self.metrics.engine_seconds.observe(took)
        unrecorded = set(result.unrecorded)
        logged = self.moderator.log is not None
        judged = [
            Judged(d, image, logged and d.decision_id not in unrecorded)
            for d, image in zip(result.decisions, result.images, strict=True)
        ]
        for d in result.decisions:
            self.metrics.decisions.labels(d.action).inc()
        self.metrics.unrecorded.inc(len(result.unrecorded))
        start = 0
        for job in jobs:
            mine = judged[start : start + len(job.images)]
            start += len(job.images)
            if not job.future.done():
                job.future.set_result(mine)

    def _moderate(self, images, metas):
        return self.moderator.moderate(images, metadata=metas)

    async def fail(self, messages: list[str], metas: list[dict[str, Any]]) -> list[Judged]:
        """Error decisions (on_error, logged) for images that could not be decoded; made on the
        engine thread, so that one thread at a time uses the Moderator."""

        def fail() -> tuple[list[Decision], set[str]]:
            before = len(self.moderator.unrecorded)
            decisions = self.moderator.fail(messages, metadata=metas)
            return decisions, set(self.moderator.unrecorded[before:])

        loop = asyncio.get_running_loop()
        decisions, unrecorded = await loop.run_in_executor(self._engine, fail)
        logged = self.moderator.log is not None
        for d in decisions:
            self.metrics.decisions.labels(d.action).inc()
        self.metrics.unrecorded.inc(len(unrecorded))
        return [Judged(d, None, logged and d.decision_id not in unrecorded) for d in decisions]
