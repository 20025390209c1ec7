"""What a command says about where its decisions went: logged (URL masked), spooled, replayed,
or not recorded at all."""

from __future__ import annotations

from typing import TYPE_CHECKING

from moderation.cli.options import clean
from moderation.storage import display_url

if TYPE_CHECKING:
    from moderation.engine import Moderator

MAX_IDS_SHOWN = 20  # decision ids named in the error line of a run that could not record them


def recording_summary(moderator: Moderator) -> str:
    """`; logged to URL; spooled N decisions to DIR (database unreachable)`... for a summary
    line; nothing when anything went wrong (then `recording_failure` is the error)."""
    log = moderator.log
    if log is None or moderator.log_errors:
        return ""
    counts, where = log.counts, clean(display_url(log.url))
    parts = []
    if counts.logged:
        many = f" {counts.logged} decisions" if counts.spooled else ""
        parts.append(f"logged{many} to {where}")
    if counts.spooled:
        parts.append(
            f"spooled {counts.spooled} decisions to {clean(log.spool.folder)} (database unreachable)"
        )
    if counts.replayed:
        parts.append(f"replayed {counts.replayed} earlier spooled decisions into {where}")
    return "".join(f"; {part}" for part in parts)


def recording_failure(moderator: Moderator, total: int) -> str:
    """The one-line error of a run whose decisions were not all recorded as they should be."""
    reason = clean(moderator.log_errors[0])
    more = len(moderator.log_errors) - 1
    also = f" (and {more} more recording problems)" if more > 0 else ""
    ids = moderator.unrecorded
    if not ids:
        return f"{reason}{also}"
    shown = ", ".join(ids[:MAX_IDS_SHOWN])
    if len(ids) > MAX_IDS_SHOWN:
        shown += f" and {len(ids) - MAX_IDS_SHOWN} more (--json marks each image's `recorded`)"
    return f"{len(ids)} of {total} decisions were not recorded ({reason}){also}: {shown}"
