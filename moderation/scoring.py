"""Scoring: cosines against a compiled policy's matrices, thresholds and the special-care adjustment.

Everything stays on the embeddings' device: one matrix product per matrix and elementwise work,
no loop over images or concepts and no host sync. `compat: diffusers` reproduces
`StableDiffusionSafetyChecker.forward` bit for bit (see `_diffusers_scores`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from moderation.errors import ModerationError
from moderation.kernel import rule
from policy.compiled import CompiledPolicy
from policy.limits import DIFFUSERS_ADJUSTMENT

# diffusers adds this Python float once a special-care concept fires. A `compat: diffusers`
# policy cannot hold another adjustment (CompiledPolicy refuses it), so this is the policy's own.
_DIFFUSERS_ADJUSTMENT = DIFFUSERS_ADJUSTMENT


@dataclass(frozen=True, eq=False)
class Scores(rule.FiredScores):
    """Per-image scores of one batch; every tensor lives on the embeddings' device."""

    cosines: torch.Tensor  # [B, C] float32
    scores: torch.Tensor  # [B, C] float32; a concept fires where > 0
    special_cosines: torch.Tensor  # [B, S] float32
    special_scores: torch.Tensor  # [B, S] float32; a special-care concept fires where > 0
    special_hit: torch.Tensor  # [B] bool
    adjustment: torch.Tensor  # [B] float32, added to every concept score of the image
    valid: torch.Tensor  # [B] bool; False where an embedding of the image or a score is NaN/inf
    # With several views per image: which view (0-based, within its image) gave each concept's
    # maximum cosine. None when every image was judged on one view.
    concept_views: torch.Tensor | None = None  # [B, C] int64
    special_views: torch.Tensor | None = None  # [B, S] int64


def score(
    policy: CompiledPolicy,
    embeddings: torch.Tensor,
    owners: torch.Tensor | None = None,
    n_images: int | None = None,
) -> Scores:
    """Score embeddings [N, D] against the policy (on the embeddings' device).

    Without `owners` every row is one image. With `owners` ([N] int64, non-decreasing: row i is
    a view of image owners[i]) each concept's cosine is its maximum over the image's views, so an
    image fires as soon as any view shows a concept; `n_images` (default owners[-1] + 1) images.
    """
    if embeddings.ndim != 2 or embeddings.shape[1] != policy.embed_dim:
        raise ModerationError(
            f"embeddings of shape {tuple(embeddings.shape)} do not fit policy {policy.name!r}: "
            f"expected [batch, {policy.embed_dim}] (model {policy.model})"
        )
    cosines, special_cosines, finite, concept_views, special_views = _cosines(
        embeddings,
        policy.concept_matrix,
        policy.special_matrix,
        owners,
        n_images,
    )
    return scores_from_cosines(
        policy,
        cosines,
        special_cosines,
        finite,
        concept_views=concept_views,
        special_views=special_views,
    )


