"""Labelled images for calibration: reviewed decisions in the log, and folders of images.

What counts, per concept C of the policy being calibrated (docs/calibration.md):
- a decision of the log is labelled when its newest review item carries a verdict: the verdict's
  labels (moderation.review.labels) say which concepts of *the policy that decided it* the image
  shows. For C among them it is a positive when the labels say it shows C, else a negative; for
  a C that policy did not have it says nothing. Pending items, appeals that await their new
  verdict, shadow decisions, decisions of another model and those without a finite embedding
  are skipped (and counted).
- an image in `--positive C=DIR` is a positive for C and says nothing about other concepts;
  an image in `--negative DIR` is a negative for every concept.
- one image (by pixel hash, the engine's `image_sha256`) counts once per concept; where its
  sources disagree about C it is left out for C (counted as a conflict).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import select

from moderation.calibration.labelset import LabelledSet, Labels, Sample
from moderation.errors import ModerationError
from moderation.review.labels import item_labels, policy_names
from moderation.review.queries import newest_items
from moderation.storage.db import require_database
from moderation.storage.errors import database_errors
from moderation.storage.models import DecisionRow, PolicyRow, ReviewItem
from moderation.storage.records import record_from_row
from moderation.storage.schema import get_engine

if TYPE_CHECKING:
    from moderation.encoder import ClipEncoder
    from policy.compiled import CompiledPolicy

READ_CHUNK = 500  # knob: decisions fetched per round trip
ENCODE_CHUNK = 16  # knob: folder images decoded and encoded at a time (bounds memory)


class CalibrationError(ModerationError):
    """Calibration cannot run on what it was given (a database, a folder, a concept name)."""


# -- the decision log ------------------------------------------------------------------------


def from_log(url: str, compiled: CompiledPolicy, into: LabelledSet) -> None:
    """Add every labelled decision of the log at `url` that `compiled` can score."""
    require_database(url)  # reading labels must not create an empty database
    with database_errors(url):
        engine = get_engine(url)
        with engine.connect() as conn:
            policies = {row.digest: row for row in conn.execute(select(PolicyRow.__table__))}
            # One set of names per policy, shared by all its decisions' labels.
            names = {d: frozenset(sum(policy_names(p), [])) for d, p in policies.items()}
            for row in _reviewed(conn):
                digest = row.policy_digest
                sample = _decision_sample(row, policies[digest], names[digest], compiled, into)
                if sample is not None:
                    into.add(sample)
                    into.decisions += 1


def _reviewed(conn: Any) -> Iterator[Any]:
    """Live decisions with their newest review item's status, labels and origin, oldest first."""
    newest = newest_items()
    query = (
        select(
            DecisionRow.__table__,
            ReviewItem.status.label("item_status"),
            ReviewItem.labels.label("item_labels"),
            ReviewItem.reopened_from.label("item_reopened_from"),
        )
        .join(newest, newest.c.decision_id == DecisionRow.id)
        .join(ReviewItem, ReviewItem.id == newest.c.item_id)
        .where(DecisionRow.shadow_of.is_(None))
        .order_by(DecisionRow.created_at, DecisionRow.id)
    )
    yield from conn.execution_options(yield_per=READ_CHUNK).execute(query)


def _decision_sample(
    row: Any, policy: Any, names: frozenset[str], compiled: CompiledPolicy, into: LabelledSet
) -> Sample | None:
    labels = item_labels(row.item_status, row.item_labels, policy, row)
    if labels is None:
        into.skipped["under_appeal" if row.item_reopened_from else "awaiting_review"] += 1
        return None
    if row.model_id != compiled.model:
        into.skipped["other_model"] += 1
        return None
    record = record_from_row(row)
    embedding = record.embedding  # [V, D] float16 as logged
    if embedding is None or embedding.size == 0:
        into.skipped["no_embedding"] += 1
        return None
    if embedding.shape[1] != compiled.embed_dim:
        into.skipped["other_model"] += 1
        return None
    embedding = embedding.astype(np.float32)
    if not np.isfinite(embedding).all():
        into.skipped["unscorable"] += 1
        return None
    return Sample(
        key=row.image_sha256 or f"decision:{row.id}",
        where=f"decision {row.id}",
        embedding=embedding,
        labels=Labels(names, labels["shows"]),
    )


# -- folders of images -------------------------------------------------------------------------


def image_files(folder: Path) -> list[Path]:
    """Every file under folder (names starting with "." skipped), sorted: each must be an image."""
    found = [
        p
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    ]
    if not found:
        raise CalibrationError(f"{folder}: no images in this folder")
    return found


def from_folders(
    labelled: Sequence[tuple[Path, frozenset[str], frozenset[str]]],
    compiled: CompiledPolicy,
    encoder: ClipEncoder,
    into: LabelledSet,
    *,
    cache: Any,
    progress: bool = False,
) -> None:
    """Add the images of each (folder, names it speaks about, names it shows), encoded by the
    engine (cached by hash)."""
    from tqdm import tqdm

    jobs = [
        (path, (known, shows)) for folder, known, shows in labelled for path in image_files(folder)
    ]
    encode = FolderEncoder(compiled, encoder, cache)
    with tqdm(
        total=len(jobs), unit="img", desc="encoding", disable=not progress, file=sys.stderr
    ) as bar:
        for start in range(0, len(jobs), ENCODE_CHUNK):
            chunk = jobs[start : start + ENCODE_CHUNK]
            for (path, labels), (pixel, file_hash, embedding) in zip(
                chunk, encode([p for p, _ in chunk]), strict=True
            ):
                into.add(Sample(pixel, str(path), embedding, Labels(*labels), file_hash))
                into.images += 1
            bar.update(len(chunk))


class FolderEncoder:
    """Image files -> (pixel sha256, bytes sha256, [V, D] view embeddings) through the engine."""

    def __init__(self, compiled: CompiledPolicy, encoder: ClipEncoder, cache: Any) -> None:
        from moderation.calibration.cache import cache_key
        from moderation.engine import Moderator

        self.moderator = Moderator(compiled, encoder)  # no log: calibration decides nothing
        self.cache = cache
        self.key = cache_key(encoder.image_fingerprint, compiled.compat)
        self.dim = compiled.embed_dim

    def __call__(self, paths: Sequence[Path]) -> list[tuple[str, str, np.ndarray]]:
        import hashlib

        from moderation.image_files import ImageInputError
        from moderation.images import image_sha256, load_image_file

        out = []
        for path in paths:
            try:
                data = path.read_bytes()
                pixel = image_sha256(load_image_file(path))  # the log's image_sha256 of it
            except OSError as exc:
                raise CalibrationError(f"{path}: cannot read ({exc.strerror})") from None
            except ImageInputError as exc:
                raise CalibrationError(str(exc)) from None
            out.append([pixel, hashlib.sha256(data).hexdigest(), None])
        for entry in out:
            entry[2] = self.cache.get(self.key, entry[0], self.dim)
        missing = [i for i, entry in enumerate(out) if entry[2] is None]
        if missing:
            # The engine reads the files itself: its decoding, its views.
            result = self.moderator.moderate([str(paths[i]) for i in missing], apply=False)
            for i, decision in zip(missing, result.decisions, strict=True):
                if decision.verdict == "error" or decision.embedding is None:
                    raise CalibrationError(
                        f"{paths[i]}: the engine could not judge it ({decision.error})"
                    )
                embedding = np.asarray(decision.embedding, dtype=np.float32).reshape(-1, self.dim)
                self.cache.put(self.key, out[i][0], embedding)
                out[i][2] = embedding
        return [tuple(entry) for entry in out]
