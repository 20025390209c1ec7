"""Shadow report: what a candidate scored beside the live policy (`Moderator(..., shadow=[...])`)
decided, against what the live policy did, from the shadow decisions in the log.

A shadow decision is a `decisions` row with `shadow_of` = its live decision's id and
`policy_digest` = the candidate's digest (embedding always NULL), so this needs no embedding and
no model: it reads each shadow row with its live row, "before" = the live decision, "after" =
the shadow one, in the report shape of `policy backtest` (moderation.lifecycle.report). Live
decisions that were errors are skipped ("error_verdict"); example ids are the live decisions'.
"""

from __future__ import annotations

import sys
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.orm import aliased

from moderation.lifecycle import history
from moderation.lifecycle.backtest import candidate_summary
from moderation.lifecycle.history import Filters, HistoryError
from moderation.lifecycle.report import ReportBuilder, human_codes
from moderation.storage.blobs import F32, decode_rows
from moderation.storage.db import require_database, resolve_db_url
from moderation.storage.errors import database_errors, display_url
from moderation.storage.models import DecisionRow, PolicyRow
from moderation.storage.schema import get_engine
from policy.compiled import CompiledPolicy


def resolve_candidate(conn: Connection, value: str | CompiledPolicy) -> dict[str, Any]:
    """The candidate's summary: a compiled policy's, or that of the logged policy `value`
    names or whose digest starts with it (exactly one must match)."""
    if isinstance(value, CompiledPolicy):
        return candidate_summary(value)
    from sqlalchemy import select

    rows = conn.execute(select(PolicyRow.__table__).where(history.policy_matches(value))).all()
    if not rows:
        raise HistoryError(
            f"{value!r} is not a policy file, and no logged policy is named so or has a digest "
            "starting with it"
        )
    if len(rows) > 1:
        digests = ", ".join(sorted(r.digest[:12] for r in rows))
        raise HistoryError(
            f"{value!r} matches {len(rows)} logged policies ({digests}): give more of a digest"
        )
    row = rows[0]
    return {"name": row.name, "version": row.version, "digest": row.digest, "model": row.model_id}


def shadow_report(
    candidate: str | CompiledPolicy,
    *,
    db: str | None = None,
    filters: Filters | None = None,
    examples: int = 5,
    chunk: int = history.READ_CHUNK,
    progress: bool = False,
) -> dict[str, Any]:
    """The report (a JSON-able dict) of the shadow decisions of `candidate` (a compiled policy,
    or a logged policy's name or digest prefix) in the log at `db`."""
    from tqdm import tqdm

    filters = filters or Filters()
    url = resolve_db_url(db)
    require_database(url)
    with database_errors(url):
        engine = get_engine(url)
        with engine.connect() as conn, history.scanning(conn):
            summary = resolve_candidate(conn, candidate)
            report = ReportBuilder(
                summary, examples=examples, filters={**filters.to_dict(), "db": display_url(url)}
            )
            policies = history.logged_policies(conn)
            own = policies.get(summary["digest"])
            after_names = [c["name"] for c in own.concepts] if own is not None else []
            after_special = [c["name"] for c in own.special_concepts] if own is not None else []
            report.declare(after_names)
            report.declare(after_special, special=True)
            if own is None:
                report.notes.append("no shadow decision of this candidate was logged")
            shadow, live = aliased(DecisionRow, name="shadow"), aliased(DecisionRow, name="live")
            where = [
                history.unindexed(shadow.shadow_of) != "",  # along (policy_digest, created_at)
                shadow.policy_digest == summary["digest"],
                *filters.time_clauses(shadow.created_at),
            ]
            columns = [
                live.policy_digest,
                live.verdict,
                live.action,
                live.scores,
                live.special_scores,
                shadow.verdict,
                shadow.action,
                shadow.scores,
                shadow.special_scores,
                history.latest_review_status(live.id),
                live.id,
            ]
            total = None
            if progress:
                total = history.count(conn, where, source=_joined(shadow, live))
                total = total if filters.limit is None else min(total, filters.limit)
            with tqdm(
                total=total, unit="dec", desc="shadow report", disable=not progress, file=sys.stderr
            ) as bar:
                for rows in history.chunks(
                    conn,
                    columns,
                    where,
                    created=shadow.created_at,
                    key=shadow.id,
                    source=_joined(shadow, live),
                    chunk=chunk,
                    limit=filters.limit,
                ):
                    _chunk(report, rows, policies, after_names, after_special)
                    bar.update(len(rows))
    return report.to_dict()


def _joined(shadow: Any, live: Any) -> Any:
    from sqlalchemy.orm import join

    return join(shadow, live, shadow.shadow_of == live.id)


def _chunk(
    report: ReportBuilder,
    rows: list[Any],
    policies: dict[str, Any],
    after_names: list[str],
    after_special: list[str],
) -> None:
    report.read(len(rows))
    kept = [r for r in rows if r[1] != "error"]
    report.skip("error_verdict", len(rows) - len(kept))
    if not kept:
        return
    groups: dict[str, list[Any]] = {}
    for r in kept:
        groups.setdefault(r[0], []).append(r)
    for digest, group in groups.items():  # "before": each live policy's own concepts
        row = policies[digest]
        names = [c["name"] for c in row.concepts]
        special = [c["name"] for c in row.special_concepts]
        report.declare(names)
        report.declare(special, special=True)
        report.fired(
            names, decode_rows([r[3] for r in group], F32, len(names), "scores") > 0, "before"
        )
        fired = decode_rows([r[4] for r in group], F32, len(special), "special-care scores") > 0
        report.fired(special, fired, "before", special=True)
    scored = [r for r in kept if r[5] != "error"]  # an error fired nothing
    after = decode_rows([r[7] for r in scored], F32, len(after_names), "scores") > 0
    report.fired(after_names, after, "after")
    special = (
        decode_rows([r[8] for r in scored], F32, len(after_special), "special-care scores") > 0
    )
    report.fired(after_special, special, "after", special=True)
    report.add(
        [r[10] for r in kept],
        report.actions.codes(r[2] for r in kept),
        report.actions.codes(r[6] for r in kept),
        report.verdicts.codes(r[1] for r in kept),
        report.verdicts.codes(r[5] for r in kept),
        human_codes(r[9] for r in kept),
    )
