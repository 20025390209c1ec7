"""Every decision that is made is recorded, or named as not recorded (issue 8, items 8 and 11).

Values PostgreSQL refuses but SQLite takes are refused before anything is acted on; a batch the
database refuses is kept in the spool; a full disk or an unwritable folder leaves the images
moderated and says exactly which decisions are recorded nowhere.
"""

from __future__ import annotations

import dataclasses
import errno
import os

import pytest
import torch
from sqlalchemy import func, select

from moderation.bench.records import example_decisions, example_policy
from moderation.engine import Moderator
from moderation.storage import DecisionLog, DecisionRow, ReviewItem, StorageError
from moderation.storage import db as storage_db
from moderation.storage import spool as spool_module
from moderation.storage.errors import PartlyRecordedError, UnrecordedError
from moderation.storage.spool_format import scan
from policy import compile_policy, load_policy


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(3)
    return torch.rand(3, 3, 32, 32) * 2 - 1


@pytest.fixture
def policy(tmp_path, tiny_clip_dir, encoder):
    """Image 0 fires `c0` (blackout), image 1 fires `c1` (review), image 2 is allowed."""
    path = tmp_path / "p.yaml"
    path.write_text(
        f"policy: recording\nmodel: {tiny_clip_dir}\nreview_band: 0\nconcepts:\n"
        "  - name: c0\n    prompts: [a photo]\n    threshold: -1\n    action: blackout\n"
    )
    return compile_policy(load_policy(path), encoder)


def stored(db_url: str, model=DecisionRow) -> int:
    with storage_db.engine_for(db_url).connect() as conn:
        return conn.execute(select(func.count()).select_from(model)).scalar_one()


def spooled_ids(folder) -> list[str]:
    ids = []
    for path in sorted(folder.glob("*.spool")):
        fd = os.open(path, os.O_RDONLY)
        try:
            for record in scan(fd):
                if record.kind == "decisions":
                    ids += [row["id"] for row in record.payload()["rows"]]
        finally:
            os.close(fd)
    return ids


# -- item 8: what one backend refuses is refused on both, before anything is acted on ----------


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        (
            {"prompt": "a\x00b"},
            "metadata['prompt'] holds a NUL character (\\x00), which PostgreSQL cannot store; "
            "remove it",
        ),
        (
            {"tags": ["ok", {"k\x00": 1}]},
            "metadata['tags'][1]['k\\x00'] (the key) holds a NUL character (\\x00), which "
            "PostgreSQL cannot store; remove it",
        ),
        (
            {"file": "caf\udce9.png"},
            "metadata['file'] holds a lone surrogate (not valid Unicode text); remove it",
        ),
        (
            {"seed": float("nan")},
            "metadata['seed'] cannot be stored as JSON: NaN and infinity are not JSON numbers",
        ),
        (
            {"when": object()},
            "metadata['when'] cannot be stored as JSON: object is not JSON serializable",
        ),
    ],
    ids=["nul-value", "nul-key", "surrogate", "nan", "object"],
)
def test_unstorable_metadata_is_refused_before_any_image_is_changed(
    db_url, tmp_path, encoder, policy, images, metadata, message
):
    log = DecisionLog(db_url, spool_dir=tmp_path / "spool", held_dir=tmp_path / "held")
    original = images.clone()
    with Moderator(policy, encoder, log=log) as moderator:
        with pytest.raises(StorageError) as caught:
            moderator.moderate(images, metadata=metadata)
        assert str(caught.value) == message
        with pytest.raises(StorageError, match=r"^metadata\[1\]"):
            moderator.moderate(images[:2], metadata=[{}, metadata])
    assert torch.equal(images, original)
    assert stored(db_url) == 0 and spooled_ids(tmp_path / "spool") == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"name": "p" * 201},
            "policy 'pppppppppppppppppppppppppppppppppppppppp...': name is 201 characters long; "
            "the decision log stores at most 200",
        ),
        (
            {"version": "9" * 65},
            "policy 'example': version is 65 characters long; the decision log stores at most 64",
        ),
        (
            {"concepts": [{"name": "c" * 201, "threshold": 0.2, "action": "blur"}]},
            "policy 'example': concept name 'cccccccccccccccccccccccccccccccccccccccc...' is 201 "
            "characters long; the decision log stores at most 200",
        ),
        (
            {"source": "name: x\x00"},
            "policy 'example': policy['source'] holds a NUL character (\\x00), which "
            "PostgreSQL cannot store",
        ),
    ],
    ids=["name", "version", "concept", "nul"],
)
def test_a_policy_that_does_not_fit_the_log_is_refused_when_registered(
    db_url, tmp_path, change, message
):
    record = dataclasses.replace(example_policy(), **change)
    with DecisionLog(db_url, spool_dir=tmp_path / "spool") as log:
        with pytest.raises(StorageError) as caught:
            log.register_policy(record)
    assert str(caught.value) == message
    assert list((tmp_path / "spool").glob("*.spool")) == []


