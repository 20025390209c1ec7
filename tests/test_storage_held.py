"""Held originals: owner-only, content-addressed, released only after an approval."""

from __future__ import annotations

import hashlib
import stat

import pytest
from sqlalchemy import select, update

from moderation.bench.records import example_decisions, example_policy
from moderation.review import ReviewError, ReviewQueue
from moderation.storage import DecisionLog, DecisionRow, HeldStore, ReviewItem, StorageError
from moderation.storage import db as storage_db


def release(log, decision_id):
    """The held original of a decision, through the review queue's release rules."""
    return ReviewQueue(log.url).release(decision_id, log.held)


PNG = b"\x89PNG\r\n\x1a\n" + b"pixels" * 100


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def log(tmp_path):
    url = f"sqlite:///{tmp_path / 'held.db'}"
    with DecisionLog(url, spool_dir=tmp_path / "spool", held_dir=tmp_path / "held") as log:
        log.register_policy(example_policy())
        yield log
    storage_db.dispose(url)


def set_status(log: DecisionLog, decision_id: str, status: str, **fields) -> None:
    with storage_db.engine_for(log.url).begin() as conn:
        conn.execute(
            update(ReviewItem)
            .where(ReviewItem.decision_id == decision_id)
            .values(status=status, **fields)
        )


def test_held_files_are_content_addressed_and_owner_only(log, tmp_path):
    records = example_decisions(3, example_policy(), review_every=1)
    records[0].held_image = PNG
    records[1].held_image = PNG  # same bytes: stored once
    records[2].held_image = PNG + b"!"
    log.write(records)

    digest = hashlib.sha256(PNG).hexdigest()
    held = tmp_path / "held"
    stored = held / digest[:2] / f"{digest}.png"
    assert stored.read_bytes() == PNG
    assert mode(held) == 0o700 and mode(stored.parent) == 0o700
    files = sorted(p for p in held.rglob("*") if p.is_file())
    assert len(files) == 2 and all(mode(p) == 0o600 for p in files)
    with storage_db.engine_for(log.url).connect() as conn:
        paths = conn.exec_driver_sql("SELECT held_path FROM decisions ORDER BY created_at").all()
    # The row records where the file is, not where a reader's held folder might be.
    assert [p for (p,) in paths][:2] == [str(stored.resolve())] * 2


def test_rows_with_relative_held_paths_are_found_under_the_folder(log, tmp_path, monkeypatch):
    """Rows written before the log recorded absolute paths hold `<sha[:2]>/<sha>.png`."""
    records = example_decisions(1, example_policy(), review_every=1)
    records[0].held_image = PNG
    log.write(records)
    digest = hashlib.sha256(PNG).hexdigest()
    relative = f"{digest[:2]}/{digest}.png"
    with storage_db.engine_for(log.url).begin() as conn:
        conn.execute(
            update(DecisionRow).where(DecisionRow.id == records[0].id).values(held_path=relative)
        )
    set_status(log, records[0].id, "approved", reviewer="ana")
    assert release(log, records[0].id) == PNG  # looked up under the log's held folder
    monkeypatch.setenv("MODERATION_HELD_DIR", str(tmp_path / "held"))
    shown = ReviewQueue(log.url).show(1)
    assert shown["held_path"] == relative
    assert shown["held_file"] == str(tmp_path / "held" / digest[:2] / f"{digest}.png")


def test_release_only_after_approval(log):
    records = example_decisions(2, example_policy(), review_every=1)
    records[0].held_image = PNG
    log.write(records)
    held_id, plain_id = records[0].id, records[1].id

    with pytest.raises(ReviewError, match=r"still awaiting review \(review item 1 is pending\)"):
        release(log, held_id)
    set_status(log, held_id, "claimed")
    with pytest.raises(ReviewError, match="is claimed"):
        release(log, held_id)
    set_status(log, held_id, "rejected", reviewer="ana", reason="gore")
    with pytest.raises(ReviewError, match="was rejected by ana: gore"):
        release(log, held_id)
    set_status(log, held_id, "approved", reviewer="ana")
    assert release(log, held_id) == PNG

    with pytest.raises(ReviewError, match=f"decision {plain_id} has no held image"):
        release(log, plain_id)
    with pytest.raises(ReviewError, match="no decision nope in sqlite"):
        release(log, "nope")


