"""`moderation check` and `moderation policy compile` on files, with a tiny CLIP, offline."""

from __future__ import annotations

import json
import os
import re
import sqlite3
from pathlib import Path

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


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


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
    assert [c["name"] for c in first["concepts"]] == ["anything", "never"]  # was "concept"
    assert (first["concepts_listed"], first["concepts_total"]) == (2, 2)
    assert first["checked"] is True and first["out"] == str(out / "sample-00.png")
    assert sorted(p.name for p in out.iterdir()) == [f"sample-0{i}.png" for i in range(5)]
    with sqlite3.connect(db) as conn:
        assert conn.execute("select count(*) from decisions").fetchone() == (5,)


def test_check_prints_a_table(tmp_path, photos, policy_file):
    result = run("check", photos / "sample-01.png", "--policy", policy_file, "--no-log")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert re.split(r" {2,}", lines[0]) == [
        "image",
        "verdict",
        "action",
        "fired",
        "top concept",
        "cosine / threshold",
        "note",
    ]
    assert "sample-01.png  flag" in lines[2] and "anything" in lines[2] and "/ -1.000" in lines[2]
    assert lines[-1] == "1 image: 1 flag"


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
    assert rows[0]["concepts"][0]["cosine"] is None  # not NaN: the output stays valid JSON
    assert rows[1]["verdict"] == "flag"
    assert "Error: 1 image(s) could not be judged (verdict error: see the note column)" in (
        result.output
    )
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
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.png")) == [
        "a/x.jpg.png",
        "b/x.jpg.png",
    ]


# --- fixes a new user hit (issue 7) and folder scans by content (issue 8, item 5) ------------


def json_check(*args):
    result = run("check", *args, "--json")
    return result, json.loads(result.stdout)


def save_as(source, target, fmt=None):
    from PIL import Image

    target.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(source) as image:
        image.convert("RGB").save(target, format=fmt)
    return target


def written(rows):
    """{input file: output file} of --json rows, each output checked to exist."""
    mapping = {row["file"]: row["out"] for row in rows}
    for out in mapping.values():
        assert out is not None and Path(out).is_file()
    return mapping


def test_out_names_stay_unique_when_stems_are_shared(tmp_path, photos, policy_file):
    folder = tmp_path / "in"
    jpg = save_as(photos / "sample-00.png", folder / "a.jpg")
    webp = save_as(photos / "sample-01.png", folder / "a.webp")
    png = save_as(photos / "sample-02.png", folder / "a.png")
    out = tmp_path / "out"
    result, rows = json_check(folder, "--policy", policy_file, "--no-log", "--out", out)
    assert result.exit_code == 0, result.output
    assert written(rows) == {
        str(jpg): str(out / "a.jpg.png"),
        str(png): str(out / "a.png"),
        str(webp): str(out / "a.webp.png"),
    }


def test_out_names_two_same_named_files_from_two_folders(tmp_path, photos, policy_file):
    first = save_as(photos / "sample-00.png", tmp_path / "one" / "a.png")
    second = save_as(photos / "sample-03.png", tmp_path / "two" / "a.png")
    out = tmp_path / "out"
    args = ["--policy", policy_file, "--no-log", "--out", out]
    result, rows = json_check(first.parent, second.parent, *args)
    assert result.exit_code == 0, result.output
    assert written(rows) == {str(first): str(out / "a.png"), str(second): str(out / "a~2.png")}
    # Each result is its own input's: the second is not the first one's pixels.
    assert (out / "a.png").read_bytes() != (out / "a~2.png").read_bytes()
    # Files given directly: the same names, in the order given.
    result, rows = json_check(second, first, *args)
    assert written(rows) == {str(second): str(out / "a.png"), str(first): str(out / "a~2.png")}


def test_the_same_file_reached_twice_is_checked_once(tmp_path, photos, policy_file):
    db = tmp_path / "m.db"
    image = photos / "sample-04.png"
    out = tmp_path / "out"
    result, rows = json_check(
        image, image, photos, "--policy", policy_file, "--db", f"sqlite:///{db}", "--out", out
    )
    assert result.exit_code == 0, result.output
    assert [r["file"] for r in rows] == [str(image)] + [
        str(photos / f"sample-0{i}.png") for i in range(4)
    ]
    assert rows[0]["also_given_as"] == [str(image), str(image)]
    assert rows[0]["out"] == str(out / "sample-04.png")
    with sqlite3.connect(db) as conn:
        assert conn.execute("select count(*) from decisions").fetchone() == (5,)
    result = run("check", image, image, "--policy", policy_file, "--no-log")
    assert result.stdout.splitlines()[-1] == "1 image: 1 flag; 1 repeated input(s) checked once"


