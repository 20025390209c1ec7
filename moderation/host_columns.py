"""Named device columns to the host in one transfer, and one policy's decision columns there.

`to_host` casts every [B] or [B, w] column to float32 (integers are exact below 2**24),
concatenates them, copies the block once and hands back a view per name: fields travel by
name, never by position. `HostColumns` is what `decision.build_decisions` reads for one policy.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch


def to_host(columns: Mapping[str, torch.Tensor | None]) -> dict[str, np.ndarray]:
    """Every column ([B] or [B, w]; None is skipped) on the host, by name, in one transfer.

    [B] columns come back as [B] arrays, [B, w] ones as [B, w] views of the one block.
    """
    import torch

    given = {name: c for name, c in columns.items() if c is not None}
    if not given:
        return {}
    blocks, widths = [], {}
    for name, column in given.items():
        block = column[:, None] if column.ndim == 1 else column
        blocks.append(block.to(torch.float32))
        widths[name] = (int(block.shape[1]), column.ndim == 1)
    host = torch.cat(blocks, dim=1).cpu().numpy()
    out, at = {}, 0
    for name, (width, flat) in widths.items():
        out[name] = host[:, at] if flat else host[:, at : at + width]
        at += width
    return out


@dataclass
class HostColumns:
    """One policy's decision columns on the host: [B, C] / [B, S] arrays and [B] values (NumPy
    arrays or Python lists)."""

    cosines: np.ndarray
    scores: np.ndarray
    special_cosines: np.ndarray
    special_scores: np.ndarray
    adjustment: Any
    rank: Any  # index into rule.ACTIONS
    valid: Any
    margin: Any
    top: Any
    reason: Any  # index into rule.REASONS
    reason_concept: Any  # the concept the reason names (-1: none)
    concept_views: np.ndarray | None = None  # [B, C] int16
    special_views: np.ndarray | None = None  # [B, S] int16


def values(column: np.ndarray | list, dtype: Any = None) -> list:
    """A [B] column as a Python list (as it is when it already is one)."""
    if isinstance(column, list):
        return column
    return (column if dtype is None else column.astype(dtype)).tolist()
