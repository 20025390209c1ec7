"""Command line: click groups (minimal placeholder until the lead's version lands)."""

import click


@click.group()
def main():
    """Declarative moderation policies for generated images."""


@main.group()
def policy():
    """Validate, compile and import policies."""


@main.group()
def db():
    """Manage the decision database."""


@main.group()
def review():
    """Work the human review queue."""


# Command modules register themselves on the groups above.
from moderation.cli import import_cmd  # noqa: E402, F401
