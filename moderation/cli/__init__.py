"""Command line: `moderation` and its groups (minimal stand-in; the lead owns the real one)."""

import click


@click.group()
def main():
    """Declarative moderation policies for generated images."""


@main.group()
def policy():
    """Validate, compile and import policies."""


@main.group()
def db():
    """Create, migrate and repair the decision database."""


@main.group()
def review():
    """Work the human review queue."""


from moderation.cli import db_cmds  # noqa: E402,F401  (registers the `db` commands)
