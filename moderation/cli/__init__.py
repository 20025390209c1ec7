"""The `moderation` command: policies, checking images, the decision database and the review queue.

Each command group lives in its own module; heavy imports (torch, transformers) happen inside the
commands so that `moderation --help` stays fast.
"""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="moderation-policy-engine")
def main() -> None:
    """Declarative moderation policies for generated images."""


@main.group()
def policy() -> None:
    """Validate, compile and import moderation policies."""


@main.group()
def db() -> None:
    """Create, upgrade and repair the decision database."""


@main.group()
def review() -> None:
    """Work the human review queue."""


# Command modules register themselves on the groups above.
from moderation.cli import (  # noqa: E402, F401
    bench_cmd,
    check_cmd,
    compile_cmd,
    db_cmds,
    import_cmd,
    policy_cmds,
    review_cmds,
)
