"""Scoring: cosines against a compiled policy's matrices, thresholds and the special-care adjustment.

Everything stays on the embeddings' device: one matrix product per matrix and elementwise work,
no loop over images or concepts and no host sync. `compat: diffusers` reproduces
`StableDiffusionSafetyChecker.forward` bit for bit (see `_diffusers_scores`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from moderation.errors import ModerationError
from policy.compiled import DIFFUSERS_ADJUSTMENT, CompiledPolicy

# diffusers adds this Python float once a special-care concept fires. A `compat: diffusers`
# policy cannot hold another adjustment (CompiledPolicy refuses it), so this is the policy's own.
_DIFFUSERS_ADJUSTMENT = DIFFUSERS_ADJUSTMENT


@dataclass(frozen=True, eq=False)
class Scores:
    """Per-image scores of one batch; every tensor lives on the embeddings' device."""

    cosines: torch.Tensor  # [B, C] float32
    scores: torch.Tensor  # [B, C] float32; a concept fires where > 0
    special_cosines: torch.Tensor  # [B, S] float32
    special_scores: torch.Tensor  # [B, S] float32; a special-care concept fires where > 0
    special_hit: torch.Tensor  # [B] bool
    adjustment: torch.Tensor  # [B] float32, added to every concept score of the image
    valid: torch.Tensor  # [B] bool; False where the embedding or a score is NaN/inf

    @property
    def fired(self) -> torch.Tensor:
        """[B, C] bool: concepts that fired."""
        return self.scores > 0

    @property
    def special_fired(self) -> torch.Tensor:
        """[B, S] bool: special-care concepts that fired."""
        return self.special_scores > 0


def score(policy: CompiledPolicy, embeddings: torch.Tensor) -> Scores:
    """Score image embeddings [B, D] against the policy (on the embeddings' device)."""
    if embeddings.ndim != 2 or embeddings.shape[1] != policy.embed_dim:
        raise ModerationError(
            f"embeddings of shape {tuple(embeddings.shape)} do not fit policy {policy.name!r}: "
            f"expected [batch, {policy.embed_dim}] (model {policy.model})"
        )
    device = embeddings.device
    # diffusers normalises with F.normalize (dim=1, eps=1e-12) and multiplies with torch.mm against
    # the transposed, already-normalised matrix: same calls and shapes, so the same bits.
    unit = F.normalize(embeddings.float())  # [B, D]
    concept_matrix = policy.concept_matrix.to(device, torch.float32)  # [C, D]
    special_matrix = policy.special_matrix.to(device, torch.float32)  # [S, D]
    thresholds = policy.thresholds.to(device, torch.float32)  # [C]
    special_thresholds = policy.special_thresholds.to(device, torch.float32)  # [S]
    cosines = torch.mm(unit, concept_matrix.t())  # [B, C]
    special_cosines = torch.mm(unit, special_matrix.t())  # [B, S]

    if policy.compat == "diffusers":
        scores, special_scores, special_hit, adjustment = _diffusers_scores(
            cosines, thresholds, special_cosines, special_thresholds
        )
    else:
        special_scores = special_cosines - special_thresholds  # [B, S]
        special_hit = (special_scores > 0).any(dim=1)  # [B]
        adjustment = special_hit.to(torch.float32) * float(policy.adjustment)  # [B]
        scores = cosines - thresholds + adjustment[:, None]  # [B, C]

    valid = (
        torch.isfinite(embeddings).all(dim=1)
        & torch.isfinite(scores).all(dim=1)
        & torch.isfinite(special_scores).all(dim=1)
    )
    return Scores(
        cosines=cosines,
        scores=scores,
        special_cosines=special_cosines,
        special_scores=special_scores,
        special_hit=special_hit,
        adjustment=adjustment,
        valid=valid,
    )


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
