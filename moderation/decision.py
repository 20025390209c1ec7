"""Decision: what the engine concluded about one image, and why."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import numpy as np

from moderation.host_columns import HostColumns, host_columns, values
from moderation.ids import new_decision_ids
from policy.vocabulary import ACTION_RANK, ACTIONS, verdict_of

if TYPE_CHECKING:
    import torch

    from moderation.scoring import Scores
    from policy.compiled import CompiledPolicy


def new_decision_id() -> str:
    return str(uuid.uuid4())


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(eq=False)
class Decision:
    """One image's verdict with every number that led to it.

    Per-concept arrays follow the compiled policy's order (`policy.concept_names`), so a decision
    over 100,000 concepts costs one array, not a dict; `concept_scores` builds the dict on demand.
    """

    verdict: str  # allow | flag | review | error
    action: str  # allow | review | blur | pixelate | blackout
    policy: CompiledPolicy = field(repr=False)
    cosines: np.ndarray = field(repr=False)  # [C] float32
    scores: np.ndarray = field(repr=False)  # [C] float32: cos - threshold + adjustment
    special_cosines: np.ndarray = field(repr=False)  # [S] float32
    special_scores: np.ndarray = field(repr=False)  # [S] float32
    fired: tuple[str, ...] = ()
    special_hits: tuple[str, ...] = ()
    adjustment: float = 0.0
    margin: float | None = None  # highest concept score; None when the image could not be scored
    top_concept: str | None = None
    error: str | None = None
    embedding: np.ndarray | None = field(default=None, repr=False)  # [V, D] float32, per view
    image_sha256: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    decision_id: str = field(default_factory=new_decision_id)
    created_at: datetime = field(default_factory=utcnow)
    # The views the image was judged on ({"frame": int, "box": [left, top, right, bottom]} in
    # source pixels), None for one view of the whole input; per concept, which view gave its
    # maximum cosine (None: view 0 for every concept).
    views: list[dict[str, Any]] | None = None
    concept_views: np.ndarray | None = field(default=None, repr=False)  # [C] int16
    special_views: np.ndarray | None = field(default=None, repr=False)  # [S] int16
    shadow_of: str | None = None  # the live decision's id, for a shadow policy's decision
    # How a float input's values were read: "0,1", "-1,1" or "both" (auto range could not tell:
    # judged under each reading, views say which); None for uint8, files and embeddings.
    value_range: str | None = None
    # Digest of the image encoder (weights + preprocessing) that embedded the image.
    encoder_digest: str | None = None
    # A live decision's shadow decisions: what each shadow candidate would have decided about
    # the same image (candidate order; empty without candidates). Never acted on or queued.
    shadows: tuple[Decision, ...] = field(default=(), repr=False)

    @property
    def flagged(self) -> bool:
        """True when the caller does not get the image as it was."""
        return self.action != "allow"

    @property
    def needs_review(self) -> bool:
        """Action review, or a special-care hit under a policy that escalates special care.

        `escalate: allow` (diffusers compat) only adds the adjustment: no review item. A shadow
        decision (`shadow_of` set) never needs review: a candidate's verdicts queue nothing.
        """
        if self.shadow_of is not None:
            return False
        escalates = self.policy.escalate not in (None, "allow")
        return self.action == "review" or (bool(self.special_hits) and escalates)

    @property
    def concept_scores(self) -> dict[str, float]:
        return dict(zip(self.policy.concept_names, self.scores.tolist(), strict=True))

    @property
    def special_care_scores(self) -> dict[str, float]:
        return dict(zip(self.policy.special_names, self.special_scores.tolist(), strict=True))

    def explain(self, top: int | None = None) -> list[dict[str, Any]]:
        """Per-concept rows (name, category, action, cosine, threshold, score, fired), best first."""
        thresholds = self.policy.thresholds.detach().cpu().numpy()
        order = np.argsort(-self.scores, kind="stable") if self.scores.size else np.array([], int)
        if top is not None:
            order = order[:top]
        rows = []
        for i in order.tolist():
            name = self.policy.concept_names[i]
            rows.append(
                {
                    "concept": name,
                    "category": self.policy.categories[i],
                    "action": self.policy.actions[i],
                    "cosine": float(self.cosines[i]),
                    "threshold": float(thresholds[i]),
                    "score": float(self.scores[i]),
                    "fired": name in self.fired,
                    # which of `views` gave the cosine (None: the image was one view)
                    "view": self.view_of(i),
                }
            )
        return rows

    def view_of(self, concept: int) -> int | None:
        """Index in `views` of the view that gave concept `concept` its cosine (None: one view)."""
        if self.views is None:
            return None
        return int(self.concept_views[concept]) if self.concept_views is not None else 0

    def to_dict(self, *, top: int | None = 5) -> dict[str, Any]:
        """A JSON-able summary: the stable shape printed by `--json`."""
        return {
            "decision_id": self.decision_id,
            "created_at": self.created_at.isoformat(),
            "verdict": self.verdict,
            "action": self.action,
            "fired": list(self.fired),
            "special_care": list(self.special_hits),
            "adjustment": self.adjustment,
            "margin": self.margin,
            "top_concept": self.top_concept,
            "error": self.error,
            "image_sha256": self.image_sha256,
            "policy": {
                "name": self.policy.name,
                "version": self.policy.version,
                "digest": self.policy.digest,
            },
            "model": self.policy.model,
            "concepts": self.explain(top=top),
            "views": self.views,  # what the image was judged on (None: CLIP's centre crop)
            "value_range": self.value_range,  # how a float input was read (None: not float)
            "encoder_digest": self.encoder_digest,  # the tower (weights + preprocessing)
            "metadata": self.metadata,
        }


NON_FINITE = "non-finite embedding"


def decide(
    policy: CompiledPolicy,
    scores: Scores,
    *,
    errors: Sequence[str | None] | None = None,
    embeddings: torch.Tensor | None = None,
    metadata: Sequence[Mapping[str, Any]] | Mapping[str, Any] | None = None,
    owners: torch.Tensor | None = None,
    views: Sequence[list[dict[str, Any]] | None] | None = None,
) -> list[Decision]:
    """One Decision per image: the action is worked out on the device, then one host transfer.

    `embeddings` are kept in the decisions (one row per view; with `owners` [N], row i belongs
    to image owners[i], as in `score`); `views` describes each image's views.
    """
    import torch

    batch = scores.scores.shape[0]
    if errors is not None and len(errors) != batch:
        raise ValueError(f"errors has {len(errors)} entries for a batch of {batch}")
    if isinstance(metadata, Sequence) and len(metadata) != batch:
        raise ValueError(f"metadata has {len(metadata)} entries for a batch of {batch}")
    if views is not None and len(views) != batch:
        raise ValueError(f"views has {len(views)} entries for a batch of {batch}")

    columns = decision_columns(policy, scores)
    width = sum(c.shape[1] for c in columns)
    one_view = owners is None
    if embeddings is not None and one_view:
        columns.append(embeddings.detach().to(scores.scores.device))
    # One [B, K] float32 block, one transfer: integer columns are exact below 2**24 concepts.
    host = torch.cat([c.to(torch.float32) for c in columns], dim=1).cpu().numpy()  # [B, K]
    embedding_rows: list[np.ndarray] | None = None
    if embeddings is not None and one_view:
        embedding_rows = list(host[:, width:, None].transpose(0, 2, 1))  # B x [1, D]
    elif embeddings is not None:
        # Views make the rows per image uneven: a second transfer, only when embeddings are kept.
        flat = embeddings.detach().to(torch.float32).cpu().numpy()  # [N, D]
        counts = torch.bincount(owners.to("cpu"), minlength=batch).tolist()
        embedding_rows = np.split(flat, np.cumsum(counts)[:-1])  # B x [V, D]
    return decisions_from_host(
        policy,
        host[:, :width],
        errors=errors,
        metadata=[_metadata_for(metadata, i) for i in range(batch)],
        views=views,
        embedding_rows=embedding_rows,
    )


def decision_columns(policy: CompiledPolicy, scores: Scores) -> list[torch.Tensor]:
    """The [B, K] device columns `decisions_from_host` reads back (most severe action among
    fired concepts, special care, review band, margin, top concept), not yet transferred."""
    rank, margin, top = action_ranks(policy, scores)
    columns = [
        scores.cosines,
        scores.scores,
        scores.special_cosines,
        scores.special_scores,
        scores.adjustment[:, None],
        rank[:, None],
        scores.valid[:, None],
        margin[:, None],
        top[:, None],
    ]
    if scores.concept_views is not None:
        columns += [scores.concept_views, scores.special_views]
    return columns


def action_ranks(
    policy: CompiledPolicy, scores: Scores
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image, on the scores' device: the rank (policy.vocabulary.ACTION_RANK) of the action
    `decide` takes for a scored image, the highest concept score and the concept holding it.

    The most severe action among fired concepts (allow where none fired), raised by a
    special-care hit to `escalate` and by a score in the review band to review. `decide`, shadow
    candidates and the backtest (moderation.lifecycle.backtest) all decide through here.
    """
    import torch

    batch, n_concepts = scores.scores.shape
    device = scores.scores.device
    fired = scores.scores > 0  # [B, C]
    ranks = policy.action_ranks.to(device)  # [C]
    if n_concepts:
        rank = (fired.long() * ranks).amax(dim=1)  # [B]
    else:
        rank = torch.zeros(batch, dtype=torch.long, device=device)
    if policy.escalate is not None:
        rank = torch.maximum(rank, scores.special_hit.long() * ACTION_RANK[policy.escalate])
    if policy.review_band > 0 and n_concepts:
        in_band = ((scores.scores > -policy.review_band) & (scores.scores <= 0)).any(dim=1)  # [B]
        rank = torch.maximum(rank, in_band.long() * ACTION_RANK["review"])
    if n_concepts:
        margin, top = scores.scores.max(dim=1)  # [B], [B]
    else:
        margin, top = scores.scores.new_zeros(batch), rank.new_zeros(batch)
    return rank, margin, top