def test_out_never_overwrites_an_input(tmp_path, photos, policy_file):
    folder = tmp_path / "in"
    original = save_as(photos / "sample-00.png", folder / "a.png").read_bytes()
    result, rows = json_check(folder, "--policy", policy_file, "--no-log", "--out", folder)
    assert result.exit_code == 0, result.output
    assert written(rows) == {str(folder / "a.png"): str(folder / "a~2.png")}
    assert (folder / "a.png").read_bytes() == original


def test_out_is_listed_in_the_table(tmp_path, photos, policy_file):
    out = tmp_path / "out"
    result = run("check", photos / "sample-00.png", "--policy", policy_file, "--no-log", "-o", out)
    assert result.exit_code == 0, result.output
    header, _, row = result.stdout.splitlines()[:3]
    assert header.endswith("  written to")
    assert row.endswith(f"  {out / 'sample-00.png'}")


@pytest.fixture
def fired_policy(tmp_path, tiny_clip_dir):
    """Two concepts that always fire, one that never does; special care that always fires."""
    path = tmp_path / "fired.yaml"
    path.write_text(
        f"policy: fired\nmodel: {tiny_clip_dir}\n"
        "concepts:\n"
        "  - {name: first, prompts: [a photo], threshold: -1, action: blur}\n"
        "  - {name: second, prompts: [an image], threshold: -0.9, action: pixelate}\n"
        "  - {name: third, prompts: [a picture], threshold: -0.8, action: blur}\n"
        "  - {name: fourth, prompts: [a drawing], threshold: -0.7, action: blur}\n"
        "  - {name: never, prompts: [a dog], threshold: 1}\n"
        "special_care:\n"
        "  concepts:\n"
        "    - {name: always, prompts: [a child], threshold: -1}\n"
        "    - {name: not-this, prompts: [a cat], threshold: 1}\n"
    )
    return path


def test_table_names_every_concept_that_fired(photos, fired_policy):
    result = run("check", photos / "sample-00.png", "--policy", fired_policy, "--no-log")
    assert result.exit_code == 0, result.output
    header, _, row = result.stdout.splitlines()[:3]
    assert "  fired  " in header and "  note" in header
    assert "  first, second, third +1 more  " in row
    assert row.endswith("  special care: always")


def test_json_says_how_many_concepts_it_lists_and_has_special_care(photos, fired_policy):
    image = photos / "sample-00.png"
    _, (row,) = json_check(image, "--policy", fired_policy, "--no-log")
    assert (row["concepts_listed"], row["concepts_total"]) == (5, 5)
    assert row["fired"] == ["first", "second", "third", "fourth"]
    _, (row,) = json_check(image, "--policy", fired_policy, "--no-log", "--top", "2")
    assert (row["concepts_listed"], row["concepts_total"]) == (2, 5)
    assert len(row["concepts"]) == 2
    # Renamed (CHANGELOG, issue 14): special_care_concepts -> special_care.concepts, whose
    # rows say name and hit (were concept and fired).
    care = row["special_care"]["concepts"]
    assert [(s["name"], s["threshold"], s["hit"]) for s in care] == [
        ("always", -1.0, True),
        ("not-this", 1.0, False),
    ]
    for special in care:
        assert special["score"] == pytest.approx(special["cosine"] - special["threshold"])


def test_image_sha256_is_filled_without_logging(photos, policy_file):
    from moderation.images import image_sha256, load_image_file

    image = photos / "sample-01.png"
    _, (row,) = json_check(image, "--policy", policy_file, "--no-log")
    assert row["image_sha256"] == image_sha256(load_image_file(image))


@pytest.mark.parametrize("option", ["--prompt", "--user"])
def test_text_that_cannot_be_logged_is_refused_before_anything_runs(
    tmp_path, photos, policy_file, option
):
    db = tmp_path / "m.db"
    out = tmp_path / "out"
    args = [photos, "--policy", policy_file, "--db", f"sqlite:///{db}", "--out", out]
    # What Python makes of the bytes of a non-UTF-8 command line (surrogateescape).
    result = run("check", *args, option, "caf\udce9")
    assert result.exit_code == 2
    assert (
        f"Invalid value for '{option}': not valid UTF-8 text (undecodable bytes?), so it cannot "
        "be logged" in result.output
    )
    assert not out.exists() and not db.exists()


@pytest.mark.parametrize("command", ["check", "compile"])
@pytest.mark.parametrize(
    ("device", "message"),
    [
        (
            "banana",
            "Error: device 'banana': not a torch device (expected e.g. cpu, cuda, cuda:1 or mps)",
        ),
        ("meta", "Error: device meta: holds no data, so it cannot run a model"),
    ],
)
def test_bad_devices_are_one_line_errors(tmp_path, photos, policy_file, command, device, message):
    if command == "check":
        args = ["check", photos / "sample-00.png", "--policy", policy_file, "--no-log"]
    else:
        args = ["policy", "compile", policy_file, "-o", tmp_path / "c.safetensors"]
    result = CliRunner().invoke(main, [str(a) for a in [*args, "--device", device]])
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert result.output.strip().splitlines()[-1] == message


