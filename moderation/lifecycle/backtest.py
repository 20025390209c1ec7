"""Backtest: decide the logged history again with a candidate policy, from the stored embeddings.

For every live decision (shadow_of IS NULL) in the filters, oldest first, made by the candidate's
model with an embedding of its width, the candidate decides again and the report
(moderation.lifecycle.report) compares that with what was logged. Skipped, by reason, in this
order: "other_model" (another model id), "error_verdict" (a logged error: nothing to compare),
"no_embedding" (logged with store_embeddings off), "other_model" (an embedding of another width).

Cosines, exactly: embeddings are stored as float16, so cosines scored from them again differ from
the logged float32 ones in the last digits, and a decision sitting on a threshold could flip
although nothing changed. So each candidate concept (or special-care concept) whose vector is
the very vector of a concept of the policy that logged a decision (its sha256 is in that
policy's `PolicyRow.concepts[*]["vector"]`) takes the logged float32 cosine, already the maximum
over the image's views; only the other concepts are scored from the float16 embedding
(normalised, one matrix product per chunk, the maximum over each image's views). Thresholds, the
special-care adjustment and the action are then the engine's own code:
`scoring.scores_from_cosines` and the one decision rule (`moderation.kernel.rule`, through
`decision.action_ranks`). An identical candidate therefore
changes nothing, and a moved threshold changes exactly the decisions that cross it.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moderation.decision import action_ranks
from moderation.kernel.document import policy_summary
from moderation.lifecycle import history
from moderation.lifecycle.history import Filters, HistoryError
from moderation.lifecycle.report import ReportBuilder, human_codes
from moderation.scoring import scores_from_cosines
from moderation.storage.blobs import F16, F32, decode_rows
from moderation.storage.db import require_database, resolve_db_url
from moderation.storage.errors import database_errors, display_url
from moderation.storage.models import DecisionRow
from moderation.storage.schema import get_engine
from policy.compiled import CompiledPolicy
from policy.vocabulary import ACTIONS, verdict_of

# Knob: torch threads while scoring chunks. Chunks are small ([10,000, 20] scores): a parallel
# region costs more than it saves, most of all on a busy machine (measured on 2 shared cores:
# 84,000 decisions/s with 1 thread, 49,000 with 2); the database reader runs on another core.
SCORING_THREADS = 1


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to `n` for a while, then as they were."""
    before = torch.get_num_threads()
    if n < 1 or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def load_candidate(path: str | Path, *, model: str | None = None) -> CompiledPolicy:
    """A compiled artifact as it is, or a YAML policy compiled for `model` (default: its own)."""
    from moderation.loading import load_any_policy, load_compiled

    loaded = load_any_policy(path)
    if isinstance(loaded, CompiledPolicy):
        return loaded.to("cpu")
    compiled, _ = load_compiled(loaded, model=model, device="cpu")
    return compiled.to("cpu")


def candidate_summary(policy: CompiledPolicy) -> dict[str, Any]:
    """The candidate in a report: its name, version, digest and model (as in its documents)."""
    summary = policy_summary(policy)
    return {key: summary[key] for key in ("name", "version", "digest", "model")}


@dataclass
class Plan:
    """How the candidate scores the decisions of one logged policy."""

    names: list[str]  # the logged policy's concepts (matrix order), for "before" counts
    special_names: list[str]
    reuse: np.ndarray  # [C + S] candidate column -> column of the logged [C' + S'] cosines, or -1
    matrix: torch.Tensor  # [K, D] the candidate's vectors that are scored from embeddings

    @property
    def rescores(self) -> bool:
        return bool(self.matrix.shape[0])


def plan_for(candidate: CompiledPolicy, row: Any) -> Plan:
    """Which candidate columns reuse a logged cosine (same vector digest) for this policy row."""
    logged = [*(row.concepts or []), *(row.special_concepts or [])]
    column = {}
    for i, entry in enumerate(logged):
        column.setdefault(entry.get("vector"), i)
    column.pop(None, None)  # policies logged before vector digests: nothing to reuse
    concepts, special = candidate.vector_digests
    reuse = np.array([column.get(d, -1) for d in (*concepts, *special)], dtype=np.int64)
    if row.digest == candidate.digest and len(logged) == len(reuse):
        # The logged policy itself (a digest covers every vector): each column is its own,
        # also in a log written before vector digests were logged.
        reuse = np.arange(len(reuse), dtype=np.int64)
    vectors = torch.cat([candidate.concept_matrix, candidate.special_matrix]).float()
    return Plan(
        names=[c["name"] for c in row.concepts or []],
        special_names=[c["name"] for c in row.special_concepts or []],
        reuse=reuse,
        matrix=vectors[torch.from_numpy(np.flatnonzero(reuse < 0))],
    )


