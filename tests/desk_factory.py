"""Review desk test data: the engine's decisions on engineered embeddings, logged with held
PNG originals (colourful, one per decision), desk accounts, and a desk app over them."""

from __future__ import annotations

import hashlib
import io
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from moderation.desk.accounts import add_user
from moderation.storage import DecisionLog
from moderation.storage.records import policy_record, record_of
from moderation.storage.schema import get_engine
from tests.review_factory import T0, decide, review_policy

PASSWORD = "correct horse battery"
USERS = {"alice": "reviewer", "bob": "reviewer", "carol": "special-care", "root": "admin"}
CSRF = re.compile(r'name="csrf" value="([^"]+)"')
TOKEN = re.compile(r'name="token" value="([^"]+)"')


def png(seed: int, size: int = 48) -> bytes:
    """A colourful random PNG (a greyscale, blurred rendition of it differs from it)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, format="PNG")
    return out.getvalue()


@dataclass
class DeskData:
    ordinary: list[int] = field(default_factory=list)  # review item ids, not special care
    special: list[int] = field(default_factory=list)  # items escalated by special care
    decision_of: dict[int, str] = field(default_factory=dict)
    image_of: dict[int, bytes] = field(default_factory=dict)


def seed_desk(
    url: str, held: Path, ordinary: int, special: int = 0, *, meta: dict | None = None
) -> DeskData:
    """Log `ordinary` + `special` decisions that need review, each with a held original."""
    policy = review_policy()
    rng = random.Random(ordinary * 1000 + special)
    want = {False: ordinary, True: special}
    pools: dict[bool, list] = {False: [], True: []}
    while any(len(pools[k]) < want[k] for k in pools):
        batch = [
            ([rng.uniform(0.1, 0.4) for _ in range(3)], [rng.choice([0.1, 0.1, 0.3])])
            for _ in range(4 * (ordinary + special) + 8)
        ]
        for d in decide(batch, policy):
            if d.needs_review and len(pools[bool(d.special_hits)]) < want[bool(d.special_hits)]:
                pools[bool(d.special_hits)].append(d)
    decisions = pools[False] + pools[True]
    images = {}
    for i, d in enumerate(decisions):
        from datetime import timedelta

        d.created_at = T0 + timedelta(seconds=i)
        data = png(i + 1)
        d.image_sha256 = hashlib.sha256(data).hexdigest()
        if meta:
            d.metadata = dict(meta)
        images[d.decision_id] = data
    with DecisionLog(url, spool_dir=held.parent / "spool", held_dir=held) as log:
        log.register_policy(policy_record(policy))
        log.write([record_of(d, held_image=images[d.decision_id]) for d in decisions])
        assert not log.spool.has_pending()
    from sqlalchemy import select

    from moderation.storage.models import ReviewItem

    data = DeskData()
    with get_engine(url).connect() as conn:
        for item_id, decision_id, priority in conn.execute(
            select(ReviewItem.id, ReviewItem.decision_id, ReviewItem.priority).order_by(
                ReviewItem.id
            )
        ):
            (data.special if priority else data.ordinary).append(item_id)
            data.decision_of[item_id] = decision_id
            data.image_of[item_id] = images[decision_id]
    return data


def add_users(url: str, users: dict[str, str] = USERS) -> None:
    engine = get_engine(url)
    for name, role in users.items():
        add_user(engine, name, role, PASSWORD)


def csrf_of(html: str) -> str:
    match = CSRF.search(html)
    assert match, "no CSRF field on the page"
    return match.group(1)
