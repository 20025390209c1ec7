"""Issue 19: mistakes a new user makes are named, not absorbed.

A relative model folder follows a policy written elsewhere and a moved artifact, and errors say
where they looked (item 4); filters that name nothing say so (item 6); `policy validate` finds
what compiling would (item 7); a `--model` override warns (item 8); smaller ones (item 10).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from moderation.cli import main

ROOT = Path(__file__).resolve().parents[1]


def run(*args, code: int = 0):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result


@pytest.fixture(scope="module")
def walk(tmp_path_factory):
    """docs/calibration.md's data: tiny-clip, calib.yaml, logos.yaml and a log of 22 decisions."""
    from moderation.demo_calibration import prepare

    folder = tmp_path_factory.mktemp("walk") / "calibration"
    prepare(folder)
    return folder


# -- item 4: a relative model folder, a policy written elsewhere, a moved artifact ------------


def test_calibrate_out_elsewhere_rewrites_the_relative_model_folder(walk, tmp_path):
    from moderation.review.queue import ReviewQueue

    copy = tmp_path / "walk.db"
    for suffix in ("", "-wal", "-shm"):  # a WAL database: its last writes are in -wal
        if (walk / f"moderation.db{suffix}").exists():
            shutil.copy(walk / f"moderation.db{suffix}", f"{copy}{suffix}")
    url = f"sqlite:///{copy}"
    queue = ReviewQueue(url)
    for item in (1, 2, 3, 5):
        queue.reject(item, "alice", reason="nudity")
    for item in (4, 6, 7, 8):
        queue.approve(item, "alice")
    out = tmp_path / "elsewhere" / "calibrated.yaml"
    out.parent.mkdir()
    run("policy", "calibrate", walk / "calib.yaml", "--db", url, "--min-examples", "3",
        "--target-precision", "0.8", "--out", out)  # fmt: skip
    text = out.read_text(encoding="utf-8")
    model_line = next(line for line in text.splitlines() if line.startswith("model:"))
    target = (out.parent / model_line.split(":", 1)[1].strip()).resolve()
    assert target == (walk / "tiny-clip").resolve()
    from policy import load_policy

    assert load_policy(out).resolved_model == str((walk / "tiny-clip").resolve())


def test_relocate_keeps_hub_ids_comments_and_same_folder(tmp_path):
    from policy.relocate import relocate_model

    (tmp_path / "a" / "m").mkdir(parents=True)
    src = tmp_path / "a" / "p.yaml"
    text = 'policy: x\nmodel: "m"   # the tiny one\n'
    moved = relocate_model(text, src, tmp_path / "b" / "c" / "q.yaml")
    assert moved == 'policy: x\nmodel: "../../a/m"   # the tiny one\n'
    assert relocate_model(text, src, tmp_path / "a" / "q.yaml") == text
    hub = "model: openai/clip-vit-large-patch14\n"
    assert relocate_model(hub, src, tmp_path / "b" / "q.yaml") == hub


def test_a_moved_artifact_finds_its_model_and_records_its_identity(walk, tmp_path):
    from moderation.loading import load_compiled
    from policy import CompiledPolicy

    artifact = walk / "calib.compiled.safetensors"
    run("policy", "compile", walk / "calib.yaml", "-o", artifact)
    compiled = CompiledPolicy.load(artifact)
    assert compiled.model == "tiny-clip"  # as written: the digest is the same in every folder
    assert compiled.model_path == str((walk / "tiny-clip").resolve())
    weights = (walk / "tiny-clip" / "model.safetensors").read_bytes()
    import hashlib

    assert compiled.model_sha256 == hashlib.sha256(weights).hexdigest()
    moved = tmp_path / "deploy" / "calib.safetensors"
    moved.parent.mkdir()
    shutil.copy(artifact, moved)
    loaded, encoder = load_compiled(moved)
    assert loaded.digest == compiled.digest
    assert encoder.model_path == compiled.model_path


def test_a_model_that_is_nowhere_says_where_it_looked(walk, tmp_path):
    from moderation.errors import EncoderError
    from moderation.loading import load_compiled

    shutil.copy(walk / "calib.yaml", tmp_path / "calib.yaml")
    with pytest.raises(EncoderError) as info:
        load_compiled(tmp_path / "calib.yaml")
    message = str(info.value)
    assert "a relative `model:` folder is read from the policy file's folder" in message
    assert f"looked for {(tmp_path / 'tiny-clip').resolve()}" in message


