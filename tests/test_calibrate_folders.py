"""`policy calibrate` on folders of labelled images: the engine's embeddings (cached), example
images left out, conflicting labels, plots, and `--out` for a policy that extends another."""

from __future__ import annotations

import difflib
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from moderation.calibration.cache import ImageEmbeddingCache
from moderation.calibration.calibrate import calibrate
from moderation.cli import main
from tests.test_policy_examples import png

POLICY = """\
# Logos, learnt from example images.
policy: logos
model: {model}
defaults: {{action: review}}
concepts:
  - name: red-logo
    examples: examples/red
    threshold: 0.3
  - name: spare
    embedding: {vector}
    threshold: 0.9
"""


@pytest.fixture
def folders(tmp_path, tiny_clip_dir):
    examples = tmp_path / "policies" / "examples" / "red"
    examples.mkdir(parents=True)
    for i in range(3):
        (examples / f"e{i}.png").write_bytes(png((220, 30, 30), 100 + i))
    vector = [1.0] + [0.0] * 31
    policy = tmp_path / "policies" / "logos.yaml"
    policy.write_text(POLICY.format(model=tiny_clip_dir, vector=vector), encoding="utf-8")
    red, clean = tmp_path / "red", tmp_path / "clean"
    red.mkdir()
    clean.mkdir()
    for i in range(6):
        (red / f"r{i}.png").write_bytes(png((205 + 5 * i, 40, 30), i))
        (clean / f"b{i}.png").write_bytes(png((30, 40, 200 + 5 * i), 50 + i))
    shutil.copy(examples / "e0.png", red / "copy-of-an-example.png")
    return policy, red, clean


