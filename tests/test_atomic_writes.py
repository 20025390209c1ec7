"""Files are written whole through one helper (policy.atomic): a unique temporary name that is
never a followed link, concurrent writers that never delete each other's temporary file, and
`calibrate --out` written from the exact text that was scored (issue 15 items 5 and 6)."""

from __future__ import annotations

import os
import stat
import threading

import pytest

from policy.atomic import atomic_file, atomic_write
from tests.test_calibrate_folders import folders, run  # noqa: F401 (fixture)


def test_the_target_is_replaced_whole_and_a_failure_leaves_it_as_it_was(tmp_path):
    target = tmp_path / "out.txt"
    atomic_write(target, "first\n")
    with pytest.raises(RuntimeError), atomic_file(target, text=True) as file:
        file.write("half of the second")
        raise RuntimeError("the writer failed")
    assert target.read_text() == "first\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]  # no temporary left


def test_a_link_planted_at_the_old_fixed_temporary_names_is_not_followed(folders, tmp_path):  # noqa: F811
    from moderation.integrations import pretrained

    policy, red, clean = folders
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    # save_pretrained's manifest and calibrate --out used fixed names, written through links.
    checker = tmp_path / "safety_checker"
    checker.mkdir()
    (checker / ".moderation_checker.json.tmp").symlink_to(victim)
    pretrained._write_text(checker / "moderation_checker.json", "{}\n")
    assert (checker / "moderation_checker.json").read_text() == "{}\n"
    (policy.parent / ".calibrated.yaml.tmp").symlink_to(victim)
    run(str(policy), "--positive", f"red-logo={red}", "--negative", str(clean),
        "--min-examples", "5", "--out", str(policy.parent / "calibrated.yaml"))  # fmt: skip
    assert (policy.parent / "calibrated.yaml").read_text().startswith("# Logos")
    assert victim.read_text() == "keep me\n"


def test_the_temporary_file_is_created_exclusively_and_never_through_a_link(tmp_path, monkeypatch):
    import policy.atomic as atomic

    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    planted = tmp_path / ".out.txt.planted.tmp"
    planted.symlink_to(victim)
    monkeypatch.setattr(atomic, "temporary_name", lambda path: planted)  # guessed right
    with pytest.raises(FileExistsError):
        atomic_write(tmp_path / "out.txt", "new\n")
    assert victim.read_text() == "keep me\n" and planted.is_symlink()
    assert not (tmp_path / "out.txt").exists()


def test_concurrent_writers_never_delete_each_others_temporary_file(tmp_path):
    target = tmp_path / "shared.json"
    texts = [f"writer {i}\n" * 2000 for i in range(8)]
    errors = []
    start = threading.Barrier(len(texts))

    def write(text):
        try:
            start.wait()
            for _ in range(20):
                atomic_write(target, text)
        except Exception as err:  # pragma: no cover - the assertion below names it
            errors.append(err)

    threads = [threading.Thread(target=write, args=(t,)) for t in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert target.read_text() in texts  # one writer's whole text
    assert [p.name for p in tmp_path.iterdir()] == ["shared.json"]


def test_mode_no_clobber_and_a_replaced_files_permissions(tmp_path):
    os.umask(0o022)
    private = atomic_write(tmp_path / "held.png", b"x", mode=0o600)
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    os.chmod(private, 0o640)
    atomic_write(private, b"y")  # keeps the mode of the file it replaces
    assert stat.S_IMODE(private.stat().st_mode) == 0o640
    with pytest.raises(FileExistsError):
        atomic_write(private, b"z", overwrite=False)
    assert private.read_bytes() == b"y"
    fresh = atomic_write(tmp_path / "new.csv", "a,b\n", overwrite=False)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o644


def test_save_pretrained_and_calibrate_write_through_the_helper(tmp_path, monkeypatch):
    """No fixed `.NAME.tmp` left to plant: the writers of the issue go through policy.atomic."""
    import policy.atomic as atomic

    used = []
    real = atomic.temporary_name
    monkeypatch.setattr(atomic, "temporary_name", lambda path: used.append(path.name) or real(path))
    from moderation.integrations import pretrained

    pretrained._write_text(tmp_path / "moderation_checker.json", "{}\n")
    assert used == ["moderation_checker.json"]


def test_calibrate_out_refuses_a_policy_edited_while_it_was_scored(folders, tmp_path, monkeypatch):  # noqa: F811
    import moderation.calibration.calibrate as calibration

    policy, red, clean = folders
    original = calibration.calibrate

    def calibrate_then_edit(*args, **kwargs):
        report = original(*args, **kwargs)
        # Someone edits the policy while calibrate runs: another concept vector.
        text = policy.read_text().replace("embedding: [1.0,", "embedding: [0.5,")
        policy.write_text(text, encoding="utf-8")
        return report

    monkeypatch.setattr(calibration, "calibrate", calibrate_then_edit)
    out = policy.parent / "calibrated.yaml"
    result = run(str(policy), "--positive", f"red-logo={red}", "--negative", str(clean),
                 "--min-examples", "5", "--out", str(out), code=1)  # fmt: skip
    assert result.output.splitlines()[-1] == (
        f"Error: {policy} changed while it was being calibrated; nothing written to {out} "
        "(run calibrate again on the new version)"
    )
    assert not out.exists()


def test_calibrate_out_writes_the_text_that_was_scored(folders, tmp_path):  # noqa: F811
    policy, red, clean = folders
    out = policy.parent / "calibrated.yaml"
    run(str(policy), "--positive", f"red-logo={red}", "--negative", str(clean),
        "--min-examples", "5", "--out", str(out))  # fmt: skip
    before, after = policy.read_text().splitlines(), out.read_text().splitlines()
    assert [a for a, b in zip(before, after, strict=True) if a != b] == ["    threshold: 0.3"]
    assert [p.name for p in policy.parent.iterdir() if p.name.endswith(".tmp")] == []
