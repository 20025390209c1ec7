"""The `moderation` command: click groups (minimal; the lead owns the full version)."""

import click


@click.group()
def main() -> None:
    """Moderate generated images with declarative policies."""


@main.group()
def policy() -> None:
    """Validate and compile policy files."""


@main.group()
def db() -> None:
    """Manage the decision database."""


@main.group()
def review() -> None:
    """Work the human review queue."""


from moderation.cli import policy_cmds  # noqa: E402,F401  (registers its commands)
