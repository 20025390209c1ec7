"""Command-line interface: `moderation policy|db|review ...` (minimal stand-in; the lead owns it)."""

import click


@click.group()
def main():
    """Declarative moderation policies for generated images."""


@main.group()
def policy():
    """Validate, compile and import policies."""


@main.group()
def db():
    """Create, migrate and replay the decision log database."""


@main.group()
def review():
    """Work the human review queue."""
