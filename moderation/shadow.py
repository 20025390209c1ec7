"""Shadow candidates: policies scored on live traffic beside the live policy, never acted on.

A candidate is scored on the live policy's embeddings (its views, its model), in the same pass:
every candidate's concept and special-care rows are concatenated once per device, so a batch
costs one matrix product for all of them, one maximum over views, a fixed number of elementwise
operations whatever the number of candidates (thresholds, special care, the most severe action,
the review band and the margin of each candidate, as `decide` works them out) and one host
transfer for all their columns. A `compat: diffusers` candidate (diffusers' rounding) is scored
with `scoring.score_many` instead, one set of operations per candidate. The live policy keeps its
own `score()` call, so its decisions are bit for bit those of a Moderator without candidates. A candidate's decisions are attached to the live ones
(`Decision.shadows`), linked by `shadow_of` and logged after them; they are never acted on,
never queued for review and never hold an original.

When scoring the candidates fails, the live decisions and images are untouched: the failure is
logged and every candidate gets an error decision for each image (verdict "error", its
`on_error` action, the failure as its error), so that each live decision keeps one shadow
decision per candidate and a shadow report sees the failure instead of missing rows.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from moderation.decision import (
    Decision,
    HostColumns,
    build_decisions,
    decision_columns,
    error_decisions,
    host_columns,
)
from moderation.errors import ModerationError
from moderation.scoring import max_over_views, score_many, stacked_matrices

if TYPE_CHECKING:
    from policy import CompiledPolicy, Policy

logger = logging.getLogger(__name__)


def load_candidates(
    candidates: Sequence[str | Path | Policy | CompiledPolicy], encoder: Any
) -> list[CompiledPolicy]:
    """Compiled candidates: artifacts as they are, YAML compiled with the live policy's encoder.

    A candidate that cannot be read or compiled raises ModerationError naming it.
    """
    from moderation.loading import load_any_policy
    from policy import CompiledPolicy, PolicyError, compile_policy

    out = []
    for item in candidates:
        label = f"shadow candidate {item}" if isinstance(item, (str, Path)) else None
        try:
            policy = load_any_policy(item) if isinstance(item, (str, Path)) else item
            label = label or f"shadow candidate {getattr(policy, 'name', None) or policy!r}"
            if not isinstance(policy, CompiledPolicy):
                if encoder is None:
                    raise ModerationError("a YAML candidate needs the live policy's encoder")
                policy = compile_policy(policy, encoder)
        except (PolicyError, ModerationError, OSError) as exc:
            raise ModerationError(f"{label}: {exc}") from exc
        out.append(policy)
    return out


class ShadowCandidates:
    """The candidates of one Moderator, checked against its live policy, on its device."""

    def __init__(self, live: CompiledPolicy, candidates: Sequence[CompiledPolicy] = ()) -> None:
        seen: dict[str, str] = {}
        for c in candidates:
            _check_fits(live, c)
            if c.digest in seen:
                raise ModerationError(
                    f"shadow candidate {c.name!r} (digest {c.digest[:12]}) is given twice"
                )
            seen[c.digest] = c.name
        self.policies: tuple[CompiledPolicy, ...] = tuple(c.to(live.device) for c in candidates)
        self._stack()

    def _stack(self) -> None:
        # Precomputed once per device: the concatenated matrices of every candidate.
        self.matrices = stacked_matrices(self.policies) if self.policies else None
        fusable = all(p.compat != "diffusers" for p in self.policies)
        fusable = fusable and sum(len(p.concept_names) for p in self.policies) > 0
        self.fused = _Fused(self.policies, self.matrices) if fusable else None

    def __len__(self) -> int:
        return len(self.policies)

    def __bool__(self) -> bool:
        return bool(self.policies)

    def to(self, device: torch.device | str) -> ShadowCandidates:
        self.policies = tuple(p.to(device) for p in self.policies)
        self._stack()
        return self

    def attach(
        self,
        live: list[Decision],
        embeddings: torch.Tensor | None,
        owners: torch.Tensor | None = None,
    ) -> None:
        """Decide every candidate on the live decisions' embeddings (float32 [N, D]; None when
        the batch could not be encoded) and attach the results to them. Never raises."""
        if not self.policies or not live:
            return
        try:
            if embeddings is None:
                per_candidate = [_error_shadows(p, live, None) for p in self.policies]
            elif self.fused is not None:
                per_candidate = self.fused.decide(live, embeddings, owners)
            else:
                per_candidate = self._decide(live, embeddings, owners)
        except Exception as exc:  # a candidate never changes what the live policy decided
            logger.exception(
                "moderation: scoring %d shadow candidates failed for a batch of %d images; "
                "their decisions are recorded as errors",
                len(self.policies),
                len(live),
            )
            message = f"shadow scoring failed: {type(exc).__name__}: {exc}"
            per_candidate = [_error_shadows(p, live, message) for p in self.policies]
        for i, d in enumerate(live):
            d.shadows = tuple(decisions[i] for decisions in per_candidate)

    def _decide(
        self, live: list[Decision], embeddings: torch.Tensor, owners: torch.Tensor | None
    ) -> list[list[Decision]]:
        scores = score_many(self.policies, embeddings, owners, len(live), matrices=self.matrices)
        columns = [decision_columns(p, s) for p, s in zip(self.policies, scores, strict=True)]
        widths = [sum(c.shape[1] for c in cols) for cols in columns]
        # One transfer for every candidate's columns.
        flat = [c.to(torch.float32) for cols in columns for c in cols]
        host = torch.cat(flat, dim=1).cpu().numpy()
        out, at = [], 0
        for policy, width in zip(self.policies, widths, strict=True):
            columns = host_columns(policy, host[:, at : at + width])
            out.append(build_decisions(policy, columns, live=live))
            at += width
        return out


class _Fused:
    """Every candidate's rows in one matrix and their rules as per-column and per-candidate
    vectors, so that scoring and deciding K candidates is one set of device operations."""

    def __init__(self, policies: Sequence[CompiledPolicy], matrices) -> None:
        from policy.compiled import ACTION_RANK

        concept, special = matrices
        device = concept.device
        self.policies = policies
        self.c = [len(p.concept_names) for p in policies]
        self.s = [len(p.special_names) for p in policies]
        self.n_concepts, self.n_special = sum(self.c), sum(self.s)
        self.matrix = torch.cat([concept, special]).t().contiguous()  # [D, C + S]
        k = len(policies)
        owner = torch.repeat_interleave(torch.arange(k), torch.tensor(self.c)).to(device)
        special_owner = torch.repeat_interleave(torch.arange(k), torch.tensor(self.s))
        self.owner = owner  # [C] which candidate a concept column belongs to
        self.thresholds = torch.cat([p.thresholds.to(device, torch.float32) for p in policies])
        self.special_thresholds = torch.cat(
            [p.special_thresholds.to(device, torch.float32) for p in policies]
        )
        self.ranks = torch.cat([p.action_ranks.to(device) for p in policies])  # [C]
        # [K, C] and [K, S]: which columns each candidate owns.
        self.mask = (torch.arange(k)[:, None] == owner.cpu()[None, :]).to(device)
        self.special_mask = (torch.arange(k)[:, None] == special_owner[None, :]).to(device)
        self.adjustment = torch.tensor([float(p.adjustment) for p in policies], device=device)
        self.escalate = torch.tensor(
            [ACTION_RANK[p.escalate] if p.escalate else 0 for p in policies], device=device
        )
        # -band per column: a score in (-band, 0] sends the image to review (no band: none).
        self.band = torch.tensor(
            [-float(p.review_band) for p in policies], device=device, dtype=torch.float32
        )[owner]
        self.review = ACTION_RANK["review"]
        self.start = torch.tensor([0, *self.c[:-1]], device=device).cumsum(0)  # [K]

    def decide(
        self, live: list[Decision], embeddings: torch.Tensor, owners: torch.Tensor | None
    ) -> list[list[Decision]]:
        n, c = len(live), self.n_concepts
        unit = F.normalize(embeddings.float())
        cos = torch.mm(unit, self.matrix)  # [N, C + S]: every candidate in one product
        finite = torch.isfinite(embeddings).all(dim=1)  # [N]
        views = None
        if owners is not None:
            cos, views = max_over_views(cos, owners, n)  # [B, C + S]
            finite = torch.ones(n, dtype=torch.long, device=cos.device).scatter_reduce(
                0, owners, finite.long(), "amin"
            )
            finite = finite.bool()
        concept_cos, special_cos = cos[:, :c], cos[:, c:]
        special_scores = special_cos - self.special_thresholds  # [B, S]
        hit = ((special_scores > 0)[:, None, :] & self.special_mask).any(dim=2)  # [B, K]
        adjustment = hit.to(torch.float32) * self.adjustment  # [B, K]
        scores = concept_cos - self.thresholds + adjustment[:, self.owner]  # [B, C]
        mask = self.mask  # [K, C]
        rank = (((scores > 0).long() * self.ranks)[:, None, :] * mask).amax(dim=2)
        rank = torch.maximum(rank, hit.long() * self.escalate)
        band = ((scores > self.band) & (scores <= 0))[:, None, :] & mask
        rank = torch.maximum(rank, band.any(dim=2).long() * self.review)  # [B, K]
        bad = (~torch.isfinite(scores))[:, None, :] & mask
        bad_special = (~torch.isfinite(special_scores))[:, None, :] & self.special_mask
        valid = finite[:, None] & ~bad.any(dim=2) & ~bad_special.any(dim=2)  # [B, K]
        inf = torch.tensor(float("-inf"), device=scores.device)
        margin, top = torch.where(mask, scores[:, None, :], inf).max(dim=2)  # [B, K]
        top = top - self.start
        blocks = [concept_cos, scores, special_cos, special_scores, adjustment, rank, valid]
        blocks += [margin, top]
        if views is not None:
            blocks.append(views)
        host = torch.cat([b.to(torch.float32) for b in blocks], dim=1).cpu().numpy()
        return self._split(live, host, views is not None)

    def _split(self, live: list[Decision], host, has_views: bool) -> list[list[Decision]]:
        c, s, k = self.n_concepts, self.n_special, len(self.policies)
        parts = {}
        at = 0
        for name, width in (
            ("cos", c),
            ("scores", c),
            ("scos", s),
            ("sscores", s),
            ("adj", k),
            ("rank", k),
            ("valid", k),
            ("margin", k),
            ("top", k),
            ("views", c + s if has_views else 0),
        ):
            parts[name] = host[:, at : at + width]
            at += width
        out, c0, s0 = [], 0, 0
        for i, policy in enumerate(self.policies):
            c1, s1 = c0 + self.c[i], s0 + self.s[i]
            views = parts["views"]
            columns = HostColumns(
                parts["cos"][:, c0:c1],
                parts["scores"][:, c0:c1],
                parts["scos"][:, s0:s1],
                parts["sscores"][:, s0:s1],
                parts["adj"][:, i],
                parts["rank"][:, i],
                parts["valid"][:, i],
                parts["margin"][:, i],
                parts["top"][:, i],
                views[:, c0:c1].astype("int16") if has_views else None,
                views[:, c + s0 : c + s1].astype("int16") if has_views else None,
            )
            out.append(build_decisions(policy, columns, live=live))
            c0, s0 = c1, s1
        return out


def shadow_decisions(live: Sequence[Decision]) -> list[Decision]:
    """Every shadow decision of `live`, image by image (the order they are logged in)."""
    return [s for d in live for s in d.shadows]


def _error_shadows(
    policy: CompiledPolicy, live: Sequence[Decision], message: str | None
) -> list[Decision]:
    """A candidate's error decisions for live decisions (its on_error; the live error, or
    `message`), linked to them."""
    out = error_decisions(policy, [{} for _ in live], "")
    for d, of in zip(out, live, strict=True):
        d.error = message or of.error or "not judged"
        d.metadata = dict(of.metadata)
        d.views = of.views
        d.image_sha256 = of.image_sha256
        d.created_at = of.created_at
        d.shadow_of = of.decision_id
    return out


def _check_fits(live: CompiledPolicy, candidate: CompiledPolicy) -> None:
    """Refuse a candidate that cannot be scored on the live policy's embeddings and views."""
    name = f"shadow candidate {candidate.name!r} (digest {candidate.digest[:12]})"
    if candidate.embed_dim != live.embed_dim:
        raise ModerationError(
            f"{name} has {candidate.embed_dim}-wide embeddings but the live policy "
            f"{live.name!r} has {live.embed_dim}: candidates are scored on the live embeddings"
        )
    if not _same_model(candidate.model, live.model):
        raise ModerationError(
            f"{name} is compiled for model {candidate.model!r} but the live policy "
            f"{live.name!r} runs on {live.model!r}: compile the candidate for that model"
        )
    if candidate.views != live.views:
        raise ModerationError(
            f"{name} judges `views: {candidate.views}` but the live policy {live.name!r} "
            f"judges `views: {live.views}`: candidates are scored on the live policy's views"
        )


def _same_model(a: str, b: str) -> bool:
    """The same model id, or two spellings of one local folder."""
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()
