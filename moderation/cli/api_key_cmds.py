"""`moderation api-key create | list | revoke`: the keys `moderation serve` accepts."""

from __future__ import annotations

import click

from moderation.cli.app import main
from moderation.cli.options import (
    clean,
    command_errors,
    db_option,
    echo_json,
    echo_table,
    json_option,
)


@main.group("api-key")
def api_key() -> None:
    """Create, list and revoke the API keys of `moderation serve`."""


@api_key.command("create", short_help="Create a key and print it once.")
@click.argument("name")
@json_option
@db_option
@command_errors
def create_cmd(name, as_json, db_url):
    """Create a key named NAME and print it (once: only its hash is stored)."""
    from moderation.server.keys import create_key
    from moderation.storage import resolve_db_url

    key = create_key(resolve_db_url(db_url), name)
    if as_json:
        echo_json({"name": name, "key": key})
    else:
        click.echo(key)
    click.echo(
        f"API key {clean(name)!r} created; it is shown only this once: keep it secret.", err=True
    )


@api_key.command("list")
@json_option
@db_option
@command_errors
def list_cmd(as_json, db_url):
    """List the keys: name, first characters, created, revoked."""
    from moderation.server.keys import list_keys
    from moderation.storage import resolve_db_url

    keys = list_keys(resolve_db_url(db_url))
    rows = [
        {
            "name": k.name,
            "prefix": k.prefix,
            "created_at": k.created_at.isoformat(),
            "revoked_at": k.revoked_at.isoformat() if k.revoked_at else None,
        }
        for k in keys
    ]
    if as_json:
        echo_json(rows)
    elif not rows:
        click.echo("No API keys.")
    else:
        echo_table(
            ["name", "key", "created", "revoked"],
            [
                [r["name"], r["prefix"] + "…", r["created_at"][:19], (r["revoked_at"] or "-")[:19]]
                for r in rows
            ],
        )


@api_key.command("revoke")
@click.argument("name")
@json_option
@db_option
@command_errors
def revoke_cmd(name, as_json, db_url):
    """Revoke the key named NAME: the service refuses it within seconds."""
    from moderation.server.keys import revoke_key
    from moderation.storage import resolve_db_url

    revoke_key(resolve_db_url(db_url), name)
    if as_json:
        echo_json({"name": name, "revoked": True})
    else:
        click.echo(f"revoked API key {clean(name)!r}")
