"""`moderation bench-serve`: the HTTP service against the in-process Moderator, same images,
same run; and a long load run with the database made unavailable in the middle.

The service runs in a child process (`python -m moderation.bench.serve`, uvicorn on a loopback
port, the same seeded random model), so the load generator (httpx, asyncio) does not share its
interpreter. Requests are single-image `/v1/moderations` calls with a 224x224 PNG data URL.
In-process rows time `Moderator.moderate` on the decoded images at batch = concurrency (PNG
decoding not included: the service's rows include decoding, base64, HTTP and JSON).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

SIDE = 224


def bench_images(n: int, seed: int = 0) -> list[bytes]:
    """n smooth random 224x224 PNGs (a few KB to tens of KB each, like generated images)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = rng.uniform(0, 255, (8, 8, 3)).astype(np.uint8)
        image = Image.fromarray(small).resize((SIDE, SIDE), Image.BILINEAR)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def request_bodies(pngs: list[bytes]) -> list[dict[str, Any]]:
    """One `/v1/moderations` request body per PNG (a data URL, OpenAI's input shape)."""
    return [
        {
            "input": [
                {
                    "type": "image_url",
                    "image_url": {"url": "data:image/png;base64," + base64.b64encode(p).decode()},
                }
            ]
        }  # fmt: skip
        for p in pngs
    ]


def _moderator(size: str, db_url: str, folder: Path):
    from moderation.bench.models import load_models
    from moderation.engine import Moderator
    from moderation.storage import DecisionLog

    models = load_models(model=None, size=size, device=_cpu(), dtype=_f32())
    log = DecisionLog(db_url, spool_dir=folder / "spool", held_dir=folder / "held")
    return Moderator(models.policy, models.encoder, log=log), models.description


def _cpu():
    import torch

    return torch.device("cpu")


def _f32():
    import torch

    return torch.float32