class Backtest:
    """One backtest run: the candidate, its plans per logged policy, and the report it fills."""

    def __init__(self, candidate: CompiledPolicy, report: ReportBuilder) -> None:
        self.policy = candidate
        self.report = report
        self.plans: dict[str, Plan] = {}
        self.used: set[str] = set()  # logged policies whose decisions were scored
        self.dim = candidate.embed_dim
        codes = report.actions.codes
        self.after_action = codes(ACTIONS)  # rank -> action code
        self.after_verdict = report.verdicts.codes([verdict_of(a) for a in ACTIONS])
        self.on_error = int(codes([candidate.on_error])[0])
        self.error = int(report.verdicts.codes(["error"])[0])
        report.declare(candidate.concept_names)
        report.declare(candidate.special_names, special=True)

    def add_policies(self, rows: dict[str, Any]) -> None:
        for digest, row in rows.items():
            if row.model_id == self.policy.model:
                self.plans[digest] = plan_for(self.policy, row)
                self.report.declare(self.plans[digest].names)
                self.report.declare(self.plans[digest].special_names, special=True)

    def columns(self, dialect: str) -> list[Any]:
        """What a chunk row holds (see `chunk`)."""
        from sqlalchemy import case, func, literal, null

        d = DecisionRow
        array_length = (
            func.jsonb_array_length if dialect == "postgresql" else func.json_array_length
        )
        rescored = [digest for digest, plan in self.plans.items() if plan.rescores]
        embedding = case((d.policy_digest.in_(rescored), d.embedding), else_=null())
        return [
            d.policy_digest,
            d.model_id,
            d.verdict,
            d.action,
            d.cosines,
            d.scores,
            d.special_cosines,
            d.special_scores,
            func.length(d.embedding),
            array_length(d.views),
            embedding if rescored else literal(None),
            history.latest_review_status(d.id),
        ]

    def chunk(self, rows: list[Any]) -> None:
        """Score one chunk of rows (`columns` + id) and add it to the report."""
        report, dim, model = self.report, self.dim, self.policy.model
        report.read(len(rows))
        digests, models, verdicts, lengths, views = ([r[i] for r in rows] for i in (0, 1, 2, 8, 9))
        groups: dict[str, list[int]] = {}
        for i, (digest, m, verdict, length, v) in enumerate(
            zip(digests, models, verdicts, lengths, views, strict=True)
        ):
            if m != model or digest not in self.plans:
                report.skip("other_model")
            elif verdict == "error":
                report.skip("error_verdict")
            elif not length:
                report.skip("no_embedding")
            elif length != 2 * dim * max(v or 1, 1):
                report.skip("other_model")
            else:
                groups.setdefault(digest, []).append(i)
        self.used.update(groups)
        n = len(rows)
        after_action = np.zeros(n, np.int64)
        after_verdict = np.zeros(n, np.int64)
        for digest, index in groups.items():
            a, v = self._group(self.plans[digest], [rows[i] for i in index])
            after_action[index], after_verdict[index] = a, v
        kept = sorted(i for index in groups.values() for i in index)
        if not kept:
            return
        report.add(
            [rows[i][-1] for i in kept],
            report.actions.codes(rows[i][3] for i in kept),
            after_action[kept],
            report.verdicts.codes(rows[i][2] for i in kept),
            after_verdict[kept],
            human_codes(rows[i][11] for i in kept),
        )

    def _group(self, plan: Plan, rows: list[Any]) -> tuple[np.ndarray, np.ndarray]:
        """Action and verdict codes of the candidate for rows of one logged policy."""
        p, n = self.policy, len(rows)
        c, s = len(plan.names), len(plan.special_names)
        logged = np.concatenate(
            [
                decode_rows([r[4] for r in rows], F32, c, "cosines"),
                decode_rows([r[6] for r in rows], F32, s, "special-care cosines"),
            ],
            axis=1,
        )  # [n, C' + S']
        report = self.report
        report.fired(plan.names, decode_rows([r[5] for r in rows], F32, c, "scores") > 0, "before")
        special_before = decode_rows([r[7] for r in rows], F32, s, "special-care scores") > 0
        report.fired(plan.special_names, special_before, "before", special=True)

        cosines = np.empty((n, len(plan.reuse)), np.float32)  # [n, C + S] the candidate's
        reused = plan.reuse >= 0
        cosines[:, reused] = logged[:, plan.reuse[reused]]
        finite = None
        if plan.rescores:
            fresh, finite = self._rescore(plan, rows)
            cosines[:, ~reused] = fresh
        cc = len(p.concept_names)
        scores = scores_from_cosines(
            p, torch.from_numpy(cosines[:, :cc]), torch.from_numpy(cosines[:, cc:]), finite
        )
        rank, _, _ = action_ranks(p, scores)
        valid = scores.valid.numpy()
        rank = rank.numpy()
        action = np.where(valid, self.after_action[rank], self.on_error)
        verdict = np.where(valid, self.after_verdict[rank], self.error)
        report.fired(p.concept_names, scores.fired.numpy() & valid[:, None], "after")
        special = scores.special_fired.numpy() & valid[:, None]
        report.fired(p.special_names, special, "after", special=True)
        return action, verdict

    def _rescore(self, plan: Plan, rows: list[Any]) -> tuple[np.ndarray, torch.Tensor]:
        counts = [max(r[9] or 1, 1) for r in rows]
        cosines, finite = embedding_cosines([r[10] for r in rows], counts, self.dim, plan.matrix)
        return cosines, torch.from_numpy(finite)


