"""`moderation serve`: the HTTP service (OpenAI-compatible /v1/moderations, /v1/moderate)."""

from __future__ import annotations

import logging

import click

from moderation.cli.app import main
from moderation.cli.options import (
    clean,
    command_errors,
    db_option,
    model_options,
    policy_option,
    shadow_option,
)


@main.command("serve", short_help="Serve the policy over HTTP (OpenAI-compatible moderations).")
@policy_option
@shadow_option
@model_options
@db_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--max-batch", default=32, show_default=True, type=click.IntRange(1, 4096),
    help="Most images in one engine batch (requests are coalesced up to this).",
)  # fmt: skip
@click.option(
    "--max-wait-ms", default=10.0, show_default=True, type=click.FloatRange(0, 10_000),
    help="How long the oldest waiting image may wait for a fuller batch.",
)  # fmt: skip
@click.option(
    "--queue-limit", default=256, show_default=True, type=click.IntRange(1),
    help="Images waiting for the engine before new requests get 429 (Retry-After).",
)  # fmt: skip
@click.option(
    "--max-body-mb", default=20.0, show_default=True, type=click.FloatRange(0.001),
    help="Request bodies over this many MiB get 413.",
)  # fmt: skip
@click.option(
    "--max-images", default=16, show_default=True, type=click.IntRange(1, 1024),
    help="Most images in one request.",
)  # fmt: skip
@click.option(
    "--fetch-urls", "fetch_urls", multiple=True, metavar="HOST",
    help="Fetch http(s) image URLs from this host (repeatable; default: refuse every URL).",
)  # fmt: skip
@click.option(
    "--no-auth", is_flag=True, help="No API keys (local development; loopback addresses only)."
)
@command_errors
def serve_cmd(
    policy_path, shadow_paths, model, text_model, device, db_url, host, port, max_batch,
    max_wait_ms, queue_limit, max_body_mb, max_images, fetch_urls, no_auth,
):  # fmt: skip
    """Serve the policy over HTTP: /v1/moderations (OpenAI's shape), /v1/moderate and more.

    Every /v1/* request needs `Authorization: Bearer KEY` (`moderation api-key create NAME`);
    every decision is logged to --db with the key's name. See docs/serving.md.
    """
    from moderation.server.config import ServeConfig, is_loopback

    if no_auth and not is_loopback(host):
        raise click.UsageError(
            f"--no-auth listens on loopback addresses only (127.0.0.1, ::1), not {clean(host)}"
        )
    from moderation.engine import Moderator
    from moderation.server.app import create_app
    from moderation.server.keys import list_keys
    from moderation.server.run import serve_forever
    from moderation.storage import resolve_db_url

    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    url = resolve_db_url(db_url)
    keys = [] if no_auth else list_keys(url)  # also refuses a database not at head
    if not no_auth and not any(k.revoked_at is None for k in keys):
        click.echo(
            "warning: no active API key: every /v1/* request will get 401 until you run "
            "`moderation api-key create NAME`",
            err=True,
        )
    moderator = Moderator.from_policy(
        policy_path,
        model=model,
        device=device,
        text_model=text_model,
        db=url,
        shadow=list(shadow_paths),
    )
    config = ServeConfig(
        host=host,
        port=port,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        queue_limit=queue_limit,
        max_body_mb=max_body_mb,
        max_images=max_images,
        fetch_urls=frozenset(h.lower() for h in fetch_urls),
        auth=not no_auth,
    )
    serve_forever(create_app(moderator, config), host, port)