def test_a_shadow_candidate_on_a_relative_live_model_fits(walk, tmp_path, monkeypatch):
    """The live policy says `model: tiny-clip` (relative); a YAML candidate written for another
    model (README: `--shadow examples/strict.yaml`) is compiled with the live encoder: the same
    model, however each records it."""
    from moderation import Moderator

    monkeypatch.chdir(tmp_path)  # not the policy's folder: "tiny-clip" is not a path from here
    candidate = walk / "candidate.yaml"
    candidate.write_text(
        "extends: calib.yaml\nversion: 2\nmodel: openai/clip-vit-large-patch14\n",
        encoding="utf-8",
    )
    moderator = Moderator.from_policy(walk / "calib.yaml", shadow=[candidate])
    assert [p.version for p in moderator.shadow_policies] == ["2"]


# -- item 6: filters that name nothing ----------------------------------------------------------


def test_a_concept_or_policy_that_no_logged_policy_has_is_named(walk):
    url = f"sqlite:///{walk / 'moderation.db'}"
    result = run("decisions", "list", "--concept", "nudty", "--db", url, code=1)
    assert "no concept 'nudty' in any logged policy; did you mean 'nudity'?" in result.stderr
    result = run("review", "list", "--policy", "nosuch", "--db", url, code=1)
    assert "no policy 'nosuch' (name or digest prefix) in the log; the log has: calib" in (
        result.stderr
    )
    result = run("decisions", "list", "--concept", "nudty", "--db", url, "--json", code=1)
    assert "did you mean 'nudity'?" in result.stderr
    # A known concept that matches nothing is an empty answer, as before.
    assert "No review items match." in run("review", "list", "--concept", "gore", "--status",
                                           "rejected", "--db", url).stdout  # fmt: skip
    assert json.loads(run("decisions", "list", "--concept", "minor", "--policy", "calib",
                          "--verdict", "error", "--db", url, "--json").stdout) == []  # fmt: skip


def test_policy_diff_accepts_builtin_names(tmp_path):
    result = run("policy", "diff", "builtin:default", ROOT / "examples" / "strict.yaml", code=1)
    assert "~ concept nudity" in result.stdout
    result = run("policy", "diff", "builtin:nope", ROOT / "examples" / "strict.yaml", code=2)
    assert "no shipped policy 'nope'; there are: builtin:default" in result.stderr


# -- item 7: validate checks what can be checked without a model, --deep/--model compile --------


def test_validate_finds_a_non_image_example_a_missing_model_and_a_long_prompt(walk, tmp_path):
    logos = tmp_path / "logos"
    shutil.copytree(walk / "examples", logos / "examples")
    (logos / "examples" / "logo" / "notes.txt").write_text("not an image", encoding="utf-8")
    (logos / "logos.yaml").write_text((walk / "logos.yaml").read_text(), encoding="utf-8")
    (logos / "tiny-clip").symlink_to(walk / "tiny-clip")
    result = run("policy", "validate", logos / "logos.yaml", code=1)
    assert "concepts[0].examples: concept 'logo': cannot read example image " in result.stdout
    assert "'examples/logo/notes.txt': cannot identify image file" in result.stdout

    shutil.copy(walk / "calib.yaml", tmp_path / "calib.yaml")  # without its tiny-clip folder
    result = run("policy", "validate", tmp_path / "calib.yaml", code=1)
    assert f"model: model 'tiny-clip': no folder {(tmp_path / 'tiny-clip').resolve()}" in (
        result.stdout
    )

    long = walk / "long.yaml"
    long.write_text(
        "policy: long\nmodel: tiny-clip\nconcepts:\n  - name: c\n"
        f'    prompts: ["{"word " * 80}"]\n',
        encoding="utf-8",
    )
    result = run("policy", "validate", long, code=1)
    assert "concepts[0].prompts[0]: concept 'c': prompt has" in result.stdout
    assert "reads at most 77" in result.stdout


def test_validate_deep_and_model_compile(walk, tmp_path):
    assert (
        "ok (2 concepts, 1 special-care)"
        in run("policy", "validate", walk / "calib.yaml", "--deep").stdout
    )
    shutil.copy(walk / "calib.yaml", tmp_path / "calib.yaml")
    result = run("policy", "validate", tmp_path / "calib.yaml", "--model", walk / "tiny-clip")
    assert "ok" in result.stdout
    result = run("policy", "validate", tmp_path / "calib.yaml", "--deep", code=1)
    assert "model: model tiny-clip: not a local folder" in result.stdout


# -- item 8: --model overriding `model:` warns ------------------------------------------------


