"""Videos judged frame by frame: one decision per video, the action applied to all its frames.

Every frame of every video is judged: the policy's views of each frame go through the encoder
`FRAME_BATCH` frames at a time (memory bounded by that batch, whatever the video's length), and
the video's decision takes each concept's maximum cosine over all its frames' views, as the
engine does for the frames of an animated file. The decision records its views (`{"frame",
"box"}`) and which view gave each concept its cosine; its metadata says how many frames were
judged and which one decided (`frames`, `deciding_frame`), and that frame is what is hashed and,
for review, held. The action is applied to every frame of a video alike, so a flagged video
never flickers between blurred and clear frames.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from moderation.actions import apply_actions, policy_settings
from moderation.decision import Decision
from moderation.engine import ModerationResult, Moderator
from moderation.images import to_image_batch
from moderation.preprocess import judged_views

logger = logging.getLogger(__name__)

# Knob: frames whose views are encoded in one call (bounds memory: at 224 px and 3 views a frame,
# 16 frames are 48 x 600 kB of pixel values).
FRAME_BATCH = 16


def judge_videos(
    moderator: Moderator,
    videos: torch.Tensor,
    metas: list[dict[str, Any]],
    *,
    frame_batch: int = FRAME_BATCH,
) -> ModerationResult:
    """Decide on each video of [B, F, 3, H, W] float [0, 1]; logs one decision per video.

    The images of the result are not acted on (see `act_on_videos`)."""
    encoder = moderator.encoder
    settings = {"size": encoder.image_size, "mean": encoder.image_mean, "std": encoder.image_std}
    count, frames = videos.shape[0], videos.shape[1]
    try:
        rows, counts, views, errors = [], [], [], []
        for b in range(count):
            described: list[dict[str, Any]] = []
            error = None
            for start in range(0, frames, frame_batch):
                chunk = videos[b, start : start + frame_batch].to(encoder.device)  # [f, 3, H, W]
                invalid = ~torch.isfinite(chunk).all().reshape(1)
                numbers = range(start, start + chunk.shape[0])
                pixels, _, descriptors, chunk_errors = judged_views(
                    [(chunk.float(), numbers)], invalid, moderator.policy.views, **settings
                )
                rows.append(encoder.encode_image(pixels))  # [n, D]
                described.extend(descriptors[0])
                error = error or chunk_errors[0]
            counts.append(len(described))
            views.append(described)
            errors.append(error)
        embeddings = torch.cat(rows).float()
        owners = torch.repeat_interleave(
            torch.arange(count, device=embeddings.device),
            torch.tensor(counts, device=embeddings.device),
        )
    except Exception as exc:  # fail closed: a video the engine could not judge is not clean
        logger.exception("moderation failed for a batch of %d videos", count)
        batch = to_image_batch(videos[:, 0], value_range="0,1")
        failure = f"{type(exc).__name__}: {exc}"
        return moderator.after_encoder(batch, None, metas, False, failure=failure)
    # Which frame decided each video: decided once without the log (scores from the same
    # embeddings), so the deciding frame is logged with the decision and held for review.
    probe = Moderator(moderator.policy)
    probed = probe.moderate_embeddings(embeddings, owners=owners, views=views)
    deciding = [_deciding_frame(d, v) for d, v in zip(probed, views, strict=True)]
    metas = [
        {**m, "frames": frames, "deciding_frame": f} for m, f in zip(metas, deciding, strict=True)
    ]
    shown = videos[torch.arange(count), torch.tensor(deciding)]  # [B, 3, H, W]
    batch = to_image_batch(shown, device=encoder.device, value_range="0,1")
    return moderator.after_encoder(batch, embeddings, metas, False, errors, owners, views)


def _deciding_frame(decision: Decision, views: list[dict[str, Any]]) -> int:
    """The frame whose view gave the top concept (the highest score) its cosine; 0 for a
    video that could not be scored."""
    if decision.top_concept is None or decision.views is None:
        return 0
    index = decision.view_of(decision.policy.concept_names.index(decision.top_concept))
    return int(views[index]["frame"]) if index is not None else 0


def act_on_videos(videos: torch.Tensor, actions: list[str], policy: Any) -> torch.Tensor:
    """Each video's action applied to every one of its frames; allowed videos untouched."""
    if all(a == "allow" for a in actions):
        return videos
    out = videos.clone()
    for b, action in enumerate(actions):
        if action == "allow":
            continue
        frames = [action] * videos.shape[1]
        out[b] = apply_actions(videos[b].float(), frames, **policy_settings(policy)).to(
            videos.dtype
        )
    return out
