"""The `moderation` command and its groups; command modules add their commands to these."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="moderation-policy-engine")
def main() -> None:
    """Declarative moderation policies for generated images."""


@main.group()
def policy() -> None:
    """Validate, compile, import, compare and test moderation policies."""


@main.group()
def db() -> None:
    """Create, upgrade and repair the decision database."""


@main.group()
def review() -> None:
    """Work the human review queue."""