def score_many(
    policies: Sequence[CompiledPolicy],
    embeddings: torch.Tensor,
    owners: torch.Tensor | None = None,
    n_images: int | None = None,
    *,
    matrices: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> list[Scores]:
    """Score the same embeddings against several policies of one model in one pass.

    Their concept (and special-care) matrices are concatenated, so the batch costs one matrix
    product per kind, one maximum over views and no per-policy host sync. Each policy's Scores
    are `score(policy, ...)`'s up to float rounding: BLAS may sum a column in another order
    when the matrix has another shape, so a live policy whose bits matter (diffusers parity) is
    scored on its own and only shadow candidates share a product. `matrices` is a precomputed
    `stacked_matrices(policies)`.
    """
    if not policies:
        return []
    dims = {p.embed_dim for p in policies}
    if len(dims) != 1 or embeddings.ndim != 2 or embeddings.shape[1] not in dims:
        raise ModerationError(
            f"embeddings of shape {tuple(embeddings.shape)} do not fit policies of widths "
            f"{sorted(dims)}: every policy scored in one pass must be of the embeddings' model"
        )
    concept_matrix, special_matrix = matrices or stacked_matrices(policies)
    cosines, special_cosines, finite, concept_views, special_views = _cosines(
        embeddings, concept_matrix, special_matrix, owners, n_images
    )
    out, c0, s0 = [], 0, 0
    for p in policies:
        c1, s1 = c0 + len(p.concept_names), s0 + len(p.special_names)
        out.append(
            scores_from_cosines(
                p,
                cosines[:, c0:c1],
                special_cosines[:, s0:s1],
                finite,
                concept_views=None if concept_views is None else concept_views[:, c0:c1],
                special_views=None if special_views is None else special_views[:, s0:s1],
            )
        )
        c0, s0 = c1, s1
    return out


def stacked_cosines(
    embeddings: torch.Tensor,
    matrices: tuple[torch.Tensor, torch.Tensor],
    owners: torch.Tensor | None,
    n_images: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """`_cosines` against `stacked_matrices(policies)`: every policy's columns in one pass."""
    return _cosines(embeddings, *matrices, owners, n_images)


def stacked_matrices(policies: Sequence[CompiledPolicy]) -> tuple[torch.Tensor, torch.Tensor]:
    """The policies' concept and special-care matrices, concatenated in order (float32)."""
    device = policies[0].device
    concept = torch.cat([p.concept_matrix.to(device, torch.float32) for p in policies])
    special = torch.cat([p.special_matrix.to(device, torch.float32) for p in policies])
    return concept, special


def _cosines(
    embeddings: torch.Tensor,
    concept_matrix: torch.Tensor,
    special_matrix: torch.Tensor,
    owners: torch.Tensor | None,
    n_images: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Cosines per image ([B, C], [B, S]: the maximum over an image's views), which images had
    only finite embeddings ([B] bool), and which view gave each maximum (None: one view each)."""
    device = embeddings.device
    # diffusers normalises with F.normalize (dim=1, eps=1e-12) and multiplies with torch.mm against
    # the transposed, already-normalised matrix: same calls and shapes, so the same bits.
    unit = F.normalize(embeddings.float())  # [N, D]
    cosines = torch.mm(unit, concept_matrix.to(device, torch.float32).t())  # [N, C]
    special_cosines = torch.mm(unit, special_matrix.to(device, torch.float32).t())  # [N, S]
    finite = torch.isfinite(embeddings).all(dim=1)  # [N]
    concept_views = special_views = None
    if owners is not None:
        if n_images is None:
            n_images = int(owners[-1]) + 1 if owners.numel() else 0
        owners = owners.to(device)
        cosines, concept_views = max_over_views(cosines, owners, n_images)  # [B, C]
        special_cosines, special_views = max_over_views(special_cosines, owners, n_images)
        # One non-finite view makes the whole image unscored: it fails closed.
        finite = (
            torch.ones(n_images, dtype=torch.long, device=device)
            .scatter_reduce(0, owners, finite.long(), "amin")
            .bool()
        )
    return cosines, special_cosines, finite, concept_views, special_views


def scores_from_cosines(
    policy: CompiledPolicy,
    cosines: torch.Tensor,
    special_cosines: torch.Tensor,
    finite: torch.Tensor | None = None,
    *,
    concept_views: torch.Tensor | None = None,
    special_views: torch.Tensor | None = None,
) -> Scores:
    """The policy's scores from per-image cosines ([B, C] and [B, S], in its concept order):
    thresholds, the special-care adjustment (diffusers' arithmetic under `compat: diffusers`)
    and validity. A backtest calls this with logged cosines; `score` with fresh ones.

    `finite` [B] marks images whose embeddings were all finite (default: all of them).
    """
    device = cosines.device
    cosines = cosines.to(torch.float32)
    special_cosines = special_cosines.to(torch.float32)
    thresholds = policy.thresholds.to(device, torch.float32)  # [C]
    special_thresholds = policy.special_thresholds.to(device, torch.float32)  # [S]
    if finite is None:
        finite = torch.ones(cosines.shape[0], dtype=torch.bool, device=device)
    if policy.compat == "diffusers":
        scores, special_scores, special_hit, adjustment = _diffusers_scores(
            cosines, thresholds, special_cosines, special_thresholds
        )
    else:
        scores, special_scores, hits, adjustments = adjusted_scores(
            rule.rules_of(policy, device),
            cosines,
            special_cosines,
            thresholds,
            special_thresholds,
            torch.full((1,), float(policy.adjustment), dtype=torch.float32, device=device),
        )
        special_hit, adjustment = hits[:, 0], adjustments[:, 0]  # [B]

    valid = finite & torch.isfinite(scores).all(dim=1) & torch.isfinite(special_scores).all(dim=1)
    return Scores(
        cosines=cosines,
        scores=scores,
        special_cosines=special_cosines,
        special_scores=special_scores,
        special_hit=special_hit,
        adjustment=adjustment,
        valid=valid,
        concept_views=concept_views,
        special_views=special_views,
    )


def adjusted_scores(
    rules: rule.Rules,
    cosines: torch.Tensor,
    special_cosines: torch.Tensor,
    thresholds: torch.Tensor,
    special_thresholds: torch.Tensor,
    adjustments: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The scores of K policies (not `compat: diffusers`) over their concatenated columns:
    special-care scores, which policies had a hit, the adjustment each adds ([B, K]: its
    `adjustments[k]` after a hit, else 0) and the concept scores `cos - threshold + adjustment`.

    Returns (scores [B, C], special_scores [B, S], hit [B, K] bool, adjustment [B, K]).
    """
    special_scores = special_cosines - special_thresholds  # [B, S]
    hit = rule.special_hits(special_scores, rules)  # [B, K]
    adjustment = hit.to(torch.float32) * adjustments  # [B, K]
    scores = cosines - thresholds + adjustment[:, rules.owner]  # [B, C]
    return scores, special_scores, hit, adjustment


def max_over_views(
    values: torch.Tensor, owners: torch.Tensor, n_images: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, the maximum of `values` [N, K] over its rows, and which of its rows held it.

    `owners` [N] (non-decreasing) names each row's image. Returns ([B, K] float32, [B, K] int64
    row index within the image: the first view holding the maximum). NaN wins the maximum, so a
    NaN view cannot hide behind a finite one. No host sync, no Python loop over views.
    """
    n, k = values.shape
    device = values.device
    index = owners[:, None].expand(n, k)  # [N, K]
    best = values.new_full((n_images, k), float("-inf")).scatter_reduce(
        0, index, values, "amax", include_self=True
    )  # [B, K]
    nan = (
        torch.zeros(n_images, k, dtype=torch.long, device=device)
        .scatter_reduce(0, index, torch.isnan(values).long(), "amax")
        .bool()
    )
    best = torch.where(nan, torch.full_like(best, float("nan")), best)
    # Row number of each view within its image: its row minus its image's first row.
    first = torch.full((n_images,), n, dtype=torch.long, device=device).scatter_reduce(
        0, owners, torch.arange(n, device=device), "amin"
    )  # [B]
    local = (torch.arange(n, device=device) - first[owners])[:, None].expand(n, k)  # [N, K]
    holds = (values == best[owners]) | (torch.isnan(values) & nan[owners])
    big = torch.full_like(local, n)
    which = torch.full((n_images, k), n, dtype=torch.long, device=device).scatter_reduce(
        0, index, torch.where(holds, local, big), "amin"
    )  # [B, K]
    return best, which.clamp_(max=max(n - 1, 0))


def diffusers_arithmetic_dtype() -> torch.dtype:
    """The dtype of diffusers' `concept_cos - concept_threshold + adjustment` under this NumPy.

    NumPy 2 (NEP 50): a float32 scalar minus a Python float stays float32. NumPy 1 promoted
    scalar-with-Python-float arithmetic to float64, so the rounding then happened in float64.
    """
    return torch.float32 if np.lib.NumpyVersion(np.__version__) >= "2.0.0" else torch.float64


def _round3(x: torch.Tensor) -> torch.Tensor:
    """`np.round(x, 3)` bit for bit: multiply by 1000, round half to even, divide, in x's dtype."""
    # A device tensor, not a Python scalar: CUDA turns division by a CPU scalar into a multiply
    # by its reciprocal, which is not exact for 1/1000.
    thousand = torch.full((), 1000.0, dtype=x.dtype, device=x.device)
    return torch.round(x * thousand) / thousand


def _diffusers_scores(
    cosines: torch.Tensor,  # [B, C] float32
    thresholds: torch.Tensor,  # [C]
    special_cosines: torch.Tensor,  # [B, S]
    special_thresholds: torch.Tensor,  # [S]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """diffusers' per-image loops, vectorised: `round(cos - thr + adjustment, 3) > 0`.

    In its special-care loop the adjustment switches on right after the first hit, so a later
    special-care concept sees +0.01 and an earlier one does not. Before the first hit every
    special-care concept is scored without adjustment, so the hits without adjustment decide where
    it switches on: an exclusive cumulative sum of them over S.
    """
    dtype = diffusers_arithmetic_dtype()
    zero = torch.zeros((), dtype=dtype, device=cosines.device)
    # The Python float 0.01, as NumPy converts it for the arithmetic (float32 under NEP 50).
    step = torch.tensor(_DIFFUSERS_ADJUSTMENT, dtype=dtype, device=cosines.device)

    special_raw = special_cosines.to(dtype) - special_thresholds.to(dtype)  # [B, S]
    # diffusers always adds its adjustment, 0.0 included (which turns -0.0 into 0.0).
    special_plain = _round3(special_raw + zero)  # [B, S]
    plain_hit = special_plain > 0  # [B, S]
    switched_on = (torch.cumsum(plain_hit, dim=1) - plain_hit.long()) > 0  # [B, S] an earlier hit
    special_scores = torch.where(switched_on, _round3(special_raw + step), special_plain)
    special_hit = (special_scores > 0).any(dim=1)  # [B]
    adjustment = torch.where(special_hit, step, zero)  # [B]

    scores = _round3((cosines.to(dtype) - thresholds.to(dtype)) + adjustment[:, None])  # [B, C]
    # Rounded scores are multiples of 0.001, so float32 keeps their sign and every comparison.
    return (
        scores.to(torch.float32),
        special_scores.to(torch.float32),
        special_hit,
        adjustment.to(torch.float32),
    )