@pytest.mark.postgres
@pytest.mark.parametrize("bad", ["nul", "long top concept"])
def test_a_batch_postgresql_refuses_is_kept_in_the_spool_not_dropped(pg_url, tmp_path, bad):
    with storage_db.engine_for(pg_url).begin() as conn:
        conn.exec_driver_sql("TRUNCATE review_events, review_items, decisions, policies")
    policy = example_policy()
    records = example_decisions(4, policy, seed=11)
    if bad == "nul":
        records[2].meta = {"prompt": "a\x00b"}  # past the engine's check: a direct caller
    else:
        records[2].top_concept = "t" * 300
    spool = tmp_path / "spool"
    with DecisionLog(pg_url, spool_dir=spool) as log:
        log.register_policy(policy)
        with pytest.raises(PartlyRecordedError) as caught:
            log.write(records)
        assert caught.value.decision_ids == [r.id for r in records]
        assert f"; the 4 decisions are kept in the spool {spool} (a replay quarantines" in str(
            caught.value
        )
        assert log.counts.refused == 4
    assert stored(pg_url) == 0
    assert spooled_ids(spool) == [r.id for r in records]
    with DecisionLog(pg_url, spool_dir=spool) as log:
        assert log.replay() == 3  # the others go in; the refused one is set aside, named
        (report,) = log.quarantined
        assert f"quarantined 1 decision(s) the database refused ({records[2].id})" in report
    assert stored(pg_url) == 3


# -- item 11: a decision recorded nowhere is named, and the images are still moderated -----------


def _enospc(real_write):
    def write(fd, data):
        if b'"rows"' in bytes(data):  # the disk fills up after the policy was spooled
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    return write


def test_disk_full_while_the_database_is_down_names_every_unrecorded_decision(
    tmp_path, encoder, policy, images, monkeypatch
):
    down = f"sqlite:///{tmp_path / 'missing' / 'x.db'}"
    spool = tmp_path / "spool"
    with Moderator(policy, encoder, log=DecisionLog(down, spool_dir=spool)) as moderator:
        (path,) = spool.glob("*.spool")
        size = path.stat().st_size
        monkeypatch.setattr(spool_module.os, "write", _enospc(os.write))
        result = moderator.moderate(images.clone())
        monkeypatch.undo()
        ids = [d.decision_id for d in result.decisions]
        assert result.unrecorded == ids and moderator.unrecorded == ids
        assert result.log_error == (
            f"cannot reach database {down}: unable to open database file, and the spool cannot take them: cannot write to the spool file {path}: "
            "[Errno 28] No space left on device"
        )
        # Failing closed all the same: every image fired `c0` and is blacked out.
        assert [d.action for d in result.decisions] == ["blackout"] * 3
        assert torch.all(result.images == -1)
    assert path.stat().st_size == size, "no partial record left behind"


def test_an_unwritable_spool_folder_while_the_database_is_down_is_refused_up_front(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    with pytest.raises(StorageError) as caught:
        DecisionLog(f"sqlite:///{tmp_path / 'missing' / 'x.db'}", spool_dir=blocker / "spool")
    assert str(caught.value) == (
        f"cannot read the spool folder {blocker / 'spool'}: [Errno 20] Not a directory: "
        f"'{blocker / 'spool'}'"
    )


def test_an_unwritable_held_folder_records_the_decision_without_its_original(
    db_url, tmp_path, encoder, tiny_clip_dir, images
):
    path = tmp_path / "review.yaml"
    path.write_text(
        f"policy: held\nmodel: {tiny_clip_dir}\nconcepts:\n"
        "  - name: look\n    prompts: [a photo]\n    threshold: -1\n    action: review\n"
    )
    policy = compile_policy(load_policy(path), encoder)
    blocker = tmp_path / "file"
    blocker.write_text("")
    log = DecisionLog(db_url, spool_dir=tmp_path / "spool", held_dir=blocker / "held")
    with Moderator(policy, encoder, log=log) as moderator:
        result = moderator.moderate(images[:2].clone())
    ids = [d.decision_id for d in result.decisions]
    assert result.unrecorded == []
    assert result.log_error == (
        f"cannot store held image in {blocker / 'held'}: [Errno 20] Not a directory: "
        f"'{blocker / 'held'}': the originals of 2 decisions are not held and cannot be "
        f"released ({', '.join(ids)})"
    )
    assert stored(db_url) == 2 and stored(db_url, ReviewItem) == 2  # the reviewer still sees them
    with storage_db.engine_for(db_url).connect() as conn:
        assert conn.execute(select(DecisionRow.held_path)).scalars().all() == [None, None]


def test_a_refused_batch_is_recorded_in_the_spool_and_reported(tmp_path, encoder, policy, images):
    db_url = f"sqlite:///{tmp_path / 'r.db'}"
    with Moderator(policy, encoder, log=DecisionLog(db_url, spool_dir=tmp_path / "s")) as moderator:
        with storage_db.engine_for(db_url).begin() as conn:
            conn.exec_driver_sql("DELETE FROM policies")  # the decisions now break a foreign key
        result = moderator.moderate(images.clone())
    assert result.unrecorded == []
    assert result.log_error.startswith(f"database {db_url} refused the rows: FOREIGN KEY")
    assert spooled_ids(tmp_path / "s") == [d.decision_id for d in result.decisions]


def test_unrecorded_error_names_the_batch(tmp_path, monkeypatch):
    policy = example_policy()
    records = example_decisions(3, policy)
    with DecisionLog(f"sqlite:///{tmp_path / 'no' / 'x.db'}", spool_dir=tmp_path / "s") as log:
        log.register_policy(policy)
        monkeypatch.setattr(spool_module.os, "write", _enospc(os.write))
        with pytest.raises(UnrecordedError) as caught:
            log.write(records)
    assert caught.value.decision_ids == [r.id for r in records]
    assert log.counts.spooled == 0