def child_main(argv: list[str] | None = None) -> None:
    """The service process: the bench's model, logging to --db, on a loopback port."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", required=True)
    parser.add_argument("--db", required=True)
    parser.add_argument("--folder", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=10)
    parser.add_argument("--queue-limit", type=int, default=256)
    args = parser.parse_args(argv)
    from moderation.server.app import create_app
    from moderation.server.config import ServeConfig
    from moderation.server.run import serve_forever

    moderator, _ = _moderator(args.size, args.db, Path(args.folder))
    config = ServeConfig(
        max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, queue_limit=args.queue_limit
    )
    serve_forever(create_app(moderator, config), "127.0.0.1", args.port, log_level="warning")


@contextlib.contextmanager
def service(size: str, db_url: str, folder: Path, **options: Any) -> Iterator[tuple[str, str]]:
    """A child process serving the bench model; yields its base URL (once /readyz answers) and
    an API key made for it."""
    from moderation.server.keys import create_key
    from moderation.server.run import free_port
    from moderation.storage import upgrade

    upgrade(db_url)
    key = create_key(db_url, f"bench-{time.time_ns()}")

    port = free_port()
    args = [sys.executable, "-m", "moderation.bench.serve", "--size", size, "--db", db_url,
            "--folder", str(folder), "--port", str(port)]  # fmt: skip
    for option, value in options.items():
        args += [f"--{option.replace('_', '-')}", str(value)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    child = subprocess.Popen(args, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if child.poll() is not None:
                raise RuntimeError(f"the service exited with {child.returncode}")
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the service did not start")
            time.sleep(0.5)
        yield url, key
    finally:
        child.terminate()
        try:
            child.wait(60)
        except subprocess.TimeoutExpired:
            child.kill()


def _batch_stats(url: str) -> tuple[float, float]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    values = {}
    for line in text.splitlines():
        if line.startswith("moderation_batch_size_sum ") or line.startswith(
            "moderation_batch_size_count "
        ):
            name, value = line.split()
            values[name] = float(value)
    return values.get("moderation_batch_size_sum", 0.0), values.get(
        "moderation_batch_size_count", 0.0
    )


async def _load(
    url: str,
    key: str,
    bodies: list[dict],
    concurrency: int,
    total: int,
    on_progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """`total` requests from `concurrency` workers; latencies and status counts."""
    latencies: list[float] = []
    statuses: Counter = Counter()
    next_index = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(
        base_url=url, timeout=600, limits=limits, headers=headers
    ) as client:

        async def worker() -> None:
            nonlocal next_index
            while next_index < total:
                i = next_index
                next_index += 1
                started = time.perf_counter()
                try:
                    if bodies:
                        r = await client.post("/v1/moderations", json=bodies[i % len(bodies)])
                    else:  # the HTTP stack alone: client, uvicorn, FastAPI, no engine
                        r = await client.get("/healthz")
                    statuses[r.status_code] += 1
                except httpx.HTTPError as err:
                    statuses[type(err).__name__] += 1
                latencies.append(time.perf_counter() - started)
                if on_progress is not None:
                    on_progress(i)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return {"latencies": latencies, "statuses": dict(statuses), "wall_s": wall}


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def _row(kind: str, concurrency: int, images: int, wall: float, latencies: list[float]) -> dict:
    return {
        "path": kind,
        "concurrency": concurrency,
        "images": images,
        "images_per_s": images / wall if wall > 0 else 0.0,
        "p50_ms": 1000 * _percentile(latencies, 50),
        "p99_ms": 1000 * _percentile(latencies, 99),
    }


def run_serve_bench(
    size: str,
    concurrencies: tuple[int, ...] = (1, 8, 32),
    requests: dict[int, int] | None = None,
    progress: Callable[[str], None] = print,
    max_wait_ms: float = 10.0,
    in_process: bool = True,
) -> dict[str, Any]:
    """Rows for the service (started with `max_wait_ms`) and, unless in_process is False, the
    in-process Moderator, at each concurrency."""
    from moderation.image_files import read_image

    requests = requests or {c: max(4 * c, 64) for c in concurrencies}
    pngs = bench_images(64)
    bodies = request_bodies(pngs)
    rows = []
    with tempfile.TemporaryDirectory(prefix="moderation-bench-serve-") as tmp:
        folder = Path(tmp)
        db_url = f"sqlite:///{folder / 'served.db'}"
        with service(size, db_url, folder / "served", max_wait_ms=max_wait_ms) as (url, key):
            asyncio.run(_load(url, key, bodies, 1, 8))  # warm-up
            ceiling = asyncio.run(_load(url, key, [], max(concurrencies), 1000))
            ceiling_rps = 1000 / ceiling["wall_s"]
            progress(
                f"HTTP ceiling (GET /healthz, c={max(concurrencies)}): {ceiling_rps:.0f} req/s"
            )
            for c in concurrencies:
                before = _batch_stats(url)
                out = asyncio.run(_load(url, key, bodies, c, requests[c]))
                after = _batch_stats(url)
                row = _row("service", c, requests[c], out["wall_s"], out["latencies"])
                count = after[1] - before[1]
                row["mean_batch"] = (after[0] - before[0]) / count if count else 0.0
                row["statuses"] = out["statuses"]
                rows.append(row)
                progress(f"service c={c}: {row['images_per_s']:.1f} img/s, "
                         f"batch {row['mean_batch']:.1f}, {out['statuses']}")  # fmt: skip
        description = f"random-{size}"
        if not in_process:
            return {"size": size, "model": description, "rows": rows, "healthz_rps": ceiling_rps}
        moderator, description = _moderator(size, f"sqlite:///{folder / 'inproc.db'}", folder)
        decoded = [read_image(io.BytesIO(p)) for p in pngs]
        moderator.moderate(decoded[:8])  # warm-up
        for c in concurrencies:
            calls = max(1, requests[c] // c)
            latencies = []
            started = time.perf_counter()
            for k in range(calls):
                batch = [decoded[(k * c + j) % len(decoded)] for j in range(c)]
                t = time.perf_counter()
                moderator.moderate(batch)
                latencies.append(time.perf_counter() - t)
            wall = time.perf_counter() - started
            row = _row("in-process", c, calls * c, wall, latencies)
            row["mean_batch"] = float(c)
            rows.append(row)
            progress(f"in-process batch={c}: {row['images_per_s']:.1f} img/s")
        moderator.close()
    return {"size": size, "model": description, "rows": rows, "healthz_rps": ceiling_rps}


def run_load(
    pg_server: str,
    total: int = 20_000,
    concurrency: int = 32,
    outage_s: float = 5.0,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """`total` requests on the tiny model logging to a scratch PostgreSQL database whose
    connections are cut (ALLOW_CONNECTIONS false + terminate) in the middle for `outage_s`;
    then the spool is replayed and the decisions in the database are counted."""
    import threading

    from sqlalchemy import create_engine, make_url, text

    from moderation.bench.scratch import temporary_pg_database
    from moderation.storage import DecisionLog

    pngs = bench_images(64)
    bodies = request_bodies(pngs)
    with (
        tempfile.TemporaryDirectory(prefix="moderation-load-") as tmp,
        temporary_pg_database(pg_server, "moderation_load") as url,
    ):
        folder = Path(tmp)
        name = make_url(url).database
        admin = create_engine(make_url(url).set(database="postgres"), isolation_level="AUTOCOMMIT")
        outage: dict[str, float] = {}

        def cut() -> None:
            with admin.connect() as conn:
                conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'))
                conn.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = :n AND pid <> pg_backend_pid()"
                    ),
                    {"n": name},
                )
            outage["start"] = time.perf_counter()
            progress(f"database {name} unavailable")
            time.sleep(outage_s)
            with admin.connect() as conn:
                conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
            outage["end"] = time.perf_counter()
            progress(f"database {name} available again")

        def on_progress(i: int) -> None:
            if i == total // 2 and "thread" not in outage:
                outage["thread"] = 1
                threading.Thread(target=cut, daemon=True).start()

        with service("tiny", url, folder / "served") as (base, key):
            out = asyncio.run(_load(base, key, bodies, concurrency, total, on_progress))
            metrics = httpx.get(f"{base}/metrics", timeout=30).text
        # What an operator runs after an outage (the service also replays by itself on its
        # next write once the database is back): every spooled decision goes in.
        with DecisionLog(url, spool_dir=folder / "served" / "spool") as log:
            replayed = log.replay()
        with create_engine(url).connect() as conn:
            in_db = conn.execute(text("SELECT count(*) FROM decisions")).scalar_one()
        admin.dispose()
    answered = out["statuses"].get(200, 0)
    server_errors = {k: v for k, v in out["statuses"].items() if isinstance(k, int) and k >= 500}
    unrecorded = next(
        (float(line.split()[1]) for line in metrics.splitlines()
         if line.startswith("moderation_unrecorded_decisions_total ")),
        0.0,
    )  # fmt: skip
    return {
        "requests": total,
        "concurrency": concurrency,
        "statuses": out["statuses"],
        "wall_s": out["wall_s"],
        "images_per_s": total / out["wall_s"],
        "p50_ms": 1000 * _percentile(out["latencies"], 50),
        "p99_ms": 1000 * _percentile(out["latencies"], 99),
        "outage_s": outage.get("end", 0) - outage.get("start", 0),
        "answered_200": answered,
        "decisions_in_database": in_db,
        "replayed_after_run": replayed,
        "lost": answered - in_db,
        "server_errors": server_errors,
        "unrecorded_metric": unrecorded,
    }


def report(result: dict[str, Any]) -> str:
    lines = [
        f"model: {result['model']}",
        f"HTTP ceiling (GET /healthz at the highest concurrency): {result['healthz_rps']:.0f} req/s",
        "| path | concurrency | images | images/s | p50 ms | p99 ms | mean batch |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['path']} | {r['concurrency']} | {r['images']} | {r['images_per_s']:.1f} | "
            f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['mean_batch']:.1f} |"
        )
    return "\n".join(lines)


def summary(result: dict[str, Any]) -> list[str]:
    """Service / in-process at each concurrency."""
    by = {(r["path"], r["concurrency"]): r for r in result["rows"]}
    out = []
    for (path, c), r in sorted(by.items()):
        if path == "service" and ("in-process", c) in by:
            ratio = r["images_per_s"] / by[("in-process", c)]["images_per_s"]
            out.append(f"concurrency {c}: service at {100 * ratio:.0f}% of in-process")
    return out


if __name__ == "__main__":
    child_main()
