"""The `moderation` command and its groups; command modules add their commands to these."""

from __future__ import annotations

import os

import click

# transformers and huggingface_hub draw "Loading weights" progress bars on stderr for every model
# a command loads; a command's own output is what people read (set the variable to 0 for bars).
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="moderation-policy-engine")
def main() -> None:
    """Declarative moderation policies for generated images."""


@main.group(short_help="Validate, compile, compare and test policies.")
def policy() -> None:
    """Validate, compile, import, compare and test moderation policies."""


@main.group()
def db() -> None:
    """Create, upgrade and repair the decision database."""


@main.group()
def review() -> None:
    """Work the human review queue."""
