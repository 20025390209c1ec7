"""A policy's decision columns once on the host: what `decision.build_decisions` reads."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

if TYPE_CHECKING:
    from policy.compiled import CompiledPolicy


class HostColumns(NamedTuple):
    """One policy's decision columns on the host: [B, C] / [B, S] arrays and [B] vectors."""

    cosines: np.ndarray
    scores: np.ndarray
    special_cosines: np.ndarray
    special_scores: np.ndarray
    adjustment: np.ndarray
    rank: np.ndarray  # index into ACTION_RANK's order
    valid: np.ndarray
    margin: np.ndarray
    top: np.ndarray
    concept_views: np.ndarray | None = None  # [B, C] int16
    special_views: np.ndarray | None = None  # [B, S] int16


def host_columns(policy: CompiledPolicy, host: np.ndarray) -> HostColumns:
    """The columns of the host copy [B, K] of `decision_columns` (views when K holds them)."""
    c, s = len(policy.concept_names), len(policy.special_names)
    tail = host[:, 2 * c + 2 * s :]
    has_views = tail.shape[1] > 5
    return HostColumns(
        host[:, :c],
        host[:, c : 2 * c],
        host[:, 2 * c : 2 * c + s],
        host[:, 2 * c + s : 2 * c + 2 * s],
        *(tail[:, i] for i in range(5)),
        tail[:, 5 : 5 + c].astype(np.int16) if has_views else None,
        tail[:, 5 + c : 5 + c + s].astype(np.int16) if has_views else None,
    )


def values(column: np.ndarray | list, dtype: Any = None) -> list:
    """A [B] column as a Python list (as it is when it already is one)."""
    if isinstance(column, list):
        return column
    return (column if dtype is None else column.astype(dtype)).tolist()
