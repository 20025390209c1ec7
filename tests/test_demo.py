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
    assert done.stdout.startswith("usage: python -m moderation.demo [-h] [--model M] [FOLDER]")
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


def _repo_copy(tmp_path: Path, install: str | None = None) -> Path:
    """A folder laid out like the repository, for running scripts/demo.sh on its own."""
    import shutil

    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "demo.sh", repo / "scripts" / "demo.sh")
    if install is not None:
        (repo / "scripts" / "install.sh").write_text(install, encoding="utf-8")
    (repo / ".venv").symlink_to(Path(sys.prefix))
    return repo


def _demo_sh(repo: Path, **env: str) -> subprocess.CompletedProcess:
    import os

    base = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        ["bash", "scripts/demo.sh"],
        cwd=repo,
        env=base | {"HOME": os.environ.get("HOME", str(repo))} | env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_model_that_cannot_load_leaves_the_previous_run_alone(tmp_path):
    repo = _repo_copy(tmp_path)
    state = ["demo/moderation.db", "demo/held/ab/x.png", "demo/out/sample-00.png", "demo/spool/s"]
    for name in state:
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text("from the previous run", encoding="utf-8")
    done = _demo_sh(repo, MODEL="nosuch-org/nosuch-clip", MODERATION_DEMO_SKIP_INSTALL="1")
    assert done.returncode != 0
    assert (
        "model nosuch-org/nosuch-clip: not a local folder, and not in the Hugging Face cache"
        in (done.stderr)
    )
    for name in state:
        assert (repo / name).read_text(encoding="utf-8") == "from the previous run", name


def test_the_install_step_shows_progress(tmp_path):
    install = "echo '==> installing PyTorch'\necho 'pip noise'\necho '==> installed'\n"
    repo = _repo_copy(tmp_path, install)
    done = _demo_sh(repo, MODEL="nosuch-org/nosuch-clip")  # stops after the install step
    assert "==> installing PyTorch\n==> installed\n" in done.stdout
    assert "pip noise" not in done.stdout
    assert "pip noise" in (repo / "demo" / "install.log").read_text(encoding="utf-8")
    failing = _repo_copy(tmp_path / "f", "echo 'error: no space left'\nexit 3\n")
    done = _demo_sh(failing)
    assert done.returncode == 1 and "error: no space left" in done.stdout
