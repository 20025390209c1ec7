"""Shadow candidates: policies scored on live traffic beside the live policy, never acted on.

A candidate is scored on the live policy's embeddings (its views, its model), in the same pass:
every candidate's concept and special-care rows are concatenated once per device, so a batch
costs one matrix product per kind for all of them, one maximum over views, a fixed number of
device operations whatever the number of candidates (`scoring.adjusted_scores` for thresholds
and special care, then the one decision rule, `moderation.rule.apply`, over every candidate's
columns at once) and one host transfer of all their named columns. A `compat: diffusers`
candidate (diffusers' rounding) is scored with `scoring.scores_from_cosines` one candidate at a
time; the rule still runs once for all. The live policy keeps its own `score()` call, so its
decisions are bit for bit those of a Moderator without candidates. A candidate's decisions are
attached to the live ones
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

import numpy as np
import torch

from moderation.decision import Decision, build_decisions, error_decisions
from moderation.errors import ModerationError
from moderation.host_columns import HostColumns, to_host
from moderation.ids import new_decision_ids
from moderation.kernel import rule
from moderation.scoring import (
    adjusted_scores,
    scores_from_cosines,
    stacked_cosines,
    stacked_matrices,
)

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
        # Precomputed once per device: the concatenated matrices and rules of every candidate.
        self.matrices = stacked_matrices(self.policies) if self.policies else None
        self.rules = rule.Rules.of(self.policies) if self.policies else None
        fusable = bool(self.policies) and all(p.compat != "diffusers" for p in self.policies)
        self.fused = _Fused(self.policies, self.rules) if fusable else None

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
        """Every candidate's scores over their concatenated columns, the rule over all of them
        in one pass (moderation.rule), one host transfer, then each candidate's decisions."""
        n = len(live)
        cosines, special_cosines, finite, concept_views, special_views = stacked_cosines(
            embeddings, self.matrices, owners, n
        )
        if self.fused is not None:
            columns = self.fused.columns(cosines, special_cosines, finite)
        else:  # a `compat: diffusers` candidate keeps its own arithmetic: one policy at a time
            columns = _one_by_one(self.policies, cosines, special_cosines, finite)
        outcome = rule.apply(self.rules, columns["scores"], columns["special_scores"])
        host = to_host(
            {
                "cosines": cosines,
                "special_cosines": special_cosines,
                **columns,
                "rank": outcome.rank,
                "margin": outcome.margin,
                "top": outcome.top,
                "reason": outcome.reason,
                "reason_concept": outcome.reason_concept,
                "concept_views": concept_views,
                "special_views": special_views,
            }
        )  # one transfer for every candidate
        ids = new_decision_ids(n * len(self.policies))  # one call for every candidate
        out, c0, s0 = [], 0, 0
        views = host.get("concept_views")
        for k, policy in enumerate(self.policies):
            c1, s1 = c0 + len(policy.concept_names), s0 + len(policy.special_names)
            candidate = HostColumns(
                cosines=host["cosines"][:, c0:c1],
                scores=host["scores"][:, c0:c1],
                special_cosines=host["special_cosines"][:, s0:s1],
                special_scores=host["special_scores"][:, s0:s1],
                concept_views=None if views is None else views[:, c0:c1].astype(np.int16),
                special_views=(
                    None if views is None else host["special_views"][:, s0:s1].astype(np.int16)
                ),
                **{name: host[name][:, k] for name in _PER_CANDIDATE},
            )
            out.append(build_decisions(policy, candidate, live=live, ids=ids[k * n : (k + 1) * n]))
            c0, s0 = c1, s1
        return out


# HostColumns' [B] fields: [B, K] host columns, one column per candidate.
_PER_CANDIDATE = ("adjustment", "rank", "valid", "margin", "top", "reason", "reason_concept")


def _one_by_one(
    policies: Sequence[CompiledPolicy],
    cosines: torch.Tensor,
    special_cosines: torch.Tensor,
    finite: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """The scores of candidates one at a time (`scoring.scores_from_cosines`), concatenated."""
    scores, c0, s0 = [], 0, 0
    for p in policies:
        c1, s1 = c0 + len(p.concept_names), s0 + len(p.special_names)
        scores.append(scores_from_cosines(p, cosines[:, c0:c1], special_cosines[:, s0:s1], finite))
        c0, s0 = c1, s1
    return {
        "scores": torch.cat([x.scores for x in scores], dim=1),
        "special_scores": torch.cat([x.special_scores for x in scores], dim=1),
        "adjustment": torch.stack([x.adjustment for x in scores], dim=1),
        "valid": torch.stack([x.valid for x in scores], dim=1),
    }


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
    if not (
        _same_model(candidate.model, live.model)
        or (live.model_path and _same_model(candidate.model, live.model_path))
    ):
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


class _Fused:
    """Every candidate's thresholds and adjustments concatenated on the device: their scores
    come from one product (`scoring.adjusted_scores` over all their columns at once)."""

    def __init__(self, policies: Sequence[CompiledPolicy], rules: rule.Rules) -> None:
        device = policies[0].device

        def cat(name: str) -> torch.Tensor:
            return torch.cat([getattr(p, name).to(device, torch.float32) for p in policies])

        self.rules = rules
        self.thresholds, self.special_thresholds = cat("thresholds"), cat("special_thresholds")
        self.adjustments = torch.tensor(
            [float(p.adjustment) for p in policies], dtype=torch.float32, device=device
        )

    def columns(
        self, cosines: torch.Tensor, special_cosines: torch.Tensor, finite: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        scores, special_scores, _, adjustment = adjusted_scores(
            self.rules,
            cosines,
            special_cosines,
            self.thresholds,
            self.special_thresholds,
            self.adjustments,
        )
        # Thresholds and adjustments are finite: only a non-finite embedding makes a score
        # non-finite, but a candidate is judged on its own columns, as it would be alone.
        bad = rule.segment_max((~torch.isfinite(scores)).long(), self.rules.owner, self.rules.k, 0)
        bad_special = rule.segment_max(
            (~torch.isfinite(special_scores)).long(), self.rules.special_owner, self.rules.k, 0
        )
        valid = finite[:, None] & (bad == 0) & (bad_special == 0)  # [B, K]
        return {
            "scores": scores,
            "special_scores": special_scores,
            "adjustment": adjustment,
            "valid": valid,
        }