@pytest.mark.skipif(torch_cuda_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("command", ["check", "compile"])
def test_cuda_without_cuda_is_a_one_line_error(tmp_path, photos, policy_file, command):
    import torch

    if command == "check":
        args = ["check", photos / "sample-00.png", "--policy", policy_file, "--no-log"]
    else:
        args = ["policy", "compile", policy_file, "-o", tmp_path / "c.safetensors"]
    result = CliRunner().invoke(main, [str(a) for a in [*args, "--device", "cuda"]])
    assert result.exit_code == 1, result.output
    why = (
        f"this torch build ({torch.__version__}) has no CUDA support"
        if torch.version.cuda is None
        else "no CUDA GPU is visible"
    )
    assert result.output.strip().splitlines()[-1] == (
        f"Error: device cuda: CUDA is not available ({why}); use cpu"
    )


@pytest.fixture
def mixed_folder(tmp_path, photos):
    """Images whose names do not say so, and files that are not images, under one folder."""
    folder = tmp_path / "mixed"
    images = [
        save_as(photos / "sample-00.png", folder / "photo.jfif", "JPEG"),
        save_as(photos / "sample-01.png", folder / "photo.avif", "AVIF"),
        save_as(photos / "sample-02.png", folder / "no-extension", "PNG"),
        save_as(photos / "sample-03.png", folder / "trailing.png ", "PNG"),
        save_as(photos / "sample-04.png", folder / ".hidden" / "h.png", "PNG"),
    ]
    (folder / "notes.txt").write_text("not an image\n")
    (folder / "named.png").write_bytes(b"claims to be a PNG")  # an image name: fails closed
    os.symlink("nowhere", folder / "dangling")
    os.symlink("loop", folder / "loop")
    os.symlink(".hidden", folder / "folder-link")
    os.mkfifo(folder / "pipe")  # never opened: reading it would block
    not_checked = {
        str(folder / "dangling"): "broken link (its target does not exist)",
        str(folder / "folder-link"): "link to a folder (not followed)",
        str(folder / "loop"): "link loop (the link points back to itself)",
        str(folder / "notes.txt"): "not an image (no image format recognised)",
        str(folder / "pipe"): "not a regular file (a pipe, socket or device is never read)",
    }
    return folder, images, not_checked


def test_folder_scan_decides_by_content_and_reports_what_it_did_not_check(
    tmp_path, mixed_folder, policy_file
):
    folder, images, not_checked = mixed_folder
    db = tmp_path / "m.db"
    result, rows = json_check(folder, "--policy", policy_file, "--db", f"sqlite:///{db}")
    assert result.exit_code == 1
    decided = {r["file"]: r["verdict"] for r in rows if r["checked"]}
    assert decided == {**{str(p): "flag" for p in images}, str(folder / "named.png"): "error"}
    skipped = {r["file"]: r["reason"] for r in rows if not r["checked"]}
    assert skipped == not_checked
    assert result.output.strip().splitlines()[-1] == (
        "Error: 1 image(s) could not be judged (verdict error: see the note column); "
        "5 file(s) were not checked (see 'not checked')"
    )
    with sqlite3.connect(db) as conn:  # every image has its decision; other files have none
        assert conn.execute("select count(*) from decisions").fetchone() == (6,)


def test_folder_scan_lists_what_it_did_not_check_in_the_table(mixed_folder, policy_file):
    folder, images, not_checked = mixed_folder
    result = run("check", folder, "--policy", policy_file, "--no-log")
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("not checked")))
    listed = [re.split(r" {2,}", line) for line in lines[start + 2 : start + 2 + len(not_checked)]]
    assert dict(listed) == not_checked
    assert lines[-1] == "6 images: 5 flag, 1 error; 5 file(s) not checked"


def test_a_folder_with_no_image_names_what_it_skipped(tmp_path, policy_file):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "readme.md").write_text("# hello\n")
    result = run("check", folder, "--policy", policy_file, "--no-log")
    assert result.exit_code == 1
    assert f"{folder / 'readme.md'}  not an image (no image format recognised)" in result.output
    assert f"Error: no image files found in {folder}" in result.output


@pytest.mark.slow  # a fresh interpreter imports torch and transformers
def test_a_command_prints_no_progress_bars_of_its_libraries(tmp_path, photos, policy_file):
    """stderr is for our messages: transformers' "Loading weights" bars are switched off."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    image = sorted(photos.iterdir())[0]
    done = subprocess.run(
        [sys.executable, "-m", "moderation", "check", str(image), "--policy", str(policy_file)]
        + ["--no-log"],
        capture_output=True,
        text=True,
        env={**env, "HF_HUB_OFFLINE": "1"},
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert "1 image: 1 flag" in done.stdout
    assert done.stderr == ""
