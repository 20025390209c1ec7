"""`moderation review serve`, `review user ...` and `review webhook ...`: the review desk."""

from __future__ import annotations

import ipaddress
import sys
from pathlib import Path

import click

from moderation.cli.app import review
from moderation.cli.options import clean, db_option, echo_json, failures, json_option
from moderation.cli.review_text import table
from moderation.storage.db import require_database, resolve_db_url

ROLES = ("reviewer", "special-care", "admin")  # moderation.storage.models.DESK_ROLES


def _engine(db_url: str | None):
    """The engine of an existing, migrated database."""
    from moderation.storage.schema import get_engine

    with failures():
        url = resolve_db_url(db_url)
        require_database(url)
        return get_engine(url)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@review.command("serve")
@db_option
@click.option(
    "--held-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder of held originals for relative paths (default: $MODERATION_HELD_DIR, else ./held).",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(1, 65535), default=8001, show_default=True)
@click.option(
    "--lease",
    type=click.IntRange(60, 24 * 3600),
    default=900,
    show_default=True,
    metavar="SECONDS",
    help="How long a claim from the desk stays the reviewer's.",
)
@click.option(
    "--forwarded-allow-ips",
    default="127.0.0.1",
    show_default=True,
    metavar="IPS",
    help="Proxies trusted to say the request came over TLS (X-Forwarded-Proto).",
)
@click.option("--no-webhooks", is_flag=True, help="Do not deliver webhooks from this process.")
def serve_cmd(db_url, held_dir, host, port, lease, forwarded_allow_ips, no_webhooks):
    """Serve the review desk (web pages for reviewers) on HOST:PORT."""
    import uvicorn

    from moderation.desk.app import DeskSettings, create_app

    engine = _engine(db_url)
    if not _loopback(host):
        click.echo(
            f"Warning: listening on {clean(host)}, not loopback; put the desk behind a TLS proxy "
            "(docs/review-desk.md).",
            err=True,
        )
    settings = DeskSettings(
        db_url=str(engine.url.render_as_string(hide_password=False)),
        held_dir=held_dir,
        lease_seconds=lease,
        webhooks=not no_webhooks,
    )
    with failures():
        app = create_app(settings)
    click.echo(f"Review desk on http://{clean(host)}:{port}/ (Ctrl-C to stop)", err=True)
    uvicorn.run(
        app,
        host=host,
        port=port,
        proxy_headers=True,
        forwarded_allow_ips=forwarded_allow_ips,
        server_header=False,
        log_level="warning",
    )


@review.group("user")
def user_group() -> None:
    """Manage review desk accounts."""


def _password(from_stdin: bool) -> str:
    if from_stdin:
        line = sys.stdin.readline()
        return line[:-1] if line.endswith("\n") else line
    return click.prompt("Password", hide_input=True, confirmation_prompt=True)


password_stdin = click.option(
    "--password-stdin", is_flag=True, help="Read the password from the first line of stdin."
)


@user_group.command("add")
@click.argument("name")
@click.option("--role", type=click.Choice(ROLES), required=True, help="What the account may do.")
@password_stdin
@db_option
def user_add(name, role, password_stdin, db_url):
    """Add an account (the password is asked for, or read with --password-stdin)."""
    from moderation.desk.accounts import add_user

    engine = _engine(db_url)
    password = _password(password_stdin)
    with failures():
        add_user(engine, name, role, password)
    click.echo(f"Added {role} {clean(name.strip())}.")


@user_group.command("list")
@json_option
@db_option
def user_list(as_json, db_url):
    """List accounts (never their passwords)."""
    from moderation.desk.accounts import list_users

    engine = _engine(db_url)
    with failures():
        users = list_users(engine)
    if as_json:
        echo_json(users)
        return
    if not users:
        click.echo("No accounts yet: add one with `moderation review user add`.")
        return
    rows = [
        [clean(u["name"]), u["role"], "disabled" if u["disabled"] else "active", u["created_at"]]
        for u in users
    ]
    click.echo(table(["NAME", "ROLE", "STATE", "CREATED"], rows))


@user_group.command("disable")
@click.argument("name")
@db_option
def user_disable(name, db_url):
    """Disable an account and end its sessions."""
    from moderation.desk.accounts import disable_user

    engine = _engine(db_url)
    with failures():
        disable_user(engine, name)
    click.echo(f"Disabled {clean(name.strip())}; their sessions have ended.")


@user_group.command("passwd")
@click.argument("name")
@password_stdin
@db_option
def user_passwd(name, password_stdin, db_url):
    """Set an account's password (ends its sessions)."""
    from moderation.desk.accounts import set_password

    engine = _engine(db_url)
    password = _password(password_stdin)
    with failures():
        set_password(engine, name, password)
    click.echo(f"Password of {clean(name.strip())} changed; their sessions have ended.")


@review.group("webhook")
def webhook_group() -> None:
    """Deliver verdicts to the app that made the images (signed webhooks)."""


@webhook_group.command("add")
@click.argument("url")
@click.option(
    "--secret-env",
    required=True,
    metavar="VAR",
    help="Environment variable holding the HMAC secret (where the desk or `deliver` runs).",
)
@db_option
def webhook_add(url, secret_env, db_url):
    """Send every verdict from now on to URL, signed with the secret in $VAR."""
    from moderation.desk.webhooks import add_webhook

    engine = _engine(db_url)
    with failures():
        hook_id = add_webhook(engine, url, secret_env)
    click.echo(f"Added webhook {hook_id}: {clean(url)} (secret from ${clean(secret_env)}).")


@webhook_group.command("list")
@json_option
@db_option
def webhook_list(as_json, db_url):
    """List webhooks and their delivered and waiting verdicts."""
    from moderation.desk.webhooks import list_webhooks

    engine = _engine(db_url)
    with failures():
        hooks = list_webhooks(engine)
    if as_json:
        echo_json(hooks)
        return
    if not hooks:
        click.echo("No webhooks.")
        return
    rows = [
        [str(h["id"]), clean(h["url"]), h["secret_env"], str(h["delivered"]), str(h["waiting"])]
        for h in hooks
    ]
    click.echo(table(["ID", "URL", "SECRET", "DELIVERED", "WAITING"], rows, right=(0, 3, 4)))


@webhook_group.command("remove")
@click.argument("hook_id", type=int)
@db_option
def webhook_remove(hook_id, db_url):
    """Stop delivering to a webhook."""
    from moderation.desk.webhooks import remove_webhook

    engine = _engine(db_url)
    with failures():
        remove_webhook(engine, hook_id)
    click.echo(f"Removed webhook {hook_id}.")


@webhook_group.command("deliver")
@db_option
def webhook_deliver(db_url):
    """Deliver the verdicts that are due now, once.

    A running `review serve` delivers by itself every few seconds; this is for deployments that
    decide with the CLI only (run it from cron or a timer)."""
    import httpx

    from moderation.desk.webhooks import deliver_due
    from moderation.storage.models import utcnow

    engine = _engine(db_url)
    with failures(), httpx.Client() as client:
        counts = deliver_due(engine, utcnow(), client)
    click.echo(f"Delivered {counts['delivered']}, failed {counts['failed']} (retried later).")