def test_release_uses_the_latest_review_item(log):
    records = example_decisions(1, example_policy(), review_every=1)
    records[0].held_image = PNG
    log.write(records)
    set_status(log, records[0].id, "approved")
    with storage_db.engine_for(log.url).begin() as conn:  # a reopen adds a newer, pending item
        conn.execute(
            ReviewItem.__table__.insert().values(
                decision_id=records[0].id, status="pending", priority=0, margin=0.0, reopened_from=1
            )
        )
    with pytest.raises(ReviewError, match="review item 2 is pending"):
        release(log, records[0].id)


def test_never_queued_decision_is_not_released(log):
    records = example_decisions(1, example_policy())
    records[0].held_image = PNG
    log.write(records)
    with pytest.raises(ReviewError, match="was never queued for review"):
        release(log, records[0].id)


def test_corrupt_held_file_is_refused(tmp_path):
    store = HeldStore(tmp_path / "h")
    relative = store.put(PNG)
    (tmp_path / "h" / relative).write_bytes(b"tampered")
    for path in (relative, store.absolute(relative)):
        with pytest.raises(StorageError, match="is corrupt"):
            store.get(path)


def test_held_image_is_stored_even_when_the_database_is_down(tmp_path):
    records = example_decisions(1, example_policy())
    records[0].held_image = PNG
    down = "postgresql+psycopg://postgres@127.0.0.1:1/x"
    with DecisionLog(down, spool_dir=tmp_path / "spool", held_dir=tmp_path / "held") as log:
        log.write(records)
    digest = hashlib.sha256(PNG).hexdigest()
    assert (tmp_path / "held" / digest[:2] / f"{digest}.png").read_bytes() == PNG


# -- issue 15 item 9: where held originals go by default ------------------------------------


def test_held_originals_default_to_a_per_user_folder_not_the_working_directory(
    tmp_path, monkeypatch, caplog
):
    """With no held_dir and no MODERATION_HELD_DIR, a checkout run leaves no ./held behind."""
    checkout = tmp_path / "checkout"
    (checkout / ".git").mkdir(parents=True)
    monkeypatch.chdir(checkout)
    monkeypatch.delenv("MODERATION_HELD_DIR", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    url = f"sqlite:///{tmp_path / 'd.db'}"
    policy = example_policy()
    records = example_decisions(1, policy)
    records[0].held_image = PNG
    with caplog.at_level("WARNING", logger="moderation.storage"):
        with DecisionLog(url, spool_dir=tmp_path / "spool") as log:
            log.register_policy(policy)
            log.write(records)
    with storage_db.engine_for(url).connect() as conn:
        stored = conn.execute(select(DecisionRow.held_path)).scalar_one()
    folder = tmp_path / "data" / "moderation" / "held"
    digest = hashlib.sha256(PNG).hexdigest()
    assert stored == str(folder.resolve() / digest[:2] / f"{digest}.png")
    assert mode(folder) == 0o700 and mode(folder / digest[:2] / f"{digest}.png") == 0o600
    assert not (checkout / "held").exists()
    notes = [r.getMessage() for r in caplog.records if "held originals" in r.getMessage()]
    assert notes == [
        f"held originals (images waiting for review) are kept in {folder.resolve()} "
        "(owner-only); set MODERATION_HELD_DIR or held_dir= to keep them elsewhere"
    ]
    storage_db.dispose(url)


def test_a_held_folder_created_inside_a_git_checkout_is_never_silent(tmp_path, caplog):
    checkout = tmp_path / "repo"
    (checkout / ".git").mkdir(parents=True)
    with caplog.at_level("WARNING", logger="moderation.storage"):
        HeldStore(checkout / "held").put(PNG)
        HeldStore(checkout / "held").put(PNG + b"2")  # created already: said once
    (message,) = [r.getMessage() for r in caplog.records if "held originals" in r.getMessage()]
    assert message.endswith(
        f"WARNING: {(checkout / 'held').resolve()} is inside the git checkout "
        f"{checkout.resolve()} and not ignored by git: add it to .gitignore, or keep held "
        "originals outside the checkout"
    )
