"""Engineered decisions for the label and calibration tests, written through the real engine.

Concepts are basis vectors of the tiny CLIP's 32-wide space, so an embedding built by
`embedding({0: 0.35})` has cosine 0.35 with concept 0 (and 0 with the others): every score,
and so every confusion count, is known in advance. Decisions are made by `Moderator` from those
embeddings and logged by `DecisionLog`, exactly as in production.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from moderation.demo_calibration import CALIB
from moderation.engine import Moderator
from moderation.storage.log import DecisionLog
from policy import compile_policy, load_policy

DIM = 32
NUDITY, GORE, MINOR = 0, 1, 2  # basis directions of the policy's concepts
FILLER = DIM - 1  # makes every embedding unit length


def basis(k: int) -> list[float]:
    return [1.0 if i == k else 0.0 for i in range(DIM)]


# The calibration walk-through's policy (docs/calibration.md), with the test's model folder.
POLICY = CALIB


def write_policy(folder: Path, model: str | Path, text: str = POLICY) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "calib.yaml"
    path.write_text(
        text.format(model=model, e0=basis(NUDITY), e1=basis(GORE), e2=basis(MINOR)),
        encoding="utf-8",
    )
    return path


def embedding(cosines: dict[int, float]) -> np.ndarray:
    """A unit [D] float32 vector with the given cosine to each basis direction."""
    vector = np.zeros(DIM, dtype=np.float64)
    for k, value in cosines.items():
        vector[k] = value
    rest = 1.0 - float((vector**2).sum())
    assert rest >= 0, cosines
    vector[FILLER] = math.sqrt(rest)
    return vector.astype(np.float32)


class Log:
    """A policy compiled for the tiny CLIP and a Moderator logging to `url`."""

    def __init__(self, policy_path: Path, encoder, url: str, folder: Path) -> None:
        self.policy = compile_policy(load_policy(policy_path), encoder, cache=False)
        self.log = DecisionLog(url, spool_dir=folder / "spool", held_dir=folder / "held")
        self.moderator = Moderator(self.policy, log=self.log)

    def decide(self, embeddings: list[np.ndarray]) -> list:
        """Decisions for engineered embeddings, logged (one per embedding, in order)."""
        decisions = self.moderator.moderate_embeddings(torch.from_numpy(np.stack(embeddings)))
        self.log.flush()
        return decisions

    def close(self) -> None:
        self.log.close()
