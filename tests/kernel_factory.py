"""Random policies and embeddings on an exact grid, for the decision kernel's tests.

Embeddings and concept vectors have four entries of +-0.5 (or one of +-1): their norms are
exactly 1 and every cosine is an exact multiple of 0.25, whatever order a matrix product sums
in; thresholds sit on the same grid, so scores of exactly 0 are common.
"""

from __future__ import annotations

import torch

from policy.compiled import CompiledPolicy

DIM = 8
ACTIONS = ("allow", "review", "blur", "pixelate", "blackout")
ESCALATE = (None, "allow", "review", "blur", "blackout")


def exact_rows(g: torch.Generator, n: int) -> torch.Tensor:
    """[n, DIM] rows of norm exactly 1: four entries of +-0.5, or one of +-1."""
    rows = torch.zeros(n, DIM)
    for i in range(n):
        sign = torch.randint(0, 2, (DIM,), generator=g) * 2 - 1
        if torch.rand(1, generator=g).item() < 0.2:
            rows[i, int(torch.randint(0, DIM, (1,), generator=g))] = float(sign[0])
        else:
            at = torch.randperm(DIM, generator=g)[:4]
            rows[i, at] = 0.5 * sign[:4].float()
    return rows


def quarter(g: torch.Generator, n: int) -> torch.Tensor:
    """Thresholds on the cosines' grid (so that scores of exactly 0 happen), in [-0.5, 0.75]."""
    return torch.randint(-2, 4, (n,), generator=g).float() * 0.25


def policy(g: torch.Generator, name: str, n: int, s: int) -> CompiledPolicy:
    pick = torch.randint(0, 1000, (4,), generator=g).tolist()
    return CompiledPolicy(
        name=name,
        version="1",
        model="m",
        concept_names=tuple(f"{name}{i}" for i in range(n)),
        categories=(None,) * n,
        severities=("high",) * n,
        actions=tuple(ACTIONS[int(i)] for i in torch.randint(0, 5, (n,), generator=g)),
        concept_matrix=exact_rows(g, n),
        thresholds=quarter(g, n),
        special_names=tuple(f"{name}-s{i}" for i in range(s)),
        special_matrix=exact_rows(g, s),
        special_thresholds=quarter(g, s),
        adjustment=(0.0, 0.01, 0.25)[pick[0] % 3],
        escalate=ESCALATE[pick[1] % len(ESCALATE)],
        review_band=(0.0, 0.1, 0.3)[pick[2] % 3],
    )