def test_a_model_override_warns_naming_both(walk, caplog):
    from moderation.loading import load_compiled

    with caplog.at_level(logging.WARNING, logger="moderation"):
        load_compiled(ROOT / "policies" / "default.yaml", model=walk / "tiny-clip")
    warned = [r.getMessage() for r in caplog.records if r.name == "moderation"]
    assert any(
        "'default' is tuned for model 'openai/clip-vit-large-patch14' but runs with" in m
        and "tiny-clip" in m
        for m in warned
    ), warned
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="moderation"):
        load_compiled(walk / "calib.yaml", model=walk / "tiny-clip")  # its own model: silent
    assert not [r for r in caplog.records if "is tuned for model" in r.getMessage()]


# -- item 10: smaller ones ------------------------------------------------------------------------


def test_one_image_is_singular_and_one_positive_too(walk, tmp_path):
    image = tmp_path / "a.png"
    shutil.copy(walk / "labelled" / "gray" / "gray-00.png", image)
    result = run("check", image, "--policy", walk / "calib.yaml", "--no-log")
    assert "\n1 image: 1 allow" in result.stdout

    from moderation.tables import plural  # what calibrate's "has N positives" uses

    assert (plural(1, "positive"), plural(2, "positive")) == ("1 positive", "2 positives")


def test_the_license_is_an_spdx_string():
    """setuptools deprecates the `{text = ...}` table: a banner on every install."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+ (the project supports 3.10)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["license"] == "Apache-2.0"
    build = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["build-system"]
    assert "setuptools>=77" in build["requires"]  # the first to read an SPDX string


def test_the_torchvision_fallback_notice_is_silenced_and_nothing_else(caplog):
    import moderation  # noqa: F401  (installs the filter)

    logger = logging.getLogger("transformers.utils.import_utils")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning(
            "`CLIPImageProcessor` requires torchvision (not installed); falling back to "
            "`CLIPImageProcessorPil` for backward compatibility."
        )
        logger.warning("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]


def test_a_quick_bench_says_why_it_misses_a_target():
    from moderation.bench.quick import quick_misses
    from moderation.bench.report import format_report

    result = {
        "config": {"quick": True, "batch_sizes": [1], "repeats": 2, "concept_batch": 4},
        "environment": {"device": "cpu"},
        "targets": [{"target": "ours >= 50x faster", "measured": "2x", "met": False}],
    }
    lines = quick_misses(result)
    assert (
        "1 target(s) missed by this --quick run: it measures batch 1 only, 2 repeats" in (lines[1])
    )
    assert "the full run (`moderation bench` without --quick" in lines[1]
    assert quick_misses({**result, "config": {**result["config"], "quick": False}}) == []
    assert format_report  # the report prints these lines under its Targets table


def test_the_review_placeholder_is_marked_in_out_files(walk, tmp_path):
    from PIL import Image

    from moderation.review_badge import BADGE, pending_review_name, with_badge

    assert pending_review_name(Path("a/b.png")) == Path("a/b.pending-review.png")
    plain = Image.new("RGB", (300, 200), (120, 120, 120))
    marked = with_badge(plain)
    assert marked.size == plain.size and marked.getpixel((150, 2)) == (255, 214, 0)
    assert marked.getpixel((150, 150)) == (120, 120, 120) and BADGE.startswith("PENDING REVIEW")
    # check --out: a review decision's file is marked and named so (calib.yaml's review band)
    images = tmp_path / "in"
    images.mkdir()
    for name in ("gray-00.png", "gray-01.png", "gray-02.png", "gray-03.png"):
        shutil.copy(walk / "labelled" / "gray" / name, images / name)
    policy = tmp_path / "all-review.yaml"
    policy.write_text(
        f"policy: r\nmodel: {walk / 'tiny-clip'}\nreview_band: 0.49\n"
        "concepts:\n  - {name: c, prompts: [a photo], threshold: 0.25, action: blur}\n",
        encoding="utf-8",
    )
    out = tmp_path / "out"
    result = run("check", images, "--policy", policy, "--out", out, "--no-log", "--json")
    rows = json.loads(result.stdout)
    assert "review" in {r["action"] for r in rows}
    for row in rows:
        marked = row["out"].endswith(".pending-review.png")
        assert marked == (row["action"] == "review"), row
        assert Path(row["out"]).is_file()


def test_claim_explains_its_token_column(walk, tmp_path):
    copy = tmp_path / "walk.db"
    for suffix in ("", "-wal", "-shm"):
        if (walk / f"moderation.db{suffix}").exists():
            shutil.copy(walk / f"moderation.db{suffix}", f"{copy}{suffix}")
    result = run("review", "claim", "--reviewer", "alice", "-n", "1", "--db", f"sqlite:///{copy}")
    assert "TOKEN proves a claim is yours" in result.output
