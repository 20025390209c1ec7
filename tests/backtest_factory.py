"""A decision log for the backtest and shadow-report tests, written by the real engine.

Concepts are basis vectors of the tiny CLIP's 32-wide space (tests/calibration_factory.py), so
each image's cosines are the ones it was built with. The logged policy "bt":
nudity (axis 0, 0.30, blur), gore (axis 1, 0.30, blackout), special care minor (axis 2, 0.25,
+0.01, escalates to review), review band 0.02. The candidate THRESHOLD_MOVED raises nudity to
0.34; NEW_CONCEPT adds weapons (axis 3, 0.45, blackout).

The images (nudity cosine unless said), what "bt" does and what nudity at 0.34 does:
  0  0.10                      allow  -> allow
  1  0.29  rejected            review -> allow    (in the band at 0.30, out of it at 0.34)
  2  0.29  approved            review -> allow
  3  0.31                      blur   -> allow
  4  0.33                      blur   -> review   (now in the band)
  5  0.36                      blur   -> blur
  6  views 0.20 / 0.40         blur   -> blur     (two views: the maximum counts)
  7  gore 0.50                 blackout -> blackout
  8  0.325 + minor 0.30 approved   blur -> review (special care: +0.01, escalates)
  9  minor 0.30 (pending item)     review -> review
 10  weapons 0.50                  allow -> allow (the new concept fires: blackout)
 11  weapons 0.40                  allow -> allow
 12  NaN embedding                 an error decision (skipped: error_verdict)
 13  0.31, logged without its embedding (skipped: no_embedding)
 14  0.31, logged by the same YAML compiled for another model id (skipped: other_model)
Images 0-9 are logged in a first batch, 10-14 in a second one `between` later.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import torch

from moderation.engine import Moderator
from moderation.review.queue import ReviewQueue
from moderation.storage.log import DecisionLog
from policy import compile_policy, load_policy
from tests.calibration_factory import DIM, GORE, MINOR, NUDITY, basis, embedding
from tests.calibration_factory import write_policy as _write_policy

WEAPONS = 3
POLICY = """\
policy: bt
version: "1"
model: {model}
defaults: {{threshold: 0.3, action: blur, severity: high}}
review_band: 0.02
concepts:
  - name: nudity
    embedding: {e0}
    threshold: 0.30
    action: blur
  - name: gore
    embedding: {e1}
    action: blackout
special_care:
  adjustment: 0.01
  escalate: review
  concepts:
    - name: minor
      embedding: {e2}
      threshold: 0.25
"""
THRESHOLD_MOVED = POLICY.replace("threshold: 0.30", "threshold: 0.34").replace(
    'version: "1"', 'version: "2"'
)
NEW_CONCEPT = POLICY.replace(
    "special_care:",
    "  - name: weapons\n    embedding: {e3}\n    threshold: 0.45\n    action: blackout\n"
    "special_care:",
).replace('version: "1"', 'version: "3"')


def write_policy(folder: Path, model, text: str = POLICY, name: str = "bt.yaml") -> Path:
    path = _write_policy(folder, model, text.replace("{e3}", str(basis(WEAPONS))))
    return path.rename(path.with_name(name))


class OtherModel:
    """A compiler encoder of the tiny CLIP's width under another model id (literal embeddings)."""

    embed_dim = DIM
    text_fingerprint = None

    def __init__(self, model_id: str) -> None:
        self.model_id = model_id

    def encode_text(self, prompts):
        from policy.encoding import EncodingError

        raise EncodingError("literal embeddings only")

    def checkpoint_tensor(self, name):
        from policy.encoding import EncodingError

        raise EncodingError(f"no checkpoint tensor {name!r}")


def other_model_policy(path: Path, model_id: str = "other/model"):
    return compile_policy(load_policy(path), OtherModel(model_id), cache=False)


def vec(cosines: dict[int, float]) -> np.ndarray:
    return embedding(cosines)


FIRST = [
    vec({NUDITY: 0.10}),
    vec({NUDITY: 0.29}),
    vec({NUDITY: 0.29}),
    vec({NUDITY: 0.31}),
    vec({NUDITY: 0.33}),
    vec({NUDITY: 0.36}),
    (vec({NUDITY: 0.20}), vec({NUDITY: 0.40})),  # two views of one image
    vec({GORE: 0.50}),
    vec({NUDITY: 0.325, MINOR: 0.30}),
    vec({MINOR: 0.30}),
]
SECOND = [vec({WEAPONS: 0.50}), vec({WEAPONS: 0.40})]
BOX = {"frame": 0, "box": [0, 0, 8, 8]}


def moderate(moderator: Moderator, images: list) -> list:
    """Engine decisions for images given as one vector or a tuple of views."""
    rows, owners, views = [], [], []
    for i, image in enumerate(images):
        parts = image if isinstance(image, tuple) else (image,)
        rows += parts
        owners += [i] * len(parts)
        views.append([BOX] * len(parts) if len(parts) > 1 else None)
    embeddings = torch.from_numpy(np.stack(rows))
    if len(rows) == len(images):
        return moderator.moderate_embeddings(embeddings)
    return moderator.moderate_embeddings(embeddings, owners=torch.tensor(owners), views=views)


@dataclasses.dataclass
class History:
    policy_path: Path
    policy: object  # the compiled "bt"
    decisions: list  # images 0-14 in order
    between: datetime  # after the first batch, before the second
    url: str


def log_history(folder: Path, model, url: str) -> History:
    """Images 0-14 above, logged to `url` by the engine, reviewed through ReviewQueue."""
    path = write_policy(folder / "policies", model)
    policy = compile_policy(load_policy(path), _encoder(model), cache=False)
    spool, held = folder / "spool", folder / "held"
    with DecisionLog(url, spool_dir=spool, held_dir=held) as log:
        first = moderate(Moderator(policy, log=log), FIRST)
        log.flush()
        # After the first batch's one time and before the second's, which is taken later.
        between = first[0].created_at + timedelta(microseconds=1)
        second = moderate(Moderator(policy, log=log), SECOND)
        nan = np.full(DIM, np.nan, dtype=np.float32)
        second += Moderator(policy, log=log).moderate_embeddings(torch.from_numpy(nan[None]))
        bare = Moderator(policy, log=log, store_embeddings=False)
        second += bare.moderate_embeddings(torch.from_numpy(vec({NUDITY: 0.31})[None]))
        other = Moderator(other_model_policy(path), log=log)
        second += other.moderate_embeddings(torch.from_numpy(vec({NUDITY: 0.31})[None]))
        log.flush()
        assert not log.spool.has_pending()
    decisions = first + second
    queue = ReviewQueue(url)
    items = {i.decision_id: i.id for i in queue.list(limit=100)}
    queue.reject(items[decisions[1].decision_id], "alice", reason="shows nudity")
    queue.approve(items[decisions[2].decision_id], "alice")
    queue.approve(items[decisions[8].decision_id], "alice")
    assert decisions[9].decision_id in items  # stays pending
    return History(path, policy, decisions, between, url)


_encoders: dict[str, object] = {}


def _encoder(model):
    from moderation.encoder import ClipEncoder

    key = str(model)
    if key not in _encoders:
        _encoders[key] = ClipEncoder.from_pretrained(model, device="cpu")
    return _encoders[key]