def decisions_from_host(
    policy: CompiledPolicy,
    host: np.ndarray,
    *,
    errors: Sequence[str | None] | None = None,
    metadata: Sequence[dict[str, Any]] | None = None,
    views: Sequence[list[dict[str, Any]] | None] | None = None,
    embedding_rows: Sequence[np.ndarray] | None = None,
) -> list[Decision]:
    """Decisions from the host copy [B, K] of `decision_columns` (views columns when K says so)."""
    columns = host_columns(policy, host)
    return build_decisions(
        policy,
        columns,
        errors=errors,
        metadata=metadata,
        views=views,
        embedding_rows=embedding_rows,
    )


def build_decisions(
    policy: CompiledPolicy,
    columns: HostColumns,
    *,
    errors: Sequence[str | None] | None = None,
    metadata: Sequence[dict[str, Any]] | None = None,
    views: Sequence[list[dict[str, Any]] | None] | None = None,
    embedding_rows: Sequence[np.ndarray] | None = None,
    live: Sequence[Decision] | None = None,
    ids: Sequence[str] | None = None,
    fired: tuple[np.ndarray, np.ndarray, list[bool], list[bool]] | None = None,
) -> list[Decision]:
    """One Decision per row of `columns` (ids: their decision ids, default new ones).

    The [B] columns may already be Python lists, and `fired` the masks `scores > 0`,
    `special_scores > 0` and whether each row has any (a caller deciding several policies at
    once works them out for all of them in one go).

    With `live`, these are shadow decisions of a candidate policy: each takes its live
    decision's time, image hash, metadata, views and error (an image the live policy could not
    judge is not judged by a candidate either) and links to it (`shadow_of`).
    """
    cosines, concept_scores = columns.cosines, columns.scores
    special_cosines, special_scores = columns.special_cosines, columns.special_scores
    concept_views, special_views = columns.concept_views, columns.special_views
    batch, c = concept_scores.shape
    # Python values once per column, not a NumPy scalar per image.
    adjustment, valid = values(columns.adjustment), values(columns.valid)
    action_rank, top = values(columns.rank, np.int64), values(columns.top, np.int64)
    margin = values(columns.margin)
    if fired is None:
        fired_np = concept_scores > 0  # [B, C]
        special_fired_np = special_scores > 0  # [B, S]
        any_fired = fired_np.any(axis=1).tolist()
        any_special = special_fired_np.any(axis=1).tolist()
    else:
        fired_np, special_fired_np, any_fired, any_special = fired

    actions_by_rank = ACTIONS
    # Fail closed: CompiledPolicy refuses on_error `allow`, so an unscored image never passes.
    on_error = policy.on_error
    names, special_names = policy.concept_names, policy.special_names
    none = [None] * batch
    if live is None:
        errs = list(errors) if errors is not None else none
        metas = list(metadata) if metadata is not None else [{} for _ in range(batch)]
        views_of = list(views) if views is not None else none
        embeddings = list(embedding_rows) if embedding_rows is not None else none
        times = [utcnow() for _ in range(batch)]
        hashes, links = none, none
    else:  # shadow decisions: the live decision's image, time, metadata and error
        errs = [of.error if of.verdict == "error" else None for of in live]
        metas = [dict(of.metadata) for of in live]
        views_of, embeddings = [of.views for of in live], none
        times = [of.created_at for of in live]
        hashes, links = [of.image_sha256 for of in live], [of.decision_id for of in live]
    ids = new_decision_ids(batch) if ids is None else ids
    cviews = list(concept_views) if concept_views is not None else none
    sviews = list(special_views) if special_views is not None else none
    decisions = []
    for i in range(batch):
        error = errs[i]
        if error is None and not valid[i]:
            error = NON_FINITE
        if error is not None:
            verdict, action, fired, hits, adjust, best, top_name = (
                "error",
                on_error,
                (),
                (),
                0.0,
                None,
                None,
            )
        else:
            action = actions_by_rank[action_rank[i]]
            verdict = verdict_of(action)
            fired = tuple(names[j] for j in np.flatnonzero(fired_np[i])) if any_fired[i] else ()
            hits = ()
            if any_special[i]:
                hits = tuple(special_names[j] for j in np.flatnonzero(special_fired_np[i]))
            adjust = adjustment[i]
            best, top_name = (margin[i], names[top[i]]) if c else (None, None)
        decisions.append(
            Decision(
                verdict=verdict,
                action=action,
                policy=policy,
                cosines=cosines[i],
                scores=concept_scores[i],
                special_cosines=special_cosines[i],
                special_scores=special_scores[i],
                fired=fired,
                special_hits=hits,
                adjustment=adjust,
                margin=best,
                top_concept=top_name,
                error=error,
                embedding=embeddings[i],
                image_sha256=hashes[i],
                metadata=metas[i],
                decision_id=ids[i],
                created_at=times[i],
                views=views_of[i],
                concept_views=cviews[i],
                special_views=sviews[i],
                shadow_of=links[i],
            )
        )
    return decisions


def _metadata_for(
    metadata: Sequence[Mapping[str, Any]] | Mapping[str, Any] | None, index: int
) -> dict[str, Any]:
    """The caller's metadata for one image: one mapping per image, or one shared by all."""
    if metadata is None:
        return {}
    if isinstance(metadata, Mapping):
        return dict(metadata)
    return dict(metadata[index])
