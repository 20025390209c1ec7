"""`examples: FOLDER` concepts: the mean of example images' embeddings, their digest, their errors."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from moderation.engine import Moderator
from policy import CompiledPolicy, PolicyError, compile_policy, load_policy

POLICY = """\
policy: logos
model: {model}
concepts:
  - name: red-logo
    examples: examples/red
    threshold: 0.9
    action: blur
  - name: words
    prompts: ["a photo"]
    threshold: 0.99
"""


def png(color, seed: int, noise: float = 20, size: int = 64) -> bytes:
    """A noisy square of one colour, as PNG bytes."""
    rng = np.random.default_rng(seed)
    pixels = np.asarray(color, float)[None, None, :] + rng.normal(0, noise, (size, size, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def policy_path(tmp_path, tiny_clip_dir):
    folder = tmp_path / "examples" / "red"
    (folder / "more").mkdir(parents=True)
    (folder / "a.png").write_bytes(png((220, 30, 30), 1))
    (folder / "b.png").write_bytes(png((200, 40, 30), 2))
    (folder / "more" / "c.png").write_bytes(png((230, 20, 40), 3))
    (folder / ".DS_Store").write_bytes(b"\0finder junk")  # names starting with "." are skipped
    path = tmp_path / "logos.yaml"
    path.write_text(POLICY.format(model=tiny_clip_dir), encoding="utf-8")
    return path


def test_the_concept_is_the_normalised_mean_of_its_images(policy_path, encoder, tmp_path):
    policy = load_policy(policy_path)
    names = [shown for shown, _ in policy.concepts[0].example_files]
    assert names == ["examples/red/a.png", "examples/red/b.png", "examples/red/more/c.png"]
    compiled = compile_policy(policy, encoder, cache=False)
    files = sorted((tmp_path / "examples" / "red").rglob("*.png"))
    # The engine's own embedding of each example file (its decoding and preprocessing)
    engine = Moderator(compiled, encoder).moderate([str(f) for f in files], apply=False)
    rows = torch.from_numpy(np.concatenate([d.embedding for d in engine.decisions]))
    ours = encoder.encode_image_bytes([f.read_bytes() for f in files])
    # The engine's one `cover` view of a square image is CLIP's centre crop, which examples use,
    # up to float rounding (2e-7 here: uint8 and float frames take different resize paths).
    assert torch.allclose(ours, rows, atol=1e-5, rtol=0)
    expected = F.normalize(F.normalize(rows, dim=-1).mean(0), dim=0)
    assert torch.allclose(compiled.concept_matrix[0], expected, atol=1e-6)
    assert len(compiled.example_sha256) == 3
    assert all(h.startswith("red-logo:") for h in compiled.example_sha256)


def test_fires_on_an_image_near_the_examples_and_not_far_away(policy_path, encoder, tmp_path):
    moderator = Moderator(compile_policy(load_policy(policy_path), encoder, cache=False), encoder)
    near, far = tmp_path / "near.png", tmp_path / "far.png"
    near.write_bytes(png((210, 35, 35), 10))
    far.write_bytes(png((30, 30, 220), 11))
    decisions = moderator.moderate([str(near), str(far)], apply=False).decisions
    assert decisions[0].fired == ("red-logo",) and decisions[0].action == "blur"
    assert decisions[1].fired == () and decisions[1].action == "allow"
    assert decisions[0].cosines[0] > 0.99 > 0.6 > decisions[1].cosines[0]


def test_the_digest_covers_the_images(policy_path, encoder, tmp_path):
    first = compile_policy(load_policy(policy_path), encoder, cache=False)
    again = compile_policy(load_policy(policy_path), encoder, cache=False)
    assert first.digest == again.digest
    (tmp_path / "examples" / "red" / "b.png").write_bytes(png((200, 40, 30), 99))
    changed = compile_policy(load_policy(policy_path), encoder, cache=False)
    assert changed.digest != first.digest
    assert changed.example_sha256[0] == first.example_sha256[0]
    assert changed.example_sha256[1] != first.example_sha256[1]
    saved = CompiledPolicy.load(changed.save(tmp_path / "logos.compiled.safetensors"))
    assert (saved.digest, saved.example_sha256) == (changed.digest, changed.example_sha256)


def test_an_unreadable_image_is_named(policy_path, encoder, tmp_path):
    (tmp_path / "examples" / "red" / "notes.txt").write_text("not an image")
    with pytest.raises(PolicyError) as caught:
        compile_policy(load_policy(policy_path), encoder, cache=False)
    assert str(caught.value) == (
        f"{policy_path}:5:5 concepts[0].examples: concept 'red-logo': cannot read example "
        "image 'examples/red/notes.txt': cannot identify image file"
    )


@pytest.mark.parametrize(
    ("examples", "message"),
    [
        ("missing", "concept 'red-logo': folder 'missing' not found"),
        ("../elsewhere", "concept 'red-logo': '../elsewhere' is outside the policy's folder"),
        ("/tmp", "concept 'red-logo': '/tmp' must be a folder relative to the policy's folder"),
        (
            "examples/red/a.png",
            "concept 'red-logo': 'examples/red/a.png' is not a folder of images",
        ),
        ("empty", "concept 'red-logo': folder 'empty' holds no example images"),
        ("linked", "concept 'red-logo': 'linked/out.png' leads outside the policy's folder"),
    ],
)
def test_bad_folders(policy_path, tmp_path, examples, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "linked").mkdir()
    (tmp_path.parent / "out.png").write_bytes(png((1, 2, 3), 0))
    os.symlink(tmp_path.parent / "out.png", tmp_path / "linked" / "out.png")
    (tmp_path.parent / "elsewhere").mkdir(exist_ok=True)
    policy_path.write_text(policy_path.read_text().replace("examples/red", examples))
    with pytest.raises(PolicyError) as caught:
        load_policy(policy_path)
    assert str(caught.value) == f"{policy_path}:5:5 concepts[0].examples: {message}"


def test_examples_and_prompts_are_one_definition(policy_path):
    policy_path.write_text(
        policy_path.read_text().replace(
            "    examples: examples/red", "    examples: x\n    prompts: [a]"
        )
    )
    with pytest.raises(PolicyError) as caught:
        load_policy(policy_path)
    assert str(caught.value) == (
        f"{policy_path}:5:5 concepts[0].examples: give one of 'prompts', 'embedding' or "
        "'examples', not both 'prompts' and 'examples'"
    )


def test_a_base_reads_its_examples_from_its_own_folder(policy_path, tmp_path, encoder):
    base = tmp_path / "shared" / "logos.yaml"
    base.parent.mkdir()
    (tmp_path / "examples").rename(tmp_path / "shared" / "examples")
    base.write_text(policy_path.read_text(), encoding="utf-8")
    child = tmp_path / "child.yaml"
    child.write_text(
        "extends: shared/logos.yaml\nconcepts:\n  - name: red-logo\n    threshold: 0.95\n"
    )
    policy = load_policy(child)
    assert policy.concepts[0].example_files[0][1] == (base.parent / "examples/red/a.png").resolve()
    assert compile_policy(policy, encoder, cache=False).thresholds[0] == pytest.approx(0.95)


def test_an_encoder_without_images_is_named(policy_path):
    class TextOnly:
        model_id, embed_dim, text_fingerprint, max_text_tokens = "text-only", 32, None, 77

        def encode_text(self, prompts):
            return torch.ones(len(prompts), 32)

        def checkpoint_tensor(self, name):
            raise KeyError(name)

    text = policy_path.read_text()
    policy_path.write_text(text[: text.index("  - name: words")])  # no prompts to encode
    with pytest.raises(PolicyError) as caught:
        compile_policy(load_policy(policy_path), TextOnly(), cache=False)
    assert str(caught.value).endswith(
        "concept 'red-logo': model text-only cannot embed images (no encode_image_bytes)"
    )
