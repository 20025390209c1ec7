"""`python -m moderation.demo`: its help, and the folder it writes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_help_prints_usage_and_writes_nothing(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "moderation.demo", "--help"],
        cwd=tmp_path,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python -m moderation.demo [-h] [FOLDER]")
    assert list(tmp_path.iterdir()) == []  # no folder named --help (or anything else)


def test_unknown_option_is_a_usage_error(tmp_path, capsys, monkeypatch):
    import pytest

    from moderation.demo import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(["--bogus"])
    assert info.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_demo_policy_names_its_own_model(tmp_path):
    """The tiny policy runs as it is (`Moderator.from_policy(FOLDER/tiny-policy.yaml)`)."""
    from moderation.demo import tiny_model_policy
    from policy import load_policy

    (tmp_path / "tiny-clip").mkdir()
    path = tiny_model_policy(ROOT / "policies" / "default.yaml", tmp_path / "tiny-policy.yaml")
    assert load_policy(path).resolved_model == str((tmp_path / "tiny-clip").resolve())