def run(*args: str, code: int = 0):
    result = CliRunner().invoke(main, ["policy", "calibrate", *args], catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result


class CountingCache(ImageEmbeddingCache):
    """The real on-disk cache, counting what it was asked."""

    hits = misses = 0

    def get(self, key, image_sha256, dim):
        found = super().get(key, image_sha256, dim)
        if found is None:
            self.misses += 1
        else:
            self.hits += 1
        return found


def test_folders_examples_left_out_and_the_cache(folders, tmp_path):
    policy, red, clean = folders
    cache = CountingCache(tmp_path / "cache")
    first = calibrate(
        policy, use_log=False, positives=[("red-logo", red)], negatives=[clean],
        min_examples=5, cache=cache,
    ).to_dict()  # fmt: skip
    assert (cache.hits, cache.misses) == (0, 13)
    logo = first["concepts"]["red-logo"]
    # the copy of an example image defines the concept: it is not test data
    assert (logo["positives"], logo["negatives"], logo["excluded_examples"]) == (6, 6, 1)
    assert logo["current"]["tp"] == 6 and logo["current"]["fp"] == 6  # 0.3 is far too low
    suggested = logo["suggested"]
    assert (suggested["tp"], suggested["fp"], suggested["changed"]) == (6, 0, True)
    assert first["labels"] == {"decisions": 0, "images": 13, "distinct_images": 13, "skipped": {}}
    # `spare` has no positive folder: the clean images are its only labels
    assert first["concepts"]["spare"]["positives"] == 0
    assert first["concepts"]["spare"]["refused"] == (
        "needs 5 more positives (--min-examples 5; has 0 positives, 6 negatives)"
    )
    again = calibrate(
        policy, use_log=False, positives=[("red-logo", red)], negatives=[clean],
        min_examples=5, cache=cache,
    ).to_dict()  # fmt: skip
    assert (cache.hits, cache.misses) == (13, 13)
    assert again["concepts"] == first["concepts"]


def test_an_image_labelled_both_ways_is_left_out(folders, tmp_path):
    policy, red, clean = folders
    shutil.copy(red / "r0.png", clean / "also-clean.png")
    data = calibrate(policy, use_log=False, positives=[("red-logo", red)], negatives=[clean],
                     min_examples=1).to_dict()  # fmt: skip
    logo = data["concepts"]["red-logo"]
    assert (logo["positives"], logo["negatives"], logo["conflicts"]) == (5, 6, 1)
    assert data["labels"]["distinct_images"] == 13


def test_one_image_in_the_log_and_a_folder_counts_once(folders, tmp_path):
    """Identity is the engine's pixel hash: a reviewed decision and a file of the same image
    are one image; where they disagree it is left out for that concept."""
    from moderation.engine import Moderator
    from moderation.review.queue import ReviewQueue

    policy, red, clean = folders
    url = f"sqlite:///{tmp_path / 'log.db'}"
    with Moderator.from_policy(
        policy, db=url, spool_dir=tmp_path / "spool", held_dir=tmp_path / "held"
    ) as moderator:
        decision = moderator.moderate(str(red / "r0.png")).decisions[0]
    assert decision.fired == ("red-logo",)
    queue = ReviewQueue(url)
    queue.reject(queue.list()[0].id, "alice", reason="a logo")  # shows red-logo, not spare
    shutil.copy(red / "r0.png", clean / "r0-again.png")
    data = calibrate(policy, db=url, positives=[("red-logo", red)], negatives=[clean],
                     min_examples=1).to_dict()  # fmt: skip
    assert data["labels"]["decisions"] == 1 and data["labels"]["images"] == 14
    assert data["labels"]["distinct_images"] == 13
    logo, spare = data["concepts"]["red-logo"], data["concepts"]["spare"]
    # red-logo: the log and --positive say shown, --negative says not: left out
    assert (logo["positives"], logo["negatives"], logo["conflicts"]) == (5, 6, 1)
    # spare: the log and --negative agree it is not shown: one negative, not two
    assert (spare["positives"], spare["negatives"], spare["conflicts"]) == (0, 7, 0)


def test_an_unreadable_file_is_named(folders):
    policy, red, clean = folders
    (clean / "notes.txt").write_text("not an image")
    result = run(str(policy), "--negative", str(clean), code=1)
    assert (
        result.output.splitlines()[-1]
        == f"Error: {clean / 'notes.txt'}: cannot identify image file"
    )


def test_plots_are_written_one_per_concept(folders, tmp_path):
    policy, red, clean = folders
    plots = tmp_path / "plots"
    data = json.loads(run(str(policy), "--positive", f"red-logo={red}", "--negative", str(clean),
                          "--min-examples", "5", "--plot", str(plots), "--json").stdout)  # fmt: skip
    assert data["plots"] == [str(plots / "red-logo.png"), str(plots / "spare.png")]
    for path in data["plots"]:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == (800, 500)
            pixels = np.asarray(image.convert("RGB"))
        # drawn, not blank: the histogram's red and blue bars and the threshold lines are there
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20
    red_logo = np.asarray(Image.open(plots / "red-logo.png").convert("RGB")).reshape(-1, 3)
    assert ((red_logo[:, 0] > 200) & (red_logo[:, 2] < 150)).sum() > 100  # positives' bars


def test_out_for_a_policy_that_extends_another(folders, tmp_path):
    policy, red, clean = folders
    child = policy.parent / "child.yaml"
    child.write_text("# Ours.\nextends: logos.yaml\npolicy: ours\n", encoding="utf-8")
    out = policy.parent / "ours-calibrated.yaml"
    base_before = policy.read_text()
    result = run(str(child), "--positive", f"red-logo={red}", "--negative", str(clean),
                 "--min-examples", "5", "--out", str(out))  # fmt: skip
    assert policy.read_text() == base_before  # the base is never edited
    added = [
        line
        for line in difflib.ndiff(child.read_text().splitlines(), out.read_text().splitlines())
        if line.startswith(("+ ", "- "))
    ]
    threshold = json.loads(
        run(str(child), "--positive", f"red-logo={red}", "--negative", str(clean),
            "--min-examples", "5", "--json").stdout
    )["concepts"]["red-logo"]["suggested"]["threshold"]  # fmt: skip
    assert added == ["+ concepts:", "+   - name: red-logo", f"+     threshold: {threshold}"]
    assert "1 threshold changed (red-logo 0.3000 ->" in result.output
    flat = json.loads(run(str(out), "--positive", f"red-logo={red}", "--negative", str(clean),
                          "--min-examples", "5", "--json").stdout)  # fmt: skip
    assert flat["concepts"]["red-logo"]["current"]["threshold"] == threshold


def test_out_elsewhere_must_still_load(folders, tmp_path):
    policy, red, clean = folders
    out = tmp_path / "elsewhere" / "new.yaml"
    out.parent.mkdir()
    result = run(str(policy), "--positive", f"red-logo={red}", "--negative", str(clean),
                 "--min-examples", "5", "--out", str(out), code=1)  # fmt: skip
    assert result.output.splitlines()[-1] == (
        f"Error: --out {out}: the new policy does not load from that folder (concept 'red-logo': "
        f"folder 'examples/red' not found); write it beside {policy}"
    )
    assert not out.exists() and list(out.parent.iterdir()) == []
    same = run(str(policy), "--negative", str(clean), "--out", str(policy), code=1)
    assert (
        same.output.splitlines()[-1]
        == f"Error: --out {policy}: is the policy itself; write a new file"
    )


def test_out_needs_yaml(folders, tmp_path):
    policy, red, clean = folders
    artifact = tmp_path / "a.safetensors"
    artifact.write_bytes(b"x")
    result = run(str(artifact), "--out", str(tmp_path / "n.yaml"), code=2)
    assert "--out needs a YAML policy, not a compiled artifact" in result.output
