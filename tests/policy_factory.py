"""One factory of random compiled policies, for tests of the decision rule (scoring, views,
shadow candidates): unit random concept vectors, thresholds drawn around a level."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from policy.compiled import CompiledPolicy

ACTIONS = ("allow", "blur", "pixelate", "blackout", "review")


def random_policy(
    n_concepts: int = 6,
    n_special: int = 2,
    dim: int = 16,
    *,
    seed: int = 0,
    generator: torch.Generator | None = None,
    name: str = "test",
    names: str = "c",
    special_names: str = "s",
    actions: Sequence[str] | str | None = None,
    thresholds=None,
    threshold: float = 0.0,
    spread: float = 0.1,
    special_threshold: float = 0.0,
    special_spread: float = 0.1,
    **rules,
) -> CompiledPolicy:
    """A policy of `n_concepts` concepts named `<names><i>` and `n_special` special-care ones
    (`<special_names><i>`) on random unit vectors of width `dim`, drawn from `generator` (else
    a new one seeded with `seed`). Thresholds are `threshold` plus `spread` times a normal draw
    unless given (special ones likewise). `actions`: one per concept, "random" (each one of
    ACTIONS), or None (blur). `rules`: any other CompiledPolicy field (adjustment, escalate,
    review_band, on_error, compat, ...)."""
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    if actions == "random":
        actions = tuple(ACTIONS[int(i)] for i in torch.randint(0, 5, (n_concepts,), generator=g))
    if thresholds is None:
        thresholds = threshold + spread * torch.randn(n_concepts, generator=g)
    return CompiledPolicy(
        name=name,
        version="1",
        model="tiny",
        concept_names=tuple(f"{names}{i}" for i in range(n_concepts)),
        categories=(None,) * n_concepts,
        severities=("medium",) * n_concepts,
        actions=tuple(actions or ["blur"] * n_concepts),
        concept_matrix=F.normalize(torch.randn(n_concepts, dim, generator=g)),
        thresholds=torch.as_tensor(thresholds, dtype=torch.float32),
        special_names=tuple(f"{special_names}{i}" for i in range(n_special)),
        special_matrix=F.normalize(torch.randn(n_special, dim, generator=g)),
        special_thresholds=special_threshold + special_spread * torch.randn(n_special, generator=g),
        **rules,
    )
