"""`moderation check` and `moderation policy compile` on files, with a tiny CLIP, offline."""

from __future__ import annotations

import json
import sqlite3

import pytest
from click.testing import CliRunner

from moderation.cli import main
from moderation.demo import sample_images


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    sample_images(folder, n=5)
    return folder


@pytest.fixture
def policy_file(tmp_path, tiny_clip_dir):
    """Prompt concepts with low thresholds (random tiny weights), plus one that never fires."""
    path = tmp_path / "policy.yaml"
    path.write_text(
        f"policy: cli-test\nmodel: {tiny_clip_dir}\nreview_band: 0.05\n"
        "concepts:\n"
        "  - name: anything\n    prompts: [a photo, an image]\n    threshold: -1\n    action: blur\n"
        "  - name: never\n    prompts: [a dog]\n    threshold: 1\n"
    )
    return path


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result


def test_check_folder_json_out_and_log(tmp_path, photos, policy_file):
    db = tmp_path / "m.db"
    out = tmp_path / "out"
    result = run(
        "check",
        photos,
        "--policy",
        policy_file,
        "--db",
        f"sqlite:///{db}",
        "--out",
        out,
        "--json",
        "--prompt",
        "a beach",
        "--user",
        "u1",
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert len(rows) == 5
    first = rows[0]
    assert first["file"].endswith("sample-00.png")
    assert (first["verdict"], first["action"], first["fired"]) == ("flag", "blur", ["anything"])
    assert first["policy"]["name"] == "cli-test" and len(first["policy"]["digest"]) == 64
    assert first["metadata"] == {"prompt": "a beach", "user": "u1", "file": first["file"]}
    assert [c["concept"] for c in first["concepts"]] == ["anything", "never"]
    assert sorted(p.name for p in out.iterdir()) == [f"sample-0{i}.png" for i in range(5)]
    with sqlite3.connect(db) as conn:
        assert conn.execute("select count(*) from decisions").fetchone() == (5,)


def test_check_prints_a_table(tmp_path, photos, policy_file):
    result = run("check", photos / "sample-01.png", "--policy", policy_file, "--no-log")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == [
        "image",
        "verdict",
        "action",
        "top",
        "concept",
        "cosine",
        "/",
        "threshold",
        "note",
    ]
    assert "sample-01.png  flag" in lines[2] and "anything" in lines[2] and "/ -1.000" in lines[2]
    assert lines[-1] == "1 images: 1 flag"


def test_unreadable_image_is_an_error_that_names_it_and_is_logged(tmp_path, photos, policy_file):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    db = tmp_path / "m.db"
    result = run(
        "check",
        bad,
        photos / "sample-00.png",
        "--policy",
        policy_file,
        "--db",
        f"sqlite:///{db}",
        "--json",
    )
    assert result.exit_code == 1
    rows = json.loads(result.stdout)
    assert rows[0]["verdict"] == "error" and rows[0]["action"] == "blackout"
    assert "broken.png" in rows[0]["error"]
    assert rows[1]["verdict"] == "flag"
    assert "1 image(s) could not be checked" in result.output
    with sqlite3.connect(db) as conn:
        assert conn.execute(
            "select count(*) from decisions where verdict = 'error'"
        ).fetchone() == (1,)


def test_invalid_policy_exits_1_with_its_position(tmp_path, photos):
    path = tmp_path / "bad.yaml"
    path.write_text("policy: p\nconcepts:\n  - name: a\n    prompts: [x]\n    threshold: 2\n")
    result = run("check", photos, "--policy", path, "--no-log")
    assert result.exit_code == 1
    assert f"{path}:5:16 concepts[0].threshold: must be between -1 and 1" in result.output


def test_compile_then_check_with_the_artifact(tmp_path, photos, policy_file):
    artifact = tmp_path / "p.compiled.safetensors"
    result = run("policy", "compile", policy_file, "-o", artifact, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["concepts"] == 2 and summary["embed_dim"] == 32
    result = run("check", photos / "sample-02.png", "--policy", artifact, "--no-log", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)[0]["policy"]["digest"] == summary["digest"]


def test_every_command_has_help():
    def walk(group, prefix):
        for name, command in group.commands.items():
            yield [*prefix, name]
            if hasattr(command, "commands"):
                yield from walk(command, [*prefix, name])

    for args in walk(main, []):
        result = run(*args, "--help")
        assert result.exit_code == 0, args
        assert "Usage:" in result.output


def test_out_keeps_same_named_files_from_different_folders_apart(tmp_path, photos, policy_file):
    nested = tmp_path / "in"
    (nested / "a").mkdir(parents=True)
    (nested / "b").mkdir()
    for sub in ("a", "b"):
        (nested / sub / "x.jpg").write_bytes((photos / "sample-00.png").read_bytes())
    out = tmp_path / "out"
    result = run("check", nested, "--policy", policy_file, "--no-log", "--out", out)
    assert result.exit_code == 0, result.output
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.png")) == ["a/x.png", "b/x.png"]
