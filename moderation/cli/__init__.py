"""The `moderation` command: policies, checking images, the decision database and the review queue.

`app` defines the command and its groups; each command group lives in its own module, and
`options` holds what they share (--db, --json, model options, output). Heavy imports (torch,
transformers) happen inside the commands so that `moderation --help` stays fast.
"""

from __future__ import annotations

# Importing the command modules registers their commands on the groups of `app`.
from moderation.cli import (  # noqa: F401
    api_key_cmds,
    backtest_cmds,
    bench_cmd,
    bench_serve_cmd,
    calibrate_cmd,
    check_cmd,
    db_cmds,
    decisions_cmds,
    desk_cmds,
    lifecycle_cmds,
    policy_cmds,
    review_cmds,
    serve_cmd,
)
from moderation.cli.app import main

__all__ = ["main"]