def embedding_cosines(
    blobs: list[bytes], counts: list[int], dim: int, matrix: torch.Tensor
) -> tuple[np.ndarray, np.ndarray]:
    """Cosines of stored float16 embeddings (image i: counts[i] views of `dim` floats) against
    the rows of `matrix` [K, D]: [n, K] float32, each the maximum over the image's views, and
    [n] bool: which images had only finite views. One join, one frombuffer, one product."""
    n = len(blobs)
    data = b"".join(blobs)
    if len(data) != sum(counts) * dim * F16.itemsize:
        raise HistoryError(f"logged embeddings do not fit their views ({dim} floats each)")
    flat = torch.from_numpy(np.frombuffer(data, dtype=F16).reshape(-1, dim).astype(F32))
    # F.normalize's x / max(|x|, eps), with the division after the product: [N, K] divisions
    # instead of a normalised [N, D] copy. A NaN or infinite value makes every cosine of its
    # view NaN, so the cosines say which views were finite without another pass.
    norms = torch.linalg.vector_norm(flat, dim=1).clamp_min(1e-12)  # [N]
    cosines = (torch.mm(flat, matrix.float().t()) / norms[:, None]).numpy()  # [N, K]
    if len(flat) != n:  # several views of some images: contiguous rows, so one reduceat
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        cosines = np.maximum.reduceat(cosines, starts, axis=0)  # NaN wins, as in max_over_views
    return cosines, np.isfinite(cosines).all(axis=1)


def backtest(
    candidate: CompiledPolicy,
    *,
    db: str | None = None,
    filters: Filters | None = None,
    examples: int = 5,
    chunk: int = history.READ_CHUNK,
    progress: bool = False,
    on_chunk: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """The report (a JSON-able dict) of `candidate` over the log at `db`."""
    from tqdm import tqdm

    filters = filters or Filters()
    url = resolve_db_url(db)
    require_database(url)
    report = ReportBuilder(
        candidate_summary(candidate),
        examples=examples,
        filters={**filters.to_dict(), "db": display_url(url)},
    )
    run = Backtest(candidate, report)
    with database_errors(url):
        engine = get_engine(url)
        with engine.connect() as conn, history.scanning(conn):
            policies = history.logged_policies(conn, filters.policy)
            run.add_policies(policies)
            where = [history.live_only(), *filters.time_clauses(DecisionRow.created_at)]
            if filters.policy is not None:
                where.append(history.unindexed(DecisionRow.policy_digest).in_(list(policies)))
            total = None
            if progress:
                total = history.count(conn, where)
                total = total if filters.limit is None else min(total, filters.limit)
            columns = run.columns(conn.dialect.name)
            with (
                tqdm(
                    total=total, unit="dec", desc="backtest", disable=not progress, file=sys.stderr
                ) as bar,
                torch_threads(SCORING_THREADS),
            ):
                pages = history.chunks(conn, columns, where, chunk=chunk, limit=filters.limit)
                for rows in history.prefetched(pages):
                    run.chunk(rows)
                    bar.update(len(rows))
                    if on_chunk is not None:
                        on_chunk(len(rows))
    rescored = sorted({name for d in run.used for name in _rescored_names(candidate, run.plans[d])})
    data = report.to_dict()
    data["rescored_concepts"] = rescored
    if rescored:
        data["notes"].append(
            f"scored from float16 embeddings (no logged cosine of the same vector): "
            f"{', '.join(rescored)}"
        )
    return data


def _rescored_names(candidate: CompiledPolicy, plan: Plan) -> list[str]:
    names = [*candidate.concept_names, *candidate.special_names]
    return [names[i] for i in np.flatnonzero(plan.reuse < 0)]
