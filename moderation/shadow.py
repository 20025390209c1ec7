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

import numpy as np
import torch
import torch.nn.functional as F

from moderation.decision import (
    Decision,
    HostColumns,
    build_decisions,
    decision_columns,
    host_columns,
)
from moderation.engine_io import error_decisions
from moderation.errors import ModerationError
from moderation.ids import new_decision_ids
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
        fusable = bool(self.policies) and all(p.compat != "diffusers" for p in self.policies)
        fusable = fusable and all(p.concept_names for p in self.policies)
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
    """Every candidate's rows in one matrix: one product (and one maximum over views) on the
    device, one transfer of all the cosines, then every candidate's rules at once on the host.

    The rules are `scoring.scores_from_cosines` and `decision.decision_columns` as NumPy over
    the concatenated columns, reduced per candidate (`reduceat` over its columns), so that K
    candidates cost a fixed number of vector operations instead of dozens of device operations
    each (test_shadow checks that they decide what each candidate decides alone).
    """

    def __init__(self, policies: Sequence[CompiledPolicy], matrices) -> None:
        from policy.compiled import ACTION_RANK

        concept, special = matrices
        self.policies = policies
        self.n_concepts = int(concept.shape[0])
        self.matrix = torch.cat([concept, special]).t().contiguous()  # [D, C + S]
        counts = [len(p.concept_names) for p in policies]  # each > 0 (else not fused)
        special_counts = [len(p.special_names) for p in policies]
        self.start = np.cumsum([0, *counts[:-1]])  # [K] first column of each candidate
        self.slices = [slice(int(a), int(a) + n) for a, n in zip(self.start, counts, strict=True)]
        bounds = np.cumsum([0, *special_counts])
        self.special_slices = [
            slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)
        ]
        owner = np.repeat(np.arange(len(policies)), counts)  # [C] candidate of each column

        def host(name: str) -> np.ndarray:
            return np.concatenate(
                [getattr(p, name).detach().to("cpu", torch.float32).numpy() for p in policies]
            )

        self.owner = owner
        self.thresholds, self.special_thresholds = host("thresholds"), host("special_thresholds")
        self.ranks = np.array([ACTION_RANK[a] for p in policies for a in p.actions], np.int64)
        self.special_mask = (  # [S, K] float32: which candidate owns a special-care column
            np.repeat(np.arange(len(policies)), special_counts)[:, None]
            == np.arange(len(policies))[None, :]
        ).astype(np.float32)
        self.adjustment = np.array([p.adjustment for p in policies], np.float32)
        self.escalate = np.array(
            [ACTION_RANK[p.escalate] if p.escalate else 0 for p in policies], np.int64
        )
        # -band per column: a score in (-band, 0] sends the image to review (no band: none).
        self.neg_band = -np.array([p.review_band for p in policies], np.float32)[owner]
        self.review = ACTION_RANK["review"]

    def decide(
        self, live: list[Decision], embeddings: torch.Tensor, owners: torch.Tensor | None
    ) -> list[list[Decision]]:
        n, c = len(live), self.n_concepts
        unit = F.normalize(embeddings.float())
        cos = torch.mm(unit, self.matrix)  # [N, C + S]: every candidate in one product
        # A NaN or infinite embedding makes its row of cosines NaN (the norm is NaN or inf), and
        # NaN wins the maximum over views: such an image is invalid below without a check here.
        views = None
        if owners is not None:
            cos, views = max_over_views(cos, owners, n)  # [B, C + S]
            cos = torch.cat([cos, views.to(torch.float32)], dim=1)
        host = cos.cpu().numpy()  # one transfer for every candidate
        width = self.matrix.shape[1]
        cosines, special_cosines = host[:, :c], host[:, c:width]
        views_np = host[:, width:].astype(np.int16) if views is not None else None

        start, mask = self.start, self.special_mask
        special_scores = special_cosines - self.special_thresholds  # [B, S]
        special_fired = special_scores > 0
        hit = (special_fired.astype(np.float32) @ mask) > 0  # [B, K] a special-care hit
        adjustment = hit * self.adjustment  # [B, K] float32
        scores = cosines - self.thresholds + adjustment[:, self.owner]  # [B, C]
        fired = scores > 0
        rank = np.maximum.reduceat(np.where(fired, self.ranks, 0), start, axis=1)  # [B, K]
        rank = np.maximum(rank, hit * self.escalate)
        in_band = (scores > self.neg_band) & ~fired  # within the review band below a threshold
        rank = np.maximum(rank, np.logical_or.reduceat(in_band, start, axis=1) * self.review)
        # Thresholds and adjustments are finite: only a non-finite embedding (a NaN row of
        # cosines) makes a score non-finite, for every candidate alike.
        valid = np.isfinite(host[:, :width]).all(axis=1).tolist()  # [B]
        margin = np.maximum.reduceat(scores, start, axis=1)  # [B, K]
        top = np.stack([scores[:, cs].argmax(axis=1) for cs in self.slices], axis=1)  # [B, K]
        any_fired = np.logical_or.reduceat(fired, start, axis=1)  # [B, K]
        # Python lists per candidate in one call per column: no NumPy scalar per decision.
        per = [x.T.tolist() for x in (adjustment, rank, margin, top, any_fired, hit)]

        ids = new_decision_ids(n * len(self.policies))  # one call for every candidate
        out = []
        for k, policy in enumerate(self.policies):
            cs, ss = self.slices[k], self.special_slices[k]
            adjust, ranks, best, tops, anyf, anys = (values[k] for values in per)
            columns = HostColumns(
                cosines[:, cs],
                scores[:, cs],
                special_cosines[:, ss],
                special_scores[:, ss],
                adjust,
                ranks,
                valid,
                best,
                tops,
                None if views_np is None else views_np[:, cs],
                None if views_np is None else views_np[:, c:][:, ss],
            )
            masks = (fired[:, cs], special_fired[:, ss], anyf, anys)
            decisions = build_decisions(
                policy, columns, live=live, ids=ids[k * n : (k + 1) * n], fired=masks
            )
            out.append(decisions)
        return out
