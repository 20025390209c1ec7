"""Shadow candidates: policies scored on live traffic beside the live policy, never acted on.

A candidate is scored on the live policy's embeddings (its views, its model), in the same pass:
every candidate's matrices are concatenated once (`scoring.stacked_matrices`), so a batch costs
one matrix product per kind for all of them and one host transfer for all their columns. The
live policy keeps its own `score()` call, so its decisions are bit for bit those of a Moderator
without candidates. A candidate's decisions are attached to the live ones
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

from moderation.decision import Decision, decision_columns, decisions_from_host, error_decisions
from moderation.errors import ModerationError
from moderation.scoring import score_many, stacked_matrices

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
        scores = score_many(self.policies, embeddings, owners, len(live), matrices=self.matrices)
        columns = [decision_columns(p, s) for p, s in zip(self.policies, scores, strict=True)]
        widths = [sum(c.shape[1] for c in cols) for cols in columns]
        # One transfer for every candidate's columns.
        flat = [c.to(torch.float32) for cols in columns for c in cols]
        host = torch.cat(flat, dim=1).cpu().numpy()
        out, at = [], 0
        for policy, width in zip(self.policies, widths, strict=True):
            out.append(decisions_from_host(policy, host[:, at : at + width], live=live))
            at += width
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
